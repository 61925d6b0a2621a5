"""Sharding: meshes, rules, and the 8-device checks (run as a subprocess, because the fake
device count must be set before jax is imported)."""

import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env
from gptjax import sharding as shd


def test_resolve_mesh_shape():
    assert shd.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {
        "data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(shd.ShardingError, match="at most one axis may be -1"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(shd.ShardingError, match="not divisible"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)


@pytest.mark.slow
def test_eight_device_suite():
    """Sharded == one device on meshes (8,1,1), (1,8,1), (2,2,2), (1,2,4); checkpoint resharding;
    LoRA over an fsdp x tensor-sharded bf16 base; activation capture (gptjax.nn.inspect); per-layer
    statistics (train.layer_stats_every)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(REPO / "tests" / "multidevice_sharding.py")], cwd=REPO,
                       env=subprocess_env(devices=8), capture_output=True, text=True, timeout=900)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout and "failed" not in r.stdout


# Two processes log the same losses as one: tests/test_reliability.py's two-process run (single
# pipeline) and tests/test_data_sharded.py's (sharded pipeline) compare them within 1e-5.
