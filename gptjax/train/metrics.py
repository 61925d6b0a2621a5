"""Throughput accounting: device peak FLOP/s (datasheet or measured) and MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense (non-sparse) peak FLOP/s per chip from vendor datasheets, by substring of device_kind.
# bf16 numbers; fp32 matmuls on GPUs use TF32 peaks where XLA's default precision allows it.
DATASHEET_PEAK_BF16 = {
    "H200": 989e12,          # same tensor cores as H100 SXM
    "H100": 989e12,          # H100 SXM5 (the PCIe card is 756e12)
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165.2e12,    # Ada whitepaper: BF16 with FP32 accumulate (gptjax.train.gpus)
    "TPU v6": 918e12,        # Trillium
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,        # v5p's device_kind is "TPU v5" (after the lite keys: first match wins)
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


# Memory bandwidth in bytes/s from vendor datasheets (the decode roofline), by device_kind substring.
DATASHEET_BANDWIDTH = {
    "H200": 4.8e12,
    "H100": 3.35e12,         # SXM5 (PCIe: 2.0e12)
    "A100": 2.0e12,          # 80 GB SXM (40 GB: 1.55e12)
    "L4": 300e9,
    "A10G": 600e9,
    "RTX 4090": 1008e9,
    "TPU v6": 1640e9,
    "TPU v5p": 2765e9,
    "TPU v5 lite": 819e9,
    "TPU v5e": 819e9,
    "TPU v5": 2765e9,        # v5p
    "TPU v4": 1228e9,
    "TPU v3": 900e9,
}


def _lookup(table: dict, device) -> float | None:
    kind = getattr(device or jax.devices()[0], "device_kind", "")
    for key, value in table.items():
        if key.lower() in kind.lower():
            return value
    return None


def datasheet_bandwidth(device=None):
    """The datasheet memory bandwidth (bytes/s) of a device, or None when unknown (e.g. CPU)."""
    return _lookup(DATASHEET_BANDWIDTH, device)


@functools.lru_cache(maxsize=None)
def measured_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Device-memory bandwidth of device 0 in bytes/s: best of `repeats` x + 1 over n_bytes of fp32.

    Each element is read once and written once, so the bytes moved are 2 * n_bytes (the same
    convention as a copy benchmark).
    """
    x = jnp.zeros((n_bytes // 4,), jnp.float32)
    nbytes = x.nbytes
    f = jax.jit(lambda v: v + 1, donate_argnums=0)  # in place: no fresh buffer to fault in
    x = f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x = f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def datasheet_peak(device=None):
    """The datasheet bf16 peak of a device, or None when the device kind is unknown (e.g. CPU)."""
    return _lookup(DATASHEET_PEAK_BF16, device)


@functools.lru_cache(maxsize=None)
def measured_peak(dtype: str = "float32", n: int = 0, repeats: int = 0) -> float:
    """Measured dense-matmul FLOP/s of device 0: the best of `repeats` timed n x n x n matmuls.

    An accelerator needs a large matmul to reach its peak (a 2048^3 bf16 matmul takes ~20 us on
    an H100, too short to time against launch overhead), so on GPUs/TPUs the default is
    8192^3, timed as 10 chained matmuls per measurement; on CPUs 2048^3, one per measurement.
    fp32 uses the default matmul precision (TF32 on NVIDIA GPUs), as model code does.

    Args:
      dtype: the matmul's dtype ('float32', 'bfloat16', ...).
      n: matrix size; 0 picks by platform as above.
      repeats: timed measurements, best kept; 0 picks 5.
    """
    dev = jax.devices()[0]
    accel = dev.platform != "cpu"
    n = n or (8192 if accel else 2048)
    repeats = repeats or 5
    chain = 10 if accel else 1
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
                       / n ** 0.5, dev)

    @jax.jit
    def f(x, w):
        # A chain of dependent matmuls (each output feeds the next, kept O(1) by the 1/sqrt(n)
        # scale), so one dispatch covers `chain` matmuls and nothing is optimised away.
        return jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x)

    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * chain / best


def peak_flops(dtype: str = "float32", quick: bool = False) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the datasheet when known, else measured.

    Args:
      dtype: the compute dtype.
      quick: on a CPU, measure with 1024^3 matmuls, best of 3: an eighth of the default's
        FLOPs (2048^3, best of 5: seconds on 2 cores, a large share of a small run's wall time).
    """
    p = datasheet_peak()
    if p is not None:
        return p, "datasheet"
    if quick and jax.devices()[0].platform == "cpu":
        return measured_peak(dtype, 1024, 3), "measured matmul (1024^3)"
    return measured_peak(dtype), "measured matmul"


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    return tokens_per_sec * flops_per_token / (n_devices * peak)
