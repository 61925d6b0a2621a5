"""Opening a text dataset by name: gptjax's own builders (prepared on demand) or any tfds one."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from gptjax.data.corpora.base import BUILTIN_DATASETS, TextSource, open_tfds
from gptjax.data.corpora.local_text import prepare_local_text
from gptjax.data.corpora.python_stdlib import prepare_python_stdlib


def get_source(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    *,
    text_key: str = "text",
    paths: str | Sequence[str] | None = None,
    **builder_kwargs,
) -> TextSource:
    """Opens a text dataset by name, preparing gptjax's own builders when needed.

    Args:
      dataset: 'python_stdlib', 'local_text' (with `paths`), or any tfds name prepared in
        `data_dir` ('tiny_shakespeare', 'lm1b', 'c4/en', also 'local_text/<config>').
      data_dir: tfds data_dir; required for tfds datasets, optional (default cache) for
        gptjax's builders.
      text_key: the text feature to read.
      paths: files or glob patterns, for 'local_text'.
      **builder_kwargs: options of `local_text_config` or `python_stdlib_config`.

    Returns:
      The dataset.

    Raises:
      FileNotFoundError, ValueError: see `open_tfds`, `local_text_config`, `python_stdlib_config`.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    if dataset == "python_stdlib":
        return prepare_python_stdlib(data_dir, **builder_kwargs)
    if dataset == "local_text":
        if paths is None:
            raise ValueError("dataset 'local_text' needs `paths`: text files or glob patterns")
        return prepare_local_text(paths, data_dir, **builder_kwargs)
    if paths is not None or builder_kwargs:
        raise ValueError(
            f"options {sorted(builder_kwargs) + (['paths'] if paths is not None else [])} "
            "apply only to "
            f"{', '.join(BUILTIN_DATASETS)}, not to {dataset!r}"
        )
    if data_dir is None:
        raise ValueError(
            f"dataset {dataset!r} needs data_dir, a tfds data_dir where it is prepared "
            f"(gptjax prepares only {', '.join(BUILTIN_DATASETS)} itself)"
        )
    return open_tfds(dataset, data_dir, text_key)


def load_texts(
    name: str, split: str, data_dir: str | os.PathLike | None = None, text_key: str = "text"
) -> Iterator[str]:
    """Yields the documents of a split of a tfds text dataset as strings.

    Args:
      name: a tfds name prepared in `data_dir`, or 'python_stdlib' (prepared on demand).
      split: split name, e.g. 'train' or 'validation'.
      data_dir: tfds data_dir (see `get_source`).
      text_key: the text feature.

    Returns:
      An iterator of UTF-8 decoded documents.
    """
    return get_source(name, data_dir, text_key=text_key).texts(split)
