#!/usr/bin/env bash
# The GPU checks the issues ask for, as one prepared run on a lent GPU machine (offline, random weights).
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [quick]
#
# Writes OUT_DIR/gpu_log.txt (every command's output) and OUT_DIR/gpu_results.json (the card and every
# benchmark's JSON). `quick` shrinks every run to a smoke test. Needs python3 with torch (CUDA); the
# packages the machine lacks travel as wheels in .whl/ (open_clip_torch, ftfy, wcwidth, timm).
set -u
OUT=${1:?usage: gpu_checks.sh OUT_DIR [quick]}
QUICK=${2:-}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HOME="$WORK/hf"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    >>"$LOG" 2>&1 || echo "wheel install failed" >>"$LOG"
  export PYTHONPATH="$WORK/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

TOTAL=${TOTAL:-560}  # seconds for the whole script: later steps get what is left
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, never stop the script
  local name=$1 limit=$2; shift 2
  local left=$((TOTAL - SECONDS))
  if [ "$left" -lt 30 ]; then echo "=== $name: skipped, ${left} s left" >>"$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" >>"$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - start)) s" >>"$LOG"
  echo "$name done in $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$WORK/card.csv" 2>&1
python3 -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__, torch.cuda.get_device_name())" >>"$LOG" 2>&1

if [ "$QUICK" = quick ]; then R="--repeats 2 --warmup 1"; STEPS=6; else R=""; STEPS=200; fi
# most important first: the issues' explicit GPU runs, then the component benchmarks, then CUDA tests
step stage2_run 260 python3 benchmarks/bench_stage2_run.py --device cuda --steps "$STEPS" --batch-size 8 --crop-size 256 \
  --out "$WORK/stage2"
cp "$WORK/stage2/results.json" "$WORK/stage2_run.json" 2>/dev/null
if [ -f benchmarks/bench_train_step.py ]; then
  step train_step_bf16 150 python3 benchmarks/bench_train_step.py --device cuda --bf16 $R --json "$WORK/train_step_bf16.json"
fi
step adapter_fp32 50 python3 benchmarks/bench_adapter.py --device cuda $R --json "$WORK/adapter_fp32.json"
step adapter_bf16 50 python3 benchmarks/bench_adapter.py --device cuda --bf16 $R --json "$WORK/adapter_bf16.json"
step losses_bf16 60 python3 benchmarks/bench_losses.py --device cuda --bf16 $R --json "$WORK/losses_bf16.json"
step perceiver_fp32 40 python3 benchmarks/bench_perceiver.py --device cuda --batch 64 ${QUICK:+--repeats 2} --json "$WORK/perceiver_fp32.json"
step perceiver_bf16 40 python3 benchmarks/bench_perceiver.py --device cuda --batch 64 --bf16 ${QUICK:+--repeats 2} --json "$WORK/perceiver_bf16.json"
step cuda_tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_losses.py tests/test_adapter.py tests/test_perceiver.py -k "cuda or bf16 or autocast or device"

python3 - "$WORK" "$OUT/gpu_results.json" <<'EOF'
import json, pathlib, sys
work, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
results = {"card": (work / "card.csv").read_text() if (work / "card.csv").exists() else None}
for path in sorted(work.glob("*.json")):
    try:
        results[path.stem] = json.loads(path.read_text())
    except ValueError as error:
        results[path.stem] = f"unreadable: {error}"
target.write_text(json.dumps(results, indent=1))
print("collected:", ", ".join(k for k in results if k != "card"))
EOF
