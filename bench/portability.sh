#!/usr/bin/env bash
# The test suite under every CPU kernel set this machine's PyTorch offers, at one and two threads:
# a test that passes under one and fails under another compares with a tolerance the code does not
# guarantee. ATEN_CPU_CAPABILITY picks PyTorch's own vectorised kernels (default = no explicit
# vectors, avx2, avx512 where the CPU has it); "avx2-machine" also caps oneDNN and MKL at AVX2, as on
# a CPU with AVX2 and no VNNI (the int8 kernels then take their int16 pair-sum path); OMP_NUM_THREADS
# sets the threads of every process the tests start. Prints a Markdown table; each run's log goes to
# $OUT/<kernels>_t<threads>.log.
#
#   bash bench/portability.sh                 # the whole matrix, one run after another
#   JOBS=2 bash bench/portability.sh          # the one-thread runs two at a time (2 cores)
#   KERNELS=avx2-machine THREADS=2 bash bench/portability.sh    # one cell
#   bash bench/portability.sh -k torchrun     # extra arguments go to pytest
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/portability}
JOBS=${JOBS:-1}
THREADS=${THREADS:-1 2}
mkdir -p "$OUT"
kernels="default avx2 avx2-machine"
grep -qw avx512f /proc/cpuinfo && kernels="$kernels avx512"
kernels=${KERNELS:-$kernels}
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
flags=$(grep -m1 -ow -E "avx512_vnni|avx_vnni" /proc/cpuinfo | sort -u | tr '\n' ' ')

run() {  # kernels threads [pytest args]: one pytest run; its summary line and wall time go to $OUT/<k>_t<t>.result
  local k=$1 t=$2 log="$OUT/${1}_t${2}.log" start=$SECONDS env=()
  case $k in
    avx2-machine) env=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2) ;;
    *) env=(ATEN_CPU_CAPABILITY="$k") ;;
  esac
  env "${env[@]}" OMP_NUM_THREADS="$t" MKL_NUM_THREADS="$t" python -m pytest -p no:cacheprovider \
    --basetemp "$OUT/tmp_${k}_t${t}" "${@:3}" > "$log" 2>&1
  local rc=$? summary failed
  summary=$(grep -E "[0-9]+ (passed|failed|error)" "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
  failed=$(grep -E "^(FAILED|ERROR) " "$log" | sed 's/ - .*//' | tr '\n' ' ')
  echo "| $k | $t | $rc | $summary | $((SECONDS - start)) s | ${failed:--} |" > "$OUT/${k}_t${t}.result"
}

pids=()
for t in $THREADS; do
  for k in $kernels; do
    if [ "$t" = 1 ] && [ "$JOBS" -gt 1 ]; then
      run "$k" "$t" "$@" &
      pids+=($!)
      if [ "${#pids[@]}" -ge "$JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    else
      wait
      pids=()
      run "$k" "$t" "$@"
    fi
  done
done
wait

echo "CPU: $cpu (${flags:-no VNNI}), $(nproc) cores; torch $(python -c 'import torch; print(torch.__version__)')"
echo
echo "| kernels | threads | exit | pytest summary | wall | failed |"
echo "|---|---|---|---|---|---|"
for t in $THREADS; do for k in $kernels; do cat "$OUT/${k}_t${t}.result"; done; done
