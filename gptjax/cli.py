"""Shared plumbing of the entry scripts: one-line errors, and the sample printed after training."""

from __future__ import annotations

import os
import sys
from typing import Callable

# Errors a user can cause (bad config, flags, paths, data, checkpoints): one line, no traceback.
def _user_errors() -> tuple:
    from gptjax.checkpoint import CheckpointError
    from gptjax.config import ConfigError
    from gptjax.convert import ConversionError
    from gptjax.sharding import ShardingError
    return (ConfigError, CheckpointError, ConversionError, ShardingError, ValueError,
            FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)


def quiet_libraries() -> None:
    """Keep the terminal for our progress bar: silence absl INFO logs and tfds's own bars."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
    except ImportError:
        pass


def run_cli(fn: Callable[[], None]) -> None:
    """Run `fn`; a user error prints `error: <message>` on one line and exits with status 2."""
    quiet_libraries()
    try:
        fn()
    except _user_errors() as e:
        if os.environ.get("GPTJAX_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


def maybe_init_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Start JAX's multi-process runtime when flags or the environment ask for it.

    Explicit flags (all three) work anywhere, including several CPU processes on one machine
    (with gloo collectives). Without flags, `GPTJAX_DISTRIBUTED=1` lets JAX detect the cluster
    itself (TPU pods, SLURM, Open MPI). Otherwise the run is single-process.
    """
    import jax

    given = [x is not None for x in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("multi-process needs all of --coordinator_address, --num_processes and "
                         "--process_id (or none of them)")
    if all(given):
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif os.environ.get("GPTJAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def sample_after_training(config, summary: dict) -> None:
    """Print a short sample from the trained model (config.sample), streamed as it decodes."""
    import jax

    from gptjax import sampling

    sc = config.sample
    if sc.max_new_tokens <= 0 or jax.process_index() != 0:
        return
    tok, mc = summary["tokenizer"], summary["model_config"]
    prompt = sc.prompt or "\n"
    ids = tok.encode(prompt) or [tok.eos_id or 0]
    max_new = min(sc.max_new_tokens, mc.n_ctx - len(ids))
    out = sampling.generate(mc, summary["state"].params, [ids], max_new_tokens=max_new,
                            temperature=sc.temperature, top_k=sc.top_k,
                            eos_id=tok.eos_id, rng=jax.random.key(config.seed))
    new_ids = [int(t) for t in out.tokens[0][: int(out.lengths[0])]]
    print("---------- sample ----------")
    print(prompt + tok.decode(new_ids))
    print("----------------------------", flush=True)
