#!/usr/bin/env bash
# On an H200: build hoptune._C, run the gpu-marked tests, compute-sanitizer over every kernel,
# then the benchmarks; logs and JSON under OUTDIR, a short summary printed last.
#
#   bash bench/run_gpu.sh OUTDIR [STAGE ...]     stages: build tests sanitize bench:<name> ...
#                                                (default: build tests sanitize and the nf4_dequant,
#                                                nf4_lora and logprob benchmarks)
# Wheels missing on the machine (nvidia-cutlass, bitsandbytes, liger-kernel) are taken from .whl/
# when present.
set -uo pipefail
OUT=${1:?usage: bench/run_gpu.sh OUTDIR [STAGE ...]}
shift
mkdir -p "$OUT/logs" "$OUT/json"
STAGES=${*:-"build tests sanitize bench:nf4_dequant bench:nf4_lora bench:logprob"}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader)"

for stage in $STAGES; do
  t0=$(date +%s)
  case $stage in
    build)
      HOPTUNE_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/logs/build.log" 2>&1
      rc=$?
      so=$(python3 -c "import hoptune._C as m; print(m.__file__)" 2>>"$OUT/logs/build.log")
      note "build rc=$rc module=$so"
      note "  C7510 warnings: $(grep -c C7510 "$OUT/logs/build.log")   spills: $(grep -ci 'bytes spill' "$OUT/logs/build.log")"
      [ -n "$so" ] && note "  elf: $(cuobjdump --list-elf "$so" 2>&1 | grep -o 'sm_[0-9a-z]*' | sort | uniq -c | tr '\n' ' ')"
      [ $rc -eq 0 ] || { note "build failed"; tail -40 "$OUT/logs/build.log"; break; }
      ;;
    tests)
      HOPTUNE_REQUIRE_GPU_TESTS=1 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests >"$OUT/logs/gpu_tests.log" 2>&1
      note "gpu tests rc=$?: $(tail -1 "$OUT/logs/gpu_tests.log")"
      grep -E "^(FAILED|ERROR)" "$OUT/logs/gpu_tests.log" | head -20 | tee -a "$SUMMARY"
      ;;
    sanitize)
      # every report printed (the default stops at 100), so the per-kernel counts below are whole
      for tool in memcheck racecheck initcheck; do
        compute-sanitizer --tool $tool --print-limit 1000000 --error-exitcode 9 python3 bench/sanitize_kernels.py \
          >"$OUT/logs/sanitize_$tool.log" 2>&1
        note "compute-sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/logs/sanitize_$tool.log" | tail -1)"
      done
      # which kernels racecheck and initcheck flag, and the same check on plain PyTorch reading a
      # cuBLAS result
      grep -A2 "Race reported" "$OUT/logs/sanitize_racecheck.log" | grep -oE "(nvjet|hoptune::)[A-Za-z0-9_:]*" \
        | sort | uniq -c | head -8 | tee -a "$SUMMARY"
      # (template kernels print as "at void ns::name<...>(...)", the others as "at ns::name(...)")
      grep -A1 "Uninitialized" "$OUT/logs/sanitize_initcheck.log" | grep -oE "at (void )?[^(]*" | sort | uniq -c \
        | tee -a "$SUMMARY"
      compute-sanitizer --tool initcheck --error-exitcode 9 python3 bench/sanitize_kernels.py probe_cublas \
        >"$OUT/logs/sanitize_probe.log" 2>&1
      note "initcheck probe (PyTorch reading a cuBLAS fp32 GEMM result) rc=$?: $(grep -E 'ERROR SUMMARY' "$OUT/logs/sanitize_probe.log" | tail -1)"
      ;;
    bench:*)
      name=${stage#bench:}
      python3 "bench/bench_$name.py" --out "$OUT/json/$name.json" >"$OUT/logs/bench_$name.log" 2>&1
      note "bench $name rc=$?"
      ;;
    *) note "unknown stage $stage" ;;
  esac
  note "  ($stage: $(($(date +%s) - t0)) s)"
done

tar -C "$OUT" -czf "$OUT/logs.tgz" logs && tar -C "$OUT" -czf "$OUT/json.tgz" json
echo "================ summary"
cat "$SUMMARY"
for f in "$OUT"/logs/bench_*.log; do
  if [ -f "$f" ]; then echo "---- $f"; tail -12 "$f"; fi
done
