"""What every task reader produces and reads: task types, Example, TaskSpec, read reports."""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional, Union

from gptjax.checks import check_choice

# GPT-1's four input transformations (section 3.3); finetuning heads frame inputs by them.
TASK_TYPES = ("classification", "entailment", "similarity", "multiple_choice")

Label = Union[int, float, None]


def check_task_type(task_type: str) -> None:
    """Raises ValueError naming `task_type` unless it is one of TASK_TYPES."""
    check_choice("task_type", task_type, TASK_TYPES)


@dataclasses.dataclass(frozen=True)
class Example:
    """One task example.

    Attributes:
      idx: its id: GLUE's `index` column (what submissions are keyed by), else the row number or
        a string naming the passage and question.
      text_a: text, premise, first sentence, or multiple-choice context.
      text_b: hypothesis or second sentence (entailment, similarity).
      choices: candidate answers (multiple choice).
      label: class / correct-candidate index, a float for regression, None where unlabelled.
    """

    idx: Union[int, str]
    text_a: str
    text_b: Optional[str] = None
    choices: tuple = ()
    label: Label = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task: how it is framed for GPT-1's heads, read from disk, scored and submitted.

    Attributes:
      name: the key in TASKS ('sst2').
      task_type: one of TASK_TYPES.
      file_labels: the label strings of the files, in class-index order (also written in
        submissions); () for regression and multiple choice.
      num_choices: candidates per question (multiple choice).
      metrics: metric names (gptjax.finetune.metrics.METRICS), as the task's leaderboard
        reports them.
      main_metric: the one that picks the best checkpoint.
      splits: canonical split names this task has ('train', 'dev', 'test', MNLI's
        'dev_matched', ...).
      train_split, dev_splits, test_splits: the roles of those splits in finetuning.
      submission: (split, file name) pairs for the GLUE server ('SST-2.tsv'); other tasks write
        '<name>_<split>.tsv'.
      tfds_name: the tfds dataset with the same data ('glue/sst2'), '' if none is supported.
      tfds_fields: its text feature(s), in text_a, text_b order.
      tfds_splits: (canonical split, tfds split) pairs.
      zero_shot: GPT-1 section 5's zero-shot method: 'sentiment' (SST-2), 'choice' (multiple
        choice by LM likelihood) or '' (none).
    """

    name: str
    task_type: str
    file_labels: tuple = ()
    num_choices: int = 0
    metrics: tuple = ("accuracy",)
    main_metric: str = "accuracy"
    splits: tuple = ("train", "dev", "test")
    train_split: str = "train"
    dev_splits: tuple = ("dev",)
    test_splits: tuple = ("test",)
    submission: tuple = ()
    tfds_name: str = ""
    tfds_fields: tuple = ()
    tfds_splits: tuple = (("train", "train"), ("dev", "validation"), ("test", "test"))
    zero_shot: str = ""

    @property
    def regression(self) -> bool:
        return self.task_type != "multiple_choice" and not self.file_labels

    @property
    def num_labels(self) -> int:
        """Head classes: len(file_labels), 1 for regression, num_choices for multiple choice."""
        if self.task_type == "multiple_choice":
            return self.num_choices
        return len(self.file_labels) or 1

    def submission_file(self, split: str) -> str:
        return dict(self.submission).get(split, f"{self.name}_{split}.tsv")



@dataclasses.dataclass
class SplitReport:
    """Rows read and skipped in one split, with the first few skipped locations."""

    read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    where: list = dataclasses.field(default_factory=list)

    def skip(self, reason: str, location: str) -> None:
        self.skipped[reason] += 1
        if len(self.where) < 5:
            self.where.append(f"{location} ({reason})")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclasses.dataclass
class TaskData:
    """A loaded task: its spec, the examples of each split, and what was skipped reading them."""

    spec: TaskSpec
    splits: dict
    reports: dict
    source: str

    def report(self) -> str:
        """One line per split: rows read, rows skipped by reason, first skipped locations."""
        lines = []
        for split, rep in self.reports.items():
            line = f"{self.spec.name} {split}: {rep.read} examples"
            if rep.n_skipped:
                reasons = ", ".join(f"{n} {r}" for r, n in rep.skipped.most_common())
                line += f"; skipped {rep.n_skipped} ({reasons}); first: {'; '.join(rep.where)}"
            lines.append(line)
        return "\n".join(lines)
