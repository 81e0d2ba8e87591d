#!/usr/bin/env bash
# The evidence in docs/RESULTS.md on the 2-core CPU machine, in the order it was run (each step resumes where it
# stopped; re-running skips finished runs). Many hours of compute: run it under nohup. Two lanes can run side by
# side on the 2 cores: lane a (the conv networks) and lane b (the small networks, 1 thread), e.g.
#   nohup bash scripts/cpu-evidence.sh a >> runs/evidence-a.log 2>&1 &
#   nohup bash scripts/cpu-evidence.sh b >> runs/evidence-b.log 2>&1 &
# With no argument the lanes run one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=.venv/bin/neuralpath
lane_a() {
  $NP reproduce table --rows gconv-adam,vconv-adam --seeds 3 --budget cpu --out runs/table-cpu
  R=runs/table-cpu/runs/gconv-adam
  $NP reproduce kernels --relu-run $R/relu-s0,$R/relu-s1,$R/relu-s2 --out runs/kernels-gconv   # done in session 9
  $NP reproduce budget --grid cpu-main --out runs/budget               # ReLU vs FRNPF-II (then FLNPF), GCONV x1/4, 10k, 120 ep; done
  $NP reproduce budget --grid cpu --out runs/budget                    # the rest of the budget grid
}
lane_b() {
  export OMP_NUM_THREADS=1
  # done in sessions 4-5 (records in docs/results); each resumes or skips when re-run:
  if [ "${NEURALPATH_EVIDENCE_ALL:-0}" = 1 ]; then
    $NP reproduce dlgn --budget cpu --out runs/dlgn                    # the oblique-tree benchmark, 300 epochs
    $NP reproduce nu --out runs/nu                                     # the quick experiments (minutes each)
    $NP reproduce ntk-split --out runs/ntk-split
    $NP reproduce theorem --out runs/theorem
    $NP reproduce kernels --out runs/kernels
    $NP reproduce gates --out runs/gates
    $NP reproduce dlgn --cifar --out runs/dlgn-cifar                   # conv DLGN vs ReLU, CPU conv budget, 3 seeds
  fi
  # FLNPF with its independent value initialisation (and the ReLU runs it takes its gates from), 5 seeds
  $NP reproduce table --rows fc-adam --regimes relu,flnpf --seeds 5 --budget paper --out runs/paper-fc-adam
  $NP reproduce resnet --budget cpu --out runs/resnet                  # any-network: a small ResNet on CIFAR-10
  # continuous NPF learning on GCONV (the CIFAR-10 evidence comes before fc-sgd; moved here from lane a in session 7)
  $NP reproduce continuous --budget cpu --out runs/continuous-cpu
  $NP reproduce table --rows fc-sgd --seeds 5 --budget paper --out runs/paper-fc-sgd   # done in session 11
  # the 50,000 x 50,000 CIFAR-10 NPK of the cpu-budget GCONV ReLU net (seed 0), 10 GB; the stream resumes after a
  # stop (session 12: ~2.1 h on both cores at the compiled tile pass's rate, ~5 h on this lane's one thread)
  K=runs/npk50k/gconv-relu-s0-train50k.npy
  if [ ! -f $K ]; then
    echo "npk50k: start $(date -u +%FT%TZ)"
    /usr/bin/time -v $NP kernel npk --checkpoint runs/table-cpu/runs/gconv-adam/relu-s0 --dataset cifar10 \
      --split train --num-inputs 50000 --out $K
    echo "npk50k: end $(date -u +%FT%TZ)"
  fi
}

case "${1:-}" in
  a) lane_a ;;
  b) lane_b ;;
  "") lane_a; lane_b ;;
  *) echo "usage: $0 [a|b]" >&2; exit 2 ;;
esac
