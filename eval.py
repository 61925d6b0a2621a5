"""Evaluate models: sliding-window perplexity, or GPT-3-style zero/one/few-shot tasks.

  python eval.py --mode=perplexity --hf_dir path/to/gpt2 \
      --text ../shared/data/wikitext2_tokens/valid.txt --detokenize wikitext --context 1024 --stride 512
  python eval.py --mode=perplexity --workdir runs/sc --tfds tiny_shakespeare --data_dir ../shared/tfds
  python eval.py --mode=fewshot --workdir runs/a --workdir runs/b --tasks 2D+,2D-,1DC \
      --tasks sst2=../shared/data/glue/SST-2 --shots 0,1,4 --num_examples 200 --out runs/eval

Intentionally thin: gptjax.eval does the work.
"""

import os
import sys

from absl import app, flags

from gptjax.cli import run_cli
from gptjax.eval import run

_MODE = flags.DEFINE_enum("mode", "perplexity", ["perplexity", "fewshot"], "What to evaluate.")
_WORKDIR = flags.DEFINE_multi_string("workdir", [], "A train.py run directory (repeatable).")
_HF_DIR = flags.DEFINE_multi_string("hf_dir", [], "A transformers directory (repeatable).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "GPT-2 BPE files for --hf_dir.")
_STEPS = flags.DEFINE_string("steps", "", "Checkpoint steps of each --workdir, e.g. 500,1000, "
                             "or all.")
_OUT = flags.DEFINE_string("out", "", "Directory for JSON/markdown results and plots.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
# perplexity
_TEXT = flags.DEFINE_string("text", "", "A UTF-8 text file to score.")
_TFDS = flags.DEFINE_string("tfds", "", "A tfds text dataset prepared in --data_dir.")
_SPLIT = flags.DEFINE_string("split", "validation", "The tfds split.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "The tfds data_dir.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "The tfds text feature.")
_DETOK = flags.DEFINE_string("detokenize", "none", "none | wikitext (undo @-@, ' , ', ...).")
_UNK = flags.DEFINE_string("unk", None, "Replace WikiText's <unk> with this (default: keep).")
_CONTEXT = flags.DEFINE_integer("context", 0, "Tokens per window (0: the model's n_ctx).")
_STRIDE = flags.DEFINE_integer("stride", 0, "Tokens between windows (0: context // 2).")
_EOS = flags.DEFINE_bool("prepend_eos", False, "Score the first token after <|endoftext|>.")
_MAX_CHARS = flags.DEFINE_integer("max_chars", 0, "Score only the first N characters.")
# few-shot
_TASKS = flags.DEFINE_multi_string("tasks", [], "Comma-separated task specs: 2D+..5D-, 2Dx, 1DC, "
                                   "lambada=FILE, lambada_cloze=FILE, sst2=DIR, glue/rte=DATA_DIR.")
_SHOTS = flags.DEFINE_string("shots", "0,1,4", "Numbers of demonstrations K.")
_N = flags.DEFINE_integer("num_examples", 0, "Queries per task (0: all; arithmetic: 2000).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the demonstrations and generated problems.")


def _run():
    steps = (run.parse_ints(_STEPS.value, "steps", 1) if _STEPS.value not in ("", "all")
             else _STEPS.value or [])
    if _MODE.value == "fewshot":
        specs = [s for v in _TASKS.value for s in v.split(",") if s]
        if not specs:
            raise ValueError("--mode=fewshot needs --tasks (e.g. --tasks 2D+,1DC)")
        shots = run.parse_ints(_SHOTS.value, "shots")
        models = run.load_models(_WORKDIR.value, _HF_DIR.value, _TOKENIZER.value, steps)
        run.run_fewshot(models, specs, shots, num_examples=_N.value, seed=_SEED.value,
                        batch_size=_BATCH.value, out=_OUT.value)
    else:
        models = run.load_models(_WORKDIR.value, _HF_DIR.value, _TOKENIZER.value, steps)
        run.run_perplexity(models, text_path=_TEXT.value, tfds_name=_TFDS.value,
                           split=_SPLIT.value, data_dir=_DATA_DIR.value,
                           text_key=_TEXT_KEY.value, detokenize=_DETOK.value, unk=_UNK.value,
                           context=_CONTEXT.value, stride=_STRIDE.value,
                           prepend_eos=_EOS.value, max_chars=_MAX_CHARS.value,
                           batch_size=_BATCH.value, out=_OUT.value)


def main(argv):
    del argv
    run_cli(_run)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)
