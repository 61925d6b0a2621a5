"""The HTTP API: OpenAI-style completions over the engine and its scheduler (FastAPI).

POST /v1/completions (prompt str or list, max_tokens, temperature, top_p, n, stop, seed, stream,
logprobs, echo), GET /v1/models, GET /health, GET /metrics (Prometheus text); errors are
OpenAI-style bodies {"error": {"message", "type", "param", "code"}}.

echo, as OpenAI's legacy completions: a choice's text starts with the prompt, and with logprobs
its `logprobs` start with the prompt's tokens, each with its log-probability given the ones
before it and the top alternatives there (the first token's are null: nothing predicts it);
`max_tokens` may then be 0 (the prompt alone: how lm-eval's `local-completions` and other
harnesses score a continuation). The scores come out of the prompt's prefill (a scoring variant
of it, compiled at warm-up), batched by the scheduler like any request.

Seeds: choice i of each prompt uses seed + i (mod 2**32), i.e. it equals
`generate([prompt], rng=jax.random.key(seed + i))`; with no seed a random one is drawn.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import secrets
import time
import uuid
from typing import Optional, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptjax.inference.serving.engine import (
    MAX_LOGPROBS,
    Engine,
    compilations,
    start_compile_counter,
)
from gptjax.inference.serving.metrics import CONTENT_TYPE, ServerMetrics, StatusCounter
from gptjax.inference.serving.requests import Job, make_row
from gptjax.inference.serving.scheduler import QueueFull, Scheduler

MAX_STOP = 4
NOT_IMPLEMENTED = {k: " (this server samples or decodes greedily: it has no beam search or "
                   "best-of; echo and logprobs score a prompt without one)"
                   for k in ("use_beam_search", "best_of", "num_beams")}


# ---------------------------------------------------------------------------- errors and bodies
def _error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                503: "server_error"}


class RequestError(Exception):
    """An error answered with an HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


class CompletionRequest(BaseModel):
    """POST /v1/completions: the OpenAI fields gptjax implements; any other field is refused."""
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=0, strict=True)  # 0: with echo only (score the prompt)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, strict=True)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**32, strict=True)
    stream: bool = Field(False, strict=True)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    echo: bool = Field(False, strict=True)
    user: Optional[str] = None


def _prompt_ids(j: int, p, tok, cfg) -> list:
    """The token ids of prompt[j] (a string or a list of ids), or RequestError."""
    if isinstance(p, str):
        try:
            ids = tok.encode(p)
        except ValueError as e:
            raise RequestError(400, f"prompt[{j}]: {e}", "prompt") from None
        if not ids:
            if tok.eos_id is None:
                raise RequestError(400, f"prompt[{j}] is empty and this tokenizer has no "
                                   "end-of-text token to start from", "prompt")
            ids = [tok.eos_id]
        return list(ids)
    ids = list(p)
    if not ids:
        raise RequestError(400, f"prompt[{j}] is an empty token list", "prompt")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise RequestError(400, f"prompt[{j}] holds token id {bad[0]}: ids must be in "
                           f"[0, {cfg.vocab_size})", "prompt")
    return ids


def _check_length(j: int, ids: list, req, engine: Engine) -> None:
    """RequestError unless prompt[j] and its completion fit the context (and a prefill)."""
    cfg = engine.config
    if len(ids) + req.max_tokens > cfg.n_ctx:
        raise RequestError(
            400, f"This model's maximum context length is {cfg.n_ctx} tokens, however you "
            f"requested {len(ids) + req.max_tokens} tokens ({len(ids)} in prompt[{j}]; "
            f"{req.max_tokens} for the completion). Shorten the prompt or lower max_tokens.",
            "prompt" if len(ids) >= cfg.n_ctx else "max_tokens", "context_length_exceeded")
    if len(ids) > engine.prompt_buckets[-1]:  # only a whole-context prompt, max_tokens=0
        raise RequestError(400, f"prompt[{j}] has {len(ids)} tokens: this server prefills at "
                           f"most {engine.prompt_buckets[-1]} (--prompt_buckets)", "prompt",
                           "context_length_exceeded")


def _build_rows(req, engine: Engine, tok) -> tuple:
    """(rows, prompt token count) for a validated request, or RequestError."""
    prompts = req.prompt
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                    and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise RequestError(400, "prompt is an empty list: give a string or a list of strings",
                           "prompt")
    if req.max_tokens == 0 and not req.echo:
        raise RequestError(400, "max_tokens=0: give max_tokens >= 1, or echo=true to score "
                           "the prompt alone", "max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise RequestError(400, f"stop={stops!r}: give up to {MAX_STOP} non-empty strings",
                           "stop")
    if len(prompts) * req.n > engine.slots:
        raise RequestError(400, f"{len(prompts)} prompt(s) x n={req.n} = {len(prompts) * req.n} "
                           f"choices: at most {engine.slots} per request (the decode slots)",
                           "n")
    id_lists = []
    for j, p in enumerate(prompts):
        ids = _prompt_ids(j, p, tok, engine.config)
        _check_length(j, ids, req, engine)
        id_lists.append(ids)
    seed = req.seed if req.seed is not None else secrets.randbits(32)
    rows = []
    for j, ids in enumerate(id_lists):
        # echo: the prompt as sent (a token list: its decoded text), as OpenAI's legacy API.
        echo = None if not req.echo else (
            prompts[j] if isinstance(prompts[j], str) else tok.decode(ids))
        for i in range(req.n):
            rows.append(make_row(ids, seed=seed + i, temperature=req.temperature,
                                 top_p=req.top_p, max_tokens=req.max_tokens,
                                 logprobs=req.logprobs, stops=tuple(stops),
                                 index=j * req.n + i, echo=echo))
    return rows, sum(len(x) for x in id_lists)


def _logprobs_body(token_strs, token_logprobs, top_logprobs, start_offset: int = 0) -> dict:
    offsets, off = [], start_offset
    for s in token_strs:
        offsets.append(off)
        off += len(s)
    return {"tokens": token_strs, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


def _completion_body(base: dict, rows: list, prompt_tokens: int) -> dict:
    """The JSON answer of a non-streaming request whose rows have all finished."""
    choices = []
    for r in rows:
        lp = None
        if r.logprobs is not None:
            lp = _logprobs_body(r.token_strs, r.token_logprobs, r.top_logprobs)
        choices.append({"text": (r.echo or "") + r.text, "index": r.index, "logprobs": lp,
                        "finish_reason": r.finish_reason})
    completion = sum(len(r.new_ids) for r in rows)
    return dict(base, choices=choices, usage={
        "prompt_tokens": prompt_tokens, "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion})


def _error_response(status: int, message: str, param: Optional[str] = None,
                    code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(_error_body(message, _ERROR_TYPES.get(status, "invalid_request_error"),
                                    param, code), status_code=status, headers=headers)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """HTTP 400 naming the first invalid field of a request body, and what is allowed."""
    errs = exc.errors()
    e = errs[0] if errs else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return _error_response(400, f"malformed JSON body: {e.get('msg')} "
                               f"(at character {loc[-1] if loc else '?'})", None, "json_invalid")
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    if not loc and (e.get("type") == "missing" or isinstance(e.get("input"), (bytes, str))):
        # Not a JSON object: an empty body, or one sent as text or a form (`curl -d` does that).
        return _error_response(400, "the request body must be a JSON object sent with "
                               "Content-Type: application/json (curl: add -H 'Content-Type: "
                               "application/json')", None, "invalid_body")
    if e.get("type") == "extra_forbidden":
        # A field of OpenAI's or vLLM's API this server does not implement.
        why = NOT_IMPLEMENTED.get(loc[0] if loc else "", "")
        msg = (f"unknown field {where!r}{why}: allowed fields are "
               f"{', '.join(sorted(CompletionRequest.model_fields))}")
    elif e.get("type") == "missing":
        msg = f"missing required field {where!r}"
    else:
        got = e.get("input")
        got = json.dumps(got, default=repr)[:80] if got is not None else "null"
        msg = f"{where}={got}: {e.get('msg')}"
    return _error_response(400, msg, param, e.get("type"))


# ---------------------------------------------------------------------------- job events
async def _next_event(job: Job, metrics: ServerMetrics) -> tuple:
    """The job's next event; RequestError 503 once its deadline (plus a second) has passed."""
    remaining = job.deadline - time.monotonic()
    try:
        return await asyncio.wait_for(job.queue.get(), timeout=max(remaining, 0.0) + 1.0)
    except asyncio.TimeoutError:
        metrics.count("timed_out")
        raise RequestError(503, "the request timed out (server busy); retry or raise "
                           "--request_timeout", None, "timeout") from None


async def _collect(job: Job, metrics: ServerMetrics) -> None:
    """Wait until every row of the job has finished (the rows hold the results)."""
    left = len(job.rows)
    while left:
        ev = await _next_event(job, metrics)
        if ev[0] == "finish":
            left -= 1
        elif ev[0] == "error":
            raise RequestError(ev[1], ev[2], None, ev[3])
    metrics.observe_job(job)


def _stream_chunk(ev: tuple, offsets: collections.Counter) -> dict:
    """The choice of one streamed chunk for a "delta" or "finish" event."""
    if ev[0] == "delta":
        _, idx, text, lp = ev
        lp_body = None
        if lp is not None:
            lp_body = _logprobs_body(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                     offsets[idx])
            offsets[idx] += sum(len(s) for s in lp["tokens"])
        return {"text": text, "index": idx, "logprobs": lp_body, "finish_reason": None}
    return {"text": "", "index": ev[1], "logprobs": None, "finish_reason": ev[2]}


async def _stream(job: Job, base: dict, metrics: ServerMetrics):
    """Server-sent events of a streaming request: chunks, then `data: [DONE]` (or one error)."""
    left = len(job.rows)
    offsets = collections.Counter()
    try:
        while left:
            try:
                ev = await _next_event(job, metrics)
            except RequestError as e:
                ev = ("error", e.status, e.message, e.code)
            if ev[0] == "error":
                body = _error_body(ev[2], _ERROR_TYPES.get(ev[1], "server_error"), None, ev[3])
                yield f"data: {json.dumps(body)}\n\n"
                return
            if ev[0] == "finish":
                left -= 1
            yield f"data: {json.dumps(dict(base, choices=[_stream_chunk(ev, offsets)]))}\n\n"
        metrics.observe_job(job)
        yield "data: [DONE]\n\n"
    finally:
        # Client gone (the response task is cancelled) or done: free the rows' batch slots.
        if left:
            metrics.count("cancelled")
        job.cancel()


# ---------------------------------------------------------------------------- the app
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def _request_error(request, exc):
        return _error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


def _add_info_routes(app: FastAPI, engine: Engine, scheduler: Scheduler,
                     model_name: str) -> None:
    created = int(time.time())
    metrics = scheduler.metrics

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": scheduler.queued(),
                "running": scheduler.running(),
                "compilations_at_warmup": app.state.compiles_at_start,
                "compilations_after_warmup": compilations() - app.state.compiles_at_start,
                "stats": metrics.stats(), "shapes": engine.describe()}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.render(
            compilations_after_warmup=compilations() - app.state.compiles_at_start),
            media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "gptjax"}]}


def _retry_after(metrics: ServerMetrics) -> str:
    """Seconds a refused client should wait: the mean time to first token so far (1 to 60)."""
    h = metrics.ttft
    mean = h.sum / sum(h.counts) if sum(h.counts) else 1.0
    return str(min(60, max(1, math.ceil(mean))))


def _add_completions_route(app: FastAPI, engine: Engine, scheduler: Scheduler,
                           model_name: str) -> None:
    metrics = scheduler.metrics
    tok = scheduler.detok.tok

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.model is not None and req.model != model_name:
            raise RequestError(404, f"model={req.model!r} does not exist: this server serves "
                               f"{model_name!r} (GET /v1/models)", "model", "model_not_found")
        rows, prompt_tokens = _build_rows(req, engine, tok)
        # Read per request, so a running server's timeout can be changed (tests do).
        job = Job(rows, asyncio.get_running_loop(),
                  time.monotonic() + app.state.request_timeout_s)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise RequestError(429, f"server overloaded: {e}", None, "queue_full",
                               {"Retry-After": _retry_after(metrics)}) from None
        base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            return StreamingResponse(_stream(job, base, metrics),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            await _collect(job, metrics)
        finally:
            job.cancel()
        return _completion_body(base, rows, prompt_tokens)


def make_app(engine: Engine, scheduler: Scheduler, *, model_name: str = "gptjax",
             request_timeout_s: float = 60.0) -> FastAPI:
    """The FastAPI application (the scheduler is started and stopped by the caller).

    Args:
      engine: the Engine that decodes.
      scheduler: the Scheduler that queues requests for it (its metrics are the server's).
      model_name: the model id the API reports and accepts.
      request_timeout_s: seconds a request may wait and decode before it gets HTTP 503.

    Returns:
      The app; its /health and /metrics count compilations from this call on.
    """
    app = FastAPI(title="gptjax", version="0.1.0")
    app.state.metrics = scheduler.metrics
    app.add_middleware(StatusCounter, metrics=scheduler.metrics)
    _add_error_handlers(app)
    _add_info_routes(app, engine, scheduler, model_name)
    _add_completions_route(app, engine, scheduler, model_name)
    app.state.request_timeout_s = request_timeout_s
    app.state.compiles_at_start = compilations()
    return app


def build_server(config, params, tokenizer, *, slots: int = 8, page_size: int = 16,
                 pages=None, max_prefill_tokens: int = 256, prompt_buckets=None,
                 max_queue: int = 64, request_timeout_s: float = 60.0,
                 model_name: str = "gptjax", warmup=True, start=True, log=print) -> tuple:
    """Engine + warmed-up compiled shapes + scheduler + app.

    Args:
      config, params, tokenizer: the model (params as they are, or already prepared by
        `gptjax.inference.decoding.prepare_for_decoding`, e.g. in another weight format).
      slots, page_size, pages, prompt_buckets: the engine (see Engine).
      max_queue, max_prefill_tokens: the scheduler (see Scheduler).
      request_timeout_s, model_name: see make_app.
      warmup: compile every shape now (else on first use).
      start: start the scheduler's threads.
      log: where the warm-up lines go.

    Returns:
      (app, scheduler, engine).
    """
    start_compile_counter()
    engine = Engine(config, params, slots=slots, page_size=page_size, pages=pages,
                    prompt_buckets=prompt_buckets)
    scheduler = Scheduler(engine, tokenizer, ServerMetrics(), max_queue=max_queue,
                          max_prefill_tokens=max_prefill_tokens)
    if warmup:
        before = compilations()
        log(f"warming up, shapes {engine.describe()} ...")
        make_row([0], seed=0, temperature=1.0, top_p=1.0, max_tokens=1, logprobs=None,
                 stops=(), index=0)  # the host side's one compile: a seed's key
        seconds = engine.warmup()
        log(f"warm-up done in {seconds:.1f} s, {compilations() - before} compilations")
    app = make_app(engine, scheduler, model_name=model_name, request_timeout_s=request_timeout_s)
    if start:
        scheduler.start()
    return app, scheduler, engine
