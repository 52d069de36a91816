#!/bin/bash
# Alternated rounds of stepmin.py, before (prev worktree) and after (main), natively and with
# the emulated AVX2 build; each tree with its own extension cache (torch's JIT build keys on paths).
set -o pipefail
# run from the repository root; stepmin.py is beside this script. Before: git worktree add /tmp/prev cad3f80
# (with fastmask/csrc, kernels, bench linked to the tree's), after: 6078226 in /work/main.
out=$(realpath "${1:-bench/results/cpu-config-memo-2026-12-07}")
rounds=${2:-7}

for r in $(seq 1 $rounds); do
  for side in prev next; do
    if [ $side = prev ]; then dir=/tmp/prev; ext=/tmp/ext_prev; else dir=/work/main; ext=/tmp/dev_ext; fi
    (cd $dir && TORCH_EXTENSIONS_DIR=$ext PYTHONPATH=$dir /work/main/.venv/bin/python $out/stepmin.py >> $out/avdigits-step-best-native-$side.jsonl) || exit 1
    (cd $dir && ATEN_CPU_CAPABILITY=avx2 TORCH_EXTENSIONS_DIR=$ext PYTHONPATH=$dir /work/main/.venv/bin/python $out/stepmin.py avx2 >> $out/avdigits-step-best-avx2-$side.jsonl) || exit 1
  done
done
