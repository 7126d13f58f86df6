#!/usr/bin/env bash
# bench/gpu/build.sh: builds what bench/gpu/check.sh runs on the GPU machine (which has no Rust
# toolchain) into gpu-bin/ at the repository root (ignored by git): release code, stripped
# (the gpu-check profile). The two real binaries, gptossd and gptossd-stage side by side (the
# supervisor runs the stage worker found beside its own executable; phases 4, 6 and 7),
# kernel_report (phase 1) and the test binaries of the suites that instantiate the CUDA backend
# (phases 3 and 5: backend_ops, batch_invariance, stage_load; they generate their model at run
# time and read nothing from the source tree). The sources and gpu-bin/ together must stay
# under the 64 MiB that may be copied to the GPU machine: the total is printed last.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p gpu-bin
cargo build --profile gpu-check -p gptossd-stage -p gptossd --bins --example kernel_report
cp target/gpu-check/gptossd target/gpu-check/gptossd-stage target/gpu-check/examples/kernel_report gpu-bin/
cargo test --profile gpu-check -p gptossd-stage --no-run --message-format=json \
  --test backend_ops --test batch_invariance --test stage_load |
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], "gpu-bin/" + m["target"]["name"])
        print("gpu-bin/" + m["target"]["name"])
'
ls -l gpu-bin
# What travels: the tracked and untracked-but-not-ignored files, plus gpu-bin/.
src_kib=$(git ls-files -z --cached --others --exclude-standard | du -c -k --files0-from=- 2>/dev/null | tail -1 | cut -f1)
bin_kib=$(du -s -k gpu-bin | cut -f1)
total_mib=$(( (src_kib + bin_kib) / 1024 ))
echo "sources ${src_kib} KiB + gpu-bin ${bin_kib} KiB = ${total_mib} MiB (limit 64 MiB)"
if [ "$total_mib" -ge 60 ]; then
  echo "too large to copy to the GPU machine" >&2
  exit 1
fi
