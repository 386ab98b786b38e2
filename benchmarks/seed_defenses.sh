#!/usr/bin/env bash
# The seed defenses on the embedded synthetic data (issue 3's grid): the small CNN
# backdoored with BadNets 10% and Blended 10%, every seed defense at SPC 10 and SPC 100,
# 5 vmapped trials each, through the `bdjax defend` command a user would run.
#
#   bash benchmarks/seed_defenses.sh [OUT_DIR]        # default runs/seed_defenses
#
# Settings: configs/synthetic.py (CPU-scaled where it says so). Rows already in
# OUT_DIR/results.jsonl are skipped, so a killed run resumes. On a 2-core CPU the whole
# grid takes about an hour; the table is printed at the end and written to table.md.
set -euo pipefail
out=${1:-runs/seed_defenses}
bdjax=${BDJAX:-bdjax}
mkdir -p "$out"
for attack in badnets blended; do
  if [ ! -f "$out/$attack/bdjax.json" ]; then
    $bdjax attack --dataset synthetic --model small_cnn --attack "$attack" --ratio 0.1 \
      --target 0 --seed 0 --out "$out/$attack"
  fi
done
for attack in badnets blended; do
  for defense in fst lp fe_tuning ft_init ft_sam grad_prune npd; do
    for spc in 10 100; do
      $bdjax defend --checkpoint "$out/$attack" --defense "$defense" --spc "$spc" \
        --trials 5 --seed 0 --out "$out/results.jsonl"
    done
  done
done
$bdjax table "$out/results.jsonl" | tee "$out/table.md"
