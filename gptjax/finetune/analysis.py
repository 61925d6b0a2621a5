"""GPT-1 section 5's analyses of a pretrained decoder: zero-shot runs and layer transfer.

`zero_shot(config, workdir)` scores the config's task with the language model alone: an alias
of `eval.py --mode=zeroshot` (gptjax.eval.zeroshot_run), writing zeroshot.json/.md/.png. `layer_transfer_analysis(config, workdir)`
runs both of Figure 2's analyses: dev score against the number of pretrained layers transferred
(one finetuning run each), and zero-shot accuracy across pretraining checkpoints; it writes
analysis.json, analysis.md (both tables) and analysis.png (both plots).
"""

from __future__ import annotations

import copy
import json
import os
import time

import ml_collections

from gptjax import defaults
from gptjax.data.tasks import TaskSpec, get_task, load_task
from gptjax.eval import zeroshot_run
from gptjax.eval.zero_shot import zero_shot_accuracy
from gptjax.finetune.decoder import pretrained_decoder
from gptjax.finetune.loop import finetune, load_task_from_config, subset
from gptjax.runs.checkpoint import Checkpointer


# ================================================================================ zero-shot
def zero_shot(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`finetune.py --mode=zero_shot`: an alias of `eval.py --mode=zeroshot` (the one entry for
    zero-shot evaluation, gptjax.eval.zeroshot_run) on the config's task and decoder.

    The task is read as finetuning reads it (`task.path` or the tfds `task.data_dir`,
    `task.subset`), split `config.zero_shot.split` (default the first dev split; CoLA also reads
    train, where its threshold is fitted), `zero_shot.max_examples` of it; results go to
    `workdir` as eval.py writes them: zeroshot.json, zeroshot.md, zeroshot.png.

    Args:
      config: a finetuning config; fields it lacks take finetune_config's defaults.
      workdir: where the results go.

    Returns:
      eval.py's row for the model and task ({'model', 'task', 'metric', 'n', <metrics>}) with
      'split', 'init' and 'wall_time_s' added.
    """
    config = defaults.complete(config, defaults.finetune_config(config.task.name))
    name, zc = config.task.name, config.zero_shot
    if name not in zeroshot_run.GPT1_TASKS:
        raise ValueError(f"task {name!r} has no zero-shot method; allowed: "
                         f"{sorted(zeroshot_run.GPT1_TASKS)}")
    if config.init.kind == "scratch":
        raise ValueError("zero-shot evaluation needs a pretrained decoder: set init.kind to "
                         "'workdir' or 'hf' and init.path")
    spec = get_task(name)
    split = zc.split or spec.dev_splits[0]
    splits = ["train", split] if name == "cola" else [split]
    data = load_task_from_config(config, splits)
    print(data.report(), flush=True)
    items = {s: subset(data.splits[s], zc.max_examples, config.seed) for s in splits}
    src = (f"--{'workdir' if config.init.kind == 'workdir' else 'hf_dir'} {config.init.path} "
           f"--tasks {name}={config.task.path or config.task.data_dir}")
    print(f"finetune.py --mode=zero_shot is eval.py --mode=zeroshot {src} --out {workdir}",
          flush=True)
    model_cfg, params, tokenizer = pretrained_decoder(config.init)
    model = (os.path.basename(os.path.normpath(config.init.path)), model_cfg, params, tokenizer,
             {"step": None, "path": config.init.path})
    t0 = time.time()
    (row,) = zeroshot_run.run_loaded([model], {name: items}, seed=config.seed,
                                     batch_size=zc.batch_size, out=workdir,
                                     normalize=zc.normalize)
    return {**row, "split": split, "init": config.init.path, "wall_time_s": time.time() - t0}


# ================================================================================ Figure 2
def _parse_zero_shot_task(entry: str) -> tuple[TaskSpec, dict]:
    """'sst2=DIR' (files) or 'glue/sst2=DATA_DIR' (tfds) -> (spec, load_task kwargs)."""
    if "=" not in entry:
        raise ValueError(f"analysis.zero_shot_tasks entry {entry!r}: expected 'task=path' "
                         "(e.g. 'sst2=../shared/data/glue/SST-2' or 'glue/sst2=../shared/tfds')")
    name, path = entry.split("=", 1)
    spec = get_task(name)
    kw = {"data_dir": path} if "/" in name else {"path": path}
    return spec, dict(kw, name=name)


def _transfer_curve(config: ml_collections.ConfigDict, workdir: str, layers: list, main_key: str,
                    progress: bool) -> list:
    """One finetuning run per number of transferred layers, into workdir/transfer_<n>."""
    transfer = []
    for n in layers:
        c = copy.deepcopy(config)
        with c.unlocked():
            c.init.transfer_layers = int(n)
            c.init.transfer_embeddings = True
            c.train.predict_test = False
        s = finetune(c, os.path.join(workdir, f"transfer_{n}"), progress)
        transfer.append({"layers": int(n), main_key: s["best"][main_key]})
    return transfer


def _zero_shot_curve(config: ml_collections.ConfigDict) -> list:
    """Zero-shot accuracy of every `analysis.zero_shot_tasks` entry at every pretraining
    checkpoint of `init.path` (an 'hf' init has one)."""
    ac = config.analysis
    if not ac.zero_shot_tasks:
        return []
    if config.init.kind == "workdir":
        ck = Checkpointer(os.path.join(config.init.path, "checkpoints"), async_save=False,
                          read_only=True)
        steps = ck.all_steps()
        ck.close()
    else:
        steps = [None]
    tasks = []
    for entry in ac.zero_shot_tasks:
        spec_z, kw = _parse_zero_shot_task(entry)
        split = spec_z.dev_splits[0]
        data = load_task(kw.pop("name"), splits=[split], **kw)
        print(data.report(), flush=True)
        tasks.append((spec_z, subset(data.splits[split], ac.zero_shot_examples, config.seed)))
    rows = []
    for step in sorted(steps, key=lambda s: -1 if s is None else s):
        model_cfg, params, tokenizer = pretrained_decoder(config.init, step)
        row = {"step": step}
        for spec_z, ex in tasks:
            row[spec_z.name] = zero_shot_accuracy(spec_z, model_cfg, params, tokenizer, ex)
        rows.append(row)
        print(f"zero-shot at pretraining step {step}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"), flush=True)
    return rows


def layer_transfer_analysis(config: ml_collections.ConfigDict, workdir: str,
                            progress: bool = True) -> dict:
    """GPT-1 Figure 2: dev score against pretrained layers transferred, and zero-shot accuracy
    across pretraining checkpoints.

    Finetunes the config's task once per entry of `analysis.layers` (default 0..n_layer) into
    `workdir/transfer_<n>`, then scores every `analysis.zero_shot_tasks` entry zero-shot with each
    pretraining checkpoint of `init.path` (a train.py work directory; an 'hf' init has one).
    Writes analysis.json, analysis.md (both tables) and analysis.png (both plots).

    Args:
      config: a finetuning config; fields it lacks take finetune_config's defaults.
      workdir: the analysis directory.
      progress: show the finetuning runs' progress bars.

    Returns:
      {'task', 'metric', 'transfer' (rows), 'zero_shot' (rows), 'pretrained'}.
    """
    config = defaults.complete(config, defaults.finetune_config(config.task.name))
    if config.init.kind == "scratch":
        raise ValueError(f"init.kind={config.init.kind!r}: the analysis needs a pretrained "
                         "decoder ('workdir' or 'hf')")
    os.makedirs(workdir, exist_ok=True)
    spec = get_task(config.task.name)
    n_layer = pretrained_decoder(config.init)[0].n_layer
    layers = list(config.analysis.layers or range(n_layer + 1))
    main_key = f"{spec.dev_splits[0]}_{spec.main_metric}"
    result = {"task": spec.name, "metric": main_key,
              "transfer": _transfer_curve(config, workdir, layers, main_key, progress),
              "zero_shot": _zero_shot_curve(config), "pretrained": config.init.path}
    with open(os.path.join(workdir, "analysis.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    lines = _analysis_tables(result)
    with open(os.path.join(workdir, "analysis.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    _plot_analysis(result, os.path.join(workdir, "analysis.png"))
    return result


def _analysis_tables(result: dict) -> list:
    """The markdown lines of analysis.md: transfer table, then the zero-shot table if any."""
    key, zs = result["metric"], result["zero_shot"]
    lines = [f"# GPT-1 analysis: {result['pretrained']}", "",
             f"| layers transferred | {key} |", "|---:|---:|"]
    lines += [f"| {r['layers']} | {r[key]:.4f} |" for r in result["transfer"]]
    if zs:
        names = [k for k in zs[0] if k != "step"]
        lines += ["", "| pretraining step | " + " | ".join(f"{n} zero-shot acc" for n in names)
                  + " |", "|---:|" + "---:|" * len(names)]
        lines += [f"| {r['step']} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |"
                  for r in zs]
    return lines


def _plot_analysis(result: dict, out_png: str) -> str:
    import matplotlib  # heavy: matplotlib, only when plotting
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, only when plotting

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    key = result["metric"]
    xs = [r["layers"] for r in result["transfer"]]
    axes[0].plot(xs, [r[key] for r in result["transfer"]], "o-")
    axes[0].set_xlabel("# of pretrained layers transferred")
    axes[0].set_ylabel(f"{result['task']} {key}")
    axes[0].set_title("Transfer (GPT-1 Figure 2, left)")
    axes[0].grid(alpha=0.3)
    zs = result["zero_shot"]
    if zs:
        steps = [r["step"] if r["step"] is not None else 0 for r in zs]
        for name in [k for k in zs[0] if k != "step"]:
            spec = get_task(name)
            line, = axes[1].plot(steps, [r[name] for r in zs], "o-", label=name)
            chance = 1.0 / spec.num_labels
            axes[1].axhline(chance, ls="--", lw=0.8, color=line.get_color())
        axes[1].legend()
    axes[1].set_xlabel("pretraining step")
    axes[1].set_ylabel("zero-shot accuracy (dashed: chance)")
    axes[1].set_title("Zero-shot (GPT-1 Figure 2, right)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
