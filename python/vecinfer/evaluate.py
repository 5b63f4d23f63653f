"""Model-level quality of a KV quantizer on a Hugging Face causal LM (CPU is fine).

Everything runs through one attention function, registered with transformers' AttentionInterface
as ``"vecinfer_fakequant"``: inside every layer, for the query at position i, the keys and values at
positions j with ``sink_tokens <= j <= i - residual`` are replaced by the quantizer's
``fake_quantize`` (compressed, then decompressed) versions; the first ``sink_tokens`` and the last
``residual`` positions stay in full precision. That is what a cache holding the most recent
``residual`` tokens in full precision and everything older compressed computes. ``quantizer=None``
is the full-precision baseline through the same function.

    with fake_quant_attention(model, quantizer):
        logits = model(input_ids).logits

- ``perplexity(model, ids, quantizer, window=2048)``: windows of ``window`` tokens (non-overlapping,
  or strided with ``stride``), each a fresh sequence.
- ``layer_errors(model, ids, quantizer)``: per layer, relative Frobenius error of the attention
  output with quantization against without (on the same layer input, and accumulated end to end).
- ``needle(model, tokenizer, quantizer, context_tokens, depths)``: passkey retrieval.
- ``eval_main(argv)``: the ``vecinfer eval`` command line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

ATTN_NAME = "vecinfer_fakequant"
NEEDLE = "The secret passkey is {passkey}. Remember it."
NEEDLE_QUESTION = "\n\nWhat is the secret passkey mentioned in the text above? The secret passkey is"
PASSKEY = "48213"
_BLOCK_ELEMENTS = 1 << 25  # score elements per query block (128 MiB of float32)


# --------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)  # compared by identity (holds tensors)
class _State:
    quantizer: object = None
    residual: int = 0
    sink_tokens: int = 0
    compare: bool = False  # also compute the unquantized output on the same inputs
    record: bool = False   # keep every layer's attention output
    outputs: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    err_sq: Dict[int, float] = field(default_factory=dict)
    ref_sq: Dict[int, float] = field(default_factory=dict)
    incremental: bool = False  # decoding: reuse the fake-quantized prefix of the previous step
    reference: bool = False    # explicit scores instead of torch's fused sdpa (same function, slower)
    fq_cache: Dict[int, tuple] = field(default_factory=dict)
    query_absmax: Optional[Dict[int, torch.Tensor]] = None  # per layer [Hkv, D], when recording queries
    observer: object = None  # observer.observe_query(layer, query, key_length) before each attention call


_ALIGN = 64  # re-quantize from a multiple of this many tokens after `lo` (token-group quantizers stay exact)


def _fake_quantize(state: _State, module, key, value, lo: int, hi: int):
    """(k_hat, v_hat) of positions [lo, hi). With state.incremental, positions before the last
    _ALIGN boundary the previous call covered are reused, the rest re-quantized: identical to
    quantizing [lo, hi) at once for per-token quantizers and for ones grouping tokens in aligned
    groups dividing _ALIGN (KIVI's 32), and it keeps decoding O(new tokens) per step."""
    layer = module.layer_idx
    cached = state.fq_cache.get(layer) if state.incremental else None
    start = lo
    if cached is not None and cached[0] == lo and lo <= cached[1] <= hi and cached[2].shape[2] == cached[1] - lo:
        start = lo + ((cached[1] - lo) // _ALIGN) * _ALIGN
    ranged = getattr(state.quantizer, "fake_quantize_range", None)
    if ranged is not None:  # a quantizer that looks at the neighbouring positions (realpath.KeptTokens)
        kq, vq = ranged(layer, key, value, start, hi)
    else:
        kq, vq = state.quantizer.fake_quantize(layer, key[:, :, start:hi], value[:, :, start:hi])
    if start > lo:
        kq = torch.cat([cached[2][:, :, : start - lo], kq], dim=2)
        vq = torch.cat([cached[3][:, :, : start - lo], vq], dim=2)
    if state.incremental:
        state.fq_cache[layer] = (lo, hi, kq, vq)
    return kq, vq


_STACK: List[_State] = []


def _repeat_groups(query: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hkv, G*T, D] (query head h uses KV head h // G, as transformers' repeat_kv)."""
    b, hq, t, d = query.shape
    return query.reshape(b, hkv, (hq // hkv) * t, d)


def _float_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The model's mask as a float additive [B, 1|H, Tq|1, Tk] tensor (bool masks: True = attend)."""
    mask = attention_mask
    if mask is None:
        return None
    if mask.dim() == 2:  # [B, Tk] padding mask
        mask = mask[:, None, None, :]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _rows(mask: torch.Tensor, a: int, e: int) -> torch.Tensor:
    return mask[..., a:e, :] if mask.shape[-2] > 1 else mask


def _quantized_kv(state: Optional[_State], module, key, value, tq: int):
    """(lo, hi, k_hat, v_hat): the fake-quantized positions [lo, hi) (float32), or None when no
    position is compressed for any of the queries."""
    if state is None or state.quantizer is None:
        return None
    tk = key.shape[2]
    lo = min(state.sink_tokens, tk)
    hi = max(tk - state.residual, lo)
    if hi <= lo:
        return None
    kq, vq = _fake_quantize(state, module, key, value, lo, hi)
    if tuple(kq.shape) != tuple(key[:, :, lo:hi].shape) or tuple(vq.shape) != tuple(value[:, :, lo:hi].shape):
        raise ValueError(f"quantizer.fake_quantize returned {list(kq.shape)} / {list(vq.shape)} for keys/values "
                         f"{list(key[:, :, lo:hi].shape)}")
    return lo, hi, kq.float(), vq.float()


def _attend_reference(module, query, key, value, attention_mask, scale: float, dropout: float, residual: int,
                      qkv, softcap=None) -> torch.Tensor:
    """Explicit scores: both full and fake-quantized keys, selected per (i, j), softmax in float32.
    Returns [B, Tq, Hq, D] float32. (Handles softcap and non-causal masks; the sdpa path is faster.)"""
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    g = hq // hkv
    offset = tk - tq  # the queries are the last tq of the tk positions
    qf, kf, vf = query.float(), key.float(), value.float()
    causal = bool(getattr(module, "is_causal", True))
    lo, hi, k_hat, dv = 0, 0, None, None
    if qkv is not None:
        lo, hi, k_hat, v_hat = qkv
        dv = v_hat - vf[:, :, lo:hi]
    mask = _float_mask(attention_mask)
    out = torch.empty(b, hkv, g, tq, d, dtype=torch.float32, device=query.device)
    block = max(16, _BLOCK_ELEMENTS // max(1, hq * tk * b))
    for a in range(0, tq, block):
        e = min(tq, a + block)
        kend = min(tk, offset + e) if causal else tk  # later columns are masked for causal models
        qb = _repeat_groups(qf[:, :, a:e], hkv)                         # [B, Hkv, G*n, D]
        s = torch.matmul(qb, kf[:, :, :kend].transpose(-1, -2)) * scale  # [B, Hkv, G*n, kend]
        s = s.view(b, hkv, g, e - a, kend)
        pos = torch.arange(offset + a, offset + e, device=query.device)[:, None]  # query positions
        col = torch.arange(kend, device=query.device)[None, :]
        c_hi = min(hi, kend)
        sel = None
        if k_hat is not None and c_hi > lo:
            s_hat = torch.matmul(qb, k_hat[:, :, : c_hi - lo].transpose(-1, -2)) * scale
            s_hat = s_hat.view(b, hkv, g, e - a, c_hi - lo)
            sel = (col[:, lo:c_hi] <= pos - residual)                    # [n, c_hi - lo]
            s[..., lo:c_hi] = torch.where(sel, s_hat, s[..., lo:c_hi])
            del s_hat
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if mask is not None:
            s = s + _rows(mask, a, e)[..., :kend][:, :, None]  # [B, 1|H, 1, n, kend] -> over groups
        elif causal:
            s = s.masked_fill(col > pos, float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        if dropout and module.training:
            p = F.dropout(p, p=dropout, training=True)
        o = torch.matmul(p.view(b, hkv, g * (e - a), kend), vf[:, :, :kend])
        if sel is not None:
            ph = (p[..., lo:c_hi] * sel).view(b, hkv, g * (e - a), c_hi - lo)
            o = o + torch.matmul(ph, dv[:, :, : c_hi - lo])
        out[:, :, :, a:e] = o.view(b, hkv, g, e - a, d)
    return out.view(b, hq, tq, d).transpose(1, 2)


_SDPA_BLOCK = 256  # queries per sdpa call on the quantized path


def _attend_sdpa(module, query, key, value, attention_mask, scale: float, dropout: float, residual: int,
                 qkv) -> torch.Tensor:
    """The same function through torch's fused scaled_dot_product_attention (causal models).

    For a block of queries [a, e) the keys are the union of what those queries may see: full
    precision [0, lo) and the recent [fa, kend), fake-quantized [lo, hb); a float mask lets each
    query see each position exactly once, in the version the selection rule gives it."""
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    g = hq // hkv
    offset = tk - tq
    qf, kf, vf = query.float(), key.float(), value.float()
    drop = dropout if (dropout and module.training) else 0.0
    mask = _float_mask(attention_mask)
    dev = query.device

    def rep(x):
        return x.repeat_interleave(g, dim=1) if g > 1 else x

    if qkv is None:
        if mask is None and tq > 1:
            if tq == tk:
                out = F.scaled_dot_product_attention(qf, rep(kf), rep(vf), is_causal=True, scale=scale, dropout_p=drop)
                return out.transpose(1, 2)
            pos = torch.arange(offset, tk, device=dev)[:, None]
            mask = torch.zeros(tq, tk, device=dev).masked_fill(torch.arange(tk, device=dev)[None] > pos, float("-inf"))
        out = F.scaled_dot_product_attention(qf, rep(kf), rep(vf), attn_mask=mask, scale=scale, dropout_p=drop)
        return out.transpose(1, 2)

    lo, hi, k_hat, v_hat = qkv
    out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=dev)
    for a in range(0, tq, _SDPA_BLOCK):
        e = min(tq, a + _SDPA_BLOCK)
        pos = torch.arange(offset + a, offset + e, device=dev)[:, None]
        kend = offset + e
        hb = min(max(offset + e - residual, lo), hi)          # quantized columns [lo, hb)
        fa = min(max(lo, offset + a - residual + 1), kend)    # recent full columns [fa, kend)
        cols = torch.cat([torch.arange(0, lo, device=dev), torch.arange(fa, kend, device=dev)])[None]
        hcols = torch.arange(lo, hb, device=dev)[None]
        keep_full = (cols <= pos) & ((cols < lo) | (cols > pos - residual))
        keep_hat = hcols <= pos - residual
        allow = torch.cat([keep_full, keep_hat], dim=1)
        bias = torch.zeros(allow.shape, dtype=torch.float32, device=dev).masked_fill(~allow, float("-inf"))
        if mask is not None:
            m = _rows(mask, a, e)
            bias = bias + torch.cat([m[..., :lo], m[..., fa:kend], m[..., lo:hb]], dim=-1)
        ks = torch.cat([kf[:, :, :lo], kf[:, :, fa:kend], k_hat[:, :, : hb - lo]], dim=2)
        vs = torch.cat([vf[:, :, :lo], vf[:, :, fa:kend], v_hat[:, :, : hb - lo]], dim=2)
        out[:, :, a:e] = F.scaled_dot_product_attention(qf[:, :, a:e], rep(ks), rep(vs), attn_mask=bias, scale=scale,
                                                        dropout_p=drop)
    return out.transpose(1, 2)


def _attend(module, query, key, value, attention_mask, scaling, dropout, state: Optional[_State],
            quantize: bool, softcap=None, qkv=None) -> torch.Tensor:
    """Attention output [B, Tq, Hq, D] (float32) with fake-quantized old positions when `quantize`."""
    b, hq, tq, d = query.shape
    hkv = key.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of key/value heads {hkv}")
    scale = float(scaling) if scaling is not None else d ** -0.5
    if quantize and qkv is None:
        qkv = _quantized_kv(state, module, key, value, tq)
    if not quantize:
        qkv = None
    residual = state.residual if state is not None else 0
    reference = (softcap or not getattr(module, "is_causal", True) or _REFERENCE
                 or (state is not None and state.reference))
    if reference:
        return _attend_reference(module, query, key, value, attention_mask, scale, dropout, residual, qkv, softcap)
    return _attend_sdpa(module, query, key, value, attention_mask, scale, dropout, residual, qkv)


_REFERENCE = False  # force the explicit-scores path everywhere (tests)


def fakequant_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function (transformers' AttentionInterface signature). query
    [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] post-RoPE; returns ([B, Tq, Hq, D], None)."""
    state = _STACK[-1] if _STACK else None
    softcap = kwargs.get("softcap")
    quantize = state is not None and state.quantizer is not None
    if state is not None and state.observer is not None:  # e.g. realpath.KeptTokens's attention statistic
        state.observer.observe_query(int(getattr(module, "layer_idx", -1)), query.detach(), key.shape[2])
    out = _attend(module, query, key, value, attention_mask, scaling, dropout, state, quantize, softcap)
    if state is not None and state.query_absmax is not None:
        layer = int(getattr(module, "layer_idx", -1))
        b, hq, tq, d = query.shape
        seen = query.detach().float().abs().reshape(b, key.shape[1], hq // key.shape[1], tq, d).amax(dim=(0, 2, 3)).cpu()
        prev = state.query_absmax.get(layer)
        state.query_absmax[layer] = seen if prev is None else torch.maximum(prev, seen)
    if state is not None and (state.compare or state.record):
        layer = int(getattr(module, "layer_idx", -1))
        if state.record:
            state.outputs.setdefault(layer, []).append(out.detach().cpu())
        if state.compare:
            ref = _attend(module, query, key, value, attention_mask, scaling, dropout, state, False, softcap) \
                if quantize else out
            state.err_sq[layer] = state.err_sq.get(layer, 0.0) + float(((out - ref) ** 2).sum())
            state.ref_sq[layer] = state.ref_sq.get(layer, 0.0) + float((ref ** 2).sum())
    return out.to(query.dtype), None


_REGISTERED = False


def register() -> str:
    """Registers the attention function (and, for its masks, transformers' sdpa mask)
    under ATTN_NAME; returns the name. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return ATTN_NAME
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, fakequant_attention_forward)
    try:  # without a registered mask function, transformers 5.x passes attention_mask=None
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # None for plain causal, else bool
    except ImportError:  # older transformers: builds a 4D float mask for any implementation
        pass
    _REGISTERED = True
    return ATTN_NAME


def _set_attn(model, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
            if model.config._attn_implementation == name:
                return
        except (ValueError, KeyError, AttributeError, ImportError):
            pass
    model.config._attn_implementation = name
    for m in model.modules():  # sub-models sharing a different config object
        cfg = getattr(m, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            try:
                cfg._attn_implementation = name
            except Exception:
                pass


@contextlib.contextmanager
def fake_quant_attention(model, quantizer=None, residual: Optional[int] = None, sink_tokens: Optional[int] = None,
                         compare: bool = False, record: bool = False, incremental: bool = False):
    """Within the block, the model's attention runs through the fake-quant function with `quantizer`
    (None: full precision). residual / sink_tokens default to the quantizer's config. Yields the
    state (per-layer errors and outputs when compare / record). incremental=True is for one
    sequence growing through a KV cache (decoding): old positions' fake-quantized K/V are reused."""
    register()
    if residual is None:
        residual = int(getattr(getattr(quantizer, "config", None), "residual", 0) or 0)
    if sink_tokens is None:
        sink_tokens = int(getattr(getattr(quantizer, "config", None), "sink_tokens", 0) or 0)
    if residual < 0 or sink_tokens < 0:
        raise ValueError(f"residual and sink_tokens must be >= 0, got {residual} and {sink_tokens}")
    state = _State(quantizer=quantizer, residual=residual, sink_tokens=sink_tokens, compare=compare, record=record,
                   incremental=incremental)
    if hasattr(quantizer, "observe_query"):
        state.observer = quantizer
    previous = model.config._attn_implementation
    _set_attn(model, ATTN_NAME)
    _STACK.append(state)
    try:
        yield state
    finally:
        _STACK.remove(state)
        _set_attn(model, previous)


# --------------------------------------------------------------------------------------------
# perplexity, layer errors, needle
# --------------------------------------------------------------------------------------------


def _ids(ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        t = ids.reshape(-1) if ids.dim() == 2 and ids.shape[0] == 1 else ids
    else:
        t = torch.tensor(list(ids), dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"ids: expected a 1-D token sequence, got shape {list(t.shape)}")
    return t.long()


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def perplexity(model, ids, quantizer=None, window: int = 2048, stride: Optional[int] = None,
               residual: Optional[int] = None, sink_tokens: Optional[int] = None, progress: bool = False) -> dict:
    """Perplexity of `ids` (1-D token ids) under the model with fake-quantized attention.

    Windows of `window` tokens, each a fresh sequence at position 0. stride=None (= window):
    non-overlapping windows, every token but each window's first is scored. stride < window: the
    windows overlap and each scores only its tokens not scored before (the usual sliding recipe).
    Returns {"ppl", "nll" (mean), "tokens" (scored), "windows", "seconds"}.
    """
    ids = _ids(ids)
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"window must be >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if ids.numel() < 2:
        raise ValueError("ids: need at least 2 tokens")
    device = _device(model)
    total_nll, total_n, windows, prev_end = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    n = ids.numel()
    starts = list(range(0, n, stride))
    with fake_quant_attention(model, quantizer, residual=residual, sink_tokens=sink_tokens):
        for begin in starts:
            end = min(begin + window, n)
            new = end - max(prev_end, begin + 1)  # targets not scored yet (first token has no target)
            if new <= 0 or end - begin < 2:
                break
            chunk = ids[begin:end][None].to(device)
            logits = model(input_ids=chunk, use_cache=False).logits[0]
            logits = logits[-new - 1:-1].float()
            targets = chunk[0, -new:]
            total_nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            total_n += new
            windows += 1
            prev_end = end
            if progress:
                print(f"  window {windows}/{len(starts)}: running ppl {math.exp(total_nll / total_n):.3f}",
                      file=sys.stderr, flush=True)
            if end == n:
                break
    nll = total_nll / total_n
    return {"ppl": math.exp(nll), "nll": nll, "tokens": total_n, "windows": windows,
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def layer_errors(model, ids, quantizer, residual: Optional[int] = None, sink_tokens: Optional[int] = None) -> List[dict]:
    """Per layer: relative Frobenius error of the attention output with quantization vs without,
    on one window `ids` (all query positions, those inside the residual included).

    "local": both outputs from the same layer input (the quantized run's), so it shows which
    layer's attention the quantizer hurts. "accumulated": the quantized run's output against a
    full-precision run's, error from earlier layers included.
    """
    chunk = _ids(ids)[None].to(_device(model))
    with fake_quant_attention(model, None, record=True) as ref:
        model(input_ids=chunk, use_cache=False)
    with fake_quant_attention(model, quantizer, residual=residual, sink_tokens=sink_tokens, compare=True,
                              record=True) as st:
        model(input_ids=chunk, use_cache=False)
    rows = []
    for layer in sorted(st.err_sq):
        a, r = st.outputs[layer][0].float(), ref.outputs[layer][0].float()
        rows.append({"layer": layer,
                     "local": math.sqrt(st.err_sq[layer] / max(st.ref_sq[layer], 1e-30)),
                     "accumulated": float((a - r).norm() / r.norm().clamp_min(1e-30))})
    return rows


def _needle_prompt(tokenizer, filler: str, context_tokens: int, depth: float, passkey: str) -> List[int]:
    from .hf import tokenize

    needle_text = " " + NEEDLE.format(passkey=passkey) + " "
    special = len(tokenize(tokenizer, "")[0])  # BOS etc. the tokenizer adds
    overhead = len(tokenize(tokenizer, needle_text + NEEDLE_QUESTION, add_special_tokens=False)[0]) + special
    fill_ids = tokenize(tokenizer, filler, add_special_tokens=False)[0]
    n_fill = max(0, context_tokens - overhead)
    if len(fill_ids) < n_fill:
        raise ValueError(f"filler text has {len(fill_ids)} tokens, fewer than the {n_fill} needed")
    text = tokenizer.decode(fill_ids[:n_fill])
    at = int(round(len(text) * depth / 100.0))
    if 0 < at < len(text):  # back to the end of a sentence
        cut = max(text.rfind(". ", 0, at), text.rfind(".\n", 0, at))
        at = cut + 1 if cut >= 0 else at
    prompt = text[:at].rstrip() + needle_text + text[at:].lstrip() + NEEDLE_QUESTION
    return tokenize(tokenizer, prompt)[0]


@torch.no_grad()
def generate_greedy(model, ids, quantizer=None, max_new_tokens: int = 8, residual: Optional[int] = None,
                    sink_tokens: Optional[int] = None, eos_token_id: Optional[int] = None,
                    incremental: bool = True) -> List[int]:
    """Greedy decoding with fake-quantized attention: one prefill, then one token at a time through
    the model's (full-precision) DynamicCache; each step's query sees every position older than
    `residual` fake-quantized, as a compressed cache would give it (incremental: the fake-quantized
    prefix is reused from the previous step instead of re-quantizing all positions)."""
    ids = _ids(ids)[None].to(_device(model))
    out: List[int] = []
    with fake_quant_attention(model, quantizer, residual=residual, sink_tokens=sink_tokens, incremental=incremental):
        res = model(input_ids=ids, use_cache=True)
        past = res.past_key_values
        for _ in range(max_new_tokens):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
            res = model(input_ids=torch.tensor([[nxt]], device=ids.device), past_key_values=past, use_cache=True)
            past = res.past_key_values
    return out


@torch.no_grad()
def needle(model, tokenizer, quantizer, context_tokens: int, depths: Sequence[float] = (0, 25, 50, 75, 100),
           filler: Optional[str] = None, passkey: str = PASSKEY, max_new_tokens: int = 8,
           residual: Optional[int] = None, sink_tokens: Optional[int] = None) -> List[dict]:
    """Passkey retrieval: "The secret passkey is <passkey>. Remember it." hidden at each depth (%)
    of essay filler, the whole prompt about `context_tokens` tokens, the question at the end;
    greedy-decode `max_new_tokens` with fake-quantized attention; success = the digits appear."""
    if filler is None:
        from .hf import load_text

        filler = load_text("essays")
    rows = []
    for depth in depths:
        prompt = _needle_prompt(tokenizer, filler, context_tokens, float(depth), passkey)
        t0 = time.perf_counter()
        new = generate_greedy(model, prompt, quantizer, max_new_tokens, residual=residual, sink_tokens=sink_tokens,
                              eos_token_id=getattr(tokenizer, "eos_token_id", None))
        answer = tokenizer.decode(new)
        rows.append({"context_tokens": len(prompt), "depth": float(depth), "success": passkey in answer,
                     "answer": answer, "seconds": time.perf_counter() - t0})
    return rows


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _int_list(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vecinfer eval",
                                description="Perplexity, per-layer attention error and passkey retrieval of a causal "
                                            "LM with its KV cache fake-quantized by each method.")
    p.add_argument("--path", choices=("real", "fakequant"), default="real",
                   help="real (default): every method is the KV cache object users run (VecInferCache, "
                        "transformers' DynamicCache and QuantizedCache), text streamed through it in blocks; "
                        "fakequant: the fast proxy (each layer's old K/V compressed and decompressed inside "
                        "attention, one forward per window)")
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, gemma3-270m, a .gguf file or a HF folder")
    p.add_argument("--text", default="essays", help="essays, botchan, wiki or a text file (evaluation text)")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (from the start of the text)")
    p.add_argument("--window", type=int, default=2048, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: window, non-overlapping)")
    p.add_argument("--methods", default=None,
                   help="comma list: fp, build_quantizer methods (vecinfer, vq, ...; kivi on the fakequant path "
                        "only) and, on the real path, transformers QuantizedCache backends (fp8, quanto-int2, "
                        "quanto-int4, hqq-int2, hqq-int4; skipped with a message when their package is missing); "
                        "'<method>+keep-novel-<percent>[-<tokens>]' keeps that percent of the compressed tokens, and at "
                        "least <tokens>, in full precision (VQConfig.keep_fraction, keep_tokens); 'proxy:<method>' is its fake-quantization proxy, where "
                        "'+keep-<rule>-<percent>[-<tokens>]' takes any realpath.KEEP_RULES rule and a token floor. "
                        "Default: fp,vecinfer,fp8,quanto-int2,hqq-int2 (real), fp,vecinfer,kivi,vq (fakequant)")
    p.add_argument("--bits", type=float, default=2, help="bits per element for the quantizing methods")
    p.add_argument("--residual", type=int, default=128, help="recent tokens kept in full precision")
    p.add_argument("--sink-tokens", type=int, default=0, help="first tokens kept in full precision")
    p.add_argument("--key-gain", type=float, default=1.0,
                   help="VQConfig.key_gain of every vecinfer method: the key centroids times this (1: as k-means made them)")
    p.add_argument("--calib-text", default="wiki", help="calibration text (same choices as --text)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens")
    p.add_argument("--calib-chunk", type=int, default=None,
                   help="calibration sequence length (default: the longest of --window and --needle, so the "
                        "codebooks see post-RoPE keys at every position the evaluation uses)")
    p.add_argument("--needle", default="", help="comma list of context lengths for passkey retrieval, e.g. 4096,8192")
    p.add_argument("--needle-depths", default="0,25,50,75,100", help="comma list of depths in percent")
    p.add_argument("--no-layer-report", action="store_true", help="skip the per-layer attention error report")
    p.add_argument("--prefill", type=int, default=128,
                   help="real path, perplexity: tokens of each window prefilled at once; the rest is decoded "
                        "in blocks of --block against the cache")
    p.add_argument("--block", type=int, default=16, help="real path: tokens per decode step (16: the GPU kernel's most)")
    p.add_argument("--retrieval", default="",
                   help="real path: comma list of context lengths for retrieval, e.g. 2048,4096,8192")
    p.add_argument("--tasks", default="passkey,multikey", help="real path: retrieval tasks (passkey, multikey)")
    p.add_argument("--trials", type=int, default=20,
                   help="real path: retrieval trials per task and length (depths spread over 0-100%%)")
    p.add_argument("--keys", type=int, default=3, help="real path: keys in the multikey prompt (one asked)")
    p.add_argument("--retrieval-methods", default=None,
                   help="real path: the methods that run retrieval (default: all of --methods)")
    p.add_argument("--kv-cache", default=None,
                   help="file to keep the calibration K/V in: loaded when it holds the same settings, else written")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _build(method: str, keys, values, bits: float, residual: int, sink_tokens: int, progress: bool = True,
           query_absmax=None, key_gain: float = 1.0):
    from . import quantizer as qmod

    factory = getattr(qmod, "build_quantizer", None)
    if factory is None:
        raise RuntimeError("vecinfer.quantizer.build_quantizer is missing")
    kwargs = {"sink_tokens": sink_tokens} if sink_tokens else {}
    if key_gain != 1.0:
        kwargs["key_gain"] = key_gain
    if query_absmax is not None:
        kwargs["query_absmax"] = query_absmax
    try:
        import inspect

        params = inspect.signature(factory).parameters
        if "progress" in params:
            kwargs["progress"] = progress
    except (TypeError, ValueError):
        pass
    return factory(method, keys, values, bits, residual, **kwargs)


def _bits(q) -> Optional[float]:
    try:
        return float(q.bits_per_element())
    except Exception:
        return None


def needs_calibration(method: str) -> bool:
    """Whether `method` of `vecinfer eval` is a vecinfer quantizer (calibrated on the model's K/V)."""
    from .realpath import BASELINES

    return method != "fp" and method not in BASELINES


@torch.no_grad()
def collect_query_absmax(model, tokenizer, texts, max_tokens: int = 8192, chunk: int = 1024):
    """`vecinfer.hf.collect_kv` that also records, per layer, the largest |post-RoPE query| of each
    channel over the query heads of each KV head: (keys, values, query_absmax), query_absmax[l]
    [num_kv_heads, head_dim] float32 (for scale_rule "query")."""
    from .hf import collect_kv

    with fake_quant_attention(model, None) as state:  # full-precision attention, queries recorded
        state.query_absmax = {}
        keys, values = collect_kv(model, tokenizer, texts, max_tokens=max_tokens, chunk=chunk, progress=False)
    return keys, values, [state.query_absmax[i] for i in range(len(keys))]


def _calibration_samples(args, model, tok, ids, report: dict, log):
    """Post-RoPE calibration K/V and query maxima for eval_main: --calib-text (or the part of
    --text after the evaluation tokens), collected in sequences of --calib-chunk tokens; with
    --kv-cache FILE, loaded from FILE when it holds samples of the same settings, else collected
    and saved there. Returns (keys, values, query_absmax)."""
    from .hf import load_text

    chunk = args.calib_chunk or max([args.window] + _int_list(args.needle))
    report["calib_chunk"] = chunk
    settings = {"model": args.model, "calib_text": args.calib_text, "calib_tokens": args.calib_tokens,
                "calib_chunk": chunk, "text": args.text if args.calib_text == args.text else None,
                "tokens": args.tokens if args.calib_text == args.text else None}
    if args.kv_cache and os.path.exists(args.kv_cache):
        saved = torch.load(args.kv_cache, weights_only=True)
        if saved.get("settings") == json.dumps(settings, sort_keys=True) and "queries" in saved:
            log(f"calibration K/V loaded from {args.kv_cache}")
            return saved["keys"], saved["values"], saved["queries"]
        log(f"{args.kv_cache} holds K/V of other settings; collecting again")
    if args.calib_text == args.text:  # calibrate on the part of the text after the evaluation tokens
        rest = ids[args.tokens: args.tokens + args.calib_tokens]
        if len(rest) < min(args.calib_tokens, 1024):
            log("warning: calibration text overlaps the evaluation tokens")
            rest = ids[-args.calib_tokens:]
        calib = [tok.decode(rest)]
    else:
        calib = [load_text(args.calib_text)]
    t0 = time.perf_counter()
    keys, values, queries = collect_query_absmax(model, tok, calib, max_tokens=args.calib_tokens, chunk=chunk)
    report["collect_seconds"] = time.perf_counter() - t0
    log(f"collected K/V of {keys[0].shape[1]} tokens x {len(keys)} layers in {report['collect_seconds']:.1f} s")
    if args.kv_cache:
        torch.save({"settings": json.dumps(settings, sort_keys=True), "keys": keys, "values": values,
                    "queries": queries}, args.kv_cache)
    return keys, values, queries


def eval_main(argv=None) -> int:
    """`vecinfer eval ...`: prints a table and optionally writes JSON. Returns the exit status."""
    args = _parser().parse_args(argv)
    if args.methods is None:
        args.methods = "fp,vecinfer,fp8,quanto-int2,hqq-int2" if args.path == "real" else "fp,vecinfer,kivi,vq"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        print("vecinfer eval: --methods is empty", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("vecinfer eval needs transformers (pip install transformers gguf accelerate)", file=sys.stderr)
        return 2
    from .hf import load_gguf_model, load_text, tokenize

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    model, tok = load_gguf_model(args.model)
    text = load_text(args.text)
    ids = tokenize(tok, text)[0]
    if len(ids) < args.tokens:
        log(f"note: {args.text} has only {len(ids)} tokens; evaluating on all of them")
    eval_ids = ids[: args.tokens]
    report = {"model": args.model, "text": args.text, "tokens": len(eval_ids), "window": args.window,
              "stride": args.stride or args.window, "bits": args.bits, "residual": args.residual,
              "sink_tokens": args.sink_tokens, "calib_text": args.calib_text, "calib_tokens": args.calib_tokens,
              "torch_threads": torch.get_num_threads(), "methods": {}}

    keys = values = queries = None
    if any(needs_calibration(m) for m in methods):
        keys, values, queries = _calibration_samples(args, model, tok, ids, report, log)
    if args.path == "real":
        from .realpath import eval_real

        return eval_real(args, methods, model, tok, eval_ids, keys, values, queries, report, log)

    needles = _int_list(args.needle)
    depths = _int_list(args.needle_depths)
    filler = load_text("essays") if needles else None
    report_window = eval_ids[: args.window]
    fp_ppl = None
    for method in methods:
        row: dict = {}
        quant = None
        if method != "fp":
            t0 = time.perf_counter()
            try:
                quant = _build(method, keys, values, args.bits, args.residual, args.sink_tokens, not args.quiet,
                               queries, key_gain=args.key_gain)
            except Exception as e:  # one bad method should not lose the others
                log(f"{method}: building the quantizer failed: {e}")
                report["methods"][method] = {"error": str(e)}
                continue
            row["calibrate_seconds"] = time.perf_counter() - t0
            row["bits_per_element"] = _bits(quant)
        else:
            row["bits_per_element"] = 16.0
        log(f"{method}: perplexity over {len(eval_ids)} tokens ...")
        row.update(perplexity(model, eval_ids, quant, window=args.window, stride=args.stride,
                              residual=args.residual if quant is None else None, progress=not args.quiet))
        if method == "fp":
            fp_ppl = row["ppl"]
        if quant is not None and not args.no_layer_report:
            row["layer_errors"] = layer_errors(model, report_window, quant)
        if needles:
            row["needle"] = []
            for n in needles:
                log(f"{method}: passkey retrieval at {n} tokens ...")
                row["needle"] += needle(model, tok, quant, n, depths, filler=filler)
        report["methods"][method] = row
        print(f"{method}: ppl {row['ppl']:.4f} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
        if args.json:  # partial results survive an interrupted run
            _write_json(args.json, report)

    for row in report["methods"].values():
        if fp_ppl is not None and "ppl" in row:
            row["delta_ppl"] = row["ppl"] - fp_ppl
    report["seconds"] = time.perf_counter() - t_start
    print(format_table(report))
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _write_json(path: str, report: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def format_table(report: dict) -> str:
    lines = [f"model {report['model']}, text {report['text']} ({report['tokens']} tokens, window {report['window']}), "
             f"{report['bits']:g} bits, residual {report['residual']}, calibrated on {report['calib_text']}"]
    head = f"{'method':<10} {'bits/el':>8} {'ppl':>10} {'d ppl':>9} {'worst layer (local err)':>24} {'needle':>8} {'s':>7}"
    lines += [head, "-" * len(head)]
    for name, row in report["methods"].items():
        if "error" in row:
            lines.append(f"{name:<10} error: {row['error']}")
            continue
        bits = f"{row['bits_per_element']:.3f}" if row.get("bits_per_element") is not None else "?"
        delta = f"{row['delta_ppl']:+.4f}" if "delta_ppl" in row else ""
        worst = ""
        if row.get("layer_errors"):
            w = max(row["layer_errors"], key=lambda r: r["local"])
            worst = f"L{w['layer']} {w['local']:.4f}"
        nd = ""
        if "needle" in row:
            nd = f"{sum(r['success'] for r in row['needle'])}/{len(row['needle'])}"
        lines.append(f"{name:<10} {bits:>8} {row['ppl']:>10.4f} {delta:>9} {worst:>24} {nd:>8} {row['seconds']:>7.1f}")
    for name, row in report["methods"].items():
        if row.get("layer_errors"):
            errs = " ".join(f"{r['local']:.3f}" for r in row["layer_errors"])
            lines.append(f"{name} per-layer local attention-output error: {errs}")
    return "\n".join(lines)


__all__ = ["ATTN_NAME", "eval_main", "fake_quant_attention", "fakequant_attention_forward", "format_table",
           "generate_greedy", "layer_errors", "needle", "perplexity", "register"]
