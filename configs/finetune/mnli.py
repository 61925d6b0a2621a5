"""MNLI (3-way NLI): entailment, <s> premise $ hypothesis <e>; accuracy on dev_matched
(picks the best epoch) and dev_mismatched; MNLI-m.tsv and MNLI-mm.tsv for the GLUE server. Not in
../shared/data: download GLUE's MNLI into ../shared/data/glue/MNLI,
or point --config.task.path at it.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/mnli.py --workdir runs/ft_mnli \
      --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 Table 2: 82.1% (matched) / 81.4% (mismatched) test accuracy.
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("mnli", "../shared/data/glue/MNLI")
