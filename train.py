"""Pretrain a GPT: `python train.py --config configs/<name>.py --workdir DIR [--config.a.b=v]`.

Intentionally thin: flags in, `gptjax.trainer.train_and_evaluate` does the work.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Experiment config file (a get_config() module).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory (checkpoints, logs).")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bar.")


def main(argv):
    del argv
    from gptjax.cli import run_cli
    run_cli(lambda: _train(_CONFIG.value, _WORKDIR.value))


def _train(config, workdir):
    from gptjax.cli import sample_after_training
    from gptjax.trainer import train_and_evaluate
    summary = train_and_evaluate(config, workdir, progress=not _NO_PROGRESS.value)
    sample_after_training(config, summary)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)
