"""Every command in the README's ```bash blocks runs as written, in the README's order, each after
the ones before it (issue 23): a README command that fails for a new user fails here.

The commands are read from README.md, so a command added there is run here without editing this
file. They run in a scratch copy of the repository's layout (symlinks to its files, `../shared`
pointing at the shared data), so `runs/...` and `path/to/gpt2` are the test's own. What is changed:

- `pip install -e .` is skipped and PYTHONPATH names the scratch root instead;
- long runs get the quick variants the README itself shows next to them (`QUICK`; a test checks
  that each one appears in README.md), appended so they override the command's own values;
- placeholder inputs are made first: `path/to/gpt2` is a small transformers GPT-2 directory with
  GPT-2's real BPE files, `prompts.txt` a two-line prompt file, `qa.jsonl` 40 prompt/completion
  rows;
- optional flags written `[--flag ...]` are left out (the README's notation, not shell syntax);
- `python serve.py ...` is started in the background, probed with the README's own httpx client
  example, and stopped with Ctrl-C (SIGINT); its port is a free one, not 8000;
- the commands in `SKIP` are not run; each entry says why, and a test checks each still matches a
  README command (a stale entry fails).
- the bench commands in `BENCH_RUNS` run in tests/test_bench.py (the same command with --smoke,
  its output checked there), not twice; a test checks they are still the same command.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, hf_gpt2_dir, shared_data_dir, shared_tfds_dir

# Command prefixes not run, and why. Keep this list short: a new entry needs a reason a user
# would accept for a command the README tells them to run.
SKIP = {
    # The environment under test is already installed; installing again needs the network.
    "pip install": "installs the package (already installed here; needs PyPI)",
    # The suite itself; CI runs it as its own step, and a test that starts it would recurse.
    "python -m pytest": "the test suite itself",
    # A 16-process job whose coordinator is 10.0.0.1: needs 16 hosts on that network.
    "python train.py --coordinator_address=": "multi-host: 16 processes on a cluster",
    # JAX's cluster auto-detection: needs a TPU pod, SLURM or Open MPI job around it.
    "GPTJAX_DISTRIBUTED=1": "multi-host: JAX detects the cluster (TPU pod / SLURM / Open MPI)",
    # cuDNN and the Pallas kernel need an NVIDIA GPU; CI is CPU-only (the same bench script runs
    # on CPU through the two commands before it in the README).
    "python bench/attention.py --dtype bfloat16 --impls xla cudnn": "GPU-only kernels",
    # Data the user supplies (LAMBADA, CBT, CoQA, ... are not in ../shared) and lm-eval tasks
    # that lm-eval downloads from the Hugging Face hub; tests/test_zeroshot_gpt2.py and
    # tests/test_lm_harness.py run the same code paths on files they write.
    "python eval.py --mode=zeroshot --hf_dir": "user-supplied GPT-2 zero-shot data",
    "python eval.py --mode=lm_eval": "lm-eval tasks from the Hugging Face hub",
    # lm-eval's client against a server the user started, on hellaswag from the hub;
    # tests/test_serve_logprobs.py runs local-completions against serve.py on a local task.
    "lm_eval --model local-completions": "a running serve.py and hellaswag from the Hugging Face hub",
}

# Long runs -> the quick variant the README shows for them (regex on the command, flags
# appended; later flags win for absl and ml_collections).
QUICK = [
    (r"^python train\.py(?!.*--dry_run)", "--config.train.steps=60"),
    (r"^python finetune\.py (?!.*--mode=zero_shot)",
     "--config.train.max_steps=20 --config.task.train_examples=640 --config.task.eval_examples=128 "
     "--config.train.length_bucket=128"),
    (r"^python finetune\.py .*--mode=zero_shot", "--config.zero_shot.max_examples=128"),
    (r"^python eval\.py .*--text ", "--max_chars 20000"),
    (r"^python eval\.py --mode=fewshot", "--num_examples 16"),
    (r"^python eval\.py --mode=zeroshot", "--num_examples 16"),
    (r"^python bench/", "--smoke"),
    (r"^python train\.py .*--dry_run", "--config.model.n_layer=2"),
    # nanoGPT's finetuning recipe accumulates 32 x 1024 tokens per step: 4 steps of 4 x 1024
    (r"^python train\.py --config configs/finetune_shakespeare\.py (?!.*--dry_run)",
     "--config.train.steps=4 --config.train.batch_size=4 --config.train.accum_steps=4"),
]

# README commands that tests/test_bench.py's test_bench_script_smoke runs as written (the same
# flags, with --smoke; its output file in its own folder) and checks the output of: run there, not
# a second time here (a test below checks that they stay the same command).
BENCH_RUNS = {
    "python bench/attention.py --out attn.json": "attention.py",
    "python bench/pod_compile.py --out pods.json": "pod_compile.py",
    "python bench/finetune_lm.py --workdir runs/bench_finetune_lm "
    "--data ../shared/data/tinyshakespeare/input.txt": "finetune_lm.py",
}

CLIENT_MARKER = 'httpx.Client(base_url="http://127.0.0.1:8000"'


# ------------------------------------------------------------------------------- README parsing
def strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote and line[i - 1] != "\\":
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(readme: str) -> list:
    """The commands of every ```bash block, in order: continuation lines joined, comments and
    optional `[...]` flags removed, `a && b` split into its commands."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", readme, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s\[[^\]]*\]", "", strip_comment(line)).strip()
            out.extend(part.strip() for part in line.split(" && ") if part.strip())
    return out


def skip_reason(cmd: str):
    return next((why for prefix, why in SKIP.items() if cmd.startswith(prefix)), None)


def quick(cmd: str) -> str:
    for pattern, extra in QUICK:
        if re.search(pattern, cmd):
            if "|" in cmd.split("python", 1)[0]:
                raise AssertionError(f"cannot append to a piped command: {cmd}")
            cmd = f"{cmd} {extra}"
    return cmd


def _readme() -> str:
    return (REPO / "README.md").read_text()


# ------------------------------------------------------------------------- fast checks (no runs)
def test_readme_commands_are_parsed():
    cmds = readme_commands(_readme())
    assert "python train.py" in cmds  # the first block's `pip install -e . && python train.py`
    assert any(c.startswith("echo \"ROMEO:\" | python sample.py") for c in cmds)
    assert not any("#" in c.split("$'")[0] or c.endswith("\\") or "[--" in c for c in cmds), cmds
    assert strip_comment("a --x '#b' \"c # d\"  # note") == "a --x '#b' \"c # d\""


def test_skips_are_few_and_still_match_a_readme_command():
    cmds = readme_commands(_readme())
    assert len(SKIP) <= 8
    for prefix in SKIP:
        assert any(c.startswith(prefix) for c in cmds), f"stale SKIP entry {prefix!r}"
    run = [c for c in cmds if not skip_reason(c)]
    assert len(run) >= 15, run


def test_quick_variants_are_the_readme_s_own():
    readme = " ".join(_readme().split())
    for _, extra in QUICK:
        assert extra in readme, f"the README does not show the quick variant {extra!r}"
    cmds = readme_commands(_readme())
    for pattern, _ in QUICK:
        assert any(re.search(pattern, c) for c in cmds), f"QUICK pattern {pattern!r} is stale"


def test_bench_runs_are_test_bench_s_commands():
    from test_bench import SMOKE_RUNS  # the flags test_bench_script_smoke gives each script

    cmds = readme_commands(_readme())
    for cmd, script in BENCH_RUNS.items():
        assert cmd in cmds, f"stale BENCH_RUNS entry {cmd!r}"
        assert quick(cmd).split()[:2] == ["python", f"bench/{script}"] and "--smoke" in quick(cmd)
        flags = SMOKE_RUNS[script][0](REPO / "out", None)
        assert [a for a in cmd.split()[2:] if a.startswith("--")] == [
            a for a in flags if a.startswith("--")], (cmd, flags)


# ------------------------------------------------------------------------------------ the run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_root(tmp_path):
    """A scratch copy of the repository's layout, with the README's placeholder inputs."""
    root = tmp_path / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("runs", ".git") and not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data").symlink_to(shared_data_dir())
    (shared / "tfds").symlink_to(shared_tfds_dir())
    hf_gpt2_dir(root / "path" / "to" / "gpt2", 1024)
    (root / "prompts.txt").write_text("Hello, my name is\nThe meaning of life is\n")
    (root / "qa.jsonl").write_text("".join(  # prompt/completion rows (data.dataset)
        json.dumps({"prompt": f"Q: what is {a} plus {b}?\nA:", "completion": f" {a + b}"}) + "\n"
        for a in range(8) for b in range(5)))
    return root


def _client_example(port: int) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", _readme(), re.S | re.M)
    code = next(b for b in blocks if CLIENT_MARKER in b)
    return code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")


def _serve(cmd: str, root, env, log) -> None:
    """Start the server, wait for /health, run the README's client against it, stop it."""
    import httpx  # optional: the test dependency the README's client example uses
    port = _free_port()
    cmd = re.sub(r"--port \d+", f"--port {port}", cmd)
    cmd = cmd if f"--port {port}" in cmd else f"{cmd} --port {port}"
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"{cmd}: exited with {proc.returncode} before serving"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, f"{cmd}: not healthy after 300 s"
            time.sleep(0.5)
        code = _client_example(port)
        subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True,
                       timeout=300, stdout=log, stderr=subprocess.STDOUT)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, f"{cmd}: exit status {proc.returncode} after Ctrl-C"


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    if not shared_data_dir().is_dir() or not shared_tfds_dir().is_dir():
        pytest.skip("the README's commands read ../shared/data and ../shared/tfds")
    root = _make_root(tmp_path)
    # PYTHONPATH stands in for the skipped `pip install -e .` (bench/ scripts import gptjax).
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(root)] + os.environ.get("PYTHONPATH", "").split(
                   os.pathsep)).rstrip(os.pathsep))
    times = []
    for cmd in readme_commands(_readme()):
        if skip_reason(cmd) or cmd in BENCH_RUNS:
            continue
        cmd = quick(cmd)
        t0 = time.time()
        with open(tmp_path / "log.txt", "w") as log:
            log.write(f"$ {cmd}\n")
            log.flush()
            if cmd.startswith("python serve.py"):
                _serve(cmd, root, env, log)
                rc = 0
            else:
                rc = subprocess.run(["bash", "-c", cmd], cwd=root, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=900).returncode
        out = (tmp_path / "log.txt").read_text()
        times.append(f"{time.time() - t0:6.1f}s  {cmd}")
        with open(tmp_path / "times.txt", "a") as fh:
            fh.write(times[-1] + "\n")
        assert rc == 0, f"README command failed (exit {rc}):\n$ {cmd}\n{out[-3000:]}"
        assert "Traceback" not in out, f"README command printed a traceback:\n$ {cmd}\n{out[-3000:]}"
    print("\n".join(times))
