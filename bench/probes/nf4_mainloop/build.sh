#!/usr/bin/env bash
# Builds the probe's variants (shared libraries with an extern "C" probe_run) into OUTDIR.
#   bash bench/probes/nf4_mainloop/build.sh OUTDIR
# Each variant's ptxas report is in OUTDIR/<variant>.log; spills and C75xx notes are echoed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
python3 "$here/gen_wgmma.py" "$out/wgmma_256.h"
flags=(-O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC
  -Xptxas -v -lineinfo -I"$out")

build() {
  local name=$1 src=$2
  shift 2
  if ! nvcc "${flags[@]}" "$@" -o "$out/$name.so" "$here/$src" >"$out/$name.log" 2>&1; then
    cat "$out/$name.log"
    exit 1
  fi
  grep -E "spill|C75" "$out/$name.log" | sed "s/^/$name: /" || true
}

# Real variants (checked against PyTorch by run.py).
build rs_slice rs_gemm.cu
build rs_kblock rs_gemm.cu -DKBLOCK
build rs_kblock_pair rs_gemm.cu -DKBLOCK -DPAIR
build ss ss_gemm.cu
build ss_double ss_gemm.cu -DDOUBLE
# Timing-only variants (wrong results by construction; run.py skips their check).
build rs_skeleton rs_gemm.cu -DKBLOCK -DNODECODE
build rs_fake_nolds rs_gemm.cu -DKBLOCK -DPAIR -DFAKE_NOLDS
build rs_fake_noalu rs_gemm.cu -DKBLOCK -DPAIR -DFAKE_NOALU
build ss_skeleton ss_gemm.cu -DSS_NODECODE
build ss_fake_xonce ss_gemm.cu -DFAKE_XONCE
build ss_fake_nomma ss_gemm.cu -DFAKE_NOMMA
build ss_fake_nomma_skeleton ss_gemm.cu -DFAKE_NOMMA -DSS_NODECODE
build ss_fake_half ss_gemm.cu -DFAKE_HALF
build ss_fake_quarter ss_gemm.cu -DFAKE_QUARTER
