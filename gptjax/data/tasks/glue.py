"""GLUE's TSV layout (`download_glue_data.py`): CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE,
WNLI as {train,dev,test}.tsv (MNLI: train, dev_/test_{matched,mismatched}), columns by header name.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Sequence

from gptjax.data.tasks.files import Columns, read_tsv
from gptjax.data.tasks.types import Example, SplitReport, TaskSpec


def glue_reader(files: dict, cols: Columns, no_header: Sequence[str] = (),
                positions: Optional[dict] = None) -> Callable:
    """A reader of one GLUE task: `read(spec, path, split, rep)` yields a split's Examples.

    Args:
      files: split name -> file name in the task directory.
      cols: the header names of the task's columns.
      no_header: splits whose file has no header (CoLA train/dev), read by `positions`.
      positions: field -> column index for those splits.
    """

    def read(spec: TaskSpec, path: str, split: str, rep: SplitReport) -> Iterator[Example]:
        file = os.path.join(path, files[split])
        if split in no_header:
            return read_tsv(spec, file, cols, rep, header=False, positions=positions)
        return read_tsv(spec, file, cols, rep)
    return read


GLUE_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}

# CoLA's train/dev files have no header: source, label, original label (only on errors), sentence.
read_cola = glue_reader(GLUE_FILES, Columns("sentence", idx="index"),
                        no_header=("train", "dev"), positions={"label": 1, "text_a": 3})
read_sst2 = glue_reader(GLUE_FILES, Columns("sentence", label="label", idx="index"))
read_mrpc = glue_reader(GLUE_FILES, Columns("#1 String", "#2 String", "Quality", "index"))
read_stsb = glue_reader(GLUE_FILES, Columns("sentence1", "sentence2", "score", "index"))
read_qqp = glue_reader(GLUE_FILES, Columns("question1", "question2", "is_duplicate", "id"))
read_qnli = glue_reader(GLUE_FILES, Columns("question", "sentence", "label", "index"))
read_pair = glue_reader(GLUE_FILES, Columns("sentence1", "sentence2", "label", "index"))
read_mnli = glue_reader(
    {"train": "train.tsv", "dev_matched": "dev_matched.tsv",
     "dev_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
     "test_mismatched": "test_mismatched.tsv"},
    Columns("sentence1", "sentence2", "gold_label", "index"))
