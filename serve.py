"""Serve a gptjax model over an OpenAI-style completions API (FastAPI + uvicorn).

  python serve.py --workdir runs/default --port 8000        # continuous batching, 8 slots
  python serve.py --hf_dir path/to/gpt2 --slots 16 --page_size 16 --prompt_buckets 64,256,1024
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
       -d '{"prompt": "To be", "max_tokens": 20, "seed": 0}'

Intentionally thin: gptjax.inference.serving loads (gptjax.runs.pretrained), batches, decodes and
answers.
"""

from absl import app, flags

from gptjax.cli import ModelFlags, run_cli
from gptjax.inference.serving import serve

_MODEL = ModelFlags()  # --workdir / --hf_dir / --tokenizer / --peft_dir / --step / --execution
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_NAME = flags.DEFINE_string("model_name", None, "Model id in the API (default: the dir's name).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Decode slots (rows decoded together).")
_PAGE = flags.DEFINE_integer("page_size", 16, "Positions per KV-cache page.")
_PAGES = flags.DEFINE_integer("pages", 0, "Pages in the KV pool (0: every slot can hold a full "
                              "context); fewer saves memory, requests then wait for pages.")
_PREFILL = flags.DEFINE_integer("max_prefill_tokens", 256,
                                "Padded prompt tokens prefilled per scheduler turn at most.")
_PROMPT_BUCKETS = flags.DEFINE_string("prompt_buckets", "",
                                      "Prompt-length buckets (default 16,64,256,1024,... < n_ctx "
                                      "and n_ctx).")
_QUEUE = flags.DEFINE_integer("max_queue", 64, "Most waiting requests; more get HTTP 429.")
_TIMEOUT = flags.DEFINE_float("request_timeout", 60.0, "Seconds before a request gets HTTP 503.")
_WEIGHTS = flags.DEFINE_enum("weights", "fp32", ["fp32", "bf16", "int8"], "Decode weights "
                             "(bf16 / int8: weight-only, per-row int8 scales).")


def main(argv):
    del argv
    run_cli(lambda: serve(
        **_MODEL.load_args(), host=_HOST.value, port=_PORT.value, slots=_SLOTS.value,
        page_size=_PAGE.value, pages=_PAGES.value, max_prefill_tokens=_PREFILL.value,
        prompt_buckets=_PROMPT_BUCKETS.value, max_queue=_QUEUE.value,
        request_timeout=_TIMEOUT.value, model_name=_NAME.value, weights=_WEIGHTS.value))


if __name__ == "__main__":
    app.run(main)
