#!/bin/bash
# The LM stage on the simulator at rho = 0 and 0.5, one change at a time (docs/RESULTS.md, "An LM
# stage that learns"). From the repository root: per rho, a simulated log (50,000 rows x 20
# impressions, seed 0), its features and E0, then the joint arm (score fusion, MiniLM's 6 layers)
# per variant YAML beside this script, all from the same E0; compare.py then writes paired
# group-bootstrap CIs of validation log loss into comparisons.json and comparisons.md.
#   RHOS="0 0.5" VARIANTS="probe today ..." OUT=runs/recipe bash results/simulated/recipe/run.sh
# SEED=s (default 0) simulates, splits and trains with seed s, under seed-<s>/ when s is not 0.
set -euo pipefail
here=results/simulated/recipe
out=${OUT:-runs/recipe}
nlpctr=.venv/bin/nlpctr
seed=${SEED:-0}
for rho in ${RHOS:-0 0.5}; do
  d=$out/rho-$rho
  [ "$seed" = 0 ] || d=$out/seed-$seed/rho-$rho
  if [ ! -f "$d/data/manifest.json" ]; then
    $nlpctr data simulate --rows 50000 --rho "$rho" --seed "$seed" --text-strength 0.8 --impressions-per-row 20 \
      --out "$d/log/log.parquet" --no-progress
    $nlpctr data prepare --dataset "$d/log/log.spec.yaml" --out "$d/data" --seed "$seed"
    $nlpctr ctr-stats --data "$d/data"
    $nlpctr embed --data "$d/data" --layers 6
    $nlpctr features apply --data "$d/data"
    $nlpctr features materialize --data "$d/data"
  fi
  if [ ! -f "$d/runs/baseline/results.json" ]; then
    $nlpctr train --mode baseline --data "$d/data" --run baseline --runs-dir "$d/runs" --seed "$seed" --no-progress
  fi
  for v in ${VARIANTS:-probe probe32 today schedule rows32 batch1024 lr bf16 layers2 noprobe cold steps400 lm1e4 ema95 lr1e3 ema95lr1e3 ema95layers2}; do
    [ -f "$d/runs/$v/results.json" ] && continue
    init=(--init-from baseline)
    [ "$v" = cold ] && init=()
    $nlpctr train --mode joint --fusion score --layers 6 --data "$d/data" --run "$v" --runs-dir "$d/runs" \
      --config "$here/$v.yaml" --seed "$seed" "${init[@]}" --no-progress
  done
done
.venv/bin/python "$here/compare.py" --runs "$out" --out "$here"
