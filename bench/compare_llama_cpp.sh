#!/usr/bin/env bash
# Compare gptossd's CPU speed with llama.cpp on identical weights (issue 5, "The benchmark").
#
#   bench/compare_llama_cpp.sh            # everything, with the defaults below
#   REPS=18 bench/compare_llama_cpp.sh    # as many repetitions as the issue's figures
#
# Phases (each cached under $WORK_DIR, so a rerun only benchmarks):
#   1. llama.cpp: the PyPI sdist of llama-cpp-python ($LLAMA_CPP_PYTHON_VERSION), its vendored
#      vendor/llama.cpp built Release with native CPU flags -> llama-bench, llama-completion
#   2. tokenizer: a Hugging Face tokenizer.json for o200k_harmony, built offline from the
#      o200k_base.tiktoken that the tiktoken-rs crate ships (the checkpoint has none)
#   3. GGUF: llama.cpp's convert_hf_to_gguf.py --outtype bf16 on a copy of the model dir
#      (safetensors symlinked): experts stay MXFP4, the rest bf16 (1-D tensors and the router
#      f32, the converter's choice); tensor types checked with gguf-py; a 4-token smoke run
#   4. gptossd: cargo build --release -p gptossd
#   5. benchmark: llama-bench -t T -p 512,128 -n 32 -r REPS (peak RSS measured), then
#      gptossd bench --prompt-len 512 and 128 (--batch 1,8) REPS times each (INTERLEAVE=1:
#      alternate them instead)
#   6. report: a markdown table with medians and ratios; raw files and summary.json under
#      $WORK_DIR/results/<timestamp>/
#
# Environment (defaults in brackets):
#   MODEL_DIR                 bench checkpoint in HF format [/work/models/bench]
#   WORK_DIR                  downloads, builds, GGUF, results [/work/llamacpp-work]
#   THREADS                   threads for both engines [2]
#   REPS                      llama-bench repetitions, and gptossd runs per prompt length [5]
#   GPTOSSD_REPS              gptossd runs per prompt length [$REPS]
#   PROMPT_LENS               prompt lengths, comma-separated [512,128]
#   LLAMA_GEN                 llama-bench -n (decode tokens) [32]
#   GPTOSSD_GEN               gptossd bench --gen [16]
#   GPTOSSD_BATCH             gptossd bench --batch [1,8]
#   GPTOSSD_STAGES            if set (e.g. 4): also run gptossd bench --stages 1 and --stages S
#                             --batch 1 at the last prompt length, and report S vs 1 [unset]
#   GPTOSSD_BIN               use this gptossd binary instead of building one [unset]
#   LLAMA_CPP_PYTHON_VERSION  llama-cpp-python sdist version [0.3.36]
#   LLAMA_CPP_SDIST           use this local sdist tarball instead of downloading [unset]
#   LLAMACPP_CPU              native | avx2 (AVX2+FMA+F16C, no AVX-512: the issue's machine) [native]
#   CONVERT_PYTHON            python for the converter (needs torch, numpy, transformers,
#                             tokenizers, pyyaml, tqdm) [/work/refenv/bin/python if usable,
#                             else a venv created under $WORK_DIR]
#   TIKTOKEN_FILE             o200k_base.tiktoken [found in the cargo registry's tiktoken-rs]
#   JOBS                      parallel compile jobs [nproc]
#   INTERLEAVE=1              run REPS rounds of (llama-bench -r 1, then gptossd at each prompt
#                             length) instead of all llama-bench repetitions first: on a shared,
#                             noisy machine both engines then see the same background load [0]
#   FORCE_CONVERT=1           redo the GGUF even if a checked one exists
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"

MODEL_DIR="${MODEL_DIR:-/work/models/bench}"
WORK_DIR="${WORK_DIR:-/work/llamacpp-work}"
THREADS="${THREADS:-2}"
REPS="${REPS:-5}"
GPTOSSD_REPS="${GPTOSSD_REPS:-$REPS}"
PROMPT_LENS="${PROMPT_LENS:-512,128}"
LLAMA_GEN="${LLAMA_GEN:-32}"
GPTOSSD_GEN="${GPTOSSD_GEN:-16}"
GPTOSSD_BATCH="${GPTOSSD_BATCH:-1,8}"
GPTOSSD_STAGES="${GPTOSSD_STAGES:-}"
GPTOSSD_BIN="${GPTOSSD_BIN:-}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LLAMA_CPP_SDIST="${LLAMA_CPP_SDIST:-}"
LLAMACPP_CPU="${LLAMACPP_CPU:-native}"
CONVERT_PYTHON="${CONVERT_PYTHON:-}"
TIKTOKEN_FILE="${TIKTOKEN_FILE:-}"
JOBS="${JOBS:-$(nproc)}"
FORCE_CONVERT="${FORCE_CONVERT:-0}"
INTERLEAVE="${INTERLEAVE:-0}"

# ---------------------------------------------------------------------------------------------
log() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; printf "\nERROR: %s failed (exit %s) at line %s: %s\n" "${0##*/}" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

declare -a PHASES=()
phase_start() { PHASE_NAME="$1"; PHASE_T0=$(date +%s); log "$1"; }
phase_end() { local dt=$(( $(date +%s) - PHASE_T0 )); PHASES+=("$PHASE_NAME|$dt"); info "($PHASE_NAME: ${dt}s)"; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 > 0 )); }
is_uint "$THREADS" || die "THREADS must be a positive integer (got '$THREADS')"
is_uint "$REPS" || die "REPS must be a positive integer (got '$REPS')"
is_uint "$GPTOSSD_REPS" || die "GPTOSSD_REPS must be a positive integer (got '$GPTOSSD_REPS')"
is_uint "$LLAMA_GEN" || die "LLAMA_GEN must be a positive integer (got '$LLAMA_GEN')"
is_uint "$GPTOSSD_GEN" || die "GPTOSSD_GEN must be a positive integer (got '$GPTOSSD_GEN')"
[[ "$PROMPT_LENS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "PROMPT_LENS must be comma-separated integers (got '$PROMPT_LENS')"
[[ "$GPTOSSD_BATCH" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPTOSSD_BATCH must be comma-separated integers (got '$GPTOSSD_BATCH')"
[[ "$INTERLEAVE" == 0 || "$INTERLEAVE" == 1 ]] || die "INTERLEAVE must be 0 or 1"
[[ -z "$GPTOSSD_STAGES" ]] || is_uint "$GPTOSSD_STAGES" || die "GPTOSSD_STAGES must be a positive integer"
case "$LLAMACPP_CPU" in native|avx2) ;; *) die "LLAMACPP_CPU must be native or avx2 (got '$LLAMACPP_CPU')";; esac

[[ -f "$MODEL_DIR/config.json" ]] || die "MODEL_DIR=$MODEL_DIR has no config.json (generate one with: gptossd make-test-model --preset bench --seed 0 --out DIR)"
[[ -f "$MODEL_DIR/model.safetensors.index.json" ]] || ls "$MODEL_DIR"/*.safetensors >/dev/null 2>&1 \
  || die "MODEL_DIR=$MODEL_DIR has no safetensors"
MODEL_DIR="$(cd "$MODEL_DIR" && pwd -P)"
for tool in gcc g++ python3 tar; do command -v "$tool" >/dev/null || die "'$tool' not found in PATH"; done
mkdir -p "$WORK_DIR"
WORK_DIR="$(cd "$WORK_DIR" && pwd -P)"
case "$WORK_DIR/" in "$REPO_DIR"/*) die "WORK_DIR must be outside the repository ($REPO_DIR)";; esac

T_ALL0=$(date +%s)
RUN_ID="$(date +%Y%m%d-%H%M%S)"
RES="$WORK_DIR/results/$RUN_ID"
mkdir -p "$RES"
info "work dir: $WORK_DIR   results: $RES"

# ---------------------------------------------------------------------------------------------
# Build tools: cmake + ninja (+ scikit-build-core, so that `pip download` can read the sdist's
# metadata without an isolated build env, which with --no-binary would compile cmake itself).
phase_start "tools (cmake, ninja)"
TOOLS_VENV="$WORK_DIR/tools-venv"
if [[ ! -x "$TOOLS_VENV/bin/cmake" || ! -x "$TOOLS_VENV/bin/ninja" ]] \
   || ! "$TOOLS_VENV/bin/python" -c 'import scikit_build_core' 2>/dev/null; then
  python3 -m venv "$TOOLS_VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  "$TOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check cmake ninja scikit-build-core \
    || die "pip install cmake ninja scikit-build-core failed (is PyPI reachable?)"
fi
CMAKE="$TOOLS_VENV/bin/cmake"
export PATH="$TOOLS_VENV/bin:$PATH"
info "$("$CMAKE" --version | head -1), ninja $(ninja --version)"
phase_end

# ---------------------------------------------------------------------------------------------
phase_start "llama.cpp: download + build (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist, $LLAMACPP_CPU)"
DL="$WORK_DIR/dl"
mkdir -p "$DL"
if [[ -n "$LLAMA_CPP_SDIST" ]]; then
  [[ -f "$LLAMA_CPP_SDIST" ]] || die "LLAMA_CPP_SDIST=$LLAMA_CPP_SDIST does not exist"
  SDIST="$LLAMA_CPP_SDIST"
  LLAMA_CPP_PYTHON_VERSION="$(basename "$SDIST" | sed -E 's/^llama_cpp_python-(.*)\.tar\.gz$/\1/')"
else
  SDIST="$DL/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [[ ! -f "$SDIST" ]]; then
    if ! "$TOOLS_VENV/bin/pip" download --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
          --no-build-isolation -d "$DL" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >"$DL/pip-download.log" 2>&1; then
      # Not there: take the closest version PyPI has (the newest one not above the request,
      # else the oldest one above it) and say so loudly.
      avail="$("$TOOLS_VENV/bin/pip" index versions llama-cpp-python 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ' ')" \
        || true
      [[ -n "$avail" ]] || die "pip download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed and no version list: see $DL/pip-download.log"
      closest="$(python3 - "$LLAMA_CPP_PYTHON_VERSION" "$avail" <<'EOF'
import re, sys
def key(v): return tuple(int(x) for x in re.findall(r"\d+", v))
want, vs = key(sys.argv[1]), [v for v in sys.argv[2].split(",") if re.fullmatch(r"[\d.]+", v)]
below = [v for v in vs if key(v) <= want]
print(max(below, key=key) if below else min(vs, key=key))
EOF
)"
      info "WARNING: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION unavailable; using the closest version, $closest"
      LLAMA_CPP_PYTHON_VERSION="$closest"
      SDIST="$DL/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
      [[ -f "$SDIST" ]] || "$TOOLS_VENV/bin/pip" download --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
          --no-build-isolation -d "$DL" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >>"$DL/pip-download.log" 2>&1 \
        || die "pip download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed: see $DL/pip-download.log"
    fi
  fi
  [[ -f "$SDIST" ]] || die "expected $SDIST after pip download (see $DL/pip-download.log)"
fi
SRC_ROOT="$WORK_DIR/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
if [[ ! -f "$SRC_ROOT/.unpacked" ]]; then
  rm -rf "$SRC_ROOT"
  mkdir -p "$WORK_DIR/src"
  tar -xzf "$SDIST" -C "$WORK_DIR/src" || die "cannot unpack $SDIST"
  [[ -d "$SRC_ROOT/vendor/llama.cpp" ]] || die "$SDIST has no vendor/llama.cpp (not a llama-cpp-python sdist?)"
  touch "$SRC_ROOT/.unpacked"
fi
LLAMA_SRC="$SRC_ROOT/vendor/llama.cpp"
# The sdist has no .git: take the llama.cpp commit from the changelog entry of this version.
LLAMA_COMMIT="$(awk -v v="## [$LLAMA_CPP_PYTHON_VERSION]" '
  index($0, v) == 1 {on=1; next} on && /^## \[/ {exit}
  on && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART+10, RLENGTH-10); exit}' "$SRC_ROOT/CHANGELOG.md" || true)"
LLAMA_COMMIT="${LLAMA_COMMIT:-unknown}"
GGML_VERSION="$(sed -nE 's/^set\(GGML_VERSION_(MAJOR|MINOR|PATCH) ([0-9]+)\)/\2/p' "$LLAMA_SRC/ggml/CMakeLists.txt" | paste -sd. -)"
info "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION vendors llama.cpp @ $LLAMA_COMMIT (ggml $GGML_VERSION)"

BUILD="$WORK_DIR/build-$LLAMA_CPP_PYTHON_VERSION-$LLAMACPP_CPU"
CMAKE_ARGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CCACHE=OFF
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_NUMBER=0 "-DLLAMA_BUILD_COMMIT=$LLAMA_COMMIT")
if [[ "$LLAMACPP_CPU" == native ]]; then
  CMAKE_ARGS+=(-DGGML_NATIVE=ON)
else
  CMAKE_ARGS+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF)
fi
# Configure only when the arguments changed (a reconfigure is cheap, but keep reruns quiet).
ARGS_STAMP="$BUILD/.gptossd-cmake-args"
if [[ ! -f "$BUILD/build.ninja" || "$(cat "$ARGS_STAMP" 2>/dev/null)" != "${CMAKE_ARGS[*]}" ]]; then
  "$CMAKE" -S "$LLAMA_SRC" -B "$BUILD" "${CMAKE_ARGS[@]}" >"$WORK_DIR/cmake-configure-$LLAMACPP_CPU.log" 2>&1 \
    || die "cmake configure failed: see $WORK_DIR/cmake-configure-$LLAMACPP_CPU.log"
  printf '%s' "${CMAKE_ARGS[*]}" >"$ARGS_STAMP"
fi
"$CMAKE" --build "$BUILD" -j "$JOBS" --target llama-bench llama-completion >"$WORK_DIR/cmake-build-$LLAMACPP_CPU.log" 2>&1 \
  || die "llama.cpp build failed: see $WORK_DIR/cmake-build-$LLAMACPP_CPU.log"
LLAMA_BENCH="$BUILD/bin/llama-bench"
LLAMA_COMPLETION="$BUILD/bin/llama-completion"
[[ -x "$LLAMA_BENCH" ]] || die "no $LLAMA_BENCH after the build"
LLAMA_VERSION_LINE="$("$LLAMA_BENCH" --version 2>&1 | grep -m1 -i 'version' || true)"
info "built: $LLAMA_BENCH ($LLAMA_VERSION_LINE)"
phase_end

# ---------------------------------------------------------------------------------------------
phase_start "converter python env"
py_ok() { "$1" -c 'import torch, numpy, transformers, tokenizers, yaml, tqdm' >/dev/null 2>&1; }
if [[ -n "$CONVERT_PYTHON" ]]; then
  py_ok "$CONVERT_PYTHON" || die "CONVERT_PYTHON=$CONVERT_PYTHON lacks one of torch numpy transformers tokenizers pyyaml tqdm"
elif [[ -x /work/refenv/bin/python ]] && py_ok /work/refenv/bin/python; then
  CONVERT_PYTHON=/work/refenv/bin/python
else
  CONVERT_VENV="$WORK_DIR/convert-venv"
  if [[ ! -x "$CONVERT_VENV/bin/python" ]] || ! py_ok "$CONVERT_VENV/bin/python"; then
    info "creating $CONVERT_VENV (torch, numpy, transformers, tokenizers, ...; large download)"
    python3 -m venv "$CONVERT_VENV"
    "$CONVERT_VENV/bin/pip" install --quiet --disable-pip-version-check \
      torch numpy transformers tokenizers safetensors sentencepiece pyyaml tqdm requests \
      || die "pip install of the converter requirements failed"
  fi
  CONVERT_PYTHON="$CONVERT_VENV/bin/python"
fi
info "converter python: $CONVERT_PYTHON ($("$CONVERT_PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
phase_end

# ---------------------------------------------------------------------------------------------
# Tokenizer + a copy of the model dir the converter can read, then the GGUF.
phase_start "tokenizer (o200k_harmony from tiktoken-rs) + GGUF conversion"
# A key for this checkpoint: its path, config and safetensors sizes/mtimes, plus the llama.cpp version.
MODEL_KEY="$(cd "$MODEL_DIR" && { echo "$MODEL_DIR" "$LLAMA_CPP_PYTHON_VERSION"; cat config.json; \
  stat -L -c '%n %s %Y' ./*.safetensors ./*.json; } | sha256sum | cut -c1-12)"
MODEL_NAME="$(basename "$MODEL_DIR")"
GGUF="$WORK_DIR/gguf/$MODEL_NAME-$MODEL_KEY-mxfp4-bf16.gguf"
GGUF_CHECK_JSON="$GGUF.check.json"
export PYTHONPATH="$LLAMA_SRC/gguf-py${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$FORCE_CONVERT" == 1 || ! -f "$GGUF" || ! -f "$GGUF_CHECK_JSON" ]]; then
  if [[ -f "$MODEL_DIR/tokenizer.json" ]]; then
    HF_DIR="$MODEL_DIR"
    info "the model dir has its own tokenizer.json: converting it as is"
  else
    if [[ -z "$TIKTOKEN_FILE" ]]; then
      TIKTOKEN_FILE="$(ls -1 "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tiktoken-rs-*/assets/o200k_base.tiktoken 2>/dev/null | sort -V | tail -1 || true)"
      if [[ -z "$TIKTOKEN_FILE" ]]; then
        info "tiktoken-rs not in the cargo registry; running cargo fetch in $REPO_DIR"
        (cd "$REPO_DIR" && cargo fetch --quiet) || die "cargo fetch failed; set TIKTOKEN_FILE=/path/to/o200k_base.tiktoken"
        TIKTOKEN_FILE="$(ls -1 "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tiktoken-rs-*/assets/o200k_base.tiktoken 2>/dev/null | sort -V | tail -1 || true)"
      fi
    fi
    [[ -f "$TIKTOKEN_FILE" ]] || die "no o200k_base.tiktoken found; set TIKTOKEN_FILE"
    TOK_DIR="$WORK_DIR/tokenizer-o200k-harmony"
    if [[ ! -f "$TOK_DIR/tokenizer.json" || ! -f "$TOK_DIR/.ok" ]]; then
      info "building the tokenizer from $TIKTOKEN_FILE"
      rm -rf "$TOK_DIR"
      "$CONVERT_PYTHON" "$SCRIPT_DIR/make_o200k_tokenizer.py" --tiktoken "$TIKTOKEN_FILE" --out "$TOK_DIR" --check >&2 \
        || die "tokenizer build failed"
      touch "$TOK_DIR/.ok"
    fi
    # The converter reads everything from one directory: symlink the checkpoint, copy the tokenizer.
    HF_DIR="$WORK_DIR/hf/$MODEL_NAME-$MODEL_KEY"
    rm -rf "$HF_DIR"
    mkdir -p "$HF_DIR"
    for f in "$MODEL_DIR"/*; do ln -s "$f" "$HF_DIR/"; done
    cp "$TOK_DIR"/tokenizer.json "$TOK_DIR"/tokenizer_config.json "$TOK_DIR"/special_tokens_map.json "$HF_DIR/"
  fi
  mkdir -p "$WORK_DIR/gguf"
  info "converting $HF_DIR -> $GGUF"
  # HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE: everything is local; never try the network.
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$CONVERT_PYTHON" "$LLAMA_SRC/convert_hf_to_gguf.py" "$HF_DIR" \
      --outtype bf16 --outfile "$GGUF.tmp" >"$WORK_DIR/convert-$MODEL_NAME.log" 2>&1 \
    || die "convert_hf_to_gguf.py failed: see $WORK_DIR/convert-$MODEL_NAME.log"
  grep -q "MXFP4" "$WORK_DIR/convert-$MODEL_NAME.log" || info "WARNING: the converter log mentions no MXFP4 repacking"
  if grep -q "is not in MXFP4" "$WORK_DIR/convert-$MODEL_NAME.log"; then
    die "the converter dequantized the experts (see $WORK_DIR/convert-$MODEL_NAME.log)"
  fi
  "$CONVERT_PYTHON" "$SCRIPT_DIR/gguf_check.py" "$GGUF.tmp" >&2 \
    || die "GGUF check failed: the expert tensors are not all MXFP4 (or other matrices were quantized); GGUF left at $GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
  "$CONVERT_PYTHON" "$SCRIPT_DIR/gguf_check.py" --json "$GGUF" >"$GGUF_CHECK_JSON"
else
  info "reusing $GGUF (checked when written: $GGUF_CHECK_JSON)"
  python3 "$SCRIPT_DIR/gguf_check.py" --show "$GGUF_CHECK_JSON" >&2 || die "GGUF check failed for $GGUF"
fi
cp "$GGUF_CHECK_JSON" "$RES/gguf_check.json"
phase_end

phase_start "GGUF smoke test (llama-completion, 4 tokens)"
"$LLAMA_COMPLETION" -m "$GGUF" -t "$THREADS" -p "The quick brown fox" -n 4 -no-cnv --temp 0 -c 256 \
    >"$RES/smoke.out" 2>"$RES/smoke.err" </dev/null \
  || die "llama-completion could not run the GGUF: see $RES/smoke.err"
info "llama.cpp loads the GGUF and generates: $(tr '\n' ' ' <"$RES/smoke.out" | cut -c1-120)"
phase_end

# ---------------------------------------------------------------------------------------------
phase_start "gptossd build"
if [[ -n "$GPTOSSD_BIN" ]]; then
  [[ -x "$GPTOSSD_BIN" ]] || die "GPTOSSD_BIN=$GPTOSSD_BIN is not executable"
else
  command -v cargo >/dev/null || die "cargo not found (or set GPTOSSD_BIN)"
  (cd "$REPO_DIR" && cargo build --release -p gptossd >"$RES/cargo-build.log" 2>&1) \
    || die "cargo build --release -p gptossd failed: see $RES/cargo-build.log"
  GPTOSSD_BIN="$REPO_DIR/target/release/gptossd"
fi
GPTOSSD_REV="$(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if (cd "$REPO_DIR" && ! git diff --quiet HEAD -- . ':!bench' 2>/dev/null); then GPTOSSD_REV="$GPTOSSD_REV+dirty"; fi
info "gptossd: $GPTOSSD_BIN ($GPTOSSD_REV)"
phase_end

# ---------------------------------------------------------------------------------------------
# Peak RSS of a command: GNU time's %M when available, else poll VmHWM in /proc while it runs.
# Usage: run_rss RSS_FILE STDOUT_FILE STDERR_FILE cmd...   (writes the peak RSS in KiB)
if /usr/bin/time -f '%M' -o /dev/null true 2>/dev/null; then HAVE_GNU_TIME=1; else HAVE_GNU_TIME=0; fi
run_rss() {
  local rss_file="$1" out="$2" err="$3"; shift 3
  if (( HAVE_GNU_TIME )); then
    /usr/bin/time -f '%M' -o "$rss_file" "$@" >"$out" 2>"$err"
  else
    "$@" >"$out" 2>"$err" &
    local pid=$! hwm=0 v
    while kill -0 "$pid" 2>/dev/null; do
      v="$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
      [[ -n "$v" ]] && (( v > hwm )) && hwm=$v
      sleep 0.1
    done
    local rc=0
    wait "$pid" || rc=$?
    echo "$hwm" >"$rss_file"
    return "$rc"
  fi
}

# ---------------------------------------------------------------------------------------------
phase_start "page cache: both engines' weight files evicted, then read once"
# Both engines memory-map their weights, so the page sizes the kernel maps them with depend on
# how the page cache was filled (a file just written by a converter or generator sits in small
# folios: 4 KB mappings, a TLB miss per 4 KB of a stream). Evict both files and read both the
# same way, so both get what a cold read gives on this kernel (readahead: see the report).
python3 - "$GGUF" "$MODEL_DIR"/*.safetensors <<'PY'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 16 << 20):
            pass
    finally:
        os.close(fd)
PY
read_ahead_kb() {
  local dev parent
  dev="$(basename "$(df --output=source "$1" | tail -1)")"
  parent="$(lsblk -no pkname "/dev/$dev" 2>/dev/null | head -1)"
  cat "/sys/block/${parent:-$dev}/queue/read_ahead_kb" 2>/dev/null || echo unknown
}
READ_AHEAD_KB="$(read_ahead_kb "$MODEL_DIR")"
info "file huge pages in the page cache now: $(awk '/^FileHugePages:/ {print $2, $3}' /proc/meminfo); readahead: $READ_AHEAD_KB KB"
phase_end

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
LOAD_BEFORE="$(loadavg)"

IFS=, read -r -a PLENS <<<"$PROMPT_LENS"

# llama-bench: writes $RES/llama-bench<tag>.json (+ .rss_kib, .err); $1 = tag, $2 = repetitions
run_llama_bench() {
  local f="$RES/llama-bench$1"
  run_rss "$f.rss_kib" "$f.json" "$f.err" \
    "$LLAMA_BENCH" -m "$GGUF" -t "$THREADS" -p "$PROMPT_LENS" -n "$LLAMA_GEN" -r "$2" -o json \
    || die "llama-bench failed: see $f.err"
  info "llama-bench$1: $(python3 "$SCRIPT_DIR/compare_report.py" --llama-line "$f.json"), peak RSS $(cat "$f.rss_kib") KiB"
}
# gptossd bench: $1 = run index, $2 = prompt length; writes $RES/gptossd-p<pl>-r<i>.jsonl (+ .rss_kib, .err)
run_gptossd() {
  local f="$RES/gptossd-p$2-r$1"
  run_rss "$f.rss_kib" "$f.jsonl" "$f.err" \
    "$GPTOSSD_BIN" bench --model "$MODEL_DIR" --threads "$THREADS" --prompt-len "$2" \
      --gen "$GPTOSSD_GEN" --batch "$GPTOSSD_BATCH" --json \
    || die "gptossd bench failed: see $f.err"
  info "gptossd run $1/$GPTOSSD_REPS, prompt $2: $(python3 "$SCRIPT_DIR/compare_report.py" --line "$f.jsonl")"
}

if [[ "$INTERLEAVE" == 1 ]]; then
  (( GPTOSSD_REPS == REPS )) || die "INTERLEAVE=1 needs GPTOSSD_REPS == REPS"
  phase_start "benchmark, interleaved: $REPS rounds of (llama-bench -t $THREADS -p $PROMPT_LENS -n $LLAMA_GEN -r 1; gptossd bench --prompt-len {$PROMPT_LENS} --gen $GPTOSSD_GEN --batch $GPTOSSD_BATCH)"
  for ((i = 1; i <= REPS; i++)); do
    run_llama_bench "-r$i" 1
    for pl in "${PLENS[@]}"; do run_gptossd "$i" "$pl"; done
  done
  phase_end
else
  phase_start "benchmark: llama-bench -t $THREADS -p $PROMPT_LENS -n $LLAMA_GEN -r $REPS"
  run_llama_bench "" "$REPS"
  phase_end
  phase_start "benchmark: gptossd bench --threads $THREADS --prompt-len {$PROMPT_LENS} --gen $GPTOSSD_GEN --batch $GPTOSSD_BATCH, $GPTOSSD_REPS runs each"
  for ((i = 1; i <= GPTOSSD_REPS; i++)); do
    for pl in "${PLENS[@]}"; do run_gptossd "$i" "$pl"; done
  done
  phase_end
fi

if [[ -n "$GPTOSSD_STAGES" ]]; then
  pl="${PLENS[-1]}"
  phase_start "benchmark: gptossd bench --stages {1,$GPTOSSD_STAGES} --batch 1 --prompt-len $pl, $GPTOSSD_REPS runs each"
  for ((i = 1; i <= GPTOSSD_REPS; i++)); do
    for st in 1 "$GPTOSSD_STAGES"; do
      f="$RES/gptossd-stages$st-p$pl-r$i"
      [[ -e "$f.jsonl" ]] && continue  # GPTOSSD_STAGES=1
      run_rss "$f.rss_kib" "$f.jsonl" "$f.err" \
        "$GPTOSSD_BIN" bench --model "$MODEL_DIR" --threads "$THREADS" --prompt-len "$pl" \
          --gen "$GPTOSSD_GEN" --batch 1 --stages "$st" --json \
        || die "gptossd bench --stages $st failed: see $f.err"
      info "gptossd --stages $st run $i/$GPTOSSD_REPS: $(python3 "$SCRIPT_DIR/compare_report.py" --line "$f.jsonl")"
    done
  done
  phase_end
fi
LOAD_AFTER="$(loadavg)"

# ---------------------------------------------------------------------------------------------
phase_start "report"
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
CPU_FLAGS="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512_bf16|avx512_vnni|amx_tile)$' | paste -sd, -)"
python3 "$SCRIPT_DIR/compare_report.py" --results "$RES" \
  --meta "llama_cpp_python=$LLAMA_CPP_PYTHON_VERSION" \
  --meta "llama_cpp_commit=$LLAMA_COMMIT" \
  --meta "ggml_version=$GGML_VERSION" \
  --meta "llama_cpp_cpu=$LLAMACPP_CPU" \
  --meta "gguf=$GGUF" \
  --meta "gguf_bytes=$(stat -c %s "$GGUF")" \
  --meta "model_dir=$MODEL_DIR" \
  --meta "gptossd_rev=$GPTOSSD_REV" \
  --meta "threads=$THREADS" \
  --meta "reps=$REPS" \
  --meta "gptossd_reps=$GPTOSSD_REPS" \
  --meta "prompt_lens=$PROMPT_LENS" \
  --meta "llama_gen=$LLAMA_GEN" \
  --meta "gptossd_gen=$GPTOSSD_GEN" \
  --meta "stages=$GPTOSSD_STAGES" \
  --meta "interleave=$INTERLEAVE" \
  --meta "cpu=$CPU_MODEL ($(nproc) cpus visible; $CPU_FLAGS)" \
  --meta "loadavg_before=$LOAD_BEFORE" \
  --meta "read_ahead_kb=$READ_AHEAD_KB" \
  --meta "loadavg_after=$LOAD_AFTER" \
  --meta "rss_method=$([[ $HAVE_GNU_TIME == 1 ]] && echo 'GNU time %M' || echo '/proc VmHWM polling')" \
  | tee "$RES/table.md"
phase_end

{
  echo
  echo "Phase timings:"
  for p in "${PHASES[@]}"; do printf '  %-100s %5ss\n' "${p%|*}" "${p##*|}"; done
  printf '  %-100s %5ss\n' "total" "$(( $(date +%s) - T_ALL0 ))"
  echo "Raw results: $RES"
} | tee -a "$RES/table.md"
trap - ERR
