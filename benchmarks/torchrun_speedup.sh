#!/usr/bin/env bash
# Speed-up from 1 to 2 CPU processes with torchrun (gloo), one BLAS thread per process, on this machine.
# Usage: bash benchmarks/torchrun_speedup.sh [OUTDIR]   (prints wall seconds for each configuration)
set -euo pipefail
OUT="${1:-/tmp/np-torchrun}"
rm -rf "$OUT"; mkdir -p "$OUT"
PY=.venv/bin/python; TR=.venv/bin/torchrun
ARGS=(train --arch fc --dataset mnist --regime relu --epochs 2 --limit-train 20000 --limit-test 2000)
t() { local s=$(date +%s.%N); "$@" > /dev/null; echo "$(echo "$(date +%s.%N) - $s" | bc)"; }
echo "train 1 process (1 thread):  $(OMP_NUM_THREADS=1 t $PY -m neuralpath "${ARGS[@]}" --out "$OUT/t1") s"
echo "train 2 processes (torchrun): $(OMP_NUM_THREADS=1 t $TR --standalone --nproc_per_node 2 -m neuralpath "${ARGS[@]}" --out "$OUT/t2") s"
echo "train 1 process (2 threads): $(OMP_NUM_THREADS=2 t $PY -m neuralpath "${ARGS[@]}" --out "$OUT/t3") s"
KA=(kernel npk --num-inputs 20000 --block 1024)
echo "npk 20k 1 process (1 thread):  $(OMP_NUM_THREADS=1 t $PY -m neuralpath "${KA[@]}" --out "$OUT/k1.npy") s"
echo "npk 20k 2 processes (torchrun): $(OMP_NUM_THREADS=1 t $TR --standalone --nproc_per_node 2 -m neuralpath "${KA[@]}" --out "$OUT/k2.npy") s"
echo "npk 20k 1 process (2 threads): $(OMP_NUM_THREADS=2 t $PY -m neuralpath "${KA[@]}" --out "$OUT/k3.npy") s"
$PY -c "import numpy as np; a=np.load('$OUT/k1.npy'); b=np.load('$OUT/k2.npy'); print('npk 1 vs 2 processes bit-identical:', bool((a==b).all()))"
