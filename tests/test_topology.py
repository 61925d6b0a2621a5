"""Compiling the train step for TPU slices this host does not have (needs libtpu, not a TPU).

CI installs the `tpu` extra, so these run there; without libtpu they skip and say how to install it.
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from gptjax.defaults import base_config, complete, model_config
from gptjax.train import topology as topo
from gptjax.train.experiment import model_config_from
from gptjax.train.memory import dry_run
from gptjax.train.setup import Setup

needs_libtpu = pytest.mark.skipif(
    not topo.libtpu_available(),
    reason='libtpu is not installed: pip install -e ".[tpu]" (CI installs it)')


def _config(mesh=(1, 2, 2), attention_impl="xla", n_embd=128, n_head=4, seq=128, layers=2):
    c = base_config()
    c.model = model_config("tiny", vocab_size=512, n_layer=layers, n_head=n_head, n_embd=n_embd,
                           n_ctx=seq, attention_impl=attention_impl, embd_pdrop=0.0,
                           attn_pdrop=0.0, resid_pdrop=0.0)
    c.train.batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return complete(c, base_config())


def _compile(config, topology="v5e:2x2", num_slices=1):
    topo.dcn_for_slices(config, num_slices)
    devices = topo.topology_devices(topology, num_slices)
    model_cfg = model_config_from(config)
    setup = Setup(config, model_cfg, config.train.steps, devices=devices)
    res = topo.compile_step(setup, config.train.batch_size, model_cfg.n_ctx)
    return setup, res


@needs_libtpu
@pytest.mark.parametrize("mesh", [(1, 2, 2), (4, 1, 1)], ids=["fsdp_x_tensor", "data"])
def test_xla_step_compiles_for_v5e_2x2(mesh):
    setup, res = _compile(_config(mesh))
    assert "error" not in res, res.get("error")
    assert setup.mesh.devices.flat[0].platform == "tpu" and setup.mesh.size == 4
    assert res["compiled"].memory_analysis().argument_size_in_bytes > 0


@needs_libtpu
def test_multi_slice_report_fits():
    config = _config((1, 4, 1))
    setup, _ = _compile(config, num_slices=2)  # dcn data=2 x ici fsdp=4
    assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    lines = topo.topology_report(setup, "v5e:2x2", 2, config.train.batch_size, 128)
    assert lines[-1].startswith("fits: yes (") and lines[-1].endswith(" GiB of 16.00 GiB per chip)")
    assert any("at 40% MFU" in ln for ln in lines) and any("analytic" in ln for ln in lines)


@needs_libtpu
def test_too_big_config_reports_xla_out_of_memory():
    # ~1.6B fp32 parameters replicated on each of 4 v5e chips (16 GiB each): cannot fit.
    out = dry_run(_config((4, 1, 1), n_embd=8192, n_head=32), "unused", topology="v5e:2x2")
    last = out.splitlines()[-1]
    assert last.startswith("fits: no (RESOURCE_EXHAUSTED"), last


@needs_libtpu
@pytest.mark.parametrize("impl", ["splash", "auto"])
@pytest.mark.parametrize("mesh", [(1, 2, 2), (4, 1, 1)], ids=["fsdp_x_tensor", "data"])
def test_fused_attention_compiles_for_tpu(impl, mesh):
    # Depends on splash under shard_map and dispatch by the mesh's platform (issue 21 item 1).
    _, res = _compile(_config(mesh, attention_impl=impl, n_embd=256, n_head=2, seq=256, layers=1))
    assert "error" not in res, res.get("error")
    assert "tpu_custom_call" in res["compiled"].as_text(), f"{impl} did not run the splash kernel"


@needs_libtpu
def test_dry_run_cli_prints_fits_line(tmp_path):
    # The parent process holds libtpu (and its lockfile) after the tests above.
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--dry_run", "--topology", "v5e:2x2",
         "--workdir", str(tmp_path), "--config.model.vocab_size=512",
         "--config.model.attention_impl=xla"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("fits: yes ("), proc.stdout[-2000:]


def test_without_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr("gptjax.train.memory.libtpu_available", lambda: False)
    assert dry_run(_config(), "unused", topology="v5e:2x2") == topo.INSTALL_HINT
    assert 'pip install -e ".[tpu]"' in topo.INSTALL_HINT


def _tiny_hf_dir(path, n_embd=64, n_layer=2, n_ctx=64):
    """A transformers GPT-2 config.json only: the finetuning dry run reads no weights."""
    import json  # local: only these tests write one
    (path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 500, "n_positions": n_ctx, "n_embd": n_embd,
        "n_layer": n_layer, "n_head": 4, "activation_function": "gelu_new"}))
    return path


@needs_libtpu
@pytest.mark.parametrize("task,k", [("sst2", 1), ("story_cloze", 2)])
def test_finetune_dry_run_compiles_for_tpu(tmp_path, task, k):
    from gptjax.defaults import finetune_config  # local: finetuning configs only here
    from gptjax.finetune import finetune_dry_run  # local: finetuning configs only here
    c = finetune_config(task, "")
    c.init.kind, c.init.path = "hf", str(_tiny_hf_dir(tmp_path))
    c.train.batch_size = 8
    out = finetune_dry_run(c, "v5e:2x2").splitlines()
    assert f"batch 8 examples x {k} sequence(s) x 64 tokens" in out[0], out[0]
    assert "data parallel over 4 tpu device(s)" in out[0]
    assert out[-1].startswith("fits: yes (") and out[-1].endswith("GiB of 16.00 GiB per chip)")
    big = _tiny_hf_dir(tmp_path, n_embd=8192, n_layer=4, n_ctx=64)  # ~3.2B parameters, fp32
    c.init.path = str(big)
    assert finetune_dry_run(c, "v5e:2x2").splitlines()[-1].startswith(
        "fits: no (RESOURCE_EXHAUSTED")


@needs_libtpu
def test_finetune_dry_run_cli(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, str(REPO / "finetune.py"), "--config",
            str(REPO / "configs/finetune/sst2.py"), "--dry_run", "--config.init.kind=hf",
            f"--config.init.path={_tiny_hf_dir(tmp_path)}"]
    proc = subprocess.run(base + ["--topology", "v5e:2x2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("fits: yes ("), proc.stdout[-2000:]
    bad = subprocess.run(base + ["--config.train.batch_size=6", "--topology", "v5e:2x2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    err = bad.stderr.strip().splitlines()[-1]
    assert err.startswith("error: train.batch_size=6 does not split over 4 devices"), err
