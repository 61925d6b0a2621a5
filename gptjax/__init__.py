"""gptjax: GPT-1, GPT-2 and GPT-3 in JAX/Flax."""

from gptjax.config import ConfigError, GPTConfig, PRESETS
from gptjax.model import GPT, abstract_params, init_cache, init_params

__all__ = ["GPT", "GPTConfig", "ConfigError", "PRESETS", "abstract_params", "init_cache",
           "init_params"]
__version__ = "0.1.0"
