"""Serving: an OpenAI-style completions API (FastAPI + uvicorn) over one continuous-batching engine.

Modules, bottom up:
  * `engine`: `Engine`, the device side in JetStream's shape: `prefill` (a prompt -> its
    keys/values and first-token logits; scored: its tokens' log-probabilities too), `insert`
    (into a free decode slot), `generate` (one step over all slots) over one decode-state pytree
    with a paged KV cache (a page pool and a block table per slot; gptjax.nn.kv_cache), each row
    with its own PRNG key, temperature and top_p (a completion equals
    `gptjax.inference.sampling.generate` with the same seed). A prefill, a scoring prefill and
    an insert per prompt bucket and a step per page bucket are every compiled shape.
  * `requests`: `Job` (an HTTP request and its events) and `Row` (one choice and its progress).
  * `detok`: the detokenizer thread: incremental detokenization (vLLM's prefix/read offsets),
    stop strings, logprobs, echoed prompts, events to the request's handler.
  * `scheduler`: `Scheduler`, the one device-loop thread: FIFO admission into free slots and
    pages (a prefill cap per turn), deadlines, cancellation, QueueFull (HTTP 429).
  * `metrics`: `ServerMetrics`, the one object every server counter is reported to, and
    `GET /metrics` in the Prometheus text format.
  * `api`: the HTTP API (`make_app`) and `build_server` (engine + warm-up + scheduler + app).
  * here: `serve`, which loads a model (a train.py workdir or an imported HF directory), warms
    up every compiled shape and runs uvicorn.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from gptjax.inference.decoding import prepare_for_decoding
from gptjax.inference.serving.api import (
    CompletionRequest,
    RequestError,
    build_server,
    make_app,
)
from gptjax.inference.serving.engine import (
    MAX_LOGPROBS,
    Engine,
    compilations,
    sample_rows,
    start_compile_counter,
)
from gptjax.inference.serving.metrics import ServerMetrics
from gptjax.inference.serving.requests import Job, Row, make_row
from gptjax.inference.serving.scheduler import QueueFull, Scheduler
from gptjax.runs.pretrained import load_pretrained

__all__ = [
    "CompletionRequest", "Engine", "Job", "MAX_LOGPROBS", "QueueFull", "RequestError", "Row",
    "Scheduler", "ServerMetrics", "build_server", "compilations", "make_app", "make_row",
    "sample_rows", "serve", "start_compile_counter",
]


def _int_list(flag: str, text: str) -> Optional[tuple]:
    if text in (None, ""):
        return None
    try:
        vals = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"--{flag}={text!r}: give comma-separated positive integers") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"--{flag}={text!r}: give comma-separated positive integers")
    return vals


def _check_flags(*, port: int, max_queue: int, request_timeout: float, slots: int,
                 page_size: int, pages: int, max_prefill_tokens: int) -> None:
    for flag, value in (("slots", slots), ("page_size", page_size),
                        ("max_prefill_tokens", max_prefill_tokens)):
        if value < 1:
            raise ValueError(f"--{flag}={value}: must be >= 1")
    if pages < 0:
        raise ValueError(f"--pages={pages}: must be >= 0 (0: enough for every slot)")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port={port}: must be in [0, 65535]")
    if max_queue < 1:
        raise ValueError(f"--max_queue={max_queue}: must be >= 1")
    if not request_timeout > 0:
        raise ValueError(f"--request_timeout={request_timeout}: must be > 0 seconds")


def serve(*, workdir=None, hf_dir=None, tokenizer_path=None, step=None, host="127.0.0.1",
          port=8000, slots=8, page_size=16, pages=0, max_prefill_tokens=256, prompt_buckets="",
          max_queue=64, request_timeout=60.0, model_name=None, weights="fp32",
          execution=None, peft_dir=None) -> None:
    """Load a model, warm up every compiled shape, and serve the API with uvicorn until stopped.

    Args:
      workdir, hf_dir, tokenizer_path, step, execution, peft_dir: the model, execution
        overrides and a PEFT adapter to merge (see gptjax.runs.pretrained.load_pretrained).
      host, port: where to listen.
      slots, page_size, pages: decode slots, positions per KV page, pages in the pool (0: every
        slot can hold a full context); see Engine.
      max_prefill_tokens: padded prompt tokens prefilled per scheduler turn at most.
      prompt_buckets: comma-separated prompt lengths prefills are padded to ("" for the default).
      max_queue, request_timeout: see Scheduler and make_app.
      model_name: the model id in the API (default: the directory's name).
      weights: the decoding weight format, "fp32", "bf16" or "int8" (weight-only; see
        gptjax.inference.decoding.prepare_for_decoding).

    Raises:
      ValueError: a bad flag value, before anything is loaded.
    """
    import uvicorn  # heavy: uvicorn, only when actually serving

    _check_flags(port=port, max_queue=max_queue, request_timeout=request_timeout, slots=slots,
                 page_size=page_size, pages=pages, max_prefill_tokens=max_prefill_tokens)
    pb = _int_list("prompt_buckets", prompt_buckets)
    config, params, tok = load_pretrained(workdir=workdir, hf_dir=hf_dir,
                                          tokenizer_path=tokenizer_path, step=step,
                                          execution=execution, peft_dir=peft_dir)
    name = model_name or os.path.basename(os.path.normpath(workdir or hf_dir))
    # The engine takes params prepared by prepare_for_decoding as they are.
    params = prepare_for_decoding(config, params, weights=weights)
    app, scheduler, _ = build_server(config, params, tok, slots=slots, page_size=page_size,
                                     pages=pages or None, max_prefill_tokens=max_prefill_tokens,
                                     prompt_buckets=pb, max_queue=max_queue,
                                     request_timeout_s=request_timeout, model_name=name)
    print(f"serving {name!r} on http://{host}:{port}/v1/completions", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        scheduler.stop()
