#!/usr/bin/env bash
# The GPU path, checked in one script (about 10 minutes on one GPU):
#   1. the tests marked `cuda` (bf16 autocast against fp32, the flash-attention kernel, compiled blocks);
#   2. short training runs of the small and base presets in bf16 with flash attention and torch.compile;
#   3. train.py under torchrun on one GPU (NCCL set-up and teardown), resumed from its checkpoint; with
#      several GPUs, DDP and FSDP2 on all of them, and an FSDP2 checkpoint resumed on one GPU;
#   4. lab.bench on the GPU: matmul limit, tokens/s and MFU of the training step against the GPU's
#      peak (PEAK_TFLOPS, default 989: the dense bf16 peak of an H100 / H200), peak memory.
# The results table is appended to lab/BENCHMARKS.md with the date and the GPU's name; logs go to $OUT.
#
#     bash lab/gpu_check.sh                 # OUT=runs/gpu_check PEAK_TFLOPS=989 by default
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "lab/gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was run" >&2
    exit 2
fi
OUT=${OUT:-runs/gpu_check}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
mkdir -p "$OUT"
echo "$(date -u '+%Y-%m-%d %H:%M UTC'): $NGPU x $GPU, torch $(python -c 'import torch; print(torch.__version__)')"
stage() { echo "== $1"; SECONDS=0; }
done_in() { echo "   ok in ${SECONDS}s"; }
SHORT=(--device=cuda --dtype=bf16 --compile=true --eval_every=0 --ckpt_every=1000 --final_report=false)

stage "1. tests marked cuda"
python -m pytest -q -m cuda tests/test_cuda.py
done_in

for preset in small base; do
    stage "2. $preset: bf16, flash attention, compile (40 steps)"
    python train.py --preset=$preset "${SHORT[@]}" --max_steps=40 --out_dir="$OUT/$preset" > "$OUT/$preset.log" 2>&1
    tr '\r' '\n' < "$OUT/$preset.log" | tail -3
    done_in
done

stage "3. torchrun on one GPU, then resumed"
TR=(torchrun --standalone --nproc_per_node=1 train.py --preset=small "${SHORT[@]}")
"${TR[@]}" --max_steps=20 --out_dir="$OUT/torchrun" > "$OUT/torchrun.log" 2>&1
"${TR[@]}" --max_steps=30 --resume="$OUT/torchrun/ckpt.pt" > "$OUT/torchrun_resumed.log" 2>&1
done_in
if [ "$NGPU" -gt 1 ]; then
    stage "3b. DDP and FSDP2 on $NGPU GPUs; the FSDP2 checkpoint resumed on one"
    MULTI=(torchrun --standalone --nproc_per_node="$NGPU" train.py --preset=small "${SHORT[@]}" --max_steps=20)
    "${MULTI[@]}" --out_dir="$OUT/ddp" > "$OUT/ddp.log" 2>&1
    "${MULTI[@]}" --fsdp=true --out_dir="$OUT/fsdp" > "$OUT/fsdp.log" 2>&1
    python train.py --resume="$OUT/fsdp/ckpt.pt" --max_steps=30 > "$OUT/fsdp_resumed.log" 2>&1
    done_in
fi

stage "4. lab.bench on the GPU"
python -m lab.bench --device cuda --only matmul,train,memory --gpu-peak-tflops "$PEAK_TFLOPS" \
    --json "$OUT/bench.json" --markdown > "$OUT/bench.md"
{
    echo
    echo "## GPU: $NGPU x $GPU ($(date -u '+%Y-%m-%d'), \`bash lab/gpu_check.sh\`)"
    echo
    cat "$OUT/bench.md"
} >> lab/BENCHMARKS.md
done_in
echo "all GPU checks passed; the table is appended to lab/BENCHMARKS.md, logs are in $OUT"
