"""Data for gptjax: text corpora through tensorflow-datasets, tokenizers, the token cache,
language-modelling batches, and finetuning tasks (`gptjax.data.tasks`)."""

from gptjax.data.corpora import (
    BUILTIN_DATASETS,
    LocalText,
    LocalTextConfig,
    PythonStdlib,
    PythonStdlibConfig,
    TextSource,
    default_cache_dir,
    default_data_dir,
    get_source,
    load_texts,
    local_text_config,
    open_tfds,
    prepare,
    prepare_local_text,
    prepare_python_stdlib,
    python_stdlib_config,
)
from gptjax.data.lm import LMBatcher, eval_batches, token_fingerprint
from gptjax.data.token_cache import cached_tokens, load_tokens, token_cache_path, token_dtype

__all__ = [
    "BUILTIN_DATASETS",
    "LMBatcher",
    "LocalText",
    "LocalTextConfig",
    "PythonStdlib",
    "PythonStdlibConfig",
    "TextSource",
    "cached_tokens",
    "default_cache_dir",
    "default_data_dir",
    "eval_batches",
    "get_source",
    "load_texts",
    "load_tokens",
    "local_text_config",
    "open_tfds",
    "prepare",
    "prepare_local_text",
    "prepare_python_stdlib",
    "python_stdlib_config",
    "token_cache_path",
    "token_dtype",
    "token_fingerprint",
]
