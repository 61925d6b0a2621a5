"""QNLI (question-answer entailment): entailment, <s> question $ sentence <e>; accuracy. Not in
../shared/data: download GLUE's QNLI into ../shared/data/glue/QNLI,
or point --config.task.path at it.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/qnli.py --workdir runs/ft_qnli \
      --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 Table 2: 88.1% test accuracy (on the QNLI version of its time).
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("qnli", "../shared/data/glue/QNLI")
