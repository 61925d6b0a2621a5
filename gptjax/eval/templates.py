"""Every task's prompt template, in one place, and the tasks generated on the fly.

An `Item` is what the few-shot evaluator sees: a formatted context that ends where the answer
starts, the correct completion (what a demonstration shows after its context), and for
likelihood-scored tasks the candidate completions. Completions start with the space that joins
them to the context, so a byte-BPE tokenizes the answer's first word as a word after text.

Formats follow GPT-3's Appendix G where it gives one (arithmetic: "Q: What is 98 plus 45?\\nA:"
-> " 143"; LAMBADA fill-in-the-blank: "... ____. ->" -> " word") and lm-evaluation-harness's
prompts for the GLUE tasks ("<sentence>\\nQuestion: Is this sentence positive or negative?\\n
Answer:" -> " positive").
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Callable, Optional, Sequence

import numpy as np

from gptjax.data.tasks import Example, TaskSpec


@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluation query.

    Attributes:
      context: the formatted query, ending where the answer starts.
      target: the correct completion (shown after the context in a demonstration).
      choices: candidate completions for likelihood scoring; () for a generation task.
      label: index of the correct candidate in `choices` (-1 for generation).
    """

    context: str
    target: str
    choices: tuple = ()
    label: int = -1


# ================================================================================ GLUE-style
@dataclasses.dataclass(frozen=True)
class Template:
    """How a gptjax.data.tasks Example becomes an Item.

    Attributes:
      context: Example -> the formatted query.
      label_words: classification: the completion of each class index; () for multiple choice,
        whose candidates are " " + each of the example's choices.
    """

    context: Callable[[Example], str]
    label_words: tuple = ()


_ENTAIL3 = (" True", " Neither", " False")  # entailment, neutral, contradiction

TEMPLATES: dict = {
    "sst2": Template(lambda e: f"{e.text_a}\nQuestion: Is this sentence positive or negative?"
                     "\nAnswer:", (" negative", " positive")),
    "cola": Template(lambda e: f"{e.text_a}\nQuestion: Does this sentence make sense?\nAnswer:",
                     (" no", " yes")),
    "mrpc": Template(lambda e: f"Sentence 1: {e.text_a}\nSentence 2: {e.text_b}\nQuestion: Do "
                     "both sentences mean the same thing?\nAnswer:", (" no", " yes")),
    "qqp": Template(lambda e: f"Question 1: {e.text_a}\nQuestion 2: {e.text_b}\nQuestion: Do "
                    "both questions ask the same thing?\nAnswer:", (" no", " yes")),
    "rte": Template(lambda e: f"{e.text_a}\nQuestion: {e.text_b} True or False?\nAnswer:",
                    (" True", " False")),          # entailment, not_entailment
    "wnli": Template(lambda e: f"{e.text_a}\nQuestion: {e.text_b} True or False?\nAnswer:",
                     (" False", " True")),          # GLUE's WNLI: 1 = entailment
    "qnli": Template(lambda e: f"{e.text_a}\n{e.text_b}\nQuestion: Does this response answer "
                     "the question?\nAnswer:", (" yes", " no")),   # entailment, not_entailment
    "mnli": Template(lambda e: f"{e.text_a}\nQuestion: {e.text_b} True, False or Neither?"
                     "\nAnswer:", _ENTAIL3),
    "snli": Template(lambda e: f"{e.text_a}\nQuestion: {e.text_b} True, False or Neither?"
                     "\nAnswer:", _ENTAIL3),
    "scitail": Template(lambda e: f"{e.text_a}\nQuestion: {e.text_b} True or False?\nAnswer:",
                        (" True", " False")),       # entails, neutral
    "story_cloze": Template(lambda e: e.text_a),
    "race": Template(lambda e: f"{e.text_a}\nAnswer:"),
    "mctest": Template(lambda e: f"{e.text_a}\nAnswer:"),
}


def example_item(spec: TaskSpec, ex: Example) -> Item:
    """The Item of a labelled gptjax.data.tasks example, with the task's template."""
    if spec.name not in TEMPLATES:
        raise ValueError(f"task {spec.name!r} has no few-shot template (regression tasks are "
                         f"not scored by likelihood); allowed: {sorted(TEMPLATES)}")
    t = TEMPLATES[spec.name]
    if t.label_words:
        choices = t.label_words
    else:
        choices = tuple(" " + c for c in ex.choices)
    if ex.label is None:
        raise ValueError(f"{spec.name} example {ex.idx!r} has no label")
    label = int(ex.label)
    return Item(t.context(ex), choices[label], choices, label)


# ================================================================================ arithmetic
# GPT-3 section 3.9.1: operands drawn uniformly from [0, 10^n); subtraction answers can be
# negative; 2Dx multiplies two 2-digit numbers; 1DC combines three 1-digit numbers with two of
# + - *, the last two in parentheses.
ARITHMETIC = {**{f"{n}D+": ("plus", n) for n in range(2, 6)},
              **{f"{n}D-": ("minus", n) for n in range(2, 6)},
              "2Dx": ("times", 2), "1DC": ("composite", 1)}
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_WORD_OPS = {"plus": operator.add, "minus": operator.sub, "times": operator.mul}


def arithmetic_items(task: str, n: int, seed: int) -> list:
    """`n` problems of one of GPT-3's arithmetic tasks (ARITHMETIC), drawn with `seed`.

    Format: "Q: What is 98 plus 45?\\nA:" -> " 143"; 1DC: "Q: What is 6+(4*8)?\\nA:" -> " 38".
    """
    if task not in ARITHMETIC:
        raise ValueError(f"unknown arithmetic task {task!r}; allowed: {list(ARITHMETIC)}")
    op, digits = ARITHMETIC[task]
    rng = np.random.default_rng([seed, list(ARITHMETIC).index(task)])
    items = []
    for _ in range(n):
        if op == "composite":
            a, b, c = (int(x) for x in rng.integers(0, 10, 3))
            o1, o2 = (str(x) for x in rng.choice(list(_OPS), 2))
            question, answer = f"{a}{o1}({b}{o2}{c})", _OPS[o1](a, _OPS[o2](b, c))
        else:
            a, b = (int(x) for x in rng.integers(0, 10 ** digits, 2))
            question, answer = f"{a} {op} {b}", _WORD_OPS[op](a, b)
        items.append(Item(f"Q: What is {question}?\nA:", f" {answer}"))
    return items


# ================================================================================ LAMBADA-style
_LAST_WORD = re.compile(r"([A-Za-z]+)[^A-Za-z]*$")


def last_word_items(text: str, n: int = 0, *, min_words: int = 30, max_words: int = 120,
                    cloze: bool = False) -> list:
    """LAMBADA-style items from any text: predict the last word of each passage.

    Passages are the text's paragraphs (split at blank lines), cut into pieces of at most
    `max_words` words; those with at least `min_words` words whose last word is alphabetic
    become items: the context is the passage up to that word (trailing punctuation dropped, as
    LAMBADA's targets carry none), the target is " " + the word.

    Args:
      cloze: GPT-3's few-shot fill-in-the-blank format: context + " ____. ->", target " word".
      n: keep the first n items (0: all).
    """
    items = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        for start in range(0, len(words), max_words):
            piece = words[start:start + max_words]
            if len(piece) < min_words:
                continue
            m = _LAST_WORD.search(piece[-1])
            if m is None or m.start() > 0:
                continue  # the last token is not a word (a number, a quote) or glued to one
            context = " ".join(piece[:-1])
            word = m.group(1)
            items.append(Item(context + " ____. ->" if cloze else context, " " + word))
            if n and len(items) >= n:
                return items
    return items


def first_word(completion: str) -> str:
    """The first word of a generated completion (what LAMBADA's exact match compares)."""
    m = re.match(r"\s*([A-Za-z]+)", completion)
    return m.group(1) if m else completion.strip()


def first_line(completion: str) -> str:
    """The completion up to its first newline, stripped (what arithmetic's exact match compares)."""
    return completion.split("\n", 1)[0].strip()


def split_pool(items: Sequence[Item], train_fraction: float, seed: int) -> tuple:
    """(demonstration pool, test items): a seeded split of items that have no train split."""
    order = np.random.default_rng(seed).permutation(len(items))
    k = round(train_fraction * len(items))
    return [items[i] for i in sorted(order[:k])], [items[i] for i in sorted(order[k:])]


def render_prompt(query: Item, demos: Sequence[Item], separator: str = "\n\n",
                  description: Optional[str] = None) -> str:
    """GPT-3's few-shot prompt: [description, separator,] K solved demonstrations, each followed
    by `separator`, then the query's context (the answer is what the model adds)."""
    parts = [description] if description else []
    parts += [d.context + d.target for d in demos]
    parts.append(query.context)
    return separator.join(parts)
