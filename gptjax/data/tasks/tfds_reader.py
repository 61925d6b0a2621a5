"""Task examples from a prepared tfds data_dir (GLUE, SNLI) instead of the task's own files."""

from __future__ import annotations

from typing import Iterator

import tensorflow_datasets as tfds

from gptjax.data.corpora import open_tfds
from gptjax.data.tasks.types import Example, SplitReport, TaskSpec


def read_tfds(spec: TaskSpec, data_dir: str, split: str, rep: SplitReport) -> Iterator[Example]:
    """The examples of `split` of `spec.tfds_name` prepared in `data_dir`.

    Args:
      spec: the task; its `tfds_name`, `tfds_fields` and `tfds_splits` say what to read.
      data_dir: the tfds data_dir.
      split: a canonical split name of the task.
      rep: counts the rows read and skipped.

    Yields:
      Examples; rows without a gold label are skipped outside test splits.
    """
    # open_tfds gives one-line errors for a missing data_dir, name or preparation.
    source = open_tfds(spec.tfds_name, data_dir, text_key=spec.tfds_fields[0])
    tfds_split = dict(spec.tfds_splits)[split]
    if tfds_split not in source.splits:
        raise ValueError(f"{spec.tfds_name} in {data_dir!r} has no split {tfds_split!r}; "
                         f"prepared: {list(source.splits)}")
    ds = tfds.data_source(source.name, data_dir=data_dir)[tfds_split]
    chunk = 512  # batched reads: one array_record call per record is several times slower
    for start in range(0, len(ds), chunk):
        for i, row in enumerate(ds.__getitems__(list(range(start, min(start + chunk,
                                                                      len(ds))))), start):
            texts = [(row[f].decode("utf-8") if isinstance(row[f], bytes) else str(row[f])).strip()
                     for f in spec.tfds_fields]
            raw = row["label"]
            # tfds writes -1 where a split has no labels (GLUE test) or no gold label (SNLI).
            if spec.regression:
                label = None if split.startswith("test") else float(raw)
            else:
                label = None if int(raw) < 0 else int(raw)
                if label is None and not split.startswith("test"):
                    rep.skip("no gold label", f"{spec.tfds_name}[{tfds_split}][{i}]")
                    continue
            rep.read += 1
            yield Example(idx=int(row.get("idx", i)), text_a=texts[0],
                          text_b=texts[1] if len(texts) > 1 else None, label=label)
