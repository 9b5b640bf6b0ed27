#!/usr/bin/env bash
# Builds the GEMM variants (shared libraries with an extern "C" probe_run) into OUTDIR.
#   bash bench/probes/bf16_gemm/build.sh OUTDIR [JOBS]
# CUTLASS headers: $CUTLASS_INCLUDE_DIR, else the nvidia-cutlass package's. Each variant's ptxas
# report is in OUTDIR/<variant>.log; spills and C75xx warnings are echoed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR [JOBS]}
jobs=${2:-2}
mkdir -p "$out"
inc=${CUTLASS_INCLUDE_DIR:-$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")}
flags=(-O3 -DNDEBUG -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC
  --expt-relaxed-constexpr -Xptxas -v -I"$inc")

variants=(
  "tn_256x128_c1x2 -DCLUSTER_N=2"
  "tn_256x128"
  "tn_256x128_c2x1 -DCLUSTER_M=2"
  "tn_128x256_c2x1 -DTILE_M=128 -DTILE_N=256 -DCLUSTER_M=2"
  "tn_256x192 -DTILE_N=192"
  "tn_256x192_c2x1 -DTILE_N=192 -DCLUSTER_M=2"
  "tn_256x192_sk -DTILE_N=192 -DSTREAM_K=1"
  "nn_256x128_c1x2 -DLAYOUT_NN=1 -DCLUSTER_N=2"
  "nn_256x128 -DLAYOUT_NN=1"
  "nn_128x256_c2x1 -DLAYOUT_NN=1 -DTILE_M=128 -DTILE_N=256 -DCLUSTER_M=2"
  "nn_256x192 -DLAYOUT_NN=1 -DTILE_N=192"
  "nn_256x192_sk -DLAYOUT_NN=1 -DTILE_N=192 -DSTREAM_K=1"
)

build() {
  local name=$1
  shift
  if ! nvcc "${flags[@]}" "$@" -o "$out/$name.so" "$here/gemm.cu" >"$out/$name.log" 2>&1; then
    cat "$out/$name.log"
    return 1
  fi
  grep -E "spill stores|C75" "$out/$name.log" | cut -c1-160 | sed "s/^/$name: /" || true
}

pids=()
for v in "${variants[@]}"; do
  # shellcheck disable=SC2086
  build $v &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
