"""In-training evaluation (`train.evals`): evaluations run every `train.evals_every` steps on the
live parameters, each number logged as `eval/<name>/<metric>` in metrics.jsonl and TensorBoard,
their time charged to the goodput ledger's `eval` bucket, and a plot of every metric against the
step (`evals.png`) at the end of the run.

What an evaluation computes lives a layer up: gptjax.eval.in_training builds the evaluations that
`train.evals` names (few-shot, zero-shot, perplexity, lm-eval tasks), and neither layer imports
the other (gptjax.eval never imports gptjax.train). So the loop takes them as values, injected
by the caller: an `Evaluation` is a name and a function of (model config, parameters,
tokenizer) to {metric: number}. train.py builds them from the config before any training data
is read; a library caller passes `train_and_evaluate(config, workdir,
evals=build_evals(config))`, or evaluations of its own. (A registry in this layer that
gptjax.eval fills on import would work too, but only after that import: a library caller who
forgot it would find `train.evals` unknown, and the loop would depend on an import's side
effect.)

The parameters an evaluation gets are the train state's, as they are sharded on the training mesh
(a LoRA run's: its base with the adapters merged), after the step's update: what the checkpoint
of that step holds, so `eval.py --steps` on the checkpoints gives the same numbers.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Protocol, Sequence

import ml_collections

from gptjax.config import ConfigError, GPTConfig

PREFIX = "eval/"  # the metrics' prefix in metrics.jsonl and TensorBoard
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class Evaluation(Protocol):
    """What the loop takes as one in-training evaluation (gptjax.eval.in_training.Evaluation is
    one; any object with these attributes is).

    Attributes:
      name: its part of the metric names, `eval/<name>/<metric>` (letters, digits, `_.-`).
      fn: (model config, parameters, tokenizer) -> {metric: number}; a ValueError stops the run
        with one line naming the evaluation and the step.
      check: None, or (model config, tokenizer) -> None, run once before the first step: raises
        a ValueError for what would fail later (a character the tokenizer does not have).
    """

    name: str
    fn: Callable[[GPTConfig, Any, Any], dict]
    check: Optional[Callable[[GPTConfig, Any], None]]


def check_evals(config: ml_collections.ConfigDict, evals: Sequence[Evaluation]) -> None:
    """ConfigError for `train.evals` set without its evaluations, or for evaluations whose names
    are not unique or not usable in a metric name."""
    specs = config.train.evals
    if not isinstance(specs, (tuple, list)) or any(not isinstance(s, str) for s in specs):
        raise ConfigError(f"train.evals={specs!r}: allowed: a tuple of strings "
                          "'kind:key=value;key=value' (see the README, Training)")
    if specs and not evals:
        raise ConfigError(f"train.evals={tuple(specs)!r}: its evaluations are built a layer "
                          "above the loop: pass train_and_evaluate(..., evals=gptjax.eval"
                          ".in_training.build_evals(config)) (train.py does)")
    names = [e.name for e in evals]
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"evaluation name {name!r}: allowed: letters, digits, '_', '.', "
                              "'-'")
        if names.count(name) > 1:
            raise ConfigError(f"two evaluations are named {name!r}; give one another name "
                              "(name=... in its train.evals entry)")


def evals_every(tc: ml_collections.ConfigDict) -> int:
    """Steps between in-training evaluations: train.evals_every, 0 = train.eval_every's."""
    return tc.evals_every or tc.eval_every


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class PeriodicEvals:
    """The run's evaluations: when they are due, running them, logging their numbers."""

    def __init__(self, evals: Sequence[Evaluation], run: Any, writer: Any,
                 log: Optional[Callable[[str], None]] = None):
        """Args:
          evals: the evaluations (may be empty: nothing is ever due).
          run: the gptjax.train.run.Run (its config, model config, tokenizer, setup, ledger).
          writer: the loop's MetricsWriter.
          log: where a line of the numbers goes (the progress bar's `write`), or nowhere.
        """
        self.evals, self.run, self.writer, self.log = tuple(evals), run, writer, log
        self.every = evals_every(run.config.train)
        self.total = run.config.train.steps

    def check(self) -> None:
        """Each evaluation's `check`, before the first step (one line naming it)."""
        for e in self.evals:
            if getattr(e, "check", None) is not None:
                try:
                    e.check(self.run.model_cfg, self.run.tokenizer)
                except ValueError as err:
                    raise ValueError(f"train.evals {e.name!r}: {err}") from None

    def due(self, done: int) -> bool:
        """Whether the evaluations run after `done` steps: every `every` steps (0: never) and
        at the last."""
        return bool(self.evals) and (done == self.total
                                     or (self.every > 0 and done % self.every == 0))

    def __call__(self, params: Any, done: int) -> dict:
        """Runs every evaluation on `params` (the state's after `done` steps) in the ledger's
        `eval` bucket, writes one metrics record, and returns it."""
        run = self.run
        merge = getattr(run.setup, "merged", None)  # a LoRA run: base + adapters
        record = {}
        with run.ledger.phase("eval"):
            model_params = params if merge is None else merge(params)
            for e in self.evals:
                try:
                    out = e.fn(run.model_cfg, model_params, run.tokenizer)
                except ValueError as err:
                    raise ValueError(f"train.evals {e.name!r} at step {done}: {err}") from None
                record.update({f"{PREFIX}{e.name}/{k}": float(v) for k, v in out.items()
                               if _number(v)})
        self.writer.write(dict(step=done, **record))
        if self.log is not None:
            self.log(f"step {done}: " + ", ".join(f"{k[len(PREFIX):]} {v:.4g}"
                                                  for k, v in record.items()))
        return record
