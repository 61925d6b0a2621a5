"""Zero-, one- and few-shot evaluation in GPT-3's format (Brown et al. 2020, section 2).

For each query, K demonstrations are drawn at random (seeded, per query) from the task's training
pool and placed before the query, separated by blank lines; the prompt ends where the answer
starts. Likelihood tasks (classification by label words, multiple choice) pick the candidate
completion with the highest log-probability, summed over its tokens ('accuracy') or averaged
per token ('accuracy_norm', GPT-3's normalisation for most multiple-choice tasks). Generation
tasks (arithmetic, last-word prediction) decode greedily with gptjax.inference.sampling.generate and score
exact match of the answer. When K demonstrations do not fit the context window, the ones furthest
from the query are dropped (GPT-3: "K ... up to as many as fit in the context window"); the mean
number actually used is reported.

    task = build_task("2D+", num_examples=200)
    evaluate(config, params, tokenizer, task, shots=4, seed=0)
    # {'task': '2D+', 'shots': 4, 'accuracy': ..., 'demos_mean': 4.0, 'n': 200, ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from gptjax.data.tasks import get_task, load_task
from gptjax.eval import templates as T
from gptjax.eval.scoring import score_continuations
from gptjax.eval.templates import Item
from gptjax.inference import sampling


@dataclasses.dataclass(frozen=True)
class FewShotTask:
    """A task as the evaluator sees it.

    Attributes:
      name: shown in results.
      kind: 'choice' (likelihood of candidates) or 'generate' (greedy decoding, exact match).
      train: the pool demonstrations are drawn from.
      test: the queries scored.
      separator: between demonstrations and before the query.
      description: an optional natural-language task description put first.
      max_new_tokens: generation: tokens decoded per query (0: from the longest target).
      answer: generation: completion text -> the answer compared with target.strip().
    """

    name: str
    kind: str
    train: tuple
    test: tuple
    separator: str = "\n\n"
    description: str = ""
    max_new_tokens: int = 0
    answer: Callable[[str], str] = T.first_line


def _subset(items: Sequence[Item], n: int, seed: int) -> tuple:
    if n <= 0 or n >= len(items):
        return tuple(items)
    rows = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return tuple(items[i] for i in rows)


def build_task(spec: str, *, num_examples: int = 0, seed: int = 0) -> FewShotTask:
    """A FewShotTask from a command-line spec.

    Specs: an arithmetic task of GPT-3 ('2D+' ... '5D-', '2Dx', '1DC'; problems generated with
    `seed`, the demonstrations from another stream); 'lambada=FILE' or 'lambada_cloze=FILE'
    (last-word prediction on the passages of any text file, 20% of them kept as demonstrations);
    'TASK=DIR' for a gptjax.data.tasks task in its file layout ('sst2=../shared/data/glue/SST-2') or
    'glue/TASK=DATA_DIR' for a prepared tfds data_dir. The queries are the task's first dev split.

    Args:
      num_examples: queries to score, a seeded subset (0: all; arithmetic: 0 means 2000, GPT-3's
        count).
    """
    name, _, path = spec.partition("=")
    if name in T.ARITHMETIC:
        n = num_examples or 2000
        return FewShotTask(name, "generate", tuple(T.arithmetic_items(name, 1000, seed + 1)),
                           tuple(T.arithmetic_items(name, n, seed)))
    if name in ("lambada", "lambada_cloze"):
        if not path:
            raise ValueError(f"task {spec!r}: give the text file, as {name}=FILE")
        with open(path, encoding="utf-8", errors="replace") as fh:
            items = T.last_word_items(fh.read(), cloze=name == "lambada_cloze")
        if len(items) < 2:
            raise ValueError(f"task {spec!r}: {len(items)} passages of >= 30 words ending in a "
                             "word in that file; need at least 2")
        train, test = T.split_pool(items, 0.2, seed)
        return FewShotTask(name, "generate", tuple(train), _subset(test, num_examples, seed),
                           answer=T.first_word)
    if not path:
        raise ValueError(f"unknown task spec {spec!r}; allowed: {list(T.ARITHMETIC)}, "
                         "lambada=FILE, lambada_cloze=FILE, TASK=DIR or glue/TASK=DATA_DIR with "
                         f"TASK in {sorted(T.TEMPLATES)}")
    task_spec = get_task(name)
    if task_spec.name not in T.TEMPLATES:
        raise ValueError(f"task {task_spec.name!r} has no few-shot template (regression is not "
                         f"scored by likelihood); allowed: {sorted(T.TEMPLATES)}")
    split = task_spec.dev_splits[0]
    kw = {"data_dir": path} if "/" in name else {"path": path}
    data = load_task(name, splits=[task_spec.train_split, split], **kw)
    train = [T.example_item(task_spec, ex) for ex in data.splits[task_spec.train_split]]
    test = [T.example_item(task_spec, ex) for ex in data.splits[split]]
    return FewShotTask(task_spec.name, "choice", tuple(train), _subset(test, num_examples, seed))


# ================================================================================ prompts
def draw_demos(task: FewShotTask, index: int, shots: int, seed: int) -> list:
    """The K demonstrations of query `index`: drawn without replacement from the training pool
    with a generator seeded by (seed, index), so any query's prompt is reproducible alone."""
    if shots > len(task.train):
        raise ValueError(f"shots={shots}: task {task.name!r} has only {len(task.train)} "
                         "training examples to draw demonstrations from")
    if shots == 0:
        return []
    rows = np.random.default_rng([seed, index]).choice(len(task.train), shots, replace=False)
    return [task.train[i] for i in rows]


def fit_prompt(tokenizer, task: FewShotTask, query: Item, demos: list, room: int) -> tuple:
    """(prompt ids, demonstrations used): the furthest demonstrations are dropped until the
    prompt leaves `room` tokens of the context window free (never the query itself)."""
    demos = list(demos)
    while True:
        ids = tokenizer.encode(T.render_prompt(query, demos, task.separator,
                                               task.description or None))
        if len(ids) <= room or not demos:
            return ids, len(demos)
        demos = demos[1:]


def _completion_room(tokenizer, task: FewShotTask, query: Item) -> int:
    if task.kind == "choice":
        return max(len(tokenizer.encode(c)) for c in query.choices)
    return task.max_new_tokens or _max_new_tokens(tokenizer, task)


def _max_new_tokens(tokenizer, task: FewShotTask) -> int:
    # The longest target plus two tokens, so a model that continues past the answer is caught.
    return max(len(tokenizer.encode(it.target)) for it in task.test) + 2


# ================================================================================ scoring
def choice_scores(config, params, tokenizer, prompts: Sequence[list], items: Sequence[Item],
                  batch_size: int = 16) -> list:
    """Per query, the candidates' (summed log-probability, token count) given its prompt ids."""
    pairs = []
    for ids, it in zip(prompts, items):
        for c in it.choices:
            pairs.append((ids, tokenizer.encode(c)))
    logp, count = score_continuations(config, params, pairs, batch_size)
    out, k = [], 0
    for it in items:
        m = len(it.choices)
        out.append((logp[k:k + m], count[k:k + m]))
        k += m
    return out


def greedy_completions(config, params, tokenizer, prompts: Sequence[list], max_new_tokens: int,
                       batch_size: int = 16) -> list:
    """Greedy continuations (text) of token-id prompts, in batches, with gptjax.inference.sampling."""
    texts = []
    for b in range(0, len(prompts), batch_size):
        rows = [list(p)[-(config.n_ctx - max_new_tokens):] for p in prompts[b:b + batch_size]]
        out = sampling.generate(config, params, rows, max_new_tokens=max_new_tokens,
                                temperature=0.0, eos_id=tokenizer.eos_id)
        for r in range(len(rows)):
            toks = [int(t) for t in out.tokens[r][: int(out.lengths[r])]]
            if toks and tokenizer.eos_id is not None and toks[-1] == tokenizer.eos_id:
                toks = toks[:-1]
            texts.append(tokenizer.decode(toks))
    return texts


def evaluate(config, params, tokenizer, task: FewShotTask, shots: int, *, seed: int = 0,
             batch_size: int = 16, return_predictions: bool = False) -> dict:
    """Accuracy of a model on a task with `shots` demonstrations per query.

    Returns:
      {'task', 'kind', 'shots', 'n', 'demos_mean', 'accuracy'} plus 'accuracy_norm' (per-token
      mean log-probability) for likelihood tasks; with return_predictions, 'predictions' (the
      chosen candidate index or the extracted answer of every query).
    """
    if task.kind not in ("choice", "generate"):
        raise ValueError(f"task kind {task.kind!r}: allowed 'choice', 'generate'")
    if shots < 0:
        raise ValueError(f"shots={shots}: must be >= 0")
    prompts, used = [], []
    for i, query in enumerate(task.test):
        room = config.n_ctx - _completion_room(tokenizer, task, query)
        ids, k = fit_prompt(tokenizer, task, query, draw_demos(task, i, shots, seed), room)
        prompts.append(ids)
        used.append(k)
    result = {"task": task.name, "kind": task.kind, "shots": shots, "n": len(task.test),
              "demos_mean": float(np.mean(used)) if used else 0.0}
    if task.kind == "choice":
        scores = choice_scores(config, params, tokenizer, prompts, task.test, batch_size)
        labels = np.array([it.label for it in task.test])
        pred_sum = np.array([int(np.argmax(lp)) for lp, _ in scores])
        pred_mean = np.array([int(np.argmax(lp / np.maximum(n, 1))) for lp, n in scores])
        result.update(accuracy=float(np.mean(pred_sum == labels)),
                      accuracy_norm=float(np.mean(pred_mean == labels)))
        preds = pred_sum.tolist()
    else:
        max_new = task.max_new_tokens or _max_new_tokens(tokenizer, task)
        texts = greedy_completions(config, params, tokenizer, prompts, max_new, batch_size)
        preds = [task.answer(t) for t in texts]
        result["accuracy"] = float(np.mean([p == it.target.strip()
                                            for p, it in zip(preds, task.test)]))
    if return_predictions:
        result["predictions"] = preds
    return result


# ================================================================================ reports
def results_markdown(rows: Sequence[dict]) -> str:
    """One table: a row per (model, task, metric), a column per K."""
    shots = sorted({r["shots"] for r in rows})
    keys = []
    for r in rows:
        for metric in ("accuracy", "accuracy_norm"):
            if metric in r and (r["model"], r["task"], metric) not in keys:
                keys.append((r["model"], r["task"], metric))
    lines = ["| model | task | metric | " + " | ".join(f"K={k}" for k in shots) + " |",
             "|---|---|---|" + "---|" * len(shots)]
    for model, task, metric in keys:
        cells = []
        for k in shots:
            hit = [r for r in rows if (r["model"], r["task"], r["shots"]) == (model, task, k)]
            cells.append(f"{hit[0][metric]:.3f}" if hit and metric in hit[0] else "")
        lines.append(f"| {model} | {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _line_style(i: int, n: int) -> dict:
    """Line i of n: equal accuracies are common (0 on arithmetic for small models), so lines
    differ in marker, dash and width (earlier lines wider, drawn under later ones)."""
    return {"marker": "osD^vP*X"[i % 8], "ls": ("-", "--", "-.", ":")[i % 4], "ms": 5,
            "lw": 1.2 + 2.0 * (n - 1 - i) / max(n - 1, 1), "alpha": 0.85}


def plot_results(rows: Sequence[dict], out_dir: str) -> list:
    """accuracy_vs_k.png (a line per model and task), and accuracy_vs_<x>.png (a line per task
    and K against the models' parameter count, or training step when the models share a size)
    when several models were evaluated. Returns the paths written."""
    import matplotlib  # heavy: matplotlib, only when plotting
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, only when plotting

    paths = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    lines = [(m, t) for m in models for t in tasks]
    for i, (m, t) in enumerate(lines):
        pts = sorted((r["shots"], r["accuracy"]) for r in rows
                     if r["model"] == m and r["task"] == t)
        if pts:
            ax.plot(*zip(*pts), **_line_style(i, len(lines)),
                    label=f"{t} ({m})" if len(models) > 1 else t)
    ax.set_xticks(sorted({r["shots"] for r in rows}))  # K is an integer
    ax.set_xlabel("demonstrations in the prompt (K)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy_vs_k.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    if len(models) > 1:
        params = {r["model"]: r.get("params") for r in rows}
        steps = {r["model"]: r.get("step") for r in rows}
        by_step = len(set(params.values())) == 1 and None not in steps.values()
        xkey, xlabel = ("step", "training step") if by_step else ("params", "parameters")
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        lines = [(t, k) for t in tasks for k in sorted({r["shots"] for r in rows})]
        for i, (t, k) in enumerate(lines):
            pts = sorted((r[xkey], r["accuracy"]) for r in rows
                         if r["task"] == t and r["shots"] == k and r.get(xkey) is not None)
            if pts:
                ax.plot(*zip(*pts), **_line_style(i, len(lines)), label=f"{t}, K={k}")
        if xkey == "params":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"accuracy_vs_{xkey}.png"))
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def write_results(rows: Sequence[dict], out_dir: str) -> dict:
    """results.json, results.md and the plots in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"),
             "markdown": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w") as fh:
        json.dump([{k: v for k, v in r.items() if k != "predictions"} for r in rows], fh,
                  indent=2)
    with open(paths["markdown"], "w") as fh:
        fh.write(results_markdown(rows))
    paths["plots"] = plot_results(rows, out_dir)
    return paths


def run(models: Sequence[tuple], tasks: Sequence[FewShotTask], shots: Sequence[int], *,
        seed: int = 0, batch_size: int = 16, out_dir: Optional[str] = None,
        log: Callable[[str], None] = print) -> list:
    """Evaluate every (model, task, K).

    Args:
      models: (name, GPTConfig, params, tokenizer, info) tuples; info may give 'step' (training
        step) for the plots; the parameter count is taken from the config.
      out_dir: where write_results puts the table, JSON and plots (None: nowhere).

    Returns:
      The result rows (evaluate's dicts plus 'model', 'params', 'step').
    """
    rows = []
    for name, config, params, tokenizer, info in models:
        n_params = config.num_params()
        for task in tasks:
            for k in shots:
                try:
                    r = evaluate(config, params, tokenizer, task, k, seed=seed,
                                 batch_size=batch_size)
                except ValueError as e:  # e.g. a character-level model and digits in a task
                    done = f"; the finished models' results are in {out_dir}" if rows and out_dir \
                        else ""
                    raise ValueError(f"model {name!r}, task {task.name!r}, K={k}: {e}{done}") \
                        from None
                r.update(model=name, params=n_params, step=(info or {}).get("step"))
                rows.append(r)
                norm = f", norm {r['accuracy_norm']:.3f}" if "accuracy_norm" in r else ""
                log(f"{name} {task.name} K={k}: accuracy {r['accuracy']:.3f}{norm} "
                    f"(n={r['n']}, demos {r['demos_mean']:.1f})")
        if out_dir:  # after every model: a later model that fails keeps the earlier results
            write_results(rows, out_dir)
    return rows
