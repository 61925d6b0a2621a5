"""bench/device_check.sh --smoke runs end to end on CPU and writes its JSON and markdown summary;
bench/step_faults.py measures a kept step buffer at 0 faults and rejects an unknown setting."""

import json
import math
import os
import pathlib
import platform
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


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
