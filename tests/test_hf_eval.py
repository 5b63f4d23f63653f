"""vecinfer.hf and vecinfer.evaluate on a tiny random-weight Llama (no downloads, CPU, a few seconds)."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import ByteTokenizer  # noqa: E402
from vecinfer import evaluate, hf  # noqa: E402

HEAD_DIM = 64
KV_HEADS = 2
LAYERS = 2
VOCAB = 128


class IdentityQuantizer:
    class config:
        residual = 8
        sink_tokens = 0

    def fake_quantize(self, layer, k, v):
        return k.clone(), v.clone()

    def bits_per_element(self):
        return 16.0


class PerturbQuantizer:
    """Adds a fixed, large perturbation to whatever it is asked to compress; records what it saw."""

    def __init__(self, residual=8, sink_tokens=0, scale=3.0):
        self.config = type("cfg", (), {"residual": residual, "sink_tokens": sink_tokens})()
        self.scale = scale
        self.calls = []

    def fake_quantize(self, layer, k, v):
        self.calls.append((layer, tuple(k.shape)))
        g = torch.Generator().manual_seed(1234 + layer)
        nk = torch.randn(k.shape, generator=g, dtype=torch.float32).to(k.dtype)
        nv = torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype)
        return k + self.scale * nk, v + self.scale * nv

    def bits_per_element(self):
        return 2.0


class Int4Quantizer:
    """Round-to-nearest int4 per token (a stand-in for a real quantizer)."""

    def __init__(self, residual=8):
        self.config = type("cfg", (), {"residual": residual, "sink_tokens": 0})()

    def fake_quantize(self, layer, k, v):
        def q(x):
            s = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
            return (x / s).round().clamp(-8, 7) * s
        return q(k), q(v)

    def bits_per_element(self):
        return 4.0


class GroupQuantizer:
    """Keys per channel over aligned groups of 8 tokens (KIVI-like), 2-bit; values per token."""

    def __init__(self, residual=4, group=8):
        self.config = type("cfg", (), {"residual": residual, "sink_tokens": 0})()
        self.group = group

    def fake_quantize(self, layer, k, v):
        t = k.shape[2]
        pad = (-t) % self.group
        kp = torch.cat([k, k[:, :, -1:].expand(-1, -1, pad, -1)], dim=2) if pad else k
        g = kp.reshape(k.shape[0], k.shape[1], -1, self.group, k.shape[3])
        lo, hi = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
        s = (hi - lo).clamp_min(1e-8) / 3
        kq = (((g - lo) / s).round().clamp(0, 3) * s + lo).reshape(kp.shape)[:, :, :t]
        return kq, Int4Quantizer().fake_quantize(layer, v, v)[1]


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=512, rope_theta=10000.0)
    cfg._attn_implementation = "sdpa"
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger q/k weights: sharper attention, so errors show
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return m


def _ids(n, seed=0):
    return torch.randint(2, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_collect_kv_shapes_and_post_rope(model):
    tok = ByteTokenizer(VOCAB)
    text = "the quick brown fox jumps over the lazy dog. " * 4  # 180 chars + BOS
    keys, values = hf.collect_kv(model, tok, [text], max_tokens=100, chunk=64, progress=False)
    assert len(keys) == len(values) == LAYERS
    for k, v in zip(keys, values):
        assert k.shape == v.shape == (KV_HEADS, 100, HEAD_DIM)
        assert k.dtype == v.dtype == torch.float32
    # post-RoPE: layer 0's keys of the first chunk equal k_proj(norm(embed)) rotated, and differ
    # from the unrotated projection at positions > 0 (equal at position 0)
    ids = torch.tensor([tok(text)["input_ids"][:64]])
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    raw = model.model.layers[0].self_attn.k_proj(h).view(1, 64, KV_HEADS, HEAD_DIM).transpose(1, 2)[0]
    got = keys[0][:, :64]
    assert torch.allclose(got[:, 0], raw[:, 0], atol=1e-5)
    assert (got[:, 1:] - raw[:, 1:]).abs().amax() > 1e-2
    assert torch.allclose(got.norm(dim=-1), raw.norm(dim=-1), atol=1e-4)  # a rotation keeps norms
    # the second chunk starts at position 0 again
    raw2 = model.model.layers[0].self_attn.k_proj(model.model.layers[0].input_layernorm(
        model.model.embed_tokens(torch.tensor([tok(text)["input_ids"][64:65]]))))
    assert torch.allclose(keys[0][:, 64], raw2.view(KV_HEADS, HEAD_DIM), atol=1e-5)


@torch.no_grad()
def test_identity_quantizer_reproduces_logits(model, path):
    ids = _ids(48)
    ref = model(input_ids=ids).logits
    impl = model.config._attn_implementation
    with evaluate.fake_quant_attention(model, IdentityQuantizer()):
        assert model.config._attn_implementation == evaluate.ATTN_NAME
        got = model(input_ids=ids).logits
    with evaluate.fake_quant_attention(model, None):
        fp = model(input_ids=ids).logits
    assert model.config._attn_implementation == impl  # restored
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), float((got - ref).abs().max())
    assert torch.allclose(fp, ref, atol=1e-5, rtol=1e-5), float((fp - ref).abs().max())
    model.config._attn_implementation = "eager"
    try:
        eager = model(input_ids=ids).logits
    finally:
        model.config._attn_implementation = impl
    assert torch.allclose(got, eager, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_residual_window_unaffected(model, path):
    residual, n = 8, 40
    ids = _ids(n, seed=1)
    ref = model(input_ids=ids).logits[0]
    q = PerturbQuantizer(residual=residual)
    with evaluate.fake_quant_attention(model, q):
        got = model(input_ids=ids).logits[0]
    # query i sees compressed keys only at j <= i - residual: the first `residual` positions see none
    assert torch.allclose(got[:residual], ref[:residual], atol=1e-5)
    assert (got[residual:] - ref[residual:]).abs().amax(-1).min() > 1e-4  # every later position changes
    # only positions [0, n - residual) were ever handed to the quantizer
    assert all(shape[2] == n - residual for _, shape in q.calls) and {l for l, _ in q.calls} == set(range(LAYERS))


@pytest.fixture(params=["sdpa", "explicit"])
def path(request, monkeypatch):
    """Both implementations of the attention function: torch's fused sdpa (small query blocks, so
    block edges are crossed) and the explicit-scores reference."""
    monkeypatch.setattr(evaluate, "_REFERENCE", request.param == "explicit")
    monkeypatch.setattr(evaluate, "_SDPA_BLOCK", 5)
    return request.param


@torch.no_grad()
def test_sink_tokens_and_reference_selection(model, path):
    """The per-(i, j) selection against a direct reference: attention over per-query key sets."""
    residual, sink, n = 6, 3, 24
    layer = model.model.layers[0].self_attn
    q = PerturbQuantizer(residual=residual, sink_tokens=sink)
    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, 4, n, HEAD_DIM, generator=g)
    key = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g)
    value = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g)
    with evaluate.fake_quant_attention(model, q):
        out, _ = evaluate.fakequant_attention_forward(layer, query, key, value, None, scaling=HEAD_DIM ** -0.5)
    kq, vq = q.fake_quantize(0, key[:, :, sink:n - residual], value[:, :, sink:n - residual])
    ref = torch.empty(1, n, 4, HEAD_DIM)
    for i in range(n):
        for h in range(4):
            kv = h // 2
            ks, vs = key[0, kv, : i + 1].clone(), value[0, kv, : i + 1].clone()
            for j in range(sink, i - residual + 1):
                ks[j], vs[j] = kq[0, kv, j - sink], vq[0, kv, j - sink]
            p = torch.softmax(query[0, h, i] @ ks.T * HEAD_DIM ** -0.5, -1)
            ref[0, i, h] = p @ vs
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())


@torch.no_grad()
@pytest.mark.parametrize("residual,sink", [(0, 0), (1, 0), (5, 2), (40, 0)])
def test_sdpa_path_matches_explicit(model, monkeypatch, residual, sink):
    """Fused and explicit implementations agree: prefill and decode shapes, with and without a
    model mask (a sliding-window-like bool mask), GQA, block edges."""
    layer = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(7 + residual)
    tk = 37
    key = torch.randn(1, KV_HEADS, tk, HEAD_DIM, generator=g)
    value = torch.randn(1, KV_HEADS, tk, HEAD_DIM, generator=g)
    monkeypatch.setattr(evaluate, "_SDPA_BLOCK", 4)
    for tq in (tk, 9, 1):
        query = torch.randn(1, 4, tq, HEAD_DIM, generator=g)
        pos = torch.arange(tk - tq, tk)[:, None]
        col = torch.arange(tk)[None]
        window = (col <= pos) & (col > pos - 12)
        for mask in (None, window[None, None]):
            outs = []
            for ref in (False, True):
                monkeypatch.setattr(evaluate, "_REFERENCE", ref)
                with evaluate.fake_quant_attention(model, PerturbQuantizer(residual, sink, scale=1.0)):
                    outs.append(evaluate.fakequant_attention_forward(layer, query, key, value, mask, scaling=0.1)[0])
            if mask is None and tq > 1:
                assert not torch.allclose(outs[0], evaluate.fakequant_attention_forward(
                    layer, query, key, value, mask, scaling=0.1)[0], atol=1e-3) or residual >= tk - 1
            assert torch.allclose(outs[0], outs[1], atol=1e-5), (tq, mask is None, float((outs[0] - outs[1]).abs().max()))


@torch.no_grad()
def test_perplexity_and_query_blocks(model, monkeypatch):
    ids = _ids(100, seed=2)[0]
    fp = evaluate.perplexity(model, ids, None, window=32)
    ident = evaluate.perplexity(model, ids, IdentityQuantizer(), window=32)
    assert math.isfinite(fp["ppl"]) and fp["ppl"] > 1
    assert fp["tokens"] == 99 - 3  # 4 windows (32, 32, 32, 4), each first token unscored
    assert fp["windows"] == 4
    assert abs(ident["ppl"] - fp["ppl"]) < 1e-4 * fp["ppl"]
    # strided windows score every token after the first exactly once
    strided = evaluate.perplexity(model, ids, None, window=32, stride=16)
    assert strided["tokens"] == 99 and math.isfinite(strided["ppl"])
    pert = evaluate.perplexity(model, ids, PerturbQuantizer(residual=4), window=32)
    assert pert["ppl"] != fp["ppl"]
    # query blocking (long windows) gives the same numbers as one block
    monkeypatch.setattr(evaluate, "_BLOCK_ELEMENTS", 1)  # blocks of 16 queries
    pert2 = evaluate.perplexity(model, ids, PerturbQuantizer(residual=4), window=32)
    assert abs(pert2["ppl"] - pert["ppl"]) < 1e-4 * pert["ppl"]


@torch.no_grad()
def test_layer_errors_and_generate(model):
    ids = _ids(40, seed=3)[0]
    rows = evaluate.layer_errors(model, ids, Int4Quantizer(residual=8))
    assert [r["layer"] for r in rows] == list(range(LAYERS))
    assert all(0 < r["local"] < 0.5 and 0 < r["accumulated"] < 0.5 for r in rows)
    zero = evaluate.layer_errors(model, ids, IdentityQuantizer())
    assert all(r["local"] < 1e-6 and r["accumulated"] < 1e-6 for r in zero)
    # greedy decoding through the cache equals re-running the full forward each step
    q = Int4Quantizer(residual=4)  # per-token deterministic, like a real cache's codes
    new = evaluate.generate_greedy(model, ids[:20], q, max_new_tokens=4)
    seq = ids[:20].tolist()
    with evaluate.fake_quant_attention(model, q):
        for _ in range(4):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert new == seq[20:]


def test_eval_main_help():
    with pytest.raises(SystemExit) as e:
        evaluate.eval_main(["--help"])
    assert e.value.code == 0


class CountingQuantizer:
    def __init__(self, inner):
        self.inner, self.config, self.tokens = inner, inner.config, 0

    def fake_quantize(self, layer, k, v):
        self.tokens += k.shape[2]
        return self.inner.fake_quantize(layer, k, v)


@torch.no_grad()
def test_incremental_decode_matches_full_requantization(model, path):
    """Reusing the fake-quantized prefix while decoding equals re-quantizing every old position
    each step, also for a quantizer that groups tokens; and it quantizes fewer tokens."""
    ids = _ids(100, seed=4)
    for inner in (GroupQuantizer(residual=4), Int4Quantizer(residual=4)):
        logits, counts = {}, {}
        for inc in (True, False):
            q = CountingQuantizer(inner)
            with evaluate.fake_quant_attention(model, q, incremental=inc):
                res = model(input_ids=ids[:, :30], use_cache=True)
                out = [res.logits[0, -1]]
                for t in range(30, 100):
                    res = model(input_ids=ids[:, t:t + 1], past_key_values=res.past_key_values, use_cache=True)
                    out.append(res.logits[0, -1])
            logits[inc], counts[inc] = torch.stack(out), q.tokens
        assert torch.allclose(logits[True], logits[False], atol=1e-5), float((logits[True] - logits[False]).abs().max())
        assert counts[True] < counts[False]  # (at most _ALIGN + 1 re-quantized per step)
    new = evaluate.generate_greedy(model, ids[0, :40], GroupQuantizer(residual=4), max_new_tokens=6)
    assert new == evaluate.generate_greedy(model, ids[0, :40], GroupQuantizer(residual=4), max_new_tokens=6,
                                           incremental=False)
