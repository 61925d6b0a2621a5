"""Data at pod scale (gptjax.data.sharded): per-process shards, the same global batch for any
number of processes, grain workers, bad records, and train.py end to end with two processes."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, subprocess_env, tiny_train_flags
from gptjax.data import sharded
from gptjax.data.batcher import Batcher
from gptjax.data.lm import MODES
from gptjax.data.prefetch import Prefetcher
from gptjax.data.tokenizers import CharTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz ,.\n"


class FakeSource:
    """A TextSource stand-in: random access over a list of documents."""

    def __init__(self, docs, fingerprint="fake-1"):
        self.docs, self.fingerprint, self.text_key = docs, fingerprint, "text"

    def _data_source(self, split):
        return [{"text": d} for d in self.docs]


class ExitingTokenizer(CharTokenizer):
    """Kills the worker process that meets the document 'die'."""

    def encode(self, text):
        if text == "die":  # (a chunk holds it among others)
            os._exit(3)
        return super().encode(text)


class HeapCheckingTokenizer(CharTokenizer):
    """Exits the worker process if it tokenizes before its malloc heaps were limited to one."""

    def encode(self, text):
        if sharded._one_heap_pid != os.getpid():
            os._exit(4)
        return super().encode(text)


def _docs(n=40, seed=0):
    rng = np.random.RandomState(seed)
    return ["".join(rng.choice(list(CHARS[:28]), rng.randint(20, 120))) for _ in range(n)]


def _batcher(tmp, docs, p, P, *, mode="packed", B=4, V=8, T=8, workers=0, tok=None, src=None):
    return sharded.build_batcher(src or FakeSource(docs), "train", tok or CharTokenizer(CHARS),
                                 seq_len=T, global_batch_size=B, seed=3, mode=mode, num_shards=V,
                                 shards_dir=str(tmp / f"host{p}of{P}"), workers=workers,
                                 process_index=p, process_count=P, log=lambda m: None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,V", [(4, 8), (8, 4), (6, 16)])
def test_global_batch_is_the_same_for_1_2_and_4_processes(tmp_path, mode, B, V):
    docs = _docs()
    one = _batcher(tmp_path, docs, 0, 1, mode=mode, B=B, V=V)
    for P in (2, 4) if B % 4 == 0 else (2,):
        parts = [_batcher(tmp_path, docs, p, P, mode=mode, B=B, V=V) for p in range(P)]
        for step in (0, 1, 7, 40):
            want = one.batch(step)
            got = {k: np.concatenate([b.batch(step)[k] for b in parts]) for k in want}
            np.testing.assert_array_equal(got["inputs"], want["inputs"])
            np.testing.assert_array_equal(got["targets"], want["targets"])
        # Each process tokenized (and holds files for) only the shards of its own rows.
        layout = sharded.Layout(B, V)
        for p in range(P):
            files = [f for d in (tmp_path / f"host{p}of{P}").iterdir() for f in d.iterdir()]
            assert sorted(int(f.name[6:11]) for f in files) == sorted(layout.shards_of_process(p, P))
    # Targets are inputs shifted by one token; the windows come from the corpus.
    b = one.batch(5)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_file_is_its_documents_tokens_with_eos_between(tmp_path, shared_data, workers):
    from gptjax.data.tokenizers import from_hf_files

    tok = from_hf_files(shared_data / "gpt2_bpe")
    docs = _docs(300)
    docs[3], docs[9] = "", b"\xff bad"
    files, skipped = sharded.tokenize_shards(FakeSource(docs), "train", tok, [0, 1, 2],
                                             num_shards=3, shards_dir=str(tmp_path),
                                             workers=workers, log=lambda m: None)
    assert skipped == 1
    for v in range(3):
        want = []
        for d in docs[v::3]:
            ids = tok.encode(d) if isinstance(d, str) else []
            if ids:
                want += ([tok.eos_id] if want else []) + ids
        np.testing.assert_array_equal(files[v], want)
    # V = 1: one shard of two chunks (256 + 44 documents), joined by eos across the chunks.
    one, _ = sharded.tokenize_shards(FakeSource(docs), "train", tok, [0], num_shards=1,
                                     shards_dir=str(tmp_path), workers=0, log=lambda m: None)
    want = []
    for d in docs:
        ids = tok.encode(d) if isinstance(d, str) else []
        if ids:
            want += ([tok.eos_id] if want else []) + ids
    np.testing.assert_array_equal(one[0], want)


def test_packed_rows_visit_every_window_of_their_stream_once_per_epoch(tmp_path):
    one = _batcher(tmp_path, _docs(), 0, 1, B=4, V=4, T=8)
    k_tokens = one._tokens[0]
    windows = (len(k_tokens) - 1) // 8
    starts = set()
    for step in range(windows):
        row = one.batch(step)["inputs"][0]
        hit = [s for s in range(0, windows * 8, 8) if np.array_equal(k_tokens[s:s + 8], row)]
        starts.add(hit[0])
    assert len(starts) == windows


def test_workers_write_the_same_shards_as_one_process(tmp_path):
    docs = _docs(24)
    a = _batcher(tmp_path / "w0", docs, 0, 1, workers=0)
    b = _batcher(tmp_path / "w2", docs, 0, 1, workers=2)
    for step in range(5):
        np.testing.assert_array_equal(a.batch(step)["inputs"], b.batch(step)["inputs"])
    fa = sorted((tmp_path / "w0").rglob("*.npy"))
    fb = sorted((tmp_path / "w2").rglob("*.npy"))
    assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb] and len(fa) == 8


def test_malformed_record_is_counted_and_skipped(tmp_path):
    docs = _docs(24)
    src = FakeSource(docs[:5] + [b"\xff\xfe not utf-8"] + docs[5:])
    b = _batcher(tmp_path, None, 0, 1, src=src)
    assert b.skipped_docs == 1
    ref = _batcher(tmp_path / "ref", None, 0, 1, src=FakeSource(docs[:5] + [""] + docs[5:]))
    np.testing.assert_array_equal(b.batch(3)["inputs"], ref.batch(3)["inputs"])


def test_a_dying_worker_is_a_clear_error_not_a_hang(tmp_path):
    docs = _docs(12)
    docs[7] = "die"
    with pytest.raises(RuntimeError, match=r"tokenizing with data.workers=1 failed: .*a worker "
                                           r"died or raised"):
        _batcher(tmp_path, docs, 0, 1, workers=1, tok=ExitingTokenizer(CHARS))
    assert not list(tmp_path.rglob("shard-*.npy"))[8:]  # nothing half-written past the failure


def test_workers_use_one_malloc_heap_and_the_caller_is_left_alone(tmp_path):
    """Without it a worker's memory grew with the corpus (glibc heaps of the array_record
    reads' threads; bench/data_throughput.py has the numbers)."""
    docs = _docs(24)
    b = _batcher(tmp_path, docs, 0, 1, workers=1, tok=HeapCheckingTokenizer(CHARS))
    ref = _batcher(tmp_path / "ref", docs, 0, 1, workers=0)
    np.testing.assert_array_equal(b.batch(2)["inputs"], ref.batch(2)["inputs"])
    assert sharded._one_heap_pid != os.getpid()  # the calling process keeps its own setup


def test_too_few_documents_for_the_shards_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"stream 2 \(virtual shards 2, 6\) has 0 tokens.*fewer "
                                         r"virtual shards, or data.pipeline='single'"):
        _batcher(tmp_path, _docs(2), 0, 1, B=4, V=8)


def test_prefetcher_returns_the_batchers_batches_and_follows_a_jump(tmp_path):
    b = _batcher(tmp_path, _docs(), 0, 1)
    pf = Prefetcher(b, depth=2)
    assert isinstance(b, Batcher) and isinstance(pf, Batcher)
    assert not hasattr(b, "step") and not hasattr(pf, "step")  # the loop owns the step
    try:
        for step in [0, 1, 2, 10, 11, 3]:
            np.testing.assert_array_equal(pf.batch(step)["inputs"], b.batch(step)["inputs"])
        assert pf.state() == b.state()
        pf.restore(dict(b.state(), step=7))
        with pytest.raises(ValueError, match="seed=4, now 3"):
            pf.restore(dict(b.state(), seed=4))
    finally:
        pf.close()
    assert pf._thread is None


# ================================================================================ end to end
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(_docs(48, seed=1)):
        (d / f"doc{i:03d}.txt").write_text(text * 3)
    return d


def _args(corpus, host, workdir, steps=8, *extra):
    return [sys.executable, "train.py", *tiny_train_flags(
        f"{corpus}/*.txt", host, workdir,
        {"data.pipeline": "sharded", "data.virtual_shards": 16, "data.workers": 0,
         "model.n_ctx": 16, "train.steps": steps}, *extra)]


def _losses(workdir):
    return {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r}


@pytest.mark.slow
def test_two_processes_with_their_own_caches_train_as_one_and_resume_after_kill9(corpus,
                                                                                 tmp_path):
    one = tmp_path / "one"
    env1, env2 = subprocess_env(devices=1), subprocess_env(devices=2)
    # The pre-tokenized format: --prepare_data writes the tokenizer and this host's shards and
    # exits; the training run then reads them and tokenizes nothing.
    r = subprocess.run(_args(corpus, tmp_path / "h0", one) + ["--prepare_data"], cwd=REPO,
                       env=env2, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "data ready" in r.stdout, r.stderr[-3000:]
    assert len(list((tmp_path / "h0").rglob("shard-*.npy"))) == 16
    assert not (one / "metrics.jsonl").exists()
    r = subprocess.run(_args(corpus, tmp_path / "h0", one), cwd=REPO, env=env2,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokenizing" not in r.stdout, r.stdout
    port = _free_port()
    two = tmp_path / "two"
    procs = [subprocess.Popen(
        _args(corpus, tmp_path / f"h{i + 1}", two) + [
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # Each process tokenized half the shards, into its own cache.
    assert "process 1] tokenizing" in outs[1][0] and "8 of 16 virtual shards" in outs[1][0]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5 * abs(a[s]["loss"]), (s, a[s], b[s])
        assert "data_wait_ms" in a[s]
    # kill -9 while step 8's checkpoint is written; the same command resumes from step 4 and
    # reproduces the uninterrupted run's losses bit for bit (the batches are the same).
    three = tmp_path / "three"
    r = subprocess.run(_args(corpus, tmp_path / "h3", three), cwd=REPO,
                       env=dict(env2, GPTJAX_FAULT_KILL_IN_SAVE="8"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL
    r = subprocess.run(_args(corpus, tmp_path / "h3", three), cwd=REPO, env=env2,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    c = _losses(three)
    assert [c[s]["loss"] for s in range(5, 9)] == [a[s]["loss"] for s in range(5, 9)]
