"""Sharding: meshes, rules, and the 8-device and multi-process checks (run as subprocesses,
because the fake device count must be set before jax is imported)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from gptjax import sharding as shd

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(n_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_resolve_mesh_shape():
    assert shd.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {
        "data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(shd.ShardingError, match="at most one axis may be -1"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(shd.ShardingError, match="not divisible"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)


@pytest.mark.slow
def test_eight_device_suite():
    """Sharded == one device on meshes (8,1,1), (1,8,1), (2,2,2), (1,2,4); checkpoint resharding."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(REPO / "tests" / "multidevice_sharding.py")], cwd=REPO,
                       env=_env(8), capture_output=True, text=True, timeout=900)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout and "failed" not in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_train_args(tmp_path, workdir):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"row {i}: pack my box with five dozen liquor jugs.\n"
                                  for i in range(300)))
    return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/default.py"),
            f"--workdir={workdir}", "--no_progress",
            "--config.data.dataset=local_text", f"--config.data.path={tmp_path / 'corpus.txt'}",
            "--config.data.validation_fraction=0.1", f"--config.data.cache_dir={tmp_path}/cache",
            f"--config.data.data_dir={tmp_path}/tfds", "--config.tokenizer.kind=char",
            "--config.model.n_layer=2", "--config.model.n_embd=32", "--config.model.n_head=2",
            "--config.model.n_ctx=32", "--config.train.steps=6", "--config.train.batch_size=4",
            "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.train.save_every=3", "--config.optim.warmup_steps=2",
            "--config.sample.max_new_tokens=0"]


def _losses(workdir):
    recs = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.slow
def test_two_processes_log_the_same_losses_as_one(tmp_path):
    # Build the data once so both processes find it prepared.
    one = tmp_path / "one"
    r = subprocess.run(_tiny_train_args(tmp_path, one), cwd=REPO, env=_env(2),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    port = _free_port()
    two = tmp_path / "two"
    procs = [subprocess.Popen(
        _tiny_train_args(tmp_path, two) + [f"--coordinator_address=127.0.0.1:{port}",
                                           "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
