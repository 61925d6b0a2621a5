"""Shared plumbing of the entry scripts: one-line errors, and the sample printed after training.

Every way a user can get a run wrong ends in one line on stderr, `error: <what, and what is
allowed>`, and exit status 2: a config flag naming no config key (`define_config_file`), a flag
value of the wrong type (`parse_flags`), and any user error raised while running (`run_cli`).
The scripts that load a trained model share its flags (`ModelFlags`, `define_execution_flag`).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

import jax
import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import is_config_flag

from gptjax.config import EXECUTION_FIELDS, ConfigError
from gptjax.inference import sampling
from gptjax.multihost import maybe_init_distributed
from gptjax.nn.convert import ConversionError
from gptjax.sharding import ShardingError, parse_mesh, resolve_mesh_shape
from gptjax.runs.checkpoint import CheckpointError, is_closed_loop_error

if TYPE_CHECKING:  # an annotation only: sample.py and serve.py do not load the training loop
    from gptjax.train.loop import TrainResult

# Errors a user can cause (bad config, flags, paths, data, checkpoints): one line, no traceback.
USER_ERRORS = (ConfigError, CheckpointError, ConversionError, ShardingError, ValueError,
               FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)


def quiet_libraries() -> None:
    """Keep the terminal for our progress bar: silence absl INFO logs and tfds's own bars."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        import tensorflow_datasets as tfds  # heavy: tensorflow_datasets, only to quiet its bars
        tfds.disable_progress_bar()
    except ImportError:
        pass


def fail(message: str, status: int = 2) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with `status`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(status)


def _drop_closed_loop_callbacks() -> None:
    """Keep a known Orbax/TensorStore race off the terminal.

    When a restore fails (a damaged checkpoint), Orbax's asyncio loop closes while TensorStore
    still completes the other reads in flight; their done-callbacks call
    `loop.call_soon_threadsafe` from a C++ thread and TensorStore prints the resulting
    `RuntimeError('Event loop is closed')` through `sys.excepthook` (`PyErr_Print`). That
    traceback is noise next to our one-line error, so exactly that exception is dropped (shown
    with GPTJAX_DEBUG); every other one goes to the previous hooks. The Checkpointer's restores
    already avoid it at the source (gptjax.runs.checkpoint._QuietLoop, which library users get
    too); this catches any other Orbax call that fails the same way in the entry scripts.
    """
    def closed_loop(exc_type, exc) -> bool:
        return not os.environ.get("GPTJAX_DEBUG") and is_closed_loop_error(exc)

    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        if not closed_loop(exc_type, exc):
            previous(exc_type, exc, tb)

    previous_unraisable = sys.unraisablehook

    def unraisablehook(u):
        if not closed_loop(u.exc_type, u.exc_value):
            previous_unraisable(u)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def run_cli(fn: Callable[[], None]) -> None:
    """Run `fn`; a user error prints `error: <message>` on one line and exits with status 2.

    A second Ctrl-C (the first one stops training cleanly, see gptjax.train.preemption) exits with
    status 130 and one line.
    """
    quiet_libraries()
    _drop_closed_loop_callbacks()
    try:
        fn()
    except USER_ERRORS as e:
        if os.environ.get("GPTJAX_DEBUG"):
            raise
        fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        if os.environ.get("GPTJAX_DEBUG"):
            raise
        fail("interrupted", status=130)


def exit_without_teardown() -> None:
    """Ends a finished entry script now, with status 0: runs the atexit functions (JAX's
    distributed shutdown, logging's flush), flushes stdout/stderr, then `os._exit`, skipping the
    interpreter's teardown of its modules: about 1.1-1.5 s of freeing jax, Orbax, tensorboardX
    and matplotlib on a 2-core host, after the run's goodput ledger closed. Returns (a normal
    exit follows) while a thread that the normal exit would wait for still runs."""
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread()
           for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()  # (CPython's own call at exit; os._exit skips it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------- flags
def _flag_overrides(name: str, argv: list) -> list:
    """(path, text) of every `--<name>.a.b=v` / `--<name>.a.b v` override in argv."""
    out = []
    for i, arg in enumerate(argv):
        m = re.match(rf"--{re.escape(name)}\.([\w.]+)(=.*)?$", arg)
        if m:
            text = arg if m.group(2) else " ".join(argv[i:i + 2])
            out.append((m.group(1), text))
    return out


def _load_config_file(spec: str) -> Optional[Any]:
    """`get_config()` of a config file `path[:arg]`; None if it cannot be loaded."""
    path, _, arg = spec.partition(":")
    try:
        mod_spec = importlib.util.spec_from_file_location("_gptjax_config_check", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod.get_config(arg) if arg else mod.get_config()
    except Exception:  # noqa: BLE001 - only used to word an error message
        return None


def _unknown_key_message(name: str, default: Optional[str], argv: list) -> Optional[str]:
    """Names the override whose config key does not exist, and the keys allowed there."""
    spec = default
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            spec = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            spec = argv[i + 1]
    config = _load_config_file(spec) if spec else None
    if config is None:
        return None
    for path, text in _flag_overrides(name, argv):
        node, keys = config, path.split(".")
        for depth, key in enumerate(keys):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                where = ".".join(keys[:depth]) or "the top level"
                return (f"{text}: {'.'.join(keys[:depth + 1])!r} is not a key of config "
                        f"{spec}; allowed at {where}: {sorted(fields)}")
            node = node[key]
    return None


def define_config_file(name: str, default: Optional[str], help_string: str, **kwargs):
    """`config_flags.DEFINE_config_file`, with one-line errors for bad config files and keys.

    ml_collections reads the config file and resolves every `--config.a.b` override while the
    flag is defined (at import of the entry script), so an unknown key or a missing file raises
    there, before absl's own flag-error handling exists.
    """
    try:
        holder = config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
    except Exception as e:  # noqa: BLE001 - turned into one line naming the bad value
        if os.environ.get("GPTJAX_DEBUG"):
            raise
        if isinstance(e, (KeyError, AttributeError)):
            msg = _unknown_key_message(name, default, sys.argv)
            if msg:
                fail(msg)
        fail(f"--{name}: cannot load the config: {_config_error(e)}")
    # `--help` lists the flags of the entry script only; the config flag is defined here, so it
    # is declared a key flag of the script that called us.
    _key_flag_of_caller(holder)
    return holder


def _config_error(e: BaseException) -> str:
    """The message of an error raised in a config file's get_config(), without the traceback
    ml_collections folds into it ('Error whilst parsing config file: Traceback ...')."""
    text = str(e) or type(e).__name__
    if "Traceback (most recent call last)" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def parse_flags(argv: list) -> list:
    """The `flags_parser` for `absl.app.run`: a bad flag value is one `error:` line, exit 2."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        if "Traceback (most recent call last)" in str(e):  # raised by a config's get_config()
            flag = re.match(r"flag (--\S+):", str(e))
            fail(f"{flag.group(1) if flag else 'a config flag'}: {_config_error(e)}")
        fail(f"{e}; see --helpshort")
    except Exception as e:  # noqa: BLE001 - a config file or override that does not load
        if os.environ.get("GPTJAX_DEBUG"):
            raise
        names = [n for n in flags.FLAGS if is_config_flag(flags.FLAGS[n])]
        for name in names if isinstance(e, (KeyError, AttributeError)) else ():
            msg = _unknown_key_message(name, None, argv)
            if msg:
                fail(msg)
        fail(f"bad flags ({type(e).__name__}): {str(e) or type(e).__name__}")
    # ml_collections defers a config file that fails to load to the first use of its value.
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if is_config_flag(flag) and flag.value is not None:
            try:
                flag.value.keys()
            except OSError as e:
                while e.__cause__ is not None:
                    e = e.__cause__
                fail(f"--{name}={flag.config_filename}: cannot load the config file: "
                     f"{str(e).strip().splitlines()[-1]}")
    return rest


def _key_flag_of_caller(flag, depth: int = 2) -> None:
    """Lists `flag` in `--helpshort` of the entry script that defined it through a helper here
    (absl names __main__ by sys.argv[0])."""
    caller = sys._getframe(depth).f_globals.get("__name__", "")
    flags.FLAGS.register_key_flag_for_module(sys.argv[0] if caller == "__main__" else caller,
                                             flags.FLAGS[flag.name])


def _execution_flag(depth: int):
    holder = flags.DEFINE_string(
        "execution", None, "Run the model with other execution fields than it was saved with, "
        f"e.g. attention_impl=xla,remat=full (fields: {', '.join(EXECUTION_FIELDS)}).")
    _key_flag_of_caller(holder, depth + 1)
    return holder


def define_execution_flag():
    """`--execution`: run a loaded model with other execution fields than it was trained with
    (passed as `execution` to gptjax.runs.pretrained.load_pretrained)."""
    return _execution_flag(depth=2)


def _peft_flag(depth: int):
    holder = flags.DEFINE_string("peft_dir", None, "A PEFT LoRA adapter directory "
                                 "(adapter_config.json + adapter_model.safetensors) to merge "
                                 "into the --hf_dir model.")
    _key_flag_of_caller(holder, depth + 1)
    return holder


def define_peft_flag():
    """`--peft_dir`: a PEFT LoRA adapter merged into the --hf_dir model (passed as `peft_dir` to
    gptjax.runs.pretrained.load_pretrained)."""
    return _peft_flag(depth=2)


class ModelFlags:
    """The flags of a model to load (sample.py, serve.py): --workdir or --hf_dir (with
    --tokenizer and --peft_dir), --step, and --execution; `load_args()` are load_pretrained's
    arguments."""

    def __init__(self):
        self.workdir = flags.DEFINE_string("workdir", None, "A train.py run directory.")
        self.hf_dir = flags.DEFINE_string("hf_dir", None,
                                          "A local transformers GPT-2/OpenAI-GPT directory.")
        self.tokenizer = flags.DEFINE_string("tokenizer", None,
                                             "GPT-2 BPE files for --hf_dir (default: it).")
        self.step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
        for holder in (self.workdir, self.hf_dir, self.tokenizer, self.step):
            _key_flag_of_caller(holder)
        self.execution = _execution_flag(depth=2)
        self.peft_dir = _peft_flag(depth=2)

    def load_args(self) -> dict:
        """workdir, hf_dir, tokenizer_path, step, execution and peft_dir, as the flags give
        them."""
        return dict(workdir=self.workdir.value, hf_dir=self.hf_dir.value,
                    tokenizer_path=self.tokenizer.value, step=self.step.value,
                    execution=self.execution.value, peft_dir=self.peft_dir.value)


class MeshFlags:
    """Where eval.py --mode=lm_eval scores: --mesh (a device mesh), and train.py's multi-process
    flags --coordinator_address, --num_processes and --process_id."""

    def __init__(self):
        self.mesh = flags.DEFINE_string(
            "mesh", "", "lm_eval: score on a device mesh, e.g. fsdp=4,tensor=2 (axes data, fsdp, "
            "tensor, as train.py's config.mesh; data not named takes the rest; default: one "
            "device).")
        self.coordinator = flags.DEFINE_string("coordinator_address", None,
                                               "Multi-process: host:port of process 0.")
        self.num_processes = flags.DEFINE_integer("num_processes", None,
                                                  "Multi-process: number of processes.")
        self.process_id = flags.DEFINE_integer("process_id", None,
                                               "Multi-process: this process's index.")
        for holder in (self.mesh, self.coordinator, self.num_processes, self.process_id):
            _key_flag_of_caller(holder)

    def start(self, mode: str) -> str:
        """Starts JAX's multi-process runtime when the flags ask for it (every process runs the
        same command with its own --process_id); returns --mesh (which only --mode=lm_eval
        takes: a one-line error otherwise)."""
        if self.mesh.value and mode != "lm_eval":
            raise ValueError(f"--mesh={self.mesh.value!r} goes with --mode=lm_eval (--mode={mode} "
                             "runs on one device)")
        if self.num_processes.value not in (None, 1) and not self.mesh.value:
            raise ValueError(f"--num_processes={self.num_processes.value} goes with "
                             "--mode=lm_eval --mesh=...; allowed: one process for "
                             f"--mode={mode}" + (" without --mesh" if mode == "lm_eval" else ""))
        maybe_init_distributed(self.coordinator.value, self.num_processes.value,
                               self.process_id.value)
        if self.mesh.value:  # (a bad mesh is one line before any model loads)
            resolve_mesh_shape(parse_mesh(self.mesh.value), jax.device_count())
        return self.mesh.value


def sample_after_training(config: ml_collections.ConfigDict, result: TrainResult) -> None:
    """Print a short sample from the trained model (config.sample), streamed as it decodes.

    Args:
      config: the experiment config (its `sample` and `seed` fields).
      result: what `train_and_evaluate` returned (nothing is printed for a preempted run).
    """
    sc = config.sample
    if sc.max_new_tokens <= 0 or jax.process_index() != 0 or result.preempted:
        return
    tok, mc = result.tokenizer, result.model_config
    prompt = sc.prompt or "\n"
    ids = tok.encode(prompt) or [tok.eos_id or 0]
    max_new = min(sc.max_new_tokens, mc.n_ctx - len(ids))
    out = sampling.generate(mc, result.model_params(), [ids], max_new_tokens=max_new,
                            temperature=sc.temperature, top_k=sc.top_k,
                            eos_id=tok.eos_id, rng=jax.random.key(config.seed))
    new_ids = [int(t) for t in out.tokens[0][: int(out.lengths[0])]]
    print("---------- sample ----------")
    print(prompt + tok.decode(new_ids))
    print("----------------------------", flush=True)
