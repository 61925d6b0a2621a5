"""Evaluate models (perplexity, GPT-3 few-shot, GPT-1/2 zero-shot, lm-eval), or a run's goodput.

  python eval.py --mode=fewshot --workdir runs/a --tasks 2D+,1DC --shots 0,1,4 --out runs/eval
  python eval.py --mode=zeroshot --workdir runs/a --steps all --tasks lambada=l.jsonl --out runs/zs
  python eval.py --mode=lm_eval --hf_dir path/to/gpt2 --tasks hellaswag --include_path my_tasks
  python eval.py --mode=goodput --workdir runs/a   (where its time went; gptjax.eval does the work)
"""

import os
import sys

from absl import app, flags

from gptjax.cli import MeshFlags, define_execution_flag, define_peft_flag, run_cli
from gptjax.eval import run

_MODE = flags.DEFINE_enum("mode", "perplexity", ["perplexity", "fewshot", "zeroshot", "lm_eval",
                                                 "goodput"], "What to evaluate.")
_WORKDIR = flags.DEFINE_multi_string("workdir", [], "A train.py run directory (repeatable).")
_HF_DIR = flags.DEFINE_multi_string("hf_dir", [], "A transformers directory (repeatable).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "GPT-2 BPE files for --hf_dir.")
_EXECUTION, _PEFT, _MESH = define_execution_flag(), define_peft_flag(), MeshFlags()
_STEPS = flags.DEFINE_string("steps", "", "Checkpoint steps of each --workdir (500,1000 or all).")
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
# few-shot, zero-shot, lm-eval
_TASKS = flags.DEFINE_multi_string("tasks", [], "Comma-separated task specs: fewshot 2D+, 1DC, "
                                   "sst2=DIR, ...; zeroshot lambada=FILE, cola=DIR, ...; lm_eval "
                                   "task names.")
_SHOTS = flags.DEFINE_string("shots", "0,1,4", "Numbers of demonstrations K.")
_N = flags.DEFINE_integer("num_examples", 0, "Queries per task (0: all; arithmetic: 2000).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the demonstrations and generated problems.")
_INCLUDE = flags.DEFINE_string("include_path", "", "lm_eval: a folder of extra task YAMLs.")


def _run():
    if _MODE.value == "goodput":  # no model: the run directories' time ledgers
        return run.run_goodput(_WORKDIR.value, _OUT.value)
    mesh = _MESH.start(_MODE.value)  # (several processes: before any device is used)
    steps = run.parse_steps(_STEPS.value)
    specs = run.task_specs(_TASKS.value, _MODE.value)
    models = run.load_models(_WORKDIR.value, _HF_DIR.value, _TOKENIZER.value, steps,
                             execution=_EXECUTION.value, peft_dir=_PEFT.value, on_host=bool(mesh))
    kw = dict(seed=_SEED.value, batch_size=_BATCH.value, out=_OUT.value)
    if _MODE.value == "fewshot":
        run.run_fewshot(models, specs, run.parse_ints(_SHOTS.value, "shots"),
                        num_examples=_N.value, **kw)
    elif _MODE.value == "zeroshot":
        run.run_zeroshot(models, specs, num_examples=_N.value, **kw)
    elif _MODE.value == "lm_eval":
        run.run_lm_eval(models, specs, _INCLUDE.value, limit=_N.value, mesh=mesh, **kw)
    else:
        run.run_perplexity(models, text_path=_TEXT.value, tfds_name=_TFDS.value,
                           split=_SPLIT.value, data_dir=_DATA_DIR.value,
                           text_key=_TEXT_KEY.value, detokenize=_DETOK.value, unk=_UNK.value,
                           context=_CONTEXT.value, stride=_STRIDE.value, prepend_eos=_EOS.value,
                           max_chars=_MAX_CHARS.value, batch_size=_BATCH.value, out=_OUT.value)


def main(argv):
    del argv
    run_cli(_run)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)
