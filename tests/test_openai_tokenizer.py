"""OpenAI GPT-1's tokenizer (gptjax.data.tokenizers.OpenAIGPTTokenizer) against transformers'
OpenAIGPTTokenizer, on a tiny vocabulary and merges list this test learns and writes itself."""

import collections
import json

import pytest

from gptjax.data import tokenizers as toks

transformers = pytest.importorskip("transformers")

CORPUS = ("the film is good . the plot is bad ! it's a charming , often affecting journey . "
          "the the thin then there these tell tall hello world good goods goodness") * 3
TEXTS = [
    "The film is GOOD.", "it's a charming, often-affecting journey...", "Hello   world\t\nthen",
    "Café naïve résumé", "the thin 3.5 (there) [these] {tall}!?", "tab\there\x00nul\x07bell",
    "中文 mixed the", "zzz qqq xyz", "", "   ", "good goods goodness's", "\u00a0nbsp\u2003em",
    "a\u2019b \u00abquoted\u00bb", "«»", "e\u0301", "ĲOE Straße",
]


def _learn(words, n_merges):
    """A plain BPE learner over words ending in '</w>' (GPT-1's symbol layout)."""
    vocab = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, n in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for word, n in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] += n
        vocab = new
    return merges


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("openai_gpt")
    words = toks.bert_pre_tokenize(toks.bert_normalize(CORPUS))
    merges = _learn(words, 40)
    chars = sorted(set("".join(words)) | set("0123456789()[]{}?.-!,'"))
    # No 'z' and no 'x</w>' at all: they become <unk>. 'é' is absent too (accents are stripped).
    chars = [c for c in chars if c != "z"]
    vocab = {}
    for sym in chars + [c + "</w>" for c in chars if c != "x"] + [a + b for a, b in merges]:
        vocab.setdefault(sym, len(vocab))
    vocab["<unk>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return d


def test_encode_and_decode_match_transformers(files):
    hf = transformers.OpenAIGPTTokenizer.from_pretrained(str(files))
    ours = toks.from_hf_files(files)
    assert isinstance(ours, toks.OpenAIGPTTokenizer) and ours.vocab_size == len(hf.get_vocab())
    merged = 0
    for text in TEXTS:
        want = hf.encode(text, add_special_tokens=False)
        got = ours.encode(text)
        assert got == want, (text, got, want)
        merged += sum(len(hf.convert_ids_to_tokens(i)) > 5 for i in want)
        assert ours.decode(got) == hf.backend_tokenizer.decode(
            want, skip_special_tokens=False), text
    assert merged > 0  # the merges are exercised, not just single characters
    assert ours.encode("zz") == [ours.special_ids["unk"]] * 2


def test_save_load_and_a_bad_merges_file(files, tmp_path):
    tok = toks.OpenAIGPTTokenizer.from_files(files)
    tok.save(tmp_path / "saved")
    again = toks.load_tokenizer(tmp_path / "saved")
    assert isinstance(again, toks.OpenAIGPTTokenizer) and again.eos_id is None
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vocab.json").write_text((files / "vocab.json").read_text())
    (tmp_path / "bad" / "merges.txt").write_text("#version: 0.2\nq w\n")
    with pytest.raises(ValueError, match="bad merge 'q w'"):
        toks.OpenAIGPTTokenizer.from_files(tmp_path / "bad")
