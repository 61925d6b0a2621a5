"""Text corpora through tensorflow-datasets: prepared tfds datasets and gptjax's own builders.

Three kinds of source, all read with `tfds` random access (`array_record`), no TensorFlow:

* any tfds dataset already prepared in a `data_dir` (`tiny_shakespeare`, `lm1b`, `c4`, ...),
* `local_text`: the user's own text files or glob patterns,
* `python_stdlib`: the default corpus, the Python standard library's own `.py` sources.

The two gptjax builders prepare into a cache data_dir (default `~/.cache/gptjax/tfds`). Their
BuilderConfig name ends in a hash of the inputs (paths, sizes, mtimes and split options), so a
changed file or option prepares a new dataset instead of reusing a stale one.

Example:
  source = get_source("python_stdlib")          # prepares once, then reuses
  for text in source.texts("validation"): ...
  source = get_source("tiny_shakespeare", data_dir="../shared/tfds")
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import difflib
import glob
import hashlib
import logging
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

# Names that `get_source` prepares itself; every other name must be prepared in a data_dir.
BUILTIN_DATASETS = ("python_stdlib", "local_text")

# Read this many records per array_record call: one call per record was 4x slower on glue/sst2.
_READ_CHUNK = 256


def default_cache_dir() -> str:
    """Returns gptjax's cache root: $GPTJAX_CACHE_DIR, $XDG_CACHE_HOME/gptjax or ~/.cache/gptjax."""
    if os.environ.get("GPTJAX_CACHE_DIR"):
        return os.path.expanduser(os.environ["GPTJAX_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "gptjax")


def default_data_dir() -> str:
    """Returns the tfds data_dir where gptjax's own builders prepare their data."""
    return os.path.join(default_cache_dir(), "tfds")


def _hash_bucket(key: str) -> float:
    """Maps a string to [0, 1) with sha256: stable across processes, machines and Pythons."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def _digest(parts: Sequence[object]) -> str:
    return hashlib.sha256(repr(tuple(parts)).encode()).hexdigest()


def _slug(text: str, max_len: int = 32) -> str:
    """Makes a string safe for a tfds config name (`[\\w+-.]`)."""
    return re.sub(r"[^\w\-]+", "_", text).strip("_")[:max_len] or "text"


# tfds 4.9.10 locates a builder defined inside a package through `importlib_resources`, which
# it declares only for Python < 3.9, so `download_and_prepare` fails with ModuleNotFoundError.
# Giving the builders their code path directly skips that lookup; tfds only uses it to look for
# a checksums.tsv of download URLs, and these builders download nothing.
_CODE_PATH = epath.Path(__file__)


def _text_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()})


class _CustomConfigLogFilter(logging.Filter):
    """Drops tfds's 'Using custom data configuration' warning: our configs are always custom."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config():
    log_filter = _CustomConfigLogFilter()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(log_filter)
    try:
        yield
    finally:
        absl_logger.removeFilter(log_filter)


# ----------------------------------------------------------------------------------------------
# local_text: the user's own files.
# ----------------------------------------------------------------------------------------------


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


def _expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands files and glob patterns into sorted absolute file paths."""
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
                f"{os.path.join(pattern, '**', '*.txt')!r}"
            )
        elif os.path.isfile(pattern):
            files.add(os.path.abspath(pattern))
        else:
            raise FileNotFoundError(f"text file not found: {pattern!r}")
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
    files = _expand_paths(paths)
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
    digest = _digest(
        [(f, s.st_size, s.st_mtime_ns) for f, s in zip(files, stats)]
        + [validation_fraction, split_by, document_separator, encoding]
    )
    name = f"{_slug(os.path.splitext(os.path.basename(files[0]))[0])}-{digest[:16]}"
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
    validation = {p for p in rel_paths if _hash_bucket(p) < fraction}
    if not validation and len(rel_paths) > 1:
        # A few files rarely land in a 10% bucket; hold out the lowest-hash one instead of
        # producing an empty validation split.
        validation = {min(rel_paths, key=_hash_bucket)}
    return validation


class LocalText(tfds.core.GeneratorBasedBuilder):
    """The user's own text files as a tfds dataset with 'train' and 'validation' splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    code_path = _CODE_PATH

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants metadata files next to the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files; one example per file or per document.",
            features=_text_features(),
            # Keep documents in file order: the token stream then reads like the files.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        if not getattr(config, "files", None):
            raise ValueError(
                f"local_text config {config.name!r} has no files; "
                "build it with gptjax.data.local_text_config(paths)"
            )
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


# ----------------------------------------------------------------------------------------------
# python_stdlib: the default corpus.
# ----------------------------------------------------------------------------------------------

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
        split = "validation" if _hash_bucket(rel) < validation_fraction else "train"
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
    digest = _digest(
        [root, validation_fraction] + sorted(chosen["train"]) + ["|"] + sorted(chosen["validation"])
    )
    return PythonStdlibConfig(
        name=f"py{python}-{max_train_bytes // 1000}k-{digest[:12]}",
        description=f"Python standard library sources under {root}",
        root=root,
        train_files=tuple(sorted(r for r, _, _ in chosen["train"])),
        validation_files=tuple(sorted(r for r, _, _ in chosen["validation"])),
    )


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """The Python standard library's own `.py` files, one example per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    code_path = _CODE_PATH

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Python standard library sources, split by a hash of the file path.",
            features=_text_features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        if not getattr(config, "train_files", None):
            raise ValueError(
                f"python_stdlib config {config.name!r} has no files; "
                "build it with gptjax.data.python_stdlib_config()"
            )
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


# ----------------------------------------------------------------------------------------------
# Reading: one TextSource type for every kind of dataset.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextSource:
    """A prepared tfds dataset with a text feature, read by random access.

    Attributes:
      name: tfds name with config and version, e.g. 'tiny_shakespeare:1.0.0' or
        'local_text/input-3f2a...:1.0.0'.
      data_dir: the tfds data_dir holding it.
      splits: names of the prepared splits.
      fingerprint: identifies the content: tfds full name plus every split's example count
        and size; gptjax's builders also hash their inputs into the config name.
      text_key: the feature read by `texts`.
    """

    name: str
    data_dir: str
    splits: tuple[str, ...]
    fingerprint: str
    text_key: str = "text"

    def _data_source(self, split: str):
        if split not in self.splits:
            raise ValueError(
                f"split {split!r} is not in {self.name}; allowed: {', '.join(self.splits)}"
            )
        return _open_builder(self.name, self.data_dir).as_data_source(split=split)

    def num_examples(self, split: str) -> int:
        """Returns the number of examples (documents) in `split`."""
        return len(self._data_source(split))

    def texts(self, split: str) -> Iterator[str]:
        """Yields the documents of `split` in stored order, decoded as UTF-8.

        Args:
          split: a split name from `splits`.

        Yields:
          One string per example.
        """
        ds = self._data_source(split)
        for start in range(0, len(ds), _READ_CHUNK):
            for example in ds.__getitems__(list(range(start, min(start + _READ_CHUNK, len(ds))))):
                value = example[self.text_key]
                yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _open_builder(name: str, data_dir: str):
    with _quiet_custom_config():
        return tfds.builder(name, data_dir=data_dir)


def _source_from_builder(builder, data_dir: str, text_key: str) -> TextSource:
    info = builder.info
    formats = {str(f.value) for f in info.available_file_formats()} or {str(info.file_format.value)}
    if "array_record" not in formats:
        raise ValueError(
            f"{info.full_name} in {data_dir!r} is stored as {', '.join(sorted(formats))}; "
            "reading without TensorFlow needs array_record "
            "(convert with `tfds convert_format --out_file_format=array_record`)"
        )
    features = info.features.keys() if hasattr(info.features, "keys") else ()
    if text_key not in features:
        raise ValueError(
            f"{info.full_name} has no feature {text_key!r}; allowed text_key: {', '.join(features)}"
        )
    splits = tuple(sorted(info.splits.keys()))
    counts = [(s, info.splits[s].num_examples, int(info.splits[s].num_bytes)) for s in splits]
    # 'name/config:version' is what `tfds.builder` parses; with a version it reads the prepared
    # files directly, so a custom config needs no code to be reopened.
    name = (
        f"{info.name}/{info.config_name}:{info.version}"
        if info.config_name
        else f"{info.name}:{info.version}"
    )
    return TextSource(
        name=name,
        data_dir=os.path.abspath(data_dir),
        splits=splits,
        fingerprint=f"{info.full_name}|{_digest(counts)[:16]}",
        text_key=text_key,
    )


def prepare(builder: tfds.core.GeneratorBasedBuilder, text_key: str = "text") -> TextSource:
    """Prepares one of gptjax's builders in `array_record` (reusing it if present) and opens it.

    Args:
      builder: a `LocalText` or `PythonStdlib` instance with its data_dir and config.
      text_key: the feature to read.

    Returns:
      The prepared dataset.
    """
    # array_record is the format `tfds.data_source` reads without TensorFlow.
    builder.download_and_prepare(file_format="array_record")
    return _source_from_builder(builder, os.fspath(builder.data_dir_root), text_key)


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
    config = local_text_config(paths, **config_kwargs)
    with _quiet_custom_config():
        builder = LocalText(data_dir=data_dir or default_data_dir(), config=config)
    return prepare(builder)


def prepare_python_stdlib(data_dir: str | None = None, **config_kwargs) -> TextSource:
    """Prepares the Python standard library corpus and opens it.

    Args:
      data_dir: tfds data_dir to prepare into; defaults to `default_data_dir()`.
      **config_kwargs: `max_train_bytes`, `validation_fraction`, `root`
        (see `python_stdlib_config`).

    Returns:
      The prepared dataset with splits 'train' and 'validation'.
    """
    config = python_stdlib_config(**config_kwargs)
    with _quiet_custom_config():
        builder = PythonStdlib(data_dir=data_dir or default_data_dir(), config=config)
    return prepare(builder)


def _prepared_variants(data_dir: str, base: str) -> list[str]:
    """Lists 'config:version' (or 'version') of `base` prepared in `data_dir`."""
    root = os.path.join(data_dir, base)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "dataset_info.json" in filenames:
            found.append(":".join(os.path.relpath(dirpath, root).split(os.sep)))
            dirnames.clear()
    return sorted(found)


def open_tfds(name: str, data_dir: str | os.PathLike, text_key: str = "text") -> TextSource:
    """Opens a tfds dataset already prepared in `data_dir` (array_record), without preparing it.

    Args:
      name: a tfds name, optionally with config and version ('lm1b', 'c4/en:3.1.0').
      data_dir: the tfds data_dir holding the prepared dataset.
      text_key: the text feature to read.

    Returns:
      The dataset.

    Raises:
      FileNotFoundError: `data_dir` does not exist or does not hold the dataset.
      ValueError: unknown name, no array_record files, or no `text_key` feature.
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"tfds data_dir {data_dir!r} does not exist; pass a directory with prepared datasets"
        )
    present = sorted(
        d
        for d in os.listdir(data_dir)
        if os.path.isdir(os.path.join(data_dir, d)) and d != "downloads"
    )
    try:
        builder = _open_builder(name, data_dir)
    except (tfds.core.DatasetNotFoundError, AssertionError, ValueError):
        # tfds reports a bad name, config or version with multi-line messages (the whole catalog);
        # say in one line what is wrong and what exists.
        base = name.split("/")[0].split(":")[0]
        registered = tfds.list_builders(with_community_datasets=False)
        if base in registered or base in present:
            configs = sorted(tfds.builder_cls(base).builder_configs) if base in registered else []
            raise ValueError(
                f"dataset {name!r}: this config or version of {base!r} is unknown or not "
                f"prepared in {data_dir!r}"
                + f" (prepared there: {', '.join(_prepared_variants(data_dir, base)) or 'none'}"
                + (f"; configs: {', '.join(configs)})" if configs else ")")
            ) from None
        hint = sorted(set(difflib.get_close_matches(base, registered + present, n=3)))
        raise ValueError(
            f"unknown dataset {name!r}: not a registered tfds dataset nor prepared in {data_dir!r}"
            + (f"; did you mean {', '.join(hint)}?" if hint else "")
            + f" (gptjax builds {', '.join(BUILTIN_DATASETS)}; "
            f"prepared there: {', '.join(present) or 'nothing'})"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {builder.info.full_name!r} is not prepared in {data_dir!r} "
            f"(prepared there: {', '.join(present) or 'nothing'}); "
            "prepare it with tfds (needs TensorFlow) "
            "in array_record format, or pass the data_dir that holds it"
        )
    return _source_from_builder(builder, data_dir, text_key)


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
