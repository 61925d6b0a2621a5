"""Serve a gptjax model over an OpenAI-style completions API (FastAPI + uvicorn).

  python serve.py --workdir runs/default --port 8000        # continuous batching, 8 slots
  python serve.py --hf_dir path/to/gpt2 --slots 16 --prompt_buckets 64,256,1024
  python serve.py --hf_dir path/to/gpt2 --batching static --batch_sizes 1,4,8
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
       -d '{"prompt": "To be", "max_tokens": 20, "seed": 0}'

Intentionally thin: gptjax.inference.serving loads (gptjax.runs.pretrained), batches, decodes and
answers.
"""

from absl import app, flags

from gptjax.cli import ModelFlags, run_cli
from gptjax.inference.serving import serve

_MODEL = ModelFlags()  # --workdir / --hf_dir / --tokenizer / --step / --execution
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_NAME = flags.DEFINE_string("model_name", None, "Model id in the API (default: the dir's name).")
_BATCHING = flags.DEFINE_enum("batching", "continuous", ["continuous", "static"],
                              "continuous: decode slots that requests join and leave at every "
                              "step; static: waves (kept for comparison).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Continuous: decode slots (rows decoded together).")
_CACHE = flags.DEFINE_string("cache_buckets", "", "Continuous: KV-cache lengths (default "
                             "64,256,1024,... < n_ctx and n_ctx).")
_PREFILL = flags.DEFINE_integer("max_prefill_tokens", 256,
                                "Continuous: padded prompt tokens prefilled per step at most.")
_BATCH = flags.DEFINE_string("batch_sizes", "1,2,4,8", "Static: batch buckets (comma-separated).")
_PROMPT_BUCKETS = flags.DEFINE_string("prompt_buckets", "",
                                      "Prompt-length buckets (default 16,64,256,1024,... < n_ctx "
                                      "and n_ctx).")
_QUEUE = flags.DEFINE_integer("max_queue", 64, "Most waiting requests; more get HTTP 429.")
_WINDOW = flags.DEFINE_float("batch_window_ms", 50.0, "Static: the longest wait to fill a wave.")
_TIMEOUT = flags.DEFINE_float("request_timeout", 60.0, "Seconds before a request gets HTTP 503.")
_WEIGHTS = flags.DEFINE_enum("weights", "fp32", ["fp32", "bf16", "int8"], "Decode weights "
                             "(bf16 / int8: weight-only, per-row int8 scales).")


def main(argv):
    del argv
    run_cli(lambda: serve(
        **_MODEL.load_args(), host=_HOST.value, port=_PORT.value, batching=_BATCHING.value,
        slots=_SLOTS.value, cache_buckets=_CACHE.value, max_prefill_tokens=_PREFILL.value,
        batch_sizes=_BATCH.value, prompt_buckets=_PROMPT_BUCKETS.value, max_queue=_QUEUE.value,
        batch_window_ms=_WINDOW.value, request_timeout=_TIMEOUT.value, model_name=_NAME.value,
        weights=_WEIGHTS.value))


if __name__ == "__main__":
    app.run(main)
