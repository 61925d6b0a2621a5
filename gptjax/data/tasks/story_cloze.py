"""Story Cloze 2016: {val,test}_spring2016.csv; GPT-1 trains on the labelled validation file."""

from __future__ import annotations

import csv
import io
import os
from typing import Iterator

import numpy as np

from gptjax.data.tasks.files import require
from gptjax.data.tasks.types import Example, SplitReport, TaskSpec

_STORY_CLOZE_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3",
                       "InputSentence4", "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
                       "AnswerRightEnding"]
STORY_CLOZE_DEV_FRACTION = 0.2  # GPT-1 held out 374 of the 1,871 validation stories


def _csv_rows(text: str, name: str, rep: SplitReport) -> list:
    """The rows of a CSV text; a row the csv module cannot parse is skipped and counted."""
    reader, rows = csv.reader(io.StringIO(text)), []
    while True:
        try:
            rows.append(next(reader))
        except StopIteration:
            return rows
        except csv.Error:  # e.g. a stray carriage return inside an unquoted field
            rep.skip("unparseable CSV row", f"{name}:{reader.line_num}")


def _read_story_cloze_file(file: str, rep: SplitReport) -> Iterator[Example]:
    with open(require(file), encoding="utf-8", errors="replace", newline="") as fh:
        rows = _csv_rows(fh.read(), os.path.basename(file), rep)
    if not rows or [c.strip() for c in rows[0]] != _STORY_CLOZE_HEADER:
        raise ValueError(f"{file}: expected the Story Cloze header {_STORY_CLOZE_HEADER}")
    name = os.path.basename(file)
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{name}:{lineno}"
        if len(row) != len(_STORY_CLOZE_HEADER):
            rep.skip("wrong number of fields", where)
            continue
        if row[7].strip() not in ("1", "2"):
            rep.skip("bad label", where)
            continue
        rep.read += 1
        yield Example(idx=row[0], text_a=" ".join(s.strip() for s in row[1:5]),
                      choices=(row[5].strip(), row[6].strip()), label=int(row[7]) - 1)


def read_story_cloze(spec: TaskSpec, path: str, split: str, rep: SplitReport
                     ) -> Iterator[Example]:
    """Reads one split of the task's files in `path`; counts rows read and skipped in `rep`."""
    if split == "test":
        yield from _read_story_cloze_file(os.path.join(path, "test_spring2016.csv"), rep)
        return
    # train and dev both come from the validation file: a fixed permutation (seed 0) puts the
    # first 20% in dev, so the two never overlap and every run splits the same way.
    scratch = SplitReport()
    rows = list(_read_story_cloze_file(os.path.join(path, "val_spring2016.csv"), scratch))
    perm = np.random.default_rng(0).permutation(len(rows))
    n_dev = int(round(STORY_CLOZE_DEV_FRACTION * len(rows)))
    keep = sorted(perm[:n_dev] if split == "dev" else perm[n_dev:])
    rep.skipped.update(scratch.skipped)
    rep.where.extend(scratch.where)
    rep.read += len(keep)
    yield from (rows[i] for i in keep)
