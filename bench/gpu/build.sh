#!/usr/bin/env bash
# bench/gpu/build.sh: builds what bench/gpu/check.sh runs on the GPU machine (which has no Rust
# toolchain) into gpu-bin/ at the repository root (ignored by git): release code, stripped
# (the gpu-check profile). kernel_report (phase 1) and the test binaries of the suites that
# instantiate the CUDA backend (phase 3: backend_ops, batch_invariance, stage_load; they
# generate their model at run time and read nothing from the source tree).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p gpu-bin
cargo build --profile gpu-check -p gptossd-stage --example kernel_report
cp target/gpu-check/examples/kernel_report gpu-bin/
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
