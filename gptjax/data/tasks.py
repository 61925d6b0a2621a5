"""Finetuning tasks in the layouts users have: GLUE TSVs, SNLI, SciTail, RACE, Story Cloze, MCTest.

Each task is a `TaskSpec` in `TASKS` (its GPT-1 task type, labels, metrics, splits, files and
submission names) and loads with `load_task`:

    data = load_task("sst2", path="../shared/data/glue/SST-2")        # GLUE-format TSV directory
    data = load_task("glue/sst2", data_dir="../shared/tfds")           # a prepared tfds data_dir
    data.splits["dev"][0]   # Example(idx=0, text_a="it 's a charming ...", label=1)
    print(data.report())    # rows read and skipped per split, with the reasons

Layouts read (one directory per task):

  GLUE (`download_glue_data.py`): CoLA, SST-2, MRPC, STS-B, QQP, QNLI, RTE, WNLI as
    {train,dev,test}.tsv; MNLI as train.tsv, dev_{matched,mismatched}.tsv,
    test_{matched,mismatched}.tsv. Columns are found by header name; CoLA train/dev have no
    header (source, label, original label, sentence). Fields are never quoted (GLUE's own reader).
  SNLI 1.0: snli_1.0_{train,dev,test}.txt (TSV) or .jsonl; pairs without a gold label ('-') skip.
  SciTail 1.1: tsv_format/scitail_1.0_{train,dev,test}.tsv (premise, hypothesis, entails|neutral).
  RACE: {train,dev,test}/{high,middle}/*.txt, one JSON object per passage (article, questions,
    options, answers); one example per question.
  Story Cloze 2016: {val,test}_spring2016.csv. As in GPT-1, the labelled validation file is the
    training data: a fixed 20% of it (374 of 1,871 stories) is held out as 'dev'; 'test' is the
    test file.
  MCTest: mc{160,500}.{train,dev,test}.tsv plus .ans answer files; one example per question.

Malformed rows (wrong number of fields, unknown label, bad JSON, ...) are skipped and counted per
reason, never fatal; `TaskData.report()` says how many and shows the first few locations.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import io
import json
import os
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from gptjax.finetune.heads import check_task_type

Label = Union[int, float, None]


@dataclasses.dataclass(frozen=True)
class Example:
    """One task example.

    Attributes:
      idx: its id: GLUE's `index` column (what submissions are keyed by), else the row number or
        a string naming the passage and question.
      text_a: text, premise, first sentence, or multiple-choice context.
      text_b: hypothesis or second sentence (entailment, similarity).
      choices: candidate answers (multiple choice).
      label: class / correct-candidate index, a float for regression, None where unlabelled.
    """

    idx: Union[int, str]
    text_a: str
    text_b: Optional[str] = None
    choices: tuple = ()
    label: Label = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task: how it is framed for GPT-1's heads, read from disk, scored and submitted.

    Attributes:
      name: the key in TASKS ('sst2').
      task_type: one of gptjax.finetune.heads.TASK_TYPES.
      file_labels: the label strings of the files, in class-index order (also written in
        submissions); () for regression and multiple choice.
      num_choices: candidates per question (multiple choice).
      metrics: metric names (gptjax.finetune.metrics.METRICS), as the task's leaderboard reports them.
      main_metric: the one that picks the best checkpoint.
      splits: canonical split names this task has ('train', 'dev', 'test', MNLI's
        'dev_matched', ...).
      train_split, dev_splits, test_splits: the roles of those splits in finetuning.
      submission: (split, file name) pairs for the GLUE server ('SST-2.tsv'); other tasks write
        '<name>_<split>.tsv'.
      tfds_name: the tfds dataset with the same data ('glue/sst2'), '' if none is supported.
      tfds_fields: its text feature(s), in text_a, text_b order.
      tfds_splits: (canonical split, tfds split) pairs.
      zero_shot: GPT-1 section 5's zero-shot method: 'sentiment' (SST-2), 'choice' (multiple
        choice by LM likelihood) or '' (none).
    """

    name: str
    task_type: str
    file_labels: tuple = ()
    num_choices: int = 0
    metrics: tuple = ("accuracy",)
    main_metric: str = "accuracy"
    splits: tuple = ("train", "dev", "test")
    train_split: str = "train"
    dev_splits: tuple = ("dev",)
    test_splits: tuple = ("test",)
    submission: tuple = ()
    tfds_name: str = ""
    tfds_fields: tuple = ()
    tfds_splits: tuple = (("train", "train"), ("dev", "validation"), ("test", "test"))
    zero_shot: str = ""

    @property
    def regression(self) -> bool:
        return self.task_type != "multiple_choice" and not self.file_labels

    @property
    def num_labels(self) -> int:
        """Head classes: len(file_labels), 1 for regression, num_choices for multiple choice."""
        if self.task_type == "multiple_choice":
            return self.num_choices
        return len(self.file_labels) or 1

    def submission_file(self, split: str) -> str:
        return dict(self.submission).get(split, f"{self.name}_{split}.tsv")


# ================================================================================ read reports
@dataclasses.dataclass
class SplitReport:
    """Rows read and skipped in one split, with the first few skipped locations."""

    read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    where: list = dataclasses.field(default_factory=list)

    def skip(self, reason: str, location: str) -> None:
        self.skipped[reason] += 1
        if len(self.where) < 5:
            self.where.append(f"{location} ({reason})")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclasses.dataclass
class TaskData:
    """A loaded task: its spec, the examples of each split, and what was skipped reading them."""

    spec: TaskSpec
    splits: dict
    reports: dict
    source: str

    def report(self) -> str:
        """One line per split: rows read, rows skipped by reason, first skipped locations."""
        lines = []
        for split, rep in self.reports.items():
            line = f"{self.spec.name} {split}: {rep.read} examples"
            if rep.n_skipped:
                reasons = ", ".join(f"{n} {r}" for r, n in rep.skipped.most_common())
                line += f"; skipped {rep.n_skipped} ({reasons}); first: {'; '.join(rep.where)}"
            lines.append(line)
        return "\n".join(lines)


# ================================================================================ parsing helpers
def _label(spec: TaskSpec, value: str) -> Label:
    """A label string as the task's class index or float; raises ValueError if it is neither."""
    value = value.strip()
    if spec.regression:
        x = float(value)
        if not np.isfinite(x):
            raise ValueError(value)
        return x
    if value not in spec.file_labels:
        raise ValueError(value)
    return spec.file_labels.index(value)


def _read_lines(path: str) -> list[str]:
    # utf-8-sig drops MRPC's byte-order mark; newline="" keeps "\r" inside lines so CRLF files
    # split like LF files after rstrip.
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        return [ln.rstrip("\r\n") for ln in fh.read().split("\n")]


def _require(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file not found: {path}")
    return path


@dataclasses.dataclass(frozen=True)
class _Columns:
    """Header names of a TSV task file (None = absent)."""

    text_a: str
    text_b: Optional[str] = None
    label: Optional[str] = None
    idx: Optional[str] = None


def _read_tsv(spec: TaskSpec, path: str, cols: _Columns, rep: SplitReport,
              header: bool = True, positions: Optional[dict] = None) -> Iterator[Example]:
    """Rows of a GLUE-style TSV as Examples; columns by header name or by fixed `positions`.

    A label column present in the header must parse on every row; test files simply lack it.
    """
    lines = _read_lines(_require(path))
    name = os.path.basename(path)
    start = 0
    if header:
        names = lines[0].split("\t") if lines else []
        missing = [c for c in (cols.text_a, cols.text_b) if c is not None and c not in names]
        if missing:
            raise ValueError(f"{path}: header has no column(s) {missing}; found {names}")
        pos = {k: names.index(getattr(cols, k))
               for k in ("text_a", "text_b", "label", "idx")
               if getattr(cols, k) is not None and getattr(cols, k) in names}
        n_fields = len(names)
        start = 1
    else:
        pos, n_fields = dict(positions), None
    for lineno, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{name}:{lineno}"
        if (n_fields is not None and len(fields) != n_fields) or len(fields) <= max(pos.values()):
            rep.skip("wrong number of fields", where)
            continue
        label = None
        if "label" in pos:
            try:
                label = _label(spec, fields[pos["label"]])
            except ValueError:
                rep.skip("bad label", where)
                continue
        text_a = fields[pos["text_a"]].strip()
        text_b = fields[pos["text_b"]].strip() if "text_b" in pos else None
        if not text_a or (cols.text_b is not None and not text_b):
            rep.skip("empty text", where)
            continue
        idx: Union[int, str] = rep.read
        if "idx" in pos:
            raw = fields[pos["idx"]].strip()
            idx = int(raw) if raw.isdigit() else raw
        rep.read += 1
        yield Example(idx=idx, text_a=text_a, text_b=text_b, label=label)


# ================================================================================ GLUE
def _glue_reader(files: dict, cols: _Columns, no_header: Sequence[str] = (),
                 positions: Optional[dict] = None) -> Callable:
    def read(spec: TaskSpec, path: str, split: str, rep: SplitReport) -> Iterator[Example]:
        file = os.path.join(path, files[split])
        if split in no_header:
            return _read_tsv(spec, file, cols, rep, header=False, positions=positions)
        return _read_tsv(spec, file, cols, rep)
    return read


_GLUE_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}

# CoLA's train/dev files have no header: source, label, original label (only on errors), sentence.
_read_cola = _glue_reader(_GLUE_FILES, _Columns("sentence", idx="index"),
                          no_header=("train", "dev"), positions={"label": 1, "text_a": 3})
_read_sst2 = _glue_reader(_GLUE_FILES, _Columns("sentence", label="label", idx="index"))
_read_mrpc = _glue_reader(_GLUE_FILES, _Columns("#1 String", "#2 String", "Quality", "index"))
_read_stsb = _glue_reader(_GLUE_FILES, _Columns("sentence1", "sentence2", "score", "index"))
_read_qqp = _glue_reader(_GLUE_FILES, _Columns("question1", "question2", "is_duplicate", "id"))
_read_qnli = _glue_reader(_GLUE_FILES, _Columns("question", "sentence", "label", "index"))
_read_pair = _glue_reader(_GLUE_FILES, _Columns("sentence1", "sentence2", "label", "index"))
_read_mnli = _glue_reader(
    {"train": "train.tsv", "dev_matched": "dev_matched.tsv",
     "dev_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
     "test_mismatched": "test_mismatched.tsv"},
    _Columns("sentence1", "sentence2", "gold_label", "index"))


# ================================================================================ SNLI, SciTail
def _read_snli(spec: TaskSpec, path: str, split: str, rep: SplitReport) -> Iterator[Example]:
    base = os.path.join(path, f"snli_1.0_{split}")
    if os.path.isfile(base + ".jsonl"):
        name = os.path.basename(base) + ".jsonl"
        for lineno, line in enumerate(_read_lines(base + ".jsonl"), 1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                row = json.loads(line)
                gold, a, b = row["gold_label"], row["sentence1"], row["sentence2"]
            except (json.JSONDecodeError, KeyError, TypeError):
                rep.skip("malformed JSON", where)
                continue
            ex = _snli_example(spec, rep, where, gold, a, b)
            if ex is not None:
                yield ex
        return
    cols = _Columns("sentence1", "sentence2", "gold_label", "pairID")
    lines = _read_lines(_require(base + ".txt"))
    names = lines[0].split("\t") if lines else []
    if any(c not in names for c in ("gold_label", "sentence1", "sentence2")):
        raise ValueError(f"{base}.txt: header lacks gold_label/sentence1/sentence2; found {names}")
    ia, ib, il = names.index(cols.text_a), names.index(cols.text_b), names.index("gold_label")
    name = os.path.basename(base) + ".txt"
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{name}:{lineno}"
        if len(fields) != len(names):
            rep.skip("wrong number of fields", where)
            continue
        ex = _snli_example(spec, rep, where, fields[il], fields[ia], fields[ib])
        if ex is not None:
            yield ex


def _snli_example(spec, rep, where, gold, a, b) -> Optional[Example]:
    if gold == "-":
        # No annotator majority; SNLI's own instructions drop these pairs.
        rep.skip("no gold label", where)
        return None
    try:
        label = _label(spec, str(gold))
    except ValueError:
        rep.skip("bad label", where)
        return None
    if not str(a).strip() or not str(b).strip():
        rep.skip("empty text", where)
        return None
    ex = Example(idx=rep.read, text_a=str(a).strip(), text_b=str(b).strip(), label=label)
    rep.read += 1
    return ex


def _read_scitail(spec: TaskSpec, path: str, split: str, rep: SplitReport) -> Iterator[Example]:
    name = f"scitail_1.0_{split}.tsv"
    candidates = [os.path.join(path, name), os.path.join(path, "tsv_format", name)]
    file = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    return _read_tsv(spec, file, _Columns("premise", "hypothesis"), rep, header=False,
                     positions={"text_a": 0, "text_b": 1, "label": 2})


# ================================================================================ RACE
def _read_race(spec: TaskSpec, path: str, split: str, rep: SplitReport,
               subset: str = "") -> Iterator[Example]:
    levels = [subset] if subset else ["high", "middle"]
    bad = [lv for lv in levels if lv not in ("high", "middle")]
    if bad:
        raise ValueError(f"RACE subset={bad[0]!r}: allowed values are 'high', 'middle', '' (both)")
    files = []
    for lv in levels:
        d = os.path.join(path, split, lv)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"RACE directory not found: {d} (expected "
                                    f"<race>/{{train,dev,test}}/{{high,middle}}/*.txt)")
        files += sorted(glob.glob(os.path.join(d, "*.txt")))
    for file in files:
        where = os.path.relpath(file, path)
        try:
            with open(file, encoding="utf-8", errors="replace") as fh:
                doc = json.load(fh)
            article, questions = doc["article"], doc["questions"]
            options, answers = doc["options"], doc["answers"]
            if not (len(questions) == len(options) == len(answers)) or not isinstance(
                    article, str):
                raise KeyError("lengths")
        except (json.JSONDecodeError, KeyError, TypeError):
            rep.skip("malformed passage JSON", where)
            continue
        pid = doc.get("id", os.path.basename(file))
        for q, (question, opts, ans) in enumerate(zip(questions, options, answers)):
            qwhere = f"{where} question {q}"
            if (not isinstance(opts, list) or len(opts) != spec.num_choices
                    or not all(isinstance(o, str) for o in opts) or not isinstance(question, str)
                    or not isinstance(ans, str) or len(ans) != 1
                    or ans not in "ABCD"[:spec.num_choices]):
                rep.skip("bad options or answer", qwhere)
                continue
            # Cloze questions ('... _ ...') become the question filled with each option; others
            # keep the question in the context and use the option as the answer.
            if "_" in question:
                context, choices = article, tuple(question.replace("_", o) for o in opts)
            else:
                context, choices = f"{article} {question}", tuple(opts)
            rep.read += 1
            yield Example(idx=f"{pid}-{q}", text_a=context, choices=choices,
                          label="ABCD".index(ans))


# ================================================================================ Story Cloze
_STORY_CLOZE_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3",
                       "InputSentence4", "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
                       "AnswerRightEnding"]
STORY_CLOZE_DEV_FRACTION = 0.2  # GPT-1 held out 374 of the 1,871 validation stories


def _csv_rows(text: str, name: str, rep: SplitReport) -> list:
    """The rows of a CSV text; a row the csv module cannot parse is skipped and counted."""
    reader, rows = csv.reader(io.StringIO(text)), []
    while True:
        try:
            rows.append(next(reader))
        except StopIteration:
            return rows
        except csv.Error:  # e.g. a stray carriage return inside an unquoted field
            rep.skip("unparseable CSV row", f"{name}:{reader.line_num}")


def _read_story_cloze_file(file: str, rep: SplitReport) -> Iterator[Example]:
    with open(_require(file), encoding="utf-8", errors="replace", newline="") as fh:
        rows = _csv_rows(fh.read(), os.path.basename(file), rep)
    if not rows or [c.strip() for c in rows[0]] != _STORY_CLOZE_HEADER:
        raise ValueError(f"{file}: expected the Story Cloze header {_STORY_CLOZE_HEADER}")
    name = os.path.basename(file)
    for lineno, row in enumerate(rows[1:], 2):
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{name}:{lineno}"
        if len(row) != len(_STORY_CLOZE_HEADER):
            rep.skip("wrong number of fields", where)
            continue
        if row[7].strip() not in ("1", "2"):
            rep.skip("bad label", where)
            continue
        rep.read += 1
        yield Example(idx=row[0], text_a=" ".join(s.strip() for s in row[1:5]),
                      choices=(row[5].strip(), row[6].strip()), label=int(row[7]) - 1)


def _read_story_cloze(spec: TaskSpec, path: str, split: str, rep: SplitReport
                      ) -> Iterator[Example]:
    if split == "test":
        yield from _read_story_cloze_file(os.path.join(path, "test_spring2016.csv"), rep)
        return
    # train and dev both come from the validation file: a fixed permutation (seed 0) puts the
    # first 20% in dev, so the two never overlap and every run splits the same way.
    scratch = SplitReport()
    rows = list(_read_story_cloze_file(os.path.join(path, "val_spring2016.csv"), scratch))
    perm = np.random.default_rng(0).permutation(len(rows))
    n_dev = int(round(STORY_CLOZE_DEV_FRACTION * len(rows)))
    keep = sorted(perm[:n_dev] if split == "dev" else perm[n_dev:])
    rep.skipped.update(scratch.skipped)
    rep.where.extend(scratch.where)
    rep.read += len(keep)
    yield from (rows[i] for i in keep)


# ================================================================================ MCTest
def _read_mctest(spec: TaskSpec, path: str, split: str, rep: SplitReport,
                 subset: str = "") -> Iterator[Example]:
    sets = [subset] if subset else ["mc160", "mc500"]
    bad = [s for s in sets if s not in ("mc160", "mc500")]
    if bad:
        raise ValueError(f"MCTest subset={bad[0]!r}: allowed values are 'mc160', 'mc500', "
                         "'' (both)")
    for name in sets:
        tsv = os.path.join(path, f"{name}.{split}.tsv")
        ans = os.path.join(path, f"{name}.{split}.ans")
        stories = _read_lines(_require(tsv))
        answers = _read_lines(ans) if os.path.isfile(ans) else None
        for lineno, line in enumerate(stories, 1):
            if not line.strip():
                continue
            where = f"{os.path.basename(tsv)}:{lineno}"
            fields = line.split("\t")
            if len(fields) != 23:
                rep.skip("wrong number of fields", where)
                continue
            letters = None
            if answers is not None:
                letters = answers[lineno - 1].split("\t") if lineno <= len(answers) else []
                if len(letters) != 4 or any(x.strip() not in ("A", "B", "C", "D")
                                            for x in letters):
                    rep.skip("bad or missing answer line", where)
                    continue
            story = fields[2].replace("\\newline", "\n").replace("\\tab", "\t").strip()
            for q in range(4):
                question = fields[3 + 5 * q]
                # "one: " / "multiple: " mark how many sentences the answer needs; not text.
                for prefix in ("one:", "multiple:"):
                    if question.startswith(prefix):
                        question = question[len(prefix):]
                choices = tuple(c.strip() for c in fields[4 + 5 * q: 8 + 5 * q])
                label = "ABCD".index(letters[q].strip()) if letters is not None else None
                rep.read += 1
                yield Example(idx=f"{fields[0]}.q{q}", text_a=f"{story}\n{question.strip()}",
                              choices=choices, label=label)


# ================================================================================ the registry
_GLUE_TFDS_PAIR = (("train", "train"), ("dev", "validation"), ("test", "test"))
_MNLI_SPLITS = ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("cola", "classification", ("0", "1"), metrics=("matthews", "accuracy"),
             main_metric="matthews", submission=(("test", "CoLA.tsv"),),
             tfds_name="glue/cola", tfds_fields=("sentence",)),
    TaskSpec("sst2", "classification", ("0", "1"), submission=(("test", "SST-2.tsv"),),
             tfds_name="glue/sst2", tfds_fields=("sentence",), zero_shot="sentiment"),
    TaskSpec("mrpc", "similarity", ("0", "1"), metrics=("f1", "accuracy"), main_metric="f1",
             submission=(("test", "MRPC.tsv"),), tfds_name="glue/mrpc",
             tfds_fields=("sentence1", "sentence2")),
    TaskSpec("stsb", "similarity", (), metrics=("pearson", "spearman"), main_metric="pearson",
             submission=(("test", "STS-B.tsv"),), tfds_name="glue/stsb",
             tfds_fields=("sentence1", "sentence2")),
    TaskSpec("qqp", "similarity", ("0", "1"), metrics=("f1", "accuracy"), main_metric="f1",
             submission=(("test", "QQP.tsv"),), tfds_name="glue/qqp",
             tfds_fields=("question1", "question2")),
    TaskSpec("mnli", "entailment", ("entailment", "neutral", "contradiction"),
             splits=_MNLI_SPLITS, dev_splits=("dev_matched", "dev_mismatched"),
             test_splits=("test_matched", "test_mismatched"),
             submission=(("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv")),
             tfds_name="glue/mnli", tfds_fields=("premise", "hypothesis"),
             tfds_splits=(("train", "train"), ("dev_matched", "validation_matched"),
                          ("dev_mismatched", "validation_mismatched"),
                          ("test_matched", "test_matched"),
                          ("test_mismatched", "test_mismatched"))),
    TaskSpec("qnli", "entailment", ("entailment", "not_entailment"),
             submission=(("test", "QNLI.tsv"),), tfds_name="glue/qnli",
             tfds_fields=("question", "sentence")),
    TaskSpec("rte", "entailment", ("entailment", "not_entailment"),
             submission=(("test", "RTE.tsv"),), tfds_name="glue/rte",
             tfds_fields=("sentence1", "sentence2")),
    TaskSpec("wnli", "entailment", ("0", "1"), submission=(("test", "WNLI.tsv"),),
             tfds_name="glue/wnli", tfds_fields=("sentence1", "sentence2")),
    TaskSpec("snli", "entailment", ("entailment", "neutral", "contradiction"),
             tfds_name="snli", tfds_fields=("premise", "hypothesis")),
    TaskSpec("scitail", "entailment", ("entails", "neutral")),
    TaskSpec("race", "multiple_choice", num_choices=4, zero_shot="choice"),
    TaskSpec("story_cloze", "multiple_choice", num_choices=2, zero_shot="choice"),
    TaskSpec("mctest", "multiple_choice", num_choices=4, zero_shot="choice"),
]}

_READERS: dict[str, Callable] = {
    "cola": _read_cola, "sst2": _read_sst2, "mrpc": _read_mrpc, "stsb": _read_stsb,
    "qqp": _read_qqp, "mnli": _read_mnli, "qnli": _read_qnli, "rte": _read_pair,
    "wnli": _read_pair, "snli": _read_snli, "scitail": _read_scitail, "race": _read_race,
    "story_cloze": _read_story_cloze, "mctest": _read_mctest,
}
_SUBSET_TASKS = ("race", "mctest")

for _spec in TASKS.values():
    check_task_type(_spec.task_type)


def get_task(name: str) -> TaskSpec:
    """The TaskSpec of a task name ('sst2') or of its tfds name ('glue/sst2')."""
    if name in TASKS:
        return TASKS[name]
    by_tfds = {t.tfds_name: t for t in TASKS.values() if t.tfds_name}
    if name in by_tfds:
        return by_tfds[name]
    raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)} or the tfds names "
                     f"{sorted(by_tfds)}")


# ================================================================================ tfds
def _read_tfds(spec: TaskSpec, data_dir: str, split: str, rep: SplitReport) -> Iterator[Example]:
    import tensorflow_datasets as tfds

    from gptjax.data.corpora import open_tfds

    # open_tfds gives one-line errors for a missing data_dir, name or preparation.
    source = open_tfds(spec.tfds_name, data_dir, text_key=spec.tfds_fields[0])
    tfds_split = dict(spec.tfds_splits)[split]
    if tfds_split not in source.splits:
        raise ValueError(f"{spec.tfds_name} in {data_dir!r} has no split {tfds_split!r}; "
                         f"prepared: {list(source.splits)}")
    ds = tfds.data_source(source.name, data_dir=data_dir)[tfds_split]
    chunk = 512  # batched reads: one array_record call per record is several times slower
    for start in range(0, len(ds), chunk):
        for i, row in enumerate(ds.__getitems__(list(range(start, min(start + chunk,
                                                                      len(ds))))), start):
            texts = [(row[f].decode("utf-8") if isinstance(row[f], bytes) else str(row[f])).strip()
                     for f in spec.tfds_fields]
            raw = row["label"]
            # tfds writes -1 where a split has no labels (GLUE test) or no gold label (SNLI).
            if spec.regression:
                label = None if split.startswith("test") else float(raw)
            else:
                label = None if int(raw) < 0 else int(raw)
                if label is None and not split.startswith("test"):
                    rep.skip("no gold label", f"{spec.tfds_name}[{tfds_split}][{i}]")
                    continue
            rep.read += 1
            yield Example(idx=int(row.get("idx", i)), text_a=texts[0],
                          text_b=texts[1] if len(texts) > 1 else None, label=label)


# ================================================================================ loading
def load_task(name: str, path: str = "", *, data_dir: str = "",
              splits: Optional[Sequence[str]] = None, subset: str = "") -> TaskData:
    """Loads a task's splits from its standard file layout or from a prepared tfds data_dir.

    Args:
      name: a TASKS key ('sst2', 'mnli', 'race', ...) or a tfds name ('glue/sst2').
      path: the task's directory in its standard layout (see the module docstring).
      data_dir: a tfds data_dir where `spec.tfds_name` is prepared; used instead of `path`.
      splits: which splits to read (default: all of the task's splits).
      subset: RACE 'high' / 'middle', MCTest 'mc160' / 'mc500'; '' reads both.

    Returns:
      The TaskData: examples per split, plus the skipped-row report.

    Raises:
      ValueError: unknown task / split / subset, or a file whose header is not the task's.
      FileNotFoundError: a split's file or the directory is missing.
    """
    spec = get_task(name)
    splits = tuple(spec.splits if splits is None else splits)
    unknown = [s for s in splits if s not in spec.splits]
    if unknown:
        raise ValueError(f"task {spec.name!r} has no split(s) {unknown}; allowed: "
                         f"{list(spec.splits)}")
    if subset and spec.name not in _SUBSET_TASKS:
        raise ValueError(f"subset={subset!r} applies only to {list(_SUBSET_TASKS)}, not to "
                         f"{spec.name!r}")
    if bool(path) == bool(data_dir):
        raise ValueError(f"task {spec.name!r}: give exactly one of path (a directory in the "
                         "task's file layout) or data_dir (a tfds data_dir)")
    out, reports = {}, {}
    if data_dir:
        if not spec.tfds_name:
            raise ValueError(f"task {spec.name!r} has no supported tfds dataset; load it from "
                             "its files with path=")
        for s in splits:
            reports[s] = SplitReport()
            out[s] = list(_read_tfds(spec, os.fspath(data_dir), s, reports[s]))
        return TaskData(spec, out, reports, f"tfds:{spec.tfds_name}@{data_dir}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"task directory not found: {path}")
    reader = _READERS[spec.name]
    for s in splits:
        reports[s] = SplitReport()
        if spec.name in _SUBSET_TASKS:
            out[s] = list(reader(spec, path, s, reports[s], subset=subset))
        else:
            out[s] = list(reader(spec, path, s, reports[s]))
    return TaskData(spec, out, reports, path)


# ================================================================================ submissions
def write_predictions(path: str, spec: TaskSpec, examples: Sequence[Example],
                      preds: Sequence) -> str:
    """Writes predictions in the GLUE submission format: a TSV `index<TAB>prediction`.

    Classes are written as the file's label strings ('0'/'1', 'entailment', ...), regression
    values with three decimals clipped to STS-B's [0, 5], candidates as their index.

    Returns:
      The path written.
    """
    preds = np.asarray(preds)
    if len(preds) != len(examples):
        raise ValueError(f"{len(preds)} predictions for {len(examples)} examples")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("index\tprediction\n")
        for ex, p in zip(examples, preds):
            if spec.regression:
                value = f"{float(np.clip(p, 0.0, 5.0)):.3f}"
            elif spec.task_type == "multiple_choice":
                value = str(int(p))
            else:
                value = spec.file_labels[int(p)]
            fh.write(f"{ex.idx}\t{value}\n")
    return path
