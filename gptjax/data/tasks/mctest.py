"""MCTest: mc{160,500}.{train,dev,test}.tsv plus .ans answer files; one example per question."""

from __future__ import annotations

import os
from typing import Iterator

from gptjax.data.tasks.files import read_lines, require
from gptjax.data.tasks.types import Example, SplitReport, TaskSpec


def read_mctest(spec: TaskSpec, path: str, split: str, rep: SplitReport,
                subset: str = "") -> Iterator[Example]:
    """Reads one split of the task's files in `path`; counts rows read and skipped in `rep`."""
    sets = [subset] if subset else ["mc160", "mc500"]
    bad = [s for s in sets if s not in ("mc160", "mc500")]
    if bad:
        raise ValueError(f"MCTest subset={bad[0]!r}: allowed values are 'mc160', 'mc500', "
                         "'' (both)")
    for name in sets:
        tsv = os.path.join(path, f"{name}.{split}.tsv")
        ans = os.path.join(path, f"{name}.{split}.ans")
        stories = read_lines(require(tsv))
        answers = read_lines(ans) if os.path.isfile(ans) else None
        for lineno, line in enumerate(stories, 1):
            if not line.strip():
                continue
            where = f"{os.path.basename(tsv)}:{lineno}"
            fields = line.split("\t")
            if len(fields) != 23:
                rep.skip("wrong number of fields", where)
                continue
            letters = None
            if answers is not None:
                letters = answers[lineno - 1].split("\t") if lineno <= len(answers) else []
                if len(letters) != 4 or any(x.strip() not in ("A", "B", "C", "D")
                                            for x in letters):
                    rep.skip("bad or missing answer line", where)
                    continue
            story = fields[2].replace("\\newline", "\n").replace("\\tab", "\t").strip()
            for q in range(4):
                question = fields[3 + 5 * q]
                # "one: " / "multiple: " mark how many sentences the answer needs; not text.
                for prefix in ("one:", "multiple:"):
                    if question.startswith(prefix):
                        question = question[len(prefix):]
                choices = tuple(c.strip() for c in fields[4 + 5 * q: 8 + 5 * q])
                label = "ABCD".index(letters[q].strip()) if letters is not None else None
                rep.read += 1
                yield Example(idx=f"{fields[0]}.q{q}", text_a=f"{story}\n{question.strip()}",
                              choices=choices, label=label)
