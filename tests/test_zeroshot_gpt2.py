"""GPT-2's zero-shot framings and GPT-1's heuristics (gptjax.eval.gpt2_zeroshot, zero_shot,
zeroshot_run) on a small trained gptjax model and a tiny transformers model, each metric equal to
its reference package (rouge-score, sacrebleu, lm-eval's CoQA F1, scikit-learn's MCC) on the
same predictions."""

import json
import string
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import PRETRAINED, REPO, hf_gpt2_dir, tiny_corpus, tiny_run_config

from gptjax.data.tasks import load_task
from gptjax.eval import gpt2_zeroshot as g2
from gptjax.eval import run
from gptjax.eval import text_metrics as tm
from gptjax.eval import zero_shot as zs
from gptjax.eval import zeroshot_run

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
S = ["the cat sat on the mat .", "a dog ran to the park .", "birds sang over green hills .",
     "people walk slowly in old towns .", "the sun rose over the quiet sea .",
     "children played near the river ."]


# ================================================================================ models
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A train.py work directory: a tiny character-level GPT with several checkpoints."""
    from gptjax.train.loop import train_and_evaluate

    d = tmp_path_factory.mktemp("pretrain")
    corpus = tiny_corpus(d, "".join(f"{CHARS} {S[i % 6]}\n" for i in range(200)))
    train_and_evaluate(tiny_run_config(corpus, d, dict(PRETRAINED, **{"model.n_ctx": 64})),
                       str(d / "run"), progress=False)
    return d / "run"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_gpt2_dir(tmp_path_factory.mktemp("hf_gpt2"), 128, initializer_range=0.1)


@pytest.fixture(scope="module", params=["trained", "hf"])
def model(request, trained, hf_dir):
    from gptjax.runs.pretrained import load_pretrained

    kw = {"workdir": str(trained)} if request.param == "trained" else {"hf_dir": str(hf_dir)}
    config, params, tok = load_pretrained(**kw)
    return g2.Model(config, params, tok, batch_size=4)


# ================================================================================ data files
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("zs_data")

    def jsonl(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d / name)

    cbt = ""
    for k in range(2):
        cbt += "".join(f"{i + 1} {S[(i + k) % 6]}\n" for i in range(4))
        cbt += "21 the XXXXX sat on the mat .\tcat\t\tcat|dog|sun\n\n"
    (d / "cbt.txt").write_text(cbt)
    (d / "dprd.txt").write_text("The cat chased the dog because it was hungry.\nit\n"
                                "The cat,the dog\nThe cat\n\nThe sun warmed the sea since it "
                                "was hot.\nit\nThe sun,the sea\nThe sun\n")
    coqa = {"data": [{"story": " ".join(S), "questions": [
        {"input_text": "who sat?", "turn_id": 1}, {"input_text": "where?", "turn_id": 2}],
        "answers": [{"input_text": "the cat"}, {"input_text": "on the mat"}],
        "additional_answers": {"0": [{"input_text": "a cat"}, {"input_text": "mat"}]}}]}
    (d / "coqa.json").write_text(json.dumps(coqa))
    (d / "en.txt").write_text("".join(s + "\n" for s in S))
    (d / "fr.txt").write_text("".join(s.upper() + "\n" for s in S))
    cola = d / "CoLA"
    cola.mkdir()
    for split, n in (("train", 12), ("dev", 6)):
        (cola / f"{split}.tsv").write_text("".join(
            f"src\t{i % 2}\t\t{S[i % 6] if i % 2 else ' '.join(S[i % 6].split()[::-1])}\n"
            for i in range(n)))
    return {
        "lambada": jsonl("lambada.jsonl", [{"text": s[:-2]} for s in S]),
        "cbt": str(d / "cbt.txt"), "dprd": str(d / "dprd.txt"), "coqa": str(d / "coqa.json"),
        "winograd": jsonl("wino.jsonl", [
            {"sentence": "The cat chased the dog because _ was hungry.",
             "options": ["the cat", "the dog"], "answer": 0},
            {"sentence": "The mat was under the cat so _ was soft.",
             "options": ["the mat", "the cat"], "answer": 0}]),
        "cnn_dm": jsonl("cnn.jsonl", [{"article": " ".join(S[i:i + 3]), "highlights": S[i]}
                                      for i in range(3)]),
        "wmt": f"{d / 'en.txt'}:{d / 'fr.txt'}",
        "qa": jsonl("qa.jsonl", [{"question": f"what {s.split()[1]}?", "answers": [s.split()[1]]}
                                 for s in S]),
        "cola": str(cola),
    }


# ================================================================================ references
def _lm_eval_coqa_scores():
    """lm-eval's CoQA scoring (tasks/coqa/utils.compute_scores). It reads the official SQuAD
    helpers from transformers.data.metrics.squad_metrics, which transformers 5 removed: where
    they are gone they are taken from lm-eval's TyDi QA copy of the official script (English)."""
    pytest.importorskip("lm_eval")
    try:
        import transformers.data.metrics.squad_metrics  # noqa: F401  # optional: transformers 4
    except ImportError:
        from lm_eval.tasks.tydiqa import utils as ty  # optional: the reference package

        mod = types.ModuleType("transformers.data.metrics.squad_metrics")
        mod.compute_f1 = lambda a, p: float(ty.f1_score(p, a, "en")) if (
            ty.normalize_answer(a, "en") and ty.normalize_answer(p, "en")) else float(
            ty.normalize_answer(a, "en") == ty.normalize_answer(p, "en"))
        mod.compute_exact = lambda a, p: float(ty.exact_match_score(p, a, "en"))
        pkg = types.ModuleType("transformers.data.metrics")
        pkg.squad_metrics = mod
        sys.modules.setdefault("transformers.data", types.ModuleType("transformers.data"))
        sys.modules["transformers.data.metrics"] = pkg
        sys.modules["transformers.data.metrics.squad_metrics"] = mod
    from lm_eval.tasks.coqa import utils  # optional: the reference package

    return utils.compute_scores


def test_coqa_f1_equals_lm_eval():
    ref = _lm_eval_coqa_scores()
    cases = [(["the cat"], "a cat"), (["on the mat", "mat", "The Mat!"], "mat"),
             (["red and blue"], "blue, red"), (["no"], "yes"), (["Tom"], ""),
             (["in the old town", "old town"], "the town is old")]
    for golds, pred in cases:
        assert tm.coqa_scores(golds, pred) == pytest.approx(ref(golds, pred)), (golds, pred)


def test_matthews_equals_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.RandomState(0)
    for _ in range(5):
        p, y = rng.randint(0, 2, 30), rng.randint(0, 2, 30)
        assert tm.matthews(p, y) == pytest.approx(sk.matthews_corrcoef(y, p))


# ================================================================================ framings
def test_gpt2_framings_and_reference_metrics(model, data):
    from rouge_score import rouge_scorer  # optional: the reference package
    import sacrebleu  # optional: the reference package

    lam = g2.lambada(model, g2.read_lambada(data["lambada"]))
    gold = [w for _, w in g2.read_lambada(data["lambada"])]
    assert lam["accuracy"] == np.mean([p == g for p, g in zip(lam["predictions"], gold)])
    assert 0 <= lam["accuracy_stopword_filter"] <= 1
    cbt = g2.cbt(model, g2.read_cbt(data["cbt"]))
    assert cbt["n"] == 2 and set(cbt["predictions"]) <= {"cat", "dog", "sun"}
    for name in ("winograd", "dprd"):
        reader = g2.read_winograd if name == "winograd" else g2.read_dprd
        w = g2.winograd(model, reader(data[name]))
        assert w["n"] == 2 and 0 <= w["accuracy"] <= 1 and 0 <= w["accuracy_mean"] <= 1

    docs = g2.read_coqa(data["coqa"])
    co = g2.coqa(model, docs)
    ref = _lm_eval_coqa_scores()
    golds = [g for _, turns in docs for _, g in turns]
    assert golds[0] == ["the cat", "a cat"]
    assert co["f1"] == pytest.approx(np.mean([ref(g, p)["f1"]
                                              for g, p in zip(golds, co["predictions"])]))

    items = g2.read_cnn_dm(data["cnn_dm"])
    sm = g2.summarize(model, items, max_new_tokens=24)
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    refs = [sc.score(h, p) for (_, h), p in zip(items, sm["predictions"])]
    assert sm["rouge1"] == pytest.approx(100 * np.mean([r["rouge1"].fmeasure for r in refs]))
    assert sm["rougeL"] == pytest.approx(100 * np.mean([r["rougeLsum"].fmeasure for r in refs]))
    assert all(p.count("\n") <= 2 for p in sm["predictions"])

    pairs = g2.read_parallel(data["wmt"])
    tr = g2.translate(model, pairs, demos=3, max_new_tokens=12)
    assert tr["bleu"] == pytest.approx(sacrebleu.corpus_bleu(
        tr["predictions"], [[t for _, t in pairs[3:]]]).score)

    qs = g2.read_qa(data["qa"])
    qa = g2.qa(model, qs, demos=3, max_new_tokens=6)
    assert qa["exact_match"] == np.mean([tm.exact_match(a, p)
                                         for (_, a), p in zip(qs[3:], qa["predictions"])])


def test_framings_are_pure_prompts():
    assert g2.coqa_prompt("Doc.", [("q1", "a1")], "q2") == "Doc.\n\nQ: q1\n\nA: a1\n\nQ: q2\n\nA:"
    assert g2.first_sentences("One. Two! Three? Four.") == "One.\nTwo!\nThree?"
    assert g2.first_word(" word, more") == "word"


# ================================================================================ GPT-1
def test_cola_threshold_fitted_on_train(model, data):
    sk = pytest.importorskip("sklearn.metrics")
    cola = load_task("cola", data["cola"], splits=("train", "dev")).splits
    res = zs.zero_shot_cola(model.config, model.params, model.tokenizer, cola["train"],
                            cola["dev"], batch_size=4)
    s_tr = zs.sentence_logprobs(model.config, model.params, model.tokenizer,
                                [ex.text_a for ex in cola["train"]], 4)
    y_tr = [ex.label for ex in cola["train"]]
    # No threshold beats the fitted one on train.
    assert res["train_mcc"] == pytest.approx(max(
        sk.matthews_corrcoef(y_tr, (s_tr > t).astype(int)) for t in np.append(s_tr, -1e9)))
    s_dev = zs.sentence_logprobs(model.config, model.params, model.tokenizer,
                                 [ex.text_a for ex in cola["dev"]], 4)
    assert res["mcc"] == pytest.approx(sk.matthews_corrcoef(
        [ex.label for ex in cola["dev"]], (s_dev > res["threshold"]).astype(int)))


def test_bad_task_spec_is_one_line():
    with pytest.raises(ValueError, match="NAME=PATH") as e:
        zeroshot_run.parse_spec("nope=x")
    assert "\n" not in str(e.value)


def test_eval_py_zeroshot_over_steps(trained, data, tmp_path):
    """The one zero-shot entry: GPT-1 and GPT-2 tasks over every checkpoint, JSON/md/plot."""
    out = tmp_path / "zs"
    tasks = ",".join(f"{k}={data[k]}" for k in ("lambada", "winograd", "qa", "cola"))
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--mode=zeroshot",
                           "--workdir", str(trained), "--steps", "all", "--tasks", tasks,
                           "--batch_size", "4", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "zeroshot.json").read_text())
    steps = run.checkpoint_steps(str(trained))
    assert len(steps) >= 2 and {(r["step"], r["task"]) for r in rows} == {
        (s, t) for s in steps for t in ("lambada", "winograd", "qa", "cola")}
    assert (out / "zeroshot.png").stat().st_size > 0 and "| cola |" in (
        out / "zeroshot.md").read_text()
