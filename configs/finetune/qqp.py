"""QQP (duplicate questions): similarity, both orderings; F1 and accuracy. Not in ../shared/data
(too large): download GLUE's QQP into ../shared/data/glue/QQP, or
point --config.task.path at it.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/qqp.py --workdir runs/ft_qqp \
      --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 Table 4: 70.3 F1 on the GLUE test set.
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("qqp", "../shared/data/glue/QQP")
