#!/usr/bin/env python3
"""Inspect a GGUF written by llama.cpp's converter for the gpt-oss bench checkpoint.

Prints the tensor-type counts (and bytes per type), the tokenizer metadata and
checks that every MoE expert weight tensor (ffn_{gate,up,down}_exps.weight) is
MXFP4 and that no other tensor was quantized (the rest must be BF16, or F32
for the 1-D norms/biases/sinks the converter keeps in f32).

Usage: gguf_check.py FILE.gguf [--json]
       gguf_check.py --show CHECK.json     (print the text summary of an earlier --json result)
Needs gguf-py (llama.cpp's vendored copy: put .../llama.cpp/gguf-py on PYTHONPATH) and numpy.
Exit status 1 when the expert tensors are not all MXFP4.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter


def show(result: dict) -> None:
    print(f"GGUF {result['file']}: {result['n_tensors']} tensors")
    for ty, n in result["tensor_types"].items():
        print(f"  {ty:6s} {n:3d} tensors  {result['tensor_type_bytes'][ty] / 1e9:7.3f} GB")
    print(f"  expert weights (*_exps.weight): {result['expert_tensor_types']}")
    print(f"  other matrices: {result['other_matrix_types']}")
    print(f"  metadata: {result['metadata']}")
    print(f"  experts kept MXFP4, rest unquantized: {'yes' if result['experts_mxfp4'] else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--show", help="print the text summary of a saved --json result and exit")
    args = ap.parse_args()
    if args.show:
        with open(args.show) as f:
            result = json.load(f)
        show(result)
        sys.exit(0 if result["experts_mxfp4"] else 1)
    if not args.gguf:
        ap.error("a GGUF file is required")

    from gguf import GGUFReader

    r = GGUFReader(args.gguf)
    types: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    expert_types: Counter[str] = Counter()
    other_2d: Counter[str] = Counter()
    for t in r.tensors:
        ty = t.tensor_type.name
        types[ty] += 1
        type_bytes[ty] += int(t.n_bytes)
        if "_exps.weight" in t.name:
            expert_types[ty] += 1
        elif len([d for d in t.shape if d > 1]) >= 2:
            other_2d[ty] += 1

    def field_str(key: str):
        f = r.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v if not isinstance(v, list) or len(v) < 8 else f"[{len(v)} entries]"

    meta = {
        "architecture": field_str("general.architecture"),
        "file_type": field_str("general.file_type"),
        "tokenizer_model": field_str("tokenizer.ggml.model"),
        "tokenizer_pre": field_str("tokenizer.ggml.pre"),
        "n_tokens": len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else None,
        "bos": field_str("tokenizer.ggml.bos_token_id"),
        "eos": field_str("tokenizer.ggml.eos_token_id"),
    }
    ok = bool(expert_types) and set(expert_types) == {"MXFP4"} and set(other_2d) <= {"BF16", "F32", "F16"}
    result = {
        "file": args.gguf,
        "n_tensors": len(r.tensors),
        "tensor_types": dict(sorted(types.items())),
        "tensor_type_bytes": dict(sorted(type_bytes.items())),
        "expert_tensor_types": dict(expert_types),
        "other_matrix_types": dict(other_2d),
        "metadata": meta,
        "experts_mxfp4": ok,
    }
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
