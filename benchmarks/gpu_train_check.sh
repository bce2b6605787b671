#!/usr/bin/env bash
# Issue 11's GPU checks in one go (about 8 minutes on one H100/H200), from the repository root:
#
#     bash benchmarks/gpu_train_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else runs/gpu_train_check
#     SMALL=1 bash benchmarks/gpu_train_check.sh /tmp/x     # the same steps at toy sizes, on the CPU (a dry run)
#
# 1. the GPU tests of the training and the loss (pytest -m gpu: the compiled loss on CUDA against float64, the
#    bf16 + channels_last defaults of a run);
# 2. benchmarks/train_speed.py at paper scale (R50 OS8 multi-grid, batch 4, crop 721, 19 classes, 20 clicks):
#    official formulation vs ours, the loss's share, peak memory, and the loader on 2048x1024 synthetic PNGs;
# 3. a real `torchrun --nproc-per-node 1 -m training.run --amp bf16` on synthetic Cityscapes that trains and
#    evaluates, is killed after its first checkpoint, and resumes to the end with --resume auto;
# 4. preemption on CUDA with nccl (issue 23): SIGTERM to torchrun mid-epoch writes a mid-epoch last.pt within 10 s
#    (the worker exits 75, torchrun 1), and the same command with --resume auto continues to the end.
# Everything it prints is also in OUT_DIR/*.txt; the last lines say PASS or FAIL per step.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu_train_check}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -a RESULTS=()

if [ "${SMALL:-0}" = "1" ]; then  # toy sizes on the CPU: checks the script itself, not the GPU
    DEVICE=cpu; AMP=none; SPEED=(--device cpu --size 33 --batch 2 --backbone resnet18 --steps 1 --warmup 0
                                 --loader-images 2 --image-size 48 96 --workers 0)
    DATA=(--height 48 --width 96 --num-train 8 --num-val 2); RUN=(--backbone resnet18 --crop-size 32 --workers 0)
else
    DEVICE=cuda; AMP=bf16; SPEED=(--loader-images 32)
    DATA=(--height 512 --width 1024 --num-train 32 --num-val 4); RUN=(--backbone resnet50 --crop-size 321)
fi

step() {  # step NAME COMMAND...: runs it, tees its output to OUT_DIR/NAME.txt, records PASS/FAIL
    local name=$1; shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    RESULTS+=("$([ "$rc" = 0 ] && echo PASS || echo "FAIL (exit $rc)") $name")
}

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(0))"; uptime; } > "$OUT_DIR/machine.txt" 2>&1

if [ "$DEVICE" = cuda ]; then
    step gpu_tests timeout 240 "$PY" -m pytest -q -m gpu tests/test_losses.py tests/test_train.py
fi
step train_speed timeout 300 "$PY" benchmarks/train_speed.py "${SPEED[@]}"

# --- a short real run: trains 3 epochs (evaluating after each), killed after the first checkpoint, resumed
data="$OUT_DIR/city" run="$OUT_DIR/run"
rm -rf "$run"
"$PY" -m training.synthetic --dataset cityscapes --out "$data" "${DATA[@]}" > "$OUT_DIR/synthetic.txt" 2>&1
args=(-m training.run --dataset cityscapes --clicks 20 --data-root "$data" --out "$run" --pretrained none
      --epochs 3 --batch-size 2 --amp "$AMP" --device "$DEVICE" --eval-mode center --log-every 1 "${RUN[@]}")
launcher=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1)
# setsid: torchrun and its worker form one process group of their own, killed together below by its id
setsid "${launcher[@]}" "${args[@]}" > "$OUT_DIR/run_killed.txt" 2>&1 &
pid=$!
for _ in $(seq 1 1200); do  # up to 10 minutes for the first checkpoint
    [ -f "$run/last.pt" ] || ! kill -0 "$pid" 2>/dev/null && break
    sleep 0.5
done
if kill -0 "$pid" 2>/dev/null; then
    kill -9 -- "-$pid"; wait "$pid" 2>/dev/null
    RESULTS+=("PASS run_killed (killed after its first checkpoint)")
else
    wait "$pid"; RESULTS+=("FAIL run_killed (ended by itself before it could be killed: exit $?)")
fi
step run_resumed timeout 600 "${launcher[@]}" "${args[@]}" --resume auto
"$PY" - "$run" > "$OUT_DIR/run_check.txt" 2>&1 <<'EOF'
import sys
from pathlib import Path
from agmm_deploy.checkpoint import read_checkpoint
run = Path(sys.argv[1])
ckpt = read_checkpoint(run / "last.pt")
log = (run / "train.log").read_text()
print(f"step {ckpt['step']} of {ckpt['total_steps']}, epoch {ckpt['epoch']}, amp {ckpt['args']['amp']}, "
      f"memory format {ckpt['args']['memory_format']}, mIoU {ckpt['miou']}")
assert ckpt["step"] == ckpt["total_steps"] and ckpt["epoch"] == 2, "the resumed run did not reach its last step"
assert "resumed from" in log and log.count("validation, mode center") >= 3, "no resume, or fewer than 3 evaluations"
print("trained, evaluated, killed and resumed to the end")
EOF
RESULTS+=("$([ $? = 0 ] && echo PASS || echo FAIL) run_check ($(tail -1 "$OUT_DIR/run_check.txt"))")

# --- SIGTERM mid-epoch on CUDA/nccl, then the rerun
run="$OUT_DIR/preempted"
rm -rf "$run"
pargs=(-m training.run --dataset cityscapes --clicks 20 --data-root "$data" --out "$run" --pretrained none
       --epochs 20 --max-steps 40 --eval-every 100 --save-every 0 --batch-size 2 --amp "$AMP" --device "$DEVICE"
       --eval-mode center --log-every 1 "${RUN[@]}")
"${launcher[@]}" "${pargs[@]}" > "$OUT_DIR/run_preempted.txt" 2>&1 &
pid=$!
for _ in $(seq 1 1200); do  # until step 5 is logged
    grep -qs '"step": 5,' "$run/metrics.jsonl" || ! kill -0 "$pid" 2>/dev/null && break
    sleep 0.5
done
start=$(date +%s); kill -TERM "$pid"; wait "$pid"; rc=$?; took=$(( $(date +%s) - start ))
if grep -qs "preempted at step" "$run/train.log" && [ "$took" -le 10 ]; then
    RESULTS+=("PASS sigterm (torchrun exit $rc after ${took} s: $(grep -o 'preempted at step [0-9]*' "$run/train.log"))")
else
    RESULTS+=("FAIL sigterm (torchrun exit $rc after ${took} s, no 'preempted at step' line or over 10 s)")
fi
step sigterm_resumed timeout 600 "${launcher[@]}" "${pargs[@]}" --resume auto
"$PY" - "$run" > "$OUT_DIR/sigterm_check.txt" 2>&1 <<'EOF'
import json
import sys
from pathlib import Path
from agmm_deploy.checkpoint import read_checkpoint
run = Path(sys.argv[1])
steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
assert steps == list(range(1, 41)), f"steps logged {steps[:3]}...{steps[-3:]}, expected 1..40 once each"
ckpt = read_checkpoint(run / "last.pt")
assert ckpt["step"] == 40 and "resumed from" in (run / "train.log").read_text()
print(f"SIGTERM mid-epoch on {ckpt['args']['device']} ({ckpt['args']['amp']}), resumed to step 40")
EOF
RESULTS+=("$([ $? = 0 ] && echo PASS || echo FAIL) sigterm_check ($(tail -1 "$OUT_DIR/sigterm_check.txt"))")

printf '%s\n' "${RESULTS[@]}" | tee "$OUT_DIR/summary.txt"
! grep -q FAIL "$OUT_DIR/summary.txt"
