"""Evaluation: LM continuation scores (on one device or a mesh), sliding-window perplexity,
GPT-3-style zero/one/few-shot tasks, GPT-2's zero-shot framings and GPT-1's zero-shot heuristics.

    from gptjax.eval import (fewshot, gpt2_zeroshot, mesh_scoring, perplexity, scoring,
                             templates, text_metrics, zero_shot, zeroshot_run)

gptjax.eval.lm_harness (the lm-evaluation-harness model 'gptjax') needs the `eval` extra and is
imported on its own.
"""

from gptjax.eval import (fewshot, gpt2_zeroshot, mesh_scoring, perplexity, scoring, templates,
                         text_metrics, zero_shot, zeroshot_run)

__all__ = ["fewshot", "gpt2_zeroshot", "mesh_scoring", "perplexity", "scoring", "templates",
           "text_metrics", "zero_shot", "zeroshot_run"]
