"""Where a train.py run starts from (`config.init`), and LoRA over a frozen base (`config.lora`).

`init.kind` 'scratch' initialises `config.model` randomly with a tokenizer built as
`config.tokenizer` says (pretraining). 'hf' (a local transformers GPT-2 / OpenAI-GPT directory)
and 'workdir' (a train.py work directory; `init.step` its checkpoint, <= 0 the latest) start the
first step from those weights with that model's architecture and tokenizer: `config.model` and
`config.tokenizer` are not used, `init.execution` says how the model runs (remat, dropout, ...).
The tokenizer is saved into the run's `tokenizer/` and the architecture into its
`model_config.json`, so a resumed run continues from its own checkpoint as a pretraining run
does. The architecture is read from the model's config file alone (`init_architecture`): the
checks and `--dry_run` read no weights.

With `lora.rank` > 0 the run trains LoRA adapters (gptjax.nn.lora) over the frozen pretrained
base, held in `lora.base_weights` (fp32, or weight-only bf16/int8: QLoRA-style); its checkpoints
record the LoRA settings and where the base came from with a fingerprint of its values
(`base_source`), and a resume refuses a base that changed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Optional

import jax
import ml_collections

from gptjax.checks import check_choice, check_int
from gptjax.config import ConfigError, GPTConfig, parse_execution
from gptjax.data.tokenizers import Tokenizer, from_model_dir, load_tokenizer
from gptjax.nn.convert import config_from_hf
from gptjax.nn.lora import LoraConfig, check_lora_config, resolve_targets
from gptjax.nn.quant import WEIGHT_FORMATS
from gptjax.runs.checkpoint import Checkpointer, CheckpointError
from gptjax.runs.pretrained import check_checkpoint_meta, load_pretrained, params_fingerprint

INIT_KINDS = ("scratch", "hf", "workdir")
_CONFIG_FILE = {"hf": "config.json", "workdir": "model_config.json"}

_int = functools.partial(check_int, error=ConfigError)
_choice = functools.partial(check_choice, error=ConfigError)


def check_init_config(config: ml_collections.ConfigDict) -> None:
    """A one-line ConfigError for the first impossible value of `config.init` or `config.lora`."""
    init = config.init
    _choice("init.kind", init.kind, INIT_KINDS)
    _int("init.step", init.step, -1)
    parse_execution(init.execution)  # ConfigError for an item that is not an execution field
    if init.kind != "scratch":
        name = _CONFIG_FILE[init.kind]
        if not init.path or not os.path.isfile(os.path.join(init.path, name)):
            what = ("a transformers GPT-2 / OpenAI-GPT directory" if init.kind == "hf"
                    else "a train.py work directory")
            raise ConfigError(f"init.path={init.path!r}: init.kind={init.kind!r} needs {what} "
                              f"with a {name}")
    lo = config.lora
    _int("lora.rank", lo.rank, 0)
    _choice("lora.base_weights", lo.base_weights, WEIGHT_FORMATS)
    if lo.rank == 0:
        if lo.base_weights != "fp32":
            raise ConfigError(f"lora.base_weights={lo.base_weights!r} needs lora.rank > 0 (full "
                              "finetuning trains fp32 weights); allowed with rank 0: 'fp32'")
        return
    if init.kind == "scratch":
        raise ConfigError(f"lora.rank={lo.rank} trains adapters over pretrained weights: set "
                          "init.kind to 'hf' or 'workdir' (with init.path)")
    try:
        check_lora_config(lora_settings(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def lora_settings(config: ml_collections.ConfigDict) -> Optional[LoraConfig]:
    """The run's LoraConfig (targets resolved), or None when `lora.rank` is 0 (full training)."""
    lo = config.lora
    if lo.rank <= 0:
        return None
    return LoraConfig(rank=int(lo.rank), alpha=float(lo.alpha), dropout=float(lo.dropout),
                      targets=resolve_targets(lo.targets))


def init_architecture(config: ml_collections.ConfigDict) -> Optional[GPTConfig]:
    """The pretrained model's GPTConfig with `init.execution` applied, read from its config file
    (no weights); None for init.kind 'scratch'."""
    init = config.init
    if init.kind == "scratch":
        return None
    with open(os.path.join(init.path, _CONFIG_FILE[init.kind])) as fh:
        d = json.load(fh)
    base = config_from_hf(d) if init.kind == "hf" else GPTConfig.from_dict(d)
    return base.with_execution(**parse_execution(init.execution))


def init_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The pretrained model's tokenizer: hf, GPT-2's / OpenAI GPT's BPE files in
    `init.tokenizer_path` (default `init.path`) or a gptjax tokenizer directory there; workdir,
    the run's own tokenizer/."""
    init = config.init
    if init.kind == "workdir":
        return load_tokenizer(os.path.join(init.path, "tokenizer"))
    return from_model_dir(init.tokenizer_path or init.path)


def _resolved_step(config: ml_collections.ConfigDict) -> Optional[int]:
    """init.kind 'workdir': the checkpoint step `init.step` names (<= 0: the latest now)."""
    init = config.init
    if init.kind != "workdir":
        return None
    if init.step > 0:
        return int(init.step)
    ckpt = Checkpointer(os.path.join(init.path, "checkpoints"), async_save=False, read_only=True)
    try:
        step = ckpt.latest_step()
    finally:
        ckpt.close()
    if step is None:
        raise CheckpointError(f"init.path={init.path!r} has no checkpoint to start from")
    return int(step)


def load_init(config: ml_collections.ConfigDict, model_cfg: GPTConfig,
              step: Optional[int] = None) -> tuple:
    """(params, base source) of the pretrained weights `config.init` names.

    Args:
      config: the run's complete config (init.kind 'hf' or 'workdir').
      model_cfg: the run's GPTConfig (its architecture is checked, its layout used).
      step: init.kind 'workdir': the checkpoint to read (a resumed run's recorded base step);
        None = the one `init.step` names.

    Returns:
      (parameters as single-device arrays in `model_cfg`'s layout, `base_source`'s dict).
    """
    init = config.init
    execution = dict(parse_execution(init.execution), scan_layers=model_cfg.scan_layers)
    step = _resolved_step(config) if step is None or init.kind != "workdir" else step
    if init.kind == "hf":
        cfg, params, _ = load_pretrained(hf_dir=init.path, execution=execution,
                                         tokenizer_path=init.tokenizer_path or None)
    else:
        cfg, params, _ = load_pretrained(workdir=init.path, step=step, execution=execution)
    if cfg.architecture() != model_cfg.architecture():
        raise CheckpointError(f"the model in init.path={init.path!r} changed while this run "
                              "started (another architecture than its config file said)")
    return params, base_source(config, step, params_fingerprint(cfg, params))


def base_source(config: ml_collections.ConfigDict, step: Optional[int], fingerprint: str
                ) -> dict:
    """Where a run's pretrained weights came from, as its checkpoints record it."""
    init = config.init
    return {"kind": init.kind, "path": os.path.abspath(init.path), "step": step,
            "tokenizer_path": init.tokenizer_path, "fingerprint": fingerprint}


def check_run_meta(step: int, meta: dict, *, model_cfg: GPTConfig, tokenizer: dict,
                   init_meta: dict) -> None:
    """CheckpointError unless checkpoint `step` is of this run: its architecture and tokenizer
    (check_checkpoint_meta), its LoRA settings and base (`check_base_meta`; `init_meta` holds
    this run's `lora` and `base`, empty without LoRA)."""
    check_checkpoint_meta(step, meta, model_cfg=model_cfg, tokenizer=tokenizer)
    check_base_meta(step, meta, lora=init_meta.get("lora"), base=init_meta.get("base"))


def check_base_meta(step: int, meta: dict, *, lora: Optional[dict], base: Optional[dict]
                    ) -> None:
    """Raises CheckpointError when checkpoint `step` was trained with other LoRA settings (or
    without LoRA, or with it when this run has none) or over another base than `base`.

    Args:
      step: the checkpoint's step.
      meta: its metadata.
      lora: this run's LoRA settings (`lora_meta`), None without LoRA.
      base: this run's base source (`base_source`), None without LoRA.
    """
    saved = meta.get("lora")
    if (saved is None) != (lora is None):
        there, here = (("LoRA adapters", "the full model (lora.rank=0)") if lora is None else
                       ("the full model", f"LoRA adapters (lora.rank={lora['rank']})"))
        raise CheckpointError(f"checkpoint step {step} holds {there} but this config trains "
                              f"{here}; use another --workdir")
    if lora is None:
        return
    for k in ("rank", "alpha", "dropout", "targets", "base_weights"):
        if saved.get(k) != lora[k]:
            raise CheckpointError(f"checkpoint step {step} has lora.{k}={saved.get(k)!r}, this "
                                  f"config {lora[k]!r}; use the run's own or another --workdir")
    was = meta.get("base") or {}
    if was.get("fingerprint") != base["fingerprint"]:
        raise CheckpointError(
            f"checkpoint step {step} holds adapters of another base ({was.get('kind')} "
            f"{was.get('path')} step {was.get('step')}, fingerprint {was.get('fingerprint')}) "
            f"than init {base['kind']} {base['path']} step {base['step']} (fingerprint "
            f"{base['fingerprint']}); point init.path/init.step at the base it was trained on")


def lora_meta(config: ml_collections.ConfigDict) -> Optional[dict]:
    """The LoRA settings a checkpoint records (None without LoRA)."""
    lcfg = lora_settings(config)
    if lcfg is None:
        return None
    return {"rank": lcfg.rank, "alpha": lcfg.alpha, "dropout": lcfg.dropout,
            "targets": list(lcfg.targets), "base_weights": config.lora.base_weights}


def announce(config: ml_collections.ConfigDict, source: dict) -> None:
    """The start-up line of a run that starts from pretrained weights (process 0)."""
    init = config.init
    if jax.process_index() != 0 or init.kind == "scratch":
        return
    at = f" step {source['step']}" if source.get("step") is not None else ""
    print(f"init: {init.kind} weights {init.path}{at}: the pretrained model's architecture and "
          "tokenizer (config.model and config.tokenizer are not used; init.execution "
          f"{init.execution!r})", file=sys.stdout, flush=True)
