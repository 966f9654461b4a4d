#!/usr/bin/env bash
# Device check (docs/models.md, "Devices"): SmolLM2 members per minute and neighbour passes per second.
# On a GPU: 10 members on credit-g and 200 scored rows. Without one: tiny settings that only exercise the path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec "$PYTHON" benchmarks/device_check.py --members 10 --rows 200 "$@"
else
  echo "no CUDA device: running tiny CPU settings (figures do not describe a GPU)" >&2
  exec "$PYTHON" benchmarks/device_check.py --members 2 --rows 4 --k 4 --epochs 1 --shots 16 --lora-layers 1 \
    --out benchmarks/results/device_check_cpu_tiny.json "$@"
fi
