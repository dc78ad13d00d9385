#!/usr/bin/env bash
# Issue 17's accelerator run, under 10 minutes on one H100/H200-class GPU:
#   bash benchmarks/device_check.sh [OUT_DIR]
# 1. The GPU config's train step (configs/shapes.py:gpu: 128 channels, bfloat16 compute with
#    float32 weights) at batch 256: images/s, compile seconds, XLA's FLOPs per image, MFU against
#    the bf16 dense peak (989 TFLOP/s, H100/H200 SXM), peak GPU memory; interleaved with the same
#    architecture in diffusers under torch.compile (autocast bf16), printing ours / peer.
# 2. Guided DPM-Solver++(2M) sampling, 20 steps at batch 64, against the same peer.
# Needs the pinned stack with jax[cuda12], plus torch (CUDA) and diffusers for the peer.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/device_check}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 540 python -m benchmarks.throughput --config=configs/shapes.py:gpu --batch=256 \
    --rounds=5 --steps=10 --sampler --sample_batch=64 --sample_steps=20 --peak_tflops=989 \
    --peer --peer_compile --out="$OUT/throughput_gpu.json" 2>&1 | tee "$OUT/throughput_gpu.log"
