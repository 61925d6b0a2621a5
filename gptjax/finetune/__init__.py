"""GPT-1 finetuning: task heads, the finetuning loop, GLUE metrics, layer-transfer analysis."""

from gptjax.finetune.loop import finetune, layer_transfer_analysis, zero_shot

__all__ = ["finetune", "layer_transfer_analysis", "zero_shot"]
