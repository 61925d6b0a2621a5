"""Pretrain a GPT: `python train.py --config configs/<name>.py --workdir DIR [--config.a.b=v]`.

Intentionally thin: flags in, `gptjax.train.loop.train_and_evaluate` does the work.
"""

import os
import sys

from absl import app, flags

from gptjax.cli import (define_config_file, exit_without_teardown, parse_flags, run_cli,
                        sample_after_training)
from gptjax.eval.in_training import build_evals
from gptjax.runs.export import export_run
from gptjax.runs.goodput import process_start
from gptjax.train.compile_cache import enable_compilation_cache
from gptjax.train.hostmem import prepare_host_for_training
from gptjax.train.loop import train_and_evaluate
from gptjax.train.memory import dry_run
from gptjax.multihost import maybe_init_distributed
from gptjax.train.run_data import prepare_data

_CONFIG = define_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Experiment config file (a get_config() module).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory (checkpoints, logs).")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bar.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every parameter's sharding and a per-device "
                             "memory plan for this config and mesh, then exit (allocates nothing).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "With --dry_run: compile the train step for this "
                                "TPU slice (v5e:2x2, v5p:4x4x8; needs libtpu) or GPUs (h100, "
                                "h100:8 a node, h100:2x8 two nodes; needs the CUDA plugin).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: number of slices, over the "
                                   "config's dcn mesh (mesh.dcn.data when the dcn is all ones).")
_PREPARE = flags.DEFINE_bool("prepare_data", False, "Prepare the data and exit: the tokenizer, and "
                             "this process's token files (with data.pipeline=sharded, its share "
                             "of virtual shards; run it on every host, in parallel, once).")
_EXPORT_HF = flags.DEFINE_string("export_hf", None, "Write the run in --workdir as a transformers "
                                 "directory (a LoRA run merged into its base) and exit.")
_EXPORT_PEFT = flags.DEFINE_string("export_peft", None, "Write a LoRA run's adapters (--workdir) "
                                   "as a PEFT directory (adapter_config.json + safetensors), exit.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def main(argv):
    del argv
    # The process edge: glibc keeps freed memory mapped and single-device CPU steps run on the
    # main thread, before JAX creates its backend (gptjax.train.hostmem).
    prepare_host_for_training()
    enable_compilation_cache()  # a second run loads its compiled functions from disk
    run_cli(lambda: _train(_CONFIG.value, _WORKDIR.value))
    exit_without_teardown()  # (seconds the goodput ledger cannot see; errors exited above)


def _train(config, workdir):
    maybe_init_distributed(_COORD.value, _NPROC.value, _PID.value)
    if _DRY_RUN.value:
        print(dry_run(config, workdir, topology=_TOPOLOGY.value, num_slices=_NUM_SLICES.value))
        return
    if _EXPORT_HF.value or _EXPORT_PEFT.value:
        print(export_run(workdir, hf_dir=_EXPORT_HF.value, peft_dir=_EXPORT_PEFT.value))
        return
    if _PREPARE.value:
        print(prepare_data(config, workdir))
        return
    # The process's start and the sample are in the run's goodput ledger; train.evals are built
    # (their tasks read) before the training data.
    train_and_evaluate(config, workdir, progress=not _NO_PROGRESS.value, started=process_start(),
                       after=lambda result: sample_after_training(config, result),
                       evals=build_evals(config))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main, flags_parser=parse_flags)
