"""SNLI 1.0 (3-way NLI): entailment; accuracy; pairs without a gold label are skipped. Not in
../shared/data: unpack snli_1.0.zip into ../shared/data/snli_1.0
(next to the GLUE folders), or point --config.task.path at it.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/snli.py --workdir runs/ft_snli \
      --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 Table 2: 89.9% test accuracy.
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("snli", "../shared/data/snli_1.0")
