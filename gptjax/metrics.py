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
    "TPU v6": 918e12,        # Trillium
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


def datasheet_peak(device=None):
    """The datasheet bf16 peak of a device, or None when the device kind is unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for key, peak in DATASHEET_PEAK_BF16.items():
        if key.lower() in kind.lower():
            return peak
    return None


@functools.lru_cache(maxsize=None)
def measured_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Measured dense-matmul FLOP/s of device 0: the best of `repeats` n x n x n matmuls."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the datasheet when known, else measured."""
    p = datasheet_peak()
    if p is not None:
        return p, "datasheet"
    return measured_peak(dtype), "measured matmul"


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    return tokens_per_sec * flops_per_token / (n_devices * peak)
