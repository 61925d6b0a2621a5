"""Two checkpoint tiers (gptjax.runs.local_tier, gptjax.train.tiers): the local format's round
trip and checks in process; end to end through train.py, a kill -9 right after a local save
resumes from it, a damaged local step falls back with a warning, and a 2-process run whose
process 1 lost its local tier resumes from the persistent tier bit for bit.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import REPO, TINY_RUN, train_flags
from gptjax import defaults
from gptjax.config import ConfigError
from gptjax.runs.local_tier import INDEX, SHARDS, LocalTier, LocalTierError
from gptjax.train.experiment import check_train_config
from gptjax.train.tiers import open_local

STEPS = TINY_RUN["train.steps"]


# ============================================================================ the format
@pytest.fixture
def mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))


def _state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    sh = NamedSharding(mesh, P("data"))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P()) if np.ndim(x) == 0 else sh)
    return {"w": put(rng.standard_normal((4, 8)).astype(np.float32)),
            "h": put(jnp.asarray(rng.standard_normal(6), jnp.bfloat16)),
            "step": put(np.int32(7))}


def _abstract(state):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_round_trip_rotation_and_leftovers(tmp_path, mesh):
    tier = LocalTier(tmp_path / "t", save_every=2, keep=2)
    assert [tier.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    states = {s: _state(mesh, s) for s in (2, 4, 6)}
    for s, st in states.items():
        assert tier.save(s, st, {"data": {"step": s}, "train_loss": float("nan")}, mesh)
    assert tier.steps() == [4, 6]  # the last `keep`
    doc = tier.check(6, mesh)
    assert doc["step"] == 6 and doc["meta"]["data"] == {"step": 6}
    assert doc["layout"]["mesh"] == {"data": 1, "fsdp": 1} and doc["layout"]["process_count"] == 1
    got = tier.read(doc, _abstract(states[6]))
    for k, x in states[6].items():
        assert got[k].dtype == x.dtype and got[k].shape == x.shape and got[k].sharding == x.sharding
        assert np.asarray(got[k]).tobytes() == np.asarray(x).tobytes(), k
    # An interrupted save (a temporary folder) is never a step, and is removed at the next open.
    leftover = pathlib.Path(tier.directory, "8.tmp-123")
    leftover.mkdir()
    assert tier.steps() == [4, 6]
    LocalTier(tier.directory, save_every=2, keep=2)
    assert sorted(os.listdir(tier.directory)) == ["4", "6"]
    # Saving a step again (after a restore from an earlier one) replaces it.
    tier.save(6, states[2], {}, mesh)
    assert np.asarray(tier.read(tier.check(6, mesh), _abstract(states[2]))["w"]).tobytes() == \
        np.asarray(states[2]["w"]).tobytes()
    # A resume from step 4 (another tier, another layout) drops the later steps it did not take.
    assert tier.discard_after(4) == [6] and tier.steps() == [4]


@pytest.mark.parametrize("damage, fragment", [
    ("flip", "does not match its checksum (sha256)"),
    ("truncate", "bytes, "),
    ("no_index", f"its {INDEX} is missing or unreadable"),
    ("no_shards", f"its {SHARDS} is missing"),
])
def test_damaged_step_is_found_and_set_aside(tmp_path, mesh, damage, fragment):
    tier = LocalTier(tmp_path / "t", save_every=1, keep=3)
    tier.save(3, _state(mesh), {}, mesh)
    step_dir = pathlib.Path(tier.directory) / "3"
    shards = step_dir / SHARDS
    if damage == "flip":
        b = bytearray(shards.read_bytes())
        b[5] ^= 1
        shards.write_bytes(bytes(b))
    elif damage == "truncate":
        shards.write_bytes(shards.read_bytes()[:-4])
    else:
        (step_dir / (INDEX if damage == "no_index" else SHARDS)).unlink()
    with pytest.raises(LocalTierError, match=fragment.replace("(", r"\(").replace(")", r"\)")) \
            as e:
        tier.check(3, mesh)
    assert e.value.damaged
    assert tier.set_aside(3).endswith("3.damaged") and tier.steps() == []


def test_other_layout_or_state_is_not_used(tmp_path, mesh):
    tier = LocalTier(tmp_path / "t", save_every=1, keep=3)
    st = _state(mesh)
    tier.save(1, st, {}, mesh)
    other = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    with pytest.raises(LocalTierError, match=r"another layout \(mesh differ\)") as e:
        tier.check(1, other)
    assert not e.value.damaged
    doc = tier.check(1, mesh)
    bigger = dict(_abstract(st), w=jax.ShapeDtypeStruct((4, 9), np.float32,
                                                        sharding=st["w"].sharding))
    with pytest.raises(LocalTierError, match=r"an array of shape \[4, 8\] float32 is \[4, 9\]"):
        tier.read(doc, bigger)
    with pytest.raises(LocalTierError, match="holds 3 arrays, this state 2"):
        tier.read(doc, {"w": bigger["w"], "step": bigger["step"]})


def test_config_and_folder(tmp_path):
    for key, value, fragment in [("local_dir", "gs://b/x", "must be a directory on this host"),
                                 ("local_save_every", 0, "train.local_save_every=0"),
                                 ("local_keep", 0, "train.local_keep=0")]:
        c = defaults.base_config()
        c.train[key] = value
        with pytest.raises(ConfigError, match=fragment):
            check_train_config(c)
    c = ml_collections.ConfigDict({"train": defaults.base_config().train})
    assert open_local(c, str(tmp_path / "run")) is None  # '' = off
    c.train.local_dir = str(tmp_path / "ssd")
    (tmp_path / "run").mkdir()
    a, b = open_local(c, str(tmp_path / "run")), open_local(c, str(tmp_path / "run"))
    assert a.directory == b.directory and a.directory.endswith("/process_0")
    name = pathlib.Path(a.directory).parent.name  # the run's name and id
    assert name.startswith("run-") and (tmp_path / "run" / "local_tier_id").read_text() in name


# ============================================================================ end to end
def _run(env, wd, faults=None, *extra):
    return subprocess.run([sys.executable, "train.py", *_flags(env, wd, *extra)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(env[1], **(faults or {})))


def _flags(env, wd, *extra):
    """The tiny run (persistent checkpoints every 4 steps, synchronous) with a local tier saved
    after every step, the last 2 kept."""
    return train_flags(env[0], wd, "--config.train.async_checkpointing=False",
                       f"--config.train.local_dir={env[0] / 'ssd'}",
                       "--config.train.local_save_every=1", "--config.train.local_keep=2", *extra)


def losses(workdir):
    recs = [json.loads(x) for x in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def local_dirs(env, wd):
    (run,) = [p for p in (env[0] / "ssd").iterdir() if p.name.startswith(wd.name + "-")]
    return sorted(run.iterdir())


def persistent(wd):
    return sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())


def test_kill9_after_local_save_resumes_there_and_damage_falls_back(env, tiny_run):
    """kill -9 right after the local save of step 5 (persistent at 4): resumed at 5. Killed
    again after step 7, whose local file is then damaged: a warning, resumed at 6, and the whole
    run's losses are the uninterrupted run's bit for bit."""
    ref, wd = tiny_run[0], env[0] / "tiers"
    r = _run(env, wd, {"GPTJAX_FAULT_KILL_AFTER_LOCAL_SAVE": "5"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    (proc,) = local_dirs(env, wd)
    assert persistent(wd) == [4] and sorted(os.listdir(proc)) == ["4", "5"]

    r = _run(env, wd, {"GPTJAX_FAULT_KILL_AFTER_LOCAL_SAVE": "7"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert f"resumed from step 5 (local tier {proc})" in r.stdout and "steps 5->12" in r.stdout
    assert persistent(wd) == [4] and sorted(os.listdir(proc)) == ["6", "7"]

    shards = proc / "7" / SHARDS
    b = bytearray(shards.read_bytes())
    b[len(b) // 2] ^= 0xFF
    shards.write_bytes(bytes(b))
    # And a damaged persistent step 8, newer than every local step: it is set aside, and the
    # newest intact step of both tiers (local 6, not persistent 4) is the one resumed.
    shutil.copytree(wd / "checkpoints" / "4", wd / "checkpoints" / "8")
    victim = max((p for p in (wd / "checkpoints" / "8").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    r = _run(env, wd)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (f"warning: local checkpoint step 7 in {proc} is damaged (its {SHARDS} does not match "
            f"its checksum (sha256)); moved it to {proc}/7.damaged") in r.stderr
    assert "8.damaged" in r.stderr, r.stderr[-3000:]
    assert f"resumed from step 6 (local tier {proc})" in r.stdout and "steps 6->12" in r.stdout
    a, b = losses(ref), losses(wd)
    assert sorted(b) == list(range(1, STEPS + 1)) and all(a[s] == b[s] for s in a), (a, b)
    assert (json.load(open(ref / "summary.json"))["val_loss"]
            == json.load(open(wd / "summary.json"))["val_loss"])
    # Each tier's blocking time in its own bucket; the buckets still add up to the wall time.
    doc = json.load(open(wd / "goodput.json"))
    assert [x["status"] for x in doc["attempts"]] == ["killed", "killed", "done"]
    for x in doc["attempts"]:
        assert x["buckets"]["local_checkpoint"] > 0, x
        assert abs(sum(x["buckets"].values()) - x["wall_s"]) <= 0.01 * x["wall_s"], x
    assert doc["attempts"][-1]["buckets"]["checkpoint"] > 0


@pytest.mark.slow
def test_two_processes_one_lost_local_tier_resume_from_persistent(env, tiny_run):
    """2 processes, persistent checkpoints every 5 steps, killed right after the local save of
    the last step, 12 (persistent at 10, before the final save): an uninterrupted run's losses.
    Process 1's local tier is then deleted (a replaced machine): both resume from the persistent
    step 10, say why, and the run's losses equal the uninterrupted ones bit for bit."""
    wd = env[0] / "tiers2"

    def both(faults=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = _flags(env, wd, "--config.train.save_every=5",
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
        procs = [subprocess.Popen([sys.executable, "train.py", *args, f"--process_id={i}"],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dict(env[1], **(faults or {})))
                 for i in range(2)]
        return procs, [p.communicate(timeout=600) for p in procs]

    procs, outs = both({"GPTJAX_FAULT_KILL_AFTER_LOCAL_SAVE": str(STEPS)})
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, outs[0][1][-3000:]
    uninterrupted = losses(wd)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1)) and persistent(wd) == [5, 10]
    p0, p1 = local_dirs(env, wd)
    assert sorted(os.listdir(p0)) == sorted(os.listdir(p1)) == ["11", "12"]
    shutil.rmtree(p1)

    procs, outs = both()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    out = outs[0][0]
    assert ("local checkpoint tier incomplete: step 12 is missing or damaged on process(es) "
            "[1]; resuming from the persistent tier's step 10") in out, out
    assert f"resumed from step 10 ({wd / 'checkpoints'})" in out and "steps 10->12" in out
    again, one = losses(wd), losses(tiny_run[0])
    assert again == uninterrupted  # steps 11 and 12 recomputed bit for bit
    # (2 processes sum gradients in another order than 1: the same run within 1e-5 relative.)
    assert all(abs(again[s] - one[s]) <= 1e-5 * abs(one[s]) for s in again), (again, one)
    assert sorted(os.listdir(p1)) == ["11", "12"] and persistent(wd) == [5, 10, 12]
