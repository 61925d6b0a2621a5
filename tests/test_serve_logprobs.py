"""Prompt log-probabilities over HTTP: `echo` + `logprobs` on /v1/completions (OpenAI's legacy).

A real server (tests/test_serve.py's fixture: a character model) answers echo requests whose
prompt log-probabilities must equal the in-process model's log-softmax; lm-eval's own
`local-completions` model pointed at a server of a tiny GPT-2 scores a local multiple-choice task
as the in-process `gptjax` lm-eval model does; the official `openai` client parses the answers.
"""

import concurrent.futures
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_gpt2_dir
from test_serve import _post, _start, _stream, server  # noqa: F401 (server: the fixture)

from gptjax import GPT
from gptjax.inference import serving
from gptjax.runs.pretrained import load_pretrained

LONG = ("the quick brown fox jumps over the lazy dog " * 2)[:64]  # n_ctx characters


def _model_logprobs(s, ids) -> np.ndarray:
    """The in-process model's log-softmax over the prompt (training layout). [L, V]

    Right-padded to n_ctx (one compiled shape): causal, so the prompt's positions see only it."""
    tokens = np.zeros((1, s.cfg.n_ctx), np.int32)
    tokens[0, :len(ids)] = ids
    logits = GPT(s.cfg).apply({"params": s.params}, jnp.asarray(tokens))[0, :len(ids)]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def _check_prompt_logprobs(s, prompt: str, lp: dict, k: int) -> None:
    """`lp`'s first len(prompt) entries are the prompt's, as OpenAI's echo defines them."""
    ids = s.tok.encode(prompt)
    L, ref = len(ids), _model_logprobs(s, ids)
    assert lp["tokens"][:L] == [s.tok.decode([t]) for t in ids] == list(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:L], ref[np.arange(L - 1), ids[1:]],
                               rtol=1e-5, atol=1e-5)
    for i in range(1, L):
        top = lp["top_logprobs"][i]
        want = np.argsort(-ref[i - 1])[:k]
        names = [s.tok.decode([int(j)]) for j in want]
        assert set(top) == set(names), i
        np.testing.assert_allclose([top[n] for n in names], ref[i - 1][want], atol=1e-5)
    assert lp["text_offset"][:L] == list(range(L))


def test_echo_prompt_logprobs_equal_the_models_log_softmax(server):
    """max_tokens=0: the prompt alone, every token scored (a whole-context prompt too)."""
    prompts = ["to be or not to be, that is", "a", LONG]
    body = _post(server, {"prompt": prompts, "echo": True, "logprobs": 5, "max_tokens": 0})
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == prompts
    assert all(c["finish_reason"] == "length" for c in choices)
    for prompt, c in zip(prompts, choices):
        assert len(c["logprobs"]["tokens"]) == len(prompt)
        _check_prompt_logprobs(server, prompt, c["logprobs"], 5)
    n = sum(map(len, prompts))
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    # Token ids in, the decoded prompt echoed; logprobs=0: no alternatives.
    ids = server.tok.encode("or not")
    c = _post(server, {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0})["choices"][0]
    assert c["text"] == "or not" and c["logprobs"]["top_logprobs"] == [None] * len(ids)
    np.testing.assert_allclose(c["logprobs"]["token_logprobs"][1:], _model_logprobs(
        server, ids)[np.arange(len(ids) - 1), ids[1:]], rtol=1e-5, atol=1e-5)


def test_echo_then_completion_streaming_and_not(server):
    """echo with max_tokens > 0: the prompt, then the same completion as without echo."""
    base = {"prompt": "to be or", "max_tokens": 10, "seed": 4, "temperature": 0.8, "logprobs": 2}
    plain = _post(server, base)["choices"][0]
    full = _post(server, dict(base, echo=True))["choices"][0]
    assert full["text"] == "to be or" + plain["text"]
    lp, L = full["logprobs"], len("to be or")
    _check_prompt_logprobs(server, "to be or", lp, 2)
    assert lp["tokens"][L:] == plain["logprobs"]["tokens"]
    np.testing.assert_allclose(lp["token_logprobs"][L:], plain["logprobs"]["token_logprobs"],
                               atol=1e-6)
    assert lp["text_offset"] == list(np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]))

    chunks = _stream(server, dict(base, echo=True))
    first = chunks[0]["choices"][0]
    assert first["text"] == "to be or" and first["logprobs"]["tokens"] == list("to be or")
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((x[key] for x in streamed), []) == lp[key], key
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # Prompt only, streamed: one chunk with the prompt, then the finish.
    chunks = _stream(server, {"prompt": "ab", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert [c["choices"][0]["text"] for c in chunks] == ["ab", ""]
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # echo without logprobs, n = 2: each choice starts with the prompt.
    body = _post(server, {"prompt": "to", "echo": True, "n": 2, "max_tokens": 5, "seed": 1})
    assert all(c["text"].startswith("to") and len(c["text"]) == 7 and c["logprobs"] is None
               for c in body["choices"])


def test_prompt_only_request_needs_no_decode_slot(server):
    """An echo request with max_tokens=0 is prefilled and scored, never inserted into a decode
    slot: the scheduler's insert count is the 4 long rows' whether or not they still decode
    (structural, so no timing decides the test)."""
    def inserts():
        return sum(e[0] == "insert" for e in server.scheduler.trace)
    before = inserts()
    long = {"prompt": "a", "max_tokens": 63, "seed": 0}
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(_post, server, long) for _ in range(4)]
        deadline = time.time() + 120
        while inserts() < before + 4:
            assert time.time() < deadline, "the 4 long rows were not inserted within 120 s"
            time.sleep(0.005)
        c = _post(server, {"prompt": "to be", "echo": True, "logprobs": 1,
                           "max_tokens": 0})["choices"][0]
        assert inserts() == before + 4  # the prompt-only request took no slot
        assert c["text"] == "to be" and c["finish_reason"] == "length"
        assert all(len(f.result()["choices"][0]["text"]) == 63 for f in futs)


def test_echo_compiles_nothing_after_warmup(server):
    before = serving.compilations()
    bodies = [{"prompt": "x" * n, "max_tokens": m, "seed": n, "echo": True, "logprobs": lp}
              for n, m, lp in [(1, 0, 5), (16, 0, 1), (17, 0, 0), (63, 1, 3), (64, 0, 2),
                               (40, 8, None), (5, 0, None)]]
    for b in bodies:
        _post(server, b)
    _stream(server, {"prompt": ["ab", "cd"], "max_tokens": 0, "echo": True, "logprobs": 5})
    assert serving.compilations() == before


@pytest.mark.parametrize("content, param, says", [
    ({"prompt": "to be", "echo": True, "logprobs": 1, "max_tokens": 0, "use_beam_search": True},
     "use_beam_search", "no beam search"),
    ({"prompt": "to be", "echo": True, "best_of": 3, "n": 1}, "best_of", "no beam search"),
    ({"prompt": "to be", "echo": True, "logprobs": 6, "max_tokens": 0}, "logprobs", "logprobs=6"),
    ({"prompt": "to be", "echo": True, "logprobs": -1}, "logprobs", "logprobs=-1"),
    ({"prompt": "to be", "echo": "yes"}, "echo", "echo="),
    ({"prompt": "to be", "max_tokens": 0}, "max_tokens", "echo=true"),  # scoring needs echo
    ({"prompt": "to be", "echo": True, "max_tokens": -1}, "max_tokens", "max_tokens=-1"),
    ({"prompt": "x" * 65, "echo": True, "max_tokens": 0}, "prompt", "65 tokens"),
    ({"prompt": "x" * 64, "echo": True, "max_tokens": 1}, "prompt", "65 tokens"),
])
def test_bad_echo_requests_get_one_400(server, content, param, says):
    r = server.client.post("/v1/completions", json=content)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert says in err["message"] and "\n" not in err["message"], err
    assert _post(server, {"prompt": "to be", "echo": True, "max_tokens": 0,
                          "logprobs": 1})["choices"][0]["text"] == "to be"


def test_openai_client_parses_echo_logprobs(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    raw = _post(server, {"prompt": "to be or not", "echo": True, "logprobs": 3, "max_tokens": 4,
                         "seed": 9, "model": "tiny"})
    c = client.completions.create(model="tiny", prompt="to be or not", echo=True, logprobs=3,
                                  max_tokens=4, seed=9)
    choice = c.choices[0]
    assert choice.text == raw["choices"][0]["text"] and choice.finish_reason == "length"
    assert choice.logprobs.model_dump() == raw["choices"][0]["logprobs"]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert c.usage.prompt_tokens == len("to be or not") and c.usage.completion_tokens == 4
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt="to be or not", echo=True, logprobs=3, max_tokens=4, seed=9,
        stream=True))
    assert text == choice.text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="to be", echo=True, logprobs=6,
                                  max_tokens=0)
    assert e.value.status_code == 400 and "logprobs" in str(e.value)


# ---------------------------------------------------------------------------- lm-eval over HTTP
N_CTX = 48
WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang over green hills "
         "near old towns where people walk slowly").split()


@pytest.fixture(scope="module")
def gpt2_server(tmp_path_factory):
    """A tiny GPT-2 (real BPE) served, and a local multiple-choice task for lm-eval."""
    d = hf_gpt2_dir(tmp_path_factory.mktemp("hf_gpt2"), N_CTX, initializer_range=0.1)
    model = load_pretrained(hf_dir=str(d))
    # One prompt bucket and one page per row: few shapes to compile (4 programs).
    app, scheduler, _ = serving.build_server(*model, slots=4, page_size=N_CTX,
                                             prompt_buckets=(N_CTX,), max_queue=16,
                                             model_name="gpt2-tiny", log=lambda *a: None)
    srv, th, url = _start(app)
    tasks = tmp_path_factory.mktemp("tasks")
    docs = [{"q": " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6)),
             "choices": [" cat", " dog", " the park"], "label": i % 3} for i in range(6)]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (tasks / "t_mc_http.yaml").write_text(
        f"task: t_mc_http\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    yield types.SimpleNamespace(dir=d, model=model, url=url, tasks=tasks,
                                metrics=scheduler.metrics)
    srv.should_exit = True
    th.join(timeout=10)
    scheduler.stop()


def test_lm_eval_local_completions_equals_the_in_process_model(gpt2_server):
    """lm-eval's own `local-completions` model (echo=True, max_tokens=1, logprobs=1, prompts as
    token lists, 4 per request) against serve's HTTP API: the same per-example log-likelihoods
    (1e-5 relative), greedy flags and accuracy as the in-process `gptjax` lm-eval model."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need lm-eval[api]
    from lm_eval.tasks import TaskManager  # optional: the eval extra

    from gptjax.eval.lm_harness import GPTJaxLM  # optional: the eval extra

    s = gpt2_server
    tasks = TaskManager(include_path=str(s.tasks))

    def run(model, **kw):
        return lm_eval.simple_evaluate(model=model, tasks=["t_mc_http"], task_manager=tasks,
                                       bootstrap_iters=0, log_samples=True, **kw)

    rows_before = s.metrics.counts["rows"]
    http = run("local-completions", batch_size=4, model_args={
        "base_url": s.url + "/v1/completions", "model": "gpt2-tiny",
        "tokenizer_backend": "huggingface", "tokenizer": str(s.dir), "max_length": N_CTX,
        "max_retries": 1})
    assert s.metrics.counts["rows"] - rows_before == 6 * 3  # every choice went over HTTP
    ours = run(GPTJaxLM(model=s.model, batch_size=4))
    a = sorted(http["samples"]["t_mc_http"], key=lambda x: x["doc_id"])
    b = sorted(ours["samples"]["t_mc_http"], key=lambda x: x["doc_id"])
    assert len(a) == len(b) == 6
    lls, worst = [], 0.0
    for sa, sb in zip(a, b):
        for (x,), (y,) in zip(sa["resps"], sb["resps"], strict=True):
            assert x[0] == pytest.approx(y[0], rel=1e-5) and x[1] == y[1], sa["doc_id"]
            lls.append(y[0])
            worst = max(worst, abs(x[0] - y[0]) / abs(y[0]))
    print(f"largest per-example relative log-likelihood difference: {worst:.2e}")
    assert len(set(np.round(lls, 3))) > 3  # the choices score differently (not at chance)
    for metric in ("acc,none", "acc_norm,none"):
        assert http["results"]["t_mc_http"][metric] == ours["results"]["t_mc_http"][metric]
