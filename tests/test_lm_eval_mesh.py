"""gptjax.eval.mesh_scoring: the lm-eval model 'gptjax' on a device mesh and across processes.

`eval.py --mode=lm_eval --mesh ...` runs on 8 fake CPU devices (FSDP 4 x tensor 2) and as two
processes (FSDP 2 x tensor 2 over 2 x 2 devices); every per-example log-likelihood of a multiple
choice task and a rolling-loglikelihood task (longer than the context: several windows) equals
the one-device `gptjax` model's within 1e-5 relative, and so lm-eval's `hf` backend's
(tests/test_lm_harness.py). The local tasks are test_lm_harness.py's.
"""

import json
import re
import socket
import subprocess
import sys

import pytest
from conftest import REPO, hf_gpt2_dir, subprocess_env
from test_lm_harness import N_CTX, task_dir  # noqa: F401 (a fixture: the local tasks)

lm_eval = pytest.importorskip("lm_eval")

TASKS = ["t_mc", "t_roll"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # vocab 50258 (GPT-2's BPE has 50257 ids): tensor parallelism splits the vocabulary in two.
    return hf_gpt2_dir(tmp_path_factory.mktemp("hf_gpt2_even"), N_CTX, initializer_range=0.1,
                       vocab_size=50258)


def _flat(x):
    """The numbers of a sample's responses: log-likelihoods and is_greedy flags, in order."""
    return [v for item in x for v in _flat(item)] if isinstance(x, (list, tuple)) else [x]


@pytest.fixture(scope="module")
def reference(hf_dir, task_dir):  # noqa: F811
    """{(task, doc_id): the one-device model's response numbers}."""
    from lm_eval.tasks import TaskManager  # optional: the extra under test

    from gptjax.eval.lm_harness import GPTJaxLM

    res = lm_eval.simple_evaluate(
        model=GPTJaxLM(hf_dir=str(hf_dir), batch_size=4), tasks=TASKS, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True)
    return {(t, s["doc_id"]): _flat(s["resps"]) for t in TASKS for s in res["samples"][t]}


def _eval_py(hf_dir, task_dir, out, mesh, *extra):  # noqa: F811
    return [sys.executable, str(REPO / "eval.py"), "--mode=lm_eval", f"--hf_dir={hf_dir}",
            f"--tasks={','.join(TASKS)}", f"--include_path={task_dir}", "--batch_size=4",
            f"--mesh={mesh}", f"--out={out}", *extra]


def _check_samples(out, reference):
    rows = [json.loads(line) for line in (out / "lm_eval_samples.jsonl").read_text().splitlines()]
    got = {(r["task"], r["doc_id"]): _flat(r["resps"]) for r in rows}
    assert got.keys() == reference.keys()
    worst = 0.0
    for key, want in reference.items():
        for x, y in zip(got[key], want, strict=True):
            if isinstance(y, bool):
                assert x == y, key
            else:
                assert x == pytest.approx(y, rel=1e-5), key
                worst = max(worst, abs(x - y) / abs(y))
    return worst


def _per_device_share(stdout, mesh):
    """The share of the parameters one device holds, from eval.py's mesh line (process 0)."""
    m = re.search(re.escape(mesh) + r" process\(es\); [\d,]+ of [\d,]+ parameters per device "
                  r"\(([\d.]+)%\)", stdout)
    assert m, stdout[-2000:]
    return float(m.group(1)) / 100


def test_eight_devices_equal_one_device(hf_dir, task_dir, reference, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    r = subprocess.run(_eval_py(hf_dir, task_dir, out, "fsdp=4,tensor=2"), cwd=REPO,
                       env=subprocess_env(devices=8), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # Sharded, not replicated: a device holds an eighth (vocabulary, heads, MLP: 4 x 2 ways;
    # position embeddings and the layer norms only 4 or 1 ways).
    share = _per_device_share(r.stdout, "data 1 x fsdp 4 x tensor 2: 8 devices, 1")
    assert share < 0.14
    print(f"8 devices: {share:.1%} of the parameters per device; largest relative difference "
          f"{_check_samples(out, reference):.1e}")


def test_two_processes_equal_one_device(hf_dir, task_dir, reference, tmp_path):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [subprocess.Popen(
        _eval_py(hf_dir, task_dir, outs[i], "fsdp=2,tensor=2",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"), cwd=REPO, env=subprocess_env(devices=2),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:  # (a process that failed leaves the other waiting for it)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    # Process 0 prints the table and writes the results; process 1 computed the same, silently.
    assert "t_mc" in results[0][0] and "t_mc" not in results[1][0]
    assert not outs[1].exists()
    share = _per_device_share(results[0][0], "data 1 x fsdp 2 x tensor 2: 4 devices, 2")
    assert share < 0.27
    print(f"2 processes: {share:.1%} of the parameters per device; largest relative difference "
          f"{_check_samples(outs[0], reference):.1e}")


def test_bad_mesh_is_one_line(hf_dir):
    from gptjax.eval.lm_harness import GPTJaxLM
    from gptjax.sharding import ShardingError, parse_mesh

    assert parse_mesh("fsdp=4,tensor=2") == {"data": -1, "fsdp": 4, "tensor": 2}
    assert parse_mesh({"data": 2, "fsdp": -1}) == {"data": 2, "fsdp": -1, "tensor": 1}
    assert parse_mesh("tensor=-1") == {"data": 1, "fsdp": 1, "tensor": -1}
    for bad, words in [("pipeline=2", "unknown axis 'pipeline'"), ("fsdp=two", "'two'"),
                       ("fsdp", "not an integer"), (" , ", "at least one axis")]:
        with pytest.raises(ValueError, match=words):
            parse_mesh(bad)
    with pytest.raises(ShardingError, match="needs 2 devices but 1"):
        GPTJaxLM(hf_dir=str(hf_dir), mesh="data=1,fsdp=2")
    lm = GPTJaxLM(hf_dir=str(hf_dir), mesh="data=1", batch_size=3)
    assert lm.batch_size == 3 and lm.scorer.data_parallel == 1
    assert lm.scorer.summary().endswith("per device (100.0%)")
    with pytest.raises(ValueError, match="generate_until tasks do not run on a mesh"):
        lm.generate_until([])
