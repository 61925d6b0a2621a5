"""Continuous batching end to end: a real uvicorn server on loopback with 4 decode slots, and the
host time per token of one long request.

Reference: `gptjax.inference.sampling.generate` on the same params and seed, for every row of a
mixed batch; the scheduler's trace (which slot was freed / filled before which decode step) for
slot reuse; prometheus_client's parser for /metrics.
"""

import concurrent.futures
import json
import threading
import time
import types

import jax
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from gptjax import GPTConfig, init_params  # noqa: E402
from gptjax.data.tokenizers import CharTokenizer  # noqa: E402
from gptjax.inference import serving  # noqa: E402

from test_serve import CHARS, _post, _reference, _start  # noqa: E402

SLOTS = 4


@pytest.fixture(scope="module")
def server():
    cfg = GPTConfig.preset("tiny", vocab_size=len(CHARS), n_ctx=64, n_layer=2)
    params = jax.tree_util.tree_map(lambda x: x * 4.0, init_params(cfg, jax.random.key(1)))
    tok = CharTokenizer(CHARS)
    app, scheduler, engine = serving.build_server(
        cfg, params, tok, slots=SLOTS, page_size=8, prompt_buckets=(16, 64), max_queue=16,
        request_timeout_s=60.0, model_name="tiny", log=lambda *a: None)
    srv, th, url = _start(app)
    client = httpx.Client(base_url=url, timeout=60.0)
    yield types.SimpleNamespace(url=url, cfg=cfg, params=params, tok=tok, scheduler=scheduler,
                                engine=engine, app=app, client=client)
    client.close()
    srv.should_exit = True
    th.join(timeout=10)
    scheduler.stop()


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Decode steps of at least 20 ms, so that the timing of a test does not depend on the CPU."""
    fast = server.engine.generate

    def slow():
        time.sleep(0.02)
        return fast()
    monkeypatch.setattr(server.engine, "generate", slow)


def _wait_until(cond, what, timeout=60.0, during=None):
    """Polls `cond` until it holds; fails (instead of spinning forever) after `timeout` s."""
    end = time.monotonic() + timeout
    while not cond():
        if during is not None:
            during()
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def _stream_text(s, body, client=None, on_first=None):
    pieces, done = {}, False
    with (client or s.client).stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                c = json.loads(line[6:])["choices"][0]
                pieces[c["index"]] = pieces.get(c["index"], "") + c["text"]
                if on_first is not None:
                    on_first, _ = None, on_first()
    assert done
    return pieces


def test_every_row_of_a_mixed_batch_equals_generate(server):
    """Greedy and seeded rows of many prompt lengths and sizes, joining and leaving the running
    batch at different steps (more rows than slots), each equal solo `generate`."""
    bodies = [
        {"prompt": "to be or not", "max_tokens": 40, "temperature": 0.8, "seed": 1, "logprobs": 2},
        {"prompt": "a", "max_tokens": 8, "temperature": 0.0},
        {"prompt": "the quick brown fox jumps over", "max_tokens": 8, "temperature": 1.0,
         "top_p": 0.9, "seed": 2},
        {"prompt": "hello", "max_tokens": 40, "temperature": 0.0, "stream": True},
        {"prompt": ["xy", "what is it"], "n": 2, "max_tokens": 8, "temperature": 0.7, "seed": 3},
        {"prompt": "zz", "max_tokens": 8, "temperature": 1.2, "seed": 4, "stream": True},
    ]

    def run(b):
        if b.get("stream"):
            return [_stream_text(server, b)[0]], None
        out = _post(server, b)
        ch = sorted(out["choices"], key=lambda c: c["index"])
        return [c["text"] for c in ch], ch[0]["logprobs"]

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as ex:
        outs = list(ex.map(run, bodies))
    for b, (texts, lp) in zip(bodies, outs):
        prompts = b["prompt"] if isinstance(b["prompt"], list) else [b["prompt"]]
        want = [_reference(server, p, max_tokens=b["max_tokens"],
                           temperature=b.get("temperature", 1.0), top_p=b.get("top_p", 1.0),
                           seed=b.get("seed", 0) + i)
                for p in prompts for i in range(b.get("n", 1))]
        assert texts == [w[0] for w in want], b
        if lp is not None:
            np.testing.assert_allclose(lp["token_logprobs"], want[0][1], atol=1e-5)
    inserts = [e for e in server.scheduler.trace if e[0] == "insert"]
    assert len({e[2] for e in inserts}) > 1  # rows joined a running batch at different steps


def test_short_request_after_long_one_finishes_first(server, slow_steps):
    done, started = {}, threading.Event()

    def long():
        _stream_text(server, {"prompt": "to be", "max_tokens": 50, "seed": 0},
                     on_first=started.set)
        done["long"] = time.monotonic()

    th = threading.Thread(target=long)
    th.start()
    assert started.wait(30)
    _post(server, {"prompt": "a", "max_tokens": 3, "seed": 0})
    done["short"] = time.monotonic()
    th.join(60)
    assert done["short"] < done["long"]


def test_short_row_reads_its_own_pages_beside_a_long_one(server, slow_steps, monkeypatch):
    """A long request and a short one decode in the same steps; each step reads the pages the
    rows hold (the long row's ceil(pos / 8), the short one's 1), not rows x the longest row, and
    every page is given back when they end. Both equal solo `generate`."""
    eng = server.engine
    reads, generate = [], eng.generate

    def counting():
        active = eng.active()
        held = [(eng.length[s] + eng.asked[s] - 1) // eng.page_size + 1
                for s in np.flatnonzero(active)]
        reads.append(held)
        return generate()
    monkeypatch.setattr(eng, "generate", counting)
    started, out = threading.Event(), {}
    body = {"prompt": "to be", "max_tokens": 50, "temperature": 0.8, "seed": 3}
    th = threading.Thread(target=lambda: out.update(long=_stream_text(server, body,
                                                                      on_first=started.set)))
    th.start()
    assert started.wait(30)
    _wait_until(lambda: max((max(r) for r in reads if r), default=0) >= 3, "the long row to grow")
    short = _post(server, {"prompt": "a", "max_tokens": 3, "seed": 0})
    th.join(60)
    both = [r for r in reads if len(r) == 2]
    assert both and all(min(r) == 1 and max(r) >= 3 for r in both)  # short: 1 page, long: more
    # The page bucket a shared step reads: the sum of the rows' pages, rounded up to a power of
    # two, less than two rows at the long row's length.
    assert all(next(b for b in eng.page_buckets if b >= sum(r)) < 2 * 8 for r in both)
    assert short["choices"][0]["text"] == _reference(server, "a", max_tokens=3)[0]
    assert out["long"][0] == _reference(server, "to be", max_tokens=50, temperature=0.8, seed=3)[0]
    _wait_until(lambda: server.scheduler.running() == 0, "the slots to be freed")
    assert len(eng.free_pages) == eng.n_pages - 1


def _reuse(server, why):
    """Steps dispatched when the last inserted row's slot was freed by `why`, and when refilled."""
    trace = list(server.scheduler.trace)
    i = max(k for k, e in enumerate(trace) if e[0] == "insert")
    slot = trace[i][1]
    freed = next(e for e in reversed(trace[:i]) if e[1] == slot)
    assert freed[0] == why, trace[-12:]
    return freed[2], trace[i][2]


@pytest.mark.parametrize("why", ["finish", "cancel", "timeout"])
def test_freed_slot_is_reused_at_the_next_step(server, slow_steps, monkeypatch, why):
    """Slots full of long streams; one row finishes, is cancelled or times out while a request
    waits: the waiting request is inserted into that slot before the next decode step."""
    if why == "timeout":
        # Steps of at least 50 ms: the long rows (60 tokens) outlive the fourth request's 1 s
        # timeout with seconds to spare, and the test has that second to queue a request.
        slow = server.engine.generate
        monkeypatch.setattr(server.engine, "generate",
                            lambda: (time.sleep(0.03), slow())[1])
    ev = threading.Event()
    clients = [httpx.Client(base_url=server.url, timeout=60.0) for _ in range(SLOTS)]
    with concurrent.futures.ThreadPoolExecutor(SLOTS + 1) as ex:
        longs = [ex.submit(_stream_text, server, {"prompt": "ab", "max_tokens": 60, "seed": i},
                           clients[i]) for i in range(SLOTS - 1)]
        _wait_until(lambda: server.scheduler.running() >= SLOTS - 1, "the long rows to run")
        if why == "finish":
            fourth = ex.submit(_post, server, {"prompt": "ab", "max_tokens": 15})
        elif why == "timeout":
            server.app.state.request_timeout_s = 1.0
            fourth = ex.submit(clients[-1].post, "/v1/completions",
                               json={"prompt": "ab", "max_tokens": 60})
        else:
            def leave():
                with clients[-1].stream("POST", "/v1/completions",
                                        json={"prompt": "ab", "max_tokens": 60,
                                              "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            ev.wait(30)
                            return  # closes the connection mid-stream
            fourth = ex.submit(leave)
        _wait_until(lambda: server.scheduler.running() >= SLOTS, "all slots to run")
        server.app.state.request_timeout_s = 60.0
        waiting = ex.submit(_post, server, {"prompt": "cd", "max_tokens": 3})
        _wait_until(lambda: server.scheduler.queued() > 0, "the request to queue",
                    during=lambda: not waiting.done() or pytest.fail("it did not wait"))
        ev.set()
        assert waiting.result(60)["choices"][0]["text"]
        r = fourth.result(60)
        if why == "timeout":
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
        freed_at, refilled_at = _reuse(server, why)
        assert refilled_at == freed_at
        for f in longs:
            f.result(60)
    for c in clients:
        c.close()


def test_no_compilation_after_warmup_under_mixed_load(server):
    before = serving.compilations()
    metric_before = server.client.get("/health").json()["compilations_after_warmup"]
    bodies = [{"prompt": "x" * n, "max_tokens": m, "seed": n, "temperature": t, "top_p": p,
               "logprobs": lp, "stream": st}
              for n, m, t, p, lp, st in [(1, 1, 0.0, 1.0, None, False), (16, 48, 1.0, 0.5, 0, True),
                                         (17, 30, 0.3, 1.0, 5, False),
                                         (63, 1, 2.0, 1.0, None, False),
                                         (40, 24, 1.0, 0.99, 1, True), (3, 61, 0.0, 1.0, 2, False),
                                         (5, 10, 0.9, 1.0, None, True)]]

    def send(b):
        if b.pop("stream"):
            return _stream_text(server, b)
        return _post(server, b)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as ex:
        list(ex.map(send, bodies))
    _post(server, {"prompt": ["ab", "cd"], "n": 2, "max_tokens": 5, "seed": 1, "stop": "e"})
    assert serving.compilations() == before
    assert server.client.get("/health").json()["compilations_after_warmup"] == metric_before


def _metrics(server) -> dict:
    parser = pytest.importorskip("prometheus_client.parser")
    r = server.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in parser.text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_parse_and_count_the_requests_sent(server):
    m0 = _metrics(server)
    ok = [_post(server, {"prompt": "to be", "max_tokens": k, "seed": k}) for k in (3, 5, 7)]
    _stream_text(server, {"prompt": "to be", "max_tokens": 4})
    bad = [server.client.post("/v1/completions", json={"prompt": "to be", "n": 0}),
           server.client.post("/v1/completions", content=b"prompt=hi",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})]
    assert [r.status_code for r in bad] == [400, 400]
    m1 = _metrics(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0) - m0.get(key, 0)

    assert delta("gptjax_requests_total", code="200") == 4
    assert delta("gptjax_requests_total", code="400") == 2
    assert delta("gptjax_generated_tokens_total") == sum(
        o["usage"]["completion_tokens"] for o in ok) + 4
    assert delta("gptjax_time_to_first_token_seconds_count") == 4
    assert delta("gptjax_time_per_output_token_seconds_count") == 4
    assert m1[("gptjax_decode_slots", ())] == SLOTS
    # The tests' `generate` references compile in this process too: the metric is that count.
    assert m1[("gptjax_compilations_after_warmup_total", ())] == (
        serving.compilations() - server.app.state.compiles_at_start)
    assert ("gptjax_queue_length", ()) in m1 and ("gptjax_running_slots", ()) in m1
    assert delta("gptjax_steps_total") > 0 and delta("gptjax_requests_cancelled_total") == 0
    assert m1[("gptjax_host_seconds_total", (("thread", "detokenizer"),))] > 0


def test_queue_full_gets_429_with_retry_after(server):
    """A second app on the same engine whose scheduler is not running: requests only queue."""
    scheduler = serving.Scheduler(server.engine, server.tok, serving.ServerMetrics(), max_queue=1)
    # (the first request's 5 s timeout is the window for the second one to find the queue full)
    app = serving.make_app(server.engine, scheduler, model_name="tiny", request_timeout_s=5.0)
    srv, th, url = _start(app)
    try:
        with httpx.Client(base_url=url, timeout=30.0) as c, \
                concurrent.futures.ThreadPoolExecutor(1) as ex:
            first = ex.submit(c.post, "/v1/completions", json={"prompt": "to be"})
            _wait_until(lambda: scheduler.queued() > 0, "the first request to queue")
            r = c.post("/v1/completions", json={"prompt": "to be"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
            r = first.result()
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
    finally:
        srv.should_exit = True
        th.join(timeout=10)


class _HostLog(serving.ServerMetrics):
    """ServerMetrics that also keeps every host-time report, in order, per thread."""

    def __init__(self):
        super().__init__()
        self.log = {"scheduler": [], "detokenizer": []}

    def add_host_time(self, thread, seconds, tokens):
        super().add_host_time(thread, seconds, tokens)
        self.log[thread].append((seconds, tokens))


def test_host_time_per_token_does_not_grow_with_the_output():
    """One request of 1,200 tokens on a tiny model with a 2048-token context: the host threads'
    own CPU time per token (scheduler bookkeeping + detokenizer; `time.thread_time`, so neither
    the device's work nor waiting on a loaded machine counts) is, over the last 200 tokens, at
    most 2x what it is over tokens 100-300. Decoding a row's whole text at every token (O(n)
    per token) grows several-fold over such a run."""
    import asyncio

    chars = CHARS
    cfg = GPTConfig.preset("tiny", vocab_size=len(chars), n_ctx=2048, n_layer=1, n_embd=16)
    params = init_params(cfg, jax.random.key(0))
    tok = CharTokenizer(chars)
    metrics = _HostLog()
    engine = serving.Engine(cfg, params, slots=1, page_size=64, prompt_buckets=(16, 2048))
    sched = serving.Scheduler(engine, tok, metrics)
    sched.start()
    n = 1200
    try:
        loop = asyncio.new_event_loop()
        row = serving.make_row(tok.encode("to be"), seed=0, temperature=1.0, top_p=1.0,
                               max_tokens=n, logprobs=None, stops=("zzzzzz", "qqq"), index=0)
        job = serving.Job([row], loop, time.monotonic() + 600)
        sched.submit(job)

        async def wait():
            while (await job.queue.get())[0] != "finish":
                pass
        loop.run_until_complete(asyncio.wait_for(wait(), 600))
        loop.close()
    finally:
        sched.stop()
    assert len(row.new_ids) == n and len(row.text) == n
    per_token = []
    for thread in ("scheduler", "detokenizer"):
        log = metrics.log[thread]  # (seconds, tokens) per report: spread over its tokens
        assert sum(k for _, k in log) == n, thread
        per_token.append(np.concatenate([np.full(k, s / k) for s, k in log if k]))
    host = per_token[0] + per_token[1]
    start, end = np.median(host[100:300]), np.median(host[-200:])
    assert end <= 2 * start, (start, end)


class _Bytes:
    """UTF-8 bytes as tokens (a character may span several), as a byte-level BPE's are."""
    eos_id = None

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("stops, want", [((), "héllo wörld, 日本語 ok"),
                                         (("語 o",), "héllo wörld, 日本"),
                                         (("ö",), "héllo w")])
def test_incremental_detokenization_emits_whole_characters(stops, want):
    """Tokens that split characters: the deltas are never a partial character, add up to the
    whole text (cut at the first stop string, which may span tokens), and each token decodes
    only the row's tail (at most CONTEXT_TOKENS + the pending ids)."""
    from gptjax.inference.serving import detok

    text = "héllo wörld, 日本語 ok"
    ids = list(text.encode())
    tok, calls = _Bytes(), []
    decode = tok.decode
    tok.decode = lambda x: (calls.append(len(x)), decode(x))[1]
    row = serving.make_row([0], seed=0, temperature=1.0, top_p=1.0, max_tokens=len(ids),
                           logprobs=None, stops=stops, index=0)
    deltas = []
    for i, t in enumerate(ids):
        delta, _ = detok.advance(tok, None, row, t, 0.0, [], [],
                                 "length" if i == len(ids) - 1 else None)
        deltas.append(delta)
        if row.finish_reason is not None:
            break
    assert "".join(deltas) == want and row.text == want
    assert not any("\ufffd" in d for d in deltas)
    assert row.finish_reason == ("stop" if stops else "length")
    assert max(calls) <= detok.CONTEXT_TOKENS + 4  # a UTF-8 character is at most 4 bytes
