"""The goodput ledger (gptjax.runs.goodput): one clock whose buckets add up to the wall time, the
run directory's goodput.json across attempts, and the faults of the reliability tests landing in
their buckets on a real (tiny, in-process) run stopped by SIGTERM and resumed.

The kill -9 chain (recomputed steps, down time) and the ledger of a plain `python train.py` run
are checked on the subprocess runs of tests/test_reliability.py."""

import json
import os
import signal
import threading
import time

import pytest

import conftest
from gptjax.runs import faults, goodput
from gptjax.train.loop import train_and_evaluate


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t

    def tick(self, dt):
        self.t += dt


def assert_adds_up(record, rel=0.01):
    total = sum(record["buckets"].values())
    assert abs(total - record["wall_s"]) <= rel * record["wall_s"], (total, record)


def test_one_clock_charges_each_interval_once():
    clock = FakeClock()
    led = goodput.Ledger(started=clock() - 2.0, clock=clock)  # 2 s of start-up before the call
    with led.phase("init"):
        clock.tick(1.0)
        # JAX compiled for 0.25 s of that second (a span on this thread), and 0.5 s on another
        # thread (never charged here).
        goodput.compile_spans().on_span(goodput.COMPILE_EVENTS[-1], clock() - 0.5, clock() - 0.25)
        t = threading.Thread(target=goodput.compile_spans().on_span,
                             args=(goodput.COMPILE_EVENTS[0], clock() - 0.9, clock() - 0.4))
        t.start()
        t.join()
    for step in range(3):
        with led.waiting_for_data(step):
            clock.tick(0.1)
        clock.tick(1.0)
        with led.phase("checkpoint"):
            clock.tick(0.2)
            with led.phase("log"):  # an inner phase takes its own time
                clock.tick(0.05)
    led.base("other")
    clock.tick(0.3)
    led.close("done", 3)
    b = led.record()["buckets"]
    expect = dict(startup=2.0, init=0.75, compile=0.25, step=3.0, recompute=0.0, data=0.3,
                  checkpoint=0.6, local_checkpoint=0.0, eval=0.0, log=0.15, other=0.3)
    assert b == pytest.approx(expect, abs=1e-9)
    rec = led.record()
    assert rec["wall_s"] == pytest.approx(7.35) and rec["reached"] == 3
    assert sum(b.values()) == pytest.approx(rec["wall_s"], abs=1e-9)
    run = led.run()
    assert run["goodput"] == pytest.approx(3.0 / 7.35) and run["buckets"]["down"] == 0.0
    line = goodput.summary_line(run)
    assert line.startswith("goodput 41%: startup 27%, init 10%, checkpoint 8%, "), line
    assert line.endswith(" 1 attempt)") and "(wall 7." in line and "recompute" not in line
    m = goodput.metrics_record(run)
    assert m["goodput"] == run["goodput"] and m["goodput/compile"] == pytest.approx(0.25 / 7.35)
    with pytest.raises(ValueError, match="no ledger bucket 'steps'; allowed: .*'step'"):
        led.base("steps")


def _train(clock, ledger, steps):
    """Steps of 0.51 s each on the fake clock: 0.01 s waiting for data, then 0.5 s of step."""
    for step in steps:
        with ledger.waiting_for_data(step):
            clock.tick(0.01)
        clock.tick(0.5)


def test_attempts_down_time_and_recomputed_steps(tmp_path):
    # Attempt 1 runs steps 0-7, heartbeats before the checkpoint of step 8, and is killed.
    clock = FakeClock()
    a1 = goodput.Ledger(clock=clock).open(str(tmp_path), 0, restored=False)
    _train(clock, a1, range(8))
    a1.heartbeat(force=True, reached=8)
    killed_at = clock()
    clock.tick(3.0)  # (it dies 3 s after its last record)
    # Attempt 2 starts 10 s after that record, resumes from the checkpoint of step 4.
    clock.tick(7.0)
    a2 = goodput.Ledger(clock=clock).open(str(tmp_path), 4, restored=True)
    _train(clock, a2, range(4, 12))
    a2.close("done", 12)
    doc = goodput.load(str(tmp_path))
    first, second = doc["attempts"]
    assert first["status"] == "killed" and first["end"] == killed_at and first["reached"] == 8
    assert second["status"] == "done" and second["first_step"] == 4
    assert second["down_s"] == pytest.approx(10.0) and second["recomputed_steps"] == 4
    assert second["buckets"]["recompute"] == pytest.approx(4 * 0.5)
    assert second["buckets"]["step"] == pytest.approx(4 * 0.5)
    for a in doc["attempts"]:
        assert_adds_up(a, rel=1e-9)
    run = doc["run"]
    assert run["wall_s"] == pytest.approx(second["end"] - first["start"])
    assert sum(run["buckets"].values()) == pytest.approx(run["wall_s"], rel=1e-9)
    assert run["buckets"]["down"] == pytest.approx(10.0) and run["recomputed_steps"] == 4
    text = goodput.report(doc, "r")
    assert "2 attempt(s), steps 0->8, 4->12, 4 recomputed" in text and "#1 killed" in text
    assert text.splitlines()[-1] == goodput.summary_line(run)
    # A run that starts afresh (no checkpoint) over a finished run's ledger starts a new one.
    a3 = goodput.Ledger(clock=clock).open(str(tmp_path), 0, restored=False)
    assert a3.history == [] and goodput.load(str(tmp_path))["run"]["attempts"] == 1
    with pytest.raises(FileNotFoundError, match="no goodput.json in .*nope; allowed: a train"):
        goodput.load(str(tmp_path / "nope"))


def test_a_kill_between_saves_shows_the_lost_steps_as_recomputed(tmp_path):
    # Attempt 1 saves at step 4, trains on to step 20 (its heartbeats, at most every 5 s,
    # record how far it got) and is killed between saves; attempt 2 resumes from step 4.
    clock = FakeClock()
    a1 = goodput.Ledger(clock=clock).open(str(tmp_path), 0, restored=False)
    _train(clock, a1, range(4))
    a1.heartbeat(force=True, reached=4)  # (the checkpoint of step 4)
    _train(clock, a1, range(4, 20))
    reached = goodput.load(str(tmp_path))["attempts"][0]["reached"]
    assert 10 <= reached < 20, reached  # the last heartbeat's step, not the last save's
    clock.tick(2.0)
    a2 = goodput.Ledger(clock=clock).open(str(tmp_path), 4, restored=True)
    _train(clock, a2, range(4, 24))
    a2.close("done", 24)
    second = goodput.load(str(tmp_path))["attempts"][1]
    assert second["recomputed_steps"] == reached - 4
    assert second["buckets"]["recompute"] == pytest.approx((reached - 4) * 0.51, rel=0.05)


class SlowAndStopping(faults.EnvFaults):
    """GPTJAX_FAULT_DATA_SLEEP_S and _SAVE_SLEEP_S's faults (a slow data source, blocking
    saves), counted, and (first attempt) a SIGTERM after step `stop_at`."""

    def __init__(self, data_s, save_s, stop_at=None):
        super().__init__({faults.PREFIX + "DATA_SLEEP_S": str(data_s),
                          faults.PREFIX + "SAVE_SLEEP_S": str(save_s)})
        self.stop_at = stop_at
        self.fetches = self.saves = self.steps = 0

    def before_batch(self, step):
        self.fetches += 1
        super().before_batch(step)

    def after_save_started(self, step, directory):
        self.saves += 1
        super().after_save_started(step, directory)

    def after_step(self):
        self.steps += 1
        if self.steps == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_faults_land_in_their_buckets_over_sigterm_and_resume(tmp_path, capsys):
    cfg = conftest.tiny_run_config(conftest.tiny_corpus(tmp_path), tmp_path,
                                   {"train.eval_every": 4, "train.eval_batches": 1})
    wd = str(tmp_path / "run")
    hooks, walls = [], []
    for stop_at in (6, None):
        hooks.append(SlowAndStopping(0.05, 0.3, stop_at))
        faults.install(hooks[-1])
        try:
            t0 = time.time()
            result = train_and_evaluate(cfg, wd, progress=False)
            walls.append((t0, time.time()))
        finally:
            faults.install(None)
    assert result.step == 12 and hooks[0].steps == 6 and hooks[0].data_sleep_s == 0.05
    out = capsys.readouterr().out
    doc = json.load(open(os.path.join(wd, "goodput.json")))
    assert [a["status"] for a in doc["attempts"]] == ["preempted", "done"]
    for a, h, (t0, t1) in zip(doc["attempts"], hooks, walls):
        assert_adds_up(a)
        # The ledger's attempt is the call, as measured here.
        assert t0 <= a["start"] <= a["end"] <= t1 and a["wall_s"] >= 0.99 * (t1 - t0), (a, t1 - t0)
        b = a["buckets"]
        assert b["data"] >= 0.05 * h.fetches and b["checkpoint"] >= 0.3 * h.saves, (b, h.saves)
        assert h.saves >= 1 and b["compile"] > 0 and b["step"] > 0 and b["eval"] > 0
        assert b["init"] > 0 and b["log"] > 0 and b["recompute"] == 0
    first, second = doc["attempts"]
    assert (first["first_step"], first["reached"]) == (0, 6) and second["first_step"] == 6
    assert second["down_s"] == pytest.approx(walls[1][0] - first["end"], abs=0.05)
    run = doc["run"]
    assert sum(run["buckets"].values()) == pytest.approx(run["wall_s"], rel=1e-9)
    assert abs(run["wall_s"] - (walls[1][1] - walls[0][0])) <= 0.01 * run["wall_s"]
    assert goodput.summary_line(run) in out
    # metrics.jsonl (and TensorBoard) carry the run's ledger when each attempt ends.
    recs = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    ledgers = [r for r in recs if "goodput" in r]
    assert [r["step"] for r in ledgers] == [6, 12]
    assert all(0 < r["goodput"] < 1 for r in ledgers)
    assert sum(ledgers[-1][f"goodput/{k}"] for k in run["buckets"]) == pytest.approx(1.0)
    # eval.py --mode=goodput's work: the table and the plot.
    from gptjax.eval.run import run_goodput  # heavy: the eval stack
    pngs = run_goodput([wd], str(tmp_path / "out"))
    assert pngs == [str(tmp_path / "out" / "goodput_run.png")] and os.path.getsize(pngs[0]) > 1000
    text = capsys.readouterr().out
    assert "#1 preempted" in text and "#2 done" in text and goodput.summary_line(run) in text
