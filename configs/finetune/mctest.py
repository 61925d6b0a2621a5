"""MCTest mc160 + mc500 (4-way reading comprehension): multiple choice, one example per
question, <s> story question $ answer_k <e>; accuracy. --config.task.subset=mc160 or mc500.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/mctest.py --workdir runs/ft_mctest \
      --config.init.kind=hf --config.init.path=/models/gpt2

Zero-shot with the LM alone:
  python finetune.py --config configs/finetune/mctest.py --workdir runs/zs_mctest \
      --mode=zero_shot --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 and GPT-2 do not report MCTest; chance is 25%.
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("mctest", "../shared/data/mctest")
