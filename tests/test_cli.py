"""The entry scripts end to end: train.py then sample.py on a tiny run, and one-line errors."""

import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

ENV = subprocess_env()


def _run(args, **kw):
    return subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=ENV, **kw)


@pytest.fixture(scope="module")
def tiny_workdir(tiny_run):
    """conftest's tiny run (train.py, then its sample of "to be")."""
    wd, stdout = tiny_run
    assert "---------- sample ----------" in stdout and "to be" in stdout
    # gptjax's own corpus builder downloads nothing, and says so (not tfds's "Unknown size").
    assert "Unknown size" not in stdout and "nothing to download" in stdout
    return wd


def test_sample_from_prompt_file_and_stdin(tiny_workdir, tmp_path):
    r = _run(["sample.py", f"--workdir={tiny_workdir}", "--prompt=to be", "--max_new_tokens=10",
              "--temperature=0"])
    assert r.returncode == 0, r.stderr[-2000:]
    greedy = r.stdout
    assert greedy.startswith("to be") and len(greedy.rstrip("\n")) == len("to be") + 10
    again = _run(["sample.py", f"--workdir={tiny_workdir}", "--prompt=to be",
                  "--max_new_tokens=10", "--temperature=0"]).stdout
    assert again == greedy  # deterministic
    (tmp_path / "prompts.txt").write_text("to be\nnot to\n")
    r = _run(["sample.py", f"--workdir={tiny_workdir}", f"--prompt_file={tmp_path / 'prompts.txt'}",
              "--max_new_tokens=5", "--num_samples=2"])
    assert r.returncode == 0 and r.stdout.count("-" * 40) == 4
    r = _run(["sample.py", f"--workdir={tiny_workdir}", "--max_new_tokens=5", "--num_beams=2"],
             input="not to")
    assert r.returncode == 0 and r.stdout.startswith("not to"), r.stderr[-2000:]


@pytest.mark.parametrize("flag, message", [
    ("--top_p=0", "top_p=0"), ("--temperature=-1", "temperature=-1"), ("--top_k=-3", "top_k=-3"),
    ("--num_beams=0", "num_beams=0"), ("--prompt=" + "to be " * 7, "no room left"),
])
def test_sample_bad_flags_are_one_line(tiny_workdir, flag, message):
    r = _run(["sample.py", f"--workdir={tiny_workdir}", "--prompt=to be", flag])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert r.stdout == ""  # checked before the prompt is echoed (issue 23)


def test_sample_clips_max_new_tokens_to_the_context(tiny_workdir):
    # README: --max_new_tokens 200 on models with n_ctx 64 / 128; here n_ctx=32, prompt 5 chars.
    r = _run(["sample.py", f"--workdir={tiny_workdir}", "--prompt=to be", "--max_new_tokens=100",
              "--temperature=0"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: --max_new_tokens=100 clipped to 27" in r.stderr and "n_ctx=32" in r.stderr
    assert r.stdout.startswith("to be") and len(r.stdout.rstrip("\n")) == len("to be") + 27


def test_config_suffix_errors_and_help():
    r = _run(["train.py", "--config", "configs/gpt3.py:gpt3-huge", "--dry_run"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config=configs/gpt3.py:gpt3-huge: "
                                                   "size='gpt3-huge': allowed values are ["), lines
    assert "gpt3-small" in lines[0] and "Traceback" not in r.stderr
    r = _run(["train.py", "--help"])
    # absl's --help exits with status 1; the config flag is defined in gptjax.cli, not train.py
    assert "  --config: Experiment config file" in r.stdout, r.stdout[-2000:]


def test_sample_without_checkpoint(tmp_path):
    r = _run(["sample.py", f"--workdir={tmp_path}"])
    assert r.returncode == 2 and r.stderr.strip().startswith("error:")
    assert "config.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
