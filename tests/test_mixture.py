"""Weighted mixtures (gptjax.data.mixture): the same global batch for 1, 2 and 4 processes with
either pipeline, realised proportions, a weight schedule that resumes exactly, token caches that
a weight change leaves alone, one-line errors, and a run stopped by SIGTERM and resumed."""

import hashlib
import json
import os
import signal

import numpy as np
import pytest

from conftest import EvalRecorder, tiny_run_config
from gptjax import defaults
from gptjax.config import ConfigError
from gptjax.data import mixture as mx
from gptjax.data.batcher import Batcher
from gptjax.data.lm import MODES
from gptjax.data.tokenizers import CharTokenizer
from gptjax.runs import faults
from gptjax.train.experiment import check_train_config

CHARS = "abcdefghijklmnopqrstuvwxyz ,.\n"


class FakeSource:
    """A TextSource stand-in: random access over a list of documents."""

    def __init__(self, docs, fingerprint):
        self.docs, self.fingerprint, self.text_key = docs, fingerprint, "text"

    def _data_source(self, split):
        return [{"text": d} for d in self.docs]


def _docs(n, corpus):
    """Documents of corpus 0, 1 or 2, each written in its own 8 letters."""
    rng = np.random.RandomState(corpus)
    letters = list(CHARS[8 * corpus:8 * corpus + 8])
    return ["".join(rng.choice(letters, rng.randint(20, 120))) for _ in range(n)]


SOURCES = [FakeSource(_docs(40, i), f"fake-{i}") for i in range(3)]
CORPORA = mx.parse_mixture(["name=a;weight=0.6", "name=b;weight=0.3", "name=c;weight=0.1"])
SCHEDULE = mx.make_schedule(CORPORA, ["6:a=0,c=0.7", "9:a=2"], steps=40)


def _batcher(tmp, pipeline, p, P, *, mode="packed", B=8, V=16, schedule=SCHEDULE):
    tok = CharTokenizer(CHARS)
    tokens = None
    if pipeline == "single":
        tokens = [np.concatenate([tok.encode(d) for d in s.docs]) for s in SOURCES]
    return mx.build_batcher(schedule, SOURCES, tok, tokens=tokens, seq_len=8,
                            global_batch_size=B, seed=3, mode=mode, num_shards=V,
                            shards_dir=str(tmp / f"host{p}of{P}"), workers=0, process_index=p,
                            process_count=P, log=lambda m: None)


def _global(parts, step):
    return {k: np.concatenate([b.batch(step)[k] for b in parts]) for k in ("inputs", "targets")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pipeline", ["single", "sharded"])
def test_global_batch_is_the_same_for_1_2_and_4_processes(tmp_path, pipeline, mode):
    one = _batcher(tmp_path, pipeline, 0, 1, mode=mode)
    assert isinstance(one, Batcher)
    seen = set()
    for P in (2, 4):
        parts = [_batcher(tmp_path, pipeline, p, P, mode=mode) for p in range(P)]
        for step in range(40):  # every step of the run, across both weight changes
            want, got = one.batch(step), _global(parts, step)
            np.testing.assert_array_equal(got["inputs"], want["inputs"])
            np.testing.assert_array_equal(got["targets"], want["targets"])
            np.testing.assert_array_equal(np.concatenate([b.sources(step) for b in parts]),
                                          one.sources(step))
            seen |= set(one.sources(step).tolist())
    assert seen == {0, 1, 2}  # every corpus is read
    # A row of corpus c is a window of corpus c's tokens (each corpus has its own letters).
    for step in (0, 7, 12):
        for row, c in zip(one.batch(step)["inputs"], one.sources(step)):
            assert set(row.tolist()) <= set(range(8 * c, 8 * c + 8)), (row, c)


@pytest.mark.parametrize("pipeline,B,V", [("single", 8, 1), ("sharded", 8, 16),
                                          ("sharded", 8, 4)])
def test_realised_proportions_within_2_percent_over_1000_rows(tmp_path, pipeline, B, V):
    weights = mx.make_schedule(mx.parse_mixture(
        ["name=a;weight=0.6", "name=b;weight=0.3", "name=c;weight=0.1"]))
    b = _batcher(tmp_path, pipeline, 0, 1, B=B, V=V, schedule=weights)
    for first in (0, 77):  # 1,000 rows from the start and from elsewhere
        steps = range(first, first + 1000 // B)
        counts = np.bincount(np.concatenate([b.sources(s) for s in steps]), minlength=3)
        assert counts.sum() == 1000
        np.testing.assert_allclose(counts / 1000, [0.6, 0.3, 0.1], atol=0.02)
        # What metrics.jsonl logs (`mix/<name>`) is the same count.
        got = b.proportions(steps.start, steps.stop)
        np.testing.assert_allclose([got[n] for n in "abc"], counts / 1000)


def test_each_corpus_reads_its_draws_in_order_across_weight_changes():
    """Corpus c's rows are its draws 0, 1, 2, ... with no gap and no repeat, in each stream,
    whatever the phases: 'packed' then visits each window once per epoch of the corpus."""
    labels = mx.Labels(SCHEDULE, seed=5)
    for k, n in ((0, 8), (3, 1), (1, 3)):
        corpus, draw = labels.rows(k, n, np.arange(0, 40 * n))
        for c in range(3):
            np.testing.assert_array_equal(draw[corpus == c], np.arange((corpus == c).sum()))
        # A query of a few rows agrees with the whole sequence (nothing carried between steps).
        for h in (0, 6 * n, 6 * n + 1, 9 * n - 1, 33 * n):
            assert labels.rows(k, n, [h]) == (corpus[h:h + 1], draw[h:h + 1])
    # The schedule's phases: corpus a has no rows in [6, 9).
    corpus, _ = labels.rows(0, 8, np.arange(6 * 8, 9 * 8))
    assert 0 not in corpus.tolist()


@pytest.mark.parametrize("pipeline", ["single", "sharded"])
def test_weight_change_resumes_exactly_at_k_minus_1_k_and_k_plus_1(tmp_path, pipeline):
    """The schedule changes weights at step 6. A run stopped after step s (s = 5, 6, 7) saves
    its batcher's state; a new batcher (on 2 processes) restores it and serves the steps from s
    on exactly as the run that never stopped. Adding a weight change after s is allowed; one
    before s is refused."""
    k = SCHEDULE.starts[1]
    ref = _batcher(tmp_path, pipeline, 0, 1)
    for s in (k - 1, k, k + 1):
        saved = json.loads(json.dumps(dict(ref.state(), step=s)))  # as the checkpoint holds it
        parts = [_batcher(tmp_path, pipeline, p, 2) for p in range(2)]
        for b in parts:
            b.restore(saved)
        for step in range(s, s + 4):
            np.testing.assert_array_equal(_global(parts, step)["inputs"],
                                          ref.batch(step)["inputs"])
        later = mx.make_schedule(CORPORA, ["6:a=0,c=0.7", "9:a=2", f"{s}:b=5"], steps=40)
        _batcher(tmp_path, pipeline, 0, 1, schedule=later).restore(saved)
        earlier = mx.make_schedule(CORPORA, ["6:a=0,c=0.7", "9:a=2", f"{s - 1}:b=5"],
                                   steps=40)
        with pytest.raises(ValueError, match=r"weights before step .* may change only from"):
            _batcher(tmp_path, pipeline, 0, 1, schedule=earlier).restore(saved)


def _tree(d):
    """{path: (mtime, sha256)} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[p] = (os.stat(p).st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def _two_corpora(tmp, files=1):
    """Two text corpora of `files` files each: (glob of the first, glob of the second)."""
    for name, line in (("a", "to be or not to be, line {}\n"), ("b", "the quick brown fox {}\n")):
        for f in range(files):
            (tmp / f"{name}{f}.txt").write_text("".join(line.format(i) for i in range(300)))
    return tmp / "a*.txt", tmp / "b*.txt"


@pytest.mark.parametrize("pipeline", ["single", "sharded"])
def test_changing_weights_retokenizes_nothing(tmp_path, pipeline):
    """`train.py --prepare_data` of a mixture writes each corpus' token files once; another run
    with other weights and a schedule reads them as they are."""
    from gptjax.train.run_data import prepare_data  # heavy: the training stack

    a, b = _two_corpora(tmp_path, files=4)
    changes = {"data.pipeline": pipeline, "data.workers": 0, "data.virtual_shards": 2}
    config = tiny_run_config(a, tmp_path, changes)
    config.data.mixture = (f"name=shake;weight=0.7;path={a}", f"name=fox;weight=0.3;path={b}")
    line = prepare_data(config, str(tmp_path / "wd"))
    assert "data ready" in line
    cache = _tree(tmp_path / "cache")
    assert len([p for p in cache if p.endswith(".npy")]) >= (4 if pipeline == "single" else 2 + 4)
    config.data.mixture = (f"name=shake;weight=0.1;path={a}", f"name=fox;weight=5;path={b}")
    config.data.mixture_schedule = ("3:shake=1",)
    prepare_data(config, str(tmp_path / "wd"))
    assert _tree(tmp_path / "cache") == cache


def test_schedule_entries_apply_in_step_order_whatever_their_order():
    corpora = mx.parse_mixture(("name=a;weight=1", "name=b;weight=1"))
    one = mx.make_schedule(corpora, ["20:a=3", "10:b=3"], steps=40)
    two = mx.make_schedule(corpora, ["10:b=3", "20:a=3"], steps=40)
    assert one == two and one.starts == (0, 10, 20), one
    assert one.weights[1] == pytest.approx((0.25, 0.75)) and one.weights[2] == pytest.approx(
        (0.5, 0.5))
    both = mx.make_schedule(corpora, ["10:b=3", "10:a=3"], steps=40)  # one step: both apply
    assert both.weights[1] == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize("mixture,schedule,fragment", [
    (("name=a;weight=0", "name=b;weight=0"), (), "sum to 0; allowed: weights >= 0 summing to a "
                                                  "positive number"),
    (("name=a;weight=-1",), (), "weight '-1'; allowed: a finite number >= 0"),
    (("name=a;weight=1", "name=b;weight=1"), ("4:c=1",), "corpus 'c' is not in data.mixture; "
                                                         "allowed: a, b"),
    (("name=a;weight=1", "name=b;weight=1"), ("12:a=1",), "1 <= step < train.steps (train.steps"
                                                          "=12: 1..11)"),
    (("name=a;weight=1", "name=b;weight=1"), ("4:a=0,b=0",), "'4:a=0,b=0': the weights [0.0, "
                                                             "0.0] sum to 0"),
    (("name=a;weight=1;colour=red",), (), "'colour=red' is not key=value with a key in"),
    (("name=a;weight=1", "name=a;weight=2"), (), "two corpora are named 'a'"),
    (("name=a;weight=1;dataset=prompt_completion",), (), "allowed: text datasets"),
])
def test_bad_mixture_is_a_one_line_error(tmp_path, mixture, schedule, fragment):
    config = tiny_run_config(tmp_path / "x.txt", tmp_path)
    config.data.mixture, config.data.mixture_schedule = mixture, schedule
    with pytest.raises(ConfigError) as e:
        check_train_config(defaults.complete(config, defaults.base_config()), num_devices=1)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


class _SigtermAfter(faults.Hooks):
    """SIGTERM to this process after `steps` more steps (the loop then saves and stops)."""

    def __init__(self, steps):
        self.steps, self.done = steps, 0

    def after_step(self):
        self.done += 1
        if self.done == self.steps:
            os.kill(os.getpid(), signal.SIGTERM)


def _log(workdir):
    rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    return [r for r in rows if "goodput" not in r]


def test_sigterm_at_k_minus_1_and_k_plus_1_of_a_weight_change_then_resume_is_exact(tmp_path):
    """A run whose weights change at step k = 4 gets SIGTERM after step 3, resumes, gets SIGTERM
    after step 5, and resumes to the end: its logged losses, shares (mix/<name>) and per-corpus
    validation losses equal the run that never stopped, to the last digit."""
    from gptjax.train.loop import train_and_evaluate  # heavy: the training stack

    a, b = _two_corpora(tmp_path)
    config = tiny_run_config(a, tmp_path, {"train.steps": 8, "train.log_every": 1,
                                           "train.eval_every": 4, "train.eval_batches": 1,
                                           "train.eval_batch_size": 4, "data.prefetch": 0})
    config.data.mixture = (f"name=shake;weight=0.7;path={a}", f"name=fox;weight=0.3;path={b}")
    config.data.mixture_schedule = ("4:shake=0.1,fox=0.9",)
    train_and_evaluate(config, str(tmp_path / "ref"), progress=False)
    for more, stop in ((3, 3), (2, 5)):
        try:
            faults.install(_SigtermAfter(more))
            cut = train_and_evaluate(config, str(tmp_path / "cut"), progress=False)
        finally:
            faults.install(None)
        assert cut.preempted == "SIGTERM" and cut.step == stop
    train_and_evaluate(config, str(tmp_path / "cut"), progress=False)
    ref, cut = _log(tmp_path / "ref"), _log(tmp_path / "cut")
    keys = lambda r: {k: v for k, v in r.items()  # noqa: E731 - timings differ
                      if k in ("step", "loss", "grad_norm", "final") or k.startswith(("mix/",
                                                                                      "val_loss"))}
    assert [keys(r) for r in cut] == [keys(r) for r in ref]
    shake = [r["mix/shake"] for r in ref if "loss" in r]
    assert all(abs(r["mix/shake"] + r["mix/fox"] - 1) < 1e-12 for r in ref if "loss" in r)
    assert np.mean(shake[:4]) > 0.5 > 0.25 > np.mean(shake[4:])  # 0.7, then 0.1
    assert {"val_loss/shake", "val_loss/fox"} <= set(ref[-1])


def test_train_py_prepare_data_takes_the_mixture_from_flags(tmp_path):
    """The command-line form the README gives: tuples of strings as --config flags."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env, tiny_train_flags

    a, b = _two_corpora(tmp_path)
    flags = tiny_train_flags(a, tmp_path, tmp_path / "wd", {"train.steps": 100})
    r = subprocess.run(
        [sys.executable, "train.py", *flags, "--prepare_data",
         f"--config.data.mixture=('name=shake;weight=0.7;path={a}', 'name=fox;weight=0.3;"
         f"path={b}')", "--config.data.mixture_schedule=('50:shake=0.5,fox=0.5',)"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data ready: 14,112 (shake 7,731, fox 6,381) train / 1,568 val tokens" in r.stdout


def test_mixture_with_document_mask_carries_segment_ids_in_training_and_evaluation(tmp_path):
    """The mixture's batcher goes behind the document mask like every pipeline's: its batches
    and each corpus' evaluation batches carry segment ids and restarted positions."""
    from gptjax.data.documents import DocumentMask
    from gptjax.train import run_data, run_mixture  # heavy: the training stack

    a, b = _two_corpora(tmp_path)
    config = tiny_run_config(a, tmp_path, {"tokenizer.kind": "sentencepiece",
                                           "tokenizer.vocab_size": 320, "data.prefetch": 0,
                                           "data.document_mask": True})
    config.data.mixture = (f"name=shake;weight=0.5;path={a}", f"name=fox;weight=0.5;path={b}")
    config = defaults.complete(config, defaults.base_config())
    source, tok, train, val = run_data.load_data(config, str(tmp_path / "wd"))
    batcher = run_data.make_batcher(config, source, tok, train, 32)
    batch = batcher.batch(0)
    want = DocumentMask(tok.eos_id, True).arrays(batch["inputs"])
    np.testing.assert_array_equal(batch["segment_ids"], want["segment_ids"])
    np.testing.assert_array_equal(batch["positions"], want["positions"])
    assert set(run_mixture.mix_fields(batcher, 0, 2)) == {"mix/shake", "mix/fox"}
    setup = EvalRecorder()
    docs = run_data.document_mask(config.data, tok)
    got = run_data.val_metrics(setup, None, val, 32, 4, 1, docs)
    assert set(got) == {"val_loss", "val_loss/shake", "val_loss/fox"}
    assert setup.seen and all({"segment_ids", "positions"} <= s for s in setup.seen), setup.seen
