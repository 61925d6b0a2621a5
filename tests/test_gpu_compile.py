"""Compiling for NVIDIA GPUs this host does not have (XLA's GPU compiler, cuDNN and Triton).

The CUDA plugin (the `gpu-aot` extra) compiles for a deviceless H100 (sm_90) or A100 (sm_80)
described by gptjax/train/gpu_specs; the host stays on CPU (JAX_PLATFORMS=cpu) and
gptjax.train.gpus skips the plugin's driver check. Each test asserts what the compiled HLO must
contain (the cuDNN attention custom calls, the Pallas kernels lowered to Triton, the collectives
of the sharded step), so a silent fallback to XLA's attention fails. CI installs the extra and
fails when it is missing (.ci/run); without it these skip and say how to install it.
"""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import REPO
from gptjax.config import GPTConfig
from gptjax.defaults import base_config, complete, model_config
from gptjax.inference.decoding import decode_step
from gptjax.nn.model import init_cache, init_params
from gptjax.train import gpus
from gptjax.train import topology as topo
from gptjax.train.experiment import model_config_from
from gptjax.train.memory import dry_run
from gptjax.train.setup import Setup

pytestmark = pytest.mark.skipif(
    not gpus.cuda_plugin_available(),
    reason='the CUDA plugin is not installed: pip install -e ".[gpu-aot]" (CI installs it)')

SEQ, WINDOW = 256, 64
GPUS = ["h100", "a100-80gb"]  # sm_90, sm_80


def _config(impl, mesh=(1, 1, 1), batch=8):
    """Two bf16 layers, GPT-3's pattern: one dense (causal) and one banded (local) layer."""
    c = base_config()
    c.model = model_config("tiny", vocab_size=512, n_layer=2, n_head=2, n_embd=128, n_ctx=SEQ,
                           attention_impl=impl, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                           dtype="bfloat16", attention_pattern=("dense", "local"),
                           local_window=WINDOW)
    c.train.batch_size = batch
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return complete(c, base_config())


def _train_step_hlo(gpu, impl, mesh=(1, 1, 1), batch=8):
    config = _config(impl, mesh, batch)
    setup = Setup(config, model_config_from(config), config.train.steps,
                  devices=gpus.gpu_devices(gpu))
    res = topo.compile_step(setup, batch, SEQ)
    assert "error" not in res, res.get("error")
    return setup, res["compiled"].as_text()


def _calls(hlo, target):
    return hlo.count(f'custom_call_target="{target}"')


def _check_cudnn(hlo):
    # Forward and backward of both layers; the banded layer as cuDNN's sliding window.
    assert _calls(hlo, "__cudnn$fmhaSoftmax") == 2, "cuDNN forward missing: XLA attention ran"
    assert _calls(hlo, "__cudnn$fmhaSoftmaxBackward") == 2, "cuDNN backward missing"
    windows = re.findall(r'"sliding_window_length": ?(\d+)', hlo)
    assert sorted(set(windows)) == ["0", str(WINDOW)], windows
    assert '"mask_type": "CAUSAL"' in hlo or '"mask_type":"CAUSAL"' in hlo


@pytest.mark.parametrize("gpu", GPUS)
def test_cudnn_train_step_compiles(gpu):
    setup, hlo = _train_step_hlo(gpu, "cudnn")
    assert setup.mesh.devices.flat[0].platform == "gpu"
    assert setup.mesh.devices.flat[0].device_kind == {
        "h100": "NVIDIA H100 80GB HBM3", "a100-80gb": "NVIDIA A100-SXM4-80GB"}[gpu]
    _check_cudnn(hlo)


@pytest.mark.parametrize("gpu", GPUS)
def test_pallas_train_step_runs_triton_kernels(gpu):
    _, hlo = _train_step_hlo(gpu, "pallas")
    assert "fmha" not in hlo
    kernels = re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton"[^\n]*?op_name="([^"]+)"',
                         hlo)
    names = sorted({re.sub(r".*/(h_\d+)/attn/(gptjax_flash_\w+)/pallas_call", r"\1 \2", k)
                    for k in kernels})
    assert names == [f"h_{i} gptjax_flash_{k}" for i in (0, 1) for k in ("dkdv", "dq", "fwd")], (
        names)


def test_auto_picks_cudnn_on_a_cuda_mesh():
    _, hlo = _train_step_hlo("h100", "auto")
    _check_cudnn(hlo)


@pytest.mark.parametrize("gpu", GPUS)
def test_pallas_decode_step_compiles(gpu):
    cfg = GPTConfig(vocab_size=512, n_ctx=SEQ, n_embd=128, n_layer=2, n_head=2, dtype="bfloat16",
                    attention_impl="pallas", attention_pattern=("dense", "local"),
                    local_window=WINDOW, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    mesh = Mesh(np.asarray(gpus.gpu_devices(gpu)), ("data",))
    repl = NamedSharding(mesh, P())

    def abstract(tree):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), tree)

    params = abstract(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    cache = abstract(jax.eval_shape(lambda: init_cache(cfg, 4, SEQ)))
    tokens = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=repl)
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda p, t, pos, c: decode_step(cfg, p, t, pos, c)).lower(
            params, tokens, tokens, cache).compile().as_text()
    kernels = re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton"[^\n]*?op_name="([^"]+)"',
                         hlo)
    assert sorted(re.search(r"(h_\d+)/attn/", k).group(1) for k in kernels) == ["h_0", "h_1"]
    # The kernel attends over the cache: the step writes its key/value into the cache
    # (DenseView's dynamic-update-slice) and the attention is the flash kernel's forward.
    assert all("/attn/gptjax_flash_fwd" in k for k in kernels), kernels
    assert "dynamic-update-slice" in hlo or "dynamic_update_slice" in hlo


@pytest.mark.parametrize("gpu", GPUS)
def test_fsdp_step_on_an_8_gpu_node(gpu):
    setup, hlo = _train_step_hlo(f"{gpu}:8", "cudnn", mesh=(1, 8, 1), batch=16)
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert "all-gather" in hlo, "fsdp parameters are not gathered"
    assert "reduce-scatter" in hlo or "all-reduce" in hlo, "gradients are not reduced"
    _check_cudnn(hlo)
    assert jax.default_backend() == "cpu"  # the host itself stays on CPU


def test_dry_run_reports_fits_per_device():
    lines = dry_run(_config("cudnn"), "unused", topology="h100").splitlines()
    assert any("JAX's allocator gets 75% of it" in ln for ln in lines), lines
    assert any("at 40% MFU (989 TFLOP/s bf16 per device)" in ln for ln in lines), lines
    assert re.fullmatch(r"fits: yes \(\d+\.\d\d GiB of 59\.36 GiB per device\)", lines[-1]), (
        lines[-1])


def test_dry_run_too_big_does_not_fit_an_l4():
    c = _config("xla")
    # ~1.6B fp32 parameters: with Adam's two moments 19 GiB of state before any activation.
    c.model.n_embd, c.model.n_head, c.model.dtype = 8192, 32, "float32"
    last = dry_run(c, "unused", topology="l4").splitlines()[-1]
    assert re.fullmatch(r"fits: no \(\d+\.\d\d GiB needed, 16\.87 GiB per device\)", last), last


def test_unknown_gpu_name_is_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--dry_run", "--topology",
                           "h1000", "--workdir", "unused"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--topology 'h1000': known GPUs are h100, h200, a100-40gb, " \
        "a100-80gb, l4, rtx4090" in err[0], proc.stderr


def test_without_the_plugin_says_how_to_install(monkeypatch):
    monkeypatch.setattr("gptjax.train.memory.cuda_plugin_available", lambda: False)
    assert dry_run(_config("cudnn"), "unused", topology="h100") == gpus.GPU_INSTALL_HINT
    assert 'pip install -e ".[gpu-aot]"' in gpus.GPU_INSTALL_HINT


def test_finetune_dry_run_for_an_8_gpu_node(tmp_path):
    import json  # local: only this test writes a config.json
    from gptjax.defaults import finetune_config  # local: finetuning configs only here
    from gptjax.finetune import finetune_dry_run  # local: finetuning configs only here
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 500, "n_positions": 64, "n_embd": 64, "n_layer": 2,
        "n_head": 4, "activation_function": "gelu_new"}))
    c = finetune_config("sst2", "")
    c.init.kind, c.init.path = "hf", str(tmp_path)
    c.train.batch_size = 8
    out = finetune_dry_run(c, "a100-40gb:8").splitlines()
    assert "data parallel over 8 gpu device(s)" in out[0], out[0]
    assert any("8 NVIDIA A100-SXM4-40GB devices" in ln for ln in out), out
    assert re.fullmatch(r"fits: yes \(\d+\.\d\d GiB of 29\.57 GiB per device\)", out[-1]), out[-1]


def test_finetune_dry_run_lora_needs_less_than_full(tmp_path):
    """finetune.py --dry_run --topology rtx4090 for full finetuning and for LoRA: the LoRA state
    (frozen base + adapters, task-token deltas, head and their Adam moments) is smaller."""
    import json  # local: only the finetuning dry-run tests write a config.json
    from gptjax.defaults import finetune_config  # local: finetuning configs only here
    from gptjax.finetune import finetune_dry_run  # local: finetuning configs only here
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 500, "n_positions": 64, "n_embd": 64, "n_layer": 2,
        "n_head": 4, "activation_function": "gelu_new"}))
    args = {}
    for rank in (0, 8):
        c = finetune_config("sst2", "")
        c.init.kind, c.init.path = "hf", str(tmp_path)
        c.train.batch_size, c.lora.rank, c.lora.base_weights = 8, rank, "bf16"
        out = finetune_dry_run(c, "rtx4090").splitlines()
        assert out[1].startswith("LoRA rank 8" if rank else "full finetuning"), out[1]
        assert out[-1].startswith("fits: yes"), out[-1]
        (m,) = [re.search(r"arguments \(params \+ optimizer state \+ batch\) ([\d.]+) MiB", ln)
                for ln in out if "arguments (" in ln]
        args[rank] = float(m.group(1))
    # Full: 136,514 fp32 parameters + 2 moments (1.56 MiB); LoRA: a bf16 base (0.26 MiB) and
    # 4,418 trainable numbers with their moments.
    assert args[8] < 0.5 * args[0] and args[0] > 1.5, args
