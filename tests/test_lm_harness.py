"""gptjax.eval.lm_harness: the lm-eval model 'gptjax' equals lm-eval's own `hf` backend.

A local task group (YAML + jsonl written here: a LAMBADA-style loglikelihood task, a multiple
choice task, a rolling-perplexity task longer than the context, and a generate_until task) is
scored through both backends on the same transformers GPT-2 weights; per-example scores must
agree to 1e-4 and the metrics to the same tolerance.
"""

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, hf_gpt2_dir

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

N_CTX = 48
WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang over green hills "
         "near old towns where people walk slowly").split()


def _sentence(i, n=12):
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # initializer_range 0.1: peaked, input-dependent predictions (not near-uniform ones).
    d = hf_gpt2_dir(tmp_path_factory.mktemp("hf_gpt2"), N_CTX, initializer_range=0.1)
    return d


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task(name, data, output_type, **fields):
    lines = [f"task: {name}", "dataset_path: json",
             f"dataset_kwargs:\n  data_files:\n    test: {data}", "test_split: test",
             f"output_type: {output_type}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    lam = _jsonl(d / "lam.jsonl", [{"text": _sentence(i)} for i in range(6)])
    mc = _jsonl(d / "mc.jsonl", [{"q": _sentence(i, 6), "choices": [" cat", " dog", " the park"],
                                  "label": i % 3} for i in range(6)])
    roll = _jsonl(d / "roll.jsonl", [{"text": _sentence(i, 10 + 20 * i)} for i in range(4)])
    gen = _jsonl(d / "gen.jsonl", [{"q": "Q: " + _sentence(i, 5) + "\nA:", "a": " cat"}
                                   for i in range(4)])
    (d / "t_lam.yaml").write_text(_task(
        "t_lam", lam, "loglikelihood", doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
        doc_to_target="{{' '+text.split(' ')[-1]}}") + (
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
        "    higher_is_better: false\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n"))
    (d / "t_mc.yaml").write_text(_task("t_mc", mc, "multiple_choice", doc_to_text="{{q}}",
                                       doc_to_choice="{{choices}}", doc_to_target="{{label}}")
                                 + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "t_roll.yaml").write_text(_task(
        "t_roll", roll, "loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}")
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
          "  - metric: bits_per_byte\n")
    (d / "t_gen.yaml").write_text(_task(
        "t_gen", gen, "generate_until", doc_to_text="{{q}}", doc_to_target="{{a}}",
        generation_kwargs={"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False})
        + "metric_list:\n  - metric: exact_match\n")
    return d


TASKS = ["t_lam", "t_mc", "t_roll", "t_gen"]


def _evaluate(model, task_dir, **kw):
    from lm_eval.tasks import TaskManager  # optional: the extra under test

    return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=TaskManager(
        include_path=str(task_dir)), bootstrap_iters=0, log_samples=True, **kw)


def _flat(resps):
    """Numbers of one sample's responses (loglikelihood pairs, rolling floats, texts)."""
    out = []
    for r in resps:
        r = r[0] if isinstance(r, list) and len(r) == 1 else r
        out += list(r) if isinstance(r, (list, tuple)) else [r]
    return out


def test_gptjax_backend_equals_lm_eval_hf_backend(hf_dir, task_dir):
    from gptjax.eval.lm_harness import GPTJaxLM

    ours = _evaluate(GPTJaxLM(hf_dir=str(hf_dir), batch_size=4), task_dir)
    ref = _evaluate("hf", task_dir, model_args=f"pretrained={hf_dir},dtype=float32",
                    device="cpu", batch_size=4)
    worst = 0.0
    for task in TASKS:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(ref["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) > 0
        for sa, sb in zip(a, b):
            for x, y in zip(_flat(sa["resps"]), _flat(sb["resps"]), strict=True):
                if isinstance(x, float):
                    worst = max(worst, abs(x - y))
                    assert x == pytest.approx(y, abs=1e-4), (task, sa["doc_id"])
                else:
                    assert x == y, (task, sa["doc_id"])
        for metric, value in ref["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric and not math.isnan(value):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4,
                                                                      abs=1e-5), (task, metric)
    print(f"largest per-example log-likelihood difference: {worst:.2e}")


def test_eval_py_lm_eval_mode(hf_dir, task_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "--mode=lm_eval", "--hf_dir", str(hf_dir),
         "--tasks", "t_mc,t_lam", "--include_path", str(task_dir), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "lm_eval.json").read_text())
    assert set(res["results"]) >= {"t_mc", "t_lam"}
    assert 0.0 <= res["results"]["t_mc"]["acc,none"] <= 1.0
