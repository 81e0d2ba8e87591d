#!/usr/bin/env bash
# The CIFAR-10 evidence of docs/RESULTS.md on the 2-core CPU machine, in the order it was run (each step resumes
# where it stopped; re-running skips finished runs). Hours of compute: run it under nohup.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=.venv/bin/neuralpath
$NP reproduce budget --grid cpu-main --out runs/budget                 # ReLU vs FRNPF-II, GCONV x1/4, 10k, 120 ep
$NP reproduce table --rows gconv-adam,vconv-adam --seeds 3 --budget cpu --out runs/table-cpu
$NP reproduce continuous --budget cpu --out runs/continuous-cpu
$NP reproduce table --rows fc-adam --seeds 5 --budget paper --out runs/paper-fc-adam
$NP reproduce budget --grid cpu --out runs/budget                      # the rest of the budget grid
