"""Finetune, or evaluate zero-shot, a GPT on a task.

  python finetune.py --config configs/finetune/<task>.py --workdir DIR [--mode=...] \
      [--config.a.b=v]

Modes: 'finetune' (GPT-1's heads and L2 + 0.5 L1), 'zero_shot' (the LM alone, GPT-1 section 5:
an alias of `eval.py --mode=zeroshot` on the config's task and decoder, same results and files),
'analysis' (GPT-1 Figure 2: dev score against layers transferred, zero-shot across pretraining
checkpoints). Intentionally thin: flags in, `gptjax.finetune` does the work.
"""

import os
import sys

from absl import app, flags

from gptjax import finetune
from gptjax.cli import define_config_file, parse_flags, run_cli
from gptjax.train.compile_cache import enable_compilation_cache
from gptjax.train.hostmem import prepare_host_for_training

_CONFIG = define_config_file(
    "config", None, "Finetuning config file (configs/finetune/<task>.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, predictions).")
_MODE = flags.DEFINE_enum("mode", "finetune", ["finetune", "zero_shot", "analysis"],
                          "What to run.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bar.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the finetuning step (no data, no weights) "
                             "for the local devices or --topology, print its memory (a LoRA run's "
                             "with --config.lora.rank>0), then exit.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "With --dry_run: compile for this TPU slice "
                                "(v5e:2x2; needs libtpu) or GPUs (h100, h100:8, l4; needs the "
                                "CUDA plugin).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: number of slices.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    # The process edge: glibc keeps freed memory mapped and single-device CPU steps run on the
    # main thread, before JAX creates its backend (gptjax.train.hostmem).
    prepare_host_for_training()
    enable_compilation_cache()  # a second run loads its compiled functions from disk
    run_cli(lambda: _run(_CONFIG.value, _WORKDIR.value, _MODE.value))


def _run(config, workdir, mode):
    if _DRY_RUN.value:
        print(finetune.finetune_dry_run(config, _TOPOLOGY.value, _NUM_SLICES.value))
        return
    if not workdir:
        raise ValueError("--workdir is required (the run directory), except with --dry_run")
    if mode == "zero_shot":
        finetune.zero_shot(config, workdir)
    elif mode == "analysis":
        finetune.layer_transfer_analysis(config, workdir, progress=not _NO_PROGRESS.value)
    else:
        finetune.finetune(config, workdir, progress=not _NO_PROGRESS.value)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main, flags_parser=parse_flags)
