"""Finetuning configs, one per task; each `get_config()` is built by `common.finetune_config`."""
