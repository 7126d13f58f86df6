#!/usr/bin/env python3
"""Summarise a compare_llama_cpp.sh results directory as the issue-5 table.

Reads, from --results DIR:
  llama-bench.json            llama-bench -o json (one object per test, with samples_ts)
  llama-bench.rss_kib         peak RSS of llama-bench, KiB
  gptossd-p<N>-r<i>.jsonl     gptossd bench --json, one line per batch size
  gptossd-p<N>-r<i>.rss_kib   peak RSS of that gptossd run, KiB (measured from outside)
  gptossd-stages<S>-p<N>-r<i>.jsonl  optional, gptossd bench --stages S --batch 1
  gguf_check.json             gguf_check.py --json
Prints a markdown table (stdout) and writes DIR/summary.json. Medians throughout.
Standard library only.

  compare_report.py --results DIR [--meta key=value ...]
  compare_report.py --line FILE.jsonl     (one-line summary of a gptossd bench output)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

GIB = 1024**3


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.lstrip().startswith("{")]


def fmt(x, nd=1, unit=""):
    if x is None:
        return "—"
    return f"{x:.{nd}f}{unit}"


def ratio(a, b):
    return a / b if a is not None and b else None


def verdict(value, target):
    if value is None:
        return "—"
    return "yes" if value >= target else "**no**"


def llama_tests(paths):
    """Merge llama-bench -o json outputs: {(n_prompt, n_gen): (first record, all samples_ts)}."""
    merged: dict[tuple[int, int], tuple[dict, list[float]]] = {}
    for p in paths:
        for t in json.loads(Path(p).read_text()):
            key = (t["n_prompt"], t["n_gen"])
            samples = t.get("samples_ts") or [t["avg_ts"]]
            if key in merged:
                merged[key][1].extend(samples)
            else:
                merged[key] = (t, list(samples))
    return merged


def test_name(n_prompt: int, n_gen: int) -> str:
    if n_prompt > 0 and n_gen == 0:
        return f"pp{n_prompt}"
    if n_gen > 0 and n_prompt == 0:
        return f"tg{n_gen}"
    return f"pp{n_prompt}+tg{n_gen}"


def load_llama(res: Path):
    files = sorted(res.glob("llama-bench*.json"))
    if not files:
        sys.exit(f"no llama-bench*.json in {res}")
    prefill, decode = {}, None
    detail = []
    first = None
    for (n_prompt, n_gen), (t, samples) in llama_tests(files).items():
        first = first or t
        m = statistics.median(samples)
        if n_prompt > 0 and n_gen == 0:
            prefill[n_prompt] = m
        elif n_gen > 0 and n_prompt == 0:
            decode = m
        detail.append(
            {
                "test": test_name(n_prompt, n_gen),
                "median_tok_s": m,
                "mean_tok_s": statistics.fmean(samples),
                "stddev_tok_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
                "min_tok_s": min(samples),
                "max_tok_s": max(samples),
                "n": len(samples),
            }
        )
    rss = [int(f.read_text().split()[-1]) * 1024 for f in sorted(res.glob("llama-bench*.rss_kib"))]
    info = {k: first.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size", "n_threads", "repack", "flash_attn")}
    return {"prefill": prefill, "decode_b1": decode, "peak_rss_bytes": max(rss) if rss else None, "tests": detail, "info": info, "files": [f.name for f in files]}


def llama_decode_by_round(res: Path) -> dict[int, float]:
    """llama-bench's decode (tg) median per interleaved round, from llama-bench-r<i>.json."""
    out = {}
    for f in res.glob("llama-bench-r*.json"):
        m = re.fullmatch(r"llama-bench-r(\d+)\.json", f.name)
        if not m:
            continue
        for (n_prompt, n_gen), (_, samples) in llama_tests([f]).items():
            if n_gen > 0 and n_prompt == 0:
                out[int(m.group(1))] = statistics.median(samples)
    return out


def paired_ratio(num: dict, den: dict):
    """The median over shared run indices of num[i] / den[i]: runs interleaved in time, so
    each pair saw the same state of a shared machine."""
    keys = sorted(set(num) & set(den))
    vals = [num[k] / den[k] for k in keys if num[k] and den[k]]
    return (statistics.median(vals), len(vals)) if vals else (None, 0)


def llama_line(path: Path) -> str:
    parts = []
    for (n_prompt, n_gen), (_, samples) in llama_tests([path]).items():
        parts.append(f"{test_name(n_prompt, n_gen)} {statistics.median(samples):.2f}")
    n = max(len(v[1]) for v in llama_tests([path]).values())
    return ", ".join(parts) + f" tok/s (median of {n})"


def load_gptossd(res: Path):
    runs: dict[int, list[list[dict]]] = {}
    ext_rss: list[int] = []
    for f in sorted(res.glob("gptossd-p*-r*.jsonl")):
        m = re.fullmatch(r"gptossd-p(\d+)-r(\d+)\.jsonl", f.name)
        if not m:
            continue
        runs.setdefault(int(m.group(1)), []).append(jsonl(f))
        rss = f.with_suffix(".rss_kib")
        if rss.exists():
            ext_rss.append(int(rss.read_text().split()[-1]) * 1024)
    if not runs:
        sys.exit(f"no gptossd-p*-r*.jsonl in {res}")
    per_pl = {}
    all_rows = [r for reps in runs.values() for rows in reps for r in rows]
    for pl, reps in sorted(runs.items()):
        by_batch: dict[int, list[dict]] = {}
        for rows in reps:
            for r in rows:
                by_batch.setdefault(int(r["batch"]), []).append(r)
        b1 = by_batch.get(1, [])
        per_pl[pl] = {
            "prefill_tok_s": med(r["prefill_tok_s"] for rows in reps for r in rows[:1]),
            "decode_tok_s": {b: med(r["decode_tok_s"] for r in rs) for b, rs in sorted(by_batch.items())},
            "decode_tok_s_min_max": {
                b: [min(r["decode_tok_s"] for r in rs), max(r["decode_tok_s"] for r in rs)] for b, rs in sorted(by_batch.items())
            },
            "prefill_tok_s_min_max": [
                min(rows[0]["prefill_tok_s"] for rows in reps),
                max(rows[0]["prefill_tok_s"] for rows in reps),
            ],
            "roofline_fraction_b1": med(r.get("roofline_fraction") for r in b1),
            "roofline_fraction_vs_best_b1": med(r.get("roofline_fraction_vs_best") for r in b1),
            "read_bandwidth_best_gbs": med(r.get("read_bandwidth_best_gbs") for r in b1),
            "read_bandwidth_gbs": med(r.get("read_bandwidth_gbs") for r in b1),
            "bytes_per_decode_token": med(r.get("bytes_per_decode_token") for r in b1),
            "n_runs": len(reps),
        }
    stages = {}
    stage_runs = {}  # (stages, prompt_len) -> {run index: decode tok/s}
    for f in sorted(res.glob("gptossd-stages*-p*-r*.jsonl")):
        m = re.fullmatch(r"gptossd-stages(\d+)-p(\d+)-r(\d+)\.jsonl", f.name)
        if m:
            for r in jsonl(f):
                stages.setdefault((int(m.group(1)), int(m.group(2))), []).append(r["decode_tok_s"])
                stage_runs.setdefault((int(m.group(1)), int(m.group(2))), {})[int(m.group(3))] = r["decode_tok_s"]
    # Batch-1 decode per run index and prompt length (for ratios paired by round).
    b1_runs = {}
    for f in sorted(res.glob("gptossd-p*-r*.jsonl")):
        m = re.fullmatch(r"gptossd-p(\d+)-r(\d+)\.jsonl", f.name)
        if m:
            for r in jsonl(f):
                if int(r["batch"]) == 1:
                    b1_runs.setdefault(int(m.group(1)), {})[int(m.group(2))] = r["decode_tok_s"]
    return {
        "per_prompt_len": per_pl,
        "peak_rss_bytes_self": max((r.get("peak_rss_bytes") or 0) for r in all_rows) or None,
        "peak_rss_bytes_external": max(ext_rss) if ext_rss else None,
        "checkpoint_bytes": next((r["checkpoint_bytes"] for r in all_rows if r.get("checkpoint_bytes")), None),
        "read_bandwidth_gbs": med(r.get("read_bandwidth_gbs") for r in all_rows),
        "isa": sorted({r["isa"] for r in all_rows if r.get("isa")}),
        "bytes_per_decode_token": med(r.get("bytes_per_decode_token") for r in all_rows if int(r["batch"]) == 1),
        "stages": {f"{s}@{pl}": {"decode_tok_s_b1": med(v), "n": len(v)} for (s, pl), v in stages.items()},
        "stage_runs": {f"{s}@{pl}": v for (s, pl), v in stage_runs.items()},
        "b1_runs": b1_runs,
    }


def line_summary(path: Path) -> str:
    return "  ".join(
        f"batch {r['batch']}: prefill {r['prefill_tok_s']:.1f}, decode {r['decode_tok_s']:.2f} tok/s"
        + (f" (roofline {r['roofline_fraction']:.2f})" if r.get("roofline_fraction") is not None else "")
        for r in jsonl(path)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path)
    ap.add_argument("--meta", action="append", default=[], help="key=value printed in the header and summary.json")
    ap.add_argument("--line", type=Path, help="print a one-line summary of one gptossd bench JSONL file and exit")
    ap.add_argument("--llama-line", type=Path, help="print a one-line summary of one llama-bench JSON file and exit")
    args = ap.parse_args()
    if args.line:
        print(line_summary(args.line))
        return
    if args.llama_line:
        print(llama_line(args.llama_line))
        return
    if not args.results:
        ap.error("--results is required")
    res = args.results
    meta = dict(kv.split("=", 1) for kv in args.meta)

    ll = load_llama(res)
    g = load_gptossd(res)
    gchk = json.loads((res / "gguf_check.json").read_text()) if (res / "gguf_check.json").exists() else None

    pls = sorted(g["per_prompt_len"], reverse=True)
    short = min(pls)
    gp = g["per_prompt_len"]
    g_b1 = gp[short]["decode_tok_s"].get(1)
    batches = sorted(gp[short]["decode_tok_s"])
    big = max(batches)
    g_big = gp[short]["decode_tok_s"].get(big)
    bw = g["read_bandwidth_gbs"]
    bpt = g["bytes_per_decode_token"]
    llama_roof = ll["decode_b1"] * bpt / (bw * 1e9) if ll["decode_b1"] and bw and bpt else None
    ckpt = g["checkpoint_bytes"] or (int(meta["gguf_bytes"]) if "gguf_bytes" in meta else None)
    g_rss = max(x for x in (g["peak_rss_bytes_self"], g["peak_rss_bytes_external"]) if x) if (g["peak_rss_bytes_self"] or g["peak_rss_bytes_external"]) else None

    rows = []  # figure, llama, gptossd, ratio, target, met
    for pl in pls:
        r = ratio(gp[pl]["prefill_tok_s"], ll["prefill"].get(pl))
        tgt = "≥ 1.5× llama.cpp" if pl == 512 else "—"
        rows.append(
            (
                f"prefill, {pl}-token prompt (tok/s)",
                fmt(ll["prefill"].get(pl)),
                fmt(gp[pl]["prefill_tok_s"]),
                fmt(r, 2, "×"),
                tgt,
                verdict(r, 1.5) if pl == 512 else "",
            )
        )
    r_dec = ratio(g_b1, ll["decode_b1"])
    r_dec_paired, n_dec_paired = paired_ratio(g["b1_runs"].get(short, {}), llama_decode_by_round(res))
    rows.append(
        (
            f"decode, batch 1 (tok/s; gptossd after a {short}-token prompt, llama-bench tg{meta.get('llama_gen', '')} from empty)",
            fmt(ll["decode_b1"], 2),
            fmt(g_b1, 2),
            fmt(r_dec, 2, "×") + (f" (paired by round: {fmt(r_dec_paired, 2, '×')}, n={n_dec_paired})" if r_dec_paired else ""),
            "≥ 1.0× llama.cpp",
            verdict(r_dec, 1.0),
        )
    )
    for pl in pls:
        if pl != short:
            rows.append(
                (
                    f"decode, batch 1, after a {pl}-token prompt (tok/s)",
                    "",
                    fmt(gp[pl]["decode_tok_s"].get(1), 2),
                    fmt(ratio(gp[pl]["decode_tok_s"].get(1), ll["decode_b1"]), 2, "×"),
                    "",
                    "",
                )
            )
    roof = gp[short]["roofline_fraction_b1"]
    rows.append(
        (
            f"decode roofline fraction, batch 1 ({fmt(bpt / 1e9 if bpt else None, 3)} GB/token ÷ the read pass after each step, median {fmt(bw, 1)} GB/s)",
            fmt(llama_roof, 3),
            fmt(roof, 3),
            "",
            "≥ 0.85 (gptossd)",
            verdict(roof, 0.85),
        )
    )
    roof_best = gp[short].get("roofline_fraction_vs_best_b1")
    if roof_best is not None:
        rows.append(
            (
                f"  the same against the best read pass of the run ({fmt(gp[short].get('read_bandwidth_best_gbs'), 1)} GB/s; a floor)",
                "",
                fmt(roof_best, 3),
                "",
                "",
                "",
            )
        )
    if big > 1:
        agg = ratio(g_big, g_b1)
        rows.append(
            (
                f"aggregate decode, {big} concurrent sequences (tok/s)",
                "",
                fmt(g_big, 2),
                f"{fmt(agg, 2, '×')} gptossd batch 1",
                "≥ 5× batch 1",
                verdict(agg, 5.0),
            )
        )
    rss_ratio_ckpt = ratio(g_rss, ckpt)
    rows.append(
        (
            "peak RSS (GiB; × checkpoint bytes)",
            f"{fmt(ll['peak_rss_bytes'] / GIB if ll['peak_rss_bytes'] else None, 2)} ({fmt(ratio(ll['peak_rss_bytes'], int(meta['gguf_bytes'])) if 'gguf_bytes' in meta else None, 2, '×')} GGUF)",
            f"{fmt(g_rss / GIB if g_rss else None, 2)} ({fmt(rss_ratio_ckpt, 2, '×')} ckpt)",
            fmt(ratio(g_rss, ll["peak_rss_bytes"]), 2, "×"),
            "≤ 1.1× checkpoint bytes",
            ("yes" if rss_ratio_ckpt is not None and rss_ratio_ckpt <= 1.1 else "**no**") if rss_ratio_ckpt else "—",
        )
    )
    for key, st in sorted(g["stages"].items()):
        s_, pl = key.split("@")
        if s_ == "1":
            continue
        base = g["stages"].get(f"1@{pl}", {}).get("decode_tok_s_b1")
        r = ratio(st["decode_tok_s_b1"], base)
        r_paired, n_paired = paired_ratio(g["stage_runs"].get(key, {}), g["stage_runs"].get(f"1@{pl}", {}))
        rows.append(
            (
                f"{s_}-stage pipeline vs 1 stage, decode batch 1, {pl}-token prompt (tok/s)",
                "",
                f"{fmt(st['decode_tok_s_b1'], 2)} vs {fmt(base, 2)}",
                f"{fmt(r, 2, '×')} 1 stage (paired by run: {fmt(r_paired, 2, '×')}, n={n_paired})",
                "≥ 0.95×",
                f"{verdict(r, 0.95)} (paired: {verdict(r_paired, 0.95)})",
            )
        )

    out = []
    out.append("")
    mode = "interleaved rounds" if meta.get("interleave") == "1" else "llama-bench first, then gptossd"
    out.append(f"## gptossd vs llama.cpp — {meta.get('threads', '?')} threads, medians (llama-bench: {meta.get('reps', '?')} repetitions; gptossd: {meta.get('gptossd_reps', '?')} runs per prompt length; {mode})")
    out.append("")
    out.append("| figure | llama.cpp | gptossd | gptossd / llama.cpp | target | met |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        out.append("| " + " | ".join(r) + " |")
    out.append("")
    out.append("Details:")
    out.append(
        f"- llama.cpp: llama-cpp-python {meta.get('llama_cpp_python')} sdist, vendored llama.cpp @ {meta.get('llama_cpp_commit')} "
        f"(ggml {meta.get('ggml_version')}), build flags: {meta.get('llama_cpp_cpu')}; llama-bench reports build_commit "
        f"{ll['info'].get('build_commit')}, model_type '{ll['info'].get('model_type')}', repack={ll['info'].get('repack')}, "
        f"flash_attn={ll['info'].get('flash_attn')}"
    )
    for t in ll["tests"]:
        out.append(
            f"  - {t['test']}: median {t['median_tok_s']:.2f} tok/s, mean {t['mean_tok_s']:.2f} ± {t['stddev_tok_s']:.2f}, "
            f"range {t['min_tok_s']:.2f}–{t['max_tok_s']:.2f}, n={t['n']}"
        )
    out.append(f"- gptossd {meta.get('gptossd_rev')}: kernels {'/'.join(g['isa']) or '?'}, read bandwidth {fmt(bw, 2)} GB/s, {int(bpt) if bpt else '?'} bytes per batch-1 decode token, "
               f"peak RSS self-reported {fmt((g['peak_rss_bytes_self'] or 0) / GIB, 2)} GiB, measured {fmt((g['peak_rss_bytes_external'] or 0) / GIB, 2)} GiB ({meta.get('rss_method')}), checkpoint {fmt((ckpt or 0) / 1e9, 2)} GB")
    for pl in pls:
        d = gp[pl]
        dec = ", ".join(
            f"batch {b} {v:.2f} ({d['decode_tok_s_min_max'][b][0]:.2f}–{d['decode_tok_s_min_max'][b][1]:.2f})" for b, v in d["decode_tok_s"].items()
        )
        out.append(
            f"  - prompt {pl}: prefill {fmt(d['prefill_tok_s'])} tok/s ({d['prefill_tok_s_min_max'][0]:.1f}–{d['prefill_tok_s_min_max'][1]:.1f}); "
            f"decode tok/s {dec}; roofline {fmt(d['roofline_fraction_b1'], 3)}; n={d['n_runs']}"
        )
    if gchk:
        out.append(
            f"- GGUF {meta.get('gguf')}: {gchk['n_tensors']} tensors, types {gchk['tensor_types']}, expert weights {gchk['expert_tensor_types']}, "
            f"experts kept MXFP4: {'yes' if gchk['experts_mxfp4'] else 'NO'}; tokenizer pre '{gchk['metadata'].get('tokenizer_pre')}', {gchk['metadata'].get('n_tokens')} tokens"
        )
    out.append(f"- machine: {meta.get('cpu')}; load average before {meta.get('loadavg_before')}, after {meta.get('loadavg_after')} (a shared machine: expect noise); both weight files evicted and read once before the runs, readahead {meta.get('read_ahead_kb')} KB")
    print("\n".join(out))

    summary = {
        "meta": meta,
        "llama_cpp": ll,
        "gptossd": g,
        "gguf_check": gchk,
        "ratios": {
            "prefill": {str(pl): ratio(gp[pl]["prefill_tok_s"], ll["prefill"].get(pl)) for pl in pls},
            "decode_b1": r_dec,
            "aggregate_over_b1": ratio(g_big, g_b1),
            "gptossd_rss_over_checkpoint": rss_ratio_ckpt,
            "gptossd_rss_over_llama_rss": ratio(g_rss, ll["peak_rss_bytes"]),
        },
        "gptossd_roofline_fraction_b1": roof,
        "gptossd_roofline_fraction_vs_best_b1": roof_best,
        "llama_cpp_implied_roofline_fraction_b1": llama_roof,
    }
    (res / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
