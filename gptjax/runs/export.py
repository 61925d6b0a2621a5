"""Exports of a finetuned model for the tools people already use: merged weights as a transformers
directory (with its tokenizer files), the LoRA adapter as a PEFT directory.

    export_merged_hf(model_cfg, base, adapters, "out/hf", tokenizer=tok)  # GPT2LMHeadModel loads it
    export_peft(model_cfg, adapters, "out/adapter", base_model_name_or_path="gpt2")
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Optional, Union

from gptjax.config import GPTConfig
from gptjax.data.tokenizers import (GPT2BPETokenizer, OpenAIGPTTokenizer, Tokenizer,
                                    from_hf_files, load_tokenizer)
from gptjax.nn import lora
from gptjax.nn.convert import ConversionError, config_to_hf, to_hf
from gptjax.nn.peft import export_peft, from_peft
from gptjax.runs.checkpoint import Checkpointer
from gptjax.runs.pretrained import is_lora_run, load_lora_run, load_pretrained

__all__ = ["export_merged_hf", "export_peft", "export_run", "from_peft", "write_hf_tokenizer"]


def export_merged_hf(model_cfg: GPTConfig, base: Any, adapters: Optional[Any], out_dir,
                     tokenizer: Union[Tokenizer, str, os.PathLike, None] = None) -> str:
    """Write base + adapters merged (W + alpha / r A B, fp32) as a transformers GPT-2 (or, for a
    post-LN model, OpenAI-GPT) directory that `GPT2LMHeadModel.from_pretrained` loads.

    Args:
      model_cfg: the architecture (either layout).
      base: the base parameters: fp32, or weight-only bf16/int8 (dequantized first).
      adapters: the LoRA adapter tree, or None to write the base alone.
      out_dir: the directory to write (created; files there are overwritten).
      tokenizer: None, a gptjax tokenizer, or a directory holding one (a saved gptjax tokenizer,
        GPT-2's `encoder.json` + `vocab.bpe` / `vocab.json` + `merges.txt`, or GPT-1's BPE files):
        its files are written under transformers' names so `AutoTokenizer` loads them too.

    Returns:
      out_dir.
    """
    config_to_hf(model_cfg)  # fail before any writing for an architecture transformers lacks
    params = lora.merge(model_cfg, base, adapters or {})
    to_hf(model_cfg, params, out_dir)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, out_dir, model_max_length=model_cfg.n_ctx)
    return os.fspath(out_dir)


def write_hf_tokenizer(tokenizer: Union[Tokenizer, str, os.PathLike], out_dir,
                       model_max_length: Optional[int] = None) -> None:
    """Copy a GPT-2 / GPT-1 BPE tokenizer's files into `out_dir` as transformers names them
    (`vocab.json`, `merges.txt`, `tokenizer_config.json`).

    Raises:
      ConversionError: a tokenizer kind transformers' GPT-2 / OpenAI-GPT tokenizers do not read.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        path = pathlib.Path(tokenizer)
        if (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
            tokenizer = load_tokenizer(path)  # a gptjax tokenizer saved with .save()
        else:
            tokenizer = from_hf_files(path)
    if isinstance(tokenizer, GPT2BPETokenizer):
        files, cls = (tokenizer.encoder_json, tokenizer.vocab_bpe), "GPT2Tokenizer"
        extra = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                 "unk_token": "<|endoftext|>"}
    elif isinstance(tokenizer, OpenAIGPTTokenizer):
        files, cls, extra = (tokenizer.vocab_json, tokenizer.merges_txt), "OpenAIGPTTokenizer", {}
    else:
        raise ConversionError(f"tokenizer kind {getattr(tokenizer, 'kind', tokenizer)!r} has no "
                              "transformers GPT-2 tokenizer files; allowed: gpt2_bpe, openai_gpt "
                              "(or no tokenizer)")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for source, name in zip(files, ("vocab.json", "merges.txt")):
        if not ((out / name).exists() and os.path.samefile(source, out / name)):
            shutil.copyfile(source, out / name)
    config = dict(tokenizer_class=cls, **extra)
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_run(workdir: str, *, hf_dir: Optional[str] = None, peft_dir: Optional[str] = None,
               step: Optional[int] = None) -> str:
    """`train.py --workdir RUN --export_hf DIR / --export_peft DIR`: a train.py run's model as a
    transformers directory (a LoRA run's adapters merged into its base; the run's tokenizer files
    when it is GPT-2's or GPT-1's BPE) and a LoRA run's adapters as a PEFT directory.

    Args:
      workdir: the train.py run.
      hf_dir: where to write the merged transformers directory, or None.
      peft_dir: where to write the PEFT adapter directory (LoRA runs only), or None.
      step: the checkpoint step; None = the latest.

    Returns:
      One line per directory written.

    Raises:
      ValueError: neither directory given, or peft_dir for a run that is not a LoRA run.
    """
    if not hf_dir and not peft_dir:
        raise ValueError("give --export_hf DIR and/or --export_peft DIR")
    lines = []
    if is_lora_run(workdir):
        model_cfg, base, adapters, _, tokenizer = load_lora_run(workdir, step)
        if peft_dir:
            base_path = _peft_base(workdir, step)
            export_peft(model_cfg, adapters, peft_dir, base_model_name_or_path=base_path)
            lines.append(f"PEFT adapter of {workdir} -> {peft_dir} (base: "
                         f"{base_path or 'a gptjax run: export it with --export_hf first'})")
    elif peft_dir:
        raise ValueError(f"--export_peft: {workdir} is not a LoRA run (config lora.rank is 0); "
                         "allowed: --export_hf for its full weights")
    else:
        model_cfg, base, tokenizer = load_pretrained(workdir=workdir, step=step)
        adapters = None
    if hf_dir:
        tok = tokenizer if isinstance(tokenizer, (GPT2BPETokenizer, OpenAIGPTTokenizer)) else None
        export_merged_hf(model_cfg, base, adapters, hf_dir, tokenizer=tok)
        lines.append(f"transformers model of {workdir} -> {hf_dir}"
                     + ("" if tok else f" (no tokenizer files: its {tokenizer.kind!r} tokenizer "
                                       "has no transformers equivalent)"))
    return "\n".join(lines)


def _peft_base(workdir: str, step: Optional[int]) -> Optional[str]:
    """The base model a LoRA run's PEFT adapter names: the absolute transformers directory its
    checkpoint records, or None when the base is a gptjax run (PEFT cannot load one as is)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
    try:
        src = ckpt.restore_meta(step)["base"]
    finally:
        ckpt.close()
    return src["path"] if src["kind"] == "hf" else None
