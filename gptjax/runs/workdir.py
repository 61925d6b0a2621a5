"""A run directory: what train.py writes there (the config, metrics, the summary).

A train.py work directory holds `config.json` (the experiment), `model_config.json` (the
GPTConfig), `tokenizer/`, `checkpoints/` (Orbax steps whose metadata records the model config,
architecture and execution, and the tokenizer's fingerprint), `metrics.jsonl` (+ `tensorboard/`),
`loss.png`, `summary.json` and `goodput.json` (gptjax.runs.goodput: where each attempt's wall
time went). `gptjax.runs.pretrained` reads a decoder back from such a directory. A LoRA run
(config.json's lora.rank > 0) has the same files; its checkpoints hold the step, the adapters and
their optimizer state, and their metadata also its `lora` settings and the `base` it trained over
(init kind, path, step, tokenizer_path and a fingerprint of the base's values).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Optional

import ml_collections

from gptjax.config import GPTConfig

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class MetricsWriter:
    """metrics.jsonl (one JSON object per record) plus TensorBoard scalars.

    tensorboardX takes seconds to import (protobuf), longer than a small run's first steps, so
    it is imported and its writer made on a thread while the run compiles (XLA releases the
    GIL); scalars wait in a list until the writer is there. The JSONL log is written at once.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        """Opens the writer of `workdir`; with `enabled` False (processes other than 0) it
        writes nothing."""
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS)
        self._tb, self._queued = None, []
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._open_tb, args=(workdir,), daemon=True)
            self._thread.start()

    def _open_tb(self, workdir: str) -> None:
        try:
            from tensorboardX import SummaryWriter  # optional: tensorboardX
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard is optional; the JSONL log is the record.
            self._tb = None

    def _drain(self, wait: bool) -> None:
        """Hands queued scalars to TensorBoard once its writer exists (or `wait` for it)."""
        if self._thread is not None:
            if not wait and self._thread.is_alive():
                return
            self._thread.join()
            self._thread = None
        if self._tb is not None:
            for record in self._queued:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, record["step"])
        self._queued = []

    def write(self, record: dict) -> None:
        """Appends `record` (which has a `step`) to the log and its numbers to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._queued.append(record)
        self._drain(wait=False)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer (the JSONL file is closed after each write)."""
        if not self.enabled:
            return
        self._drain(wait=True)
        if self._tb is not None:
            self._tb.close()


def truncate_log(path: str, step: int) -> None:
    """On resume, drop the records after the restored `step` so the log reads as one run.

    Args:
      path: a metrics.jsonl file (nothing happens if it does not exist).
      step: the last step to keep (0: a new run keeps no record).
    """
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as fh:
        fh.writelines(kept)


def write_run_config(workdir: str, config: ml_collections.ConfigDict, model_cfg: GPTConfig
                     ) -> None:
    """Writes `config.json` (the experiment) and `model_config.json` (the architecture)."""
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "model_config.json"), "w") as fh:
        json.dump(model_cfg.to_dict(), fh, indent=2)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(workdir: str, config: ml_collections.ConfigDict, limit: int = 8
                   ) -> Optional[str]:
    """The fields in which `config` differs from the run's saved `config.json`, on one line.

    The model (`model.*`) is left out: a checkpoint of another architecture is refused
    (`check_checkpoint_meta`) and a change of execution is named on its own line
    (`execution_change`). None when nothing differs or there is no saved config.

    Args:
      workdir: the run directory.
      config: this run's complete config.
      limit: fields named before the rest are only counted.
    """
    try:
        with open(os.path.join(workdir, "config.json")) as fh:
            saved = _flatten(json.load(fh))
    except (OSError, ValueError):
        return None
    here = _flatten(json.loads(config.to_json_best_effort()))
    # A field the saved config predates (a block such as `init` or `lora`, or a key such as
    # `train.spike_guard`, added after the run started) is not a change: the run was made with
    # what its default does.
    diff = sorted(k for k in saved
                  if not k.startswith("model.") and saved.get(k) != here.get(k))
    if not diff:
        return None
    text = ", ".join(f"{k} {saved.get(k)!r} -> {here.get(k)!r}" for k in diff[:limit])
    return text + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def last_logged_loss(path: str, step: int) -> Optional[float]:
    """The training loss metrics.jsonl records for `step` (or the last step before it)."""
    if not os.path.exists(path):
        return None
    loss = None
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec and rec.get("step", 0) <= step:
                loss = rec["loss"]
    return loss


def remove_empty_dirs(workdir: str) -> None:
    """Removes `workdir` and its subdirectories where they hold no file (a run that failed
    before writing anything leaves no empty directory behind)."""
    for root, _, _ in sorted(os.walk(workdir), key=lambda x: -len(x[0])):
        try:
            os.rmdir(root)  # only succeeds on an empty directory
        except OSError:
            pass


def write_summary(workdir: str, summary: dict) -> None:
    """Writes `summary.json`, the JSON summary of a finished run."""
    with open(os.path.join(workdir, SUMMARY), "w") as fh:
        json.dump(summary, fh, indent=2)
