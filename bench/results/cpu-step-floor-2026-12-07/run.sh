#!/bin/bash
# floor.py in alternated rounds: natively with 2 threads and with 1, and on the emulated AVX2
# machine (torch on its AVX2 kernels, the extension without AVX-512) with 2 threads.
set -o pipefail
out=$(dirname "$(realpath "$0")")
rounds=${1:-3}
py=${PYTHON:-.venv/bin/python}
for r in $(seq 1 "$rounds"); do
  $py "$out/floor.py" >> "$out/floor-native.jsonl" || exit 1
  OMP_NUM_THREADS=1 $py "$out/floor.py" >> "$out/floor-native-1-thread.jsonl" || exit 1
  ATEN_CPU_CAPABILITY=avx2 $py "$out/floor.py" avx2 >> "$out/floor-avx2.jsonl" || exit 1
done
