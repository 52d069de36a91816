#!/bin/bash
# The runs of this folder: alternated rounds of "prev" (a worktree of 02ad053, the kernels before
# half_convert.h, with 279e182's bench/suites.py and fastmask/cli.py copied in for --dtype) and "new"
# (279e182), each natively and through python -m fastmask.bench.avx2_machine; ./run.sh "bf16 fp16 fp32" 2
set -o pipefail
out=/tmp/w/ab/out; mkdir -p $out
dtypes="$1"; rounds="$2"
cd /work/main
for r in $(seq 1 $rounds); do
 for dt in $dtypes; do
  for tree in prev new; do
   for isa in native avx2; do
    if [ $tree = prev ]; then root=/tmp/prev; ext=/tmp/ext_prev; else root=/work/main; ext=/tmp/dev_ext; fi
    if [ $isa = native ]; then mod="fastmask"; else mod="fastmask.bench.avx2_machine"; fi
    f=$out/$dt-$tree-$isa-r$r.json
    (cd $root && PYTHONPATH=$root TORCH_EXTENSIONS_DIR=$ext /work/main/.venv/bin/python -m $mod bench --device cpu --sets large av-resnet18 --backends cpp --no-baselines --variants amss+-adamw-grad2 amss+-adamw-grad2-row amss+-adamw-dense --dtype $dt --json $f > $f.log 2>&1) || echo "FAIL $f"
   done
  done
 done
done
echo done
