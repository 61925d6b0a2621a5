"""WNLI (Winograd NLI): entailment; accuracy. GLUE's dev set is adversarial to its train set,
so finetuned models rarely beat the majority class.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/wnli.py --workdir runs/ft_wnli \
      --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 does not report WNLI; the dev majority class scores 56.3%.
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("wnli", "../shared/data/glue/WNLI")
