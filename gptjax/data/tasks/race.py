"""RACE: {train,dev,test}/{high,middle}/*.txt, one JSON passage each; one example per question."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

from gptjax.data.tasks.types import Example, SplitReport, TaskSpec


def read_race(spec: TaskSpec, path: str, split: str, rep: SplitReport,
              subset: str = "") -> Iterator[Example]:
    """Reads one split of the task's files in `path`; counts rows read and skipped in `rep`."""
    levels = [subset] if subset else ["high", "middle"]
    bad = [lv for lv in levels if lv not in ("high", "middle")]
    if bad:
        raise ValueError(f"RACE subset={bad[0]!r}: allowed values are 'high', 'middle', '' (both)")
    files = []
    for lv in levels:
        d = os.path.join(path, split, lv)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"RACE directory not found: {d} (expected "
                                    f"<race>/{{train,dev,test}}/{{high,middle}}/*.txt)")
        files += sorted(glob.glob(os.path.join(d, "*.txt")))
    for file in files:
        where = os.path.relpath(file, path)
        try:
            with open(file, encoding="utf-8", errors="replace") as fh:
                doc = json.load(fh)
            article, questions = doc["article"], doc["questions"]
            options, answers = doc["options"], doc["answers"]
            if not (len(questions) == len(options) == len(answers)) or not isinstance(
                    article, str):
                raise KeyError("lengths")
        except (json.JSONDecodeError, KeyError, TypeError):
            rep.skip("malformed passage JSON", where)
            continue
        pid = doc.get("id", os.path.basename(file))
        for q, (question, opts, ans) in enumerate(zip(questions, options, answers)):
            qwhere = f"{where} question {q}"
            if (not isinstance(opts, list) or len(opts) != spec.num_choices
                    or not all(isinstance(o, str) for o in opts) or not isinstance(question, str)
                    or not isinstance(ans, str) or len(ans) != 1
                    or ans not in "ABCD"[:spec.num_choices]):
                rep.skip("bad options or answer", qwhere)
                continue
            # Cloze questions ('... _ ...') become the question filled with each option; others
            # keep the question in the context and use the option as the answer.
            if "_" in question:
                context, choices = article, tuple(question.replace("_", o) for o in opts)
            else:
                context, choices = f"{article} {question}", tuple(opts)
            rep.read += 1
            yield Example(idx=f"{pid}-{q}", text_a=context, choices=choices,
                          label="ABCD".index(ans))
