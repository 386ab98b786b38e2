#!/usr/bin/env bash
# The seed defenses on the embedded synthetic data: the small CNN backdoored with BadNets
# 10% and Blended 10% (one checkpoint per attack and attack seed), every defense at
# SPC 10 and SPC 100, TRIALS vmapped trials each, through the `bdjax defend` command a
# user would run.
#
#   bash benchmarks/seed_defenses.sh [OUT_DIR]        # default runs/seed_defenses
#
# Environment (defaults in brackets):
#   SEEDS     attack seeds, one checkpoint each [0]; issue 8's check uses "1 2", seeds
#             the tests never train
#   TRIALS    trials per cell [5]
#   DEFENSES  [fst lp fe_tuning ft_init ft_sam grad_prune npd]
#   SPCS      [10 100]
#   BDJAX     the command [bdjax]; e.g. "python -m bdjax" from the source tree
#
# Settings: configs/synthetic.py (CPU-scaled where it says so). Rows already in
# OUT_DIR/results.jsonl are skipped, so a killed run resumes. On a 2-core CPU one seed
# takes about an hour; the table is printed at the end and written to table.md.
set -euo pipefail
out=${1:-runs/seed_defenses}
bdjax=${BDJAX:-bdjax}
seeds=${SEEDS:-0}
trials=${TRIALS:-5}
defenses=${DEFENSES:-fst lp fe_tuning ft_init ft_sam grad_prune npd}
spcs=${SPCS:-10 100}
mkdir -p "$out"
for seed in $seeds; do
  for attack in badnets blended; do
    ckpt="$out/$attack-seed$seed"
    if [ ! -f "$ckpt/bdjax.json" ]; then
      $bdjax attack --dataset synthetic --model small_cnn --attack "$attack" --ratio 0.1 \
        --target 0 --seed "$seed" --out "$ckpt" --no-progress
    fi
  done
done
for seed in $seeds; do
  for attack in badnets blended; do
    for defense in $defenses; do
      for spc in $spcs; do
        $bdjax defend --checkpoint "$out/$attack-seed$seed" --defense "$defense" \
          --spc "$spc" --trials "$trials" --seed 0 --out "$out/results.jsonl"
      done
    done
  done
done
$bdjax table "$out/results.jsonl" | tee "$out/table.md"
