"""GPT-2's zero-shot task framings (Radford et al. 2019, section 3): a task is a prompt.

Each framing is a reader (the data set's own format, from a path), a pure prompt builder, and a
scorer that returns its metric:

  lambada      OpenAI's jsonl ({"text"}); greedy final word: `accuracy`, and
               `accuracy_stopword_filter` (the first token may not start a stop word).
  cbt          the Children's Book Test text format; each candidate filled into the 21st
               sentence, the whole sentence scored given the 20 before it: `accuracy`.
  winograd     jsonl {"sentence" with one "_", "options", "answer"}; `dprd` the DPRD text
               format. Partial scoring: the candidate substituted, only the rest scored:
               `accuracy` (summed, GPT-2) and `accuracy_mean` (per token, GPT-1).
  coqa         CoQA's official JSON; document + history + "Q: ...\n\nA:", greedy answer:
               `f1`, `em` (CoQA's script, gptjax.eval.text_metrics).
  cnn_dm       jsonl {article, highlights}; article + "\nTL;DR:", top-k 2 sampling, the first
               3 sentences: `rouge1`, `rouge2`, `rougeL` (rouge-score).
  wmt          two aligned text files; "english = french" demonstrations, then "english =",
               greedy, the first line: `bleu` (sacrebleu).
  qa           jsonl {question, answers}; "Q: ... A: ..." demonstrations, then "Q: ...\nA:",
               greedy: `exact_match`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.eval import text_metrics as tm
from gptjax.eval.scoring import round_up, score_continuations
from gptjax.inference import sampling
from gptjax.nn.model import GPT


@dataclasses.dataclass(frozen=True)
class Model:
    """What a scorer needs: the decoder, its tokenizer, and batching."""
    config: object
    params: object
    tokenizer: object
    batch_size: int = 16
    seed: int = 0


def _read_jsonl(path: str, keys: Sequence[str]) -> list:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                row = json.loads(line)
                missing = [k for k in keys if k not in row]
                if missing:
                    raise ValueError(f"{path}:{n}: missing {missing} (expected keys {list(keys)})")
                rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


# ================================================================================ generation
def complete(m: Model, prompts: Sequence[str], max_new_tokens: int, *, top_k: int = 0,
             stop: str = "") -> list:
    """Continuations (text) of text prompts: greedy, or top-k sampling seeded by m.seed. Prompts
    lose their beginning to fit n_ctx; a continuation is cut at `stop` when given. At most
    n_ctx // 2 tokens are generated (small models keep room for the prompt)."""
    max_new_tokens = min(max_new_tokens, m.config.n_ctx // 2)
    tok, room = m.tokenizer, m.config.n_ctx - max_new_tokens
    stops = [tok.encode(stop)] if stop else []
    texts = []
    for b in range(0, len(prompts), m.batch_size):
        rows = [tok.encode(p)[-room:] for p in prompts[b:b + m.batch_size]]
        out = sampling.generate(m.config, m.params, rows, max_new_tokens=max_new_tokens,
                                temperature=1.0 if top_k else 0.0, top_k=top_k,
                                eos_id=tok.eos_id, stop_sequences=stops,
                                rng=jax.random.fold_in(jax.random.PRNGKey(m.seed), b))
        for r in range(len(rows)):
            ids = [int(t) for t in out.tokens[r][: int(out.lengths[r])] if t != tok.eos_id]
            text = tok.decode(ids)
            texts.append(text.split(stop)[0] if stop else text)
    return texts


@functools.partial(jax.jit, static_argnums=0)
def _last_logprobs(model_cfg, params, tokens_BxT, last_B):
    logits_BxTxV = GPT(model_cfg).apply({"params": params}, tokens_BxT)
    return jax.nn.log_softmax(logits_BxTxV[jnp.arange(tokens_BxT.shape[0]), last_B]
                              .astype(jnp.float32), -1)


def _first_token_logprobs(m: Model, prompts: Sequence[list]) -> np.ndarray:
    """log p(next token | prompt) for each token-id prompt: [len(prompts), V]."""
    out = []
    for b in range(0, len(prompts), m.batch_size):
        rows = [list(p)[-m.config.n_ctx:] for p in prompts[b:b + m.batch_size]]
        T = min(round_up(max(len(r) for r in rows), 16), m.config.n_ctx)
        tokens = np.zeros((m.batch_size, T), np.int32)
        last = np.zeros(m.batch_size, np.int32)
        for j, r in enumerate(rows):
            tokens[j, :len(r)], last[j] = r, len(r) - 1
        out.append(np.asarray(_last_logprobs(m.config, m.params, tokens, last))[:len(rows)])
    return np.concatenate(out)


# ================================================================================ LAMBADA
def read_lambada(path: str) -> list:
    """(context, final word) of each passage of OpenAI's LAMBADA jsonl ({"text": ...})."""
    items = []
    for row in _read_jsonl(path, ["text"]):
        ctx, _, word = row["text"].strip().rpartition(" ")
        items.append((ctx, word))
    return items


_WORD = re.compile(r"\s*([^\s.,;:!?\"'”’)]+)")


def first_word(text: str) -> str:
    """The first word of a continuation (punctuation ends it)."""
    m = _WORD.match(text)
    return m.group(1) if m else ""


def lambada(m: Model, items: Sequence[tuple], max_new_tokens: int = 8, top: int = 20) -> dict:
    """Greedy final-word accuracy, plain and with GPT-2's stop-word filter: the most likely
    first token among the `top` whose word is not a stop word, then greedy."""
    plain = complete(m, [c for c, _ in items], max_new_tokens)
    tok = m.tokenizer
    ctx_ids = [tok.encode(c) for c, _ in items]
    firsts = []
    for lp in _first_token_logprobs(m, ctx_ids):
        ranked = [int(t) for t in np.argsort(-lp)[:top]]
        ok = [t for t in ranked if first_word(tok.decode([t])).lower() not in tm.STOP_WORDS
              and first_word(tok.decode([t]))]
        firsts.append((ok or ranked)[0])
    rest = complete(m, [c + tok.decode([t]) for (c, _), t in zip(items, firsts)], max_new_tokens)
    filtered = [first_word(tok.decode([t]) + r) for t, r in zip(firsts, rest)]
    preds = [first_word(t) for t in plain]
    gold = [w for _, w in items]
    return {"n": len(items), "accuracy": float(np.mean([p == g for p, g in zip(preds, gold)])),
            "accuracy_stopword_filter": float(np.mean([p == g for p, g in zip(filtered, gold)])),
            "predictions": preds}


# ================================================================================ CBT
def read_cbt(path: str) -> list:
    """(20 context sentences, question with XXXXX, answer, candidates) per CBT story."""
    items, ctx = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            num, _, rest = line.partition(" ")
            if "\t" in rest:
                q, ans, _, cands = (rest.split("\t") + ["", "", ""])[:4]
                items.append((list(ctx), q, ans, [c for c in cands.split("|") if c]))
                ctx = []
            else:
                ctx.append(rest)
    if not items:
        raise ValueError(f"{path}: no CBT questions (lines '21 question\\tanswer\\t\\tc1|c2|...')")
    return items


def cbt(m: Model, items: Sequence[tuple]) -> dict:
    """Each candidate filled in; the most probable whole filled sentence wins."""
    tok, pairs = m.tokenizer, []
    for ctx, q, _, cands in items:
        c_ids = tok.encode(" ".join(ctx))
        pairs += [(c_ids, tok.encode(" " + q.replace("XXXXX", c))) for c in cands]
    logp, _ = score_continuations(m.config, m.params, pairs, m.batch_size)
    preds, k = [], 0
    for _, _, _, cands in items:
        preds.append(cands[int(np.argmax(logp[k:k + len(cands)]))])
        k += len(cands)
    acc = np.mean([p == it[2] for p, it in zip(preds, items)])
    return {"n": len(items), "accuracy": float(acc), "predictions": preds}


# ================================================================================ Winograd
def read_winograd(path: str) -> list:
    """(sentence with one '_', options, answer index) from jsonl {sentence, options, answer}."""
    return [(r["sentence"], list(r["options"]), int(r["answer"]))
            for r in _read_jsonl(path, ["sentence", "options", "answer"])]


def read_dprd(path: str) -> list:
    """The Definite Pronoun Resolution Dataset's text format (blocks of 4 lines: sentence,
    pronoun, 'candidate1,candidate2', answer), as read_winograd's triples: the pronoun's first
    whole-word occurrence after the first candidate is the blank."""
    with open(path, encoding="utf-8") as fh:
        blocks = [b.strip().split("\n") for b in re.split(r"\n\s*\n", fh.read()) if b.strip()]
    items = []
    for n, b in enumerate(blocks, 1):
        if len(b) < 4:
            raise ValueError(f"{path}: block {n} has {len(b)} lines (sentence, pronoun, "
                             "candidates, answer)")
        sent, pron, cands = b[0].strip(), b[1].strip(), [c.strip() for c in b[2].split(",")]
        after = max(sent.find(cands[0]), 0) + len(cands[0])
        hit = re.compile(rf"\b{re.escape(pron)}\b").search(sent, after)
        if not hit:
            raise ValueError(f"{path}: block {n}: pronoun {pron!r} not found after {cands[0]!r}")
        items.append((sent[:hit.start()] + "_" + sent[hit.end():], cands,
                      cands.index(b[3].strip())))
    return items


def winograd(m: Model, items: Sequence[tuple]) -> dict:
    """Partial scoring: log p(rest of the sentence | prefix with the candidate substituted)."""
    tok, pairs = m.tokenizer, []
    for sent, options, _ in items:
        pre, _, post = sent.partition("_")
        if not post.strip():
            raise ValueError(f"winograd: nothing after the blank in {sent!r} to score")
        pairs += [(tok.encode(pre + o), tok.encode(post)) for o in options]
    logp, count = score_continuations(m.config, m.params, pairs, m.batch_size)
    acc_sum, acc_mean, k = [], [], 0
    for _, options, ans in items:
        s, c = logp[k:k + len(options)], count[k:k + len(options)]
        acc_sum.append(int(np.argmax(s)) == ans)
        acc_mean.append(int(np.argmax(s / np.maximum(c, 1))) == ans)
        k += len(options)
    return {"n": len(items), "accuracy": float(np.mean(acc_sum)),
            "accuracy_mean": float(np.mean(acc_mean))}


# ================================================================================ CoQA
def read_coqa(path: str) -> list:
    """(story, [(question, [gold answers])...]) per CoQA document (official JSON: data[].story,
    questions[].input_text, answers[].input_text, additional_answers{k: [...]})."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)["data"]
    docs = []
    for d in data:
        extra = list((d.get("additional_answers") or {}).values())
        turns = []
        for i, (q, a) in enumerate(zip(d["questions"], d["answers"])):
            golds = [a["input_text"]]
            for alt in extra:
                if i < len(alt) and alt[i]["input_text"].lower() not in map(str.lower, golds):
                    golds.append(alt[i]["input_text"])
            turns.append((q["input_text"], golds))
        docs.append((d["story"], turns))
    return docs


def coqa_prompt(story: str, history: Sequence[tuple], question: str) -> str:
    """Document, the conversation so far, then the question and "A:" (lm-eval's layout)."""
    text = story + "\n\n"
    for q, a in history:
        text += f"Q: {q}\n\nA: {a}\n\n"
    return text + f"Q: {question}\n\nA:"


def coqa(m: Model, docs: Sequence[tuple], max_new_tokens: int = 24) -> dict:
    """Greedy answers to every turn (gold history); CoQA F1 and EM averaged over turns."""
    prompts, golds = [], []
    for story, turns in docs:
        for i, (q, g) in enumerate(turns):
            prompts.append(coqa_prompt(story, [(tq, tg[0]) for tq, tg in turns[:i]], q))
            golds.append(g)
    preds = [t.strip().split("\n")[0] for t in complete(m, prompts, max_new_tokens, stop="\n")]
    scores = [tm.coqa_scores(g, p) for g, p in zip(golds, preds)]
    return {"n": len(preds), "f1": float(np.mean([s["f1"] for s in scores])),
            "em": float(np.mean([s["em"] for s in scores])), "predictions": preds}


# ================================================================================ summaries
def read_cnn_dm(path: str) -> list:
    """(article, highlights) from jsonl {article, highlights}."""
    return [(r["article"], r["highlights"]) for r in _read_jsonl(path, ["article", "highlights"])]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentences(text: str, n: int = 3) -> str:
    """The first n sentences of generated text, one per line (ROUGE-Lsum's sentence split)."""
    sents = [" ".join(s.split()) for s in _SENTENCE_END.split(text.strip()) if s.strip()]
    return "\n".join(sents[:n])


def summarize(m: Model, items: Sequence[tuple], max_new_tokens: int = 100) -> dict:
    """GPT-2's TL;DR: article + "\\nTL;DR:", 100 tokens of top-k 2 sampling, 3 sentences."""
    max_new_tokens = min(max_new_tokens, m.config.n_ctx // 2)
    tok, room = m.tokenizer, m.config.n_ctx - max_new_tokens
    suffix = tok.encode("\nTL;DR:")
    prompts = [tok.decode(tok.encode(a)[: room - len(suffix)]) + "\nTL;DR:" for a, _ in items]
    preds = [first_sentences(t) for t in complete(m, prompts, max_new_tokens, top_k=2)]
    refs = [first_sentences(h, 1000) for _, h in items]
    return {"n": len(items), **tm.rouge(preds, refs), "predictions": preds}


# ================================================================================ translation
def read_parallel(path: str) -> list:
    """(source, target) from 'SRC_FILE:TGT_FILE', two aligned plain-text files."""
    src, _, tgt = path.partition(":")
    if not tgt:
        raise ValueError(f"wmt={path!r}: expected two aligned files, 'english.txt:french.txt'")
    with open(src, encoding="utf-8") as a, open(tgt, encoding="utf-8") as b:
        la, lb = a.read().splitlines(), b.read().splitlines()
    if len(la) != len(lb):
        raise ValueError(f"wmt: {src} has {len(la)} lines but {tgt} has {len(lb)}")
    return [(s.strip(), t.strip()) for s, t in zip(la, lb) if s.strip()]


def translate(m: Model, items: Sequence[tuple], demos: int = 4, max_new_tokens: int = 48
              ) -> dict:
    """The first `demos` pairs as "english = french" lines, then each "english =": greedy,
    the first line; corpus BLEU on the rest."""
    head = "".join(f"{s} = {t}\n" for s, t in items[:demos])
    test = items[demos:]
    if not test:
        raise ValueError(f"wmt: {len(items)} pairs leave none to translate after {demos} "
                         "demonstrations")
    preds = [t.strip() for t in complete(m, [head + f"{s} =" for s, _ in test], max_new_tokens,
                                         stop="\n")]
    return {"n": len(test), "bleu": tm.bleu(preds, [t for _, t in test]), "predictions": preds}


# ================================================================================ QA
def read_qa(path: str) -> list:
    """(question, answers) from jsonl {question, answers} (answers a string or a list)."""
    return [(r["question"], [r["answers"]] if isinstance(r["answers"], str) else
             list(r["answers"])) for r in _read_jsonl(path, ["question", "answers"])]


def qa(m: Model, items: Sequence[tuple], demos: int = 4, max_new_tokens: int = 16) -> dict:
    """The first `demos` items as "Q: ...\\nA: ..." pairs, then "Q: ...\\nA:": greedy, the first
    line, exact match (normalised) against any answer on the rest."""
    head = "".join(f"Q: {q}\nA: {a[0]}\n\n" for q, a in items[:demos])
    test = items[demos:]
    if not test:
        raise ValueError(f"qa: {len(items)} questions leave none after {demos} demonstrations")
    preds = [t.strip() for t in complete(m, [head + f"Q: {q}\nA:" for q, _ in test],
                                         max_new_tokens, stop="\n")]
    em = [tm.exact_match(a, p) for (_, a), p in zip(test, preds)]
    return {"n": len(test), "exact_match": float(np.mean(em)), "predictions": preds}

