"""What every text corpus shares: cache dirs, the base of gptjax's tfds builders, `TextSource`,
and opening a dataset already prepared in a tfds data_dir.

Every source is read with `tfds` random access (`array_record`), no TensorFlow.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import difflib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# Names that `get_source` prepares itself; every other name must be prepared in a data_dir.
BUILTIN_DATASETS = ("python_stdlib", "local_text")

# Records per array_record read: batched reads are several times faster than one per record.
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


def hash_bucket(key: str) -> float:
    """Maps a string to [0, 1) with sha256: stable across processes, machines and Pythons."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def digest(parts: Sequence[object]) -> str:
    """The sha256 hex digest of `repr(tuple(parts))`: builder config names and fingerprints."""
    return hashlib.sha256(repr(tuple(parts)).encode()).hexdigest()


# tfds 4.9.10 locates a builder defined inside a package through `importlib_resources`, which
# it declares only for Python < 3.9, so `download_and_prepare` fails with ModuleNotFoundError.
# Giving the builders their code path directly skips that lookup; tfds only uses it to look for
# a checksums.tsv of download URLs, and these builders download nothing.
_CODE_PATH = epath.Path(__file__)


class _CustomConfigLogFilter(logging.Filter):
    """Drops tfds's 'Using custom data configuration' warning: our configs are always custom."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def quiet_custom_config():
    """Silences tfds's warning about custom builder configs inside the `with` block."""
    log_filter = _CustomConfigLogFilter()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(log_filter)
    try:
        yield
    finally:
        absl_logger.removeFilter(log_filter)


class TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The base of gptjax's builders: version 1.0.0, features {text, path}, documents in order.

    Subclasses set `DESCRIPTION` and implement `_split_generators`; their class names give the
    tfds names ('local_text', 'python_stdlib') under which prepared data is found again.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    code_path = _CODE_PATH
    DESCRIPTION = ""
    # The config field that lists the files, and how to build a config that has them.
    FILES_FIELD = "files"
    CONFIG_HINT = ""

    @classmethod
    def prepare_from(cls, config: tfds.core.BuilderConfig, data_dir: str | None) -> TextSource:
        """Prepares this builder's dataset for `config` (reusing it if present) and opens it.

        Args:
          config: the builder config, whose name hashes its inputs.
          data_dir: the tfds data_dir to prepare into; None for `default_data_dir()`.

        Returns:
          The prepared dataset.
        """
        with quiet_custom_config():
            builder = cls(data_dir=data_dir or default_data_dir(), config=config)
        return prepare(builder)

    # tfds announces "Downloading and preparing dataset Unknown size ..." and "downloaded and
    # prepared"; these builders download nothing, so one line says what is really done.
    def _log_download_bytes(self) -> None:
        print(f"preparing the {self.name} corpus (local files, nothing to download) in "
              f"{self.data_dir} ...", flush=True)

    def _log_download_done(self) -> None:
        print(f"prepared {self.name}; later runs reuse it", flush=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        if not getattr(config, self.FILES_FIELD, None):
            raise ValueError(
                f"{self.name} config {config.name!r} has no files; "
                f"build it with gptjax.data.{self.CONFIG_HINT}"
            )
        return self._splits(config)

    @abc.abstractmethod
    def _splits(self, config: tfds.core.BuilderConfig) -> dict[str, Iterator]:
        """{split name: generator of (key, example)} for a config that lists files."""

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants metadata files next to the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            # Keep documents in file order: the token stream then reads like the files.
            disable_shuffling=True,
        )


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


    def sample_texts(self, split: str, n: int) -> list[str]:
        """`n` documents of `split` evenly spaced in stored order (all when it has fewer), read
        by random access: a sample of a corpus too large to read whole (tokenizer training).

        Args:
          split: a split name from `splits`.
          n: documents wanted.

        Returns:
          The documents, decoded as UTF-8 (invalid bytes replaced).
        """
        ds = self._data_source(split)
        idx = sorted({int(i) for i in np.linspace(0, len(ds) - 1, min(n, len(ds)))})
        out = []
        for start in range(0, len(idx), _READ_CHUNK):
            for example in ds.__getitems__(idx[start:start + _READ_CHUNK]):
                value = example[self.text_key]
                out.append(value.decode("utf-8", "replace") if isinstance(value, bytes)
                           else str(value))
        return out


def _open_builder(name: str, data_dir: str):
    with quiet_custom_config():
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
        fingerprint=f"{info.full_name}|{digest(counts)[:16]}",
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
