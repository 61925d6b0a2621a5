"""`local_text`: the user's own text files or glob patterns as a tfds dataset."""

from __future__ import annotations

import codecs
import dataclasses
import glob
import os
import re
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from gptjax.data.corpora.base import (
    TextBuilder,
    TextSource,
    digest,
    hash_bucket,
)


def _slug(text: str, max_len: int = 32) -> str:
    """Makes a string safe for a tfds config name (`[\\w+-.]`)."""
    return re.sub(r"[^\w\-]+", "_", text).strip("_")[:max_len] or "text"


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
    """Files and split options of a `local_text` dataset; build it with `local_text_config`.

    Attributes:
      files: absolute paths of the files, sorted.
      root: common directory of `files`; paths stored in the dataset are relative to it.
      validation_fraction: share of the text that goes to the validation split.
      split_by: 'chars' (the last fraction of every file's characters, nanoGPT's split) or
        'files' (whole files, chosen by a hash of their relative path).
      document_separator: if set, every file is cut into documents at this string.
      encoding: text encoding of the files.
    """

    files: tuple[str, ...] = ()
    root: str = ""
    validation_fraction: float = 0.1
    split_by: str = "chars"
    document_separator: str | None = None
    encoding: str = "utf-8"


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], kind: str = "text",
                 suffix: str = "*.txt") -> list[str]:
    """Expands files and glob patterns into sorted absolute file paths; a pattern matching no
    file, a directory (the error suggests `dir/**/<suffix>`) or a missing `kind` file is a
    one-line error."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("local_text needs at least one file or glob pattern in `paths`")
    files = set()
    for pattern in map(os.fspath, paths):
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise FileNotFoundError(f"no files match the glob pattern {pattern!r}")
            files.update(os.path.abspath(p) for p in matches)
        elif os.path.isdir(pattern):
            raise ValueError(
                f"{pattern!r} is a directory; pass files or a glob such as "
                f"{os.path.join(pattern, '**', suffix)!r}"
            )
        elif os.path.isfile(pattern):
            files.add(os.path.abspath(pattern))
        else:
            raise FileNotFoundError(f"{kind} file not found: {pattern!r}")
    return sorted(files)


def local_text_config(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    validation_fraction: float = 0.1,
    split_by: str = "auto",
    document_separator: str | None = None,
    encoding: str = "utf-8",
) -> LocalTextConfig:
    """Resolves files and globs into a `LocalTextConfig` whose name hashes the inputs.

    Args:
      paths: a file, a glob pattern (`**` recurses), or a sequence of them.
      validation_fraction: share held out for validation, in [0, 1); 0 gives only 'train'.
      split_by: 'auto' ('chars' for a single file, 'files' otherwise), 'chars' (every file's
        last `validation_fraction` of characters, so one file splits exactly like nanoGPT's
        `data[:int(n * 0.9)]`), or 'files' (whole files by a hash of their relative path;
        if no file hashes into validation, the lowest-hash file goes there).
      document_separator: if set, files are cut into documents at this string (e.g.
        '<|endoftext|>') and each non-blank document is one example; otherwise each file
        (or its train/validation part) is one example.
      encoding: text encoding of the files.

    Returns:
      The config; its name is `<first file stem>-<hash>` where the hash covers the absolute
      paths, sizes and modification times of the files and the options above.

    Raises:
      FileNotFoundError: a path does not exist or a glob matches no file.
      ValueError: bad option values, or every file is empty.
    """
    if split_by not in ("auto", "chars", "files"):
        raise ValueError(f"split_by={split_by!r}; allowed: 'auto', 'chars', 'files'")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction}; allowed: 0 <= fraction < 1")
    if document_separator == "":
        raise ValueError("document_separator='' is not allowed; use None for one example per file")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"encoding={encoding!r} is not a Python codec; allowed: a codec name "
                         "such as 'utf-8' or 'latin-1'") from None
    files = expand_paths(paths)
    stats = [os.stat(f) for f in files]
    if sum(s.st_size for s in stats) == 0:
        raise ValueError(f"empty corpus: every file is empty ({', '.join(files[:5])})")
    if split_by == "auto":
        split_by = "chars" if len(files) == 1 else "files"
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    rel_paths = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    if split_by == "files" and len(_split_files_by_hash(rel_paths, validation_fraction)) == len(
        files
    ):
        raise ValueError(
            f"split_by='files' puts all {len(files)} file(s) in validation; "
            "allowed: more files or split_by='chars'"
        )
    config_hash = digest(
        [(f, s.st_size, s.st_mtime_ns) for f, s in zip(files, stats)]
        + [validation_fraction, split_by, document_separator, encoding]
    )
    name = f"{_slug(os.path.splitext(os.path.basename(files[0]))[0])}-{config_hash[:16]}"
    return LocalTextConfig(
        name=name,
        description=f"{len(files)} file(s) under {root}, split by {split_by}",
        files=tuple(files),
        root=root,
        validation_fraction=validation_fraction,
        split_by=split_by,
        document_separator=document_separator,
        encoding=encoding,
    )


def _split_files_by_hash(rel_paths: Sequence[str], fraction: float) -> set[str]:
    """Returns the relative paths that go to validation: hash bucket below `fraction`."""
    if fraction == 0.0:
        return set()
    validation = {p for p in rel_paths if hash_bucket(p) < fraction}
    if not validation and len(rel_paths) > 1:
        # A few files rarely land in a 10% bucket; hold out the lowest-hash one instead of
        # producing an empty validation split.
        validation = {min(rel_paths, key=hash_bucket)}
    return validation



class LocalText(TextBuilder):
    """The user's own text files as a tfds dataset with 'train' and 'validation' splits."""

    DESCRIPTION = "Local text files; one example per file or per document."
    CONFIG_HINT = "local_text_config(paths)"

    def _splits(self, config: LocalTextConfig) -> dict[str, Iterator]:
        # POSIX separators, so the hash split is the same on every OS.
        rel = {f: os.path.relpath(f, config.root).replace(os.sep, "/") for f in config.files}
        splits = {"train": [], "validation": []}
        if config.split_by == "files":
            held_out = _split_files_by_hash(sorted(rel.values()), config.validation_fraction)
            for f in config.files:
                splits["validation" if rel[f] in held_out else "train"].append((f, rel[f], "all"))
        else:
            for f in config.files:
                splits["train"].append((f, rel[f], "head"))
                if config.validation_fraction > 0:
                    splits["validation"].append((f, rel[f], "tail"))
        if config.validation_fraction == 0:
            del splits["validation"]
        return {name: self._generate_examples(name, parts) for name, parts in splits.items()}

    def _read(self, path: str) -> str:
        config = self.builder_config
        try:
            with open(path, encoding=config.encoding) as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path!r} is not valid {config.encoding} ({e.reason} at byte {e.start}); "
                "pass encoding='latin-1' (or the file's encoding)"
            ) from None

    def _generate_examples(self, split, parts):
        config = self.builder_config
        count = 0
        for path, rel_path, part in parts:
            text = self._read(path)
            if part != "all":
                # nanoGPT's split: train = text[:int(n * 0.9)], validation = the rest.
                cut = int(len(text) * (1.0 - config.validation_fraction))
                text = text[:cut] if part == "head" else text[cut:]
            if config.document_separator is None:
                docs = [text] if text else []
            else:
                docs = [d for d in text.split(config.document_separator) if d.strip()]
            for i, doc in enumerate(docs):
                count += 1
                yield f"{rel_path}#{part}#{i}", {"text": doc, "path": rel_path}
        if not count:
            # tfds cannot write an empty split; fail with what is empty instead of its assertion.
            raise ValueError(
                f"empty corpus: the {split!r} split of "
                f"{', '.join(p[1] for p in parts[:3]) or 'no file'} under {config.root!r} has no "
                "text; allowed: longer files, or validation_fraction=0"
            )



def prepare_local_text(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    data_dir: str | None = None,
    **config_kwargs,
) -> TextSource:
    """Prepares local text files as a `local_text` tfds dataset and opens it.

    Args:
      paths: files or glob patterns (see `local_text_config`).
      data_dir: tfds data_dir to prepare into; defaults to `default_data_dir()`.
      **config_kwargs: `validation_fraction`, `split_by`, `document_separator`, `encoding`.

    Returns:
      The prepared dataset with splits 'train' and (unless validation_fraction=0) 'validation'.
    """
    return LocalText.prepare_from(local_text_config(paths, **config_kwargs), data_dir)
