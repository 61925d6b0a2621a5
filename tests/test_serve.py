"""The completions server end to end: a real uvicorn server on a loopback port, called with httpx.

Reference: `gptjax.inference.sampling.generate` on the same params and seed (a completion must equal it
token for token), and the HTTP/SSE wire format as OpenAI clients read it.
"""

import concurrent.futures
import json
import pathlib
import socket
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from gptjax import GPTConfig, init_params
from gptjax.inference import sampling  # noqa: E402
from gptjax.inference.decoding import prepare_for_decoding, weights_format  # noqa: E402
from gptjax.inference import serving  # noqa: E402
from gptjax.data.tokenizers import CharTokenizer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ,.!?\n"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(app):
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert th.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return srv, th, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server():
    cfg = GPTConfig.preset("tiny", vocab_size=len(CHARS), n_ctx=64, n_layer=1)
    params = init_params(cfg, jax.random.key(0))
    # Sharper than the random init's near-uniform distribution, so the text has structure.
    params = jax.tree_util.tree_map(lambda x: x * 4.0, params)
    tok = CharTokenizer(CHARS)
    app, scheduler, engine = serving.build_server(
        cfg, params, tok, slots=4, page_size=8, prompt_buckets=(16, 64), max_queue=16,
        request_timeout_s=60.0, model_name="tiny", log=lambda *a: None)
    srv, th, url = _start(app)
    client = httpx.Client(base_url=url, timeout=60.0)
    yield types.SimpleNamespace(url=url, cfg=cfg, params=params, tok=tok, scheduler=scheduler,
                                metrics=scheduler.metrics, engine=engine, app=app, client=client)
    client.close()
    srv.should_exit = True
    th.join(timeout=10)
    scheduler.stop()


def _reference(s, prompt, *, max_tokens, temperature=1.0, top_p=1.0, seed=0):
    out = sampling.generate(s.cfg, s.params, [s.tok.encode(prompt)], max_new_tokens=max_tokens,
                            temperature=temperature, top_p=top_p, rng=jax.random.key(seed),
                            return_scores=True)
    ids = [int(t) for t in out.tokens[0][: int(out.lengths[0])]]
    return s.tok.decode(ids), out.scores[0][: len(ids)]


def _post(s, body):
    r = s.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("prompt, temperature, top_p, seed, max_tokens", [
    ("to be or not", 1.0, 1.0, 0, 20),
    ("a", 0.7, 0.9, 123, 20),
    ("the quick brown fox jumps over the lazy dog", 0.0, 1.0, 5, 20),  # greedy
])
def test_completion_equals_generate(server, prompt, temperature, top_p, seed, max_tokens):
    body = _post(server, {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                          "top_p": top_p, "seed": seed, "logprobs": 3, "model": "tiny"})
    text, scores = _reference(server, prompt, max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, seed=seed)
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == text
    np.testing.assert_allclose(lp["token_logprobs"], scores, atol=1e-5)
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and max(top.values()) >= chosen - 1e-6
    assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]))
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                             "total_tokens": len(prompt) + max_tokens}


def test_batch_mates_do_not_change_a_completion(server):
    """Requests decoded in one batch (prompt list, n, concurrent clients) equal solo generate."""
    body = _post(server, {"prompt": ["to be", "or not to be, that is"], "n": 2, "max_tokens": 15,
                          "seed": 7, "temperature": 0.9})
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    want = [_reference(server, p, max_tokens=15, temperature=0.9, seed=7 + i)[0]
            for p in ["to be", "or not to be, that is"] for i in range(2)]
    assert texts == want
    assert texts[0] != texts[1]  # choices of one prompt differ (seed + i)

    # Same max_tokens everywhere: each distinct value compiles another `generate` reference.
    reqs = [{"prompt": "hello there", "max_tokens": 15, "seed": 3 + i,
             "temperature": 0.5 + 0.2 * i, "top_p": 0.95} for i in range(4)]
    steps_before = server.metrics.counts["steps"]
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda b: _post(server, b), reqs))
    # Some were decoded together: alone, each takes 14 steps (its first token comes from insert).
    assert server.metrics.counts["steps"] - steps_before < 4 * 14
    for b, out in zip(reqs, outs):
        assert out["choices"][0]["text"] == _reference(
            server, b["prompt"], max_tokens=b["max_tokens"], temperature=b["temperature"],
            top_p=b["top_p"], seed=b["seed"])[0]


def _stream(s, body):
    chunks, done = [], False
    with s.client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line[len("data: "):]))
    assert done
    return chunks


def test_streaming_yields_the_same_text_incrementally(server):
    body = {"prompt": "to be or", "max_tokens": 30, "seed": 11, "temperature": 0.8}
    full = _post(server, body)["choices"][0]["text"]
    chunks = _stream(server, body)
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == full
    assert sum(1 for p in pieces if p) > 5  # incremental, not one final blob
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_stop_strings(server):
    base = {"prompt": "hello", "max_tokens": 40, "seed": 2, "temperature": 1.0}
    text = _post(server, base)["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(5, len(text) - 2) if text[i:i + 2].strip())
    cut = text[:text.index(stop)]
    out = _post(server, dict(base, stop=[stop, "qqqq"]))["choices"][0]
    assert out["text"] == cut and out["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["text"] for c in _stream(server, dict(base, stop=stop)))
    assert streamed == cut


def test_models_and_health(server):
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    h = server.client.get("/health").json()
    assert h["status"] == "ok" and h["shapes"]["slots"] == 4 and h["shapes"]["page_size"] == 8


def test_no_recompilation_after_warmup(server):
    """Every shape a request can reach was compiled at start: new lengths/batches compile nothing.

    The control at the end compiles something new, so the counter (and /health's view of it) is
    known to move when XLA compiles.
    """
    health_before = server.client.get("/health").json()["compilations_after_warmup"]
    cores = (serving.engine._prefill_core, serving.engine._insert_core,
             serving.engine._generate_core)
    before, cached = serving.compilations(), [f._cache_size() for f in cores]
    bodies = [{"prompt": "x" * n, "max_tokens": m, "seed": n, "temperature": t, "top_p": p,
               "logprobs": lp}
              for n, m, t, p, lp in [(1, 1, 0.0, 1.0, None), (16, 48, 1.0, 0.5, 0),
                                     (17, 30, 0.3, 1.0, 5), (63, 1, 2.0, 1.0, None),
                                     (40, 24, 1.0, 0.99, 1), (3, 61, 0.0, 1.0, 2)]]
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        list(ex.map(lambda b: _post(server, b), bodies))
    _stream(server, {"prompt": ["ab", "cd", "ef"], "max_tokens": 20, "seed": 1})
    _post(server, {"prompt": "to be", "n": 4, "max_tokens": 5, "seed": 1, "stop": "e"})
    assert serving.compilations() == before
    assert [f._cache_size() for f in cores] == cached
    assert server.client.get("/health").json()["compilations_after_warmup"] == health_before

    # Control: a function never compiled before moves both counts by the same amount.
    jax.block_until_ready(jax.jit(lambda x: x * 3 + before)(np.arange(before % 97 + 131)))
    moved = serving.compilations() - before
    assert moved >= 1
    assert server.client.get("/health").json()["compilations_after_warmup"] == health_before + moved


@pytest.mark.parametrize("content, status, param", [
    (b'{"prompt": "to be", "max_tokens": 5', 400, None),  # malformed JSON
    (b'["not", "an", "object"]', 400, None),
    ({"prompt": "to be", "max_tokens": 5, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": "to be", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "to be", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "to be", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "to be", "top_p": 0}, 400, "top_p"),
    ({"prompt": "to be", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "to be", "seed": -1}, 400, "seed"),
    ({"prompt": "to be", "n": 5}, 400, "n"),  # more choices than decode slots (4)
    ({"prompt": "to be", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x" * 64}, 400, "prompt"),  # longer than the context
    ({"prompt": "x" * 40, "max_tokens": 30}, 400, "max_tokens"),  # prompt + completion > n_ctx
    ({"prompt": "TO BE"}, 400, "prompt"),  # characters outside the vocabulary
    ({"prompt": [1, 2, 999]}, 400, "prompt"),  # token id outside the vocabulary
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "to be", "model": "gpt-4"}, 404, "model"),
])
def test_bad_input_gets_an_error_and_the_server_keeps_serving(server, content, status, param):
    if isinstance(content, bytes):
        r = server.client.post("/v1/completions", content=content,
                               headers={"Content-Type": "application/json"})
    else:
        r = server.client.post("/v1/completions", json=content)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    assert _post(server, {"prompt": "to be", "max_tokens": 3})["choices"][0]["text"]


@pytest.mark.parametrize("content, ctype", [
    (b"prompt=to+be&max_tokens=5", "application/x-www-form-urlencoded"),  # curl -d
    (b"to be", "text/plain"),
    (b"\xff\xfe", "text/plain"),
    (b'{"prompt": "\xff\xfe"}', "application/json"),  # invalid UTF-8
    (b"", "application/json"),
    (b'{"prompt": "to be"}', None),
])
def test_a_body_that_is_not_json_gets_a_4xx_json_error(server, content, ctype):
    r = server.client.post("/v1/completions", content=content,
                           headers={"Content-Type": ctype} if ctype else {})
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_unknown_route_is_an_openai_error(server):
    r = server.client.get("/v1/engines")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_disconnecting_stream_is_cancelled(server):
    before = server.metrics.counts["cancelled"]
    tokens_before = server.metrics.counts["tokens"]
    with server.client.stream("POST", "/v1/completions",
                              json={"prompt": "a", "max_tokens": 60, "seed": 0,
                                    "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk: the connection closes
    deadline = time.time() + 20
    while server.metrics.counts["cancelled"] == before:
        assert time.time() < deadline, "disconnect was not noticed"
        time.sleep(0.05)
    while server.scheduler.queued() or server.client.get("/health").json()["stats"].get(
            "tokens", 0) == tokens_before:
        assert time.time() < deadline
        time.sleep(0.05)
    assert _post(server, {"prompt": "to be", "max_tokens": 3})["choices"][0]["text"]
    end = time.time() + 20
    while server.scheduler.running():  # the cancelled row's slot and pages are given back
        assert time.time() < end
        time.sleep(0.05)
    assert len(server.engine.free_pages) == server.engine.n_pages - 1


def test_queue_full_gets_429_and_queued_requests_time_out(server):
    """A second app on a second engine whose scheduler is not running: requests only queue."""
    engine = serving.Engine(server.cfg, server.params, slots=4, page_size=8,
                            prompt_buckets=(16, 64))  # the same shapes: nothing compiles
    scheduler = serving.Scheduler(engine, server.tok, serving.ServerMetrics(), max_queue=1)
    app = serving.make_app(engine, scheduler, model_name="tiny",
                           request_timeout_s=5.0)  # the second's window
    srv, th, url = _start(app)
    try:
        with httpx.Client(base_url=url, timeout=30.0) as c, \
                concurrent.futures.ThreadPoolExecutor(1) as ex:
            first = ex.submit(c.post, "/v1/completions", json={"prompt": "to be"})
            deadline = time.time() + 60
            while scheduler.queued() == 0:
                assert time.time() < deadline, "the first request never queued"
                time.sleep(0.01)
            r = c.post("/v1/completions", json={"prompt": "to be"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            r = first.result()
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
            scheduler.start()
            r = c.post("/v1/completions", json={"prompt": "to be", "max_tokens": 4, "seed": 0})
            assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 4
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        scheduler.stop()


def test_serve_cli_bad_workdir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "serve.py", f"--workdir={tmp_path}", "--port=0"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0]


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_weight_only_server_equals_generate_with_the_same_weights(weights):
    """serve.py --weights: the engine's paged steps run the one model on weight-only parameters,
    and a completion equals sampling.generate's on the same prepared parameters."""
    cfg = GPTConfig.preset("tiny", vocab_size=len(CHARS), n_ctx=64, n_layer=1)
    params = jax.tree_util.tree_map(lambda x: x * 4.0, init_params(cfg, jax.random.key(0)))
    params = prepare_for_decoding(cfg, params, weights=weights)
    assert weights_format(params) == weights
    tok = CharTokenizer(CHARS)
    app, scheduler, _ = serving.build_server(
        cfg, params, tok, slots=2, page_size=8, prompt_buckets=(16, 64), max_queue=4,
        request_timeout_s=60.0, model_name="tiny", log=lambda *a: None)
    srv, th, url = _start(app)
    s = types.SimpleNamespace(cfg=cfg, params=params, tok=tok,
                              client=httpx.Client(base_url=url, timeout=60.0))
    try:
        for prompt, temperature, seed in (("to be or not", 0.8, 3), ("a", 0.0, 0)):
            body = _post(s, {"prompt": prompt, "max_tokens": 12, "temperature": temperature,
                             "seed": seed})
            text, _ = _reference(s, prompt, max_tokens=12, temperature=temperature, seed=seed)
            assert body["choices"][0]["text"] == text
    finally:
        s.client.close()
        srv.should_exit = True
        th.join(timeout=10)
        scheduler.stop()
