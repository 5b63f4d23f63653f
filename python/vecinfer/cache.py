"""QuantizedKVCache: a preallocated compressed KV cache with a full-precision recent window.

Per layer and sequence, token positions fall in three parts:
  [0, sink_tokens)             full precision, kept forever ("attention sinks"; 0 by default)
  [sink_tokens, n - r)         VQ codes (keys transformed, then encoded), never re-quantized
  [n - r, n)                   full precision recent window, r <= residual
Appending writes new tokens to the recent window; tokens pushed out of it are encoded once into
codes at their position. The codebooks are fixed, so codes are appendable and old tokens are
never re-quantized.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .ops import code_row_bytes
from .quantizer import KVQuantizer

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class QuantizedKVCache:
    def __init__(self, quantizer: KVQuantizer, batch_size: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 device="cpu", dtype: torch.dtype = torch.float16):
        if not isinstance(quantizer, KVQuantizer):
            raise TypeError(f"quantizer: expected a vecinfer.KVQuantizer, got {type(quantizer).__name__}")
        cfg = quantizer.config
        if cfg.method != "vq":
            raise ValueError(f"quantizer: QuantizedKVCache stores VQ codes; method {cfg.method!r} is an evaluation "
                             "baseline (fake quantization in `vecinfer eval`)")
        if num_kv_heads != quantizer.num_kv_heads or head_dim != quantizer.head_dim:
            raise ValueError(f"num_kv_heads={num_kv_heads}, head_dim={head_dim} do not match the quantizer's "
                             f"calibration ({quantizer.num_kv_heads} KV heads, head_dim {quantizer.head_dim})")
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected torch.float16, bfloat16 or float32, got {dtype}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" means the current device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.quantizer = quantizer if quantizer.device == self.device else quantizer.to(self.device)
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.max_tokens, self.dtype = max_tokens, dtype
        self.residual, self.sinks = cfg.residual, min(cfg.sink_tokens, max_tokens)
        shape = (batch_size, num_kv_heads)
        key_bytes = code_row_bytes(head_dim, cfg.key_sub_dim, cfg.key_code_bits)
        value_bytes = code_row_bytes(head_dim, cfg.value_sub_dim, cfg.value_code_bits)
        coded = max(max_tokens - self.sinks, 0)

        def empty(*s, dt=dtype):
            return torch.empty(s, dtype=dt, device=self.device)

        self._key_codes = [empty(*shape, coded, key_bytes, dt=torch.uint8) for _ in range(quantizer.num_layers)]
        self._value_codes = [empty(*shape, coded, value_bytes, dt=torch.uint8) for _ in range(quantizer.num_layers)]
        self._sink_k = [empty(*shape, self.sinks, head_dim) for _ in range(quantizer.num_layers)]
        self._sink_v = [empty(*shape, self.sinks, head_dim) for _ in range(quantizer.num_layers)]
        self._recent_k = [empty(*shape, self.residual, head_dim) for _ in range(quantizer.num_layers)]
        self._recent_v = [empty(*shape, self.residual, head_dim) for _ in range(quantizer.num_layers)]
        self._length = [0] * quantizer.num_layers

    @property
    def num_layers(self) -> int:
        return self.quantizer.num_layers

    def length(self, layer: int) -> int:
        """Tokens appended to `layer` so far (the same for every sequence of the batch)."""
        self._check_layer(layer)
        return self._length[layer]

    def _check_layer(self, layer):
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")

    def _parts(self, layer: int):
        """(sink count, coded count, recent count) for the current length."""
        n = self._length[layer]
        sinks = min(n, self.sinks)
        recent = min(n - sinks, self.residual)
        return sinks, n - sinks - recent, recent

    def _check_kv(self, name: str, x: torch.Tensor, tokens: Optional[int] = None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        expected = (self.batch_size, self.num_kv_heads, x.shape[2] if x.dim() == 4 else -1, self.head_dim)
        if x.dim() != 4 or tuple(x.shape) != expected or (tokens is not None and x.shape[2] != tokens):
            raise ValueError(f"{name}: expected [{self.batch_size}, {self.num_kv_heads}, tokens, {self.head_dim}], "
                             f"got {list(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{name}: is on {x.device}, the cache on {self.device}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected a float16, bfloat16 or float32 tensor, got {x.dtype}")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Appends T tokens: k, v [B, Hkv, T, D] post-RoPE in original coordinates."""
        self._check_layer(layer)
        self._check_kv("k", k)
        self._check_kv("v", v, tokens=k.shape[2])
        t = k.shape[2]
        if t == 0:
            return
        n = self._length[layer]
        if n + t > self.max_tokens:
            raise ValueError(f"append: {n} + {t} tokens exceed max_tokens={self.max_tokens} (layer {layer}); "
                             "the cache is unchanged")
        sinks, coded, recent = self._parts(layer)
        k, v = k.to(self.dtype), v.to(self.dtype)
        # New tokens that still belong to the sink part.
        to_sink = min(self.sinks - sinks, t)
        if to_sink:
            self._sink_k[layer][:, :, sinks:sinks + to_sink] = k[:, :, :to_sink]
            self._sink_v[layer][:, :, sinks:sinks + to_sink] = v[:, :, :to_sink]
            k, v = k[:, :, to_sink:], v[:, :, to_sink:]
        # Recent window + new tokens; everything but the last `residual` of them is encoded.
        window_k = torch.cat([self._recent_k[layer][:, :, :recent], k], dim=2)
        window_v = torch.cat([self._recent_v[layer][:, :, :recent], v], dim=2)
        spill = max(window_k.shape[2] - self.residual, 0)
        if spill:
            q = self.quantizer
            self._key_codes[layer][:, :, coded:coded + spill] = q.encode_keys(layer, window_k[:, :, :spill].contiguous())
            self._value_codes[layer][:, :, coded:coded + spill] = q.encode_values(layer, window_v[:, :, :spill].contiguous())
        keep = window_k.shape[2] - spill
        self._recent_k[layer][:, :, :keep] = window_k[:, :, spill:]
        self._recent_v[layer][:, :, :keep] = window_v[:, :, spill:]
        self._length[layer] = n + t

    def dequantize(self, layer: int):
        """(k_hat, v_hat): [B, Hkv, tokens_appended, D] in original coordinates and the cache dtype."""
        self._check_layer(layer)
        sinks, coded, recent = self._parts(layer)
        q = self.quantizer
        ks = [self._sink_k[layer][:, :, :sinks]]
        vs = [self._sink_v[layer][:, :, :sinks]]
        if coded:
            ks.append(q.decode_keys(layer, self._key_codes[layer][:, :, :coded].contiguous(), self.dtype))
            vs.append(q.decode_values(layer, self._value_codes[layer][:, :, :coded].contiguous(), self.dtype))
        ks.append(self._recent_k[layer][:, :, :recent])
        vs.append(self._recent_v[layer][:, :, :recent])
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def attend(self, layer: int, q: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """Attention of q [B, Hq, Tq, D] over the cache; the Tq queries are the last Tq appended
        positions, causal among themselves. Softmax scale 1/sqrt(D) unless given. Returns
        [B, Hq, Tq, D] in q's dtype."""
        self._check_layer(layer)
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
        if q.dim() != 4 or q.shape[0] != self.batch_size or q.shape[-1] != self.head_dim:
            raise ValueError(f"q: expected [{self.batch_size}, Hq, Tq, {self.head_dim}], got {list(q.shape)}")
        if q.shape[1] % self.num_kv_heads != 0:
            raise ValueError(f"q: {q.shape[1]} query heads are not a multiple of {self.num_kv_heads} KV heads")
        if q.device != self.device:
            raise ValueError(f"q: is on {q.device}, the cache on {self.device}")
        n, tq = self._length[layer], q.shape[2]
        if tq < 1 or tq > n:
            raise ValueError(f"q: {tq} queries, but layer {layer} holds {n} tokens (queries are the last appended)")
        k, v = self.dequantize(layer)
        return reference_attention(q, k, v, scale)

    def nbytes(self) -> int:
        """Bytes the cache holds on its device: codes, full-precision windows and sinks (all
        preallocated for max_tokens), and the quantizer's codebooks, scales and means."""
        buffers = (self._key_codes, self._value_codes, self._sink_k, self._sink_v, self._recent_k, self._recent_v)
        held = sum(t.numel() * t.element_size() for group in buffers for t in group)
        return held + self.quantizer.parameter_bytes()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention in float32, GQA by head grouping, the Tq queries being the last Tq key
    positions (causal among themselves). q [B, Hq, Tq, D], k/v [B, Hkv, N, D]."""
    b, hq, tq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().reshape(b, hkv, hq // hkv * tq, d)
    scores = (qg @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, g*Tq, N]
    query_pos = (n - tq + torch.arange(tq, device=q.device)).repeat(hq // hkv)
    mask = torch.arange(n, device=q.device)[None, :] > query_pos[:, None]
    scores = scores.masked_fill(mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.reshape(b, hq, tq, d).to(q.dtype)
