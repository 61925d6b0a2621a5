"""What eval.py runs: load one or several models, then perplexity, few-shot, zero-shot or
lm-evaluation-harness evaluation; or print and plot run directories' goodput ledgers."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax

from gptjax.checks import check_choice
from gptjax.eval import fewshot, zeroshot_run
from gptjax.eval import perplexity as ppl
from gptjax.eval.mesh_scoring import on_host as loading_on_host
from gptjax.runs import goodput
from gptjax.runs.pretrained import load_pretrained


def parse_ints(value: str, name: str, minimum: int = 0) -> list:
    """'0,1,4' -> [0, 1, 4]; a one-line error naming the flag otherwise."""
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name}={value!r}: expected comma-separated integers") from None
    if not out or min(out) < minimum:
        raise ValueError(f"--{name}={value!r}: expected integers >= {minimum}")
    return out


def parse_steps(value: str):
    """--steps: '' (none: the latest checkpoint), 'all', or checkpoint steps '500,1000' (>= 1)."""
    return value if value == "all" else parse_ints(value, "steps", 1) if value else []


def task_specs(values: Sequence[str], mode: str) -> list:
    """The task specs of repeated comma-separated --tasks values; every mode but perplexity
    needs one (a one-line error)."""
    specs = [s for v in values for s in v.split(",") if s]
    if mode != "perplexity" and not specs:
        raise ValueError(f"--mode={mode} needs --tasks (e.g. --tasks 2D+,1DC)")
    return specs


def checkpoint_steps(workdir: str) -> list:
    """The steps of the checkpoints saved in a train.py run directory, ascending."""
    root = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    if not steps:
        raise FileNotFoundError(f"--steps=all: no checkpoints in {root}")
    return steps


def load_models(workdirs: Sequence[str] = (), hf_dirs: Sequence[str] = (),
                tokenizer_path: Optional[str] = None, steps: Sequence[int] | str = (),
                execution: Optional[str] = None, peft_dir: Optional[str] = None,
                on_host: bool = False) -> list:
    """(name, config, params, tokenizer, info) for every model named.

    Args:
      workdirs: train.py run directories (latest checkpoint, or each of `steps`).
      hf_dirs: local transformers GPT-2 / OpenAI-GPT directories.
      tokenizer_path: the HF directories' tokenizer (default: each directory): GPT-2's or
        OpenAI GPT's BPE files, or a saved gptjax tokenizer directory.
      steps: checkpoint steps to evaluate in every workdir (a curve against training step), or
        'all' for every checkpoint each workdir holds.
      execution: execution overrides for every model (e.g. 'attention_impl=xla'; see
        gptjax.runs.pretrained.load_pretrained).
      peft_dir: a PEFT LoRA adapter merged into every `hf_dirs` model (not for workdirs).
      on_host: keep the parameters in host memory (the CPU backend, where there is one), not on
        the default device: a model that is then sharded over a mesh (`run_lm_eval`'s `mesh`)
        need not fit one accelerator.

    Returns:
      The models, in the order named (each workdir once per step).
    """
    if not workdirs and not hf_dirs:
        raise ValueError("give at least one model: --workdir (a gptjax run) or --hf_dir "
                         "(a transformers directory); both repeatable")
    if steps and not workdirs:
        raise ValueError("--steps applies to --workdir runs only")
    if peft_dir and not hf_dirs:
        raise ValueError(f"--peft_dir={peft_dir!r} goes with --hf_dir (the model it adapts)")
    models = []
    with loading_on_host(on_host):
        for wd in workdirs:
            for step in (checkpoint_steps(wd) if steps == "all" else steps) or [None]:
                config, params, tok = load_pretrained(workdir=wd, step=step, execution=execution)
                name = os.path.basename(os.path.normpath(wd)) + (f"@{step}" if step else "")
                models.append((name, config, params, tok, {"step": step, "path": wd}))
        for hd in hf_dirs:
            config, params, tok = load_pretrained(hf_dir=hd, tokenizer_path=tokenizer_path,
                                                  execution=execution, peft_dir=peft_dir)
            models.append((os.path.basename(os.path.normpath(hd)), config, params, tok,
                           {"path": hd}))
    return models


def run_perplexity(models: list, *, text_path: str = "", tfds_name: str = "",
                   split: str = "validation", data_dir: str = "", text_key: str = "text",
                   detokenize: str = "none", unk: Optional[str] = None, context: int = 0,
                   stride: int = 0, prepend_eos: bool = False, max_chars: int = 0,
                   batch_size: int = 8, out: str = "") -> list:
    """Sliding-window perplexity of every model on one text; prints a line per model and
    writes out/perplexity.json when `out` is given. Returns the result dicts."""
    check_choice("--detokenize", detokenize, sorted(ppl.DETOKENIZERS))
    raw = ppl.read_eval_text(text_path, tfds_name=tfds_name, split=split, data_dir=data_dir,
                             text_key=text_key, max_chars=max_chars)
    if detokenize == "wikitext":
        text = ppl.wikitext_detokenize(raw, unk)
        words = ppl.count_words(raw)   # WikiText's own word count, <eos> per line
    else:
        text, words = raw, ppl.count_words(raw, newline_is_word=False)
    results = []
    for name, config, params, tok, _ in models:
        res = ppl.perplexity(config, params, tok, text, context=context or None,
                             stride=stride or None, num_words=words, prepend_eos=prepend_eos,
                             batch_size=batch_size).as_dict()
        res.update(model=name, source=text_path or f"{tfds_name}[{split}]",
                   detokenize=detokenize)
        results.append(res)
        print(f"{name}: token ppl {res['token_perplexity']:.3f} ({res['tokens']:,} tokens), "
              f"word ppl {res['word_perplexity']:.3f} ({words:,} words), "
              f"{res['bits_per_byte']:.4f} bits/byte; context {res['context']}, stride "
              f"{res['stride']}, {res['windows']} windows", flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "perplexity.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def run_fewshot(models: list, task_specs: Sequence[str], shots: Sequence[int], *,
                num_examples: int = 0, seed: int = 0, batch_size: int = 16,
                out: str = "") -> list:
    """Every (model, task, K) with gptjax.eval.fewshot; table, JSON and plots in `out`."""
    tasks = [fewshot.build_task(s, num_examples=num_examples, seed=seed) for s in task_specs]
    rows = fewshot.run(models, tasks, shots, seed=seed, batch_size=batch_size,
                       out_dir=out or None)
    print(fewshot.results_markdown(rows), end="")
    if out:
        print(f"results: {os.path.join(out, 'results.md')} (+ results.json, plots)")
    return rows


def run_zeroshot(models: list, task_specs: Sequence[str], *, num_examples: int = 0,
                 seed: int = 0, batch_size: int = 16, out: str = "") -> list:
    """GPT-2's zero-shot framings and GPT-1's heuristics (gptjax.eval.zeroshot_run)."""
    rows = zeroshot_run.run(models, task_specs, num_examples=num_examples, seed=seed,
                            batch_size=batch_size, out=out)
    print(zeroshot_run.results_markdown(rows), end="")
    return rows


def run_lm_eval(models: list, tasks: Sequence[str], include_path: str = "", *,
                num_fewshot: Optional[int] = None, limit: int = 0, batch_size: int = 16,
                seed: int = 0, out: str = "", mesh: str = "") -> list:
    """Any lm-evaluation-harness task on every model (gptjax.eval.lm_harness, the `eval`
    extra); prints lm-eval's table and writes out/lm_eval.json (a list for several models) and
    every example's responses, out/lm_eval_samples.jsonl.

    With `mesh` ('fsdp=4,tensor=2': gptjax.eval.mesh_scoring) the log-likelihoods are scored
    on a device mesh; with several processes every process evaluates in step and process 0
    prints and writes.
    When every task is a plain task of `include_path`, lm-eval's built-in tasks are not indexed.
    """
    try:
        import lm_eval  # optional: the eval extra (lm-eval)
        from lm_eval.tasks import TaskManager  # optional: the eval extra (lm-eval)
        from lm_eval.utils import make_table  # optional: the eval extra (lm-eval)

        from gptjax.eval.lm_harness import GPTJaxLM  # optional: needs lm-eval
    except ImportError:
        raise ImportError("--mode=lm_eval needs lm-eval: pip install 'gptjax[eval]'") from None
    manager = None
    if include_path:  # (indexing lm-eval's own thousands of task YAMLs takes ~10 s)
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= set(manager.all_subtasks):  # (groups may name built-in tasks)
            manager = None
    manager = manager or TaskManager(include_path=include_path or None)
    results, samples, main = [], [], jax.process_index() == 0
    for name, config, params, tok, _ in models:
        lm = GPTJaxLM(model=(config, params, tok), batch_size=batch_size, seed=seed,
                      mesh=mesh or None)
        if main and lm.scorer is not None:
            print(f"{name}: {lm.scorer.summary()}", flush=True)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                      limit=limit or None, task_manager=manager,
                                      log_samples=bool(out), random_seed=seed)
        if main:
            print(f"{name}\n{make_table(res)}", flush=True)
        results.append({"model": name, "results": res["results"],
                        "n_samples": res.get("n-samples"), "config": {"tasks": list(tasks)}})
        samples += [{"model": name, "task": task, "doc_id": s["doc_id"], "target": s.get("target"),
                     "resps": s["resps"]} for task, rows in res.get("samples", {}).items()
                    for s in sorted(rows, key=lambda s: s["doc_id"])]
    if out and main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "lm_eval.json"), "w") as fh:
            json.dump(results[0] if len(results) == 1 else results, fh, indent=2, default=str)
        with open(os.path.join(out, "lm_eval_samples.jsonl"), "w") as fh:
            fh.writelines(json.dumps(s, default=str) + "\n" for s in samples)
    return results


def run_goodput(workdirs: Sequence[str], out: str = "") -> list:
    """Prints the goodput ledger of each train.py run directory (gptjax.runs.goodput) and plots
    it: `<out>/goodput_<run>.png`, or `<workdir>/goodput.png` without `out`.

    Returns:
      The plots' paths.
    """
    if not workdirs:
        raise ValueError("--mode=goodput needs --workdir (a train.py run directory; repeatable)")
    if out:
        os.makedirs(out, exist_ok=True)
    plots = []
    for wd in workdirs:
        doc = goodput.load(wd)
        name = os.path.basename(os.path.abspath(wd))
        png = os.path.join(out, f"goodput_{name}.png") if out else os.path.join(wd, "goodput.png")
        print(goodput.report(doc, name))
        plots.append(goodput.plot(doc, png, title=f"{name}: {goodput.summary_line(doc['run'])}"))
        print(f"plot: {png}")
    return plots
