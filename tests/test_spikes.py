"""The loss-spike guard (gptjax.train.spikes, `train.spike_guard`): its statistic, the step's
skip, recording, halting, and the end-to-end run that skips an injected spike and, resumed from a
checkpoint before it on clean data, skips the recorded batch again.

"Losses equal to a run that never saw the batch" is defined as: equal, bit for bit, to a run
whose update at that step was skipped by the same mechanism (its loss computed, its parameters
and optimizer state kept, the step count, schedule and data position going on). Batches are a
pure function of the step, so such a run trains on every other batch exactly as the spiked run.
"""

import json
import math
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_run_config, train_flags
from gptjax.config import ConfigError, GPTConfig
from gptjax.defaults import base_config
from gptjax.runs import faults
from gptjax.train import spikes
from gptjax.train.experiment import check_train_config
from gptjax.train.loop import train_and_evaluate
from gptjax.train.optim import make_optimizer
from gptjax.train.step import TrainState, make_train_step
from gptjax.nn.model import init_params

DATA = {"seed": 0, "mode": "packed", "fingerprint": "f", "seq_len": 32, "global_batch_size": 4}


def guard(tmp_path=None, mode="zscore", threshold=3.0, window=3, max_spikes=2, data_state=DATA,
          **kw):
    return spikes.SpikeGuard(mode, threshold, window, max_spikes,
                             workdir=str(tmp_path) if tmp_path else "", data_state=data_state,
                             **kw)


def feed(g, losses, first=0):
    for i, v in enumerate(losses, first):
        g.observe(i, {"loss": v, "spike": 0, "skipped": 0})


# ============================================================================ the statistic
def test_limit_uses_the_window_of_steps_up_to_two_before():
    g = guard(mode="median", threshold=2.0)
    feed(g, [5.0, 3.0, 4.0, 1.0])  # steps 0..3
    assert g.limit(3) == math.inf  # steps <= 1: two losses, the window is 3
    assert g.limit(4) == 2.0 * 4.0  # steps 0..2: median 4
    assert g.limit(5) == 2.0 * 3.0  # steps 1..3: median 3 (step 0 left the window)
    z = guard(threshold=3.0)
    feed(z, [2.0, 2.2, 2.4])
    x = np.array([2.0, 2.2, 2.4])
    assert z.limit(4) == pytest.approx(x.mean() + 3 * x.std(), rel=1e-12)
    flat = guard(threshold=3.0)
    feed(flat, [2.0, 2.0, 2.0])  # std 0: taken as 1% of the mean
    assert flat.limit(4) == pytest.approx(2.0 + 3 * 0.02, rel=1e-12)
    assert np.float32(flat.args(4)[0]) == np.float32(flat.limit(4))


def test_skipped_and_spiked_losses_stay_out_of_the_window(tmp_path):
    g = guard(tmp_path)
    feed(g, [2.0, 2.1, 2.2])
    g.observe(3, {"loss": float("nan"), "spike": 0, "skipped": 1})
    g.observe(4, {"loss": 9.0, "spike": 1, "skipped": 0})
    assert [s for s, _ in g.history] == [0, 1, 2]
    assert g.limit(6) == g.limit(4)


def test_meta_round_trip_decides_as_the_uninterrupted_run(tmp_path):
    a = guard(tmp_path, window=4)
    rng = np.random.default_rng(0)
    losses = list(3 + 0.1 * rng.standard_normal(20))
    feed(a, losses[:11])
    a.observe(11, {"loss": 50.0, "spike": 1, "skipped": 0})
    saved = json.loads(json.dumps(a.meta()))[spikes.META_KEY]  # as a checkpoint stores it
    b = guard(tmp_path, window=4, start=12, saved=saved)
    assert b.counted == [11] and b.recorded == set()  # its own spike is in the past
    feed(a, losses[12:], 12)
    feed(b, losses[12:], 12)
    assert [a.limit(k) for k in range(12, 22)] == [b.limit(k) for k in range(12, 22)]


def test_a_mixture_weight_change_starts_the_window_again():
    """A lasting rise where data.mixture_schedule changes the weights is a new level, not a
    spike: the window restarts there (limit +inf until it is full); elsewhere the same rise is
    a spike at every step, as the halt's hint says."""
    rng = np.random.default_rng(0)
    losses = [3.0 + 0.01 * x for x in rng.standard_normal(40)] + [3.25] * 20
    def limits(resets):
        g = guard(window=8, threshold=6.0, max_spikes=0, resets=resets)
        out = []
        for k, v in enumerate(losses):
            out.append(g.limit(k))
            spike = int(v > out[-1])
            g.observe(k, {"loss": v, "spike": spike, "skipped": 0})
        return out
    plain, reset = limits(()), limits((40,))
    assert all(losses[k] > plain[k] for k in range(40, 60))  # every step after the rise
    assert all(reset[k] == math.inf for k in range(40, 49))  # until 8 losses of the new phase
    assert reset[49] < math.inf
    assert all(losses[k] <= reset[k] for k in range(40, 60))
    assert reset[:40] == plain[:40]


def test_records_survive_a_mixture_phase_added_on_resume(tmp_path):
    state = dict(DATA, mixture_schedule=[[0, [0.5, 0.5]]])
    g = guard(tmp_path, data_state=state)
    feed(g, [2.0, 2.1, 2.2])
    g.observe(4, {"loss": 9.0, "spike": 1, "skipped": 0})
    later = dict(DATA, mixture_schedule=[[0, [0.5, 0.5]], [9, [0.9, 0.1]]])
    assert guard(tmp_path, data_state=later, start=2).recorded == {4}
    assert guard(tmp_path, data_state=dict(later, seed=1), start=2).recorded == set()


# ============================================================================ record and halt
def test_spikes_are_recorded_then_halt_and_recorded_batches_are_skipped_again(tmp_path, capsys):
    g = guard(tmp_path, max_spikes=2)
    feed(g, [2.0, 2.1, 2.2])
    g.observe(4, {"loss": 9.0, "spike": 1, "skipped": 0})
    assert g.halt is None
    g.observe(6, {"loss": 8.0, "spike": 1, "skipped": 0})  # 2 within 3 steps
    assert g.halt.startswith("2 loss spikes within 3 steps (steps 5, 7; train.spike_max=2)")
    assert "\n" not in g.halt and "resume with a higher train.spike_threshold" in g.halt
    recs = spikes.read_records(str(tmp_path))
    assert [(r["step"], r["loss"], r["data"]) for r in recs] == [
        (5, 9.0, dict(DATA, step=4)), (7, 8.0, dict(DATA, step=6))]
    assert "warning: step 5: loss 9 above the spike limit" in capsys.readouterr().err
    # A run resumed at step 3 skips both (limit -inf) without counting or recording them again.
    r = guard(tmp_path, max_spikes=2, start=3)
    assert r.recorded == {4, 6} and r.limit(4) == -math.inf and r.limit(5) != -math.inf
    assert "skipping the 2 batch(es)" in capsys.readouterr().out
    for step in (4, 6):
        r.observe(step, {"loss": 2.0, "spike": 1, "skipped": 0})
    assert r.halt is None and r.counted == [] and len(spikes.read_records(str(tmp_path))) == 2
    # One resumed after them does not skip them; spikes too far apart never halt.
    assert guard(tmp_path, start=7).recorded == set()
    far = guard(max_spikes=2)
    for step in (4, 8, 12):
        far.observe(step, {"loss": 9.0, "spike": 1, "skipped": 0})
    assert far.halt is None and far.counted == [12]


def test_spike_records_are_checked(tmp_path, capsys):
    (tmp_path / spikes.SPIKES).write_text('{"step": 3}\n{"step": 5, "data": {"seed": 1}}\n')
    assert guard(tmp_path).recorded == {2}  # the other data's record is left out, with a warning
    assert "1 record(s) of other data" in capsys.readouterr().err
    (tmp_path / spikes.SPIKES).write_text('{"step": 0}\n')
    with pytest.raises(ValueError, match=r"spikes.jsonl line 1: .*integer 'step' >= 1"):
        guard(tmp_path)


@pytest.mark.parametrize("key, value, fragment", [
    ("spike_guard", "mean", "train.spike_guard='mean'"),
    ("spike_threshold", -1.0, "train.spike_threshold=-1.0"),
    ("spike_window", 0, "train.spike_window=0"),
    ("spike_max", -1, "train.spike_max=-1"),
])
def test_bad_guard_config_is_one_line(key, value, fragment):
    c = base_config()
    c.data.path = "x.txt"
    c.train[key] = value
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        check_train_config(c, num_devices=1)
    c = base_config()
    c.data.path = "x.txt"
    c.train.spike_guard, c.train.spike_threshold = "median", 1.0
    with pytest.raises(ConfigError, match=r"spike_threshold=1.0 would skip .*allowed: > 1"):
        check_train_config(c, num_devices=1)
    c.train.spike_guard, c.train.spike_threshold = "zscore", 0.0
    with pytest.raises(ConfigError, match=r"spike_threshold=0.0 would skip .*allowed: > 0"):
        check_train_config(c, num_devices=1)


# ============================================================================ the step
def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                                                    jax.tree.leaves(jax.device_get(b))))


def test_step_skips_a_spike_and_is_unchanged_below_the_limit():
    cfg = GPTConfig(vocab_size=32, n_ctx=8, n_layer=1, n_head=2, n_embd=16, embd_pdrop=0.0,
                    attn_pdrop=0.0, resid_pdrop=0.0)
    tx, sched = make_optimizer(base_config().optim, 1000)
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(1).integers(0, 32, (4, 9)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    off = jax.jit(make_train_step(cfg, tx, sched))
    on = jax.jit(make_train_step(cfg, tx, sched, spike_guard=True))
    rng = jax.random.key(2)
    # After one step the learning rate is > 0 (warmup starts at 0). Nothing is donated: every
    # call below starts from this state.
    state, _ = off(TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), batch, rng)
    params = state.params
    s_off, m_off = off(state, batch, rng)
    s_on, m_on = on(state, batch, rng, np.float32(np.inf))
    assert _same(s_off, s_on) and m_on["loss"] == m_off["loss"] and m_on["spike"] == 0
    assert "spike" not in m_off and not _same(s_off.params, params)
    loss = np.float32(m_off["loss"])
    s_sp, m_sp = on(state, batch, rng, np.nextafter(loss, np.float32(0)))  # just below it
    assert m_sp["spike"] == 1 and m_sp["skipped"] == 0 and int(s_sp.step) == 2
    assert _same((s_sp.params, s_sp.opt_state), (params, state.opt_state))
    _, m_eq = on(state, batch, rng, loss)  # above, not at, the limit
    assert m_eq["spike"] == 0
    # Under nonfinite='halt' a spike is skipped too; a NaN loss is non-finite, not a spike.
    halt = jax.jit(make_train_step(cfg, tx, sched, nonfinite="halt", spike_guard=True))
    s_h, m_h = halt(state, batch, rng, np.float32(-np.inf))
    assert m_h["spike"] == 1 and _same(s_h.params, params)
    nan = dict(batch, weights=np.full(batch["targets"].shape, np.nan, np.float32))
    _, m_n = halt(state, nan, rng, np.float32(-np.inf))
    assert m_n["spike"] == 0 and m_n["skipped"] == 1


# ============================================================================ a run (in process)
def test_too_many_spikes_halt_then_the_same_command_skips_them(env):
    """Spikes injected at steps 6 and 7 (1-based) with spike_max=2: the run stops with one line
    after the second, its last checkpoint step 4; the same run again resumes from 4, skips both
    recorded batches (spike=1 in the log, nothing recorded again) and finishes."""
    tmp = env[0]
    wd = tmp / "spike_halt"
    c = tiny_run_config(tmp / "corpus.txt", tmp, {
        "train.spike_guard": "zscore", "train.spike_threshold": 2.0, "train.spike_window": 3,
        "train.spike_max": 2})
    faults.install(faults.EnvFaults({"GPTJAX_FAULT_SPIKE_STEP": "5,6"}))
    try:
        with pytest.raises(FloatingPointError) as e:
            train_and_evaluate(c, str(wd), progress=False)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(
            "2 loss spikes within 3 steps (steps 6, 7; train.spike_max=2): the run stopped")
        assert msg.endswith("the last good checkpoint is step 4")
        recs = spikes.read_records(str(wd))
        assert [r["step"] for r in recs] == [6, 7] and all(r["loss"] > r["limit"] for r in recs)
        result = train_and_evaluate(c, str(wd), progress=False)
    finally:
        faults.install(None)
    assert result.step == 12 and math.isfinite(result.val_loss)
    log = {r["step"]: r for r in map(json.loads, open(wd / "metrics.jsonl")) if "loss" in r}
    assert sorted(log) == list(range(1, 13))
    assert [s for s in log if log[s]["spike"]] == [6, 7]
    assert len(spikes.read_records(str(wd))) == 2


# ============================================================================ end to end
def test_spike_is_skipped_recorded_and_skipped_again_after_resume(env, tiny_run):
    """train.py with a spike injected at step 7 (1-based) is SIGTERMed after it; rolled back to
    its checkpoint of step 4 (later ones removed) and run again with the same command on clean
    data, it skips the recorded batch 7 though its loss is ordinary now. Both runs log the same
    losses after the spike, bit for bit; before it, under a finite limit from step 5 on, the
    losses of the reference run (conftest's tiny run, whose 128-step window never fills)."""
    tmp = env[0]
    wd = tmp / "spike_run"
    args = train_flags(tmp, wd, "--config.train.spike_guard=zscore",
                       "--config.train.spike_threshold=3", "--config.train.spike_window=3")
    err = open(tmp / "spike_run.err", "w+")
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=err, text=True, env=dict(
                             env[1], GPTJAX_FAULT_SPIKE_STEP="6", GPTJAX_FAULT_STEP_SLEEP_S="0.4"))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (wd / "metrics.jsonl").exists() and any(
                json.loads(x).get("step", 0) >= 7 for x in open(wd / "metrics.jsonl")):
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    err.seek(0)
    text = err.read()
    assert p.returncode == 0 and "Traceback" not in text, text[-3000:]
    assert "warning: step 7: loss " in text and "update skipped; recorded in" in text
    stopped = int(out.split("SIGTERM: stopped after step ")[1].split()[0])
    assert 8 <= stopped < 12
    first = _losses(wd)
    ref = _losses(tiny_run[0])
    assert [first[s]["loss"] for s in range(1, 7)] == [ref[s]["loss"] for s in range(1, 7)]
    assert first[7]["spike"] == 1 and first[7]["skipped"] == 0
    assert not any(first[s]["spike"] for s in first if s != 7)
    (rec,) = spikes.read_records(str(wd))
    assert rec["step"] == 7 and rec["loss"] == first[7]["loss"] > rec["limit"]
    assert rec["data"]["step"] == 6 and rec["data"]["fingerprint"]

    for d in (wd / "checkpoints").iterdir():  # roll back to step 4
        if d.name.isdigit() and int(d.name) > 4:
            shutil.rmtree(d)
    r = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=env[1])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "steps 4->12" in r.stdout and "skipping the 1 batch(es)" in r.stdout
    second = _losses(wd)
    assert sorted(second) == list(range(1, 13))
    # Step 7's clean batch: the reference's loss (same state, same batch), below the recorded
    # limit, and skipped all the same.
    assert [second[s]["loss"] for s in range(1, 8)] == [ref[s]["loss"] for s in range(1, 8)]
    assert second[7]["loss"] < rec["limit"] and second[7]["spike"] == 1
    for s in range(8, stopped + 1):
        assert second[s]["loss"] == first[s]["loss"], (s, second[s], first[s])
    assert second[8]["loss"] != ref[8]["loss"]  # the skip mattered
    assert len(spikes.read_records(str(wd))) == 1
    assert math.isfinite(json.load(open(wd / "summary.json"))["val_loss"])


def _losses(workdir):
    recs = [json.loads(x) for x in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r for r in recs if "loss" in r}
