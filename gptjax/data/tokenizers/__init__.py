"""Tokenizers behind one small interface: characters, SentencePiece BPE, GPT-2 and GPT-1 BPE.

    tok = build_tokenizer("gpt2_bpe", path="/work/shared/data/gpt2_bpe")
    tok.encode("Hello world")  # [15496, 995]
    tok.save(workdir / "tokenizer")
    tok = load_tokenizer(workdir / "tokenizer")

`base` holds the interface, the registry `KINDS`, loading, building and `fingerprint`; each kind
has a module of its own, imported here so that it registers itself.
"""

from gptjax.data.tokenizers.base import (
    CONFIG_NAME,
    END_OF_WORD,
    KINDS,
    Tokenizer,
    build_tokenizer,
    fingerprint,
    from_hf_files,
    from_model_dir,
    load_tokenizer,
    register,
    tokenizer_info,
)
# Import order is registration order: `KINDS` (and the errors that list it) reads char,
# sentencepiece, gpt2_bpe, openai_gpt.
from gptjax.data.tokenizers.char import CharTokenizer
from gptjax.data.tokenizers.sentencepiece import SPM_MODEL_NAME, SentencePieceTokenizer
from gptjax.data.tokenizers.gpt2_bpe import ENDOFTEXT, GPT2_PATTERN, GPT2BPETokenizer
from gptjax.data.tokenizers.openai_gpt import (
    OpenAIGPTTokenizer,
    bert_normalize,
    bert_pre_tokenize,
)

__all__ = [
    "CONFIG_NAME",
    "END_OF_WORD",
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "KINDS",
    "SPM_MODEL_NAME",
    "CharTokenizer",
    "GPT2BPETokenizer",
    "OpenAIGPTTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "bert_normalize",
    "bert_pre_tokenize",
    "build_tokenizer",
    "fingerprint",
    "from_hf_files", "from_model_dir",
    "load_tokenizer",
    "register",
    "tokenizer_info",
]
