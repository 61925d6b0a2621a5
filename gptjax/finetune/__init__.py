"""GPT-1 finetuning: task heads, the finetuning loop, GLUE metrics, layer-transfer analysis."""
