"""Story Cloze 2016 (2-way story ending): multiple choice, <s> story $ ending_k <e>; accuracy.
As in GPT-1 the labelled validation file is the training data (374 stories held out as dev);
the test file is labelled too, so test accuracy is in predictions/ and zero-shot is possible.

Run (from a Hugging Face GPT-2 directory: config.json, model.safetensors, vocab.json, merges.txt;
or --config.init.kind=workdir --config.init.path=<a train.py work directory>):
  python finetune.py --config configs/finetune/story_cloze.py --workdir runs/ft_story_cloze \
      --config.init.kind=hf --config.init.path=/models/gpt2

Zero-shot with the LM alone:
  python finetune.py --config configs/finetune/story_cloze.py --workdir runs/zs_story_cloze \
      --mode=zero_shot --config.init.kind=hf --config.init.path=/models/gpt2

Expected: GPT-1 Table 3: 86.5% test accuracy.
That figure is the paper's, for GPT-1's 117M model pretrained on BooksCorpus; it was not measured
here; tiny CPU models score far lower (bench/finetune_sst2.py measures one on SST-2).
"""

from gptjax.defaults import finetune_config


def get_config():
    return finetune_config("story_cloze", "../shared/data/story_cloze")
