"""Evaluation: LM continuation scores, sliding-window perplexity, GPT-3-style zero/one/few-shot
tasks and GPT-1's zero-shot heuristics.

    from gptjax.eval import fewshot, perplexity, scoring, templates, zero_shot
"""

from gptjax.eval import fewshot, perplexity, scoring, templates, zero_shot

__all__ = ["fewshot", "perplexity", "scoring", "templates", "zero_shot"]
