"""Text corpora through tensorflow-datasets: prepared tfds datasets and gptjax's own builders.

Three kinds of source, all read with `tfds` random access (`array_record`), no TensorFlow:

* any tfds dataset already prepared in a `data_dir` (`tiny_shakespeare`, `lm1b`, `c4`, ...),
* `local_text`: the user's own text files or glob patterns,
* `python_stdlib`: the default corpus, the Python standard library's own `.py` sources.

The two gptjax builders (one module each, on the shared `base.TextBuilder`) prepare into a cache
data_dir (default `~/.cache/gptjax/tfds`). Their BuilderConfig name ends in a hash of the inputs
(paths, sizes, mtimes and split options), so a changed file or option prepares a new dataset
instead of reusing a stale one. `sources.get_source` opens any of the three by name.

Example:
  source = get_source("python_stdlib")          # prepares once, then reuses
  for text in source.texts("validation"): ...
  source = get_source("tiny_shakespeare", data_dir="../shared/tfds")
"""

from gptjax.data.corpora.base import (
    BUILTIN_DATASETS,
    TextBuilder,
    TextSource,
    default_cache_dir,
    default_data_dir,
    open_tfds,
    prepare,
)
from gptjax.data.corpora.local_text import (
    LocalText,
    LocalTextConfig,
    local_text_config,
    prepare_local_text,
)
from gptjax.data.corpora.python_stdlib import (
    PythonStdlib,
    PythonStdlibConfig,
    prepare_python_stdlib,
    python_stdlib_config,
)
from gptjax.data.corpora.sources import get_source, load_texts

