"""The goodput ledger: where a run's wall time went, in buckets that add up to it, over attempts.

One clock. A `Ledger` keeps a stack of open phases; at every phase boundary it charges the time
since the previous boundary to the innermost open phase (to the base bucket when none is open),
less the compilation that JAX reported on this thread in that interval (jax.monitoring's
tracing, lowering and compiling spans, their union), which goes to `compile`. Every interval
goes to exactly one bucket, so the buckets add up to the attempt's wall time by construction;
no timer runs beside another. What no phase claims is `other`, and it is reported.

Buckets (seconds):
  startup     from the process's start (train.py) or the call until the first batch (less the
              phases below): imports, the distributed runtime, the data and tokenizer, the
              mesh, setting up the loop.
  init        restoring the latest checkpoint, or initialising a new state.
  compile     tracing, lowering and compiling, wherever it happens (a persistent-cache hit is
              its load time; `cache_hits` counts them).
  step        the training loop's host time for new steps: dispatch and waiting for results.
  recompute   the same for steps an earlier attempt had already run (lost with it).
  data        waiting for the next batch.
  checkpoint  the persistent tier's checkpoint time that blocks the loop (an async save's copy,
              the final wait).
  local_checkpoint  the local tier's saves (train.local_dir; synchronous: all of it blocks).
  eval        periodic and final evaluation, and what the caller runs last (train.py: the sample).
  log         metrics.jsonl/TensorBoard writes, the plot, the summary, this ledger's writes.
  other       the rest (after the loop: messages between the phases).
  down        (the run only) from an attempt's last heartbeat to the next attempt's start.

The run directory keeps `goodput.json` (written by process 0; process N > 0 writes
`goodput.process_N.json`): one record per attempt, rewritten atomically (a temporary file, then
a rename) when the attempt opens, at least every HEARTBEAT_S seconds while the loop runs, before
each checkpoint and when it ends. A killed attempt's record is its last heartbeat; the next
attempt marks it `killed`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
from typing import Callable, Optional

import jax

GOODPUT = "goodput.json"
BUCKETS = ("startup", "init", "compile", "step", "recompute", "data", "checkpoint",
           "local_checkpoint", "eval", "log", "other")
HEARTBEAT_S = 5.0
# jax.monitoring's time spans of compilation (jax._src.dispatch's event names).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_IMPORTED = time.time()


def process_start() -> float:
    """When this process started (Linux: from /proc; elsewhere, or when /proc disagrees with
    the clock, when this module was imported)."""
    try:
        with open("/proc/self/stat") as fh:  # field 22: start time, in ticks since boot
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        started = time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED
    # A container may show the host's boot time in one file and its own in the other.
    return started if 0 <= _IMPORTED - started < 600 else _IMPORTED


class _CompileSpans:
    """The compilation spans JAX reports (start, end, thread) and its persistent-cache hits."""

    def __init__(self):
        self.spans: list = []
        self.cache_hits = self.compiles = 0
        self._lock = threading.Lock()

    def on_span(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self.spans.append((start, end, threading.get_ident()))
                self.compiles += event == COMPILE_EVENTS[-1]

    def on_event(self, event: str, **_) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def take(self, lo: float, hi: float, thread: int) -> float:
        """Seconds of [lo, hi] that `thread`'s spans cover (nested spans once); spans ended by
        `hi` are dropped."""
        with self._lock:
            mine = sorted((max(s, lo), min(e, hi)) for s, e, t in self.spans
                          if t == thread and e > lo and s < hi)
            self.spans = [x for x in self.spans if x[1] > hi]
        covered, reach = 0.0, lo
        for s, e in mine:
            s = max(s, reach)
            if e > s:
                covered, reach = covered + e - s, e
        return covered


_SPANS: Optional[_CompileSpans] = None


def compile_spans() -> _CompileSpans:
    """The process's collector of compilation spans (its listeners registered at the first call)."""
    global _SPANS
    if _SPANS is None:
        _SPANS = _CompileSpans()
        jax.monitoring.register_event_time_span_listener(_SPANS.on_span)
        jax.monitoring.register_event_listener(_SPANS.on_event)
    return _SPANS


class Ledger:
    """One attempt's wall time in buckets (see the module docstring), and the run's file."""

    def __init__(self, started: Optional[float] = None, clock: Callable[[], float] = time.time):
        """Starts the clock (in `startup`).

        Args:
          started: when the attempt began (train.py: `process_start()`); default now.
          clock: the clock (tests pass a fake one).
        """
        self.clock = clock
        self.start = clock() if started is None else float(started)
        self._mark = self.start
        self.buckets = dict.fromkeys(BUCKETS, 0.0)
        self._stack = ["startup"]  # [base bucket, open phases...]
        self._thread = threading.get_ident()
        self._spans = compile_spans()
        self._hits0, self._compiles0 = self._spans.cache_hits, self._spans.compiles
        self.path: Optional[str] = None  # the ledger file, once `open`
        self.history: list = []  # the earlier attempts' records
        self.first_step = self.reached = self.redo_until = self.recomputed = 0
        self.status, self.end = "running", self.start
        self._beat = -math.inf

    # ------------------------------------------------------------------ the clock
    def _charge(self) -> float:
        now = self.clock()
        dt = now - self._mark
        compiled = min(self._spans.take(self._mark, now, self._thread), max(dt, 0.0))
        self.buckets["compile"] += compiled
        self.buckets[self._stack[-1]] += dt - compiled
        self._mark = self.end = now
        return now

    @contextlib.contextmanager
    def phase(self, bucket: str):
        """Charges the time inside the `with` block to `bucket` (inner phases take their own)."""
        if bucket not in self.buckets:
            raise ValueError(f"no ledger bucket {bucket!r}; allowed: {list(BUCKETS)}")
        self._charge()
        self._stack.append(bucket)
        try:
            yield self
        finally:
            self._charge()
            self._stack.pop()

    def base(self, bucket: str) -> None:
        """Charges the time outside any phase to `bucket` from now on."""
        if bucket not in self.buckets:
            raise ValueError(f"no ledger bucket {bucket!r}; allowed: {list(BUCKETS)}")
        if self._stack[0] != bucket:
            self._charge()
            self._stack[0] = bucket

    @contextlib.contextmanager
    def waiting_for_data(self, step: int):
        """The training loop fetches the batch of 0-based `step`: the time between fetches goes
        to `step` (or `recompute`, for a step an earlier attempt ran), the fetch to `data`."""
        redo = step < self.redo_until
        self.recomputed += redo
        self.base("recompute" if redo else "step")
        self.reached = max(self.reached, step)  # (steps 0..step-1 ran: a kill loses them)
        self.heartbeat()
        with self.phase("data"):
            yield

    # ------------------------------------------------------------------ the run's file
    def open(self, workdir: str, first_step: int, restored: bool) -> "Ledger":
        """Reads the run's earlier attempts from `workdir` and writes this attempt's record.

        Args:
          workdir: the run directory.
          first_step: the step this attempt starts from.
          restored: whether it resumed from a checkpoint (a run that starts afresh over a
            finished run's ledger starts a new one).
        """
        index = jax.process_index()
        name = GOODPUT if index == 0 else f"goodput.process_{index}.json"
        self.path = os.path.join(workdir, name)
        try:
            with open(self.path) as fh:
                self.history = json.load(fh)["attempts"]
        except (OSError, ValueError, KeyError):
            self.history = []
        if self.history and self.history[-1]["status"] == "running":
            self.history[-1]["status"] = "killed"  # no final record: kill -9, a lost machine
        if not restored and self.history and self.history[-1]["status"] == "done":
            self.history = []
        self.first_step = self.reached = first_step
        self.redo_until = max([a["reached"] for a in self.history], default=0)
        self.heartbeat(force=True)
        return self

    def heartbeat(self, force: bool = False, reached: Optional[int] = None) -> None:
        """Writes the ledger when HEARTBEAT_S seconds have passed since the last write (or when
        `force`d), recording `reached` steps."""
        if reached is not None:
            self.reached = max(self.reached, reached)
        if self.path is None or not (force or self.clock() - self._beat >= HEARTBEAT_S):
            return
        with self.phase("log"):  # (the record ends as the write starts)
            self._write()
        self._beat = self.end

    def _write(self) -> None:
        doc = ledger_doc(self.history + [self.record()])
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, self.path)  # atomic: a reader sees the old record or the new one

    def record(self) -> dict:
        """This attempt's record (as of the last charge)."""
        down = self.start - self.history[-1]["end"] if self.history else 0.0
        return dict(attempt=len(self.history) + 1, status=self.status, host=socket.gethostname(),
                    pid=os.getpid(), start=self.start, end=self.end, wall_s=self.end - self.start,
                    down_s=down, first_step=self.first_step, reached=self.reached,
                    recomputed_steps=self.recomputed,
                    compiles=self._spans.compiles - self._compiles0,
                    cache_hits=self._spans.cache_hits - self._hits0, buckets=dict(self.buckets))

    @contextlib.contextmanager
    def attempt(self, announce: bool):
        """Closes the attempt's record when the `with` block ends: the block calls the function
        it gets with the status ('done', 'preempted') and the final step; an exception closes it
        as 'halted' (FloatingPointError) or 'error'. `announce`: print the run's one line."""
        outcome = {}

        def ended(status: str, step: int) -> None:
            outcome.update(status=status, step=step)

        try:
            yield ended
        except BaseException as e:
            self.close("halted" if isinstance(e, FloatingPointError) else "error")
            raise
        run = self.close(outcome.get("status", "done"), outcome.get("step"))
        if announce:
            print(summary_line(run), flush=True)

    def close(self, status: str, step: Optional[int] = None) -> dict:
        """Ends the attempt with `status` at `step` (written, if `open`); returns `run()`."""
        self.status = status
        self.reached = self.reached if step is None else max(self.reached, step)
        self._charge()  # (the record ends here; the write itself is after its end)
        if self.path is not None:
            self._write()
        return self.run()

    def run(self) -> dict:
        """The whole run so far (earlier attempts and this one, to its latest charge, or its
        end once closed): see `ledger_doc`."""
        if self.status == "running":
            self._charge()
        return ledger_doc(self.history + [self.record()])["run"]

    # ------------------------------------------------------------------ timed objects
    def watch(self, ckpt, writer) -> tuple:
        """`ckpt` (a Checkpointer) and `writer` (a MetricsWriter) with their time charged to
        `checkpoint` and `log`: what the loop uses instead of them."""
        return _TimedCheckpoints(ckpt, self), _TimedLog(writer, self)


class _TimedCheckpoints:
    """A Checkpointer whose saves and waits are charged to `checkpoint`. When the loop asks
    whether a step is due (`should_save`), a due step is written to the ledger first: a kill
    during that save leaves a record of the steps it throws away."""

    def __init__(self, inner, ledger: Ledger):
        self._inner, self._ledger = inner, ledger

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def should_save(self, step: int) -> bool:
        due = self._inner.should_save(step)
        if due:
            self._ledger.heartbeat(force=True, reached=step)
        return due

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        self._ledger.reached = max(self._ledger.reached, step)
        with self._ledger.phase("checkpoint"):
            return self._inner.save(step, state, meta, force=force)

    def wait(self) -> None:
        with self._ledger.phase("checkpoint"):
            self._inner.wait()

    def close(self) -> None:
        with self._ledger.phase("checkpoint"):
            self._inner.close()


class _TimedLog:
    """A MetricsWriter whose writes are charged to `log`; closing it first appends the run's
    ledger (`metrics_record`) at the last step it logged."""

    def __init__(self, inner, ledger: Ledger):
        self._inner, self._ledger, self._step = inner, ledger, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def write(self, record: dict) -> None:
        self._step = max(self._step, record["step"])
        with self._ledger.phase("log"):
            self._inner.write(record)

    def close(self) -> None:
        with self._ledger.phase("log"):
            self._inner.write(dict(step=self._step, **metrics_record(self._ledger.run())))
            self._inner.close()


# ====================================================================== reading a ledger
def ledger_doc(attempts: list) -> dict:
    """goodput.json's content: the attempts and the run's totals.

    The run's `buckets` are the attempts' summed, plus `down` (each attempt's `down_s`: from
    the previous attempt's last record to its start); they add up to its `wall_s`, from the
    first attempt's start to the last one's latest record. `goodput` is `step` / `wall_s`.
    """
    buckets = {k: sum(a["buckets"].get(k, 0.0) for a in attempts) for k in BUCKETS}
    buckets["down"] = sum(a["down_s"] for a in attempts)
    wall = attempts[-1]["end"] - attempts[0]["start"]
    run = dict(wall_s=wall, attempts=len(attempts), goodput=buckets["step"] / max(wall, 1e-9),
               recomputed_steps=sum(a["recomputed_steps"] for a in attempts),
               compiles=sum(a["compiles"] for a in attempts),
               cache_hits=sum(a["cache_hits"] for a in attempts), buckets=buckets)
    return dict(version=1, attempts=attempts, run=run)


def summary_line(run: dict) -> str:
    """'goodput 87%: compile 5%, eval 4%, ... (wall 120.3s, 2 attempts)' of a run's totals."""
    wall = max(run["wall_s"], 1e-9)
    rest = sorted(((v, k) for k, v in run["buckets"].items() if k != "step"), reverse=True)
    parts = ", ".join(f"{k} {100 * v / wall:.0f}%" for v, k in rest if v >= 0.005 * wall)
    n = run["attempts"]
    return (f"goodput {100 * run['goodput']:.0f}%: {parts or 'nothing else'} "
            f"(wall {run['wall_s']:.1f}s, {n} attempt{'s' if n > 1 else ''})")


def metrics_record(run: dict) -> dict:
    """The run's ledger as metrics.jsonl/TensorBoard scalars: `goodput` and each bucket's
    share of the wall time (`goodput/<bucket>`), and `goodput/wall_s`."""
    wall = max(run["wall_s"], 1e-9)
    return {"goodput": run["goodput"], "goodput/wall_s": run["wall_s"],
            **{f"goodput/{k}": v / wall for k, v in run["buckets"].items()}}


def load(workdir: str) -> dict:
    """The goodput ledger of run directory `workdir` (see `ledger_doc`; the run's totals are
    recomputed from its attempts); a one-line error when it has none."""
    path = os.path.join(workdir, GOODPUT)
    try:
        with open(path) as fh:
            return ledger_doc(json.load(fh)["attempts"])
    except OSError:
        raise FileNotFoundError(f"no {GOODPUT} in {workdir}; allowed: a train.py run "
                                "directory (runs started before the ledger existed have none)")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path} is not a goodput ledger ({type(e).__name__}: {e})")


def report(doc: dict, name: str = "") -> str:
    """A table of a ledger: the seconds of each bucket per attempt and for the run, the run's
    share, and the one-line summary."""
    attempts, run = doc["attempts"], doc["run"]
    cols = [f"#{a['attempt']} {a['status']}" for a in attempts] + ["run", "%"]
    width = 2 + max(9, *map(len, cols))
    lines = [f"goodput ledger {name}".rstrip() + f": {run['attempts']} attempt(s), steps "
             + ", ".join(f"{a['first_step']}->{a['reached']}" for a in attempts)
             + f", {run['recomputed_steps']} recomputed; {run['compiles']} compilations, "
             f"{run['cache_hits']} from the persistent cache",
             f"{'seconds':<11}" + "".join(f"{c:>{width}}" for c in cols)]
    wall = max(run["wall_s"], 1e-9)
    for k in ("down",) + BUCKETS + ("wall",):
        per = [a["down_s"] if k == "down" else a["wall_s"] if k == "wall" else
               a["buckets"].get(k, 0.0) for a in attempts]
        total = run["wall_s"] if k == "wall" else run["buckets"][k]
        lines.append(f"{k:<11}" + "".join(f"{v:>{width}.2f}" for v in per + [total])
                     + f"{100 * total / wall:>{width}.1f}")
    return "\n".join(lines + [summary_line(run)])


def plot(doc: dict, out_png: str, title: str = "") -> str:
    """A horizontal bar per attempt (and the run) split into its buckets, as a PNG."""
    import matplotlib  # heavy: matplotlib, only when a plot is written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    attempts, run = doc["attempts"], doc["run"]
    rows = [(f"attempt {a['attempt']} ({a['status']})", dict(a["buckets"], down=a["down_s"]))
            for a in attempts] + [("run", run["buckets"])]
    keys = ("step",) + tuple(k for k in BUCKETS if k != "step") + ("down",)
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.45 * len(rows)), dpi=110)
    colors = plt.get_cmap("tab20").colors
    colors = colors[::2] + colors[1::2]  # ten distinct colours first, then their light shades
    for i, key in enumerate(keys):
        left = [sum(b.get(k, 0.0) for k in keys[:i]) for _, b in rows]
        ax.barh([r for r, _ in rows], [b.get(key, 0.0) for _, b in rows], left=left,
                color=colors[i % len(colors)], label=key)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title or summary_line(run), fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out_png, bbox_inches="tight")
    plt.close(fig)
    return out_png
