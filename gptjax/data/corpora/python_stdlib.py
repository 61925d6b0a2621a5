"""`python_stdlib`: the default corpus, the Python standard library's own `.py` sources."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds

from gptjax.data.corpora.base import (
    TextBuilder,
    TextSource,
    digest,
    hash_bucket,
)

# Directories of the standard library that are not representative Python: test suites, the
# IDLE and 2to3 tools, generated tables (encodings, pydoc_data's 700 KB topics dump), bundled
# wheels, and anything installed by pip.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "encodings",
        "ensurepip",
        "turtledemo",
        "lib-dynload",
        "__pycache__",
    }
)
_STDLIB_EXCLUDED_PREFIXES = ("config-", "_sysconfigdata", "__phello__")


@dataclasses.dataclass
class PythonStdlibConfig(tfds.core.BuilderConfig):
    """Files of a `python_stdlib` dataset; build it with `python_stdlib_config`.

    Attributes:
      root: the standard library directory.
      train_files: relative paths (POSIX separators) of the train split, sorted.
      validation_files: relative paths of the validation split, sorted.
    """

    root: str = ""
    train_files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()


def _stdlib_sources(root: str) -> list[tuple[str, int, int]]:
    """Lists (relative path, size, mtime_ns) of the representative `.py` files under `root`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into site-packages' tens of thousands of files.
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith(_STDLIB_EXCLUDED_PREFIXES)
        )
        for name in filenames:
            if not name.endswith(".py") or name.startswith(_STDLIB_EXCLUDED_PREFIXES):
                continue
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            if st.st_size:
                found.append(
                    (os.path.relpath(path, root).replace(os.sep, "/"), st.st_size, st.st_mtime_ns)
                )
    return found


def python_stdlib_config(
    *,
    max_train_bytes: int = 4_000_000,
    validation_fraction: float = 0.1,
    root: str | None = None,
) -> PythonStdlibConfig:
    """Selects the standard-library files of the default corpus, deterministically.

    Each file goes to validation when the sha256 of its relative path falls in the lowest
    `validation_fraction` of the hash range, else to train. Files are then taken in hash order
    while they fit the split's budget: `max_train_bytes` for train and
    `max_train_bytes * fraction / (1 - fraction)` for validation, so both splits are uniform
    samples of the library and the same Python install always gives the same corpus.

    Args:
      max_train_bytes: budget of the train split in bytes (~4 MB keeps the default run fast).
      validation_fraction: share of files held out, in (0, 1).
      root: the standard library directory; defaults to `sysconfig.get_paths()['stdlib']`.

    Returns:
      The config; its name is `py<major><minor>-<train KB>k-<hash>` where the hash covers the
      selected paths, their sizes and modification times.

    Raises:
      ValueError: bad option values, or no `.py` file under `root`.
    """
    if max_train_bytes <= 0:
        raise ValueError(f"max_train_bytes={max_train_bytes}; allowed: a positive number of bytes")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction}; allowed: 0 < fraction < 1")
    root = os.path.abspath(root or sysconfig.get_paths()["stdlib"])
    sources = _stdlib_sources(root)
    if not sources:
        raise ValueError(f"empty corpus: no .py files under the stdlib root {root!r}")
    budget = {
        "train": max_train_bytes,
        "validation": int(max_train_bytes * validation_fraction / (1.0 - validation_fraction)),
    }
    chosen = {"train": [], "validation": []}
    for rel, size, mtime in sorted(
        sources, key=lambda s: hashlib.sha256(s[0].encode()).hexdigest()
    ):
        split = "validation" if hash_bucket(rel) < validation_fraction else "train"
        if size <= budget[split]:
            budget[split] -= size
            chosen[split].append((rel, size, mtime))
    if not chosen["train"] or not chosen["validation"]:
        raise ValueError(
            f"python_stdlib with max_train_bytes={max_train_bytes} selects no "
            f"{'train' if not chosen['train'] else 'validation'} file; "
            "allowed: a larger max_train_bytes"
        )
    python = sysconfig.get_python_version().replace(".", "")
    config_hash = digest(
        [root, validation_fraction] + sorted(chosen["train"]) + ["|"] + sorted(chosen["validation"])
    )
    return PythonStdlibConfig(
        name=f"py{python}-{max_train_bytes // 1000}k-{config_hash[:12]}",
        description=f"Python standard library sources under {root}",
        root=root,
        train_files=tuple(sorted(r for r, _, _ in chosen["train"])),
        validation_files=tuple(sorted(r for r, _, _ in chosen["validation"])),
    )


class PythonStdlib(TextBuilder):
    """The Python standard library's own `.py` files, one example per file."""

    DESCRIPTION = "Python standard library sources, split by a hash of the file path."
    FILES_FIELD = "train_files"
    CONFIG_HINT = "python_stdlib_config()"

    def _splits(self, config: PythonStdlibConfig) -> dict[str, Iterator]:
        return {
            "train": self._generate_examples(config.train_files),
            "validation": self._generate_examples(config.validation_files),
        }

    def _generate_examples(self, rel_paths):
        for rel in rel_paths:
            with open(os.path.join(self.builder_config.root, rel), "rb") as f:
                # PEP 3120: stdlib sources are UTF-8; 'replace' keeps a stray byte from failing
                # the build.
                yield rel, {"text": f.read().decode("utf-8", errors="replace"), "path": rel}



def prepare_python_stdlib(data_dir: str | None = None, **config_kwargs) -> TextSource:
    """Prepares the Python standard library corpus and opens it.

    Args:
      data_dir: tfds data_dir to prepare into; defaults to `default_data_dir()`.
      **config_kwargs: `max_train_bytes`, `validation_fraction`, `root`
        (see `python_stdlib_config`).

    Returns:
      The prepared dataset with splits 'train' and 'validation'.
    """
    return PythonStdlib.prepare_from(python_stdlib_config(**config_kwargs), data_dir)
