"""Finetuning end to end for every task type, finetune.py, zero-shot scoring (against
transformers), layer transfer and the GPT-1 analysis, on tiny models and tiny task files."""

import glob
import json
import os
import pathlib
import string
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (config files import configs.*)

from conftest import PRETRAINED, REPO, tiny_corpus, tiny_run_config
from gptjax.data.tasks import TASKS, load_task
from gptjax.eval import run as eval_run
from gptjax.eval import zeroshot_run
from gptjax.data.tokenizers import CharTokenizer
from gptjax.defaults import base_config, finetune_config, model_config
from gptjax.finetune import analysis, decoder, heads
from gptjax.finetune import loop as ft
from gptjax.finetune.batches import encode_examples
from gptjax.nn.param_layout import unstack_layers
from gptjax.train.optim import make_optimizer
from gptjax.runs.pretrained import load_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHARS = string.ascii_letters + string.digits + " .,?!'\"-:;()"


# ================================================================================ tiny data
def _write(path, text):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _sentence(rng, word):
    filler = ["the film", "a plot", "it is", "so", "this", "one", "acting", "story"]
    words = list(rng.choice(filler, 3)) + [word]
    rng.shuffle(words)
    return " ".join(words) + " ."


def write_tasks(root: pathlib.Path) -> dict:
    """Tiny files in the standard layouts of SST-2, MNLI, MRPC, STS-B and Story Cloze."""
    rng = np.random.RandomState(0)
    # SST-2: the label is whether the sentence says 'good' or 'bad' (learnable in a few steps).
    def sst(n):
        rows = [(_sentence(rng, w), int(w == "good")) for w in rng.choice(["good", "bad"], n)]
        return "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows)
    _write(root / "SST-2" / "train.tsv", sst(768))
    _write(root / "SST-2" / "dev.tsv", sst(24))
    _write(root / "SST-2" / "test.tsv", "index\tsentence\n" + "".join(
        f"{i}\t{_sentence(rng, w)}\n" for i, w in enumerate(["good", "bad", "good"])))
    labels = ["entailment", "neutral", "contradiction"]
    def mnli(n, test=False):
        head = "index\tsentence1\tsentence2" + ("" if test else "\tgold_label") + "\n"
        return head + "".join(f"{i}\tA man {i} walks.\tA person moves {i % 3}."
                              + ("" if test else f"\t{labels[i % 3]}") + "\n" for i in range(n))
    for name, n, test in [("train", 24, False), ("dev_matched", 9, False),
                          ("dev_mismatched", 6, False), ("test_matched", 4, True),
                          ("test_mismatched", 5, True)]:
        _write(root / "MNLI" / f"{name}.tsv", mnli(n, test))
    def mrpc(n, test=False):
        head = ("index" if test else "Quality") + "\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        return head + "".join(f"{i if test else i % 2}\t1\t2\tHe said {i}.\tShe said {i}.\n"
                              for i in range(n))
    _write(root / "MRPC" / "train.tsv", mrpc(24))
    _write(root / "MRPC" / "dev.tsv", mrpc(8))
    _write(root / "MRPC" / "test.tsv", mrpc(3, test=True))
    def stsb(n, test=False):
        head = "index\tsentence1\tsentence2" + ("" if test else "\tscore") + "\n"
        return head + "".join(f"{i}\tA dog {i}.\tA cat {i}." + ("" if test else f"\t{i % 6}.0")
                              + "\n" for i in range(n))
    _write(root / "STS-B" / "train.tsv", stsb(24))
    _write(root / "STS-B" / "dev.tsv", stsb(8))
    _write(root / "STS-B" / "test.tsv", stsb(3, test=True))
    header = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
              "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n")
    def cloze(n):
        return header + "".join(f"s{i},Tom woke up.,He ate.,He ran {i}.,He slept.,He was happy.,"
                                f"He was a table.,{1 + i % 2}\n" for i in range(n))
    _write(root / "story_cloze" / "val_spring2016.csv", cloze(30))
    _write(root / "story_cloze" / "test_spring2016.csv", cloze(6))
    return {"sst2": root / "SST-2", "mnli": root / "MNLI", "mrpc": root / "MRPC",
            "stsb": root / "STS-B", "story_cloze": root / "story_cloze"}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A train.py work directory: a tiny character-level GPT with checkpoints at steps 2 and 4."""
    from gptjax.train.loop import train_and_evaluate

    d = tmp_path_factory.mktemp("pretrain")
    text = "".join(f"{CHARS} line {i}: the film is good, the plot is bad.\n" for i in range(200))
    c = tiny_run_config(tiny_corpus(d, text), d, PRETRAINED)
    train_and_evaluate(c, str(d / "run"), progress=False)
    return d / "run"


def ft_config(task, path, init_path, **train):
    """GPT-1's recipe scaled to tiny runs: one padded length (one compile), a higher rate."""
    c = finetune_config(task, str(path))
    c.init.kind = "workdir"
    c.init.path = str(init_path)
    c.task.max_len = 32
    c.optim.warmup_fraction = 0.1
    c.optim.learning_rate = 2e-3
    c.train.epochs = 2
    c.train.batch_size = 16
    c.train.eval_batch_size = 8
    c.train.length_bucket = 32
    c.train.log_every = 1
    c.train.update(train)
    return c


def _records(workdir):
    return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]


# ================================================================================ end to end
E2E = {  # task: (metric keys each epoch, prediction files); MRPC runs through finetune.py below
    "sst2": (["dev_accuracy"], ["SST-2.tsv"]),
    "mnli": (["dev_matched_accuracy", "dev_mismatched_accuracy"], ["MNLI-m.tsv", "MNLI-mm.tsv"]),
    "stsb": (["dev_pearson", "dev_spearman"], ["STS-B.tsv"]),
    "story_cloze": (["dev_accuracy"], ["story_cloze_test.tsv"]),
}


@pytest.mark.parametrize("task", sorted(E2E))
def test_every_task_type_finetunes_end_to_end(task, tasks, pretrained, tmp_path):
    """Classification (SST-2), entailment (MNLI, two dev splits), similarity as STS-B's
    regression, multiple choice (Story Cloze): train, evaluate per epoch, keep the best
    checkpoint, write test predictions."""
    keys, files = E2E[task]
    epochs = 4 if task == "sst2" else 2
    wd = tmp_path / "run"
    s = ft.finetune(ft_config(task, tasks[task], pretrained, epochs=epochs), str(wd),
                    progress=False)
    spec = TASKS[task]
    assert s["model_config"].vocab_size == 3 + pretrained_vocab(pretrained)
    recs = _records(wd)
    train_recs = [r for r in recs if "loss" in r]
    assert len(train_recs) == s["steps"] > 0
    assert all(np.isfinite(r["loss"]) and r["loss"] > r["task_loss"] for r in train_recs)
    evals = [r for r in recs if keys[0] in r]
    assert [r["epoch"] for r in evals] == list(range(1, epochs + 1))
    assert all(set(keys) <= set(r) for r in evals)
    assert s["main_metric"] == keys[0] and s["best"] in evals
    # The best checkpoint restores and predicts exactly what the run's best epoch predicted.
    loaded = ft.load_finetuned(str(wd))
    assert loaded.meta["epoch"] == s["best_epoch"]
    split = spec.dev_splits[0]
    data = load_task(task, tasks[task], splits=[split, *spec.test_splits])
    enc = encode_examples(data.splits[split], spec, loaded.tokenizer, loaded.special,
                          loaded.max_len)
    _, preds = ft.predict(loaded.model_config, loaded.head_config, loaded.params, enc, 8, 32, 32)
    got = ft.split_metrics(spec, enc, preds)
    for k in keys:
        if k.startswith(split + "_"):
            np.testing.assert_allclose(got[k[len(split) + 1:]], s["best"][k], rtol=1e-5)
    for name, test_split in zip(files, spec.test_splits):
        lines = open(wd / "predictions" / name).read().splitlines()
        assert lines[0] == "index\tprediction"
        assert len(lines) - 1 == len(data.splits[test_split])
        if spec.regression:
            assert all(0.0 <= float(x.split("\t")[1]) <= 5.0 for x in lines[1:])
        elif spec.task_type == "multiple_choice":
            assert {x.split("\t")[1] for x in lines[1:]} <= {"0", "1"}
        else:
            assert {x.split("\t")[1] for x in lines[1:]} <= set(spec.file_labels)
    assert (wd / "loss.png").exists() and (wd / "tokenizer" / "tokenizer.json").exists()
    if task == "sst2":
        # The word decides the label: the decoder and head must learn it, and finetuning
        # trains the whole decoder, not just the head.
        assert s["best"]["dev_accuracy"] >= 0.9, s["history"]
        _, pre, _ = decoder.pretrained_decoder(ft_config(task, "", pretrained).init)
        dec = loaded.params["decoder"]
        for k in ("wte", "h_0"):
            for a, b in zip(jax.tree_util.tree_leaves(pre[k]), jax.tree_util.tree_leaves(dec[k])):
                assert not np.allclose(np.asarray(a), np.asarray(b)[: a.shape[0]]), k


def pretrained_vocab(run):
    return json.load(open(run / "model_config.json"))["vocab_size"]


def test_load_pretrained_restores_params_only_as_plain_arrays(pretrained):
    """The params-only (Orbax partial) restore gives the checkpoint's exact parameters as
    uncommitted single-device arrays, so a jitted function fed them and then its own outputs
    compiles once (mesh-placed arrays from a full train-state restore compiled twice)."""
    from gptjax.runs.checkpoint import Checkpointer
    from gptjax.train.setup import Setup

    model_cfg, params, _ = load_pretrained(workdir=str(pretrained), step=2)
    c = base_config()
    c.model = model_config("tiny", **model_cfg.to_dict())
    c.optim.warmup_steps = 1
    setup = Setup(c, model_cfg, 4)
    ck = Checkpointer(str(pretrained / "checkpoints"), async_save=False)
    with setup.mesh:
        full, _ = ck.restore(setup.abstract_sharded_state(), 2)
    latest = ck.latest_step()
    ck.close()
    leaves = jax.tree_util.tree_leaves(params)
    want = jax.tree_util.tree_leaves(full.params)
    assert len(leaves) == len(want)
    for a, b in zip(leaves, want):
        assert isinstance(a, jax.Array) and not a.committed and len(a.devices()) == 1
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert latest == 4 and not np.array_equal(
        np.asarray(load_pretrained(workdir=str(pretrained))[1]["wte"]["embedding"]),
        np.asarray(params["wte"]["embedding"]))
    traces = []

    @jax.jit
    def decay(p):
        traces.append(1)
        return jax.tree_util.tree_map(lambda x: 0.5 * x, p)

    decay(decay(decay(params)))
    assert len(traces) == 1


def test_finetune_refuses_a_used_workdir_and_bad_init(tasks, pretrained, tmp_path):
    c = ft_config("sst2", tasks["sst2"], pretrained)
    (tmp_path / "used" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds a finetuning run"):
        ft.finetune(c, str(tmp_path / "used"), progress=False)
    c.init.kind = "torch"
    with pytest.raises(ValueError, match="init.kind='torch': allowed values"):
        ft.finetune(c, str(tmp_path / "fresh"), progress=False)
    c.init.kind, c.init.path = "hf", ""
    with pytest.raises(ValueError, match="init.kind='hf' needs init.path"):
        ft.finetune(c, str(tmp_path / "fresh2"), progress=False)


# ================================================================================ layer transfer
def _hf_gpt(seed, family="gpt2", **shape):
    torch.manual_seed(seed)
    shape = dict(dict(vocab_size=80, n_positions=48, n_embd=16, n_layer=3, n_head=2), **shape)
    if family == "openai":
        return transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**shape)).eval()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()


@pytest.mark.parametrize("scan", [False, True])
def test_transfer_layers_mixes_blocks(scan):
    from gptjax.nn.convert import from_hf

    cfg, pre = from_hf(_hf_gpt(0), scan_layers=scan)
    _, fresh = from_hf(_hf_gpt(1), scan_layers=scan)
    mixed = decoder.transfer_layers(cfg, pre, fresh, 2)
    flat = lambda p: unstack_layers(cfg, p) if scan else p  # noqa: E731
    m, a, b = flat(mixed), flat(pre), flat(fresh)
    same = lambda x, y: all(np.array_equal(u, v) for u, v in zip(  # noqa: E731
        jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))
    assert same(m["h_0"], a["h_0"]) and same(m["h_1"], a["h_1"]) and same(m["h_2"], b["h_2"])
    assert same(m["wte"], a["wte"]) and same(m["ln_f"], a["ln_f"])
    none = flat(decoder.transfer_layers(cfg, pre, fresh, 0, embeddings=False))
    assert same(none, b)
    assert same(flat(decoder.transfer_layers(cfg, pre, fresh, -1)), a)
    with pytest.raises(ValueError, match=r"transfer_layers=4: allowed values are -1 \(all\)"):
        decoder.transfer_layers(cfg, pre, fresh, 4)


# ================================================================================ zero-shot
def test_zero_shot_mode_is_eval_zeroshot(tasks, pretrained, tmp_path):
    """finetune.py --mode=zero_shot is an alias of eval.py --mode=zeroshot: the same row and the
    same files, on the config's split."""
    c = ft_config("story_cloze", tasks["story_cloze"], pretrained)
    c.zero_shot.split = "test"
    r = analysis.zero_shot(c, str(tmp_path / "zs"))
    assert r["task"] == "story_cloze" and r["split"] == "test" and r["n"] == 6
    assert 0.0 <= r["accuracy"] <= 1.0
    (row,) = json.load(open(tmp_path / "zs" / "zeroshot.json"))
    assert row == {k: v for k, v in r.items() if k not in ("split", "init", "wall_time_s")}
    assert (tmp_path / "zs" / "zeroshot.md").exists() and (tmp_path / "zs" / "zeroshot.png").exists()
    # eval.py's own runner on the same split's examples gives the same accuracy.
    models = eval_run.load_models([str(pretrained)])
    items = {"test": load_task("story_cloze", tasks["story_cloze"], splits=["test"]).splits["test"]}
    (ev,) = zeroshot_run.run_loaded(models, {"story_cloze": items})
    assert ev["accuracy"] == r["accuracy"] and ev["n"] == r["n"]
    c = ft_config("mrpc", tasks["mrpc"], pretrained)
    with pytest.raises(ValueError, match="task 'mrpc' has no zero-shot method; allowed: "
                                         r"\['cola', 'mctest', 'race', 'sst2', 'story_cloze'\]"):
        analysis.zero_shot(c, str(tmp_path))


# ================================================================================ analysis
def test_layer_transfer_analysis(tasks, pretrained, tmp_path):
    """GPT-1 Figure 2 as one call: a finetuning run per number of transferred layers and
    zero-shot accuracy at every pretraining checkpoint, as tables and a plot."""
    c = ft_config("sst2", tasks["sst2"], pretrained, epochs=4)
    c.analysis.layers = (0, 1)
    c.analysis.zero_shot_tasks = (f"sst2={tasks['sst2']}", f"story_cloze={tasks['story_cloze']}")
    r = analysis.layer_transfer_analysis(c, str(tmp_path), progress=False)
    assert [row["layers"] for row in r["transfer"]] == [0, 1]
    assert all(0.0 <= row["dev_accuracy"] <= 1.0 for row in r["transfer"])
    # Transferring every layer is the end-to-end SST-2 test's run: it learns the task.
    assert r["transfer"][1]["dev_accuracy"] >= 0.9
    steps = sorted(int(x) for x in os.listdir(pretrained / "checkpoints"))
    assert [row["step"] for row in r["zero_shot"]] == steps and {2, 4} <= set(steps)
    assert all(set(row) == {"step", "sst2", "story_cloze"} for row in r["zero_shot"])
    for name in ("analysis.json", "analysis.md", "analysis.png", "transfer_0/summary.json",
                 "transfer_1/summary.json"):
        assert (tmp_path / name).exists(), name
    table = (tmp_path / "analysis.md").read_text()
    assert "| layers transferred | dev_accuracy |" in table and "| 4 |" in table
    t0 = json.load(open(tmp_path / "transfer_0" / "config.json"))
    assert t0["init"]["transfer_layers"] == 0


# ================================================================================ finetune.py
def test_cli_from_a_transformers_directory(tasks, tmp_path):
    """finetune.py on MRPC (similarity: both orderings summed; F1) from a saved transformers
    OpenAI-GPT directory with a gptjax tokenizer; then a user error reported on one line."""
    hf_dir = tmp_path / "hf"
    _hf_gpt(5, "openai", n_layer=1).save_pretrained(hf_dir)
    CharTokenizer.from_text(CHARS).save(tmp_path / "tok")
    common = [f"--config.task.path={tasks['mrpc']}", "--config.init.kind=hf",
              f"--config.init.path={hf_dir}", f"--config.init.tokenizer_path={tmp_path / 'tok'}",
              "--config.task.max_len=32", "--config.train.length_bucket=32"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, str(REPO / "finetune.py"), "--config",
         str(REPO / "configs" / "finetune" / "mrpc.py"), *args, *common],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    p = run("--workdir", str(tmp_path / "ft"), "--no_progress", "--config.train.epochs=2",
            "--config.train.batch_size=8", "--config.optim.learning_rate=1e-3")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "epoch 2: dev_f1" in p.stdout and "dev_accuracy" in p.stdout
    sub = (tmp_path / "ft" / "predictions" / "MRPC.tsv").read_text().splitlines()
    assert sub[0] == "index\tprediction" and len(sub) == 4
    assert {x.split("\t")[1] for x in sub[1:]} <= {"0", "1"}
    summary = json.load(open(tmp_path / "ft" / "summary.json"))
    assert summary["init"] == "hf" and summary["train_examples"] == 24
    assert summary["main_metric"] == "dev_f1" and len(summary["history"]) == 2
    assert glob.glob(str(tmp_path / "ft" / "checkpoints" / "*"))
    p = run("--workdir", str(tmp_path / "bad"), "--config.task.name=sst3")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: unknown task 'sst3'")


# ================================================================================ configs
CONFIGS = sorted(p for p in glob.glob(str(REPO / "configs" / "finetune" / "*.py"))
                 if not p.endswith(("common.py", "__init__.py")))


def test_a_config_per_task():
    assert sorted(pathlib.Path(p).stem for p in CONFIGS) == sorted(TASKS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: pathlib.Path(p).stem)
def test_every_finetune_config_parses_and_builds(path, shared_data):
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    assert "python finetune.py --config configs/finetune/" in mod.__doc__
    assert "Expected:" in mod.__doc__
    c = mod.get_config()
    spec = TASKS[c.task.name]
    assert pathlib.Path(path).stem == spec.name
    # GPT-1's recipe.
    assert (c.optim.learning_rate, c.train.batch_size, c.train.epochs) == (6.25e-5, 32, 3)
    assert (c.head.lm_coef, c.head.dropout, c.optim.weight_decay) == (0.5, 0.1, 0.01)
    assert c.optim.schedule == "linear" and c.optim.warmup_fraction == 0.002
    oc = ft.schedule_optim_config(c, 1000)
    assert oc.warmup_steps == 2 and oc.decay_steps == 1000
    make_optimizer(oc, 1000)
    heads.HeadConfig(spec.task_type, spec.num_labels, c.head.lm_coef, c.head.dropout)
    # Every default path is under ../shared/data; the tasks shipped there load as shipped, the
    # others (MNLI, SNLI, ...) say in the docstring where their files go.
    assert c.task.path.startswith("../shared/data/"), c.task.path
    data_path = shared_data / c.task.path[len("../shared/data/"):]
    if data_path.is_dir():
        data = load_task(spec.name, data_path, splits=[spec.dev_splits[0]])
        assert len(data.splits[spec.dev_splits[0]]) > 0
    else:
        assert c.task.path in mod.__doc__, f"{path}: the docstring should say where {c.task.path} is"


def test_config_reads_tfds_when_data_dir_is_set(shared_tfds):
    c = finetune_config("glue/sst2", "../shared/data/glue/SST-2")
    c.task.data_dir = str(shared_tfds)
    data = ft.load_task_from_config(c, ["dev"])
    assert data.source.startswith("tfds:glue/sst2") and len(data.splits["dev"]) == 872
