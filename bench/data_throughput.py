"""Input pipeline throughput: tokenizing a corpus as today (one process, one cached file) against
the sharded pipeline (gptjax.data.sharded) with 1 and 2 grain workers and 1 and 2 processes, and
against a weighted mixture (gptjax.data.mixture) of its two halves, each its own cached file.

  python bench/data_throughput.py                       # 100 MB and 1 GB corpora, both tokenizers
  python bench/data_throughput.py --sizes_mb 100 --tokenizers gpt2_bpe
  python bench/data_throughput.py --sizes_mb 100 --tokenizers gpt2_bpe --setups today,mixture
  python bench/data_throughput.py --smoke               # 2 MB, GPT-2 BPE, today, 2 workers, mixture

The single-pipeline setups ('today', 'mixture') then serve training batches from their cached
files (`--batch_rows` x `--seq_len` tokens a batch, `--batch_steps` batches, best of 3 passes):
`LMBatcher` on the one file, `MixtureBatcher` (weights 0.7 / 0.3, changed to 0.2 / 0.8 halfway)
on the two, so the mixture's cost of choosing each row's corpus shows in batch tokens per second.

The corpus is the shared Gutenberg books (../shared/data/gutenberg_nltk), cut into documents at
blank lines and repeated to each size, written once as an array_record file and read by random
access (grain's ArrayRecordDataSource), as a tfds data_source reads a prepared dataset. Every
measurement runs in its own process (`--child`), with a fresh token directory; the table gives
tokens per second of wall time (processes started together, up to the last one's end) and the
peak resident memory of the largest process, so a 1 GB corpus shows whether memory stays bounded.
Tokenizers: GPT-2's byte BPE (../shared/data/gpt2_bpe) and a SentencePiece model trained here
on the first 2 MB (vocabulary 8000).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"  # --shared overrides it

# name: (pipeline, workers, processes)
SETUPS = {
    "today": ("single", 0, 1),           # one process, one cached file (token_cache)
    "sharded-1p-1w": ("sharded", 1, 1),  # 1 process, 1 grain worker
    "sharded-1p-2w": ("sharded", 2, 1),  # 1 process, 2 grain workers
    "sharded-2p-1w": ("sharded", 1, 2),  # 2 processes, 1 grain worker each
    "mixture": ("mixture", 0, 1),        # one process, the corpus' two halves as two corpora
}


class ArraySource:
    """A TextSource-like corpus: documents in one array_record file, read by random access."""

    def __init__(self, path: str):
        self.path, self.text_key = path, "text"
        self.fingerprint = f"bench:{os.path.basename(path)}:{os.path.getsize(path)}"

    def _data_source(self, split: str):
        return _Records(self.path)


class _Records:
    """{text: bytes} by index from an array_record file (picklable: grain's workers open it)."""

    def __init__(self, path: str):
        import grain.python as grain  # heavy: grain

        self.path, self.ds = path, grain.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.ds[i]}

    def __getitems__(self, idx: list) -> list:
        return [{"text": r} for r in self.ds.__getitems__(idx)]

    def texts(self):
        """Every document in order, read 256 at a time as gptjax's TextSource.texts reads."""
        for start in range(0, len(self.ds), 256):
            for r in self.ds.__getitems__(list(range(start, min(start + 256, len(self.ds))))):
                yield r.decode("utf-8")


def write_corpus(path: str, size_mb: float) -> int:
    """Gutenberg paragraphs repeated to `size_mb` MB in an array_record file; returns documents."""
    from array_record.python.array_record_module import ArrayRecordWriter

    paras = []
    for f in sorted((pathlib.Path(SHARED) / "gutenberg_nltk").glob("*.txt")):
        text = f.read_text(encoding="latin-1")
        paras += [p for p in text.split("\n\n") if p.strip()]
    docs, size, target = 0, 0, size_mb * 1e6
    w = ArrayRecordWriter(path, "group_size:1")
    while size < target:
        for p in paras:
            b = p.encode("utf-8")
            w.write(b)
            docs, size = docs + 1, size + len(b)
            if size >= target:
                break
    w.close()
    return docs


def tokenizer(kind: str, work: str):
    from gptjax.data.tokenizers import build_tokenizer, from_hf_files, load_tokenizer

    if kind == "gpt2_bpe":
        return from_hf_files(pathlib.Path(SHARED) / "gpt2_bpe")
    d = os.path.join(work, "spm")
    if os.path.exists(os.path.join(d, "tokenizer.json")):
        return load_tokenizer(d)
    sample = ArraySource(os.path.join(work, "sample.arrayrecord"))
    tok = build_tokenizer("sentencepiece", texts=list(_Records(sample.path).texts()),
                          directory=d, vocab_size=8000)
    tok.save(d)
    return tok


def write_halves(corpus: str) -> str:
    """The corpus' even and odd documents as two array_record files: 'a.arrayrecord,b...'."""
    from array_record.python.array_record_module import ArrayRecordWriter

    recs = _Records(corpus)
    paths = [corpus.replace(".arrayrecord", f"-{h}.arrayrecord") for h in "ab"]
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    for start in range(0, len(recs), 256):
        for i, r in enumerate(recs.ds.__getitems__(list(range(start, min(start + 256,
                                                                          len(recs)))))):
            writers[(start + i) % 2].write(r)
    for w in writers:
        w.close()
    return ",".join(paths)


def batch_throughput(parts: list, args) -> float:
    """Batch tokens per second of serving `--batch_steps` batches from the cached token arrays
    `parts` (one: LMBatcher; two: a MixtureBatcher), best of 3 passes."""
    from gptjax.data import mixture as mx
    from gptjax.data.lm import LMBatcher

    B, T, n = args.batch_rows, args.seq_len, args.batch_steps
    if len(parts) == 1:
        b = LMBatcher(parts[0], T, B, 0, fingerprint="bench")
    else:
        corpora = mx.parse_mixture(["name=a;weight=0.7", "name=b;weight=0.3"])
        sch = mx.make_schedule(corpora, [f"{n // 2}:a=0.2,b=0.8"], steps=n)
        b = mx.build_batcher(sch, [ArraySource(p) for p in args.corpus.split(",")], None,
                             tokens=parts, seq_len=T, global_batch_size=B, seed=0,
                             mode="packed")
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for step in range(n):
            b.batch(step)
        best = min(best, time.perf_counter() - t)
    return n * B * T / best


def child(args) -> None:
    """One process of one setup: tokenize its share; print {tokens, seconds, maxrss_mb}."""
    from gptjax.data import sharded
    from gptjax.data.token_cache import cached_tokens

    tok = tokenizer(args.tokenizer, args.work)
    t = time.perf_counter()
    batch_tps = None
    if args.pipeline in ("single", "mixture"):
        parts = [cached_tokens(lambda c=c: _Records(c).texts(), tok,
                               dataset_fingerprint=ArraySource(c).fingerprint, split="train",
                               cache_dir=args.out) for c in args.corpus.split(",")]
        n = sum(len(p) for p in parts)
    else:
        layout = sharded.Layout(args.batch, args.shards)
        shards = layout.shards_of_process(args.process_index, args.processes)
        toks, _ = sharded.tokenize_shards(ArraySource(args.corpus), "train", tok, shards, num_shards=args.shards,
                                          shards_dir=args.out, workers=args.workers,
                                          log=lambda m: None)
        n = sum(len(v) for v in toks.values())
    dt = time.perf_counter() - t
    if args.pipeline != "sharded":
        batch_tps = batch_throughput(parts, args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"tokens": n, "seconds": dt, "maxrss_mb": rss,
                      "workers_maxrss_mb": rss_children, "batch_tok_per_s": batch_tps}),
          flush=True)


def measure(setup: str, tok_kind: str, corpus: str, work: str, args) -> dict:
    pipeline, workers, procs = SETUPS[setup]
    if pipeline == "mixture":
        corpus = args.halves
    out = tempfile.mkdtemp(dir=work, prefix="tokens-")
    cmd = [sys.executable, __file__, "--child", "--shared", str(SHARED), "--pipeline", pipeline,
           "--workers",
           str(workers), "--processes", str(procs), "--tokenizer", tok_kind, "--corpus", corpus,
           "--work", work, "--shards", str(args.shards), "--batch", str(args.batch),
           "--batch_rows", str(args.batch_rows), "--seq_len", str(args.seq_len),
           "--batch_steps", str(args.batch_steps)]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    ps = [subprocess.Popen(cmd + ["--process_index", str(p), "--out", f"{out}/host{p}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for p in range(procs)]
    res = []
    for p in ps:
        o, e = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{setup} failed: {e[-2000:]}")
        res.append(json.loads(o.strip().splitlines()[-1]))
    wall = time.perf_counter() - t
    tokens = sum(r["tokens"] for r in res)
    return {"setup": setup, "tokenizer": tok_kind, "tokens": tokens, "wall_s": wall,
            "tokenize_s": max(r["seconds"] for r in res),
            "tok_per_s": tokens / max(r["seconds"] for r in res),
            "maxrss_mb": max(r["maxrss_mb"] for r in res),
            "workers_maxrss_mb": max(r["workers_maxrss_mb"] for r in res),
            "batch_tok_per_s": res[0]["batch_tok_per_s"],
            "load": (load0, os.getloadavg()[0])}


def main() -> None:
    global SHARED
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes_mb", default="100,1000")
    ap.add_argument("--tokenizers", default="gpt2_bpe,sentencepiece")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="global batch (streams = min(B, V))")
    ap.add_argument("--batch_rows", type=int, default=64, help="rows of a served batch")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch_steps", type=int, default=2000, help="batches served per pass")
    ap.add_argument("--json")
    ap.add_argument("--shared", default=str(SHARED), help="the shared data folder")
    ap.add_argument("--smoke", action="store_true")
    # one child process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name, typ in (("pipeline", str), ("workers", int), ("processes", int),
                      ("process_index", int), ("tokenizer", str), ("corpus", str),
                      ("work", str), ("out", str)):
        ap.add_argument(f"--{name}", type=typ, help=argparse.SUPPRESS)
    args = ap.parse_args()
    SHARED = args.shared
    if args.child:
        return child(args)
    if args.smoke:
        args.sizes_mb, args.shards = "2", 64
        args.tokenizers, args.setups = "gpt2_bpe", "today,sharded-1p-2w,mixture"
        args.batch_steps = 100
    rows = []
    with tempfile.TemporaryDirectory() as work:
        write_corpus(os.path.join(work, "sample.arrayrecord"), 2)
        for size in [float(s) for s in args.sizes_mb.split(",")]:
            corpus = os.path.join(work, f"corpus-{size:g}mb.arrayrecord")
            docs = write_corpus(corpus, size)
            args.halves = write_halves(corpus) if "mixture" in args.setups else ""
            print(f"corpus {size:g} MB: {docs:,} documents", flush=True)
            for tk in args.tokenizers.split(","):
                tokenizer(tk, work)  # the SentencePiece model is trained once, outside timings
                for setup in args.setups.split(","):
                    r = dict(measure(setup, tk, corpus, work, args), size_mb=size)
                    rows.append(r)
                    print(f"{size:>6g} MB  {tk:<13} {setup:<14} {r['tok_per_s'] / 1e6:7.2f} "
                          f"M tok/s  {r['tokens'] / 1e6:8.1f} M tokens  rss {r['maxrss_mb']:7.0f} "
                          f"MB (workers {r['workers_maxrss_mb']:.0f})  load {r['load'][0]:.1f}",
                          flush=True)
                    if r["batch_tok_per_s"]:
                        print(f"{'':>9} serving batches {r['batch_tok_per_s'] / 1e6:7.1f} M tok/s",
                              flush=True)
            for path in [corpus] + [p for p in args.halves.split(",") if p]:
                os.unlink(path)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
