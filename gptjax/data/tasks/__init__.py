"""Finetuning tasks in the layouts users have: GLUE TSVs, SNLI, SciTail, RACE, Story Cloze, MCTest.

Each task is a `TaskSpec` in `TASKS` (its GPT-1 task type, labels, metrics, splits, files and
submission names) and loads with `load_task`:

    data = load_task("sst2", path="../shared/data/glue/SST-2")        # GLUE-format TSV directory
    data = load_task("glue/sst2", data_dir="../shared/tfds")           # a prepared tfds data_dir
    data.splits["dev"][0]   # Example(idx=0, text_a="it 's a charming ...", label=1)
    print(data.report())    # rows read and skipped per split, with the reasons

Layouts read (one directory per task, one reader module per family):

  GLUE (`glue`, `download_glue_data.py`): CoLA, SST-2, MRPC, STS-B, QQP, QNLI, RTE, WNLI as
    {train,dev,test}.tsv; MNLI as train.tsv, dev_{matched,mismatched}.tsv,
    test_{matched,mismatched}.tsv. Columns are found by header name; CoLA train/dev have no
    header (source, label, original label, sentence). Fields are never quoted (GLUE's own reader).
  SNLI 1.0 (`snli`): snli_1.0_{train,dev,test}.txt (TSV) or .jsonl; pairs without a gold label
    ('-') skip.
  SciTail 1.1 (`snli`): tsv_format/scitail_1.0_{train,dev,test}.tsv (premise, hypothesis,
    entails|neutral).
  RACE (`race`): {train,dev,test}/{high,middle}/*.txt, one JSON object per passage (article,
    questions, options, answers); one example per question.
  Story Cloze 2016 (`story_cloze`): {val,test}_spring2016.csv. As in GPT-1, the labelled
    validation file is the training data: a fixed 20% of it (374 of 1,871 stories) is held out
    as 'dev'; 'test' is the test file.
  MCTest (`mctest`): mc{160,500}.{train,dev,test}.tsv plus .ans answer files; one example per
    question.
  tfds (`tfds_reader`): the GLUE and SNLI datasets prepared in a tfds data_dir.

Malformed rows (wrong number of fields, unknown label, bad JSON, ...) are skipped and counted per
reason, never fatal; `TaskData.report()` says how many and shows the first few locations.
`types` holds what the readers share, `files` the parsing they share, `registry` the tasks.
"""

from gptjax.data.tasks.registry import TASKS, get_task, load_task, write_predictions
from gptjax.data.tasks.story_cloze import STORY_CLOZE_DEV_FRACTION
from gptjax.data.tasks.types import (
    TASK_TYPES,
    Example,
    Label,
    SplitReport,
    TaskData,
    TaskSpec,
    check_task_type,
)

__all__ = [
    "STORY_CLOZE_DEV_FRACTION",
    "TASKS",
    "TASK_TYPES",
    "Example",
    "Label",
    "SplitReport",
    "TaskData",
    "TaskSpec",
    "check_task_type",
    "get_task",
    "load_task",
    "write_predictions",
]
