#!/usr/bin/env bash
# The GPU check: the full-size joint recipe and its probe-only control on Upworthy and on the
# simulator at rho = 0.5 (bench/gpu/train_gpu.py), at most 10 minutes on one H100.
#
#   here, once:   .venv/bin/python bench/gpu/prepare.py        # writes bench/gpu/work/ (ignored)
#   on the GPU:   bash bench/gpu/run.sh                        # carry bench/gpu/work with the tree
#   on a CPU:     PYTHON=.venv/bin/python bash bench/gpu/run.sh --smoke   # the whole path, tiny
#
# The device machine has its own Python 3.12 with a CUDA build of torch and transformers, no Beam,
# no Feast, no network: this imports only nlpctr's models/ and reads the prepared tensors. Its
# first step prints what it relies on there and stops, in one line, when something is missing.
# Results land in results/gpu/ (--smoke: runs/gpu-smoke/) and, when $OUT is set (the device
# tool's folder that comes back), are copied there too. Extra arguments go to train_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"

"$PY" - <<'PYEOF'
import importlib, platform, sys
needed = ["torch", "transformers", "safetensors", "numpy", "pandas", "pyarrow", "sklearn", "scipy", "yaml", "tqdm"]
found, missing = {}, []
for name in needed:
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "?")
    except ImportError:
        missing.append(name)
print(f"[gpu] python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
if missing:
    sys.exit(f"[gpu] error: this Python lacks {', '.join(missing)}: pip install them (scikit-learn for sklearn, pyyaml for yaml)")
import torch
cuda = torch.cuda.is_available()
print(f"[gpu] CUDA {torch.version.cuda}: " + (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, bf16 {torch.cuda.is_bf16_supported()}" if cuda else "no device (the CPU runs it)"), flush=True)
PYEOF

out="results/gpu" previous=""
for arg in "$@"; do
  [ "$arg" = "--smoke" ] && [ "$out" = "results/gpu" ] && out="runs/gpu-smoke"
  [ "$previous" = "--out" ] && out="$arg"
  previous="$arg"
done
"$PY" bench/gpu/train_gpu.py "$@"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp -r "$out" "$OUT/"
fi
