"""Why does subtracting the per-channel key mean alone (`mean`) cost SmolLM2 +84% perplexity at
2 bits when plain VQ (`vq`) costs +17%? (QUALITY.md, ablation.) Per layer, on one window of the
essays, with the queries and post-RoPE keys the model really computes:
  - key error: ||K - K_hat|| / ||K||;
  - score error: ||Q K^T - Q K_hat^T|| / ||Q K^T|| over causal pairs (what softmax sees);
  - where the key error lands: the share of the score error from the 4-dim sub-vector positions
    (channel groups) holding the largest query energy;
  - the first token (the attention sink): its key error and how far its scores move.

    OMP_NUM_THREADS=1 python bench/diag_key_mean.py [--tokens 2048] [--json bench/diag_key_mean.json]
"""
from __future__ import annotations

import argparse
import json

import torch
from transformers.modeling_utils import AttentionInterface

from vecinfer.evaluate import _set_attn
from vecinfer.hf import collect_kv, load_gguf_model, load_text, tokenize
from vecinfer.quantizer import build_quantizer

CAPTURED = {}


def capture(module, query, key, value, attention_mask, **kwargs):
    """Records post-RoPE queries and keys per layer, then runs SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    CAPTURED[module.layer_idx] = (query[0].float(), key[0].float())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def layer_report(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor, sub: int = 4) -> dict:
    """q [Hq, T, D], k/k_hat [Hkv, T, D] (GQA by head grouping)."""
    group = q.shape[0] // k.shape[0]
    kk, kh = k.repeat_interleave(group, 0), k_hat.repeat_interleave(group, 0)
    t = q.shape[1]
    causal = torch.ones(t, t).tril().bool()
    s, s_hat = q @ kk.transpose(-1, -2), q @ kh.transpose(-1, -2)
    err = (s - s_hat)[:, causal]
    # score error per channel group: q[..., g] . (k - k_hat)[..., g] summed over pairs, squared
    e = kk - kh
    d = q.shape[-1]
    per_group = []
    for g in range(d // sub):
        sl = slice(g * sub, (g + 1) * sub)
        per_group.append(float(((q[..., sl] @ e[..., sl].transpose(-1, -2))[:, causal] ** 2).sum()))
    q_energy = [float((q[..., g * sub:(g + 1) * sub] ** 2).sum()) for g in range(d // sub)]
    top = sorted(range(d // sub), key=lambda g: -q_energy[g])[:4]
    # the first token separately: the attention sink, which takes most of many rows' softmax mass
    return {"key_err": float((k - k_hat).norm() / k.norm()), "score_err": float(err.norm() / s[:, causal].norm()),
            "sink_key_err": float((k[:, 0] - k_hat[:, 0]).norm() / k[:, 0].norm()),
            "sink_score_shift": float((s_hat[:, :, 0] - s[:, :, 0]).mean()),
            "sink_score_abs_err": float((s_hat[:, :, 0] - s[:, :, 0]).abs().mean()),
            "score_err_share_top4_query_groups": sum(per_group[g] for g in top) / max(sum(per_group), 1e-30),
            "top4_query_groups": top,
            "key_err_in_top4_query_groups": float(e[..., [c for g in top for c in range(g * sub, (g + 1) * sub)]].norm()
                                                  / e.norm())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--methods", default="vq,mean,mean+hadamard,vecinfer-nosink")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_gguf_model("smollm2-135m")
    keys, values = collect_kv(model, tok, load_text("wiki"), max_tokens=8192, chunk=4096, progress=False)
    AttentionInterface.register("capture", capture)
    _set_attn(model, "capture")
    ids = torch.tensor([tokenize(tok, load_text("essays"))[0][: args.tokens]])
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    out = {}
    for method in args.methods.split(","):
        quantizer = build_quantizer(method, keys, values, bits=2, progress=False)
        rows = []
        for layer in sorted(CAPTURED):
            q, k = CAPTURED[layer]
            k_hat = quantizer.decode_keys(layer, quantizer.encode_keys(layer, k.contiguous()), torch.float32)
            rows.append(layer_report(q, k, k_hat))
        out[method] = rows
        print(f"{method:16s} key err (mean over layers) {sum(r['key_err'] for r in rows) / len(rows):.3f}  "
              f"score err {sum(r['score_err'] for r in rows) / len(rows):.3f}  share of score error in the 4 "
              f"query-heaviest channel groups {sum(r['score_err_share_top4_query_groups'] for r in rows) / len(rows):.2f}",
              flush=True)
        print("   score err per layer: " + " ".join(f"{r['score_err']:.2f}" for r in rows), flush=True)
        print("   first token's key err per layer: " + " ".join(f"{r['sink_key_err']:.2f}" for r in rows), flush=True)
        print("   mean shift of the first token's scores per layer: "
              + " ".join(f"{r['sink_score_shift']:+.1f}" for r in rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
