"""SST-2 (binary sentiment): classification, <s> sentence <e>; accuracy.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/sst2.py --workdir runs/ft_sst2 \
      --config.init.kind=hf --config.init.path=/models/gpt2

Zero-shot with the LM alone:
  python finetune.py --config configs/finetune/sst2.py --workdir runs/zs_sst2 \
      --mode=zero_shot --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 Table 4: 91.3% test accuracy. Zero-shot (--mode=zero_shot, GPT-1 section 5's
" very" + positive/negative heuristic) needs no finetuning.
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("sst2", "../shared/data/glue/SST-2")
