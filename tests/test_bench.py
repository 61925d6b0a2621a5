"""bench/device_check.sh --smoke runs end to end on CPU and writes its JSON and markdown summary;
every bench/*.py script runs end to end with --smoke and prints or writes real numbers;
bench/step_faults.py measures a kept step buffer at 0 faults and rejects an unknown setting."""

import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_device_check_smoke_writes_numbers(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--smoke", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "device_check.json").read_text())
    assert all(s["exit"] == 0 for s in summary["stages"].values()), summary["stages"]
    runners = summary["train"]["rows"][0]["runners"]
    assert {"gptjax", "hf", "nano"} <= set(runners), runners.keys()
    for r in runners.values():
        assert r["tok_s"] > 0 and math.isfinite(r["tok_s"]) and 0 < r["mfu_measured"]
    assert runners["hf"]["gptjax_speedup"] > 0
    decode = summary["decode"]["rows"]
    assert [r["batch"] for r in decode] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and 0 < r["roofline_measured"] for r in decode)
    md = (out / "device_check.md").read_text()
    assert "| tiny_smoke | 2 x 32 | float32 | gptjax |" in md and "| 1 |" in md


def test_device_check_rejects_unknown_option(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--fast"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _step_faults(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", GPTJAX_KEEP_FREED_MEMORY="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(REPO / "bench" / "step_faults.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_step_faults_reports_no_faults_for_a_kept_step_buffer():
    proc = _step_faults("--shape", "nano_4x128_T64", "--host", "kept_inline", "--steps", "3",
                        "--repeats", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'keep_freed_memory': True, 'inline_cpu_dispatch': True" in proc.stdout, proc.stdout
    blocks = [line.split() for line in proc.stdout.splitlines() if "faults/step" in line]
    assert len(blocks) == 3
    faults, ms = float(blocks[-1][1].replace(",", "")), float(blocks[-1][3].replace(",", ""))
    # 12,100 per step under glibc's default. This 44 MB buffer is under glibc's 64 MB thread-heap
    # limit, so kept memory alone would do; inline dispatch is tested in test_hostmem.py.
    assert faults < 200, proc.stdout
    assert ms > 1, proc.stdout  # a parsed step time (about 33 ms), not a column mix-up


def test_step_faults_rejects_an_unknown_setting():
    proc = _step_faults("--host", "hugepages")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --host: 'hugepages' is not one of ['default', 'kept', 'inline', 'kept_inline']"]


# ------------------------------------------------------------------ every bench/*.py with --smoke
BENCH_SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py"))
_IS_GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _floats(pattern: str, text: str) -> list:
    """Every match of pattern's groups in text, as floats (thousands separators dropped)."""
    return [tuple(float(g.replace(",", "")) for g in m.groups()) for m in
            re.finditer(pattern, text)]


def _check_attention(proc, out):
    rows = json.loads((out / "attention.json").read_text())["rows"]
    assert {(r["impl"], r["kind"]) for r in rows} >= {("xla", "dense"), ("xla", "local")}, rows
    for r in rows:
        assert "error" not in r and _positive(r["fwd_ms"]) and _positive(r["fwd_bwd_ms"]), r
    assert "growth over the smallest T" in proc.stdout


def _check_decode(proc, out):
    (row,) = json.loads((out / "decode.json").read_text())["rows"]
    assert _positive(row["gptjax_tokens_per_s"]) and _positive(row["roofline_fraction"]), row
    assert _positive(row["transformers_tokens_per_s"]), row


def _check_finetune_sst2(proc, out):
    r = json.loads((out / "results.json").read_text())
    assert _positive(r["pretrain_val_loss"]), r
    for key in ("pretrained_mean", "scratch_mean", "zero_shot_dev_accuracy"):
        assert 0 < r[key] <= 1, (key, r[key])
    assert "| finetuned from pretraining, best epoch |" in (out / "results.md").read_text()


def _check_finetune_lm(proc, out):
    r = json.loads((out / "results.json").read_text())
    a = r["arms"]
    assert list(a) == ["full", "lora_r2", "lora_r4", "scratch"], a.keys()
    for name, row in a.items():
        assert _positive(row["val_loss"]) and _positive(row["tok_s"]), (name, row)
        assert [s for s, _ in row["val"]] == [2, 3], row["val"]  # every 2 steps, then the end
        assert row["tokens"] == 3 * 4 * 32, row  # the same steps and tokens in every arm
    # LoRA on the four matrices of the smoke's one 32-wide block: r x (in + out) each,
    # r x (32 + 96) + r x (32 + 32) + r x (32 + 128) + r x (128 + 32) = 512 r; Adam holds two
    # moments per trainable parameter, so the adapters' state is a small fraction of full's.
    assert (a["lora_r2"]["trainable_params"], a["lora_r4"]["trainable_params"]) == (1024, 2048)
    assert a["full"]["trainable_params"] == a["scratch"]["trainable_params"] > 10 * 2048
    for name in ("lora_r2", "lora_r4"):
        assert 8 * a[name]["trainable_params"] <= a[name]["opt_state_bytes"] \
            < 8 * a[name]["trainable_params"] + 1024, a[name]
    assert a["full"]["opt_state_bytes"] >= 8 * a["full"]["trainable_params"]
    assert (out / "finetune_lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| LoRA rank 4 | pretrained |" in (out / "results.md").read_text()


def _check_gpu_fits(proc, out):
    rows = json.loads((out / "fits.json").read_text())["rows"]
    assert [(r["model"], r["precision"]) for r in rows] == [("gpt2", "fp32"), ("gpt2", "bf16")]
    for r in rows:
        assert r["gib_batch32"] > r["gib_batch8"] > r["gib_batch1"] > 0, r
        assert r["gib_per_sequence"] > 0, r
        b = r["batch"]
        assert set(b) == {"h100", "h200", "a100-40gb", "a100-80gb", "l4", "rtx4090"}, b
        order = ["h200", "a100-80gb", "h100", "a100-40gb", "rtx4090", "l4"]  # by memory
        assert [b[g] for g in order] == sorted((b[g] for g in order), reverse=True), b
        assert b["l4"] >= 1, b
    fp32, bf16 = rows
    assert bf16["gib_per_sequence"] < fp32["gib_per_sequence"], rows  # bf16 activations
    assert "| gpt2 | bf16 | 128 |" in proc.stdout, proc.stdout
    # --finetune's rows (train.py --dry_run --topology rtx4090 over a 2 x 64 GPT-2 directory):
    # full finetuning trains every parameter, LoRA rank 16 on c_attn and the attention's c_proj
    # 16 x ((64 + 192) + (64 + 64)) per layer, 2 layers.
    ft = json.loads((out / "fits.json").read_text())["finetune"]
    assert [(r["kind"], r["base_weights"]) for r in ft] == [
        ("full", "fp32"), ("lora", "fp32"), ("lora", "bf16"), ("lora", "int8")], ft
    assert ft[0]["trained_params"] == ft[0]["params"] > 3_000_000, ft[0]
    for r in ft:
        assert (r["batch"], r["micro_batch"], r["seq_len"], r["gpu"]) == (32, 1, 1024, "rtx4090")
        assert r["fits"].startswith("yes (") and 0 < r["gib"] < r["usable_gib"], r
    for r in ft[1:]:
        assert r["trained_params"] == 2 * 16 * (256 + 128) and r["gib"] <= ft[0]["gib"], r
    assert "| gpt2 2x64 | LoRA rank 16 (attn.c_attn,attn.c_proj) | int8 | 12,288 |" in \
        proc.stdout, proc.stdout


def _check_pod_compile(proc, out):
    (row,) = json.loads((out / "pods.json").read_text())["rows"]
    assert row["name"] == "gpt1" and row["topology"] == "v5e:2x2", row
    assert row["fits"].startswith("yes (") and 0 < row["gib_per_chip"] < row["hbm_gib"] == 16, row
    assert _positive(row["compile_s"]) and _positive(row["step_ms_40"]), row
    assert "| gpt1 | v5e:2x2 | {'data': 4, 'fsdp': 1, 'tensor': 1} | none |" in proc.stdout


def _check_profile_step(proc, out):
    assert _floats(r"(\d+) ms/step untraced", proc.stdout), proc.stdout
    assert _floats(r"traced: (\d+) ms/step; thunk time (\d+) ms/step", proc.stdout), proc.stdout
    ops = re.findall(r"(?m)^ +([\d.]+) +([\d.]+)% +\d+  (\S+)$", proc.stdout)
    # (At the smoke shape the optimizer's elementwise ops, with the non-finite policy's select,
    # can outrank the tiny matmuls, so no particular op is required among the top ten.)
    assert 1 <= len(ops) <= 10 and all(float(ms) >= 0 for ms, *_ in ops), proc.stdout
    assert 0 < sum(float(share) for _, share, _ in ops) <= 100.5, ops  # the top ops' shares
    assert list((out / "trace").glob("**/*.xplane.pb")), "no trace written"


def _check_recipe_e2e(proc, out):
    r = json.loads((out / "e2e.json").read_text())
    assert [row["side"] for row in r["rows"]] == ["gptjax", "torch"], r["rows"]
    for row in r["rows"]:  # 20 iterations of char-level Shakespeare: from ln(65) = 4.17 down
        assert _positive(row["wall_s"]) and 2.0 < row["val_loss"] < 4.17, row
    assert re.search(r"gptjax speed = [\d.]+x the torch loop's", proc.stdout), proc.stdout


def _check_scaling_sweep(proc, out):
    r = json.loads((out / "scaling.json").read_text())
    assert [p["width"] for p in r["points"]] == [16, 32]
    assert all(_positive(p["val_loss_mean"]) for p in r["points"]), r["points"]
    assert math.isfinite(r["fit"]["alpha"]) and _positive(r["fit"]["n_c"]), r["fit"]
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_serve_load(proc, out):
    r = json.loads((out / "serve_load.json").read_text())
    for kind in ("static", "continuous", "hf"):
        b = r[kind]["throughput"]
        assert _positive(b["tok_s"]) and b["requests"] > 0 and b["failed"] == 0, r[kind]
    for kind in ("static", "continuous"):
        assert r[kind]["compilations_after_warmup"] == 0
        for ph in ("latency", "latency-nolong"):
            assert r[kind][ph]["short"]["failed"] == 0 and _positive(
                r[kind][ph]["short"]["e2e_p95"]), r[kind][ph]


def _check_step_faults(proc, out):
    blocks = _floats(r"faults/step +([\d,]+) +ms/step +([\d.]+) +RSS +([\d,]+) MB", proc.stdout)
    assert len(blocks) == 2 and all(_positive(ms) and _positive(rss) for _, ms, rss in blocks), \
        proc.stdout


def _check_train_throughput(proc, out):
    (row,) = json.loads((out / "train_throughput.json").read_text())["rows"]
    assert row["shape"] == "tiny_smoke" and not row["skipped"], row
    assert {"gptjax", "hf", "nano"} <= set(row["runners"]), row["runners"].keys()
    for r in row["runners"].values():
        assert _positive(r["tok_s"]) and _positive(r["mfu_measured"]), r


def _check_data_throughput(proc, out):
    rows = json.load(open(out / "data.json"))
    assert [r["setup"] for r in rows] == ["today", "sharded-1p-2w", "mixture"], rows
    # Both pipelines tokenize the whole corpus: the same tokens, but for the end-of-text tokens
    # joining documents across shard boundaries (the --smoke run has 64 shards: 63 joins).
    assert rows[0]["tokens"] - rows[1]["tokens"] == 63 and rows[1]["tokens"] > 100_000, rows
    # The mixture's two halves (even and odd documents) lack only the one join between them.
    assert rows[0]["tokens"] - rows[2]["tokens"] == 1, rows
    assert all(_positive(r["tok_per_s"]) and r["maxrss_mb"] > 0 for r in rows), rows
    # The single-file setups also served batches (one corpus, then the mixture of two).
    assert _positive(rows[0]["batch_tok_per_s"]) and _positive(rows[2]["batch_tok_per_s"]), rows
    assert rows[1]["batch_tok_per_s"] is None, rows


# script -> (its flags beyond --smoke, given (tmp_path, shared data folder or None), its check)
def _check_goodput_chain(proc, out):
    r = json.loads((out / "chain.json").read_text())
    assert [a["status"] for a in r["attempts"]] == ["preempted", "done"], r
    for a in r["attempts"] + [r["run"]]:
        assert a["buckets_s"] == pytest.approx(a["ledger_s"], rel=1e-6), a  # one clock
        # The ledger runs inside the measured process: never longer, and most of it.
        assert 0.85 * a["measured_s"] <= a["ledger_s"] <= a["measured_s"], a
    assert "goodput " in proc.stdout and "covered" in proc.stdout


def _check_layer_stats(proc, out):
    (row,) = json.loads((out / "layer_stats.json").read_text())["rows"]
    assert row["shape"] == "tiny_smoke" and len(row["ratios"]) == 1, row
    assert _positive(row["plain_step_s"]) and _positive(row["stats_step_s"]), row
    assert _positive(row["ratio"]) and "stats / plain" in proc.stdout


SMOKE_RUNS = {
    "attention.py": (lambda out, data: ["--out", str(out / "attention.json")], _check_attention),
    "data_throughput.py": (lambda out, data: ["--json", str(out / "data.json"), "--shared",
                                              str(data)], _check_data_throughput),
    "decode.py": (lambda out, data: ["--json", str(out / "decode.json")], _check_decode),
    "finetune_sst2.py": (lambda out, data: ["--workdir", str(out), "--shared", str(data)],
                         _check_finetune_sst2),
    # (data is None in test_readme_commands' check of the flags' names)
    "finetune_lm.py": (lambda out, data: ["--workdir", str(out), "--data", str(
                           data / "tinyshakespeare" / "input.txt") if data else ""],
                       _check_finetune_lm),
    "goodput_chain.py": (lambda out, data: ["--json", str(out / "chain.json")],
                         _check_goodput_chain),
    "layer_stats.py": (lambda out, data: ["--json", str(out / "layer_stats.json")],
                       _check_layer_stats),
    "gpu_fits.py": (lambda out, data: ["--out", str(out / "fits.json")], _check_gpu_fits),
    "pod_compile.py": (lambda out, data: ["--out", str(out / "pods.json")], _check_pod_compile),
    "profile_step.py": (lambda out, data: ["--out", str(out / "trace")], _check_profile_step),
    "recipe_e2e.py": (lambda out, data: ["--json", str(out / "e2e.json"), "--data",
                                         str(data / "tinyshakespeare" / "input.txt")],
                      _check_recipe_e2e),
    "scaling_sweep.py": (lambda out, data: ["--out", str(out), "--data",
                                            str(data / "tinyshakespeare" / "input.txt")],
                         _check_scaling_sweep),
    "serve_load.py": (lambda out, data: ["--json", str(out / "serve_load.json")],
                      _check_serve_load),
    "step_faults.py": (lambda out, data: [], _check_step_faults),
    "train_throughput.py": (lambda out, data: ["--json", str(out / "train_throughput.json")],
                            _check_train_throughput),
}
NEEDS_SHARED_DATA = {"data_throughput.py", "finetune_lm.py", "finetune_sst2.py", "recipe_e2e.py",
                     "scaling_sweep.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_bench_script_smoke(script, tmp_path, request):
    """Each script runs its full code path at tiny sizes; a new script must add --smoke here."""
    if script == "step_faults.py" and not _IS_GLIBC_LINUX:
        pytest.skip("step_faults.py reads /proc/self/statm and sets glibc's malloc options")
    if script == "gpu_fits.py" and importlib.util.find_spec("jax_cuda12_plugin") is None:
        pytest.skip('gpu_fits.py needs the CUDA plugin: pip install -e ".[gpu-aot]" (CI has it)')
    data = request.getfixturevalue("shared_data") if script in NEEDS_SHARED_DATA else None
    flags, check = SMOKE_RUNS.get(script, (lambda out, data: [], None))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke",
                           *flags(tmp_path, data)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert check is not None, (f"bench/{script} runs with --smoke: add its flags and a check of "
                               "its output to SMOKE_RUNS in tests/test_bench.py")
    check(proc, tmp_path)
