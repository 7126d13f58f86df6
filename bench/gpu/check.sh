#!/usr/bin/env bash
# bench/gpu/check.sh [--skip PHASES] RESULTS_DIR: the one prepared check for a machine with one
# NVIDIA GPU, a CUDA 13 driver, no network and no Rust toolchain. It runs prebuilt, stripped
# binaries, built on a developer machine into gpu-bin/ beside the sources by bench/gpu/build.sh
# (gptossd and gptossd-stage side by side, kernel_report and the CUDA suites' test binaries;
# GPTOSSD_GPU_BIN names another folder), and generates the checkpoints it needs on the machine.
# It writes at most 8 files to RESULTS_DIR (log.txt, env.txt, kernels.txt, parity.txt,
# pipeline.txt, sanitizer.txt, bench.jsonl, summary.md), appends to log.txt as it goes, and
# prints the summary table last. Exit status: 0 when no phase failed (a machine without a GPU
# skips them all: "no GPU: skipped"; a bench run that times out and a missed target are results,
# not failures), 1 when one did, 2 on a usage error. It changes no GPU setting.
#
# --skip PHASES (or GPTOSSD_CHECK_SKIP): phases not to run, e.g. 0-3 or 1,3,5, to resume on a
# still-warm machine (its work folder, $TMPDIR/gptossd-gpu-check, keeps the kernel cache and the
# tiny model). Phase 0's GPU and library detection always runs: the others need it. The 20b-shape
# checkpoint is removed at the end unless GPTOSSD_CHECK_KEEP_MODEL=1; phase 6 reuses a complete
# one. The whole run keeps to GPTOSSD_CHECK_BUDGET_S seconds (470): each phase gets the smaller
# of its own limit and what is left, and a phase with under 5 s left is "out of time".
#
# Dry run (no GPU needed, to exercise phases 4, 6, 7 and 8 on a developer machine):
# GPTOSSD_CHECK_DEVICE=cpu runs them with `cpu` wherever `cuda:0` stands, on the tiny preset in
# place of 20b-shape (GPTOSSD_CHECK_M20B_PRESET overrides: tiny, bench or 20b-shape); phases 1,
# 3 and 5 need a GPU and are skipped (GPTOSSD_GPU_BIN=target/release runs another build).
#
# Phases, each under its own time limit (seconds):
#   0 env        nvidia-smi's view of the GPUs; libcuda.so.1 and libnvrtc.so.13 (with its
#                libnvrtc-builtins) located, NVRTC's folder put on LD_LIBRARY_PATH.        10
#   1 kernels    kernel_report --device 0: NVRTC compiles every kernel for the GPU's arch, the
#                ptxas table, every cubin and kernel loaded by the driver, cold compile vs the
#                cubin cache, the SASS lint when cuobjdump is found (kernels.txt).          60
#   3 exactness  the CUDA suites' test binaries, filtered to their CUDA tests: backend_ops
#                (each op vs f64), batch_invariance (bitwise), stage_load; a skipped CUDA
#                test fails the phase (parity.txt).                                        100
#   4 pipeline   on the tiny model (generated here): `gptossd generate --requests` with
#                1 stage on cuda:0, 4 stages on cuda:0, and cuda:0,cpu,cuda:0,cpu give the same
#                tokens; kill -9 of stage 2 mid-generation gives them too (and one restart);
#                `gptossd serve` with 4 stages on cuda:0 answers a chat completion and exits 0
#                on SIGTERM (pipeline.txt).                                                 100
#   5 sanitizer  compute-sanitizer --tool memcheck over backend_ops' CUDA tests
#                (GPTOSSD_CHECK_SANITIZE="BINARY FILTER" picks another; sanitizer.txt).     45
#   6 checkpoint make-test-model --preset 20b-shape into /dev/shm (the work folder when
#                /dev/shm has under 16 GB free), timed; the generator is single-threaded
#                (~140 MB/s on a loaded 2-core developer machine: ~100 s for 13.8 GB).      150
#   7 bench      gptossd bench on 20b-shape, prompt 512, 64 generated tokens: 1 stage at batch
#                1 and 8, then 64 (a separate run: the in-process bench prints at the end, so a
#                timeout at 64 would lose 1 and 8), a 2048-token prefill, and 4 stages on cuda:0
#                at batch 1 and 64; each run under its own timeout (100, 60, 45, 100 s;
#                bench.jsonl: the bench's lines with "run" added; a timeout or error is a
#                line too).                                                                 250
#   8 targets    from bench.jsonl, one summary row per target of the issue: value, bound,
#                fraction, met (runs even when the budget is spent: it only reads the file).
# Not built yet (listed in the summary as such):
#   2 ceilings   device copy and read-only stream GB/s; pinned H2D/D2H at 11.5 KB and 737 KB;
#                a two-process hop over a registered memfd ring (phase 7's GB/s per weight
#                matrix waits on it too)
# shellcheck disable=SC2317 # the phase functions run through run_phase
set -uo pipefail

usage() {
  echo "usage: $0 [--skip PHASES] RESULTS_DIR   (PHASES: e.g. 0-3 or 1,3,5)" >&2
  exit 2
}
skip_spec=${GPTOSSD_CHECK_SKIP:-}
while [ $# -gt 0 ]; do
  case $1 in
    --skip) [ $# -ge 2 ] || usage; skip_spec=$2; shift 2 ;;
    --skip=*) skip_spec=${1#--skip=}; shift ;;
    --) shift; break ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
skip=(0 0 0 0 0 0 0 0 0)
if [ -n "$skip_spec" ]; then
  IFS=, read -r -a parts <<<"$skip_spec"
  for p in "${parts[@]}"; do
    if [[ $p =~ ^([0-8])-([0-8])$ ]]; then
      for ((i = BASH_REMATCH[1]; i <= BASH_REMATCH[2]; i++)); do skip[i]=1; done
    elif [[ $p =~ ^[0-8]$ ]]; then
      skip[p]=1
    else
      usage
    fi
  done
fi

results=$1
here=$(cd "$(dirname "$0")" && pwd)
bin=${GPTOSSD_GPU_BIN:-$(cd "$here/../.." && pwd)/gpu-bin}
work=${TMPDIR:-/tmp}/gptossd-gpu-check
mkdir -p "$results" "$work" || exit 2
results=$(cd "$results" && pwd)
bin=$(cd "$bin" 2>/dev/null && pwd || echo "$bin")
log=$results/log.txt

# Dry run: another device in place of cuda:0 (see the header).
dev=${GPTOSSD_CHECK_DEVICE:-cuda:0}
dry=""
if [ "$dev" != cuda:0 ]; then dry="dry run on $dev"; fi
if [ -n "$dry" ]; then m20b_preset=${GPTOSSD_CHECK_M20B_PRESET:-tiny}; else m20b_preset=${GPTOSSD_CHECK_M20B_PRESET:-20b-shape}; fi
dev4=$dev,$dev,$dev,$dev

# The time budget of the whole run (the machine's command limit is 10 minutes, its session 15).
start=$SECONDS
total=${GPTOSSD_CHECK_BUDGET_S:-470}
# budget WANT: the seconds a phase (or one run) may take: WANT, or what is left if less.
budget() {
  local left=$((total - (SECONDS - start)))
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
# until END: seconds from now until the phase's end (at least 1).
until_end() {
  local s=$(($1 - SECONDS))
  if [ "$s" -lt 1 ]; then echo 1; else echo "$s"; fi
}

# The summary: one row per phase, "phase|status|detail".
rows=()
row() { rows+=("$1|$2|$3"); say "phase $1: $2 — $3"; }
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
failed=0
fail() { row "$1" fail "$2"; failed=1; }

# run_phase N NAME LIMIT FUNCTION: the phase, unless skipped or out of time; the function
# gets the phase's end (in $SECONDS) as $1.
run_phase() {
  local n=$1 name=$2 limit=$3 fn=$4 t
  if [ "${skip[n]}" = 1 ]; then
    rows+=("$n $name|skipped|--skip")
    return
  fi
  t=$(budget "$limit")
  if [ "$t" -lt 5 ]; then
    row "$n $name" "out of time" "${total} s budget spent"
    return
  fi
  say "phase $n $name: up to $t s"
  "$fn" $((SECONDS + t))
}

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

# stage_pid MODEL STAGE: the pid of that model's stage worker (from /proc, like
# tests/common/mod.rs's stage_workers); nothing when there is none.
stage_pid() {
  python3 - "$1" "$2" <<'EOF'
import os, sys
model, stage = sys.argv[1], sys.argv[2]
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        args = [a.decode(errors="replace") for a in open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")]
    except OSError:
        continue
    if args and args[0].endswith("gptossd-stage") and model in args and "--stage" in args:
        i = args.index("--stage")
        if i + 1 < len(args) and args[i + 1] == stage:
            print(p)
            break
EOF
}

# same_tokens A B: whether two `generate --requests` outputs hold the same token arrays.
same_tokens() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
def tokens(path):
    try:
        return [json.loads(l)["tokens"] for l in open(path) if l.strip()]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable: {e}"
a, b = tokens(sys.argv[1]), tokens(sys.argv[2])
if isinstance(b, str):
    print(b); sys.exit(1)
if a == b and a:
    print(f"identical: {len(a)} requests, {sum(map(len, a))} tokens"); sys.exit(0)
if len(a) != len(b):
    print(f"{len(b)} requests answered, {len(a)} expected"); sys.exit(1)
i = next(i for i in range(len(a)) if a[i] != b[i])
j = next((j for j in range(min(len(a[i]), len(b[i]))) if a[i][j] != b[i][j]), min(len(a[i]), len(b[i])))
print(f"request {i} differs at token {j} ({len(b[i])} tokens, {len(a[i])} expected)"); sys.exit(1)
EOF
}

# ---- phase 1: kernels --------------------------------------------------------------------
phase_kernels() {
  local lint=() cuobjdump
  # The SASS lint needs cuobjdump, which runs nvdisasm from PATH (the toolkit's bin folder).
  if cuobjdump=$(command -v cuobjdump); then lint=(--cuobjdump "$cuobjdump"); fi
  if [ ! -x "$bin/kernel_report" ]; then
    row "1 kernels" "not built yet" "no $bin/kernel_report (bench/gpu/build.sh)"
  elif timeout -k 5 "$(until_end "$1")" "$bin/kernel_report" --device 0 \
    --cache "$work/kernel-cache" "${lint[@]}" >"$results/kernels.txt" 2>&1; then
    row "1 kernels" pass "$(grep -c '^sm_' "$results/kernels.txt") kernels; $(grep '^cache:' "$results/kernels.txt" | tr '\n' ' ')"
  else
    fail "1 kernels" "$(tail -1 "$results/kernels.txt")"
  fi
}

# ---- phase 3: exactness (the CUDA suites) ------------------------------------------------
phase_exactness() {
  local end=$1 parity=$results/parity.txt suites missing="" s name filter ok=1
  suites=("backend_ops cuda::" "batch_invariance cuda::" "stage_load cuda")
  for s in "${suites[@]}"; do
    [ -x "$bin/${s%% *}" ] || missing="$missing ${s%% *}"
  done
  if [ -n "$missing" ]; then
    row "3 exactness" "not built yet" "no$missing in $bin (bench/gpu/build.sh)"
    return
  fi
  : >"$parity"
  for s in "${suites[@]}"; do
    name=${s%% *} filter=${s#* }
    echo "== $name $filter" >>"$parity"
    timeout -k 5 "$(until_end "$end")" "$bin/$name" "$filter" --nocapture >>"$parity" 2>&1 || ok=0
  done
  local passed failures skips
  passed=$(grep -o '[0-9]* passed' "$parity" | awk '{ n += $1 } END { print n + 0 }')
  failures=$(grep -o '[0-9]* failed' "$parity" | awk '{ n += $1 } END { print n + 0 }')
  # A suite that skipped its CUDA tests proves nothing: that is a failure here.
  skips=$(grep -c -e '^skipped cuda::' -e '^skipped: no CUDA driver' "$parity")
  if [ "$ok" = 1 ] && [ "$skips" = 0 ] && [ "$passed" -gt 0 ]; then
    row "3 exactness" pass "$passed CUDA tests passed (parity.txt)"
  else
    fail "3 exactness" "$passed passed, $failures failed, $skips skipped (parity.txt)"
  fi
}

# The tiny model, generated once into the work folder (kept for a resumed run).
tiny=$work/tiny
make_tiny() {
  [ -e "$tiny/.gptossd-check-complete" ] && return 0
  rm -rf "$tiny"
  "$bin/gptossd" make-test-model --preset tiny --seed 0 --out "$tiny" >>"$log" 2>&1 &&
    touch "$tiny/.gptossd-check-complete"
}

# ---- phase 4: pipeline ---------------------------------------------------------------------
phase_pipeline() {
  local end=$1 out=$results/pipeline.txt pdir=$work/pipeline ok=1 line t0
  rm -rf "$pdir"
  mkdir -p "$pdir"
  : >"$out"
  # check NAME STATUS DETAIL: one line of pipeline.txt.
  check() {
    echo "$1: $2 — $3" >>"$out"
    say "  $1: $2 — $3"
    [ "$2" = ok ] || ok=0
  }
  if [ ! -x "$bin/gptossd" ] || [ ! -x "$bin/gptossd-stage" ]; then
    row "4 pipeline" "not built yet" "no gptossd and gptossd-stage in $bin (bench/gpu/build.sh)"
    return
  fi
  if ! make_tiny; then
    fail "4 pipeline" "make-test-model --preset tiny failed (log.txt)"
    return
  fi
  # Request 0 is short: its line (printed first, in file order) shows generation under way.
  local req=$pdir/requests.jsonl
  cat >"$req" <<'EOF'
{"prompt_tokens": [1000, 1031], "max_tokens": 8, "temperature": 0.0}
{"prompt_tokens": [8919, 8950, 8981, 9012, 9043], "max_tokens": 400, "temperature": 0.0}
{"prompt_tokens": [16838, 16869, 16900, 16931, 16962, 16993, 17024, 17055], "max_tokens": 400, "temperature": 1.0, "seed": 1002}
{"prompt_tokens": [24757, 24788, 24819, 24850, 24881, 24912, 24943, 24974, 25005, 25036, 25067], "max_tokens": 400, "temperature": 0.8, "top_p": 0.9, "seed": 1003}
EOF
  # gen NAME STAGES DEVICES: one `generate --requests` run into NAME.jsonl / NAME.err.
  gen() {
    timeout -k 5 "$(until_end "$end")" "$bin/gptossd" --log text generate --model "$tiny" \
      --requests "$req" --stages "$2" --devices "$3" --threads 2 \
      >"$pdir/$1.jsonl" 2>"$pdir/$1.err"
  }
  t0=$SECONDS
  if gen s1 1 "$dev"; then
    line=$(same_tokens "$pdir/s1.jsonl" "$pdir/s1.jsonl")
    check "1 stage ($dev)" ok "${line#identical: } in $((SECONDS - t0)) s"
  else
    check "1 stage ($dev)" fail "exit $?: $(tail -1 "$pdir/s1.err")"
  fi
  for run in "s4|4 stages ($dev4)|$dev4" "mixed|mixed 4 stages ($dev,cpu,$dev,cpu)|$dev,cpu,$dev,cpu"; do
    IFS='|' read -r name label devs <<<"$run"
    t0=$SECONDS
    if gen "$name" 4 "$devs"; then
      if line=$(same_tokens "$pdir/s1.jsonl" "$pdir/$name.jsonl"); then
        check "$label vs 1 stage" ok "$line in $((SECONDS - t0)) s"
      else
        check "$label vs 1 stage" fail "$line"
      fi
    else
      check "$label" fail "exit $?: $(tail -1 "$pdir/$name.err")"
    fi
  done

  # kill -9 of stage 2 once request 0's line is out (the others have ~390 tokens to go).
  t0=$SECONDS
  timeout -k 5 "$(until_end "$end")" "$bin/gptossd" --log text generate --model "$tiny" \
    --requests "$req" --stages 4 --devices "$dev4" --threads 2 \
    >"$pdir/kill.jsonl" 2>"$pdir/kill.err" &
  local gpid=$! victim="" rc
  while kill -0 "$gpid" 2>/dev/null && [ ! -s "$pdir/kill.jsonl" ] && [ "$SECONDS" -lt "$end" ]; do
    sleep 0.02
  done
  if kill -0 "$gpid" 2>/dev/null; then victim=$(stage_pid "$tiny" 2); fi
  [ -n "$victim" ] && kill -9 "$victim"
  wait "$gpid"
  rc=$?
  if [ -z "$victim" ]; then
    check "kill -9 of stage 2" fail "no stage 2 worker to kill while generating (exit $rc, $(wc -l <"$pdir/kill.jsonl") lines out)"
  elif [ "$rc" != 0 ]; then
    check "kill -9 of stage 2" fail "exit $rc: $(tail -1 "$pdir/kill.err")"
  elif ! grep -q "stage 2 restarted 1 times" "$pdir/kill.err"; then
    check "kill -9 of stage 2" fail "no restart of stage 2 reported: $(tail -1 "$pdir/kill.err")"
  elif line=$(same_tokens "$pdir/s4.jsonl" "$pdir/kill.jsonl"); then
    check "kill -9 of stage 2 (pid $victim) vs undisturbed" ok "$line, 1 restart, in $((SECONDS - t0)) s"
  else
    check "kill -9 of stage 2 vs undisturbed" fail "$line"
  fi

  # serve: 4 stages on the device, one chat completion, SIGTERM.
  local port conf=$pdir/gptossd.toml spid
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat >"$conf" <<EOF
[server]
port = $port
control_socket = "$pdir/control.sock"

[[models]]
name = "gpt-oss-20b"
path = "$tiny"
stages = 4
devices = ["$dev", "$dev", "$dev", "$dev"]
threads_per_stage = 2
EOF
  t0=$SECONDS
  "$bin/gptossd" --log text serve --config "$conf" >"$pdir/serve.out" 2>"$pdir/serve.err" &
  spid=$!
  if line=$(python3 - "$port" "$(until_end "$end")" "$spid" <<'EOF'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.time() + float(sys.argv[2]) - 10
def exited(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
while True:
    if exited(sys.argv[3]):
        print("serve exited before it was healthy"); sys.exit(1)
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    if time.time() > deadline:
        print("not healthy in time"); sys.exit(1)
    time.sleep(0.1)
body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}).encode()
req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=max(5, deadline - time.time())) as r:
        d = json.load(r)
        print(f"HTTP {r.status}, {d['usage']['completion_tokens']} tokens, finish {d['choices'][0]['finish_reason']}")
except Exception as e:
    print(f"chat completion failed: {e}"); sys.exit(1)
EOF
  ); then
    kill -TERM "$spid"
    local waited=0
    while kill -0 "$spid" 2>/dev/null && [ "$waited" -lt 150 ]; do sleep 0.1; waited=$((waited + 1)); done
    if kill -0 "$spid" 2>/dev/null; then
      kill -9 "$spid"
      wait "$spid"
      check "serve, 4 stages ($dev4)" fail "$line; still running 15 s after SIGTERM"
    elif wait "$spid"; then
      if [ -n "$(stage_pid "$tiny" 0)$(stage_pid "$tiny" 3)" ]; then
        check "serve, 4 stages ($dev4)" fail "$line; workers left after exit"
      else
        check "serve, 4 stages ($dev4)" ok "$line; exit 0 on SIGTERM; $((SECONDS - t0)) s"
      fi
    else
      check "serve, 4 stages ($dev4)" fail "$line; exit $? on SIGTERM: $(tail -1 "$pdir/serve.err")"
    fi
  else
    kill -9 "$spid" 2>/dev/null
    wait "$spid" 2>/dev/null
    check "serve, 4 stages ($dev4)" fail "$line: $(tail -1 "$pdir/serve.err")"
  fi
  # The runs' stderr tails, for a failure's context.
  for f in "$pdir"/*.err; do
    { echo "== ${f##*/} (last 5 lines)"; tail -5 "$f"; } >>"$out"
  done
  if [ "$ok" = 1 ]; then
    row "4 pipeline" pass "$(grep -c ': ok — ' "$out") checks (pipeline.txt)"
  else
    fail "4 pipeline" "$(grep -c ': fail — ' "$out") of $(grep -c -e ': ok — ' -e ': fail — ' "$out") checks failed (pipeline.txt)"
  fi
}

# ---- phase 5: sanitizer --------------------------------------------------------------------
phase_sanitizer() {
  local cs target=${GPTOSSD_CHECK_SANITIZE:-backend_ops cuda::} out=$results/sanitizer.txt rc
  local name=${target%% *} filter=${target#* }
  if ! cs=$(command -v compute-sanitizer); then
    row "5 sanitizer" skipped "compute-sanitizer not found"
    return
  fi
  if [ ! -x "$bin/$name" ]; then
    row "5 sanitizer" "not built yet" "no $bin/$name (bench/gpu/build.sh)"
    return
  fi
  timeout -k 5 "$(until_end "$1")" "$cs" --tool memcheck --error-exitcode 3 \
    "$bin/$name" "$filter" --test-threads 1 >"$out" 2>&1
  rc=$?
  local summary
  summary=$(grep -o 'ERROR SUMMARY: [0-9]* error[s]*' "$out" | tail -1)
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    row "5 sanitizer" timeout "$name $filter under memcheck did not finish ($summary; sanitizer.txt)"
  elif [ "$rc" = 0 ] && [ "$summary" = "ERROR SUMMARY: 0 errors" ]; then
    row "5 sanitizer" pass "$name $filter: 0 memcheck errors"
  else
    fail "5 sanitizer" "$name $filter: exit $rc, ${summary:-no error summary} (sanitizer.txt)"
  fi
}

# ---- phase 6: checkpoint -------------------------------------------------------------------
m20b=""
phase_checkpoint() {
  local need_gb=1 free_gb t0 bytes
  [ "$m20b_preset" = 20b-shape ] && need_gb=16
  free_gb=$(df -P -BG /dev/shm 2>/dev/null | awk 'NR == 2 { sub("G", "", $4); print $4 }')
  if [ "${free_gb:-0}" -ge "$need_gb" ]; then m20b=/dev/shm/gptossd-m20b; else m20b=$work/m20b; fi
  if [ -e "$m20b/.gptossd-check-complete" ]; then
    row "6 checkpoint" pass "$m20b_preset in $m20b, reused from an earlier run"
    return
  fi
  rm -rf "$m20b"
  t0=$SECONDS
  if timeout -k 5 "$(until_end "$1")" "$bin/gptossd" make-test-model --preset "$m20b_preset" \
    --seed 0 --out "$m20b" >"$work/make-m20b.err" 2>&1; then
    touch "$m20b/.gptossd-check-complete"
    bytes=$(grep -o 'wrote [0-9]* bytes' "$work/make-m20b.err" | grep -o '[0-9]*')
    row "6 checkpoint" pass "$m20b_preset: $((${bytes:-0} / 1000000)) MB in $m20b in $((SECONDS - t0)) s"
  else
    local rc=$?
    cat "$work/make-m20b.err" >>"$log"
    rm -rf "$m20b"
    m20b=""
    fail "6 checkpoint" "make-test-model --preset $m20b_preset: exit $rc after $((SECONDS - t0)) s: $(tail -1 "$work/make-m20b.err")"
  fi
}
cleanup() {
  if [ -n "$m20b" ] && [ "${GPTOSSD_CHECK_KEEP_MODEL:-0}" != 1 ]; then rm -rf "$m20b"; fi
  m20b=""
}
trap cleanup EXIT

# ---- phase 7: bench ------------------------------------------------------------------------
phase_bench() {
  local end=$1 jsonl=$results/bench.jsonl ok=1 timeouts=0 lines label limit args rc t0 runs
  : >"$jsonl"
  if [ -z "$m20b" ]; then
    # Phase 6 skipped: a complete checkpoint from an earlier run, if any.
    for m20b in /dev/shm/gptossd-m20b "$work/m20b" ""; do
      [ -e "$m20b/.gptossd-check-complete" ] && break
    done
  fi
  if [ -z "$m20b" ]; then
    row "7 bench" skipped "no $m20b_preset checkpoint (phase 6)"
    return
  fi
  # label|limit s|bench flags
  runs=("1 stage batch 1,8|100|--device $dev --prompt-len 512 --gen 64 --batch 1,8"
    "1 stage batch 64|60|--device $dev --prompt-len 512 --gen 64 --batch 64"
    "1 stage prefill 2048|45|--device $dev --prompt-len 2048 --gen 1 --batch 1"
    "4 stages batch 1,64|100|--stages 4 --devices $dev4 --prompt-len 512 --gen 64 --batch 1,64")
  for r in "${runs[@]}"; do
    IFS='|' read -r label limit args <<<"$r"
    local left
    left=$(until_end "$end")
    [ "$limit" -lt "$left" ] || limit=$left
    if [ "$limit" -lt 5 ]; then
      echo "{\"run\": \"$label\", \"skipped\": \"out of time\"}" >>"$jsonl"
      timeouts=$((timeouts + 1))
      continue
    fi
    t0=$SECONDS
    # shellcheck disable=SC2086 # the flags are words
    timeout -k 5 "$limit" "$bin/gptossd" --log text bench --model "$m20b" $args --json \
      >"$work/bench.out" 2>"$work/bench.err"
    rc=$?
    cat "$work/bench.err" >>"$log"
    lines=$(python3 - "$label" "$rc" "$limit" "$((SECONDS - t0))" "$work/bench.out" "$work/bench.err" <<'EOF'
import json, sys
label, rc, limit, secs, out, err = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
n = 0
for l in open(out):
    try:
        d = json.loads(l)
    except ValueError:
        continue
    print(json.dumps({"run": label, "seconds": secs, **d}))
    n += 1
if rc in (124, 137):
    print(json.dumps({"run": label, "timeout_s": limit}))
elif rc != 0 or n == 0:
    tail = [l.strip() for l in open(err, errors="replace") if l.strip()][-1:] or [""]
    print(json.dumps({"run": label, "error": f"exit {rc}: {tail[0]}"}))
EOF
    )
    echo "$lines" >>"$jsonl"
    if grep -q '"timeout_s"' <<<"$lines"; then
      timeouts=$((timeouts + 1))
      say "  $label: timeout after $limit s"
    elif grep -q '"error"' <<<"$lines"; then
      ok=0
      say "  $label: $(grep -o '"error": .*' <<<"$lines")"
    else
      say "  $label: $(grep -c '"batch"' <<<"$lines") lines in $((SECONDS - t0)) s"
    fi
  done
  if [ "$ok" = 0 ]; then
    fail "7 bench" "a bench run failed (bench.jsonl, log.txt)"
  elif [ "$timeouts" -gt 0 ]; then
    row "7 bench" timeout "$timeouts of ${#runs[@]} runs did not finish in time (bench.jsonl)"
  else
    row "7 bench" pass "${#runs[@]} runs on $m20b_preset (bench.jsonl)"
  fi
}

# ---- phase 8: targets ----------------------------------------------------------------------
phase_targets() {
  local jsonl=$results/bench.jsonl
  if [ ! -s "$jsonl" ]; then
    row "8 targets" skipped "no bench.jsonl (phase 7)"
    return
  fi
  while IFS='|' read -r name status detail; do
    [ -n "$name" ] && row "8 $name" "$status" "$detail"
  done < <(python3 - "$jsonl" "$m20b_preset" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
preset = sys.argv[2]
def find(run, batch, key):
    for r in rows:
        if r.get("run") == run and r.get("batch") == batch and r.get(key) is not None:
            return r
    return None
def why(run):
    for r in rows:
        if r.get("run") == run and ("timeout_s" in r or "error" in r or "skipped" in r):
            if "timeout_s" in r:
                return f"timeout after {r['timeout_s']} s"
            return f"{run}: " + (r.get("error") or r.get("skipped"))[:120]
    return "no figure"
def target(name, value, bound, unit, note=""):
    if value is None:
        print(f"{name}|no value|{note}")
        return
    frac = value / bound
    met = "met" if frac >= 1 else "missed"
    print(f"{name}|{met}|{value:,.2f}{unit} vs ≥ {bound:,}{unit}: {frac:.2f} of the bound{note}")
sfx = "" if preset == "20b-shape" else f" ({preset} preset: not the target's model)"
for batch, bound, extra in ((1, 800, " (stretch 930)"), (8, 2600, ""), (64, 11000, "")):
    run = "1 stage batch 1,8" if batch < 64 else "1 stage batch 64"
    r = find(run, batch, "decode_tok_s")
    note = extra + sfx
    if r and batch == 1 and r.get("bytes_per_decode_token"):
        note = f"; {r['decode_tok_s'] * r['bytes_per_decode_token'] / 1e9:,.0f} GB/s of weights" + note
    target(f"batch-{batch} decode", r and r["decode_tok_s"], bound, " tok/s",
           note if r else f"{why(run)}{sfx}")
r = find("1 stage prefill 2048", 1, "prefill_tok_s")
target("2048 prefill", r and r["prefill_tok_s"], 20000, " tok/s", sfx if r else f"{why('1 stage prefill 2048')}{sfx}")
for batch, bound in ((1, 0.75), (64, 0.85)):
    one = find("1 stage batch 1,8" if batch == 1 else "1 stage batch 64", batch, "decode_tok_s")
    four = find("4 stages batch 1,64", batch, "decode_tok_s")
    if one and four and one["decode_tok_s"] > 0:
        target(f"4 stages vs 1, batch {batch}", four["decode_tok_s"] / one["decode_tok_s"], bound, "×",
               f"; {four['decode_tok_s']:,.1f} vs {one['decode_tok_s']:,.1f} tok/s (the 1-stage figure in-process){sfx}")
    else:
        run = "4 stages batch 1,64" if one else ("1 stage batch 1,8" if batch == 1 else "1 stage batch 64")
        target(f"4 stages vs 1, batch {batch}", None, bound, "×", f"{why(run)}{sfx}")
EOF
  )
}

# ---- phase 0: environment ----------------------------------------------------------------
say "gptossd GPU check into $results (binaries: $bin)${dry:+; $dry}${skip_spec:+; --skip $skip_spec}"
env_txt=$results/env.txt
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  echo "cpus: $(nproc)"
  echo "memory: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
} >"$env_txt"
no_gpu=""
if [ -n "$dry" ]; then
  echo "dry run: device $dev, checkpoint preset $m20b_preset" >>"$env_txt"
elif ! command -v nvidia-smi >/dev/null; then
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
  if [ -n "$dry" ]; then
    row "0 env" "dry run" "device $dev in place of cuda:0, preset $m20b_preset in place of 20b-shape"
  else
    echo "libcuda.so.1: $cuda_dir" >>"$env_txt"
    if nvrtc_dir=$(locate_lib libnvrtc.so.13) && [ -e "$nvrtc_dir/libnvrtc-builtins.so.13.0" ]; then
      echo "libnvrtc.so.13: $nvrtc_dir" >>"$env_txt"
      export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      row "0 env" pass "$(grep '^[0-9]' "$env_txt" | head -1)"
    else
      fail "0 env" "libnvrtc.so.13 with libnvrtc-builtins.so.13.0 not found"
    fi
  fi
  # CUDA_DEVICE_ORDER=PCI_BUS_ID: cuda:0 is nvidia-smi's GPU 0. The toolkit's bin folder:
  # cuobjdump (with the nvdisasm it runs) and compute-sanitizer. Every CUDA process shares the
  # cubin cache phase 1 fills (same sources, options and arch).
  export CUDA_DEVICE_ORDER=PCI_BUS_ID
  export PATH="$PATH:/usr/local/cuda/bin"
  export GPTOSSD_KERNEL_CACHE=$work/kernel-cache

  if [ -n "$dry" ]; then rows+=("1 kernels|skipped|$dry"); else run_phase 1 kernels 60 phase_kernels; fi
  rows+=("2 ceilings|not built yet|")
  if [ -n "$dry" ]; then rows+=("3 exactness|skipped|$dry"); else run_phase 3 exactness 100 phase_exactness; fi
  run_phase 4 pipeline 100 phase_pipeline
  if [ -n "$dry" ]; then rows+=("5 sanitizer|skipped|$dry"); else run_phase 5 sanitizer 45 phase_sanitizer; fi
  run_phase 6 checkpoint 150 phase_checkpoint
  run_phase 7 bench 250 phase_bench
  # Phase 8 reads a file (under a second): it runs even when the budget is spent.
  if [ "${skip[8]}" = 1 ]; then rows+=("8 targets|skipped|--skip"); else phase_targets; fi
fi
cleanup
say "done in $((SECONDS - start)) s"

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
