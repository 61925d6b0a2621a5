"""RACE (4-way reading comprehension): multiple choice, <s> article question $ answer_k <e>;
accuracy. Not in ../shared/data: unpack RACE.tar.gz into ../shared/data/RACE (or point
--config.task.path at it); --config.task.subset=middle or
high for RACE-m / RACE-h.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/race.py --workdir runs/ft_race \
      --config.init.kind=hf --config.init.path=/models/gpt2

Zero-shot with the LM alone:
  python finetune.py --config configs/finetune/race.py --workdir runs/zs_race \
      --mode=zero_shot --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 Table 3: 59.0% test accuracy (RACE-m 62.9, RACE-h 57.4).
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("race", "../shared/data/RACE")
