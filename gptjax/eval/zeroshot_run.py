"""`eval.py --mode=zeroshot`: GPT-2's framings and GPT-1's heuristics over several models.

    rows = run(models, ["lambada=lambada_test.jsonl", "cola=../shared/data/glue/CoLA"], out="o")

Task specs are NAME=PATH: GPT-2's framings (gptjax.eval.gpt2_zeroshot: lambada, cbt, winograd,
dprd, coqa, cnn_dm, wmt=EN_FILE:FR_FILE, qa) and GPT-1's heuristics on gptjax.data.tasks
directories (cola: threshold fitted on train, MCC on dev; sst2; story_cloze, race, mctest:
multiple choice). Writes zeroshot.json, zeroshot.md and zeroshot.png (the main metric against
the pretraining step when the models are checkpoints of runs, else per model).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from gptjax.data.tasks import get_task, load_task
from gptjax.eval import gpt2_zeroshot as g2
from gptjax.eval import zero_shot as zs

# name -> (reader, scorer, main metric)
GPT2_TASKS = {
    "lambada": (g2.read_lambada, g2.lambada, "accuracy"),
    "cbt": (g2.read_cbt, g2.cbt, "accuracy"),
    "winograd": (g2.read_winograd, g2.winograd, "accuracy"),
    "dprd": (g2.read_dprd, g2.winograd, "accuracy"),
    "coqa": (g2.read_coqa, g2.coqa, "f1"),
    "cnn_dm": (g2.read_cnn_dm, g2.summarize, "rougeL"),
    "wmt": (g2.read_parallel, g2.translate, "bleu"),
    "qa": (g2.read_qa, g2.qa, "exact_match"),
}
GPT1_TASKS = ("cola", "sst2", "story_cloze", "race", "mctest")


def _subset(items: list, n: int, seed: int) -> list:
    if not n or n >= len(items):
        return list(items)
    keep = np.sort(np.random.RandomState(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


def parse_spec(spec: str) -> tuple:
    """'lambada=FILE' -> ('lambada', 'FILE'), with a one-line error naming the allowed tasks."""
    name, _, path = spec.partition("=")
    allowed = sorted(GPT2_TASKS) + list(GPT1_TASKS)
    if name not in allowed or not path:
        raise ValueError(f"--tasks {spec!r}: expected NAME=PATH with NAME one of {allowed}")
    return name, path


def load_items(name: str, path: str, num_examples: int = 0, seed: int = 0):
    """The task's examples: a list (GPT-2 framings) or {split: examples} (GPT-1 tasks)."""
    if name in GPT2_TASKS:
        items = GPT2_TASKS[name][0](path)
        if name in ("wmt", "qa"):  # the first items are the demonstrations: keep them
            return items[:4] + _subset(items[4:], num_examples, seed)
        return _subset(items, num_examples, seed)
    spec = get_task(name)
    dev = "dev" if "dev" in spec.splits else [s for s in spec.splits if s != "train"][0]
    splits = ("train", dev) if name == "cola" else (dev,)
    data = load_task(name, path, splits=splits)
    return {s: _subset(data.splits[s], num_examples, seed) for s in splits}


def score(name: str, model: g2.Model, items, normalize: str = "mean") -> dict:
    """The metrics of one model on one task's items (see load_items); `normalize` is the
    multiple-choice length normalisation ('mean' or 'sum', gptjax.eval.zero_shot)."""
    if name in GPT2_TASKS:
        return GPT2_TASKS[name][1](model, items)
    args = (model.config, model.params, model.tokenizer)
    if name == "cola":
        return zs.zero_shot_cola(*args, items["train"], next(v for k, v in items.items()
                                                              if k != "train"), model.batch_size)
    (examples,) = items.values()
    acc = zs.zero_shot_accuracy(get_task(name), *args, examples, normalize,
                                batch_size=model.batch_size)
    return {"n": len(examples), "accuracy": acc}


def main_metric(name: str) -> str:
    return GPT2_TASKS[name][2] if name in GPT2_TASKS else ("mcc" if name == "cola" else
                                                            "accuracy")


def run(models: Sequence[tuple], specs: Sequence[str], *, num_examples: int = 0, seed: int = 0,
        batch_size: int = 16, out: str = "") -> list:
    """Every (model, task): rows {model, step, task, metric, <metrics>}; results written to
    `out` after each model (an error in a later model keeps the earlier rows)."""
    tasks = [parse_spec(s) for s in specs]
    loaded = {name: load_items(name, path, num_examples, seed) for name, path in tasks}
    return run_loaded(models, loaded, seed=seed, batch_size=batch_size, out=out)


def run_loaded(models: Sequence[tuple], loaded: dict, *, seed: int = 0, batch_size: int = 16,
               out: str = "", normalize: str = "mean") -> list:
    """`run` on items already read: {task name: load_items' result}. finetune.py
    --mode=zero_shot comes here with its config's split and data source."""
    rows = []
    for mname, config, params, tok, info in models:
        model = g2.Model(config, params, tok, batch_size=batch_size, seed=seed)
        for name in loaded:
            try:
                res = score(name, model, loaded[name], normalize)
            except ValueError as e:
                raise ValueError(f"model {mname}, task {name}: {e}") from None
            res.pop("predictions", None)
            rows.append({"model": mname, "step": info.get("step"), "task": name,
                         "metric": main_metric(name), **res})
            print(f"{mname} {name}: {main_metric(name)} {res[main_metric(name)]:.4f}", flush=True)
        if out:
            write_results(rows, out)
    return rows


def results_markdown(rows: Sequence[dict]) -> str:
    lines = ["| model | task | n | metrics |", "|---|---|---|---|"]
    for r in rows:
        ms = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float))
        lines.append(f"| {r['model']} | {r['task']} | {r['n']} | {ms} |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict], out: str) -> dict:
    """zeroshot.json, zeroshot.md and zeroshot.png in `out`; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"zeroshot.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as fh:
        json.dump(list(rows), fh, indent=2)
    with open(paths["md"], "w") as fh:
        fh.write(results_markdown(rows))
    plot_results(rows, paths["png"])
    return paths


def plot_results(rows: Sequence[dict], path: str) -> None:
    """Main metric per task: against the pretraining step for checkpoints, else per model."""
    import matplotlib  # heavy: plotting only when results are written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: plotting only when results are written

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    by_step = all(r["step"] is not None for r in rows)
    for t in tasks:
        rs = [r for r in rows if r["task"] == t]
        xs = [r["step"] for r in rs] if by_step else list(range(len(rs)))
        ax.plot(xs, [r[r["metric"]] for r in rs], "o-", label=f"{t} ({rs[0]['metric']})")
    if not by_step:
        names = list(dict.fromkeys(r["model"] for r in rows))
        ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_xlabel("pretraining step" if by_step else "model")
    ax.set_ylabel("zero-shot metric")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
