"""GPT-1 finetuning: task heads, the decoder to start from, batches, the finetuning loop, GLUE
metrics, and section 5's analyses (zero-shot runs, layer transfer)."""

from gptjax.finetune.analysis import layer_transfer_analysis, zero_shot
from gptjax.finetune.dryrun import finetune_dry_run
from gptjax.finetune.loop import finetune

__all__ = ["finetune", "finetune_dry_run", "layer_transfer_analysis", "zero_shot"]
