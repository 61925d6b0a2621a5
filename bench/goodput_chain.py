"""The goodput ledger against wall time measured from outside, over a SIGTERM and a resume.

  python bench/goodput_chain.py [--workdir DIR] [--stop_step 300] [--json r.json]
  python bench/goodput_chain.py --smoke [--json r.json]   # a tiny model, 40 steps, in seconds

`python train.py` (the embedded default; --smoke: a 1 x 32 model for 40 steps) runs in a
subprocess until metrics.jsonl logs step --stop_step, gets SIGTERM (it saves and exits 0), and
the same command resumes it to the end. Each process's wall time is measured here, from just
before it is started to just after it has exited, and compared with its attempt's wall time in
the run's goodput.json (gptjax.runs.goodput), whose buckets add up to it; the run's total
(first start to last exit, the down time between the attempts included) likewise. Printed as a
table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config.train.steps=40", "--config.optim.warmup_steps=4", "--config.model.n_layer=1",
         "--config.model.n_embd=32", "--config.model.n_head=2", "--config.train.log_every=2",
         "--config.train.eval_every=0", "--config.train.save_every=20",
         "--config.sample.max_new_tokens=0"]


def _logged_step(metrics: str) -> int:
    try:
        with open(metrics) as fh:
            steps = [json.loads(x).get("step", 0) for x in fh if x.strip()]
    except (OSError, ValueError):
        return 0
    return max(steps, default=0)


def attempt(args: list, metrics: str, stop_step: int | None) -> tuple[float, float, int]:
    """(start, end, exit status) of one train.py process, measured here; SIGTERM once
    metrics.jsonl logs `stop_step`."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if stop_step is not None:
        while proc.poll() is None and _logged_step(metrics) < stop_step:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    err = proc.communicate()[1]
    t1 = time.time()
    if proc.returncode != 0:
        sys.exit(f"goodput_chain: train.py exited with {proc.returncode}: {err[-2000:]}")
    return t0, t1, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="", help="the run directory (default: a new temporary)")
    p.add_argument("--stop_step", type=int, default=300, help="SIGTERM once this step is logged")
    p.add_argument("--json", default="", help="write the numbers here")
    p.add_argument("--smoke", action="store_true", help="a tiny model for 40 steps")
    a = p.parse_args()
    wd = a.workdir or tempfile.mkdtemp(prefix="goodput_chain_")
    stop = 10 if a.smoke else a.stop_step
    args = [f"--workdir={wd}", "--no_progress", *(SMOKE if a.smoke else [])]
    metrics = os.path.join(wd, "metrics.jsonl")
    spans = [attempt(args, metrics, stop), attempt(args, metrics, None)]
    with open(os.path.join(wd, "goodput.json")) as fh:
        doc = json.load(fh)
    rows = []
    for (t0, t1, _), rec in zip(spans, doc["attempts"]):
        rows.append(dict(measured_s=t1 - t0, ledger_s=rec["wall_s"], status=rec["status"],
                         steps=f"{rec['first_step']}->{rec['reached']}",
                         buckets_s=sum(rec["buckets"].values())))
    run = doc["run"]
    total = dict(measured_s=spans[-1][1] - spans[0][0], ledger_s=run["wall_s"],
                 buckets_s=sum(run["buckets"].values()), goodput=run["goodput"],
                 down_s=run["buckets"].get("down", 0.0))
    print(f"{'attempt':<8} {'steps':>10} {'status':>10} {'measured':>10} {'ledger':>10} "
          f"{'covered':>8} {'buckets':>10}")
    for i, r in enumerate(rows + [dict(total, status="run", steps="")], 1):
        name = str(i) if i <= len(rows) else "run"
        print(f"{name:<8} {r['steps']:>10} {r['status']:>10} {r['measured_s']:>9.2f}s "
              f"{r['ledger_s']:>9.2f}s {100 * r['ledger_s'] / r['measured_s']:>7.1f}% "
              f"{r['buckets_s']:>9.2f}s")
    print(f"goodput {100 * total['goodput']:.0f}%, down {total['down_s']:.2f}s; {wd}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(attempts=rows, run=total, workdir=wd, smoke=a.smoke), fh, indent=1)


if __name__ == "__main__":
    main()
