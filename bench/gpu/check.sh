#!/usr/bin/env bash
# bench/gpu/check.sh RESULTS_DIR: the one prepared check for a machine with one NVIDIA GPU, a
# CUDA 13 driver, no network and no Rust toolchain. It runs prebuilt, stripped binaries, built
# on a developer machine into gpu-bin/ beside the sources by bench/gpu/build.sh (kernel_report
# and the CUDA suites' test binaries; GPTOSSD_GPU_BIN names another folder). It writes at most
# 8 files to RESULTS_DIR (so far: log.txt, env.txt, kernels.txt, parity.txt, summary.md),
# appends to log.txt as it goes, and prints the
# summary table last. Exit status: 0 when no phase failed (a machine without a GPU skips them
# all: "no GPU: skipped"), 1 when one did, 2 on a usage error. It changes no GPU setting.
#
# Phases, each under its own time limit:
#   0 env      nvidia-smi's view of the GPUs; libcuda.so.1 and libnvrtc.so.13 (with its
#              libnvrtc-builtins) located, NVRTC's folder put on LD_LIBRARY_PATH.     10 s
#   1 kernels  kernel_report --device 0: NVRTC compiles every kernel for the GPU's arch, the
#              ptxas table, every cubin and kernel loaded by the driver, cold compile vs the
#              cubin cache, the SASS lint when cuobjdump is found.                     60 s
# TODO, not built yet (each is listed in the summary as "not built yet"):
#   2 ceilings   device copy and read-only stream GB/s; pinned H2D/D2H at 11.5 KB and 737 KB;
#                a two-process hop over a registered memfd ring
#   3 exactness  tiny model generated here: MXFP4 dequant 16 codes × 256 scales, each op vs
#                f64 on bf16-representable inputs, the model vs the CPU engine (top-1 ≥ 99 %),
#                invariance bitwise (alone vs batched, chunked prefill, replay, graphs)
#   4 pipeline   4 stages on cuda:0 vs 1 stage, kill -9 replay, a mixed cuda/cpu pipeline
#   5 sanitizer  compute-sanitizer memcheck on the tiny model
#   6 checkpoint the 20b-shape checkpoint generated into /dev/shm
#   7 bench      gptossd bench at batch 1/8/64 and a 2048-token prefill, 1 and 4 stages, GB/s
#                per weight matrix
#   8 targets    each target with its value, bound, fraction and whether it is met
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 RESULTS_DIR" >&2
  exit 2
fi
results=$1
here=$(cd "$(dirname "$0")" && pwd)
bin=${GPTOSSD_GPU_BIN:-$(cd "$here/../.." && pwd)/gpu-bin}
work=${TMPDIR:-/tmp}/gptossd-gpu-check
mkdir -p "$results" "$work" || exit 2
log=$results/log.txt

# The summary: one row per phase, "phase|status|detail".
rows=()
row() { rows+=("$1|$2|$3"); say "phase $1: $2 — $3"; }
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
failed=0

# A library's folder: the loader's cache first, then LD_LIBRARY_PATH and the usual places.
locate_lib() {
  local name=$1 dir
  dir=$(ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n { print $NF; exit }')
  if [ -n "$dir" ]; then dirname "$dir"; return 0; fi
  local IFS=:
  for dir in ${LD_LIBRARY_PATH:-} /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib \
    /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
    /usr/local/cuda-13*/targets/x86_64-linux/lib; do
    if [ -n "$dir" ] && [ -e "$dir/$name" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

# ---- phase 0: environment ----------------------------------------------------------------
say "gptossd GPU check into $results (binaries: $bin)"
env_txt=$results/env.txt
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  echo "cpus: $(nproc)"
} >"$env_txt"
no_gpu=""
if ! command -v nvidia-smi >/dev/null; then
  no_gpu="nvidia-smi not found"
elif ! timeout 10 nvidia-smi --format=csv \
  --query-gpu=index,name,driver_version,compute_cap,memory.total,pcie.link.gen.current,pcie.link.width.current \
  >>"$env_txt" 2>&1; then
  no_gpu="nvidia-smi failed (see env.txt)"
elif [ "$(grep -c '^[0-9]' "$env_txt")" -eq 0 ]; then
  no_gpu="nvidia-smi lists no GPU"
elif ! cuda_dir=$(locate_lib libcuda.so.1); then
  no_gpu="libcuda.so.1 not found"
fi

if [ -n "$no_gpu" ]; then
  row "0 env" skipped "no GPU: $no_gpu"
  for phase in "1 kernels" "2 ceilings" "3 exactness" "4 pipeline" "5 sanitizer" \
    "6 checkpoint" "7 bench" "8 targets"; do
    rows+=("$phase|skipped|no GPU")
  done
else
  echo "libcuda.so.1: $cuda_dir" >>"$env_txt"
  if nvrtc_dir=$(locate_lib libnvrtc.so.13) && [ -e "$nvrtc_dir/libnvrtc-builtins.so.13.0" ]; then
    echo "libnvrtc.so.13: $nvrtc_dir" >>"$env_txt"
    export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    row "0 env" pass "$(grep '^[0-9]' "$env_txt" | head -1)"
  else
    row "0 env" fail "libnvrtc.so.13 with libnvrtc-builtins.so.13.0 not found"
    failed=1
  fi
  # CUDA_DEVICE_ORDER=PCI_BUS_ID: cuda:0 is nvidia-smi's GPU 0.
  export CUDA_DEVICE_ORDER=PCI_BUS_ID

  # ---- phase 1: kernels --------------------------------------------------------------------
  # The SASS lint needs cuobjdump, which runs nvdisasm from PATH (the toolkit's bin folder).
  export PATH="$PATH:/usr/local/cuda/bin"
  lint=()
  if cuobjdump=$(command -v cuobjdump); then lint=(--cuobjdump "$cuobjdump"); fi
  if [ ! -x "$bin/kernel_report" ]; then
    row "1 kernels" "not built yet" "no $bin/kernel_report (see the header)"
  elif timeout 60 "$bin/kernel_report" --device 0 --cache "$work/kernel-cache" "${lint[@]}" \
    >"$results/kernels.txt" 2>&1; then
    row "1 kernels" pass "$(grep -c '^sm_' "$results/kernels.txt") kernels; $(grep '^cache:' "$results/kernels.txt" | tr '\n' ' ')"
  else
    row "1 kernels" fail "$(tail -1 "$results/kernels.txt")"
    failed=1
  fi
  rows+=("2 ceilings|not built yet|")

  # ---- phase 3: exactness (the CUDA suites) ------------------------------------------------
  # The kernels come from the cache phase 1 filled (same sources, options and arch).
  export GPTOSSD_KERNEL_CACHE=$work/kernel-cache
  parity=$results/parity.txt
  suites=("backend_ops cuda::" "batch_invariance cuda::" "stage_load cuda")
  missing=""
  for s in "${suites[@]}"; do
    [ -x "$bin/${s%% *}" ] || missing="$missing ${s%% *}"
  done
  if [ -n "$missing" ]; then
    row "3 exactness" "not built yet" "no$missing in $bin (bench/gpu/build.sh)"
  else
    : >"$parity"
    ok=1
    for s in "${suites[@]}"; do
      name=${s%% *} filter=${s#* }
      echo "== $name $filter" >>"$parity"
      timeout 120 "$bin/$name" "$filter" --nocapture >>"$parity" 2>&1 || ok=0
    done
    passed=$(grep -o '[0-9]* passed' "$parity" | awk '{ n += $1 } END { print n + 0 }')
    failures=$(grep -o '[0-9]* failed' "$parity" | awk '{ n += $1 } END { print n + 0 }')
    # A suite that skipped its CUDA tests proves nothing: that is a failure here.
    skips=$(grep -c -e '^skipped cuda::' -e '^skipped: no CUDA driver' "$parity")
    if [ "$ok" = 1 ] && [ "$skips" = 0 ] && [ "$passed" -gt 0 ]; then
      row "3 exactness" pass "$passed CUDA tests passed (parity.txt)"
    else
      row "3 exactness" fail "$passed passed, $failures failed, $skips skipped (parity.txt)"
      failed=1
    fi
  fi
  for phase in "4 pipeline" "5 sanitizer" "6 checkpoint" "7 bench" "8 targets"; do
    rows+=("$phase|not built yet|")
  done
fi

# ---- summary (printed last) ----------------------------------------------------------------
{
  echo "| phase | status | detail |"
  echo "|---|---|---|"
  for r in "${rows[@]}"; do
    IFS='|' read -r phase status detail <<<"$r"
    echo "| $phase | $status | $detail |"
  done
  if [ -n "$no_gpu" ]; then
    echo
    echo "no GPU: skipped ($no_gpu)"
  fi
} >"$results/summary.md"
tee -a "$log" <"$results/summary.md"
exit "$failed"
