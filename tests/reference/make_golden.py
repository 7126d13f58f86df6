#!/usr/bin/env python3
"""Golden outputs for a GPT-OSS checkpoint from the independent reference: Hugging Face transformers.

    make_golden.py --model DIR --out FILE.json [--preset-note NAME] [--seed-note N] [--dump-hidden DIR]

transformers' own GPT-OSS implementation does the work: it reads the checkpoint (HF hub layout,
MXFP4 experts as *_blocks/*_scales), dequantises the experts itself (Mxfp4Config(dequantize=True))
and runs the model in float32 on the CPU with eager attention and the eager (per-expert loop)
experts implementation. Nothing here touches the math of the golden numbers; the code of this
script only *checks* that the load was faithful:

  * no missing / unexpected / mismatched keys, no "newly initialized" warnings;
  * every parameter and buffer is float32;
  * every non-expert parameter (embeddings, norms, q/k/v/o weights and biases, sinks, router,
    expert biases, lm_head) equals the file's bf16 value exactly;
  * every dequantised expert weight equals an independent numpy decode of the blocks/scales
    (docs: gpt-oss.md §2.3) exactly, after transformers' [E, in, out] transpose;
  * the RoPE inverse frequencies and YaRN attention factor equal an independent computation
    (gpt-oss.md §3.4, truncate=false);
  * the logits agree with an independent float64 numpy forward pass (gpt-oss.md §3), and the
    experts_implementation="grouped_mm" path agrees with the eager one;
  * greedy generation with the KV cache (model.generate) equals a cache-free argmax loop.

Output JSON (logits are float32 values written as their shortest round-trip decimal string,
so parsing them as f32 gives the exact value transformers computed):

  {"generator": {"preset", "seed", "checkpoint_sha256": {file: sha256}},
   "reference": {"transformers", "torch", "dtype": "float32", "attn": "eager", ...},
   "prompts": [{"text", "tokens": [...],
                "top20": [[[id, logit] x 20] per position],          # one full forward, no cache
                "router_topk": [[[expert x top_k] per layer] per position],
                "greedy": [16 ids],                                   # model.generate, greedy
                "greedy_top2": [[[id, logit], [id, logit]] per generated step]}],
   "checks": {...sanity figures...}}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, Mxfp4Config
from safetensors import safe_open

# Fixed prompts: o200k_base text token ids (the tokenizer GPT-OSS uses, o200k_harmony, has the
# same text tokens). Produced with openai_harmony's HARMONY_GPT_OSS encoding,
# encode(text, allowed_special=set()); the text is kept for humans only.
PROMPTS = [
    # 5 tokens
    ("The quick brown fox jumps", [976, 4853, 19705, 68347, 65613]),
    # 13 tokens
    (
        "The weather in Paris was sunny and warm for most of the week",
        [976, 11122, 306, 12650, 673, 46726, 326, 9144, 395, 1645, 328, 290, 2384],
    ),
    # 29 tokens: longer than the tiny preset's sliding window (8)
    (
        "Once upon a time, in a small village near the mountains, there lived an old baker who "
        "made the best bread in the whole country every day",
        [18049, 7557, 261, 1058, 11, 306, 261, 3291, 17769, 5862, 290, 32429, 11, 1354, 18755,
         448, 2890, 121034, 1218, 2452, 290, 1636, 19544, 306, 290, 6062, 4931, 1753, 2163],
    ),
]
NEW_TOKENS = 16
TOP_N = 20
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
SWIGLU_ALPHA = 1.702


def f32(x) -> float:
    """A float32 value as the Python float of its shortest round-trip decimal."""
    return float(str(np.float32(x)))


def fail(msg: str) -> None:
    print(f"make_golden: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


# ----------------------------------------------------------------------------------------------
# Checkpoint access independent of transformers
# ----------------------------------------------------------------------------------------------


class Checkpoint:
    def __init__(self, model_dir: Path):
        self.dir = model_dir
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        self.weight_map: dict[str, str] = index["weight_map"]
        self.config = json.loads((model_dir / "config.json").read_text())
        self._handles = {}

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.dir / fname), framework="pt")
        return self._handles[fname].get_tensor(name)

    def sha256(self) -> dict[str, str]:
        out = {}
        names = sorted(set(self.weight_map.values())) + [
            "config.json",
            "model.safetensors.index.json",
        ]
        for n in names:
            h = hashlib.sha256()
            with open(self.dir / n, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[n] = h.hexdigest()
        return out


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Independent MXFP4 decode (gpt-oss.md §2.3). blocks [..., G, 16] u8, scales [..., G] u8 ->
    float64 [..., G*32] with element 32g+2b = low nibble of byte b, 32g+2b+1 = high nibble."""
    assert blocks.dtype == np.uint8 and scales.dtype == np.uint8
    assert blocks.shape[:-1] == scales.shape and blocks.shape[-1] == 16
    lut = np.array(FP4_VALUES, dtype=np.float64)
    lo = lut[blocks & 0x0F]
    hi = lut[blocks >> 4]
    vals = np.empty(blocks.shape[:-1] + (32,), dtype=np.float64)
    vals[..., 0::2] = lo
    vals[..., 1::2] = hi
    vals = vals * np.exp2(scales.astype(np.float64) - 127.0)[..., None]
    return vals.reshape(blocks.shape[:-2] + (blocks.shape[-2] * 32,))


def yarn_inv_freq(cfg: dict) -> tuple[np.ndarray, float]:
    """Independent YaRN inverse frequencies and attention factor (gpt-oss.md §3.4)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    theta = float(cfg.get("rope_theta", rs.get("rope_theta", 150000.0)))
    d = cfg["head_dim"]
    s = float(rs["factor"])
    l0 = float(rs["original_max_position_embeddings"])
    bf, bs = float(rs["beta_fast"]), float(rs["beta_slow"])
    assert rs.get("truncate") is False, "expected truncate: false"
    i = np.arange(d // 2, dtype=np.float64)
    f = theta ** (-2.0 * i / d)
    low = (d / 2) * math.log(l0 / (bf * 2 * math.pi)) / math.log(theta)
    high = (d / 2) * math.log(l0 / (bs * 2 * math.pi)) / math.log(theta)
    ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
    inv = f * (1 - ramp) + (f / s) * ramp
    conc = 0.1 * math.log(s) + 1.0
    return inv, conc


# ----------------------------------------------------------------------------------------------
# Load + verification
# ----------------------------------------------------------------------------------------------


def load_model(model_dir: Path, experts_impl: str):
    cap = LogCapture()
    tlog = transformers.logging.get_logger("transformers")
    tlog.addHandler(cap)
    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=torch.float32,
            attn_implementation="eager",
            experts_implementation=experts_impl,
            quantization_config=Mxfp4Config(dequantize=True),
            output_loading_info=True,
        )
    finally:
        tlog.removeHandler(cap)
        transformers.logging.set_verbosity(old)
    model.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(k):
            fail(f"load reported {k}: {info[k]}")
    bad = [
        r
        for r in cap.records
        if any(w in r.lower() for w in ("newly initialized", "not initialized", "were not used", "missing"))
    ]
    if bad:
        fail("suspicious load warnings:\n  " + "\n  ".join(bad))
    return model, cap.records


def verify_weights(model, ckpt: Checkpoint) -> dict:
    """Every parameter must be float32 and equal to the file (or to our own MXFP4 decode)."""
    params = dict(model.named_parameters())
    for n, p in params.items():
        if p.dtype != torch.float32:
            fail(f"parameter {n} is {p.dtype}, not float32")
    for n, b in model.named_buffers():
        if b.is_floating_point() and b.dtype != torch.float32:
            fail(f"buffer {n} is {b.dtype}, not float32")

    used_file_keys = set()
    checked = {"exact_params": 0, "mxfp4_params": 0}
    for n, p in params.items():
        if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj"):
            blocks = ckpt.get(n + "_blocks").numpy()
            scales = ckpt.get(n + "_scales").numpy()
            used_file_keys |= {n + "_blocks", n + "_scales"}
            logical = decode_mxfp4(blocks, scales)  # [E, out, in]
            want = torch.from_numpy(logical.astype(np.float32)).transpose(1, 2)  # HF: [E, in, out]
            if tuple(want.shape) != tuple(p.shape):
                fail(f"{n}: shape {tuple(p.shape)} vs decoded {tuple(want.shape)}")
            if not torch.equal(p.detach(), want):
                d = (p.detach() - want).abs().max().item()
                fail(f"{n}: dequantised weight differs from the manual MXFP4 decode (max |d| {d})")
            if not np.array_equal(logical, logical.astype(np.float32).astype(np.float64)):
                fail(f"{n}: decoded values not exact in f32")
            checked["mxfp4_params"] += 1
            continue
        if n not in ckpt.weight_map:
            fail(f"parameter {n} has no tensor in the checkpoint")
        t = ckpt.get(n)
        used_file_keys.add(n)
        if t.dtype != torch.bfloat16:
            fail(f"{n}: file dtype {t.dtype}, expected bfloat16")
        if tuple(t.shape) != tuple(p.shape):
            fail(f"{n}: shape {tuple(p.shape)} vs file {tuple(t.shape)}")
        if not torch.equal(p.detach(), t.float()):
            fail(f"{n}: loaded value differs from the file")
        checked["exact_params"] += 1
    unused = set(ckpt.weight_map) - used_file_keys
    if unused:
        fail(f"checkpoint tensors not accounted for: {sorted(unused)}")
    checked["file_tensors"] = len(used_file_keys)

    # A few spot values, printed for the record: layer 0 expert 0 gate_up, first block.
    n = "model.layers.0.mlp.experts.gate_up_proj"
    blk = ckpt.get(n + "_blocks")[0, 0, 0].numpy()
    sc = int(ckpt.get(n + "_scales")[0, 0, 0])
    manual = [FP4_VALUES[(int(blk[k // 2]) >> (4 * (k % 2))) & 0xF] * 2.0 ** (sc - 127) for k in range(4)]
    got = [params[n][0, k, 0].item() for k in range(4)]  # [E, in, out]: out row 0, in 0..3
    print(f"  spot check {n}[e0,out0,in0..3]: manual {manual} transformers {got}")
    if manual != got:
        fail("spot check mismatch")

    # RoPE
    inv, conc = yarn_inv_freq(ckpt.config)
    rot = model.model.rotary_emb
    got_inv = rot.inv_freq.detach().double().numpy()
    rel = np.max(np.abs(got_inv - inv) / inv)
    if rel > 1e-6:
        fail(f"RoPE inv_freq differs from the YaRN formula (max rel {rel}):\n{got_inv}\n{inv}")
    if abs(rot.attention_scaling - conc) > 1e-6:
        fail(f"YaRN attention factor {rot.attention_scaling} != {conc}")
    checked["rope_inv_freq_max_rel_err"] = float(rel)
    checked["yarn_attention_factor"] = float(rot.attention_scaling)
    return checked


# ----------------------------------------------------------------------------------------------
# Independent float64 numpy forward (cross-check only)
# ----------------------------------------------------------------------------------------------


class NumpyRef:
    def __init__(self, ckpt: Checkpoint):
        c = ckpt.config
        self.c = c
        g = lambda n: ckpt.get(n).double().numpy()  # noqa: E731
        self.emb = g("model.embed_tokens.weight")
        self.lm = g("lm_head.weight")
        self.norm = g("model.norm.weight")
        self.layers = []
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            L = {k: g(p + k) for k in [
                "input_layernorm.weight", "post_attention_layernorm.weight",
                "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                "self_attn.o_proj.weight", "self_attn.o_proj.bias", "self_attn.sinks",
                "mlp.router.weight", "mlp.router.bias", "mlp.experts.gate_up_proj_bias",
                "mlp.experts.down_proj_bias"]}
            for proj in ("gate_up_proj", "down_proj"):
                L[proj] = decode_mxfp4(ckpt.get(p + f"mlp.experts.{proj}_blocks").numpy(),
                                       ckpt.get(p + f"mlp.experts.{proj}_scales").numpy())
            self.layers.append(L)
        self.inv_freq, self.conc = yarn_inv_freq(c)

    @staticmethod
    def rms(x, w, eps):
        return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    def forward(self, ids):
        c = self.c
        T = len(ids)
        nh, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        eps, k_top, lim = c["rms_norm_eps"], c["num_experts_per_tok"], c["swiglu_limit"]
        W = c["sliding_window"]
        ang = np.arange(T, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(ang) * self.conc, np.sin(ang) * self.conc

        def rope(x):  # [T, h, d]
            a, b = x[..., : d // 2], x[..., d // 2:]
            cc, ss = cos[:, None, :], sin[:, None, :]
            return np.concatenate([a * cc - b * ss, b * cc + a * ss], axis=-1)

        x = self.emb[ids]
        routes = []
        pos = np.arange(T)
        for i, L in enumerate(self.layers):
            h = self.rms(x, L["input_layernorm.weight"], eps)
            q = (h @ L["self_attn.q_proj.weight"].T + L["self_attn.q_proj.bias"]).reshape(T, nh, d)
            k = (h @ L["self_attn.k_proj.weight"].T + L["self_attn.k_proj.bias"]).reshape(T, nkv, d)
            v = (h @ L["self_attn.v_proj.weight"].T + L["self_attn.v_proj.bias"]).reshape(T, nkv, d)
            q, k = rope(q), rope(k)
            allowed = pos[None, :] <= pos[:, None]
            if c["layer_types"][i] == "sliding_attention":
                allowed &= pos[None, :] > pos[:, None] - W
            o = np.zeros((T, nh, d))
            for t in range(nh):
                kv = t // (nh // nkv)
                lg = (q[:, t, :] @ k[:, kv, :].T) / math.sqrt(d)
                lg = np.where(allowed, lg, -np.inf)
                s = L["self_attn.sinks"][t]
                m = np.maximum(lg.max(axis=1, keepdims=True), s)
                e = np.exp(lg - m)
                P = e / (e.sum(axis=1, keepdims=True) + np.exp(s - m))
                o[:, t, :] = P @ v[:, kv, :]
            x = x + o.reshape(T, nh * d) @ L["self_attn.o_proj.weight"].T + L["self_attn.o_proj.bias"]
            h = self.rms(x, L["post_attention_layernorm.weight"], eps)
            g = h @ L["mlp.router.weight"].T + L["mlp.router.bias"]
            top = np.argsort(-g, axis=1, kind="stable")[:, :k_top]
            routes.append(top)
            moe = np.zeros_like(x)
            for p in range(T):
                gv = g[p, top[p]]
                w = np.exp(gv - gv.max())
                w /= w.sum()
                for e_, we in zip(top[p], w):
                    u = L["gate_up_proj"][e_] @ h[p] + L["mlp.experts.gate_up_proj_bias"][e_]
                    gate, up = np.minimum(u[0::2], lim), np.clip(u[1::2], -lim, lim)
                    a = gate / (1 + np.exp(-SWIGLU_ALPHA * gate)) * (up + 1)
                    moe[p] += we * (L["down_proj"][e_] @ a + L["mlp.experts.down_proj_bias"][e_])
            x = x + moe
        x = self.rms(x, self.norm, eps)
        return x @ self.lm.T, routes


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def run_forward(model, ids: list[int]):
    """One full forward pass without cache; returns logits [T, V] and hooks' captures."""
    cap: dict[str, torch.Tensor] = {}
    hooks = []
    m = model.model
    hooks.append(m.embed_tokens.register_forward_hook(lambda mod, a, out: cap.__setitem__("embed", out[0].clone())))
    for i, layer in enumerate(m.layers):
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, a, i=i: cap.__setitem__(f"layer{i:02d}_attn_residual", a[0][0].clone())))
        hooks.append(layer.register_forward_hook(
            lambda mod, a, out, i=i: cap.__setitem__(f"layer{i:02d}_out", (out[0] if isinstance(out, tuple) else out)[0].clone())))
        hooks.append(layer.mlp.router.register_forward_hook(
            lambda mod, a, out, i=i: cap.__setitem__(f"layer{i:02d}_router_logits", out[0].clone())))
    hooks.append(m.norm.register_forward_hook(lambda mod, a, out: cap.__setitem__("final_norm", out[0].clone())))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=False, output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    logits = out.logits[0]
    for i, rl in enumerate(out.router_logits):
        if not torch.equal(rl, cap[f"layer{i:02d}_router_logits"]):
            fail("router logits from output_router_logits differ from the hook")
    return logits, cap


def topn(row: torch.Tensor, n: int):
    vals, idx = torch.topk(row, n + 1)
    pairs = sorted(zip(idx.tolist(), vals.tolist()), key=lambda t: (-t[1], t[0]))
    return pairs[:n], pairs[n - 1][1] - pairs[n][1]


def greedy_generate(model, ids: list[int]):
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
        num_beams=1,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            generation_config=gc,
        )
    seq = out.sequences[0].tolist()
    if seq[: len(ids)] != ids or len(seq) != len(ids) + NEW_TOKENS:
        fail(f"generate returned {len(seq) - len(ids)} new tokens / altered the prompt")
    new = seq[len(ids):]
    top2 = []
    for step, lg in enumerate(out.logits):
        pairs, _ = topn(lg[0], 2)
        if pairs[0][0] != new[step]:
            fail("generate's token is not the argmax of its logits")
        top2.append(pairs)
    return new, top2


def greedy_nocache(model, ids: list[int]):
    seq = list(ids)
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        seq.append(int(torch.argmax(lg)))
    return seq[len(ids):]


def longest_run(xs):
    best = cur = 1
    for a, b in zip(xs, xs[1:]):
        cur = cur + 1 if a == b else 1
        best = max(best, cur)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset-note", default=None, help="make-test-model preset, recorded in the JSON")
    ap.add_argument("--seed-note", default=None, type=int, help="make-test-model seed, recorded in the JSON")
    ap.add_argument("--dump-hidden", default=None, type=Path,
                    help="write per-layer hidden states / router logits / logits as .npy files here")
    ap.add_argument("--skip-crosscheck", action="store_true",
                    help="skip the float64 numpy forward and the grouped_mm comparison")
    args = ap.parse_args()

    torch.set_num_threads(1)  # deterministic reduction order, and the machine is shared
    torch.manual_seed(0)

    ckpt = Checkpoint(args.model)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print("loading with transformers (float32, eager attention, eager experts, Mxfp4 dequantize=True)")
    model, logs = load_model(args.model, "eager")
    print(f"  load log: {logs if logs else 'clean'}")
    if model.config._experts_implementation != "eager" or model.config._attn_implementation != "eager":
        fail(f"implementations: experts {model.config._experts_implementation}, attn {model.config._attn_implementation}")
    print("verifying the loaded weights against the checkpoint")
    weight_checks = verify_weights(model, ckpt)
    print(f"  ok: {weight_checks}")

    cfg = ckpt.config
    n_layers, top_k, n_exp = cfg["num_hidden_layers"], cfg["num_experts_per_tok"], cfg["num_local_experts"]
    prompts_out = []
    all_routes = []  # (layer, expert-set)
    min_gap = (math.inf, None)
    min_boundary = math.inf
    max_abs_logit = 0.0
    logit_std = []
    np_ref = None if args.skip_crosscheck else NumpyRef(ckpt)
    cross = {"numpy_f64_max_abs_dlogit": 0.0, "numpy_f64_max_rel_dlogit": 0.0, "numpy_router_set_mismatches": 0,
             "grouped_mm_max_abs_dlogit": 0.0}
    model_gmm = None
    if not args.skip_crosscheck:
        model_gmm, _ = load_model(args.model, "grouped_mm")

    for pi, (text, ids) in enumerate(PROMPTS):
        if any(t >= 199998 for t in ids):
            fail("prompt ids must be ordinary text tokens")
        logits, cap = run_forward(model, ids)
        if not torch.isfinite(logits).all():
            fail(f"prompt {pi}: non-finite logits")
        max_abs_logit = max(max_abs_logit, logits.abs().max().item())
        logit_std.append(logits.std(dim=-1).mean().item())
        top20 = []
        for p in range(len(ids)):
            pairs, boundary = topn(logits[p], TOP_N)
            top20.append([[i, f32(v)] for i, v in pairs])
            gap = pairs[0][1] - pairs[1][1]
            if gap < min_gap[0]:
                min_gap = (gap, (pi, p))
            min_boundary = min(min_boundary, boundary)
        router_topk = []
        for p in range(len(ids)):
            row = []
            for li in range(n_layers):
                rl = cap[f"layer{li:02d}_router_logits"][p]
                idx = torch.topk(rl, top_k).indices.tolist()
                row.append(idx)
                all_routes.append((li, tuple(sorted(idx))))
            router_topk.append(row)

        greedy, greedy_top2 = greedy_generate(model, ids)
        nocache = greedy_nocache(model, ids)
        if nocache != greedy:
            fail(f"prompt {pi}: generate (KV cache) {greedy} != cache-free greedy {nocache}")

        if not args.skip_crosscheck:
            ref_logits, ref_routes = np_ref.forward(ids)
            d = np.abs(logits.double().numpy() - ref_logits)
            cross["numpy_f64_max_abs_dlogit"] = max(cross["numpy_f64_max_abs_dlogit"], float(d.max()))
            cross["numpy_f64_max_rel_dlogit"] = max(cross["numpy_f64_max_rel_dlogit"], float(d.max() / np.abs(ref_logits).max()))
            if not np.array_equal(np.argmax(ref_logits, axis=1), logits.argmax(dim=1).numpy()):
                fail(f"prompt {pi}: numpy reference argmax differs")
            for li in range(n_layers):
                for p in range(len(ids)):
                    if sorted(ref_routes[li][p].tolist()) != sorted(router_topk[p][li]):
                        cross["numpy_router_set_mismatches"] += 1
            lg2, _ = run_forward(model_gmm, ids)
            cross["grouped_mm_max_abs_dlogit"] = max(cross["grouped_mm_max_abs_dlogit"], (lg2 - logits).abs().max().item())

        if args.dump_hidden:
            args.dump_hidden.mkdir(parents=True, exist_ok=True)
            np.save(args.dump_hidden / f"p{pi}_tokens.npy", np.array(ids, dtype=np.int64))
            for k, v in cap.items():
                np.save(args.dump_hidden / f"p{pi}_{k}.npy", v.numpy().astype(np.float32))
            np.save(args.dump_hidden / f"p{pi}_logits.npy", logits.numpy().astype(np.float32))

        prompts_out.append({
            "text": text,
            "tokens": ids,
            "top20": top20,
            "router_topk": router_topk,
            "greedy": greedy,
            "greedy_top2": [[[i, f32(v)] for i, v in pairs] for pairs in greedy_top2],
        })
        print(f"prompt {pi} ({len(ids)} tokens): greedy {greedy}")

    if not args.skip_crosscheck:
        print(f"cross-checks: {cross}")
        if cross["numpy_f64_max_abs_dlogit"] > 1e-3 or cross["grouped_mm_max_abs_dlogit"] > 1e-3:
            fail("cross-check differences too large")

    # Sanity figures
    per_layer_experts = {li: set() for li in range(n_layers)}
    for li, s in all_routes:
        per_layer_experts[li].update(s)
    distinct_sets = len(set(all_routes))
    greedy_gaps = [p["greedy_top2"][s][0][1] - p["greedy_top2"][s][1][1]
                   for p in prompts_out for s in range(NEW_TOKENS)]
    checks = {
        "weights": weight_checks,
        "logits_finite": True,
        "max_abs_logit": f32(max_abs_logit),
        "mean_logit_std_over_vocab": f32(sum(logit_std) / len(logit_std)),
        "min_top1_top2_gap": f32(min_gap[0]),
        "min_top1_top2_gap_at": {"prompt": min_gap[1][0], "position": min_gap[1][1]},
        "min_top20_top21_gap": f32(min_boundary),
        "min_greedy_step_top1_top2_gap": f32(min(greedy_gaps)),
        "experts_used_per_layer": {str(li): sorted(s) for li, s in per_layer_experts.items()},
        "distinct_layer_expert_sets": distinct_sets,
        "greedy_longest_repeat_run": [longest_run(p["greedy"]) for p in prompts_out],
        "greedy_distinct_tokens": [len(set(p["greedy"])) for p in prompts_out],
        "greedy_cache_equals_nocache": True,
    }
    if not args.skip_crosscheck:
        checks["crosscheck"] = {k: (f32(v) if isinstance(v, float) else v) for k, v in cross.items()}

    doc = {
        "generator": {
            "preset": args.preset_note,
            "seed": args.seed_note,
            "checkpoint_sha256": ckpt.sha256(),
        },
        "reference": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "dtype": "float32",
            "attn": "eager",
            "experts_implementation": "eager",
            "mxfp4": "Mxfp4Config(dequantize=True), dequantised by transformers to float32",
            "device": "cpu",
            "torch_threads": 1,
            "forward": "one full forward per prompt, use_cache=False, batch 1, no padding",
            "greedy": f"model.generate(do_sample=False, max_new_tokens={NEW_TOKENS}, eos_token_id=None), KV cache",
            "logit_format": "float32 value as its shortest round-trip decimal",
            "router_topk_layout": "[position][layer][k], torch.topk order (descending router logit)",
        },
        "prompts": prompts_out,
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(json.dumps(checks, indent=1))
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
