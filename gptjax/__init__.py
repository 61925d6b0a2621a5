"""gptjax: GPT-1, GPT-2 and GPT-3 in JAX/Flax.

The main entry points of every layer, from one import:

    from gptjax import GPT, GPTConfig, init_params, lm_loss, from_hf, to_hf      # model, loss, HF
    from gptjax import generate, load_pretrained, train_and_evaluate              # decode, load, train

The model layer loads with `import gptjax`; the entry points of higher layers (decoding, the
training loop) load on first use, so a program that imports only `gptjax.inference` never loads
the training loop (PEP 562 module `__getattr__`).
"""

import importlib

from gptjax.config import ConfigError, GPTConfig, PRESETS
from gptjax.nn.convert import from_hf, to_hf
from gptjax.nn.losses import lm_loss
from gptjax.nn.model import GPT, abstract_params, init_cache, init_params

_LAZY = {
    "generate": "gptjax.inference.sampling",
    "prepare_for_decoding": "gptjax.inference.sampling",
    "load_pretrained": "gptjax.runs.pretrained",
    "train_and_evaluate": "gptjax.train.loop",
}

__all__ = ["GPT", "GPTConfig", "ConfigError", "PRESETS", "abstract_params", "from_hf",
           "init_cache", "init_params", "lm_loss", "to_hf", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
