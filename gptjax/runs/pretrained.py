"""Reading a run back: the checkpoint metadata check and the one loader of a pretrained decoder.

`load_pretrained` reads a decoder from a train.py work directory (its latest checkpoint, after
checking that the checkpoint's metadata matches the run's `model_config.json` and tokenizer) or
from a transformers / OpenAI model directory, for sampling, serving, evaluation and finetuning.
A checkpoint is checked against the architecture only; it loads under any execution (attention
kernel, remat, scan, compute dtype, dropout: `GPTConfig.EXECUTION_FIELDS`), the run's own or the
caller's `execution` overrides, and a change from the execution it was saved with is named in one
line (a `scan_layers` change moves the parameters to the other layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from typing import Optional, Union

import jax
import numpy as np

from gptjax.config import EXECUTION_FIELDS, GPTConfig, describe_changes, parse_execution
from gptjax.data.tokenizers import from_model_dir, load_tokenizer, tokenizer_info
from gptjax.nn import lora as lora_lib
from gptjax.nn.convert import from_hf
from gptjax.nn.model import abstract_params
from gptjax.nn.param_layout import convert_layout, unstack_layers
from gptjax.nn.peft import from_peft
from gptjax.nn.quant import quantize_params
from gptjax.runs.checkpoint import Checkpointer, CheckpointError


def _architecture_of(saved: dict) -> dict:
    """The architecture a checkpoint's `model_config` records; fields it predates take their
    defaults (a field is added with the default that keeps older models as they were)."""
    fields = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    out = {k: v for k, v in saved.items() if k not in EXECUTION_FIELDS}  # (unknown keys too)
    for k, default in fields.items():
        if k not in EXECUTION_FIELDS and k not in out:
            out[k] = list(default) if isinstance(default, tuple) else default
    return out


def check_checkpoint_meta(step: int, meta: dict, *, model_cfg: GPTConfig, tokenizer: dict
                          ) -> None:
    """Raises CheckpointError when checkpoint `step` belongs to another run than this one.

    Only the architecture is compared: the execution (`EXECUTION_FIELDS`) may differ.

    Args:
      step: the checkpoint's step.
      meta: its metadata (the `model_config`, `data` and `tokenizer` the trainer saves).
      model_cfg: this run's architecture.
      tokenizer: this run's tokenizer as {kind, vocab_size, fingerprint}.
    """
    saved, here = _architecture_of(meta.get("model_config") or {}), model_cfg.architecture()
    if saved != here:
        diff = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
        what = "; ".join(f"{k} {saved.get(k)!r} there, {here.get(k)!r} here" for k in diff[:3])
        raise CheckpointError(f"checkpoint step {step} is of another architecture than this "
                              f"config ({what}); use another --workdir")
    saved_tok = meta.get("tokenizer") or {}
    for k in ("kind", "vocab_size", "fingerprint"):  # older checkpoints lack the fingerprint
        if k in saved_tok and saved_tok[k] != tokenizer.get(k):
            raise CheckpointError(
                f"checkpoint step {step} was trained with another tokenizer (its {k} is "
                f"{saved_tok[k]!r}, this run's is {tokenizer.get(k)!r}); put the run's own "
                "tokenizer/ directory back or use another --workdir")


def saved_execution(meta: dict, model_cfg: GPTConfig) -> dict:
    """The execution checkpoint metadata `meta` was saved with (fields it lacks: `model_cfg`'s).

    Args:
      meta: a checkpoint's metadata, of `model_cfg`'s architecture (check_checkpoint_meta).
      model_cfg: this run's config.
    """
    saved = meta.get("model_config") or {}
    return {k: saved.get(k, v) for k, v in model_cfg.execution().items()}


def execution_change(meta: dict, model_cfg: GPTConfig) -> Optional[str]:
    """What `model_cfg` runs differently from the execution `meta` was saved with, on one line
    (`remat 'none' -> 'full'`), or None when nothing does."""
    return describe_changes(saved_execution(meta, model_cfg), model_cfg.execution())


def load_pretrained(*, workdir: Optional[str] = None, hf_dir: Optional[str] = None,
                    tokenizer_path: Optional[str] = None, step: Optional[int] = None,
                    execution: Union[dict, str, None] = None, peft_dir: Optional[str] = None):
    """(GPTConfig, params, tokenizer) of a pretrained decoder: a gptjax run or an HF directory.

    The parameters come back as uncommitted single-device jax arrays, so the jitted functions
    of inference and finetuning compile once whether they are fed these arrays or their own
    outputs (arrays placed on the trainer's mesh would make each compile twice).

    Args:
      workdir: a train.py work directory (its latest checkpoint, or `step`, and its tokenizer);
        of a LoRA run (lora.rank > 0), the base with its adapters merged (`lora.merge`).
      hf_dir: a local transformers GPT-2 / OpenAI-GPT directory (or OpenAI's TF checkpoint).
      tokenizer_path: with hf_dir, where its tokenizer is (default: hf_dir): a gptjax tokenizer
        directory (tokenizer.json, no vocab.json), or GPT-2's / OpenAI GPT's BPE files.
      step: a checkpoint step of `workdir`; None = the latest.
      execution: execution fields to run the model with instead of the run's (or the HF
        config's): a dict, or text like 'attention_impl=xla,remat=full' (see
        gptjax.config.parse_execution). The returned config has them; parameters come in the
        layout its `scan_layers` says. Running under another execution than the checkpoint was
        saved with (or the HF config says) is named on one stderr line (`note: loading step N
        with another execution: remat 'none' -> 'full'`).
      peft_dir: with hf_dir, a PEFT LoRA adapter directory (gptjax.nn.peft.from_peft) merged
        into the weights (fp32).

    Returns:
      (GPTConfig, params, tokenizer).

    Raises:
      ValueError: unless exactly one of workdir / hf_dir is given, or when the tokenizer has
        more ids than the model has embeddings.
      ConfigError: an `execution` item that is not an execution field or not a valid value.
      CheckpointError: when `workdir` is not a gptjax run, or its checkpoint does not match
        its model_config.json (architecture) or tokenizer.
    """
    if (workdir is None) == (hf_dir is None):
        raise ValueError("give exactly one of --workdir (a gptjax run) or --hf_dir "
                         "(a transformers model directory)")
    if peft_dir is not None and hf_dir is None:
        raise ValueError(f"--peft_dir={peft_dir!r} goes with --hf_dir (the model it adapts)")
    overrides = parse_execution(execution) if isinstance(execution, str) else (execution or {})
    if workdir is not None:
        return _load_workdir(workdir, step, overrides)
    model_cfg, params, tokenizer = _load_hf(hf_dir, tokenizer_path or hf_dir)
    if peft_dir is not None:
        params = lora_lib.merge(model_cfg, params, from_peft(model_cfg, peft_dir)[1])
    run_cfg = model_cfg.with_execution(**overrides)
    if run_cfg.scan_layers != model_cfg.scan_layers:
        params = convert_layout(run_cfg, params, run_cfg.scan_layers)
    _note(f"loading {hf_dir}", describe_changes(model_cfg.execution(), run_cfg.execution()))
    return run_cfg, params, tokenizer


def _note(what: str, change: Optional[str]) -> None:
    """One stderr line naming an execution change (process 0), if there is one."""
    if change and jax.process_index() == 0:
        print(f"note: {what} with another execution: {change}", file=sys.stderr, flush=True)


def _load_workdir(workdir: str, step: Optional[int], overrides: dict):
    """A run's checkpoint: only the parameters are read (an Orbax partial restore: no optimizer
    state, no mesh), after checking that model_config.json and tokenizer/ are its own; they are
    read in the layout they were saved in and moved to the one `overrides` ask for."""
    if not os.path.isdir(workdir):
        raise CheckpointError(f"work directory {workdir!r} does not exist")
    workdir = os.path.abspath(workdir)
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise CheckpointError(f"{workdir} is not a gptjax work directory (no config.json)")
    if is_lora_run(workdir):
        model_cfg, base, adapters, _, tokenizer = load_lora_run(workdir, step, overrides)
        params = jax.device_get(lora_lib.merge(model_cfg, base, adapters))
        want = model_cfg.with_execution(**overrides)  # (the run's layout, unless asked)
        if want.scan_layers != model_cfg.scan_layers:
            params = convert_layout(want, params, want.scan_layers)
        return want, jax.device_put(params), tokenizer
    with _checked_checkpoint(workdir, step, overrides) as (model_cfg, ckpt, tokenizer, meta,
                                                           step):
        # Read in the saved layout. The shapes do not depend on the kernel, so they are traced
        # with xla (a run's own may not trace on this host, e.g. cudnn on a CPU).
        saved_scan = saved_execution(meta, model_cfg)["scan_layers"]
        params = ckpt.restore_params(abstract_params(model_cfg.with_execution(
            scan_layers=saved_scan, attention_impl="xla")), step)
    if saved_scan != model_cfg.scan_layers:
        params = convert_layout(model_cfg, params, model_cfg.scan_layers)
    _note(f"loading step {step}", execution_change(meta, model_cfg))
    return model_cfg, jax.device_put(params), tokenizer


@contextlib.contextmanager
def _checked_checkpoint(workdir: str, step: Optional[int], overrides: dict):
    """(model_cfg, checkpointer, tokenizer, metadata, step) of a run's checkpoint `step` (None =
    the latest), its metadata checked against the run's model_config.json (under `overrides`)
    and tokenizer/; the checkpointer is closed when the block ends."""
    with open(os.path.join(workdir, "model_config.json")) as fh:
        model_cfg = GPTConfig.from_dict(json.load(fh)).with_execution(**overrides)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
    try:
        tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
        meta = ckpt.restore_meta(step)
        step = ckpt.latest_step() if step is None else step
        check_checkpoint_meta(step, meta, model_cfg=model_cfg,
                              tokenizer=tokenizer_info(tokenizer))
        yield model_cfg, ckpt, tokenizer, meta, step
    finally:
        ckpt.close()


def _load_hf(hf_dir: str, tok_path: str):
    """An imported transformers / OpenAI model and its tokenizer."""
    model_cfg, params = from_hf(hf_dir)
    # A gptjax tokenizer, GPT-2's / GPT-1's BPE files, or transformers' tokenizer.json.
    tokenizer = from_model_dir(tok_path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer in {tok_path!r} has {tokenizer.vocab_size} ids but the model "
                         f"in {hf_dir!r} only {model_cfg.vocab_size} embeddings")
    return model_cfg, jax.device_put(params), tokenizer


# ================================================================================ LoRA runs
def params_fingerprint(model_cfg: GPTConfig, params) -> str:
    """A short hash of a parameter tree: its paths, shapes and an evenly strided sample of up to
    ~64K values of each array, in the per-layer layout (the same for either `scan_layers`)."""
    if "h" in params:
        params = unstack_layers(model_cfg, params)
    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_leaves_with_path(params),
                          key=lambda kv: jax.tree_util.keystr(kv[0])):
        flat = np.asarray(x).reshape(-1)
        h.update(f"{jax.tree_util.keystr(path)}{np.shape(x)}".encode())
        h.update(np.ascontiguousarray(flat[::max(1, flat.size // 65536)], np.float32).tobytes())
    return h.hexdigest()[:16]


def is_lora_run(workdir: str) -> bool:
    """Whether `workdir` is a train.py run of LoRA adapters (its config.json's lora.rank > 0)."""
    try:
        with open(os.path.join(workdir, "config.json")) as fh:
            return int((json.load(fh).get("lora") or {}).get("rank", 0)) > 0
    except (OSError, ValueError):
        return False


def load_lora_run(workdir: str, step: Optional[int] = None,
                  execution: Union[dict, str, None] = None):
    """The parts of a LoRA train.py run (lora.rank > 0), for merging and export.

    The base is loaded again from where the run's checkpoint says it came from (its init kind,
    path and step) and must have the fingerprint recorded there; it comes back as the run trained
    over it: fp32, or weight-only bf16/int8 (`lora.base_weights`; `lora.merge` dequantizes).

    Args:
      workdir: the LoRA run's work directory.
      step: its checkpoint step; None = the latest.
      execution: execution overrides, as for `load_pretrained` (the layout stays the run's).

    Returns:
      (GPTConfig, base params, adapters (gptjax.nn.lora's tree), LoraConfig, tokenizer).

    Raises:
      CheckpointError: not a LoRA run, a checkpoint that does not match the run, or a base that
        changed since the run trained on it.
    """
    overrides = parse_execution(execution) if isinstance(execution, str) else dict(execution or {})
    workdir = os.path.abspath(workdir)
    if not is_lora_run(workdir):
        raise CheckpointError(f"{workdir} is not a LoRA run (its config.json has no lora.rank > 0)")
    with _checked_checkpoint(workdir, step, {}) as (model_cfg, ckpt, tokenizer, meta, step):
        lo, src = meta["lora"], meta["base"]
        lora_cfg = lora_lib.LoraConfig(rank=lo["rank"], alpha=lo["alpha"], dropout=lo["dropout"],
                                       targets=tuple(lo["targets"]))
        overrides["scan_layers"] = saved_execution(meta, model_cfg)["scan_layers"]
        model_cfg = model_cfg.with_execution(**overrides)
        adapters = ckpt.restore_params(lora_lib.abstract_lora(
            model_cfg.with_execution(attention_impl="xla"), lora_cfg), step)
    if src["kind"] == "hf":
        base_cfg, base, _ = load_pretrained(hf_dir=src["path"], execution=overrides,
                                            tokenizer_path=src.get("tokenizer_path") or None)
    else:
        base_cfg, base, _ = load_pretrained(workdir=src["path"], step=src["step"],
                                            execution=overrides)
    found = params_fingerprint(base_cfg, base)
    if base_cfg.architecture() != model_cfg.architecture() or found != src["fingerprint"]:
        raise CheckpointError(f"the base of LoRA run {workdir} ({src['kind']} {src['path']} step "
                              f"{src['step']}) changed: fingerprint {found}, the run trained on "
                              f"{src['fingerprint']}; put that base back")
    if lo["base_weights"] != "fp32":
        base = quantize_params(model_cfg, base, lo["base_weights"])
    return model_cfg, base, jax.tree_util.tree_map(jax.numpy.asarray, adapters), lora_cfg, \
        tokenizer
