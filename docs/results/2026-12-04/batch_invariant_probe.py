"""What makes a row's result depend on its batch on this CPU: the measurements behind `mixtral.batch_invariant`.

    python docs/results/2026-12-04/batch_invariant_probe.py

Prints, for each kernel a forward pass uses, how many rows (or queries, or elements) come out different from the
same row computed alone, and for the products also against the same row among 256.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtral import kernels

torch.manual_seed(0)
ROWS = (1, 2, 3, 4, 8, 9, 16, 64, 256)


def products() -> None:
    print("x·Wᵀ: rows differing from the row alone (from the row among 256), by rows of x")
    candidates = {"F.linear": F.linear, "kernels.matmul": kernels.matmul}
    if kernels.available():
        candidates["gemv.c (any rows)"] = lambda x, w: kernels.gemv_bf16(x.contiguous(), w).to(x.dtype)
    for dtype in (torch.bfloat16, torch.float32):
        for name, fn in candidates.items():
            if dtype == torch.float32 and name != "F.linear":
                continue
            for n, k in ((4096, 4096), (4096, 14336)):
                w = (torch.randn(n, k) * 0.02).to(dtype)
                x = torch.randn(256, k).to(dtype)
                alone = torch.cat([fn(x[i:i + 1].clone(), w) for i in range(256)])
                among = fn(x, w)
                cells = []
                for m in ROWS:
                    y = fn(x[:m], w)
                    cells.append(f"{m}:{sum(not torch.equal(y[i], alone[i]) for i in range(m))}"
                                 f"({sum(not torch.equal(y[i], among[i]) for i in range(m))})")
                print(f"  {name:<18} {str(dtype)[6:]:<8} {n}x{k:<6} " + " ".join(cells), flush=True)


def attention() -> None:
    print("SDPA, 32 heads on 8, head_dim 128")
    heads, kv, d = 32, 8, 128
    for dtype in (torch.bfloat16, torch.float32):
        def sdpa(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        keys = 300
        k, v = torch.randn(1, kv, 1024, d).to(dtype), torch.randn(1, kv, 1024, d).to(dtype)
        q = torch.randn(1, heads, 1, d).to(dtype)
        own = sdpa(q, k[:, :, :keys], v[:, :, :keys], torch.ones(1, 1, 1, keys, dtype=torch.bool))
        changed = []
        for extra in (1, 7, 16, 100, 724):
            mask = torch.zeros(1, 1, 1, keys + extra, dtype=torch.bool)
            mask[..., :keys] = True
            changed.append(not torch.equal(sdpa(q, k[:, :, :keys + extra], v[:, :, :keys + extra], mask), own))
        qs, ks, vs = torch.randn(16, heads, 1, d).to(dtype), torch.randn(16, kv, keys, d).to(dtype), \
            torch.randn(16, kv, keys, d).to(dtype)
        full = torch.ones(16, 1, 1, keys, dtype=torch.bool)
        batch = sdpa(qs, ks, vs, full)
        rows = sum(not torch.equal(batch[i], sdpa(qs[i:i + 1], ks[i:i + 1], vs[i:i + 1], full[i:i + 1])[0])
                   for i in range(16))
        s = 64
        q64, k64, v64 = torch.randn(1, heads, s, d).to(dtype), torch.randn(1, kv, s, d).to(dtype), \
            torch.randn(1, kv, s, d).to(dtype)
        causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
        chunk = sdpa(q64, k64, v64, causal)
        queries = sum(not torch.equal(chunk[:, :, i:i + 1], sdpa(q64[:, :, i:i + 1], k64[:, :, :i + 1],
                                                                   v64[:, :, :i + 1], causal[:, :, i:i + 1, :i + 1]))
                      for i in range(s))
        print(f"  {str(dtype)[6:]:<8} masked keys past its own (+1, +7, +16, +100, +724) change a query: {changed}; "
              f"rows of a 16-row decode differing from alone: {rows}/16; queries of a 64-query chunk differing from "
              f"alone: {queries}/64", flush=True)


def elementwise() -> None:
    print("elementwise: elements differing computed alone vs in a 100000-element tensor")
    for name, fn in (("silu", F.silu), ("sigmoid", torch.sigmoid), ("exp", torch.exp), ("cos", torch.cos),
                     ("sin", torch.sin)):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(100000) * 3).to(dtype)
            bulk = fn(x)
            alone = torch.cat([fn(x[i:i + 1]) for i in range(2000)])
            print(f"  {name:<8} {str(dtype)[6:]:<8} {int((alone != bulk[:2000]).sum())}/2000", flush=True)
    x = torch.randn(256, 4096)
    alone = torch.cat([x[i:i + 1].pow(2).mean(-1, keepdim=True) for i in range(256)])
    print(f"  RMSNorm's mean over 4096, rows of 256 differing from alone: "
          f"{int((x.pow(2).mean(-1, keepdim=True) != alone).sum())}")
    logits = torch.randn(4096, 2)
    alone = torch.cat([torch.softmax(logits[i:i + 1], -1) for i in range(4096)])
    print(f"  softmax over top-2 logits, rows of 4096 differing from alone: "
          f"{int((torch.softmax(logits, -1) != alone).any(-1).sum())}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {kernels.policy()}")
    with torch.inference_mode():
        products()
        attention()
        elementwise()
