"""Sample from a trained gptjax run or an imported transformers directory.
  python sample.py --workdir runs/default --prompt "def " --max_new_tokens 100
  python sample.py --hf_dir path/to/gpt2 --prompt_file prompts.txt --num_beams 4
  echo "Once upon a time" | python sample.py --workdir runs/x --weights int8
  python sample.py --workdir runs/x --execution attention_impl=xla   # a TPU run on a CPU
Intentionally thin: gptjax.runs.pretrained loads, gptjax.inference.textgen completes and streams.
"""

import sys

from absl import app, flags

from gptjax.cli import ModelFlags, parse_flags, run_cli
from gptjax.inference.sampling import prepare_for_decoding
from gptjax.inference.textgen import check_request, complete
from gptjax.runs.pretrained import load_pretrained

_MODEL = ModelFlags()  # --workdir / --hf_dir / --tokenizer / --peft_dir / --step / --execution
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt ('\\n' escapes allowed).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate (fit to the context).")
_TEMP = flags.DEFINE_float("temperature", None, "0 = greedy (default 0.8; beam search: 1).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1].")
_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beam search when > 1.")
_LP = flags.DEFINE_float("length_penalty", 1.0, "Beam search length penalty.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop sequence (repeatable).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_N = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_WEIGHTS = flags.DEFINE_enum("weights", "fp32", ["fp32", "bf16", "int8"], "Decode weights.")


def _prompts():
    if _PROMPT.value is not None:
        return [_PROMPT.value.encode().decode("unicode_escape") if "\\" in _PROMPT.value
                else _PROMPT.value]
    if _PROMPT_FILE.value is not None:
        with open(_PROMPT_FILE.value, encoding="utf-8", errors="replace") as fh:
            return [ln.rstrip("\n").replace("\\n", "\n") for ln in fh if ln.strip()]
    if not sys.stdin.isatty():
        return [sys.stdin.buffer.read().decode("utf-8", errors="replace")]
    return [""]


def _write(row, text):  # (a textgen on_text callback: row index, new text)
    print(text, end="", flush=True)


def _run():
    if _N.value < 1:
        raise ValueError(f"--num_samples={_N.value}: must be >= 1")
    config, params, tok = load_pretrained(**_MODEL.load_args())
    params = prepare_for_decoding(config, params, weights=_WEIGHTS.value)  # once for all
    temp = _TEMP.value if _TEMP.value is not None else (1.0 if _BEAMS.value > 1 else 0.8)
    opts = dict(temperature=temp, top_k=_TOP_K.value, top_p=_TOP_P.value,
                num_beams=_BEAMS.value, length_penalty=_LP.value)
    prompts = _prompts()
    fits = check_request(config, tok, prompts, max_new_tokens=_MAX_NEW.value, **opts)
    for prompt, max_new in zip(prompts, fits):  # everything checked: now print
        if max_new < _MAX_NEW.value:
            print(f"note: --max_new_tokens={_MAX_NEW.value} clipped to {max_new}, the room the "
                  f"prompt leaves in the context (n_ctx={config.n_ctx})", file=sys.stderr)
        for i in range(_N.value):
            _write(0, prompt)
            complete(config, params, tok, [prompt], max_new_tokens=max_new, stop=_STOP.value,
                     seed=_SEED.value + i, on_text=_write, **opts)
            _write(0, "\n" + ("-" * 40 + "\n" if _N.value > 1 or len(prompts) > 1 else ""))


def main(argv):
    del argv
    run_cli(_run)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
