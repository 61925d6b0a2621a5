"""Task loaders (shared GLUE data, tfds, and small files in every other standard layout), the
GLUE metrics against scipy / scikit-learn, and the submission format."""

import json
import math

import numpy as np
import pytest

from gptjax.data.tasks import (
    TASK_TYPES,
    TASKS,
    Example,
    check_task_type,
    get_task,
    load_task,
    write_predictions,
)
from gptjax.finetune import metrics as tm

from conftest import REPO

scipy_stats = pytest.importorskip("scipy.stats")
sk_metrics = pytest.importorskip("sklearn.metrics")


# ================================================================================ metrics
@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scipy_and_sklearn(seed):
    rng = np.random.RandomState(seed)
    n = rng.randint(5, 300)
    y, p = rng.randint(0, 2, n), rng.randint(0, 2, n)
    assert tm.accuracy(p, y) == pytest.approx(sk_metrics.accuracy_score(y, p), abs=1e-12)
    assert tm.f1(p, y) == pytest.approx(sk_metrics.f1_score(y, p), abs=1e-12)
    assert tm.matthews_corrcoef(p, y) == pytest.approx(sk_metrics.matthews_corrcoef(y, p),
                                                       abs=1e-12)
    y3, p3 = rng.randint(0, 3, n), rng.randint(0, 3, n)  # MNLI-like multiclass MCC
    assert tm.matthews_corrcoef(p3, y3) == pytest.approx(sk_metrics.matthews_corrcoef(y3, p3),
                                                         abs=1e-12)
    # STS-B-like scores: continuous predictions, labels on a 0.2 grid (many ties).
    s_y = rng.randint(0, 26, n) / 5.0
    s_p = s_y + rng.normal(0, 1.5, n)
    assert tm.pearson(s_p, s_y) == pytest.approx(scipy_stats.pearsonr(s_p, s_y)[0], abs=1e-10)
    assert tm.spearman(s_p, s_y) == pytest.approx(scipy_stats.spearmanr(s_p, s_y)[0], abs=1e-10)
    tied = np.round(s_p)  # ties on both sides
    assert tm.spearman(tied, s_y) == pytest.approx(scipy_stats.spearmanr(tied, s_y)[0],
                                                   abs=1e-10)
    np.testing.assert_allclose(tm.rankdata(tied), scipy_stats.rankdata(tied))


def test_metric_degenerate_cases_match_the_references():
    y = np.array([0, 1, 1, 0, 1])
    const = np.ones(5, int)
    assert tm.matthews_corrcoef(const, y) == sk_metrics.matthews_corrcoef(y, const) == 0.0
    zeros = np.zeros(5, int)
    assert tm.f1(zeros, zeros) == sk_metrics.f1_score(zeros, zeros, zero_division=0) == 0.0
    assert tm.f1(y, y) == 1.0 and tm.matthews_corrcoef(y, y) == 1.0
    assert math.isnan(tm.pearson(np.ones(5), y)) and math.isnan(tm.spearman(np.ones(5), y))
    with pytest.raises(ValueError, match="preds has 3 entries, labels 5"):
        tm.accuracy([1, 2, 3], y)
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['auc'\]"):
        tm.compute_metrics(["accuracy", "auc"], y, y)
    assert tm.compute_metrics(("f1", "accuracy"), y, y) == {"f1": 1.0, "accuracy": 1.0}


# ================================================================================ shared GLUE data
GLUE = {  # task: (directory, train, dev, test rows, labels seen in train)
    "cola": ("CoLA", 8551, 1043, 1063, {0, 1}),
    "sst2": ("SST-2", 67349, 872, 1821, {0, 1}),
    "mrpc": ("MRPC", 3668, 408, 1725, {0, 1}),
    "stsb": ("STS-B", 5749, 1500, 1379, None),
    "rte": ("RTE", 2490, 277, 3000, {0, 1}),
    "wnli": ("WNLI", 635, 71, 146, {0, 1}),
}


@pytest.mark.parametrize("task", sorted(GLUE))
def test_glue_tsv_loaders_read_every_row(task, shared_data):
    folder, n_train, n_dev, n_test, labels = GLUE[task]
    data = load_task(task, shared_data / "glue" / folder)
    counts = {s: len(data.splits[s]) for s in ("train", "dev", "test")}
    assert counts == {"train": n_train, "dev": n_dev, "test": n_test}, data.report()
    assert all(r.n_skipped == 0 for r in data.reports.values()), data.report()
    train, test = data.splits["train"], data.splits["test"]
    assert all(ex.label is None for ex in test)
    assert [ex.idx for ex in test[:3]] == [0, 1, 2]  # GLUE's index column, for submissions
    if labels is None:
        assert all(0.0 <= ex.label <= 5.0 for ex in train)
    else:
        assert {ex.label for ex in train} == labels
    spec = data.spec
    pair = spec.task_type != "classification"
    assert all((ex.text_b is not None) == pair and ex.text_a for ex in train[:100])


def test_glue_file_details(shared_data):
    mrpc = load_task("mrpc", shared_data / "glue" / "MRPC", splits=["train"])
    first = mrpc.splits["train"][0]  # the header after the BOM is recognised
    assert first.label == 1 and first.text_a.startswith("Amrozi accused his brother")
    rte = load_task("rte", shared_data / "glue" / "RTE", splits=["dev"]).splits["dev"][0]
    assert rte.label == 1  # 'not_entailment' is class 1, as in tfds
    cola = load_task("cola", shared_data / "glue" / "CoLA", splits=["dev"]).splits["dev"]
    assert cola[-1].text_a  # the last line has no newline


@pytest.mark.parametrize("task,fields", [("sst2", ("text_a",)), ("rte", ("text_a", "text_b")),
                                         ("stsb", ("text_a", "text_b"))])
def test_tfds_matches_the_tsv_files(task, fields, shared_data, shared_tfds):
    """A prepared tfds data_dir gives the same dev examples and labels as GLUE's TSVs."""
    folder = GLUE[task][0]
    files = load_task(task, shared_data / "glue" / folder, splits=["dev", "test"])
    tfds = load_task(TASKS[task].tfds_name, data_dir=str(shared_tfds), splits=["dev", "test"])
    assert tfds.spec is TASKS[task]
    for split in ("dev", "test"):
        a = sorted((tuple(getattr(e, f) for f in fields), e.label) for e in files.splits[split]
                   if e.label is not None or split == "test")
        b = sorted((tuple(getattr(e, f) for f in fields), e.label) for e in tfds.splits[split])
        assert len(a) == len(b) == GLUE[task][2 if split == "dev" else 3]
        if task == "stsb" and split == "dev":  # tfds stores the scores as float32
            assert [x[0] for x in a] == [x[0] for x in b]
            np.testing.assert_allclose([x[1] for x in a], [x[1] for x in b], rtol=1e-6)
        else:
            assert a == b


def test_tfds_errors_are_one_line(tmp_path, shared_tfds):
    with pytest.raises(ValueError, match="'race' has no supported tfds dataset"):
        load_task("race", data_dir=str(shared_tfds))
    with pytest.raises(ValueError, match="glue/qqp.*prepared there: cola"):
        load_task("glue/qqp", data_dir=str(shared_tfds))
    with pytest.raises(ValueError, match="exactly one of path"):
        load_task("sst2", "x", data_dir="y")


# ================================================================================ written files
def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_qqp_and_qnli_layouts_with_malformed_rows(tmp_path):
    _write(tmp_path / "QQP" / "train.tsv",
           "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
           "0\t1\t2\tHow do I cook rice?\tWhat is the way to cook rice?\t1\n"
           "1\t3\t4\tWhy is the sky blue?\n"                       # too few fields
           "2\t5\t6\tWhat is AI?\tWho won the cup?\t0\n"
           "3\t7\t8\tIs it?\tIt is.\tmaybe\n")                     # bad label
    _write(tmp_path / "QQP" / "test.tsv",
           "id\tquestion1\tquestion2\n0\tA?\tB?\n1\tC?\tD?\n")
    qqp = load_task("qqp", tmp_path / "QQP", splits=["train", "test"])
    assert [(e.text_a, e.label) for e in qqp.splits["train"]] == [
        ("How do I cook rice?", 1), ("What is AI?", 0)]
    rep = qqp.reports["train"]
    assert rep.skipped == {"wrong number of fields": 1, "bad label": 1}
    report = qqp.report()
    assert "skipped 2" in report and "train.tsv:3 (wrong number of fields)" in report
    assert "train.tsv:5 (bad label)" in report
    assert [e.idx for e in qqp.splits["test"]] == [0, 1]
    _write(tmp_path / "QNLI" / "dev.tsv",
           "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n"
           "1\tWhat?\tThat.\tnot_entailment\n")
    qnli = load_task("qnli", tmp_path / "QNLI", splits=["dev"])
    assert [(e.text_a, e.text_b, e.label) for e in qnli.splits["dev"]] == [
        ("Who?", "Him.", 0), ("What?", "That.", 1)]


def test_mnli_matched_and_mismatched(tmp_path):
    head_dev = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
                "label4\tlabel5\tgold_label\n")
    row = "{i}\t1\t1e\tfiction\t( a )\t( b )\t(a)\t(b)\t{a}\t{b}\tx\tx\tx\tx\tx\t{g}\n"
    _write(tmp_path / "dev_matched.tsv", head_dev + row.format(i=0, a="P0", b="H0",
                                                                 g="neutral")
           + row.format(i=1, a="P1", b="H1", g="contradiction"))
    _write(tmp_path / "dev_mismatched.tsv", head_dev + row.format(i=0, a="Q", b="R",
                                                                    g="entailment"))
    head_test = "\t".join(head_dev.split("\t")[:10]) + "\n"
    _write(tmp_path / "test_matched.tsv", head_test + "0\t1\t1e\tx\t-\t-\t-\t-\tS\tT\n")
    data = load_task("mnli", tmp_path, splits=["dev_matched", "dev_mismatched", "test_matched"])
    assert [e.label for e in data.splits["dev_matched"]] == [1, 2]
    assert data.splits["dev_mismatched"][0] == Example(0, "Q", "R", (), 0)
    assert data.splits["test_matched"][0] == Example(0, "S", "T", (), None)
    spec = get_task("mnli")
    assert spec.submission_file("test_mismatched") == "MNLI-mm.tsv"
    with pytest.raises(ValueError, match=r"no split\(s\) \['dev'\]"):
        load_task("mnli", tmp_path, splits=["dev"])


def test_snli_txt_and_jsonl(tmp_path):
    header = ("gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tcaptionID\tpairID\tlabel1\tlabel2\tlabel3\t"
              "label4\tlabel5\n")
    _write(tmp_path / "snli_1.0_dev.txt", header
           + "neutral\t-\t-\t-\t-\tA man.\tA tall man.\tc\tp\tneutral\t\t\t\t\n"
           + "-\t-\t-\t-\t-\tA dog.\tA cat.\tc\tp\tneutral\tcontradiction\t\t\t\n"
           + "broken line\n")
    lines = [{"gold_label": "entailment", "sentence1": "Kids play.", "sentence2": "Kids."},
             {"gold_label": "-", "sentence1": "x", "sentence2": "y"}]
    _write(tmp_path / "snli_1.0_test.jsonl",
           "\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    data = load_task("snli", tmp_path, splits=["dev", "test"])
    assert data.splits["dev"] == [Example(0, "A man.", "A tall man.", (), 1)]
    assert data.reports["dev"].skipped == {"no gold label": 1, "wrong number of fields": 1}
    assert data.splits["test"] == [Example(0, "Kids play.", "Kids.", (), 0)]
    assert data.reports["test"].skipped == {"no gold label": 1, "malformed JSON": 1}


def test_scitail_tsv_format(tmp_path):
    _write(tmp_path / "tsv_format" / "scitail_1.0_train.tsv",
           "Plants need light.\tLight is needed by plants.\tentails\n"
           "Rocks are hard.\tRocks are soft.\tneutral\n"
           "Missing label\tonly two\n")
    data = load_task("scitail", tmp_path, splits=["train"])
    assert [e.label for e in data.splits["train"]] == [0, 1]
    assert data.reports["train"].n_skipped == 1


def test_race_passages(tmp_path):
    doc = {"id": "high1.txt", "article": "Tom went to the market. He bought apples.",
           "questions": ["What did Tom buy?", "Tom went to the _ ."],
           "options": [["apples", "pears", "milk", "bread"],
                       ["school", "market", "park", "zoo"]],
           "answers": ["A", "B"]}
    _write(tmp_path / "dev" / "high" / "1.txt", json.dumps(doc))
    bad = dict(doc, answers=["E", "B"], id="high2.txt")
    _write(tmp_path / "dev" / "high" / "2.txt", json.dumps(bad))
    _write(tmp_path / "dev" / "high" / "3.txt", "{truncated")
    _write(tmp_path / "dev" / "middle" / "1.txt", json.dumps(dict(doc, id="middle1.txt")))
    data = load_task("race", tmp_path, splits=["dev"])
    ex = data.splits["dev"]
    assert len(ex) == 2 + 1 + 2
    assert ex[0] == Example("high1.txt-0", doc["article"] + " What did Tom buy?",
                            choices=("apples", "pears", "milk", "bread"), label=0)
    # A cloze question becomes the question filled with each option.
    assert ex[1].text_a == doc["article"]
    assert ex[1].choices[1] == "Tom went to the market ." and ex[1].label == 1
    assert data.reports["dev"].skipped == {"bad options or answer": 1,
                                           "malformed passage JSON": 1}
    middle = load_task("race", tmp_path, splits=["dev"], subset="middle")
    assert len(middle.splits["dev"]) == 2
    with pytest.raises(ValueError, match="subset='low'"):
        load_task("race", tmp_path, splits=["dev"], subset="low")


# ================================================================================ multiple choice
def test_story_cloze_shared_and_malformed(shared_data, tmp_path):
    data = load_task("story_cloze", shared_data / "story_cloze")
    tr, dev, test = (data.splits[s] for s in ("train", "dev", "test"))
    assert (len(tr), len(dev), len(test)) == (1497, 374, 1871)  # GPT-1's 374 held out
    assert not {e.idx for e in tr} & {e.idx for e in dev}
    assert {e.label for e in test} == {0, 1} and all(len(e.choices) == 2 for e in test)
    header = open(shared_data / "story_cloze" / "test_spring2016.csv").readline()
    _write(tmp_path / "test_spring2016.csv", header
           + 'id1,A.,"B, b.",C.,D.,End one.,End two.,2\n'
           + "id2,A.,B.,C.,D.,E1.,E2.,3\n"
           + "id3,too,few\n")
    small = load_task("story_cloze", tmp_path, splits=["test"])
    assert small.splits["test"] == [Example("id1", "A. B, b. C. D.", None,
                                            ("End one.", "End two."), 1)]
    assert small.reports["test"].skipped == {"bad label": 1, "wrong number of fields": 1}


def test_mctest_shared_and_malformed(shared_data, tmp_path):
    data = load_task("mctest", shared_data / "mctest", splits=["dev"], subset="mc160")
    ex = data.splits["dev"]
    assert len(ex) == 30 * 4  # 30 stories of 4 questions
    assert ex[0].text_a.endswith("\nWho was having a birthday?")
    assert "\\newline" not in ex[0].text_a and ex[0].choices[0] == "Jessie Bear"
    assert ex[0].label == 0 and ex[1].label == 2  # the .ans file's A, C
    both = load_task("mctest", shared_data / "mctest", splits=["dev"])
    assert len(both.splits["dev"]) == (30 + 50) * 4
    qs = "\t".join(f"one: Q{q}?\ta\tb\tc\td" for q in range(4))
    _write(tmp_path / "mc160.train.tsv", f"s0\tprops\tStory.\\newlineMore.\t{qs}\n"
           f"s1\tprops\tshort line\n"
           f"s2\tprops\tStory two.\t{qs}\n")
    _write(tmp_path / "mc160.train.ans", "B\tA\tD\tC\nA\tA\tA\tA\n")
    small = load_task("mctest", tmp_path, splits=["train"], subset="mc160")
    assert [e.label for e in small.splits["train"]] == [1, 0, 3, 2]
    assert small.splits["train"][0].text_a == "Story.\nMore.\nQ0?"
    assert small.reports["train"].skipped == {"wrong number of fields": 1,
                                              "bad or missing answer line": 1}


# ================================================================================ the rest
def test_write_predictions_in_glue_format(tmp_path):
    ex = [Example(7, "a"), Example(8, "b")]
    p = write_predictions(str(tmp_path / "RTE.tsv"), TASKS["rte"], ex, [1, 0])
    assert open(p).read() == "index\tprediction\n7\tnot_entailment\n8\tentailment\n"
    p = write_predictions(str(tmp_path / "SST-2.tsv"), TASKS["sst2"], ex, [1, 0])
    assert open(p).read() == "index\tprediction\n7\t1\n8\t0\n"
    p = write_predictions(str(tmp_path / "STS-B.tsv"), TASKS["stsb"], ex, [5.7, 2.25])
    assert open(p).read() == "index\tprediction\n7\t5.000\n8\t2.250\n"
    with pytest.raises(ValueError, match="1 predictions for 2 examples"):
        write_predictions(str(tmp_path / "x.tsv"), TASKS["sst2"], ex, [1])


def test_task_registry_and_errors(tmp_path):
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli",
                          "snli", "scitail", "race", "story_cloze", "mctest"}
    assert get_task("glue/cola") is TASKS["cola"]
    assert TASKS["stsb"].regression and TASKS["stsb"].num_labels == 1
    assert TASKS["race"].num_labels == 4 and TASKS["mnli"].num_labels == 3
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        get_task("sst3")
    with pytest.raises(FileNotFoundError, match="'sst2': directory not found: .*nope; point "
                                                "--config.task.path"):
        load_task("sst2", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="task file not found: .*train.tsv"):
        load_task("sst2", tmp_path, splits=["train"])
    _write(tmp_path / "dev.tsv", "text\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match=r"header has no column\(s\) \['sentence'\]"):
        load_task("sst2", tmp_path, splits=["dev"])
    with pytest.raises(ValueError, match="subset='mc160' applies only to"):
        load_task("sst2", tmp_path, subset="mc160")


def test_every_task_has_one_of_gpt1s_task_types():
    assert TASK_TYPES == ("classification", "entailment", "similarity", "multiple_choice")
    assert {spec.task_type for spec in TASKS.values()} == set(TASK_TYPES)
    for task_type in TASK_TYPES:
        check_task_type(task_type)
    with pytest.raises(ValueError, match=r"task_type='regression'.*'classification'") as info:
        check_task_type("regression")
    assert "\n" not in str(info.value)


def test_task_configs_read_from_the_shared_data_folder():
    """Every finetuning config's default task path is under ../shared/data (issue 23: six of them
    pointed into the repository), and a missing one names the flag that sets it."""
    import importlib.util
    configs = sorted((REPO / "configs" / "finetune").glob("*.py"))
    assert len(configs) == len(TASKS) + 1  # + __init__.py
    for path in configs:
        if path.name == "__init__.py":
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.get_config().task.path.startswith("../shared/data/"), path.name
