"""Tests for gptjax.data.tokenizers: GPT-2 BPE parity with transformers, exact round trips, save/load."""

from __future__ import annotations

import json
import pathlib
import random
import shutil
import sysconfig

import numpy as np
import pytest

from conftest import shared_data_dir
from gptjax.config import ConfigError
from gptjax.data import tokenizers as tk
from gptjax.data.tokenizers import sentencepiece as spm_module

SHARED = shared_data_dir()
KINDS = ("char", "sentencepiece", "gpt2_bpe")


def shared_path(*parts: str) -> pathlib.Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not found; set GPTJAX_SHARED_DATA to the data folder")
    return path


# ------------------------------------------------------------------------------------------------
# Deterministic varied text.
# ------------------------------------------------------------------------------------------------

FRAGMENTS = [
    # words, case, contractions (GPT-2's regex splits 's 't 're 've 'm 'll 'd, lower case only)
    "Hello", "world", "HELLO", "it's", "we're", "they've", "I'm", "you'll", "she'd", "don't",
    "IT'S", "rock'n'roll", "'s", "o'clock",
    # accents, other scripts, right-to-left, combining marks
    "café", "naïve", "Ångström", "Straße", "e\u0301", "日本語のテキスト", "中文", "한국어",
    "Привет", "Ελληνικά", "שלום", "مرحبا بالعالم", "हिन्दी", "ไทย",
    # emoji, with skin tones, ZWJ sequences, flags, variation selectors
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "❤️", "🧑🏾‍💻",
    # digits and numbers
    "0", "42", "3.14159", "1,000,000", "2024-01-31", "0x1F600", "١٢٣",
    # punctuation and symbols
    "!", "?!", "...", "—", "«»", "“quoted”", "(a)", "{}", "[]", "==", "->", "&&", "#", "@user",
    "$5", "100%", "\\", "~/.bashrc",
    # code
    "def f(x):\n    return x ** 2\n", "if (a && b) { c++; }", "\tindented\twith\ttabs",
    "class A:\n\n    pass\n", "x = [i for i in range(10)]  # comment", "print('hi')",
    "    \n", "<html><body>", 'json = {"key": [1, 2]}',
    # unusual whitespace
    "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\r",
]
SEPARATORS = ["", " ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\n    ", "\r\n", "\n\t"]
EDGE_CASES = ["", " ", "  ", "\n", "\n\n\n", "\t", " leading", "trailing ", "  both  ",
              "a  b", "a\n\nb", "x\r\ny", "end\n"]


def varied_strings(n: int, seed: int = 0) -> list[str]:
    """`n` strings: the edge cases, fragment mixes, and random code points from many blocks."""
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x52F), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0x1F300, 0x1FAFF), (0x10000, 0x1007F)]
    out = list(EDGE_CASES)
    while len(out) < n:
        if rng.random() < 0.2:
            chars = []
            for _ in range(rng.randint(1, 20)):
                lo, hi = rng.choice(blocks)
                chars.append(chr(rng.randint(lo, hi)))
            out.append("".join(chars).replace("\u2581", "_"))
        else:
            parts = [rng.choice(FRAGMENTS) + rng.choice(SEPARATORS)
                     for _ in range(rng.randint(1, 8))]
            out.append("".join(parts))
    return out


# ------------------------------------------------------------------------------------------------
# GPT-2 byte BPE.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir() -> pathlib.Path:
    path = shared_path("gpt2_bpe")
    shared_path("gpt2_bpe", "encoder.json")
    return path


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> tk.GPT2BPETokenizer:
    return tk.GPT2BPETokenizer.from_files(gpt2_dir)


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello world") == [18435, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    assert gpt2.special_ids == {"eos": 50256}
    assert gpt2.decode([15496, 995]) == "Hello world"


def test_gpt2_pattern_is_tiktokens(gpt2):
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    assert tk.GPT2_PATTERN == openai_public.r50k_pat_str


def test_gpt2_matches_transformers_and_round_trips(gpt2, gpt2_dir):
    transformers = pytest.importorskip("transformers")
    vocab = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    # transformers 5 builds GPT2Tokenizer from in-memory vocab and merges; passing
    # vocab_file=/merges_file= instead silently yields an empty tokenizer.
    hf = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    assert hf.encode("Hello world") == [15496, 995]
    strings = varied_strings(400)
    mismatches = [s for s in strings if gpt2.encode(s) != hf.encode(s)]
    assert not mismatches, f"{len(mismatches)} differ from transformers, e.g. {mismatches[:3]!r}"
    assert [gpt2.decode(gpt2.encode(s)) for s in strings] == strings
    # The mixes exercise the regex, not just single bytes.
    assert sum(len(gpt2.encode(s)) for s in strings) > 4000


def test_gpt2_endoftext_is_text_unless_allowed(gpt2, gpt2_dir):
    text = "a<|endoftext|>b"
    ids = gpt2.encode(text)
    assert 50256 not in ids and gpt2.decode(ids) == text
    allowed = tk.GPT2BPETokenizer.from_files(gpt2_dir, allow_special=True)
    assert allowed.encode(text) == [64, 50256, 65]
    assert allowed.decode([64, 50256, 65]) == text


def test_gpt2_hf_file_names_and_pair(gpt2, gpt2_dir, tmp_path):
    # Hugging Face's vocab.json + merges.txt are the same files under other names.
    (tmp_path / "vocab.json").symlink_to(gpt2_dir / "encoder.json")
    (tmp_path / "merges.txt").symlink_to(gpt2_dir / "vocab.bpe")
    text = "Hugging Face's names, same ids: 日本 👍🏽"
    assert tk.GPT2BPETokenizer.from_files(tmp_path).encode(text) == gpt2.encode(text)
    pair = (gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    assert tk.GPT2BPETokenizer.from_files(pair).encode(text) == gpt2.encode(text)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither"):
        tk.GPT2BPETokenizer.from_files(tmp_path / "empty")


def test_gpt2_rejects_merges_that_do_not_match_vocabulary(gpt2_dir, tmp_path):
    lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    # Swapping two merges changes the ranks, which tiktoken would silently misuse.
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="merge order"):
        tk.GPT2BPETokenizer(gpt2_dir / "encoder.json", tmp_path / "vocab.bpe")


def test_decode_accepts_arrays_and_rejects_bad_ids(gpt2):
    ids = gpt2.encode("Hello world")
    assert gpt2.decode(np.array(ids, dtype=np.int32)) == "Hello world"
    assert gpt2.decode(np.array([], dtype=np.int32)) == ""
    assert gpt2.decode(()) == ""
    # A sample cut inside a multi-byte character decodes with a replacement character.
    assert gpt2.decode(gpt2.encode("😀")[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="50257"):
        gpt2.decode([50257])
    with pytest.raises(ValueError, match="-1"):
        gpt2.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        gpt2.decode(np.zeros((2, 2), dtype=np.int32))


# ------------------------------------------------------------------------------------------------
# Characters.
# ------------------------------------------------------------------------------------------------


def test_char_tiny_shakespeare():
    text = shared_path("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    tok = tk.CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert tok.chars[:2] == ["\n", " "] and tok.special_ids == {} and tok.eos_id is None
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids) == 0 and max(ids) == 64
    assert tok.decode(np.array(ids)) == text
    # The ids nanoGPT's shakespeare_char/prepare.py gives the opening "First Citizen".
    assert ids[:13] == [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52]


def test_char_unknown_characters():
    tok = tk.CharTokenizer.from_text("abc ")
    with pytest.raises(ValueError, match=r"'é' \(index 2\)") as info:
        tok.encode("a é 😀")
    assert "\n" not in str(info.value)
    skip = tk.CharTokenizer.from_text("abc ", unknown="skip")
    assert skip.decode(skip.encode("a é 😀 b")) == "a   b"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([4])
    with pytest.raises(ValueError, match="'ignore'"):
        tk.CharTokenizer.from_text("abc", unknown="ignore")


# ------------------------------------------------------------------------------------------------
# SentencePiece.
# ------------------------------------------------------------------------------------------------

SPM_SYMBOLS = ("<|endoftext|>", "<|fim|>")


def stdlib_corpus() -> list[pathlib.Path]:
    """About 400 KB of Python source: the json and email packages, in sorted order."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("json/*.py")) + sorted(stdlib.glob("email/*.py"))
    if sum(f.stat().st_size for f in files) < 100_000:
        pytest.skip(f"Python sources not found under {stdlib}")
    return files


def train_spm(directory: pathlib.Path) -> tk.SentencePieceTokenizer:
    return tk.SentencePieceTokenizer.train(stdlib_corpus(), directory, vocab_size=512,
                                           user_defined_symbols=SPM_SYMBOLS)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("spm")
    train_spm(directory)
    return directory


@pytest.fixture(scope="module")
def spm_tok(spm_dir) -> tk.SentencePieceTokenizer:
    return tk.load_tokenizer(spm_dir)


def test_sentencepiece_round_trips_code_and_unicode(spm_tok):
    assert isinstance(spm_tok, tk.SentencePieceTokenizer) and spm_tok.vocab_size == 512
    code = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    samples = varied_strings(300, seed=1) + [
        code[:5000],
        "def f():\n\tif x:\n\n\t\treturn '日本語'  \n    \n\n",
        "    indented\n        deeper\n\n\n  trailing  \n",
        "emoji 👨‍👩‍👧‍👦 🏳️‍🌈 and CJK 中文 via byte fallback",
    ]
    failures = [s for s in samples if spm_tok.decode(spm_tok.encode(s)) != s]
    assert not failures, f"{len(failures)} strings do not round-trip, e.g. {failures[:3]!r}"
    # Characters absent from the training code come back through byte pieces, not <unk>.
    ids = spm_tok.encode("中文")
    assert len(ids) == 6 and all(spm_tok.processor.is_byte(i) for i in ids)
    assert spm_tok.special_ids["unk"] not in spm_tok.encode(" ".join(samples))


def test_sentencepiece_learns_newlines_and_indentation(spm_tok):
    pieces = [spm_tok.processor.id_to_piece(i) for i in range(spm_tok.vocab_size)]
    # Trained on whole documents, newlines take part in merges; trained line by line (or from
    # files) they would only ever be the byte piece <0x0A>.
    assert "\n" in pieces and any(len(p) > 1 and "\n" in p for p in pieces)
    assert "▁▁▁▁" in pieces and "▁▁▁▁▁▁▁▁" in pieces
    code = "def f(x):\n        return x\n"
    assert len(spm_tok.encode(code)) < len(code) // 2


def test_sentencepiece_special_and_user_defined_ids(spm_tok):
    special = spm_tok.special_ids
    assert {k: special[k] for k in ("unk", "bos", "eos", "pad")} == {
        "unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert spm_tok.eos_id == 2
    eot, fim = special["<|endoftext|>"], special["<|fim|>"]
    assert len({0, 1, 2, 3, eot, fim}) == 6
    ids = spm_tok.encode("a<|endoftext|>b <|fim|>")
    assert ids.count(eot) == 1 and ids.count(fim) == 1
    assert spm_tok.encode("<|endoftext|>") == [eot]
    # Control symbols are not parsed from text: "</s>" in a document stays text.
    assert 2 not in spm_tok.encode("</s>")


def test_sentencepiece_training_is_deterministic(spm_dir, tmp_path):
    again = train_spm(tmp_path)
    assert (tmp_path / "spm.model").read_bytes() == (spm_dir / "spm.model").read_bytes()
    text = "for key, value in sorted(items):\n    yield key\n"
    assert again.encode(text) == tk.load_tokenizer(spm_dir).encode(text)


def test_training_sentences_cut_documents_before_newlines():
    text = "line one\n\n    indented line two\n" + "x" * 50 + "\nlast é😀\n"
    chunks = list(spm_module._training_sentences([text, "second doc"], max_bytes=24))
    assert "".join(chunks) == text + "second doc"
    assert all(len(c.encode("utf-8")) <= 24 for c in chunks)
    # Cuts fall before newlines, which SentencePiece would strip from the end of a chunk; only
    # a document's own trailing newline ends a chunk.
    assert [c for c in chunks if c.endswith("\n")] == ["\nlast é😀\n"]
    assert chunks[:2] == ["line one", "\n\n    indented line two"]
    with pytest.raises(TypeError, match="bytes"):
        list(spm_module._training_sentences([b"raw"], max_bytes=24))


def test_sentencepiece_bad_vocab_size_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="SentencePiece training") as info:
        tk.SentencePieceTokenizer.train(["tiny corpus"], tmp_path, vocab_size=100)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# Save, load, build, errors.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def any_tokenizer(request):
    if request.param == "char":
        return tk.CharTokenizer.from_text("".join(varied_strings(50, seed=2)))
    # Looked up lazily so that only gpt2_bpe skips when the shared data folder is absent.
    return request.getfixturevalue({"sentencepiece": "spm_tok", "gpt2_bpe": "gpt2"}[request.param])


@pytest.mark.parametrize("any_tokenizer", KINDS, indirect=True)
def test_save_load_round_trip(any_tokenizer, tmp_path):
    any_tokenizer.save(tmp_path / "tok")
    loaded = tk.load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(any_tokenizer) and loaded.kind == any_tokenizer.kind
    assert loaded.vocab_size == any_tokenizer.vocab_size
    assert loaded.special_ids == any_tokenizer.special_ids
    for s in varied_strings(50, seed=2):
        assert loaded.encode(s) == any_tokenizer.encode(s)
        assert loaded.decode(loaded.encode(s)) == s
    # The saved directory is self-contained: every file it needs was copied into it.
    config = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert config["kind"] == any_tokenizer.kind
    for path in (getattr(loaded, "model_path", None), getattr(loaded, "encoder_json", None)):
        assert path is None or path.parent == tmp_path / "tok"


def test_gpt2_saved_copy_is_checked(gpt2, tmp_path):
    gpt2.save(tmp_path)
    assert (tmp_path / "vocab.bpe").read_bytes() == gpt2.vocab_bpe.read_bytes()
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("x y\n")
    with pytest.raises(ValueError, match="sha256"):
        tk.load_tokenizer(tmp_path)


def test_build_tokenizer_each_kind(gpt2_dir, spm_dir, tmp_path):
    text = shared_path("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    assert tk.build_tokenizer("char", texts=[text]).vocab_size == 65
    assert tk.build_tokenizer("char", texts=["b", "a"]).encode("ab") == [0, 1]
    skip = tk.build_tokenizer("char", texts=["ab"], unknown="skip")
    assert skip.encode("abc") == [0, 1]
    with pytest.raises(ValueError, match="'c'"):
        tk.build_tokenizer("char", texts=["ab"]).encode("abc")
    # Values other kinds need (a path, a vocabulary size) are ignored, as one config carries them.
    gpt2 = tk.build_tokenizer("gpt2_bpe", path=gpt2_dir, vocab_size=1024, directory=tmp_path)
    assert gpt2.encode("Hello world") == [15496, 995]
    loaded = tk.build_tokenizer("sentencepiece", directory=spm_dir)
    assert loaded.encode("import os\n") == tk.load_tokenizer(spm_dir).encode("import os\n")
    texts = [path.read_text(encoding="utf-8") for path in stdlib_corpus()[:4]]
    trained = tk.build_tokenizer("sentencepiece", texts=iter(texts), directory=tmp_path / "spm",
                                 vocab_size=400, user_defined_symbols=("<|sep|>",))
    assert trained.vocab_size == 400 and (tmp_path / "spm" / "tokenizer.json").is_file()
    assert trained.encode("a<|sep|>b")[1] == trained.special_ids["<|sep|>"]
    assert tk.load_tokenizer(tmp_path / "spm").special_ids == trained.special_ids
    with pytest.raises(ValueError, match="vocab_size"):
        tk.build_tokenizer("sentencepiece", directory=spm_dir, vocab_size=300)


def test_build_tokenizer_names_the_missing_value():
    assert "texts=" in one_line_error(ConfigError, tk.build_tokenizer, "char")
    assert "path=" in one_line_error(ConfigError, tk.build_tokenizer, "gpt2_bpe")
    assert "path=" in one_line_error(ConfigError, tk.build_tokenizer, "openai_gpt")
    assert "directory=" in one_line_error(ConfigError, tk.build_tokenizer, "sentencepiece",
                                          texts=["x"], vocab_size=300)
    assert "'wordpiece'" in one_line_error(ConfigError, tk.build_tokenizer, "wordpiece")


def test_kinds_is_the_one_registry():
    assert list(tk.KINDS) == [*KINDS, "openai_gpt"]
    assert tk.KINDS == {"char": tk.CharTokenizer, "sentencepiece": tk.SentencePieceTokenizer,
                        "gpt2_bpe": tk.GPT2BPETokenizer, "openai_gpt": tk.OpenAIGPTTokenizer}
    assert all(cls.kind == kind for kind, cls in tk.KINDS.items())
    with pytest.raises(ValueError, match="registered twice"):
        class Impostor(tk.CharTokenizer):  # noqa: F841 - registering is the point
            kind = "char"

        tk.register(Impostor)


def test_fingerprint_hashes_the_saved_files(gpt2, gpt2_dir, tmp_path):
    # Pinned: checkpoints and token caches written so far record these values, so the
    # algorithm must not change.
    char = tk.CharTokenizer.from_text("hello world")
    assert tk.tokenizer_info(char) == {"kind": "char", "vocab_size": 8,
                                       "fingerprint": "3799ebaebbf8fbce"}
    assert tk.tokenizer_info(gpt2) == {"kind": "gpt2_bpe", "vocab_size": 50257,
                                       "fingerprint": "26d789d42e507f4a"}
    # Where the files were copied from is not part of the identity; their content is.
    shutil.copytree(gpt2_dir, tmp_path / "copy")
    assert tk.fingerprint(tk.GPT2BPETokenizer.from_files(tmp_path / "copy")) == "26d789d42e507f4a"
    assert tk.fingerprint(tk.load_tokenizer(_saved(gpt2, tmp_path / "saved"))) == \
        "26d789d42e507f4a"
    # A different vocabulary of the same size, or another setting, is another tokenizer.
    assert tk.fingerprint(tk.CharTokenizer.from_text("hello worle")) != tk.fingerprint(char)
    assert tk.fingerprint(tk.CharTokenizer.from_text("hello world", unknown="skip")) != \
        tk.fingerprint(char)


def _saved(tokenizer, directory):
    tokenizer.save(directory)
    return directory


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_errors_name_the_bad_value(tmp_path):
    message = one_line_error(ValueError, tk.build_tokenizer, "wordpiece")
    assert "'wordpiece'" in message and all(repr(k) in message for k in tk.KINDS)
    missing = tmp_path / "missing"
    assert str(missing) in one_line_error(FileNotFoundError, tk.load_tokenizer, missing)
    assert str(tmp_path) in one_line_error(FileNotFoundError, tk.load_tokenizer, tmp_path)
    config = tmp_path / "tokenizer.json"
    config.write_text('{"kind": "wordpiece", "settings": {}}')
    message = one_line_error(ValueError, tk.load_tokenizer, tmp_path)
    assert "'wordpiece'" in message and str(config) in message
    config.write_text("{not json")
    assert str(config) in one_line_error(ValueError, tk.load_tokenizer, tmp_path)
    config.write_text('{"kind": "sentencepiece", "settings": {"model_file": "spm.model"}}')
    message = one_line_error(FileNotFoundError, tk.load_tokenizer, tmp_path)
    assert str(tmp_path / "spm.model") in message
    config.write_text('{"kind": "char", "settings": {}}')
    assert "'chars'" in one_line_error(ValueError, tk.load_tokenizer, tmp_path)
    message = one_line_error(FileNotFoundError, tk.GPT2BPETokenizer.from_files, missing)
    assert str(missing) in message


def test_a_transformers_tokenizer_json_alone_reads_as_gpt2_bpe(tmp_path, monkeypatch):
    """transformers 5 saves GPT-2's tokenizer as tokenizer.json only (no vocab.json/merges.txt):
    a model directory holding just that reads as the same GPT-2 BPE, the same ids."""
    import shutil

    import transformers

    from conftest import shared_data_dir
    from gptjax.data.tokenizers import from_hf_files, from_model_dir

    bpe = shared_data_dir() / "gpt2_bpe"
    if not (bpe / "encoder.json").is_file() and not (bpe / "vocab.json").is_file():
        pytest.skip("GPT-2's BPE files are not in ../shared/data")
    src = tmp_path / "src"
    src.mkdir()
    for a, b in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copy(bpe / a if (bpe / a).is_file() else bpe / b, src / b)
    merges = [tuple(x.split(" ")) for x in (src / "merges.txt").read_text(
        encoding="utf-8").split("\n")[1:] if x]
    fast = transformers.GPT2Tokenizer(vocab=json.loads((src / "vocab.json").read_text(
        encoding="utf-8")), merges=merges)
    model_dir = tmp_path / "model"
    fast.save_pretrained(model_dir)
    assert (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").exists()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    got, want = from_model_dir(model_dir), from_hf_files(src)
    text = "Hello world, it's 2026! ünïcödé  spaces\n"
    assert got.kind == "gpt2_bpe" and got.vocab_size == want.vocab_size == 50257
    assert got.encode(text) == want.encode(text) == fast.encode(text)
    assert got.eos_id == want.eos_id == 50256
