#!/usr/bin/env bash
# The accelerator runs of issues 17 and 25, each under 10 minutes on one H100/H200-class GPU:
#   bash benchmarks/device_check.sh [OUT_DIR]              # both
#   CHECKS=sd bash benchmarks/device_check.sh [OUT_DIR]    # only issue 25's (or CHECKS=shapes)
# Issue 17 (CHECKS=shapes):
# 1. The GPU config's train step (configs/shapes.py:gpu: 128 channels, bfloat16 compute with
#    float32 weights) at batch 256: images/s, compile seconds, XLA's FLOPs per image, MFU against
#    the bf16 dense peak (989 TFLOP/s, H100/H200 SXM), peak GPU memory; interleaved with the same
#    architecture in diffusers under torch.compile (autocast bf16), printing ours / peer.
# 2. Guided DPM-Solver++(2M) sampling, 20 steps at batch 64, against the same peer.
# Issue 25 (CHECKS=sd), Stable Diffusion 1.5's 859.5M-parameter U-Net, random weights:
# 3. configs/sd.py:finetune's train step at 512 px (64 x 64 cached latents, CLIP-L embeddings),
#    bfloat16 compute, float32 weights, remat 'dots', batch 8: images/s, MFU against 989 TFLOP/s,
#    XLA's memory; A and B in turn in one process with diffusers' UNet2DConditionModel of the same
#    config.json under torch.compile (autocast bf16), printing ours / peer.
# 4. XLA's compiled memory of that step on the GPU, remat 'none' and 'dots' (the CPU table's
#    fsdp=1, batch 8 row, with the GPU's attention and scheduler).
# A check that fails or times out is reported and the next one runs.
# Needs the pinned stack with jax[cuda12], plus torch (CUDA) and diffusers for the peer.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/device_check}}
CHECKS=${CHECKS:-shapes sd}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [[ " $CHECKS " == *" shapes "* ]]; then
  timeout 540 python -m benchmarks.throughput --config=configs/shapes.py:gpu --batch=256 \
      --rounds=5 --steps=10 --sampler --sample_batch=64 --sample_steps=20 --peak_tflops=989 \
      --peer --peer_compile --out="$OUT/throughput_gpu.json" 2>&1 | tee "$OUT/throughput_gpu.log" \
      || echo "exit $? (throughput_gpu.log)"
fi
if [[ " $CHECKS " == *" sd "* ]]; then
  timeout 420 python -m benchmarks.sd_throughput --image_size=512 --dtype=bfloat16 --remat=dots \
      --batch=8 --rounds=5 --steps=5 --peak_tflops=989 --peer_compile \
      --out="$OUT/sd_throughput_gpu.json" 2>&1 | tee "$OUT/sd_throughput_gpu.log" \
      || echo "exit $? (sd_throughput_gpu.log)"
  timeout 240 python -m benchmarks.sd_memory --fsdp=1 --remat=none,dots --batch=8 \
      --out="$OUT/sd_memory_gpu.json" 2>&1 | tee "$OUT/sd_memory_gpu.log" \
      || echo "exit $? (sd_memory_gpu.log)"
fi
