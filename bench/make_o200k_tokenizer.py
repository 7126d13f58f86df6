#!/usr/bin/env python3
"""Write a Hugging Face tokenizer (o200k_harmony, gpt-oss's tokenizer) offline.

gptossd's test/bench checkpoints carry no tokenizer, but llama.cpp's
convert_hf_to_gguf.py needs one (it loads it with transformers.AutoTokenizer).
This builds it from the o200k_base.tiktoken vocabulary that the tiktoken-rs
crate ships (no network, no `tiktoken` package):

  * text tokens 0..199997: the o200k_base ranks; BPE merges derived from the
    ranks exactly as transformers' TikTokenConverter does (for every token,
    the splits whose two halves are tokens, ordered by the halves' ranks);
    byte-level alphabet; pre-tokenizer = the o200k split regex + ByteLevel
    (no regex, no prefix space); ByteLevel decoder.
  * special tokens 199998..201087: the harmony names (tiktoken-rs
    `o200k_harmony`, reference gpt-oss.md section 5.1; 200018 is named
    `<|endofprompt|>` as in Hugging Face's converted tokenizer).
  * tokenizer_config.json: bos <|startoftext|>, eos <|return|>,
    pad <|endoftext|> (as in the hub repo's tokenizer_config.json).

Usage: make_o200k_tokenizer.py --tiktoken PATH/o200k_base.tiktoken --out DIR
Writes DIR/tokenizer.json, DIR/tokenizer_config.json, DIR/special_tokens_map.json.
Needs the `tokenizers` package (and `transformers` only for --check).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

# o200k_base's pre-tokenizer regex (tiktoken-rs O200K_BASE_PAT_STR).
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

N_TEXT = 199998
VOCAB_SIZE = 201088  # model rows: ids 0..201087


def harmony_special_tokens() -> dict[int, str]:
    named = {
        199998: "<|startoftext|>",
        199999: "<|endoftext|>",
        200002: "<|return|>",
        200003: "<|constrain|>",
        200005: "<|channel|>",
        200006: "<|start|>",
        200007: "<|end|>",
        200008: "<|message|>",
        200012: "<|call|>",
        200018: "<|endofprompt|>",
    }
    return {i: named.get(i, f"<|reserved_{i}|>") for i in range(N_TEXT, VOCAB_SIZE)}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map (as transformers/tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != N_TEXT or sorted(ranks.values()) != list(range(N_TEXT)):
        sys.exit(f"{path}: expected ranks 0..{N_TEXT - 1}, got {len(ranks)} tokens")
    return ranks


def vocab_and_merges(ranks: dict[bytes, int]):
    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {s(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) == 1:
            continue
        local = []
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                local.append((left, right, rank))
        local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return vocab, [(s(a), s(b)) for a, b, _ in merges]


def build(tiktoken_path: Path, out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks = load_ranks(tiktoken_path)
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    if hasattr(tok.model, "ignore_merges"):
        tok.model.ignore_merges = True
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = harmony_special_tokens()
    # ids are assigned in order after the 199998 text tokens, so add them sorted by id.
    tok.add_special_tokens([AddedToken(specials[i], normalized=False, special=True) for i in sorted(specials)])
    for i, name in specials.items():
        got = tok.token_to_id(name)
        if got != i:
            sys.exit(f"special token {name}: id {got}, expected {i}")

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, name in sorted(specials.items())
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": added,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}, indent=2)
        + "\n"
    )


def check(out: Path) -> None:
    """Sanity checks against known o200k/harmony token ids (gpt-oss.md section 5.1)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(out))
    ids = t.encode("<|start|>assistant<|channel|>final<|message|>", add_special_tokens=False)
    want = [200006, 173781, 200005, 17196, 200008]
    if ids != want:
        sys.exit(f"tokenizer check failed: {ids} != {want}")
    if t.encode("analysis", add_special_tokens=False) != [35644]:
        sys.exit("tokenizer check failed: 'analysis' is not [35644]")
    text = "Hello, world! 12345 naïve café — 你好 🚀\n\n  x"
    if t.decode(t.encode(text, add_special_tokens=False)) != text:
        sys.exit("tokenizer check failed: round trip")
    print(f"tokenizer check ok: {len(t)} tokens, harmony header ids {ids}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiktoken", type=Path, required=True, help="path to o200k_base.tiktoken")
    ap.add_argument("--out", type=Path, required=True, help="directory to write the tokenizer files into")
    ap.add_argument("--check", action="store_true", help="load it back with transformers and check known ids")
    args = ap.parse_args()
    build(args.tiktoken, args.out)
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
