"""Serving: an OpenAI-style completions API (FastAPI + uvicorn) over a batched KV-cache decoder.

Modules, bottom up:
  * `engine`: the per-step device work (each row with its own PRNG key, temperature and top_p,
    so a completion equals `gptjax.inference.sampling.generate` with the same seed), the fixed
    set of compiled shapes (`ShapePlan`), and `Engine`, which decodes one wave of rows step by
    step on the host (streaming, stop strings, cancellation and timeouts per row).
  * `batcher`: `Batcher`, a background thread with a bounded queue that groups requests that
    arrive together into waves (static batching, `--batching static`).
  * `slots`: `SlotEngine`, continuous batching on the device: prefill / insert / generate over a
    fixed set of decode slots and a ring-buffer KV cache in length buckets.
  * `scheduler`: `ContinuousBatcher`, the thread that admits queued requests into free slots
    (first come first served, a prefill cap per step) and runs one decode step at a time.
  * `metrics`: `GET /metrics` in the Prometheus text format.
  * `api`: the HTTP API (`make_app`) and `build_server` (engine + warm-up + batcher + app).
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
from gptjax.inference.serving.batcher import Batcher, QueueFull
from gptjax.inference.serving.scheduler import ContinuousBatcher
from gptjax.inference.serving.slots import SlotEngine
from gptjax.inference.serving.engine import (
    MAX_LOGPROBS,
    Engine,
    Job,
    Row,
    ShapePlan,
    compilations,
    sample_rows,
    start_compile_counter,
)
from gptjax.runs.pretrained import load_pretrained

__all__ = [
    "Batcher", "CompletionRequest", "ContinuousBatcher", "Engine", "Job", "MAX_LOGPROBS",
    "QueueFull", "RequestError", "Row", "ShapePlan", "SlotEngine", "build_server", "compilations",
    "make_app", "sample_rows", "serve", "start_compile_counter",
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


def _check_flags(*, port: int, max_queue: int, batch_window_ms: float, request_timeout: float,
                 batching: str, slots: int, max_prefill_tokens: int) -> None:
    if batching not in ("continuous", "static"):
        raise ValueError(f"--batching={batching!r}: give continuous or static")
    if slots < 1 or max_prefill_tokens < 1:
        raise ValueError(f"--slots={slots}, --max_prefill_tokens={max_prefill_tokens}: "
                         "must be >= 1")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port={port}: must be in [0, 65535]")
    if max_queue < 1:
        raise ValueError(f"--max_queue={max_queue}: must be >= 1")
    if not batch_window_ms >= 0 or not math.isfinite(batch_window_ms):
        raise ValueError(f"--batch_window_ms={batch_window_ms}: must be >= 0")
    if not request_timeout > 0:
        raise ValueError(f"--request_timeout={request_timeout}: must be > 0 seconds")


def serve(*, workdir=None, hf_dir=None, tokenizer_path=None, step=None, host="127.0.0.1",
          port=8000, batching="continuous", slots=8, cache_buckets="", max_prefill_tokens=256,
          batch_sizes="1,2,4,8", prompt_buckets="", max_queue=64, batch_window_ms=50.0,
          request_timeout=60.0, model_name=None, weights="fp32", execution=None) -> None:
    """Load a model, warm up every compiled shape, and serve the API with uvicorn until stopped.

    Args:
      workdir, hf_dir, tokenizer_path, step, execution: the model and execution overrides
        (see gptjax.runs.pretrained.load_pretrained).
      host, port: where to listen.
      batching: "continuous" (decode slots) or "static" (waves; kept for comparison).
      slots, cache_buckets, max_prefill_tokens: continuous batching (see SlotEngine and
        ContinuousBatcher; cache_buckets comma-separated, "" for the default).
      batch_sizes, prompt_buckets: comma-separated compiled shapes (see ShapePlan; "" for the
        default prompt buckets).
      max_queue, batch_window_ms, request_timeout: see Batcher and make_app.
      model_name: the model id in the API (default: the directory's name).
      weights: the decoding weight format, "fp32", "bf16" or "int8" (weight-only; see
        gptjax.inference.decoding.prepare_for_decoding).

    Raises:
      ValueError: a bad flag value, before anything is loaded.
    """
    import uvicorn  # heavy: uvicorn, only when actually serving

    _check_flags(port=port, max_queue=max_queue, batch_window_ms=batch_window_ms,
                 request_timeout=request_timeout, batching=batching, slots=slots,
                 max_prefill_tokens=max_prefill_tokens)
    bs = _int_list("batch_sizes", batch_sizes)
    if bs is None:
        raise ValueError("--batch_sizes is empty: give e.g. 1,2,4,8")
    pb = _int_list("prompt_buckets", prompt_buckets)
    cb = _int_list("cache_buckets", cache_buckets)
    config, params, tok = load_pretrained(workdir=workdir, hf_dir=hf_dir,
                                          tokenizer_path=tokenizer_path, step=step,
                                          execution=execution)
    name = model_name or os.path.basename(os.path.normpath(workdir or hf_dir))
    # The engines take params prepared by prepare_for_decoding as they are.
    params = prepare_for_decoding(config, params, weights=weights)
    app, batcher, _ = build_server(config, params, tok, batching=batching, slots=slots,
                                   cache_buckets=cb, max_prefill_tokens=max_prefill_tokens,
                                   batch_sizes=bs, prompt_buckets=pb, max_queue=max_queue,
                                   batch_window_s=batch_window_ms / 1000,
                                   request_timeout_s=request_timeout, model_name=name)
    print(f"serving {name!r} on http://{host}:{port}/v1/completions", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        batcher.stop()
