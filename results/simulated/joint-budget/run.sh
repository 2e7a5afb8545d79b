#!/bin/bash
# The joint arm at rho = 0 under other budgets, each a run beside the sweep's (results/simulated/
# joint-budget/). Run from the repository root after
#   .venv/bin/nlpctr experiment --dataset simulated --out runs/simulated
# with one or more of: base head lr layers steps probe separate separate-probe50 separate-probe50-slow
set -euo pipefail
here=results/simulated/joint-budget
mkdir -p runs/joint-budget
cp -r runs/simulated/rho-0/runs/baseline runs/joint-budget/
for v in "$@"; do
  .venv/bin/nlpctr train --mode joint --fusion score --layers 6 --data runs/simulated/rho-0/data \
    --run "diag_$v" --runs-dir runs/joint-budget --config "$here/$v.yaml" --seed 0 \
    --init-from baseline --no-progress
  cp "runs/joint-budget/diag_$v/results.json" "$here/$v.results.json"
done
