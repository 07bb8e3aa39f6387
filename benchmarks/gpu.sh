#!/usr/bin/env bash
# One GPU (H100/H200), the README's install, ≤ 10 minutes: the KD-loss benchmark at 32k/128k/262k
# words and 8k positions (memory and time vs naive, and vs Liger's fused loss when installed),
# a distillation step's throughput and MFU for a ~125M student of a ~350M teacher at sequence
# length 1024 in bf16, and the step overhead. Writes text and JSON under the folder given
# (default results/gpu/<device>/), to commit.
#   bash benchmarks/gpu.sh [OUT]        TINY=1 bash benchmarks/gpu.sh OUT   (CPU smoke sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
out=${1:-results/gpu/$name}
mkdir -p "$out"
if [ "${TINY:-0}" = 1 ]; then
  kd=(--positions 64 --hidden 32 --vocabs 512 --repeats 1 --error-positions 8 --no-compile)
  step=(--teacher tiny --student tiny --student-layers 1 --seq-len 32 --batch-size 2
        --vocab-size 512 --steps 1 --rounds 1 --logit-chunk-size 16)
else
  kd=(--positions 8192 --hidden 1024 --vocabs 32768 131072 262144 --repeats 3)
  # H100/H200 dense bf16 peak: 989 TFLOP/s (SXM).
  step=(--teacher 350m --student 125m --seq-len 1024 --batch-size 8 --vocab-size 32768
        --precision bf16 --steps 5 --rounds 2 --logit-chunk-size 2048 --peak-tflops 989)
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/device.txt"
python benchmarks/kd_loss.py "${kd[@]}" --json "$out/kd_loss.json" | tee "$out/kd_loss.txt"
python benchmarks/step_throughput.py "${step[@]}" | tee "$out/step_throughput.txt"
tail -n 1 "$out/step_throughput.txt" > "$out/step_throughput.json"
echo "gpu.sh: results in $out"
