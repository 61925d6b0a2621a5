#!/usr/bin/env bash
# One prepared accelerator check: the GPU kernel tests on the device, attention parity, GPT-2
# small T=1024 bf16 training throughput and MFU per attention implementation next to transformers
# (eager and torch.compile) and a nanoGPT-style model, and decode tokens/s at batch 1 and 8
# against the memory-bandwidth roofline.
# Needs no network: jax, flax, optax, torch and transformers (not ml_collections or tfds).
#
#   bash bench/device_check.sh [OUT_DIR]           # a GPU/TPU; within 10 minutes on one H100
#   bash bench/device_check.sh --smoke [OUT_DIR]   # tiny shapes, end to end on a CPU in 1-3 minutes
#
# Within 10 minutes on a lent H100: the stage limits add up to 600 s (tests 120, attention 90,
# train 270, decode 120); a stage past its limit is stopped and recorded. The tests stage runs
# tests/test_attention.py, tests/test_model.py and tests/test_gpu_compile.py with
# JAX_PLATFORMS=cuda,cpu (the kernels on the GPU, compared with the XLA reference).
# OUT_DIR defaults to $GPTJAX_BENCH_OUT, else bench_out/<date>. It receives the raw JSON and log of
# every stage and the summary: device_check.json and device_check.md. A stage that fails or runs
# past its time limit is recorded with its exit status and the check goes on; the script exits 0
# when the summary was written.
set -u -o pipefail

SMOKE=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "device_check.sh: unknown option $arg (allowed: --smoke, an output folder)" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
OUT="${OUT:-${GPTJAX_BENCH_OUT:-bench_out/$(date +%Y%m%d_%H%M%S)}}"
mkdir -p "$OUT" || { echo "device_check.sh: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
STATUS="$OUT/stages.tsv"
: > "$STATUS"

# stage NAME LIMIT_S CMD...: runs CMD with a time limit, logging to OUT/NAME.log; records the rc.
stage() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STATUS"
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0))s"
}

# --same_process: one process builds every runner once (torch.compile alone takes minutes, so a
# process per runner per round would not fit the limit); the output says so. Decode times gptjax
# alone (--skip_transformers), so one process for its weight formats loses nothing.
if [ "$SMOKE" = 1 ]; then
  TRAIN=(--same_process --shapes tiny_smoke --dtype float32 --batch 2 --steps 1 --rounds 2 --warmup 1
         --runners gptjax,gptjax:auto,hf,nano)
  DECODE=(--same_process --batch_sizes 1,2 --prompt_len 8 --new_tokens 8 --repeats 1 --skip_transformers)
  ATTN_LIMIT=120; TRAIN_LIMIT=240; DECODE_LIMIT=180
  # The stage's machinery with one quick CPU test (the GPU tests need the device).
  TESTS=(tests/test_attention.py -k "pallas_decode_against_a_cache"); TESTS_LIMIT=120
  TESTS_PLATFORMS="${JAX_PLATFORMS:-cpu}"
else
  TRAIN=(--same_process --shapes gpt2_1024 --dtype bfloat16 --batch 16 --steps 5 --rounds 3 --warmup 3
         --runners gptjax,gptjax:cudnn,gptjax:pallas,gptjax:auto,hf,hf_compile,nano)
  DECODE=(--same_process --batch_sizes 1,8 --prompt_len 32 --new_tokens 128 --repeats 3 --skip_transformers)
  ATTN_LIMIT=90; TRAIN_LIMIT=270; DECODE_LIMIT=120
  TESTS=(tests/test_attention.py tests/test_model.py tests/test_gpu_compile.py); TESTS_LIMIT=120
  TESTS_PLATFORMS="cuda,cpu"
fi

{ date -u +%Y-%m-%dT%H:%M:%SZ; uname -a; nvidia-smi -L 2>/dev/null
  "$PY" -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  git -C "$REPO" rev-parse --short HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage tests "$TESTS_LIMIT" env JAX_PLATFORMS="$TESTS_PLATFORMS" "$PY" -m pytest -q -x \
  -p no:cacheprovider "${TESTS[@]}"

if [ "$SMOKE" = 1 ]; then
  # Off an accelerator --check interprets the Pallas and splash kernels (minutes on a small CPU);
  # the smoke run only shows the entry point works, with the XLA path at one short length.
  stage attention_check "$ATTN_LIMIT" "$PY" bench/attention.py --seq 128 --batch 1 --heads 2 \
    --impls xla --kinds dense --reps 1 --out "$OUT/attention_check.json"
else
  stage attention_check "$ATTN_LIMIT" "$PY" bench/attention.py --check --out "$OUT/attention_check.json"
fi
stage train "$TRAIN_LIMIT" "$PY" bench/train_throughput.py "${TRAIN[@]}" --json "$OUT/train.json"
stage decode "$DECODE_LIMIT" "$PY" bench/decode.py "${DECODE[@]}" --json "$OUT/decode.json"

# The summary: one JSON and one markdown table from whatever the stages wrote.
"$PY" - "$OUT" "$SMOKE" <<'EOF'
import json, os, sys, time

out, smoke = sys.argv[1], sys.argv[2] == "1"


def load(name):
    try:
        with open(os.path.join(out, name)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


stages = {}
with open(os.path.join(out, "stages.tsv")) as fh:
    for line in fh:
        name, rc, secs = line.rstrip("\n").split("\t")
        stages[name] = dict(exit=int(rc), seconds=int(secs),
                            timed_out=int(rc) in (124, 137))
train, decode, attn = load("train.json"), load("decode.json"), load("attention_check.json")

import jax  # after the stages, so none of them shares this process's device

from gptjax.train.metrics import datasheet_bandwidth, measured_bandwidth

dev = jax.devices()[0]
bw_meas = measured_bandwidth(1 << 26 if dev.platform == "cpu" else 1 << 30)
bw_ds = datasheet_bandwidth(dev)
summary = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), smoke=smoke,
               device=f"{dev.device_kind} ({dev.platform})", jax=jax.__version__, stages=stages,
               bandwidth_measured=bw_meas, bandwidth_datasheet=bw_ds)
md = [f"# device_check {'(smoke) ' if smoke else ''}{summary['date']}", "",
      f"device: {summary['device']}, jax {jax.__version__}; stages: "
      + ", ".join(f"{k} exit {v['exit']} ({v['seconds']}s)" for k, v in stages.items()), ""]

if attn and attn.get("mode") == "bench":
    summary["attention_bench"] = attn.get("rows", [])
    md += ["## Attention (bench/attention.py timing only: the smoke run skips --check)", "",
           f"{len(summary['attention_bench'])} rows timed", ""]
elif attn:
    rows = attn.get("rows", [])
    bad = [f"{r['impl']}/{r['kind']}/{r['case']}/T={r['T']}/{r['dtype']}: {r.get('error', '')}"
           for r in rows if not r.get("ok")]
    summary["attention_check"] = dict(cases=len(rows), ok=sum(bool(r.get("ok")) for r in rows),
                                      failures=bad)
    md += ["## Attention parity (bench/attention.py --check)", "",
           f"{summary['attention_check']['ok']}/{len(rows)} cases within tolerance"
           + ("" if not bad else "; failing: " + "; ".join(bad)), ""]
else:
    md += ["## Attention parity", "", "no result (see attention_check.log)", ""]

if train:
    summary["train"] = train
    md += ["## Training throughput (bench/train_throughput.py)", "",
           f"measured matmul peak {train['peak_measured'] / 1e12:.2f} TFLOP/s; datasheet "
           + (f"{train['peak_datasheet'] / 1e12:.0f} TFLOP/s" if train.get("peak_datasheet")
              else "n/a"), "",
           "| shape | batch x seq | dtype | runner | tok/s | MFU (measured) | MFU (datasheet) "
           "| gptjax speedup |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in train["rows"]:
        for label, x in r["runners"].items():
            pct = lambda v: f"{100 * v:.1f}%" if v else "n/a"  # noqa: E731
            sp = f"{x['gptjax_speedup']:.2f}x" if "gptjax_speedup" in x else "-"
            md.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['dtype']} | {label} | "
                      f"{x['tok_s']:,.0f} | {pct(x['mfu_measured'])} | "
                      f"{pct(x['mfu_datasheet'])} | {sp} |")
        for label, why in r["skipped"].items():
            md.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['dtype']} | {label} | "
                      f"skipped: {why} | | | |")
    md.append("")
else:
    md += ["## Training throughput", "", "no result (see train.log)", ""]

if decode:
    pb = decode["param_bytes"]
    rows = []
    for r in decode["rows"]:
        steps_s = r["gptjax_tokens_per_s"] / r["batch"]
        rows.append(dict(batch=r["batch"], tokens_per_s=r["gptjax_tokens_per_s"],
                         roofline_measured=steps_s * pb / bw_meas,
                         roofline_datasheet=steps_s * pb / bw_ds if bw_ds else None))
    summary["decode"] = dict(model=decode.get("model"), param_bytes=pb,
                             new_tokens=decode.get("new_tokens"), rows=rows, raw=decode)
    md += ["## Decode (bench/decode.py, greedy, prefill included)", "",
           f"{decode.get('model')}; roofline = steps/s x parameter bytes / bandwidth "
           f"(measured {bw_meas / 1e9:,.0f} GB/s"
           + (f", datasheet {bw_ds / 1e9:,.0f} GB/s)" if bw_ds else ")"), "",
           "| batch | tokens/s | fraction of roofline (measured bw) | (datasheet bw) |",
           "|---:|---:|---:|---:|"]
    for r in rows:
        ds = f"{r['roofline_datasheet']:.2f}" if r["roofline_datasheet"] else "n/a"
        md.append(f"| {r['batch']} | {r['tokens_per_s']:,.1f} | {r['roofline_measured']:.2f} "
                  f"| {ds} |")
    md.append("")
else:
    md += ["## Decode", "", "no result (see decode.log)", ""]

with open(os.path.join(out, "device_check.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
with open(os.path.join(out, "device_check.md"), "w") as fh:
    fh.write("\n".join(md) + "\n")
print("\n".join(md))
print(f"wrote {out}/device_check.json and {out}/device_check.md")
EOF
