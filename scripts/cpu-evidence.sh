#!/usr/bin/env bash
# The evidence in docs/RESULTS.md on the 2-core CPU machine, in the order it was run (each step resumes where it
# stopped; re-running skips finished runs). Many hours of compute: run it under nohup.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=.venv/bin/neuralpath
$NP reproduce budget --grid cpu-main --out runs/budget                 # ReLU vs FRNPF-II, GCONV x1/4, 10k, 120 ep
$NP reproduce nu --out runs/nu                                         # the quick experiments (minutes each)
$NP reproduce ntk-split --out runs/ntk-split
$NP reproduce theorem --out runs/theorem
$NP reproduce kernels --out runs/kernels
$NP reproduce gates --out runs/gates
$NP reproduce table --rows gconv-adam,vconv-adam --seeds 3 --budget cpu --out runs/table-cpu
$NP reproduce kernels --relu-run runs/table-cpu/runs/gconv-adam/relu-s0 --out runs/kernels-gconv
$NP reproduce continuous --budget cpu --out runs/continuous-cpu
$NP reproduce resnet --budget cpu --out runs/resnet
$NP reproduce table --rows fc-adam --seeds 5 --budget paper --out runs/paper-fc-adam
$NP reproduce dlgn --budget cpu --out runs/dlgn
$NP reproduce budget --grid cpu --out runs/budget                      # the rest of the budget grid
$NP reproduce table --rows fc-sgd --seeds 5 --budget paper --out runs/paper-fc-sgd
