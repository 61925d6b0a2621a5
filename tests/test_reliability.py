"""Reliability, end to end through the entry scripts: preemption, kill -9 mid-save, non-finite
steps, damaged or foreign checkpoints, bad config/flags/data, and fuzzed prompts and task rows.

Every case runs train.py / sample.py in a subprocess (faults injected with gptjax.runs.faults'
environment variables) and checks the exit status, the one-line `error:` message (never a
traceback) and, where a run continues, that its losses equal an uninterrupted run's bit for bit.
"""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_RUN, train_flags
from gptjax.data.tasks import load_task
from gptjax.runs import goodput

STEPS = TINY_RUN["train.steps"]


def run(env, script, args, faults=None, **kw):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(env[1], **(faults or {})), **kw)


def assert_one_line_error(r, *fragments, status=2):
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == status and len(errors) == 1, (r.returncode, r.stderr[-3000:])
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def losses(workdir):
    recs = [json.loads(x) for x in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r for r in recs if "loss" in r}


def steps(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def truncate_step(workdir, step):
    for f in (pathlib.Path(workdir) / "checkpoints" / str(step) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 16 and "d" in f.parent.name:
            with open(f, "r+b") as fh:
                fh.truncate(8)


@pytest.fixture(scope="module")
def reference(tiny_run):
    """An uninterrupted run (conftest's tiny run): the losses every interrupted run must
    reproduce exactly."""
    wd = tiny_run[0]
    assert sorted(losses(wd)) == list(range(1, STEPS + 1)) and steps(wd)[-1] == STEPS
    return wd


# Seconds between a train.py process's last ledger record and its exit as this test sees it, at
# most: its atexit functions and the exit itself (0.12-0.31 s measured on the 2-core host; train.py
# skips the interpreter's 1.1-1.5 s teardown of its modules, gptjax.cli.exit_without_teardown).
# The ledger cannot see them; the next attempt counts them as down time.
TEARDOWN_S = 1.0


def assert_ledger(workdir, walls, statuses):
    """goodput.json of `workdir`: one attempt per process run, each inside the wall time this
    test measured around it (`walls`: (t0, t1)), and its buckets (and the run's) adding up to
    its wall time within 1%. Returns the ledger."""
    doc = json.load(open(pathlib.Path(workdir) / "goodput.json"))
    attempts, run = doc["attempts"], doc["run"]
    assert [a["status"] for a in attempts] == statuses
    for a, (t0, t1) in zip(attempts, walls):
        assert abs(sum(a["buckets"].values()) - a["wall_s"]) <= 0.01 * a["wall_s"], a
        # It starts when the process does (not when gptjax is imported, 1-2 s later).
        assert abs(a["start"] - t0) <= 0.5 and a["end"] <= t1, (a, t0, t1)
        if a["status"] != "killed":  # (a killed one ends at its last heartbeat)
            assert t1 - a["end"] <= TEARDOWN_S, (a, t1)
    assert abs(sum(run["buckets"].values()) - run["wall_s"]) <= 0.01 * run["wall_s"], run
    assert -0.5 <= walls[-1][1] - walls[0][0] - run["wall_s"] <= TEARDOWN_S + 0.5
    return doc


def assert_same_run(workdir, reference, from_step=1):
    a, b = losses(reference), losses(workdir)
    assert sorted(b) == list(range(1, STEPS + 1))
    for s in range(from_step, STEPS + 1):
        assert a[s]["loss"] == b[s]["loss"], (s, a[s]["loss"], b[s]["loss"])
    fa = json.load(open(reference / "summary.json"))
    fb = json.load(open(pathlib.Path(workdir) / "summary.json"))
    assert fa["val_loss"] == fb["val_loss"]


# ============================================================================ faults mid-run
def test_kill9_mid_save_then_sigterm_then_resume_bit_exact(env, reference):
    wd = env[0] / "chain"
    walls = [[time.time()]]  # (start, end) of each process, for the goodput ledger
    # 1. SIGKILL while the checkpoint of step 8 is being written (async, not yet finalized).
    r = run(env, "train.py", train_flags(env[0], wd), {"GPTJAX_FAULT_KILL_IN_SAVE": "8"})
    walls[-1].append(time.time())
    assert r.returncode == -signal.SIGKILL
    ckpts = wd / "checkpoints"
    assert (ckpts / "8.orbax-checkpoint-tmp").is_dir() and 8 not in steps(wd), os.listdir(ckpts)
    assert steps(wd)[-1] == 4

    # 2. Restart (it resumes from step 4, the last complete one); SIGTERM it mid-training.
    out = open(env[0] / "chain.out", "w+")
    walls.append([time.time()])
    p = subprocess.Popen([sys.executable, "train.py", *train_flags(env[0], wd)], cwd=REPO,
                         stdout=out, stderr=subprocess.PIPE, text=True,
                         env=dict(env[1], GPTJAX_FAULT_STEP_SLEEP_S="0.4"))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        out.seek(0)
        if "steps 4->12" in out.read() and any(
                json.loads(x).get("step", 0) >= 6 for x in open(wd / "metrics.jsonl")):
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    walls[-1].append(time.time())
    out.seek(0)
    text = out.read()
    assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "removed the incomplete checkpoint save(s) ['8.orbax-checkpoint-tmp']" in err
    assert "SIGTERM: finishing the current step" in err
    stopped = int(text.split("SIGTERM: stopped after step ")[1].split()[0])
    assert 6 <= stopped < STEPS and steps(wd)[-1] == stopped
    assert not (wd / "summary.json").exists()  # it stopped; no final evaluation

    # 3. The same command again finishes the run exactly as the uninterrupted one did.
    walls.append([time.time()])
    r = run(env, "train.py", train_flags(env[0], wd))
    walls[-1].append(time.time())
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"steps {stopped}->12" in r.stdout
    assert_same_run(wd, reference)

    # The goodput ledger: the killed attempt's last record was written before the save of step
    # 8; the next one, after some down time, ran again the steps from 4 that the first had run;
    # the third one those beyond the second's save: steps 4-7 recomputed in all.
    doc = assert_ledger(wd, walls, ["killed", "preempted", "done"])
    killed, stopped_one, last = doc["attempts"]
    assert (killed["first_step"], killed["reached"]) == (0, 8)
    assert (stopped_one["first_step"], stopped_one["reached"]) == (4, stopped)
    assert stopped_one["recomputed_steps"] == min(stopped, 8) - 4
    assert stopped_one["buckets"]["recompute"] > 0
    assert stopped_one["down_s"] >= walls[1][0] - walls[0][1] - 0.1 and stopped_one["down_s"] > 0
    assert last["recomputed_steps"] == max(0, 8 - stopped) and last["first_step"] == stopped
    assert goodput.summary_line(doc["run"]) in r.stdout.splitlines()
    assert doc["run"]["buckets"]["down"] > 0 and doc["run"]["recomputed_steps"] == 4


def test_ledger_of_a_plain_run(tiny_run):
    """The uninterrupted train.py run's goodput ledger: one attempt whose buckets add up to its
    wall time, each phase in its bucket, the one-line summary printed and logged."""
    wd, stdout = tiny_run
    doc = json.load(open(wd / "goodput.json"))
    (a,) = doc["attempts"]
    assert a["status"] == "done" and (a["first_step"], a["reached"]) == (0, STEPS)
    assert abs(sum(a["buckets"].values()) - a["wall_s"]) <= 0.01 * a["wall_s"], a
    b = a["buckets"]
    for k in ("startup", "compile", "step", "data", "checkpoint", "eval", "log"):
        assert b[k] > 0, (k, b)
    assert b["recompute"] == 0 and a["down_s"] == 0 and a["compiles"] >= 3
    assert b["other"] <= 0.05 * a["wall_s"], b  # the phases claim nearly everything
    line = [x for x in stdout.splitlines() if x.startswith("goodput ")]
    assert line == [goodput.summary_line(doc["run"])]
    last = json.loads(open(wd / "metrics.jsonl").readlines()[-1])
    assert last["step"] == STEPS and last["goodput"] > 0


def test_nonfinite_halt_keeps_last_good_checkpoint_then_skip(env, reference):
    wd = env[0] / "nan"
    nan = {"GPTJAX_FAULT_NAN_STEP": "5"}  # 0-based: the 6th step's loss is NaN
    r = run(env, "train.py", train_flags(env[0], wd, "--config.train.nonfinite=halt"), nan)
    assert_one_line_error(r, "non-finite loss or gradients at step 6",
                          "the last good checkpoint is step 4")
    assert steps(wd)[-1] == 4
    # Resumed with 'skip': the NaN step is skipped, counted and logged, and training goes on.
    r = run(env, "train.py", train_flags(env[0], wd, "--config.train.nonfinite=skip"), nan)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "warning: step 6: non-finite loss or gradients, update skipped (1 skipped" in r.stderr
    got, ref = losses(wd), losses(reference)
    assert [got[s]["loss"] for s in range(1, 6)] == [ref[s]["loss"] for s in range(1, 6)]
    assert got[6]["skipped"] == 1 and got[6]["loss"] != got[6]["loss"]  # NaN
    assert all(got[s]["skipped_steps"] == 1 for s in range(6, STEPS + 1))
    assert all(got[s]["loss"] < 10 for s in range(7, STEPS + 1))
    assert json.load(open(wd / "summary.json"))["skipped_steps"] == 1


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(env, reference):
    """JAX's preemption sync point: only process 1 gets SIGTERM; both save the same step. Up to
    there the two processes log the losses of the one-process reference run (the same schedule:
    conftest's optim.decay_steps is fixed), within 1e-5 relative."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wd = env[0] / "two"
    args = train_flags(env[0], wd, "--config.train.steps=40", f"--coordinator_address=127.0.0.1:"
                       f"{port}", "--num_processes=2")
    procs = [subprocess.Popen([sys.executable, "train.py", *args, f"--process_id={i}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env[1], GPTJAX_FAULT_STEP_SLEEP_S="0.3"))
             for i in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (wd / "metrics.jsonl").exists() and len(open(wd / "metrics.jsonl").readlines()) >= 6:
            break
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    stopped = int(outs[0][0].split("SIGTERM: stopped after step ")[1].split()[0])
    assert 6 <= stopped < 40 and steps(wd)[-1] == stopped
    two, one = losses(wd), losses(reference)
    assert sorted(two) == list(range(1, stopped + 1))
    for s in range(1, min(stopped, STEPS) + 1):
        assert abs(two[s]["loss"] - one[s]["loss"]) <= 1e-5 * abs(one[s]["loss"]), (s, two, one)
    # Each process wrote the checksums of its own files (gptjax.runs.integrity).
    for i in range(2):
        assert (wd / "checkpoints" / str(stopped) / f"checksums.process_{i}.json").is_file()


# ============================================================================ restore checks
def test_damaged_latest_checkpoint(env, reference):
    wd = env[0] / "damaged"
    shutil.copytree(reference, wd)
    truncate_step(wd, 12)
    r = run(env, "sample.py", [f"--workdir={wd}", "--prompt=to be", "--max_new_tokens=4"])
    assert_one_line_error(r, "checkpoint step 12", "damaged or truncated", "step=8")
    r = run(env, "sample.py", [f"--workdir={wd}", "--prompt=to be", "--max_new_tokens=4",
                               "--step=8"])
    assert r.returncode == 0 and r.stdout.startswith("to be"), r.stderr[-2000:]
    r = run(env, "sample.py", [f"--workdir={wd}", "--prompt=to be", "--step=5"])
    assert_one_line_error(r, "no checkpoint step 5", "allowed: [")
    # Training sets the damaged step aside, says so, resumes from 8 and ends as the reference.
    r = run(env, "train.py", train_flags(env[0], wd))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "is damaged or truncated" in r.stderr and "12.damaged" in r.stderr
    assert "steps 8->12" in r.stdout and (wd / "checkpoints" / "12.damaged").is_dir()
    assert_same_run(wd, reference)


def test_checkpoint_of_another_run_is_refused(env, reference):
    wd = env[0] / "foreign"
    shutil.copytree(reference, wd)
    before = (wd / "model_config.json").read_text()
    r = run(env, "train.py", train_flags(env[0], wd, "--config.model.n_embd=64"))
    assert_one_line_error(r, "another architecture", "n_embd 32 there, 64 here")
    assert (wd / "model_config.json").read_text() == before  # the refused run changed nothing
    # Another tokenizer with the same vocabulary size: two characters swapped.
    tok = json.loads((wd / "tokenizer" / "tokenizer.json").read_text())
    text = json.dumps(tok)
    chars = tok.get("chars") or tok.get("settings", {}).get("chars")
    assert chars, tok
    swapped = chars[1] + chars[0] + chars[2:]
    (wd / "tokenizer" / "tokenizer.json").write_text(text.replace(json.dumps(chars),
                                                                  json.dumps(swapped)))
    r = run(env, "sample.py", [f"--workdir={wd}", "--prompt=to be", "--max_new_tokens=4"])
    assert_one_line_error(r, "another tokenizer", "fingerprint")
    r = run(env, "train.py", train_flags(env[0], wd))
    assert_one_line_error(r, "another tokenizer")
    shutil.rmtree(wd / "checkpoints")
    r = run(env, "sample.py", [f"--workdir={wd}", "--prompt=to be"])
    assert_one_line_error(r, "no checkpoint in")


# ============================================================================ config and flags
@pytest.mark.parametrize("flags, fragments", [
    (["--config.train.bogus=1"], ["'train.bogus' is not a key", "'steps'"]),
    (["--config.trian.steps=1"], ["'trian' is not a key", "'train'"]),
    (["--config.train.batch_size=abc"], ["batch_size=abc"]),
    (["--config.train.nonfinite=maybe"], ["train.nonfinite='maybe'", "['skip', 'halt']"]),
    (["--config.optim.learning_rate=-1"], ["optim.learning_rate=-1", "> 0"]),
    (["--config.model.n_head=3"], ["n_head=3", "not divisible"]),
    (["--config.train.batch_size=6", "--config.train.accum_steps=4"],
     ["train.batch_size=6", "multiples of 4"]),
    (["--config.mesh.data=4"], ["needs 4 devices", "1 are available"]),
    (["--config.data.seq_len=64"], ["data.seq_len=64", "position table"]),
    (["--config.lora.rank=4"], ["lora.rank=4", "init.kind to 'hf' or 'workdir'"]),
])
def test_bad_config_is_one_line_before_any_work(env, flags, fragments):
    tmp = env[0]
    wd = tmp / "badcfg"
    args = train_flags(tmp, wd, *flags)
    args = [a.replace(f"{tmp}/tfds", f"{tmp}/tfds_untouched") for a in args]
    assert_one_line_error(run(env, "train.py", args), *fragments)
    assert not (tmp / "tfds_untouched").exists()  # failed before reading any data


def test_missing_config_file(env):
    r = run(env, "train.py", ["--config=configs/no_such_config.py", "--workdir=/nonexistent"])
    assert_one_line_error(r, "no_such_config.py", "cannot load the config file")


# ============================================================================ data
@pytest.mark.parametrize("content, extra, fragments", [
    (b"", [], ["empty corpus"]),
    (b"to be", [], ["shorter than one sequence"]),
    (b"to be or not\n" * 50 + b"\xff\xfe\xc3\x28 bad bytes\n", [], ["not valid utf-8", "byte"]),
    (b"to be or not\n" * 60, ["--config.data.validation_fraction=0.02"],
     ["'validation' split has", "shorter than one sequence"]),
])
def test_bad_corpus_is_one_line(env, tmp_path, content, extra, fragments):
    (tmp_path / "c.txt").write_bytes(content)
    args = train_flags(env[0], tmp_path / "wd", *extra)
    args = [a.replace(str(env[0] / "corpus.txt"), str(tmp_path / "c.txt"))
            .replace(f"{env[0]}/tfds", f"{tmp_path}/tfds") for a in args]
    assert_one_line_error(run(env, "train.py", args), *fragments)


# ============================================================================ fuzz
def _random_text(rng, n):
    pieces = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(n))),
              "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(n))).encode(),
              b"\\x\\u12\\N{nope}\\", b"to be \xf0\x9f\x98", b"\t\r\n" * 3]
    rng.shuffle(pieces)
    return b"".join(pieces[: rng.randrange(1, len(pieces) + 1)])


def test_fuzzed_prompts_never_traceback(env, reference, tmp_path):
    rng = random.Random(0)
    lines = [_random_text(rng, 40).replace(b"\n", b" ") for _ in range(20)]
    (tmp_path / "prompts.txt").write_bytes(b"\n".join(lines))
    base = [f"--workdir={reference}", "--max_new_tokens=3", "--temperature=0"]
    runs = [run(env, "sample.py", base + [f"--prompt_file={tmp_path / 'prompts.txt'}"]),
            subprocess.run([sys.executable, "sample.py", *base], cwd=REPO, capture_output=True,
                           input=_random_text(rng, 200), timeout=600, env=env[1]),
            run(env, "sample.py", base + ["--prompt=" + _random_text(rng, 30).replace(
                b"\0", b"").decode("utf-8", "replace")])]
    for r in runs:
        err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err, err[-3000:]
        assert r.returncode in (0, 2), err[-3000:]
        if r.returncode == 2:
            assert sum(ln.startswith("error:") for ln in err.splitlines()) == 1, err


def _garbage_rows(rng, n, n_fields):
    rows = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            rows.append(_random_text(rng, 60).replace(b"\n", b" ").decode("utf-8", "replace"))
        elif kind == 1:
            rows.append("\t".join("x" for _ in range(rng.randrange(1, 2 * n_fields + 2))))
        elif kind == 2:
            rows.append(json.dumps(rng.choice([[1, 2], {"article": 3}, "s", None, {
                "gold_label": 1, "sentence1": [], "sentence2": {}}])))
        elif kind == 3:
            rows.append('"' + "\t".join(['"x'] * n_fields) + "\0")
        else:
            rows.append("\t" * rng.randrange(n_fields + 2))
    return rows


_LAYOUTS = {  # task -> (file, header line or None, a valid row, field count)
    "sst2": ("train.tsv", "sentence\tlabel", "a fine film\t1", 2),
    "rte": ("train.tsv", "index\tsentence1\tsentence2\tlabel", "0\ta b\tc d\tentailment", 4),
    "stsb": ("train.tsv", "index\tsentence1\tsentence2\tscore", "0\ta b\tc d\t3.5", 4),
    "cola": ("train.tsv", None, "src\t1\t\tgood sentence", 4),
    "snli": ("snli_1.0_train.txt", "gold_label\tsentence1\tsentence2",
             "neutral\ta man\ta person", 3),
    "scitail": ("scitail_1.0_train.tsv", None, "a b\tc d\tentails", 3),
    "story_cloze": ("val_spring2016.csv", ",".join(
        ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
         "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]),
        "id1,a,b,c,d,e,f,1", 8),
}


@pytest.mark.parametrize("task", sorted(_LAYOUTS) + ["snli_jsonl", "race"])
def test_fuzzed_task_rows_are_skipped_and_counted(task, tmp_path):
    rng = random.Random(task)
    if task == "race":
        d = tmp_path / "train" / "high"
        d.mkdir(parents=True)
        (tmp_path / "train" / "middle").mkdir()
        good = dict(article="a b", questions=["q _ ?"], options=[["w", "x", "y", "z"]],
                    answers=["B"])
        (d / "good.txt").write_text(json.dumps(good))
        for i, row in enumerate(_garbage_rows(rng, 30, 4)):
            (d / f"bad{i}.txt").write_text(row)
        for i, bad in enumerate([dict(good, questions=[3]), dict(good, answers=[1]),
                                 dict(good, options=[[1, 2, 3, 4]]), dict(good, article=None),
                                 dict(good, questions=[None], answers=[None])]):
            (d / f"typed{i}.txt").write_text(json.dumps(bad))
        data = load_task("race", str(tmp_path), splits=["train"])
        assert data.reports["train"].read >= 1
        assert data.splits["train"][0].label == 1
        return
    if task == "snli_jsonl":
        good = json.dumps(dict(gold_label="neutral", sentence1="a", sentence2="b"))
        rows = [good] + _garbage_rows(rng, 60, 3) + [good]
        (tmp_path / "snli_1.0_train.jsonl").write_text("\n".join(rows))
        data = load_task("snli", str(tmp_path), splits=["train"])
        assert data.reports["train"].read >= 2 and data.reports["train"].n_skipped > 0
        return
    file, header, good, n_fields = _LAYOUTS[task]
    rows = [good] + _garbage_rows(rng, 60, n_fields) + [good]
    text = "\n".join(([header] if header else []) + rows)
    (tmp_path / file).write_bytes(text.encode("utf-8") + b"\n\xff\xfe\n")
    data = load_task(task, str(tmp_path), splits=["train"])
    rep = data.reports["train"]
    assert rep.read >= 2 and rep.n_skipped > 0, data.report()
    assert "skipped" in data.report()
