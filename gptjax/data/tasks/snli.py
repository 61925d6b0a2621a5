"""Entailment pairs outside GLUE: SNLI 1.0 (TSV or JSONL) and SciTail 1.1 (TSV)."""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

from gptjax.data.tasks.files import Columns, parse_label, read_lines, read_tsv, require
from gptjax.data.tasks.types import Example, SplitReport, TaskSpec


def read_snli(spec: TaskSpec, path: str, split: str, rep: SplitReport) -> Iterator[Example]:
    """Reads one split of the task's files in `path`; counts rows read and skipped in `rep`."""
    base = os.path.join(path, f"snli_1.0_{split}")
    if os.path.isfile(base + ".jsonl"):
        name = os.path.basename(base) + ".jsonl"
        for lineno, line in enumerate(read_lines(base + ".jsonl"), 1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                row = json.loads(line)
                gold, a, b = row["gold_label"], row["sentence1"], row["sentence2"]
            except (json.JSONDecodeError, KeyError, TypeError):
                rep.skip("malformed JSON", where)
                continue
            ex = _snli_example(spec, rep, where, gold, a, b)
            if ex is not None:
                yield ex
        return
    cols = Columns("sentence1", "sentence2", "gold_label", "pairID")
    lines = read_lines(require(base + ".txt"))
    names = lines[0].split("\t") if lines else []
    if any(c not in names for c in ("gold_label", "sentence1", "sentence2")):
        raise ValueError(f"{base}.txt: header lacks gold_label/sentence1/sentence2; found {names}")
    ia, ib, il = names.index(cols.text_a), names.index(cols.text_b), names.index("gold_label")
    name = os.path.basename(base) + ".txt"
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{name}:{lineno}"
        if len(fields) != len(names):
            rep.skip("wrong number of fields", where)
            continue
        ex = _snli_example(spec, rep, where, fields[il], fields[ia], fields[ib])
        if ex is not None:
            yield ex


def _snli_example(spec, rep, where, gold, a, b) -> Optional[Example]:
    if gold == "-":
        # No annotator majority; SNLI's own instructions drop these pairs.
        rep.skip("no gold label", where)
        return None
    try:
        label = parse_label(spec, str(gold))
    except ValueError:
        rep.skip("bad label", where)
        return None
    if not str(a).strip() or not str(b).strip():
        rep.skip("empty text", where)
        return None
    ex = Example(idx=rep.read, text_a=str(a).strip(), text_b=str(b).strip(), label=label)
    rep.read += 1
    return ex


def read_scitail(spec: TaskSpec, path: str, split: str, rep: SplitReport) -> Iterator[Example]:
    """Reads one split of the task's files in `path`; counts rows read and skipped in `rep`."""
    name = f"scitail_1.0_{split}.tsv"
    candidates = [os.path.join(path, name), os.path.join(path, "tsv_format", name)]
    file = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    return read_tsv(spec, file, Columns("premise", "hypothesis"), rep, header=False,
                     positions={"text_a": 0, "text_b": 1, "label": 2})
