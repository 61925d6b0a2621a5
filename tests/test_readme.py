"""The README's library example runs as written (its public API), on a small local GPT-2 directory.

Only the model directory is substituted: "path/to/local/gpt2" becomes a transformers GPT-2 with
GPT-2's real vocabulary and BPE files (from the shared data folder) and a small body.
"""

import re
import shutil

import pytest
import transformers

from conftest import REPO

pytestmark = pytest.mark.slow


def _first_python_block(readme: str) -> str:
    section = readme.split("## Using the library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_example_runs(tmp_path, shared_data):
    hf = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf)
    shutil.copy(shared_data / "gpt2_bpe" / "encoder.json", hf / "vocab.json")
    shutil.copy(shared_data / "gpt2_bpe" / "vocab.bpe", hf / "merges.txt")

    code = _first_python_block((REPO / "README.md").read_text())
    assert code.count("path/to/local/gpt2") == 2, "the example changed: update this test"
    code = code.replace("path/to/local/gpt2", str(hf)).replace('"out/"', repr(str(tmp_path / "out")))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example

    assert scope["logits"].shape == (2, 1024, 50257)
    assert float(scope["loss"]) > 0
    assert (tmp_path / "out" / "config.json").exists()
    out, tok = scope["out"], scope["tok"]
    assert tok.encode("Hello") == [15496]
    assert 1 <= int(out.lengths[0]) <= 20
