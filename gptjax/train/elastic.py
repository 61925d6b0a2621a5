"""`train.elastic`: a run resumed on fewer (or more) devices or processes than it was saved on
keeps its global batch and its per-device micro-batch by changing gradient accumulation.

Every checkpoint records the layout it was saved in (`layout_meta`: devices, processes, the
data-parallel size and the accum_steps used). A run resumed with `train.elastic=True` in
another layout trains with accum_steps = batch_size / (data-parallel size now x the saved
per-device micro-batch), says so in one line (`devices 8 -> 4: accum_steps 1 -> 2, global batch
64 kept`), and goes back down when the devices return. The step, the learning-rate schedule and
the data position carry on unchanged: the global batch of a step is a function of (seed, step)
whatever the process count (gptjax.data.lm, gptjax.data.sharded). Without the flag (or from a
checkpoint written before the layout was recorded) a run resumes with the config's accum_steps,
whatever the device count, as before.
"""

from __future__ import annotations

import math
from typing import Optional

import jax

from gptjax.config import ConfigError

META_KEY = "layout"  # the checkpoint metadata's key


def data_parallel_size(setup) -> int:
    """How many ways `setup`'s batches are split: the mesh axes of its batch sharding (data x
    fsdp by default, their DCN parts included)."""
    axes = setup.batch_sharding.spec[0] if len(setup.batch_sharding.spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(setup.mesh.shape[a] for a in axes)


def layout_meta(setup, config_accum_steps: int) -> dict:
    """What a checkpoint records of the layout it was saved in ({META_KEY: ...})."""
    return {META_KEY: dict(devices=jax.device_count(), processes=jax.process_count(),
                           data_parallel=data_parallel_size(setup),
                           accum_steps=setup.accum_steps,
                           config_accum_steps=config_accum_steps)}


def allowed_sizes(batch_size: int, micro: int) -> list:
    """The data-parallel sizes on which `batch_size` rows keep at most `micro` rows per device
    per micro-batch: divisors of batch_size / micro (the same micro-batch, more accumulation),
    or divisors of batch_size above it (one micro-batch, smaller)."""
    whole = batch_size // micro
    return [d for d in range(1, batch_size + 1)
            if batch_size % d == 0 and (whole % d == 0 or d > whole)]


def resumed_accum(batch_size: int, config_accum: int, saved: Optional[dict], now: dict
                  ) -> tuple[int, Optional[str]]:
    """(accum_steps to resume with, the one-line notice or None) under `train.elastic`.

    Args:
      batch_size: train.batch_size, the global batch (the checkpoint's too: the batcher checks).
      config_accum: train.accum_steps of the config now.
      saved: the checkpoint's layout (`layout_meta`), or None (written before it was recorded).
      now: the layout now (devices, processes, data_parallel).

    Raises:
      ConfigError: when the saved micro-batch does not fit the global batch on this layout.
    """
    if saved is None:
        return config_accum, None
    if all(saved[k] == now[k] for k in ("devices", "processes", "data_parallel")):
        # The same layout: the accumulation it was saved with, unless the config changed it.
        same = saved.get("config_accum_steps") == config_accum
        return (saved["accum_steps"] if same else config_accum), None
    dp_saved, accum_saved, dp = saved["data_parallel"], saved["accum_steps"], now["data_parallel"]
    micro = batch_size // (dp_saved * accum_saved)  # rows per device per micro-batch
    if batch_size % (dp * micro) == 0:
        accum = batch_size // (dp * micro)
    elif dp in allowed_sizes(batch_size, micro):
        accum = 1  # more devices than micro-batches: one, of fewer rows per device
    else:
        raise ConfigError(
            f"train.elastic: global batch {batch_size} (saved on data-parallel size {dp_saved} "
            f"x accum_steps {accum_saved}: {micro} rows per device) cannot be split over "
            f"data-parallel size {dp}; allowed: data-parallel sizes "
            f"{allowed_sizes(batch_size, micro)}")
    notice = (f"devices {saved['devices']} -> {now['devices']}: accum_steps {accum_saved} -> "
              f"{accum}, global batch {batch_size} kept")
    if saved["processes"] != now["processes"]:
        notice += f" (processes {saved['processes']} -> {now['processes']})"
    return accum, notice


def adapt(setup, config, meta: dict) -> Optional[str]:
    """Under `train.elastic`, rebuilds `setup`'s train step with the accum_steps that resuming
    from checkpoint metadata `meta` needs; returns the notice (None: the layout is the saved
    one, or the flag is off: then nothing changes)."""
    if not config.train.elastic:
        return None
    tc = config.train
    now = dict(devices=jax.device_count(), processes=jax.process_count(),
               data_parallel=data_parallel_size(setup))
    accum, notice = resumed_accum(tc.batch_size, tc.accum_steps, meta.get(META_KEY), now)
    setup.set_accum_steps(accum)
    return notice
