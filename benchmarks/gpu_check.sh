#!/usr/bin/env bash
# GPU readiness in one command, on a fresh GPU machine with this checkout (about 8 minutes on one H100):
#
#   benchmarks/gpu_check.sh               # every check; one line each: PASS|FAIL|SKIP <check>: <figure>
#   benchmarks/gpu_check.sh --cpu-smoke   # on CPU, tiny: the checks' CPU-runnable paths (tests run this)
#
# Checks (benchmarks/gpu_checks.py; each group in its own process, under its own time limit):
#   precision   CLIP and DINO steps in bf16 and fp16 (Accelerate's GradScaler) against fp32; an fp16
#               overflow skipped, counted, without after_step
#   kernels     fused AdamW, TF32, channels-last, host syncs per step, a corrupt sample in a CLIP batch
#   deepspeed   CLIP and DINO in DeepSpeed fp16 (its own loss scaler) against fp32, one ZeRO-2 bf16 step
#   nccl        a 1-process NCCL group, an all-reduce and the trainer's buffer broadcast
#   syncbn      SyncBatchNorm over 2 processes on the GPU against one process on the whole batch
#   compile     trainer.compile without and with gradient checkpointing, against eager
# then CLIP ViT-B/16 bf16 images/s and MFU (benchmarks/gpu_clip.py, batch 256, no torch.compile) and
# the stream's samples/s on this machine's cores at 224 and 384 px (benchmarks/data_pipeline.py,
# which appends its table to BENCHMARKS.md of the copy it runs in).
#
# Python: $PYTHON, else .venv/bin/python if it runs torch here, else python3 (the GPU image's, with
# torch). The checkout is put on PYTHONPATH; nothing is installed. Packages it lacks (the GPU image
# has no hydra-core, omegaconf, deepspeed, open_clip_torch, webdataset, simplejpeg) can be carried
# as wheels in .whl/ (see /work/.library/device/README.md for the download command), for example:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#     hydra-core omegaconf antlr4-python3-runtime deepspeed open_clip_torch ftfy wcwidth webdataset \
#     braceexpand simplejpeg hjson ninja py-cpuinfo msgpack
# they are installed with pip --no-index into a temporary directory first. The script exits 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=""
SCALE=1  # time caps are a GPU's; a shared CPU takes longer for the tiny smoke runs
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE="--cpu-smoke" && SCALE=5
BUDGET=${GPU_CHECK_BUDGET_S:-$((470 * SCALE))}   # seconds for everything; a step not started in time is SKIPped
START=$SECONDS

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=$(mktemp -d /tmp/memetrain-gpu-site.XXXX)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl && export PYTHONPATH="$SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

"$PYTHON" - <<'EOF'
import importlib, platform, torch
missing = [m for m in ("hydra", "omegaconf", "deepspeed", "open_clip", "webdataset", "simplejpeg", "timm", "transformers")
           if importlib.util.find_spec(m) is None]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"machine: {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")
if missing:
    print(f"note: missing Python packages: {', '.join(missing)} (checks that need them fail; carry wheels in .whl/)")
EOF

FAILED=0
PASSED=0
report() {  # one check's line, counted
  echo "$1"
  case "$1" in PASS*) PASSED=$((PASSED + 1)) ;; FAIL*) FAILED=$((FAILED + 1)) ;; esac
}
limit() {  # seconds a step may take: its cap (scaled), or what is left of the budget
  local left=$((BUDGET - (SECONDS - START))) cap=$(($1 * SCALE))
  ((left < cap)) && echo "$left" || echo "$cap"
}
run_group() {  # group, time cap
  local seconds out
  seconds=$(limit "$2")
  if ((seconds < 15)); then report "SKIP $1: not started, the ${BUDGET} s budget is spent"; return; fi
  out=$(timeout -k 10 "$seconds" "$PYTHON" benchmarks/gpu_checks.py $SMOKE "$1" 2>"/tmp/gpu_check_$1.log")
  local code=$? lines=0
  while IFS= read -r line; do
    if [[ "$line" =~ ^(PASS|FAIL|SKIP) ]]; then report "$line"; lines=$((lines + 1)); fi
  done <<<"$out"
  if ((code == 124 || code == 137)); then
    report "FAIL $1: stopped after ${seconds} s (log: /tmp/gpu_check_$1.log)"
  elif ((code != 0 && (code != 1 || lines == 0))); then
    report "FAIL $1: exited with $code: $(tail -n 1 "/tmp/gpu_check_$1.log")"
  fi
}

for group in precision:75 kernels:75 deepspeed:100 nccl:30 syncbn:45 compile:110 compile-checkpointing:110; do
  run_group "${group%%:*}" "${group##*:}"
done

if [[ -n "$SMOKE" ]]; then
  report "SKIP clip-vitb16: gpu_clip.py needs a GPU (its CPU parts: tests/benchmarks/test_gpu_clip_script.py)"
  STREAM_ARGS=(--quick --image-size 64)
else
  seconds=$(limit 100)
  if ((seconds < 30)); then
    report "SKIP clip-vitb16: not started, the ${BUDGET} s budget is spent"
  else
    out=$(timeout -k 10 "$seconds" "$PYTHON" benchmarks/gpu_clip.py --no-record --no-compile --start-batch 256 \
      --max-batch 256 --steps 8 --warmup 2 2>/tmp/gpu_check_clip.log)
    best=$(grep -E '^\| (on|off) \|' <<<"$out" | sort -t'|' -k6 -n -r | head -n 1)
    if [[ -n "$best" ]]; then
      report "PASS clip-vitb16: checkpointing | compile | AdamW | batch | images/s | TFLOP/s | MFU | target: $best"
    else
      report "FAIL clip-vitb16: no result ($(tail -n 1 /tmp/gpu_check_clip.log))"
    fi
  fi
  STREAM_ARGS=(--count 1000 --repeats 2)
fi

for size in 224 384; do
  [[ -n "$SMOKE" ]] && size=64
  seconds=$(limit 90)
  if ((seconds < 20)); then report "SKIP stream-$size: not started, the ${BUDGET} s budget is spent"; continue; fi
  out=$(timeout -k 10 "$seconds" "$PYTHON" benchmarks/data_pipeline.py "${STREAM_ARGS[@]}" --image-size "$size" \
    --workers "$(nproc)" 2>"/tmp/gpu_check_stream.log")
  row=$(grep -E '^\| MemeStream: .*worker threads' <<<"$out" | head -n 1)
  if [[ -n "$row" ]]; then
    report "PASS stream-$size ($(nproc) cores): $row"
  else
    report "FAIL stream-$size: no result ($(tail -n 1 /tmp/gpu_check_stream.log))"
  fi
  [[ -n "$SMOKE" ]] && break
done

echo "gpu_check: $PASSED passed, $FAILED failed in $((SECONDS - START)) s"
((FAILED == 0))
