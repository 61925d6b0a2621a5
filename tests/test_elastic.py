"""train.elastic (gptjax.train.elastic): a run stopped on 8 fake devices (or 2 processes), resumed
on 4 (or 1) and then on 8 (or 2) again keeps its global batch by raising and lowering accum_steps,
says so in one line, and logs the losses of an uninterrupted 8-device run within 1e-5 relative
(accumulation sums the micro-batches in another order). Without the flag a resume on other
devices keeps the config's accum_steps (the per-device batch grows), as before.

Device counts are fixed when JAX starts, so the 8- and 4-device runs are train.py subprocesses
(XLA_FLAGS); the 1-process, 1-device runs train in this process. A run stops at step s by its
train.steps (the learning-rate schedule is fixed by optim.decay_steps), then resumes with more;
the 8-device chain starts from the uninterrupted run's checkpoint of step 4 (a copy).
"""

import json
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env, tiny_run_config, tiny_train_flags
from gptjax.config import ConfigError
from gptjax.defaults import base_config, complete
from gptjax.sharding import ShardingError
from gptjax.train.elastic import allowed_sizes, resumed_accum
from gptjax.train.experiment import check_train_config
from gptjax.train.loop import train_and_evaluate

# The tiny run, with a global batch of 16 (2 rows per device on 8) and no dropout (the dropout
# masks are drawn per micro-batch, so they would change with accum_steps); the learning rates of
# train.py's configs/default.py in-process too.
CHANGES = {"optim.learning_rate": 2e-3, "optim.min_lr": 2e-4, "train.batch_size": 16,
           "train.eval_batch_size": 8, "train.eval_batches": 1, "train.keep_checkpoints": 10,
           "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0, "model.resid_pdrop": 0.0}
NOTICE_8_4 = "devices 8 -> 4: accum_steps 1 -> 2, global batch 16 kept"
NOTICE_4_8 = "devices 4 -> 8: accum_steps 2 -> 1, global batch 16 kept"


def flags(env, wd, steps, *extra):
    return tiny_train_flags(env[0] / "corpus.txt", env[0], wd,
                            dict(CHANGES, **{"train.steps": steps}), *extra)


def train(env, wd, steps, devices, *extra, procs=1):
    """train.py on `devices` fake devices (per process) in `procs` processes; process 0's stdout."""
    cmd = [sys.executable, "train.py", *flags(env, wd, steps, *extra)]
    if procs > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={procs}"]
    ps = [subprocess.Popen(cmd + ([f"--process_id={i}"] if procs > 1 else []), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=subprocess_env(devices)) for i in range(procs)]
    outs = [p.communicate(timeout=600) for p in ps]
    for p, (_, err) in zip(ps, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    return outs[0][0]


def in_process(env, wd, steps, capsys, **changes):
    """train_and_evaluate here (1 process, 1 device); its stdout."""
    capsys.readouterr()
    cfg = tiny_run_config(env[0] / "corpus.txt", env[0], dict(CHANGES, **{"train.steps": steps},
                                                              **changes))
    train_and_evaluate(cfg, str(wd), progress=False)
    return capsys.readouterr().out


def losses(wd):
    recs = [json.loads(x) for x in open(pathlib.Path(wd) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def layout(wd, step):
    return json.load(open(pathlib.Path(wd) / "checkpoints" / str(step) / "meta" /
                          "metadata"))["layout"]


def assert_close(wd, reference, steps):
    got, ref = losses(wd), losses(reference)
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


@pytest.fixture(scope="module")
def reference(env):
    """The uninterrupted 8-device run of 12 steps."""
    wd = env[0] / "elastic_ref"
    train(env, wd, 12, 8)
    assert layout(wd, 12) == dict(devices=8, processes=1, data_parallel=8, accum_steps=1,
                                  config_accum_steps=1)
    return wd


# ============================================================================ end to end
def stopped_at_4(reference, wd):
    """A copy of the 8-device run as if it had stopped after step 4 (its later checkpoints
    removed; the resumed run drops their log records)."""
    shutil.copytree(reference, wd)
    for s in (8, 12):
        shutil.rmtree(wd / "checkpoints" / str(s))
    return wd


def test_8_devices_then_4_then_8(env, reference):
    wd = stopped_at_4(reference, env[0] / "elastic_848")
    out = train(env, wd, 8, 4, "--config.train.elastic=True")
    assert [ln for ln in out.splitlines() if ln.startswith("devices ")] == [NOTICE_8_4]
    assert layout(wd, 8) == dict(devices=4, processes=1, data_parallel=4, accum_steps=2,
                                 config_accum_steps=1)
    out = train(env, wd, 12, 8, "--config.train.elastic=True")
    assert [ln for ln in out.splitlines() if ln.startswith("devices ")] == [NOTICE_4_8]
    assert layout(wd, 12)["accum_steps"] == 1
    assert_close(wd, reference, 12)


@pytest.mark.slow
def test_2_processes_then_1_then_2(env, reference, capsys):
    """Process 0 and 1 each load half of each global batch; the one process alone loads it all,
    the same rows in the same order (the losses equal the 8-device run's)."""
    wd = env[0] / "elastic_212"
    train(env, wd, 4, 1, "--config.train.elastic=True", procs=2)
    assert layout(wd, 4) == dict(devices=2, processes=2, data_parallel=2, accum_steps=1,
                                 config_accum_steps=1)
    out = in_process(env, wd, 8, capsys, **{"train.elastic": True})
    assert [ln for ln in out.splitlines() if ln.startswith("devices ")] == [
        "devices 2 -> 1: accum_steps 1 -> 2, global batch 16 kept (processes 2 -> 1)"]
    out = train(env, wd, 12, 1, "--config.train.elastic=True", procs=2)
    assert [ln for ln in out.splitlines() if ln.startswith("devices ")] == [
        "devices 1 -> 2: accum_steps 2 -> 1, global batch 16 kept (processes 1 -> 2)"]
    assert_close(wd, reference, 12)
    # The goodput ledgers: the run's has the three attempts; process 1's its two.
    doc = json.load(open(wd / "goodput.json"))
    assert [a["first_step"] for a in doc["attempts"]] == [0, 4, 8]
    doc1 = json.load(open(wd / "goodput.process_1.json"))
    assert [(a["first_step"], a["status"]) for a in doc1["attempts"]] == [(0, "done"),
                                                                          (8, "done")]


def test_without_the_flag_other_devices_keep_the_config_accum_steps(env, reference, capsys):
    """Today's behaviour: the 8-device checkpoint of step 4 resumes on 1 device with accum_steps
    1 (16 rows on the one device), no notice; the losses are the 8-device run's."""
    wd = stopped_at_4(reference, env[0] / "elastic_noflag")
    out = in_process(env, wd, 6, capsys)
    assert "resumed from step 4" in out and "devices " not in out
    assert layout(wd, 6) == dict(devices=1, processes=1, data_parallel=1, accum_steps=1,
                                 config_accum_steps=1)
    assert_close(wd, reference, 6)


# ============================================================================ the arithmetic
def test_resumed_accum():
    saved8 = dict(devices=8, processes=1, data_parallel=8, accum_steps=1, config_accum_steps=1)
    now = lambda dp, p=1: dict(devices=dp, processes=p, data_parallel=dp)  # noqa: E731
    assert resumed_accum(64, 1, saved8, now(4)) == (
        2, "devices 8 -> 4: accum_steps 1 -> 2, global batch 64 kept")
    assert resumed_accum(64, 1, saved8, now(1, 1))[0] == 8
    saved4 = dict(saved8, devices=4, data_parallel=4, accum_steps=2)
    assert resumed_accum(64, 1, saved4, now(8)) == (
        1, "devices 4 -> 8: accum_steps 2 -> 1, global batch 64 kept")
    # The same layout: the accumulation it was saved with; the config's when it changed.
    assert resumed_accum(64, 1, saved4, now(4)) == (2, None)
    assert resumed_accum(64, 4, saved4, now(4)) == (4, None)
    # A checkpoint from before layouts were recorded: the config's.
    assert resumed_accum(64, 3, None, now(4)) == (3, None)
    # More devices than micro-batches: one micro-batch of fewer rows per device.
    assert resumed_accum(16, 1, dict(saved8, accum_steps=2), now(16))[0] == 1
    # Another process count on the same devices: said, accumulation unchanged.
    saved2p = dict(saved8, processes=2)
    assert resumed_accum(64, 1, saved2p, now(8, 1)) == (
        1, "devices 8 -> 8: accum_steps 1 -> 1, global batch 64 kept (processes 2 -> 1)")
    assert allowed_sizes(16, 2) == [1, 2, 4, 8, 16]
    assert allowed_sizes(24, 4) == [1, 2, 3, 6, 8, 12, 24]
    with pytest.raises(ConfigError) as e:
        resumed_accum(24, 1, dict(saved8, data_parallel=6, devices=6), now(4))
    assert str(e.value) == ("train.elastic: global batch 24 (saved on data-parallel size 6 x "
                            "accum_steps 1: 4 rows per device) cannot be split over data-parallel "
                            "size 4; allowed: data-parallel sizes [1, 2, 3, 6, 8, 12, 24]")


def test_elastic_config_checks():
    cfg = complete(base_config(), base_config())
    cfg.train.elastic = "yes"
    with pytest.raises(ConfigError, match=r"^train.elastic='yes'; allowed: True or False$"):
        check_train_config(cfg, num_devices=8)
    # A fixed mesh larger than the devices stays the mesh's one-line error.
    cfg.train.elastic, cfg.mesh.data, cfg.train.batch_size = True, 8, 16
    with pytest.raises(ShardingError, match="needs 8 devices but 4 are available"):
        check_train_config(cfg, num_devices=4)
