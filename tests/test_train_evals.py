"""In-training evaluation (issue 35, item 2): `train.evals` run every `train.evals_every` steps on
the live parameters (gptjax.train.evals, built by gptjax.eval.in_training), logged as
`eval/<name>/<metric>` to metrics.jsonl and TensorBoard, charged to the goodput ledger's `eval`
bucket and plotted in evals.png; their numbers equal eval.py's (gptjax.eval.run, what eval.py
calls) on the checkpoints of those steps."""

import glob
import json
import os
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_TEXT, subprocess_env, tiny_run_config, train_flags
from gptjax.config import ConfigError
from gptjax.eval import run as eval_run
from gptjax.eval.in_training import Evaluation, build_evals, lm_eval_metrics, parse_spec
from gptjax.runs import goodput
from gptjax.runs.pretrained import load_pretrained
from gptjax.train.loop import train_and_evaluate

# The tiny corpus with the words of the SST-2 template, so the character tokenizer has them all;
# it has no 'W' (GPT-3's arithmetic prompts: "Q: What is ...").
TEXT = TINY_TEXT + "".join(
    f"line {i}: good or bad?\nQuestion: Is this sentence positive or negative?\n"
    f"Answer: {'positive' if i % 2 else 'negative'}, very so.\n" for i in range(60))
BATCH = 8  # eval.py's --batch_size default, and the evaluations'


def _sst2(root):
    """A GLUE-layout SST-2 directory in the corpus' characters."""
    rng = np.random.RandomState(0)
    d = root / "SST-2"
    d.mkdir()
    for split, n in (("train", 16), ("dev", 8)):
        rows = [(f"to be {w} or not", int(w == "good")) for w in rng.choice(["good", "bad"], n)]
        (d / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n"
                                                                       for s, y in rows))
    return d


def _abs_sum(config, params, tokenizer):
    """A custom evaluation: the parameters' absolute sum (and 0.2 s, charged to `eval`)."""
    time.sleep(0.2)
    return {"abs_sum": float(sum(np.abs(np.asarray(x, np.float64)).sum()
                                 for x in jax.tree.leaves(jax.device_get(params))))}


@pytest.fixture(scope="module")
def evals_run(tmp_path_factory):
    """12 steps with the evaluations every 4 and a checkpoint every 4: (workdir, paths)."""
    root = tmp_path_factory.mktemp("train_evals")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    text = root / "held_out.txt"
    text.write_text("".join(f"to be or not to be, line {i}\n" for i in range(500, 540)))
    sst2 = _sst2(root)
    specs = (f"fewshot:task=sst2;path={sst2};shots=1;num_examples=8",
             f"zeroshot:task=sst2;path={sst2};num_examples=8",
             f"perplexity:path={text}")
    config = tiny_run_config(corpus, root, {"train.keep_checkpoints": 10, "train.evals": specs,
                                            "train.evals_every": 4})
    evals = build_evals(config) + [Evaluation("custom", _abs_sum)]
    wd = root / "run"
    train_and_evaluate(config, str(wd), progress=False, evals=evals)
    return wd, {"sst2": sst2, "text": text}


def _records(wd):
    with open(wd / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_metrics_at_the_eval_steps_equal_eval_py_on_the_checkpoints(evals_run):
    wd, paths = evals_run
    logged = {r["step"]: r for r in _records(wd) if any(k.startswith("eval/") for k in r)}
    assert sorted(logged) == [4, 8, 12]
    assert set(logged[4]) == {
        "step", "eval/fewshot_sst2_1shot/accuracy", "eval/fewshot_sst2_1shot/accuracy_norm",
        "eval/zeroshot_sst2/accuracy", "eval/perplexity_held_out/token_nll",
        "eval/perplexity_held_out/token_perplexity", "eval/perplexity_held_out/bits_per_byte",
        "eval/perplexity_held_out/word_perplexity", "eval/custom/abs_sum"}
    # eval.py --workdir RUN --steps all, each mode with the same settings (gptjax.eval.run).
    models = eval_run.load_models([str(wd)], steps="all")
    assert [m[4]["step"] for m in models] == [4, 8, 12]
    ppl = eval_run.run_perplexity(models, text_path=str(paths["text"]), batch_size=BATCH)
    fs = eval_run.run_fewshot(models, [f"sst2={paths['sst2']}"], [1], num_examples=8,
                              batch_size=BATCH)
    zs = eval_run.run_zeroshot(models, [f"sst2={paths['sst2']}"], num_examples=8,
                               batch_size=BATCH)
    for i, step in enumerate((4, 8, 12)):
        got = logged[step]
        for k in ("token_nll", "token_perplexity", "bits_per_byte", "word_perplexity"):
            assert got[f"eval/perplexity_held_out/{k}"] == pytest.approx(ppl[i][k], rel=1e-6)
        assert got["eval/fewshot_sst2_1shot/accuracy"] == fs[i]["accuracy"]
        assert got["eval/fewshot_sst2_1shot/accuracy_norm"] == fs[i]["accuracy_norm"]
        assert got["eval/zeroshot_sst2/accuracy"] == zs[i]["accuracy"]
        _, params, _ = load_pretrained(workdir=str(wd), step=step)
        assert got["eval/custom/abs_sum"] == pytest.approx(_abs_sum(None, params, None)["abs_sum"],
                                                           rel=1e-9)
    # the model changed between the evaluations: the numbers are of each step's parameters
    nll = [logged[s]["eval/perplexity_held_out/token_nll"] for s in (4, 8, 12)]
    assert len(set(nll)) == 3 and nll[2] < nll[0]


def _tensorboard_scalars(wd) -> set:
    """(tag, step) of every scalar in the run's TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    out = set()
    for path in glob.glob(str(wd / "tensorboard" / "events.*")):
        data, i = open(path, "rb").read(), 0
        while i < len(data):  # TFRecord: length, its CRC, the event, its CRC
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            out |= {(v.tag, event.step) for v in event.summary.value}
            i += 12 + n + 4
    return out


def test_tensorboard_ledger_and_plot(evals_run):
    wd, _ = evals_run
    scalars = _tensorboard_scalars(wd)
    for step in (4, 8, 12):
        assert ("eval/perplexity_held_out/token_nll", step) in scalars
        assert ("eval/fewshot_sst2_1shot/accuracy", step) in scalars
    # three 0.2 s sleeps inside the custom evaluation, besides the evaluations' own time
    assert goodput.load(str(wd))["run"]["buckets"]["eval"] > 0.6
    png = wd / "evals.png"
    assert png.exists() and os.path.getsize(png) > 5000


def test_one_line_errors_before_anything_is_read(tmp_path):
    config = tiny_run_config(tmp_path / "absent.txt", tmp_path)
    cases = {
        "bleu:task=x": "unknown kind 'bleu'; allowed: ['fewshot', 'zeroshot', 'perplexity', "
                       "'lm_eval']",
        "fewshot:task=7D+": "unknown few-shot task '7D+'; allowed: ['2D+'",
        "fewshot:task=sst2;path=/absent": None,  # (a known task: reading it fails, below)
        "fewshot:task=nope;path=/absent": "unknown few-shot task 'nope'",
        "fewshot:task=1DC;shots=-1": "shots='-1'; allowed: an integer >= 0",
        "fewshot:task=1DC;k=2": "'k=2' is not key=value with a key of fewshot; allowed keys:",
        "zeroshot:task=imdb;path=/absent": "unknown zero-shot task 'imdb'; allowed: [",
        "zeroshot:task=sst2": "zeroshot needs ['path']",
        "perplexity:path=/absent;detokenize=moses": "detokenize='moses'; allowed: ['none', "
                                                    "'wikitext']",
        "perplexity:path=a.txt;name=a b": "name='a b'; allowed: letters, digits",
    }
    for spec, message in cases.items():
        config.train.evals = (spec,)
        if message is None:
            with pytest.raises(FileNotFoundError, match="^train.evals entry .*directory not "
                                                        "found: /absent"):
                build_evals(config)
            continue
        with pytest.raises(ValueError) as e:
            build_evals(config)
        assert str(e.value).startswith(f"train.evals entry {spec!r}: {message}"), str(e.value)
        assert "\n" not in str(e.value)
    config.train.evals = ("fewshot:task=1DC", "fewshot:task=1DC;shots=0")
    with pytest.raises(ValueError, match="another entry is named 'fewshot_1DC_0shot' too"):
        build_evals(config)
    # train.evals without the evaluations built for it: before the work directory exists
    config.train.evals = ("fewshot:task=1DC",)
    wd = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"train.evals=\('fewshot:task=1DC',\): its "
                                          r"evaluations are built a layer above"):
        train_and_evaluate(config, str(wd), progress=False)
    assert not wd.exists()
    with pytest.raises(ConfigError, match="two evaluations are named 'a'"):
        train_and_evaluate(config, str(wd), progress=False, evals=[
            Evaluation("a", _abs_sum), Evaluation("a", _abs_sum)])
    assert not wd.exists()


def test_parsed_defaults_and_the_tokenizer_check(evals_run):
    wd, _ = evals_run
    kind, f = parse_spec("fewshot:task=2D+;num_examples=4")
    assert kind == "fewshot" and f["name"] == "fewshot_2Dplus_0shot"
    assert (f["shots"], f["seed"], f["batch_size"]) == (0, 0, BATCH)
    config, _, tok = load_pretrained(workdir=str(wd))
    (arith,) = build_evals(tiny_run_config(wd, wd, {"train.evals": (
        "fewshot:task=2D+;num_examples=4",)}))
    with pytest.raises(ValueError, match="'W'"):  # the run's characters have no 'W'
        arith.check(config, tok)
    assert lm_eval_metrics({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                  "exact_match,strict": 1.0}}) == {
        "t/acc": 0.5, "t/exact_match_strict": 1.0}


def test_train_py_on_a_tensor_and_fsdp_mesh(env):
    """python train.py on 4 fake devices (fsdp 2 x tensor 2): the evaluation sees the parameters
    sharded on the mesh; eval.py's numbers on one device match within float rounding."""
    tmp, _ = env
    text = tmp / "held_out_mesh.txt"
    text.write_text("".join(f"not to be or to be, line {i}\n" for i in range(700, 730)))
    wd = tmp / "evals_mesh"
    r = subprocess.run([sys.executable, "train.py", *train_flags(
        tmp, wd, "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.model_vocab_multiple=8", f"--config.train.evals=('perplexity:path={text}',)",
        "--config.train.evals_every=4")], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=subprocess_env(4))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    key = "eval/perplexity_held_out_mesh/token_nll"
    logged = {rec["step"]: rec[key] for rec in _records(wd) if key in rec}
    assert sorted(logged) == [4, 8, 12]
    models = eval_run.load_models([str(wd)], steps="all")
    ppl = eval_run.run_perplexity(models, text_path=str(text), batch_size=BATCH)
    assert [logged[s] for s in (4, 8, 12)] == pytest.approx([p["token_nll"] for p in ppl],
                                                            rel=1e-5)


def test_lm_eval_kind_equals_eval_py(evals_run, tmp_path):
    """The lm_eval kind: lm-eval's results through gptjax's lm-eval model, as eval.py
    --mode=lm_eval gives them (a local multiple-choice task in the run's characters)."""
    lm_eval = pytest.importorskip("lm_eval")
    wd, _ = evals_run
    rows = [{"q": f"to be or not to be, line {i}", "choices": [" to be", " not", " or"],
             "label": i % 3} for i in range(6)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t_tiny_mc.yaml").write_text(
        f"task: t_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    config = tiny_run_config(wd, wd, {"train.evals": (
        f"lm_eval:tasks=t_tiny_mc;include_path={tmp_path};builtin=false",)})
    (ev,) = build_evals(config)
    assert ev.name == "lm_eval"
    models = eval_run.load_models([str(wd)], steps=[12])
    _, model_cfg, params, tok, _ = models[0]
    got = ev.fn(model_cfg, params, tok)
    # eval.py --mode=lm_eval's call (gptjax.eval.run.run_lm_eval), with a TaskManager of the
    # local task alone (lm-eval's own ~15,000 take ~11 s to index)
    from lm_eval.tasks import TaskManager

    from gptjax.eval.lm_harness import GPTJaxLM

    want = lm_eval.simple_evaluate(
        model=GPTJaxLM(model=models[0][1:4], batch_size=BATCH), tasks=["t_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=False, random_seed=0)["results"]["t_tiny_mc"]
    assert got == {"t_tiny_mc/acc": want["acc,none"], "t_tiny_mc/acc_norm": want["acc_norm,none"]}
    config.train.evals = (f"lm_eval:tasks=t_tiny_mc,nope;include_path={tmp_path};builtin=0",)
    with pytest.raises(ValueError, match=r"^train.evals entry .*: tasks \['nope'\] are not "
                                         r"lm-eval tasks"):
        build_evals(config)


def test_train_evals_refuse_several_processes(monkeypatch):
    """The evaluations score on one process's devices: a multi-process run is refused in one
    line before anything is read (eval.py --mode=lm_eval --mesh scores across processes)."""
    import jax

    from gptjax.defaults import base_config
    from gptjax.eval.in_training import build_evals
    config = base_config()
    config.train.evals = ("perplexity:path=x.txt",)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError) as e:
        build_evals(config)
    assert "train.evals with 2 processes: allowed: one process" in str(e.value)
    assert "\n" not in str(e.value)


def test_eval_py_multi_process_flags_need_lm_eval_on_a_mesh():
    import types

    from gptjax.cli import MeshFlags
    flags = MeshFlags.__new__(MeshFlags)
    flags.mesh, flags.coordinator, flags.process_id = (types.SimpleNamespace(value=v)
                                                        for v in ("", "h:1", 0))
    flags.num_processes = types.SimpleNamespace(value=2)
    for mode in ("perplexity", "lm_eval"):
        with pytest.raises(ValueError, match=r"--num_processes=2 goes with --mode=lm_eval "
                                             r"--mesh=\.\.\.; allowed: one process"):
            flags.start(mode)
