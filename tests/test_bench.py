"""bench/device_check.sh --smoke runs end to end on CPU and writes its JSON and markdown summary."""

import json
import math
import os
import pathlib
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
