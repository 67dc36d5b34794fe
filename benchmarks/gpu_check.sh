#!/usr/bin/env bash
# Speed comparison and one permuted-MNIST accuracy run on a CUDA GPU, in about 5 minutes.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
#
# Needs MNIST in $VSFCL_DATA_ROOT/MNIST/raw (default ~/.cache/vsfcl/data), because a GPU
# machine may have no network: copy that folder (53 MB) next to the checkout first.
# Exits with status 2 and a message when torch.cuda.is_available() is false or MNIST is missing.
set -euo pipefail

out="${1:-${OUT:-benchmarks/results/gpu}}"
python="${PYTHON:-python}"

if ! "$python" -c 'import torch, vsfcl' 2>/dev/null; then
    echo "gpu_check: $python cannot import torch and vsfcl; activate the project's environment" \
         "or set PYTHON to its interpreter" >&2
    exit 2
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch.cuda.is_available() is false, so there is no GPU to check;" \
         "run benchmarks/speed.py on the CPU instead" >&2
    exit 2
fi
raw="${VSFCL_DATA_ROOT:-$HOME/.cache/vsfcl/data}/MNIST/raw"
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [[ ! -f "$raw/$name" ]]; then
        echo "gpu_check: MNIST file $raw/$name is missing; set VSFCL_DATA_ROOT to a folder" \
             "that contains MNIST/raw (run vsfcl-data on a machine with network access, then copy it)" >&2
        exit 2
    fi
done
mkdir -p "$out"
"$python" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)' | tee "$out/device.txt"

# 1. Stock, fast and bare data paths, one epoch of 60,000 images each, twice. Estimated at about
#    2 minutes from the CPU numbers, most of it the stock paths and Avalanche's Fisher pass.
timeout 150 "$python" benchmarks/speed.py --device cuda --repeats 2 --json "$out/speed_cuda.json" \
    2>&1 | grep -v "No loggers specified" | tee "$out/speed_cuda.log"

# 2. Permuted MNIST, 10 experiences, one epoch each (the protocol of BENCHMARKS.md), with
#    the flatness regularizer at its defaults (estimate: 1-2 minutes; 3 on the 2-core CPU).
timeout 150 "$python" -m vsfcl.train benchmark=permuted_mnist strategy=flatness \
    strategy.strength=1e2 train_epochs=1 device=cuda progress_bar=false \
    hydra.run.dir="$out/permuted_mnist_flatness" 2>&1 | tail -n 20 | tee "$out/permuted_mnist_flatness.log"
echo "gpu_check: results in $out"
