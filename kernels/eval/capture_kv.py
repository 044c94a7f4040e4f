#!/usr/bin/python3
"""Captures the KV cache of a small decoder-only transformer for quant_eval.

The model is Llama-shaped (RMSNorm, rotary position embeddings on Q and K,
grouped-query attention, SwiGLU MLP) with RANDOM weights (seeded, std 0.02 like
common initialisations): no checkpoint is downloaded. Random weights give K and
V whose statistics come from the architecture alone (RoPE, norms, GQA), not
from training: trained models add the outlier channels that the synthetic
generator in quant_eval models. Debian's python3-torch (1.13) runs it on CPU.

Writes, in --out:
  kv.f16     [layers][2][tokens][kv_heads][head_dim] fp16 (K after RoPE, V)
  q.f16      [layers][queries][q_heads][head_dim] fp16: the last `queries`
             positions' queries after RoPE
  shape.txt  "name value" lines: layers tokens kv_heads head_dim q_heads queries
"""
import argparse
import math
import os

import torch


def rope(x, base=10000.0):
    # x: [tokens, heads, head_dim]; rotate pairs (i, i + d/2) as Llama does.
    t, _, d = x.shape
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rms_norm(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--q_heads", type=int, default=16)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    d_model = a.q_heads * a.head_dim
    group = a.q_heads // a.kv_heads
    std = 0.02
    emb = torch.randn(a.vocab, d_model) * 1.0  # embeddings at unit scale, like a trained table
    ids = torch.randint(0, a.vocab, (a.tokens,))
    x = emb[ids]
    causal = torch.full((a.tokens, a.tokens), float("-inf")).triu(1)
    kv_out, q_out = [], []
    with torch.no_grad():
        for _ in range(a.layers):
            wq = torch.randn(d_model, a.q_heads * a.head_dim) * std
            wk = torch.randn(d_model, a.kv_heads * a.head_dim) * std
            wv = torch.randn(d_model, a.kv_heads * a.head_dim) * std
            wo = torch.randn(a.q_heads * a.head_dim, d_model) * std
            w1 = torch.randn(d_model, 4 * d_model) * std
            w3 = torch.randn(d_model, 4 * d_model) * std
            w2 = torch.randn(4 * d_model, d_model) * std
            h = rms_norm(x)
            q = rope((h @ wq).view(a.tokens, a.q_heads, a.head_dim))
            k = rope((h @ wk).view(a.tokens, a.kv_heads, a.head_dim))
            v = (h @ wv).view(a.tokens, a.kv_heads, a.head_dim)
            kv_out.append(torch.stack([k, v]))
            q_out.append(q[-a.queries :])
            kk = k.repeat_interleave(group, dim=1)
            vv = v.repeat_interleave(group, dim=1)
            att = torch.einsum("thd,shd->hts", q, kk) / math.sqrt(a.head_dim) + causal
            o = torch.einsum("hts,shd->thd", att.softmax(-1), vv).reshape(a.tokens, -1)
            x = x + o @ wo
            h = rms_norm(x)
            x = x + (torch.nn.functional.silu(h @ w1) * (h @ w3)) @ w2

    os.makedirs(a.out, exist_ok=True)
    torch.stack(kv_out).half().numpy().tofile(os.path.join(a.out, "kv.f16"))
    torch.stack(q_out).half().numpy().tofile(os.path.join(a.out, "q.f16"))
    with open(os.path.join(a.out, "shape.txt"), "w") as f:
        for k, v in [("layers", a.layers), ("tokens", a.tokens), ("kv_heads", a.kv_heads),
                     ("head_dim", a.head_dim), ("q_heads", a.q_heads), ("queries", a.queries)]:
            f.write(f"{k} {v}\n")
    print(f"capture_kv: {a.layers} layers x {a.tokens} tokens x {a.kv_heads} KV heads x {a.head_dim} "
          f"(random weights, seed {a.seed}) -> {a.out}")


if __name__ == "__main__":
    main()
