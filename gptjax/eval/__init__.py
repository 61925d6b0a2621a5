"""Evaluation: sliding-window perplexity and GPT-3-style zero/one/few-shot tasks.

    from gptjax.eval import perplexity, fewshot, templates
"""

from gptjax.eval import fewshot, perplexity, templates

__all__ = ["fewshot", "perplexity", "templates"]
