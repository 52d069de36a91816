#!/bin/bash
# Issue 23's bench, natively and on the emulated AVX2 machine, in alternated rounds.
set -o pipefail
out=$(dirname "$(realpath "$0")")/bench
rounds=${1:-5}
py=${PYTHON:-.venv/bin/python}
args=(--device cpu --sets large av-resnet18 small --backends cpp --no-baselines)
for r in $(seq 1 "$rounds"); do
  $py -m fastmask.cli bench "${args[@]}" --json "$out/native-$r.json" > "$out/native-$r.log" 2>&1 || exit 1
  $py -m fastmask.bench.avx2_machine bench "${args[@]}" --json "$out/avx2-$r.json" > "$out/avx2-$r.log" 2>&1 || exit 1
done
