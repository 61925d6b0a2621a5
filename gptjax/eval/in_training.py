"""The evaluations `train.evals` names, built for the training loop (gptjax.train.evals).

Each entry is one string, `kind:key=value;key=value`:

  fewshot:task=1DC;shots=0;num_examples=64      GPT-3's few-shot format (gptjax.eval.fewshot):
      task an arithmetic task (2D+ ... 1DC), lambada / lambada_cloze with path=FILE, or a
      gptjax.data.tasks task with a template and path=DIR (sst2, rte, ...); keys shots (0),
      num_examples (0: all; arithmetic 2000), seed (0), batch_size (8), name.
      Metrics: accuracy (and accuracy_norm for likelihood tasks).
  zeroshot:task=sst2;path=DIR                    GPT-2's framings and GPT-1's heuristics
      (gptjax.eval.zeroshot_run); keys num_examples, seed, batch_size, normalize (mean), name.
      Metrics: the task's numbers (accuracy, mcc, f1, ...).
  perplexity:path=FILE                           sliding-window perplexity of a text file
      (gptjax.eval.perplexity); keys context, stride (0: the model's n_ctx, context // 2),
      max_chars, detokenize (none | wikitext), unk, prepend_eos (false), batch_size, name.
      Metrics: token_nll, token_perplexity, bits_per_byte, word_perplexity.
  lm_eval:tasks=hellaswag,piqa                   lm-evaluation-harness tasks (the `eval` extra)
      on gptjax's lm-eval model; keys include_path, builtin (true; false: only include_path's
      tasks, indexed in a blink instead of lm-eval's ~15,000), num_fewshot, limit, batch_size,
      seed, name. Metrics: <task>/<metric> of lm-eval's results (no stderr, no sample_len).

The defaults are eval.py's, so `eval.py --mode=<kind> --workdir RUN --steps all` with the same
settings gives the numbers logged at the checkpoints' steps. A metric is logged as
`eval/<name>/<metric>`; the default name is `<kind>_<task>` (few-shot: `fewshot_<task>_<K>shot`,
perplexity: `perplexity_<file stem>`, lm-eval: `lm_eval`).

`build_evals(config)` parses every entry first (unknown kinds, keys, tasks and values are one-line
ValueErrors before anything is read), then reads each task's data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Optional

import jax
import ml_collections

from gptjax import defaults
from gptjax.data.tasks import get_task
from gptjax.eval import fewshot, zeroshot_run
from gptjax.eval import gpt2_zeroshot as g2
from gptjax.eval import perplexity as ppl
from gptjax.eval import templates as T


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One in-training evaluation, as the training loop takes it (gptjax.train.evals).

    Attributes:
      name: its part of the metric names, `eval/<name>/<metric>` (letters, digits, `_.-`).
      fn: (model config, parameters, tokenizer) -> {metric: number}.
      check: None, or (model config, tokenizer) -> None, run before the first step: a ValueError
        for what would fail later (a character the run's tokenizer does not have).
    """

    name: str
    fn: Callable[[Any, Any, Any], dict]
    check: Optional[Callable[[Any, Any], None]] = None


_COMMON = ("name", "batch_size", "seed")
# kind -> (required keys, optional keys)
KINDS = {
    "fewshot": (("task",), ("path", "shots", "num_examples") + _COMMON),
    "zeroshot": (("task", "path"), ("num_examples", "normalize") + _COMMON),
    "perplexity": (("path",), ("context", "stride", "max_chars", "detokenize", "unk",
                               "prepend_eos", "name", "batch_size")),
    "lm_eval": (("tasks",), ("include_path", "builtin", "num_fewshot", "limit") + _COMMON),
}
_INTS = {"shots": 0, "num_examples": 0, "seed": 0, "batch_size": 1, "context": 0, "stride": 0,
         "max_chars": 0, "num_fewshot": 0, "limit": 0}  # key -> its minimum
_BOOLS = ("prepend_eos", "builtin")
DEFAULTS = {"path": "", "shots": 0, "num_examples": 0, "seed": 0, "batch_size": 8, "context": 0,
            "stride": 0, "max_chars": 0, "detokenize": "none", "unk": None, "prepend_eos": False,
            "normalize": "mean", "include_path": "", "builtin": True, "num_fewshot": None,
            "limit": 0}
FEWSHOT_METRICS = ("accuracy", "accuracy_norm")
PERPLEXITY_METRICS = ("token_nll", "token_perplexity", "bits_per_byte", "word_perplexity")


def _metric_name(text: str) -> str:
    """`text` as a part of a metric name: '+' spelled out, other odd characters '_'."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text.replace("+", "plus"))


def _value(spec: str, key: str, text: str):
    if key in _INTS:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < _INTS[key]:
            raise ValueError(f"train.evals entry {spec!r}: {key}={text!r}; allowed: an integer "
                             f">= {_INTS[key]}")
        return v
    if key in _BOOLS:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"train.evals entry {spec!r}: {key}={text!r}; allowed: true, false")
        return text.lower() in ("true", "1")
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """'fewshot:task=1DC;shots=0' -> ('fewshot', every key of that kind, defaults filled in,
    and its `name`); a one-line ValueError for an unknown kind, key, task or value. Reads
    nothing."""
    if not isinstance(spec, str):
        raise ValueError(f"train.evals entry {spec!r}: allowed: a string "
                         "'kind:key=value;key=value'")
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ValueError(f"train.evals entry {spec!r}: unknown kind {kind!r}; allowed: "
                         f"{list(KINDS)} (as 'kind:key=value;key=value')")
    required, optional = KINDS[kind]
    fields = {}
    for item in (s.strip() for s in rest.split(";")):
        if not item:
            continue
        key, eq, value = (p.strip() for p in item.partition("="))
        if not eq or key not in required + optional or key in fields:
            what = "a repeated key" if key in fields else "not key=value with a key of " + kind
            raise ValueError(f"train.evals entry {spec!r}: {item!r} is {what}; allowed keys: "
                             f"{list(required + optional)}")
        fields[key] = _value(spec, key, value)
    missing = [k for k in required if not fields.get(k)]
    if missing:
        raise ValueError(f"train.evals entry {spec!r}: {kind} needs {missing} "
                         f"(e.g. {_EXAMPLES[kind]!r})")
    out = {k: fields.get(k, DEFAULTS.get(k)) for k in required + optional}
    _check_task(spec, kind, out)
    out["name"] = fields.get("name") or _default_name(kind, out)
    if not re.match(r"^[A-Za-z0-9_.\-]+$", out["name"]):
        raise ValueError(f"train.evals entry {spec!r}: name={out['name']!r}; allowed: letters, "
                         "digits, '_', '.', '-'")
    return kind, out


_EXAMPLES = {"fewshot": "fewshot:task=1DC;shots=4;num_examples=64",
             "zeroshot": "zeroshot:task=sst2;path=glue/SST-2",
             "perplexity": "perplexity:path=valid.txt",
             "lm_eval": "lm_eval:tasks=hellaswag;limit=100"}


def _check_task(spec: str, kind: str, f: dict) -> None:
    """One line for a task or setting the kind does not have (reads nothing)."""
    def bad(what: str, allowed) -> ValueError:
        return ValueError(f"train.evals entry {spec!r}: {what}; allowed: {allowed}")

    if kind == "fewshot":
        task, path = f["task"], f["path"]
        if task in T.ARITHMETIC:
            return
        if task in ("lambada", "lambada_cloze") or path:
            if not path:
                raise bad(f"task {task!r} reads a file", "path=FILE")
            if task in ("lambada", "lambada_cloze"):
                return
            try:
                name = get_task(task).name
            except ValueError:
                name = None
            if name in T.TEMPLATES:
                return
        raise bad(f"unknown few-shot task {task!r}", f"{list(T.ARITHMETIC)}, lambada and "
                  f"lambada_cloze (path=FILE), or with path=DIR {sorted(T.TEMPLATES)}")
    if kind == "zeroshot":
        allowed = sorted(zeroshot_run.GPT2_TASKS) + list(zeroshot_run.GPT1_TASKS)
        if f["task"] not in allowed:
            raise bad(f"unknown zero-shot task {f['task']!r}", allowed)
        if f["normalize"] not in ("mean", "sum"):
            raise bad(f"normalize={f['normalize']!r}", "mean, sum")
    if kind == "perplexity" and f["detokenize"] not in ppl.DETOKENIZERS:
        raise bad(f"detokenize={f['detokenize']!r}", sorted(ppl.DETOKENIZERS))
    if kind == "perplexity" and f["context"] and f["stride"] >= f["context"]:
        raise bad(f"stride={f['stride']} with context={f['context']}",
                  "stride < context (0: context // 2)")


def _default_name(kind: str, f: dict) -> str:
    if kind == "fewshot":
        return _metric_name(f"fewshot_{f['task']}_{f['shots']}shot")
    if kind == "zeroshot":
        return _metric_name(f"zeroshot_{f['task']}")
    if kind == "perplexity":
        return _metric_name("perplexity_" + os.path.splitext(os.path.basename(f["path"]))[0])
    return "lm_eval"


# ================================================================================ building
def build_evals(config: ml_collections.ConfigDict) -> list:
    """The Evaluations of `config.train.evals` (gptjax.train.evals), for
    `train_and_evaluate(config, workdir, evals=build_evals(config))`.

    Every entry is parsed before any is read (one-line ValueErrors naming the entry); then each
    reads its task data (a missing file is one line too).
    """
    config = defaults.complete(config, defaults.base_config())
    specs = config.train.evals
    if specs and jax.process_count() > 1:  # (the evaluations score on this process's devices)
        raise ValueError(f"train.evals with {jax.process_count()} processes: allowed: one "
                         "process (evaluate the checkpoints with eval.py --mode=lm_eval --mesh)")
    if isinstance(specs, str) or not isinstance(specs, (tuple, list)):
        raise ValueError(f"train.evals={specs!r}: allowed: a tuple of strings "
                         "'kind:key=value;key=value'")
    parsed = [parse_spec(s) for s in specs]
    names = [f["name"] for _, f in parsed]
    for spec, name in zip(specs, names):
        if names.count(name) > 1:
            raise ValueError(f"train.evals entry {spec!r}: another entry is named {name!r} too; "
                             "give one of them name=...")
    builders = {"fewshot": _fewshot, "zeroshot": _zeroshot, "perplexity": _perplexity,
                "lm_eval": _lm_eval}
    out = []
    for spec, (kind, f) in zip(specs, parsed):
        try:
            out.append(builders[kind](f))
        except (ValueError, FileNotFoundError) as e:  # a task's files: one line naming it
            raise type(e)(f"train.evals entry {spec!r}: {e}") from None
    return out


def _fewshot(f: dict) -> Evaluation:
    task = fewshot.build_task(f["task"] + (f"={f['path']}" if f["path"] else ""),
                              num_examples=f["num_examples"], seed=f["seed"])
    shots, seed = f["shots"], f["seed"]

    def run(config, params, tokenizer) -> dict:
        r = fewshot.evaluate(config, params, tokenizer, task, shots, seed=seed,
                             batch_size=f["batch_size"])
        return {k: r[k] for k in FEWSHOT_METRICS if k in r}

    def check(config, tokenizer) -> None:
        # Every text the evaluation will encode (a character-level tokenizer lacks some).
        for i, query in enumerate(task.test):
            demos = fewshot.draw_demos(task, i, shots, seed)
            tokenizer.encode(T.render_prompt(query, demos, task.separator,
                                             task.description or None))
            for text in query.choices or (query.target,):
                tokenizer.encode(text)

    return Evaluation(f["name"], run, check)


def _zeroshot(f: dict) -> Evaluation:
    items = zeroshot_run.load_items(f["task"], f["path"], f["num_examples"], f["seed"])

    def run(config, params, tokenizer) -> dict:
        model = g2.Model(config, params, tokenizer, batch_size=f["batch_size"], seed=f["seed"])
        res = zeroshot_run.score(f["task"], model, items, f["normalize"])
        return {k: v for k, v in res.items() if k not in ("n", "predictions")}

    return Evaluation(f["name"], run)


def _perplexity(f: dict) -> Evaluation:
    # As eval.py --mode=perplexity (gptjax.eval.run.run_perplexity) reads and counts the text.
    raw = ppl.read_eval_text(f["path"], max_chars=f["max_chars"])
    if f["detokenize"] == "wikitext":
        text, words = ppl.wikitext_detokenize(raw, f["unk"]), ppl.count_words(raw)
    else:
        text, words = raw, ppl.count_words(raw, newline_is_word=False)
    kw = dict(context=f["context"] or None, stride=f["stride"] or None, num_words=words,
              prepend_eos=f["prepend_eos"], batch_size=f["batch_size"])

    def run(config, params, tokenizer) -> dict:
        res = ppl.perplexity(config, params, tokenizer, text, **kw).as_dict()
        return {k: res[k] for k in PERPLEXITY_METRICS if k in res}

    def check(config, tokenizer) -> None:
        n = len(tokenizer.encode(text)) + (1 if f["prepend_eos"] else 0)
        context = f["context"] or config.n_ctx
        if context > config.n_ctx:
            raise ValueError(f"context={context} is longer than the model's n_ctx="
                             f"{config.n_ctx}")
        ppl.sliding_windows(n, context, f["stride"] or max(context // 2, 1))

    return Evaluation(f["name"], run, check)


def _lm_eval(f: dict) -> Evaluation:
    try:
        import lm_eval  # optional: the eval extra (lm-eval)
        from lm_eval.tasks import TaskManager  # optional: the eval extra (lm-eval)

        from gptjax.eval.lm_harness import GPTJaxLM  # optional: needs lm-eval
    except ImportError:
        raise ValueError("kind 'lm_eval' needs lm-eval: pip install 'gptjax[eval]'") from None
    # builtin=false: only include_path's tasks (lm-eval indexes its ~15,000 own in ~11 s).
    manager = TaskManager(include_path=f["include_path"] or None, include_defaults=f["builtin"])
    tasks = [t.strip() for t in f["tasks"].split(",") if t.strip()]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are not lm-eval tasks (nor in include_path="
                         f"{f['include_path']!r})")
    evaluate = functools.partial(lm_eval.simple_evaluate, tasks=tasks,
                                 num_fewshot=f["num_fewshot"], limit=f["limit"] or None,
                                 task_manager=manager, log_samples=False,
                                 random_seed=f["seed"], bootstrap_iters=0)

    def run(config, params, tokenizer) -> dict:
        lm = GPTJaxLM(model=(config, params, tokenizer), batch_size=f["batch_size"],
                      seed=f["seed"])
        return lm_eval_metrics(evaluate(model=lm)["results"])

    return Evaluation(f["name"], run)


def lm_eval_metrics(results: dict) -> dict:
    """{'<task>/<metric>': value} of lm-eval's `results` (the filter ',none' dropped; stderr and
    the sample count left out)."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or metric == "sample_len" or isinstance(value, bool) or \
                    not isinstance(value, (int, float)):
                continue
            out[f"{task}/{metric}" + ("" if filt in ("", "none") else f"_{filt}")] = value
    return out
