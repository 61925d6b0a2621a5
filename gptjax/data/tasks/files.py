"""Parsing shared by the file readers: labels, lines, required files, GLUE-style TSV rows."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional, Union

import numpy as np

from gptjax.data.tasks.types import Example, Label, SplitReport, TaskSpec


def parse_label(spec: TaskSpec, value: str) -> Label:
    """A label string as the task's class index or float; raises ValueError if it is neither."""
    value = value.strip()
    if spec.regression:
        x = float(value)
        if not np.isfinite(x):
            raise ValueError(value)
        return x
    if value not in spec.file_labels:
        raise ValueError(value)
    return spec.file_labels.index(value)


def read_lines(path: str) -> list[str]:
    """The lines of a text file, without line ends; undecodable bytes become U+FFFD."""
    # utf-8-sig drops MRPC's byte-order mark; newline="" keeps "\r" inside lines so CRLF files
    # split like LF files after rstrip.
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        return [ln.rstrip("\r\n") for ln in fh.read().split("\n")]


def require(path: str) -> str:
    """`path`, or FileNotFoundError naming it if it is not a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file not found: {path}")
    return path


@dataclasses.dataclass(frozen=True)
class Columns:
    """Header names of a TSV task file (None = absent)."""

    text_a: str
    text_b: Optional[str] = None
    label: Optional[str] = None
    idx: Optional[str] = None


def read_tsv(spec: TaskSpec, path: str, cols: Columns, rep: SplitReport,
             header: bool = True, positions: Optional[dict] = None) -> Iterator[Example]:
    """Rows of a GLUE-style TSV as Examples; columns by header name or by fixed `positions`.

    A label column present in the header must parse on every row; test files simply lack it.
    """
    lines = read_lines(require(path))
    name = os.path.basename(path)
    start = 0
    if header:
        names = lines[0].split("\t") if lines else []
        missing = [c for c in (cols.text_a, cols.text_b) if c is not None and c not in names]
        if missing:
            raise ValueError(f"{path}: header has no column(s) {missing}; found {names}")
        pos = {k: names.index(getattr(cols, k))
               for k in ("text_a", "text_b", "label", "idx")
               if getattr(cols, k) is not None and getattr(cols, k) in names}
        n_fields = len(names)
        start = 1
    else:
        pos, n_fields = dict(positions), None
    for lineno, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{name}:{lineno}"
        if (n_fields is not None and len(fields) != n_fields) or len(fields) <= max(pos.values()):
            rep.skip("wrong number of fields", where)
            continue
        label = None
        if "label" in pos:
            try:
                label = parse_label(spec, fields[pos["label"]])
            except ValueError:
                rep.skip("bad label", where)
                continue
        text_a = fields[pos["text_a"]].strip()
        text_b = fields[pos["text_b"]].strip() if "text_b" in pos else None
        if not text_a or (cols.text_b is not None and not text_b):
            rep.skip("empty text", where)
            continue
        idx: Union[int, str] = rep.read
        if "idx" in pos:
            raw = fields[pos["idx"]].strip()
            idx = int(raw) if raw.isdigit() else raw
        rep.read += 1
        yield Example(idx=idx, text_a=text_a, text_b=text_b, label=label)
