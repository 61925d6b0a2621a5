"""The task registry: every task's spec and reader, loading a task, writing GLUE submissions."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np

from gptjax.data.tasks import glue, mctest, race, snli, story_cloze
from gptjax.data.tasks.tfds_reader import read_tfds
from gptjax.data.tasks.types import Example, SplitReport, TaskData, TaskSpec, check_task_type

_MNLI_SPLITS = ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("cola", "classification", ("0", "1"), metrics=("matthews", "accuracy"),
             main_metric="matthews", submission=(("test", "CoLA.tsv"),),
             tfds_name="glue/cola", tfds_fields=("sentence",)),
    TaskSpec("sst2", "classification", ("0", "1"), submission=(("test", "SST-2.tsv"),),
             tfds_name="glue/sst2", tfds_fields=("sentence",), zero_shot="sentiment"),
    TaskSpec("mrpc", "similarity", ("0", "1"), metrics=("f1", "accuracy"), main_metric="f1",
             submission=(("test", "MRPC.tsv"),), tfds_name="glue/mrpc",
             tfds_fields=("sentence1", "sentence2")),
    TaskSpec("stsb", "similarity", (), metrics=("pearson", "spearman"), main_metric="pearson",
             submission=(("test", "STS-B.tsv"),), tfds_name="glue/stsb",
             tfds_fields=("sentence1", "sentence2")),
    TaskSpec("qqp", "similarity", ("0", "1"), metrics=("f1", "accuracy"), main_metric="f1",
             submission=(("test", "QQP.tsv"),), tfds_name="glue/qqp",
             tfds_fields=("question1", "question2")),
    TaskSpec("mnli", "entailment", ("entailment", "neutral", "contradiction"),
             splits=_MNLI_SPLITS, dev_splits=("dev_matched", "dev_mismatched"),
             test_splits=("test_matched", "test_mismatched"),
             submission=(("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv")),
             tfds_name="glue/mnli", tfds_fields=("premise", "hypothesis"),
             tfds_splits=(("train", "train"), ("dev_matched", "validation_matched"),
                          ("dev_mismatched", "validation_mismatched"),
                          ("test_matched", "test_matched"),
                          ("test_mismatched", "test_mismatched"))),
    TaskSpec("qnli", "entailment", ("entailment", "not_entailment"),
             submission=(("test", "QNLI.tsv"),), tfds_name="glue/qnli",
             tfds_fields=("question", "sentence")),
    TaskSpec("rte", "entailment", ("entailment", "not_entailment"),
             submission=(("test", "RTE.tsv"),), tfds_name="glue/rte",
             tfds_fields=("sentence1", "sentence2")),
    TaskSpec("wnli", "entailment", ("0", "1"), submission=(("test", "WNLI.tsv"),),
             tfds_name="glue/wnli", tfds_fields=("sentence1", "sentence2")),
    TaskSpec("snli", "entailment", ("entailment", "neutral", "contradiction"),
             tfds_name="snli", tfds_fields=("premise", "hypothesis")),
    TaskSpec("scitail", "entailment", ("entails", "neutral")),
    TaskSpec("race", "multiple_choice", num_choices=4, zero_shot="choice"),
    TaskSpec("story_cloze", "multiple_choice", num_choices=2, zero_shot="choice"),
    TaskSpec("mctest", "multiple_choice", num_choices=4, zero_shot="choice"),
]}

_READERS: dict[str, Callable] = {
    "cola": glue.read_cola, "sst2": glue.read_sst2, "mrpc": glue.read_mrpc,
    "stsb": glue.read_stsb, "qqp": glue.read_qqp, "mnli": glue.read_mnli, "qnli": glue.read_qnli,
    "rte": glue.read_pair, "wnli": glue.read_pair, "snli": snli.read_snli,
    "scitail": snli.read_scitail, "race": race.read_race,
    "story_cloze": story_cloze.read_story_cloze, "mctest": mctest.read_mctest,
}
_SUBSET_TASKS = ("race", "mctest")

for _spec in TASKS.values():
    check_task_type(_spec.task_type)


def get_task(name: str) -> TaskSpec:
    """The TaskSpec of a task name ('sst2') or of its tfds name ('glue/sst2')."""
    if name in TASKS:
        return TASKS[name]
    by_tfds = {t.tfds_name: t for t in TASKS.values() if t.tfds_name}
    if name in by_tfds:
        return by_tfds[name]
    raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)} or the tfds names "
                     f"{sorted(by_tfds)}")



def load_task(name: str, path: str = "", *, data_dir: str = "",
              splits: Optional[Sequence[str]] = None, subset: str = "") -> TaskData:
    """Loads a task's splits from its standard file layout or from a prepared tfds data_dir.

    Args:
      name: a TASKS key ('sst2', 'mnli', 'race', ...) or a tfds name ('glue/sst2').
      path: the task's directory in its standard layout (see the module docstring).
      data_dir: a tfds data_dir where `spec.tfds_name` is prepared; used instead of `path`.
      splits: which splits to read (default: all of the task's splits).
      subset: RACE 'high' / 'middle', MCTest 'mc160' / 'mc500'; '' reads both.

    Returns:
      The TaskData: examples per split, plus the skipped-row report.

    Raises:
      ValueError: unknown task / split / subset, or a file whose header is not the task's.
      FileNotFoundError: a split's file or the directory is missing.
    """
    spec = get_task(name)
    splits = tuple(spec.splits if splits is None else splits)
    unknown = [s for s in splits if s not in spec.splits]
    if unknown:
        raise ValueError(f"task {spec.name!r} has no split(s) {unknown}; allowed: "
                         f"{list(spec.splits)}")
    if subset and spec.name not in _SUBSET_TASKS:
        raise ValueError(f"subset={subset!r} applies only to {list(_SUBSET_TASKS)}, not to "
                         f"{spec.name!r}")
    if bool(path) == bool(data_dir):
        raise ValueError(f"task {spec.name!r}: give exactly one of path (a directory in the "
                         "task's file layout) or data_dir (a tfds data_dir)")
    out, reports = {}, {}
    if data_dir:
        if not spec.tfds_name:
            raise ValueError(f"task {spec.name!r} has no supported tfds dataset; load it from "
                             "its files with path=")
        for s in splits:
            reports[s] = SplitReport()
            out[s] = list(read_tfds(spec, os.fspath(data_dir), s, reports[s]))
        return TaskData(spec, out, reports, f"tfds:{spec.tfds_name}@{data_dir}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"task {spec.name!r}: directory not found: {path}; point "
                                "--config.task.path (finetune.py) or TASK=DIR (eval.py --tasks) "
                                "at the task's files")
    reader = _READERS[spec.name]
    for s in splits:
        reports[s] = SplitReport()
        if spec.name in _SUBSET_TASKS:
            out[s] = list(reader(spec, path, s, reports[s], subset=subset))
        else:
            out[s] = list(reader(spec, path, s, reports[s]))
    return TaskData(spec, out, reports, path)


# ================================================================================ submissions
def write_predictions(path: str, spec: TaskSpec, examples: Sequence[Example],
                      preds: Sequence) -> str:
    """Writes predictions in the GLUE submission format: a TSV `index<TAB>prediction`.

    Classes are written as the file's label strings ('0'/'1', 'entailment', ...), regression
    values with three decimals clipped to STS-B's [0, 5], candidates as their index.

    Returns:
      The path written.
    """
    preds = np.asarray(preds)
    if len(preds) != len(examples):
        raise ValueError(f"{len(preds)} predictions for {len(examples)} examples")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("index\tprediction\n")
        for ex, p in zip(examples, preds):
            if spec.regression:
                value = f"{float(np.clip(p, 0.0, 5.0)):.3f}"
            elif spec.task_type == "multiple_choice":
                value = str(int(p))
            else:
                value = spec.file_labels[int(p)]
            fh.write(f"{ex.idx}\t{value}\n")
    return path
