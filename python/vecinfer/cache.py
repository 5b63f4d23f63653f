"""QuantizedKVCache: a preallocated compressed KV cache with a full-precision recent window.

Per layer, each sequence b of the batch holds n_b tokens in three parts; the lengths are a CPU
int32 tensor [B, 3] = (sinks, coded, recent) per sequence:
  positions [0, sinks)                   full precision, sink buffer [b, :, 0:sinks] (the first
                                         cfg.sink_tokens tokens, kept forever: "attention sinks")
  positions [sinks, sinks + coded)       VQ codes (keys transformed, then encoded) in code pages;
                                         never re-quantized
  positions [sinks + coded, n_b)         full precision recent window, a ring of `residual` rows,
                                         recent <= residual
Appending writes new tokens to the sinks (while there are fewer than sink_tokens), then to the
recent window; tokens pushed out of the window are encoded once into codes at their position.
The codebooks are fixed, so codes are appendable and old tokens are never re-quantized.

Kept tokens (quantizer.config.keep_fraction or keep_tokens > 0): of the E tokens of a sequence
that have left the window, the budget's (VQConfig.kept_budget(E)) with the largest key novelty stay
in full precision (a per-layer choice, see VQConfig). They live in the sink buffer after the sinks,
and the first length counts them: (sinks + kept, coded, recent). Each token is scored as it enters
the window; the tokens pushed out join the kept ones, the budget's top scores stay, and the rest
are encoded, so code rows
are in the order tokens were encoded, not in position order (the cache records each row's
position). Attention reads kept tokens as it reads sinks, which is exact for queries that are
all in the recent window: attend takes at most `residual` queries in this mode. The window is
kept in order (row i is window token i) rather than as a ring.

The storage is the serving API's (PagedKVCache, vecinfer/paged.h): each sequence owns its own
consecutive code pages (an identity page table), and append and attend run the same kernels as
PagedKVCache (one append kernel per call, the fused attention reading pages and ring in place).

Sequences of a batch may hold different numbers of tokens: `append(..., skip=)` drops the leading
padding of a left-padded batch. Every append is one call of the append kernel, whatever the
sequences' states.

Failures: append, reserve, select and truncate are all-or-nothing: on any error (bad input, a
failed allocation) the cache is left as it was. The cache stores values, not autograd history:
appended tensors are detached.

Threads: a cache is not thread-safe. append, attend, reserve, select and truncate detect a second
thread entering the same cache while one of them runs and raise RuntimeError in that thread
(nothing is changed by the refused call); give each thread its own cache or serialise the calls.
"""
from __future__ import annotations

import functools
import itertools
import math
import threading
from typing import Optional, Sequence

import torch

from . import _C
from .ops import _check_memory, _check_real, _device_guard, _stream, attention, code_row_bytes
from .keeping import SequenceBuffers, advance_keeping, apply_writes, plan_keeping
from .paged import advance, check_finite_on_cpu
from .quantizer import KVQuantizer

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_TOKENS = 2**31 - 1  # lengths are int32


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _exclusive(method):
    """Runs `method` holding the cache's guard; another thread entering meanwhile gets RuntimeError."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced, not run: the compiled graph runs the op itself
            return method(self, *args, **kwargs)
        if not self._guard.acquire(blocking=False):
            raise RuntimeError("QuantizedKVCache: called from two threads at once; a cache is not thread-safe "
                               "(give each thread its own cache, or serialise the calls)")
        try:
            return method(self, *args, **kwargs)
        finally:
            self._guard.release()

    return run


class QuantizedKVCache:
    def __init__(self, quantizer: KVQuantizer, batch_size: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 device="cpu", dtype: torch.dtype = torch.float16, layers: Optional[Sequence[int]] = None):
        """`layers`: the layers this cache holds (default all of the quantizer's); the others take
        no memory and cannot be used (sliding-window layers of a model kept elsewhere)."""
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
            if not _is_int(value) or not 1 <= value <= _MAX_TOKENS:
                raise ValueError(f"{name}: expected an int in [1, 2**31), got {value!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected torch.float16, bfloat16 or float32, got {dtype}")
        held = range(quantizer.num_layers) if layers is None else layers
        if any(not isinstance(i, int) or not 0 <= i < quantizer.num_layers for i in held):
            raise ValueError(f"layers: expected layer indices in [0, {quantizer.num_layers}), got {list(held)}")
        self._held = frozenset(held)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" means the current device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.quantizer = quantizer if quantizer.device == self.device else quantizer.to(self.device)
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.max_tokens, self.dtype = max_tokens, dtype
        self.residual, self.sinks = cfg.residual, min(cfg.sink_tokens, max_tokens)
        self.keeps_tokens = cfg.keeps_tokens
        self._key_bytes = code_row_bytes(head_dim, cfg.key_sub_dim, cfg.key_code_bits)
        self._value_bytes = code_row_bytes(head_dim, cfg.value_sub_dim, cfg.value_code_bits)
        n = quantizer.num_layers
        coded = _code_capacity(max_tokens - self.sinks)
        _check_memory(len(self._held) * self._layer_bytes(batch_size, max_tokens), self.device,
                      f"max_tokens: a cache of {len(self._held)} layers x {batch_size} sequences x {max_tokens} tokens")
        self._guard = threading.Lock()

        def per_layer(*tail, dt=dtype, rows=batch_size):
            return [torch.empty((rows, num_kv_heads, *tail), dtype=dt, device=self.device)
                    if i in self._held else None for i in range(n)]

        # The layout of the serving API (PagedKVCache), one path for both: code pages of
        # _PAGE tokens, sequence b owning pages [b * pages, (b + 1) * pages) in order (the page table
        # is the identity), and the recent window as a ring (window token j in row j % residual).
        pages = coded // _PAGE
        self._key_codes = per_layer(_PAGE, self._key_bytes, dt=torch.uint8, rows=batch_size * pages)
        self._value_codes = per_layer(_PAGE, self._value_bytes, dt=torch.uint8, rows=batch_size * pages)
        self._page_table = _identity_pages(batch_size, pages, self.device)
        kept = self._kept_capacity(max_tokens)  # kept tokens: sink rows [sinks, sinks + kept)
        self._sink_k, self._sink_v = per_layer(self.sinks + kept, head_dim), per_layer(self.sinks + kept, head_dim)
        self._recent_k, self._recent_v = per_layer(self.residual, head_dim), per_layer(self.residual, head_dim)
        # kept tokens: each window row's score, each kept token's score and position, each code row's position
        self._keep_state = None
        if self.keeps_tokens:
            def per_sequence(cols, dt):  # [B, cols] per layer: one entry per sequence, shared by its KV heads
                return [torch.empty((batch_size, cols), dtype=dt, device=self.device) if i in self._held else None
                        for i in range(n)]
            self._keep_state = {"window_scores": per_sequence(self.residual, torch.float32),
                                "kept_scores": per_sequence(kept, torch.float32),
                                "kept_positions": per_sequence(kept, torch.int32),
                                "code_positions": per_sequence(coded, torch.int32)}
        # (sinks, coded, recent) per sequence; replaced, never modified in place, so a tensor
        # handed out by _attend_inputs stays a consistent snapshot
        self._lengths = [torch.zeros((batch_size, 3), dtype=torch.int32) for _ in range(n)]
        # On a GPU, a copy of each layer's lengths on the device: what the fused kernel and the
        # steady decode step read, so a decode step needs no host-to-device copy (and can be
        # captured in a CUDA graph). Kept equal to _lengths by _set_lengths.
        self._device_lengths = ([torch.zeros((batch_size, 3), dtype=torch.int32, device=self.device)
                                 if i in self._held else None for i in range(n)]
                                if self.device.type == "cuda" else None)
        self._slots = torch.arange(batch_size, dtype=torch.int32, device=self.device)
        self._step_indptr = torch.arange(batch_size + 1, dtype=torch.int32, device=self.device)
        # the append kernel's per-sequence block counters (zero between calls)
        self._arrivals = torch.zeros(batch_size, dtype=torch.int32, device=self.device)

    @property
    def num_layers(self) -> int:
        return self.quantizer.num_layers

    def _kept_capacity(self, max_tokens: int) -> int:
        """Kept-token rows per sequence for a capacity of max_tokens (0 without kept tokens)."""
        return self.quantizer.config.kept_budget(max(0, max_tokens - self.sinks - self.residual))

    def _layer_bytes(self, batch: int, max_tokens: int) -> int:
        """Bytes of one layer's buffers for `batch` sequences of max_tokens tokens."""
        coded, kept = _code_capacity(max_tokens - self.sinks), self._kept_capacity(max_tokens)
        rows = batch * self.num_kv_heads
        full = 2 * (self.sinks + kept + self.residual) * self.head_dim * self.dtype.itemsize
        state = 4 * (self.residual + 2 * kept + coded) if self.keeps_tokens else 0
        return rows * (coded * (self._key_bytes + self._value_bytes) + full) + batch * state

    def _check_layer(self, layer):
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        if layer not in self._held:
            raise ValueError(f"layer: this cache does not hold layer {layer} (it holds {sorted(self._held)})")

    def lengths(self, layer: int) -> torch.Tensor:
        """Tokens held per sequence: CPU int64 [batch_size]."""
        self._check_layer(layer)
        return self._lengths[layer].sum(1, dtype=torch.int64)

    def length(self, layer: int) -> int:
        """Tokens appended to `layer` so far: the most any sequence holds."""
        return int(self.lengths(layer).max())

    def _set_lengths(self, layer: int, lengths: torch.Tensor, device_updated: bool = False) -> None:
        """Replaces a layer's lengths; `device_updated`: the device copy already holds them (the
        steady step advances it on the device)."""
        self._lengths[layer] = lengths.contiguous()
        if self._device_lengths is not None and not device_updated:
            self._device_lengths[layer].copy_(lengths, non_blocking=True)

    def _steady(self, layer: int, keeping: bool = False) -> bool:
        """Whether every sequence of the layer has its sinks and its recent window full: the state
        of a long-running decode, in which a token in means the oldest window token out to codes
        (keeping: or to the kept tokens, which the first length then counts too)."""
        s, _, r = self._lengths[layer].unbind(1)
        sinks_full = (s >= self.sinks) if keeping else (s == self.sinks)
        return self.residual > 0 and bool(sinks_full.all()) and bool((r == self.residual).all())

    def _uniform(self, layer: int) -> bool:
        lens = self._lengths[layer]
        return bool((lens == lens[0]).all())

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

    def _check_skip(self, skip, tokens: int) -> torch.Tensor:
        """skip as a CPU int64 [batch_size] tensor with entries in [0, tokens]."""
        if skip is None:
            return torch.zeros(self.batch_size, dtype=torch.int64)
        if _is_int(skip):
            skip = [skip] * self.batch_size
        if isinstance(skip, (list, tuple)):
            if not all(_is_int(s) for s in skip):
                raise TypeError(f"skip: expected ints, got {skip!r}")
            skip = torch.tensor(skip, dtype=torch.int64)
        if not isinstance(skip, torch.Tensor):
            raise TypeError(f"skip: expected None, an int, a list of ints or an integer tensor, got {type(skip).__name__}")
        if skip.dtype.is_floating_point or skip.dtype.is_complex or skip.dtype == torch.bool:
            raise TypeError(f"skip: expected an integer tensor, got {skip.dtype}")
        if tuple(skip.shape) != (self.batch_size,):
            raise ValueError(f"skip: expected [{self.batch_size}] (leading padding tokens per sequence), "
                             f"got {list(skip.shape)}")
        skip = skip.to("cpu", torch.int64)
        if bool((skip < 0).any()) or bool((skip > tokens).any()):
            raise ValueError(f"skip: entries must lie in [0, {tokens}] (the tokens appended), got {skip.tolist()}")
        return skip

    @_exclusive
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, skip=None) -> None:
        """Appends T tokens: k, v [B, Hkv, T, D] post-RoPE in original coordinates (stored detached
        from autograd). `skip[b]` (an int for all, a list or an integer tensor [B]) leading tokens
        of sequence b are padding and are dropped. On any error the cache is left unchanged."""
        self._check_layer(layer)
        self._check_kv("k", k)
        self._check_kv("v", v, tokens=k.shape[2])
        k, v = k.detach(), v.detach()
        t = k.shape[2]
        skip = self._check_skip(skip, t)
        lens = self._lengths[layer]
        new = t - skip
        totals = lens.sum(1, dtype=torch.int64)
        over = (totals + new > self.max_tokens).nonzero().flatten()
        if len(over):
            b = int(over[0])
            raise ValueError(f"append: sequence {b} holds {int(totals[b])} tokens; {int(new[b])} more exceed "
                             f"max_tokens={self.max_tokens} (layer {layer}); the cache is unchanged")
        if not bool(new.any()):
            return
        k, v = k.to(self.dtype), v.to(self.dtype)
        check_finite_on_cpu("k", k)
        check_finite_on_cpu("v", v)
        if self._keep_state is not None:
            room = self._keep_state["kept_scores"][layer].shape[1] > 0
            if t == 1 and bool(new.all()) and room:
                self._step_keeping(layer, k, v)
            else:
                self._append_keeping(layer, k, v, skip)
            return
        # The tokens as rows [N, Hkv, D], sequence b's at rows indptr[b]..indptr[b + 1]
        if t == 1 and bool(new.all()):  # a decode step: a view, no copy
            rows_k, rows_v = k[:, :, 0], v[:, :, 0]
            indptr = self._step_indptr
        else:
            keep = (torch.arange(t)[None, :] >= skip[:, None]).to(self.device)  # [B, T]
            rows_k, rows_v = k.transpose(1, 2)[keep], v.transpose(1, 2)[keep]
            indptr = torch.cat([torch.zeros(1, dtype=torch.int64), new.cumsum(0)]).to(torch.int32).to(self.device)
        if rows_k.stride(-1) != 1:
            rows_k, rows_v = rows_k.contiguous(), rows_v.contiguous()
        new_lens = advance(lens, new, self.sinks, self.residual).to(torch.int32)
        on_device = self._device_lengths is not None
        # the CPU kernel writes the lengths in place: a copy, so a snapshot handed out stays one
        lengths = self._device_lengths[layer] if on_device else lens.clone()
        p, cfg = self.quantizer.layers[layer], self.quantizer.config
        with _device_guard(rows_k):
            _C.append_tokens(rows_k, rows_v, self._slots, indptr, t, self._key_codes[layer], self._value_codes[layer],
                             self._page_table, lengths, self._sink_k[layer], self._sink_v[layer],
                             self._recent_k[layer], self._recent_v[layer], p["key_codebook"], p["value_codebook"],
                             p["key_scale"], p["key_mean"], p["value_mean"], cfg.hadamard, self._arrivals,
                             _stream(rows_k))
        self._set_lengths(layer, new_lens, device_updated=True)

    def _append_keeping(self, layer: int, k: torch.Tensor, v: torch.Tensor, skip: torch.Tensor) -> None:
        """append with kept tokens, per sequence, by vecinfer.keeping's rule (plan_keeping); the
        tokens leaving for the codes are encoded in one call of the append kernel, into the next
        code rows. Everything is computed first; the buffers change only after the encoding succeeded."""
        state = self._keep_state
        lens = self._lengths[layer]
        new_lens, writes, encoded = lens.clone(), [], []
        for b in range(self.batch_size):
            buf = SequenceBuffers(self._sink_k[layer][b], self._sink_v[layer][b], self._recent_k[layer][b],
                                  self._recent_v[layer][b], state["window_scores"][layer][b],
                                  state["kept_scores"][layer][b], state["kept_positions"][layer][b])
            xk, xv = k[b, :, int(skip[b]):], v[b, :, int(skip[b]):]  # [Hkv, n, D]
            w, after, encode = plan_keeping(buf, tuple(int(x) for x in lens[b]), xk, xv, self.sinks, self.residual,
                                            self.quantizer.config.kept_budget)
            new_lens[b] = torch.tensor(after, dtype=torch.int32)
            writes += w
            if encode is not None:
                encoded.append((b, encode))
        if encoded:
            counts = [0] * self.batch_size
            for b, e in encoded:
                counts[b] = e.keys.shape[0]
            self._encode_rows(layer, counts, torch.cat([e.keys for _, e in encoded]),
                              torch.cat([e.values for _, e in encoded]))
        apply_writes(writes)
        for b, e in encoded:
            state["code_positions"][layer][b, e.coded:e.coded + len(e.positions)] = e.positions
        self._set_lengths(layer, new_lens)

    def _step_keeping(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A decode step of a batch with kept tokens, one new token per sequence: _append_keeping's
        rule in one call of _C.kept_step (vecinfer/kept.h: the step kernel and the window's shift;
        on the CPU its C++ reference), then the append kernel encoding the token each sequence leaves
        out (a sequence still filling its sinks or window writes its token to its next code row,
        unread). The kernels read the device copy of the lengths, so a step in which no budget
        grows (a fixed keep_tokens reached) reads nothing from the host and can be captured in a
        CUDA graph; the host copy advances by the same rule."""
        S, state, cfg = self.sinks, self._keep_state, self.quantizer.config
        lens = self._lengths[layer]
        dev_lens = self._device_lengths[layer] if self._device_lengths is not None else lens
        rows_k, rows_v = k.new_empty((self.batch_size, self.num_kv_heads, self.head_dim)), \
            v.new_empty((self.batch_size, self.num_kv_heads, self.head_dim))
        next_lens, encode_lens = torch.empty_like(dev_lens), torch.empty_like(dev_lens)
        with _device_guard(k):
            _C.kept_step(k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), self._sink_k[layer], self._sink_v[layer],
                         self._recent_k[layer], self._recent_v[layer], state["window_scores"][layer],
                         state["kept_scores"][layer], state["kept_positions"][layer], state["code_positions"][layer],
                         state["code_positions"][layer].shape[1], dev_lens, None, S, cfg.keep_fraction,
                         cfg.keep_tokens, rows_k, rows_v, next_lens, encode_lens,
                         _stream(k))
        self._encode_rows(layer, [1] * self.batch_size, rows_k, rows_v, encode_lens)
        if self._device_lengths is not None:
            dev_lens.copy_(next_lens)
        after = [advance_keeping(tuple(x), 1, S, self.residual, cfg.kept_budget) for x in lens.tolist()]
        self._set_lengths(layer, torch.tensor(after, dtype=torch.int32), device_updated=True)

    def _encode_rows(self, layer: int, counts, rows_k: torch.Tensor, rows_v: torch.Tensor,
                     lengths: Optional[torch.Tensor] = None) -> None:
        """Encodes full-precision tokens into the next code rows: counts[b] of the rows [N, Hkv, D]
        (sequence after sequence) for code rows [coded, coded + counts[b]) of sequence b, coded
        read from the device copy of the lengths, or given as `lengths` = (0, coded, 0) per
        sequence on the cache's device."""
        if lengths is None:
            lens = self._device_lengths[layer] if self._device_lengths is not None else self._lengths[layer]
            coded = lens[:, 1]
            lengths = torch.stack([torch.zeros_like(coded), coded, torch.zeros_like(coded)], dim=1)
        rows_k, rows_v = rows_k.contiguous(), rows_v.contiguous()
        if all(c == 1 for c in counts):
            indptr = self._step_indptr
        else:
            indptr = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32, device=self.device)
        # the append kernel's rule with no sinks and no window: every token straight to its code row
        none = rows_k.new_empty((self.batch_size, self.num_kv_heads, 0, self.head_dim))
        p, cfg = self.quantizer.layers[layer], self.quantizer.config
        with _device_guard(rows_k):
            _C.append_tokens(rows_k, rows_v, self._slots, indptr, max(counts), self._key_codes[layer],
                             self._value_codes[layer], self._page_table, lengths, none, none, none, none,
                             p["key_codebook"], p["value_codebook"], p["key_scale"], p["key_mean"], p["value_mean"],
                             cfg.hadamard, self._arrivals, _stream(rows_k))

    def _attend_inputs(self, layer: int):
        """The layer in the contiguous layout of vecinfer.attention, copied out of the pages and the
        ring (for references and inspection; attend reads the pages and the ring in place):
        (key_codes, value_codes, lengths, sink_k, sink_v, recent_k, recent_v). Codes uint8
        [B, Hkv, code_capacity, row_bytes]; lengths CPU int32 [B, 3] (sinks, coded, recent); sinks
        [B, Hkv, sink_tokens, D] and recent window [B, Hkv, residual, D] in order, in the cache
        dtype. Only the first lengths[b] entries are valid."""
        self._check_layer(layer)
        lens = self._lengths[layer]
        recent_k, recent_v = self._recent_k[layer], self._recent_v[layer]
        if self.residual and self._keep_state is None:  # the window is a ring (kept tokens: in order)
            rows = (lens[:, 1:2].long() + torch.arange(self.residual)[None, :]) % self.residual  # [B, R]
            index = rows.to(self.device)[:, None, :, None].expand_as(recent_k)
            recent_k, recent_v = recent_k.gather(2, index), recent_v.gather(2, index)
        return (_contiguous_codes(self._key_codes[layer], self.batch_size),
                _contiguous_codes(self._value_codes[layer], self.batch_size), lens, self._sink_k[layer],
                self._sink_v[layer], recent_k, recent_v)

    def dequantize(self, layer: int, padded: bool = False):
        """(k_hat, v_hat): [B, Hkv, tokens, D] in original coordinates and the cache dtype.

        When the sequences hold different numbers of tokens this raises ValueError unless
        padded=True; with padded=True it returns (k_hat, v_hat, lengths): each sequence's tokens
        at [0, lengths[b]) and zeros after, lengths the CPU int64 [B] tokens per sequence."""
        self._check_layer(layer)
        positions = None
        if self._keep_state is not None:  # sink rows: the sinks, then the kept tokens; code rows as encoded
            state = self._keep_state
            sinks = torch.arange(self.sinks, dtype=torch.int32, device=self.device).expand(self.batch_size, -1)
            positions = (torch.cat([sinks, state["kept_positions"][layer]], 1), state["code_positions"][layer])
        k, v, pos = _virtual_kv(*self._attend_inputs(layer), self.quantizer, layer, positions)
        totals, uniform = self.lengths(layer), self._uniform(layer)
        if not uniform or positions is not None:  # kept tokens: rows are not in position order
            if not uniform and not padded:
                raise ValueError(f"dequantize: the sequences of layer {layer} hold different numbers of tokens "
                                 f"{totals.tolist()}; use dequantize(layer, padded=True) for right-padded tensors "
                                 "and the lengths")
            # scatter each valid entry to its position; invalid ones to a dump column cut off after
            n = int(totals.max())
            index = torch.where(pos >= 0, pos, n)[:, None, :, None].expand_as(k)
            shape = (k.shape[0], k.shape[1], n + 1, k.shape[3])
            k = k.new_zeros(shape).scatter_(2, index, k)[:, :, :n]
            v = v.new_zeros(shape).scatter_(2, index, v)[:, :, :n]
        return (k, v, totals) if padded else (k, v)

    @_exclusive
    def attend(self, layer: int, q: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """Attention of q [B, Hq, Tq, D] (a floating-point tensor) over the cache; the Tq queries
        of sequence b are its last Tq positions, causal among themselves, and see only that
        sequence's tokens. Softmax scale 1/sqrt(D) unless given. Returns [B, Hq, Tq, D] in q's dtype."""
        self._check_layer(layer)
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
        if not q.is_floating_point():
            raise TypeError(f"q: expected a floating-point tensor, got {q.dtype}")
        if scale is not None:
            scale = _check_real(scale, "scale")
        if q.dim() != 4 or q.shape[0] != self.batch_size or q.shape[-1] != self.head_dim:
            raise ValueError(f"q: expected [{self.batch_size}, Hq, Tq, {self.head_dim}], got {list(q.shape)}")
        if q.shape[1] % self.num_kv_heads != 0:
            raise ValueError(f"q: {q.shape[1]} query heads are not a multiple of {self.num_kv_heads} KV heads")
        if q.device != self.device:
            raise ValueError(f"q: is on {q.device}, the cache on {self.device}")
        n, tq = int(self.lengths(layer).min()), q.shape[2]
        if tq < 1 or tq > n:
            raise ValueError(f"q: {tq} queries, but a sequence of layer {layer} holds {n} tokens "
                             "(queries are the last appended)")
        if self._keep_state is not None and tq > self.residual:
            raise ValueError(f"q: {tq} queries; with kept tokens attention is exact for queries within the "
                             f"{self.residual}-token recent window, so attend (and append) at most {self.residual} "
                             "tokens at a time (VecInferCache splits longer blocks itself)")
        if self._fused_attention_supported(q):
            p, cfg = self.quantizer.layers[layer], self.quantizer.config
            lengths, max_coded = self._lengths[layer], int(self._lengths[layer][:, 1].max())
            if q.is_cuda:
                # the device copy of the lengths; max_coded (which sizes the split-KV plan) from the
                # host copy, or, while a CUDA graph is captured, the capacity: replays of the graph
                # run on longer sequences than the capture saw
                lengths = self._device_lengths[layer]
                if torch.cuda.is_current_stream_capturing():
                    max_coded = self._page_table.shape[1] * _PAGE
            stored = (self._key_codes[layer], self._value_codes[layer], lengths, self._sink_k[layer],
                      self._sink_v[layer], self._recent_k[layer], self._recent_v[layer])
            softmax_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
            if torch.compiler.is_compiling():
                # traced by torch.compile: the registered operator, whose fake implementation
                # gives the output's shape without running the kernel
                from . import custom_ops  # noqa: F401  (registers torch.ops.vecinfer.paged_attention)

                return torch.ops.vecinfer.paged_attention(
                    q.contiguous(), *stored[:3], p["key_codebook"], p["value_codebook"], *stored[3:],
                    p["key_scale"], p["key_mean"], p["value_mean"], cfg.hadamard, softmax_scale, max_coded,
                    self._page_table, self._keep_state is None)[0]
            return attention(q.contiguous(), stored[0], stored[1], lengths, p["key_codebook"], p["value_codebook"],
                             sink_keys=stored[3], sink_values=stored[4], recent_keys=stored[5],
                             recent_values=stored[6], key_scale=p["key_scale"], key_mean=p["key_mean"],
                             value_mean=p["value_mean"], hadamard=cfg.hadamard, scale=softmax_scale,
                             max_coded=max_coded, page_table=self._page_table,
                             recent_ring=self._keep_state is None)
        return codes_attention(q, *self._attend_inputs(layer), self.quantizer, layer, scale)

    def _fused_attention_supported(self, q: torch.Tensor) -> bool:
        """Whether vecinfer.attention takes this call. On a GPU, what the fused kernels say they
        support (float16/bfloat16, the bit presets' codebooks; up to 16 queries the decode kernel,
        longer blocks the long-query kernel). On the CPU (the C++ reference, per sequence in double
        precision, so a sequence's result does not depend on the rest of the batch): decode steps of
        up to 4 queries; longer query blocks run faster through codes_attention (float32, streaming
        over the codes), which computes the same function."""
        if not q.is_cuda:
            return q.dtype == self.dtype and q.shape[2] <= 4
        cfg = self.quantizer.config
        dtype = {torch.float16: 1, torch.bfloat16: 2}.get(q.dtype, 0)
        why = _C.cuda_attention_support(dtype, q.shape[2], cfg.key_sub_dim, cfg.key_code_bits, cfg.value_sub_dim,
                                        cfg.value_code_bits)
        return q.dtype == self.dtype and not why

    @_exclusive
    def reserve(self, max_tokens: int) -> None:
        """Grows the capacity to max_tokens per sequence (never shrinks), keeping every token."""
        if not _is_int(max_tokens) or not 1 <= max_tokens <= _MAX_TOKENS:
            raise ValueError(f"max_tokens: expected an int in [1, 2**31), got {max_tokens!r}")
        if max_tokens <= self.max_tokens:
            return
        if self.sinks < self.quantizer.config.sink_tokens:  # the sink part was cut by the old capacity
            raise ValueError(f"reserve: a cache created with max_tokens={self.max_tokens} < sink_tokens cannot grow")
        coded = _code_capacity(max_tokens - self.sinks)
        _check_memory(len(self._held) * self._layer_bytes(self.batch_size, max_tokens), self.device,
                      f"max_tokens: reserving {max_tokens} tokens for {self.batch_size} sequences x "
                      f"{len(self._held)} layers")

        pages, old = coded // _PAGE, self._page_table.shape[1]

        def grown(t):  # each sequence's pages, then new ones after them
            if t is None:
                return None
            new = t.new_empty((self.batch_size * pages, *t.shape[1:]))
            new.view(self.batch_size, pages, *t.shape[1:])[:, :old] = t.view(self.batch_size, old, *t.shape[1:])
            return new

        def widened(t, dim, size):  # t with `size` entries along dim, the old ones first
            if t is None or t.shape[dim] == size:
                return t
            new = t.new_empty((*t.shape[:dim], size, *t.shape[dim + 1:]))
            new.narrow(dim, 0, t.shape[dim]).copy_(t)
            return new

        # every new buffer first, then the swap: a failed allocation leaves the cache as it was
        key_codes, value_codes = [grown(t) for t in self._key_codes], [grown(t) for t in self._value_codes]
        table = _identity_pages(self.batch_size, pages, self.device)
        if self._keep_state is not None:  # more kept rows (the fraction of a larger capacity), more code rows
            kept = self._kept_capacity(max_tokens)
            sink_k, sink_v = ([widened(t, 2, self.sinks + kept) for t in group]
                              for group in (self._sink_k, self._sink_v))
            columns = {"window_scores": self.residual, "kept_scores": kept, "kept_positions": kept,
                       "code_positions": coded}
            state = {name: [widened(t, 1, columns[name]) for t in group] for name, group in self._keep_state.items()}
            self._sink_k, self._sink_v, self._keep_state = sink_k, sink_v, state
        self._key_codes, self._value_codes, self.max_tokens = key_codes, value_codes, max_tokens
        self._page_table = table

    @_exclusive
    def truncate(self, tokens: int, layers: Optional[Sequence[int]] = None) -> None:
        """Removes the last `tokens` tokens of every sequence in `layers` (default all held). Only
        full-precision tokens can go back: those of the recent window, or the sinks of a sequence
        holding nothing else; otherwise ValueError, and the cache is unchanged."""
        if not _is_int(tokens):
            raise TypeError(f"tokens: expected an int, got {type(tokens).__name__}")
        if tokens < 0:
            raise ValueError(f"tokens: expected a non-negative int, got {tokens!r}")
        layers = sorted(self._held) if layers is None else list(layers)
        new = []
        for layer in layers:
            self._check_layer(layer)
            s, c, r = self._lengths[layer].unbind(1)
            from_recent = r.clamp(max=tokens)
            from_sinks = tokens - from_recent
            # sinks go back only from a sequence holding nothing else (no codes, no kept tokens)
            ok = (from_sinks == 0) | ((c == 0) & (s <= self.sinks) & (r == from_recent) & (from_sinks <= s))
            if not bool(ok.all()):
                b = int((~ok).nonzero()[0])
                raise ValueError(f"truncate: cannot remove {tokens} tokens from sequence {b} of layer {layer} "
                                 f"(sinks, coded, recent = {self._lengths[layer][b].tolist()}): only tokens still in "
                                 "full precision can be removed; the cache is unchanged")
            new.append(torch.stack([s - from_sinks, c, r - from_recent], dim=1).to(torch.int32))
        for layer, lens in zip(layers, new):
            self._set_lengths(layer, lens)

    @_exclusive
    def select(self, indices) -> None:
        """Keeps the sequences `indices` (a 1-D integer tensor or list of ints, repeats allowed) in
        that order, in every layer: beam-search reordering, batch expansion and selection."""
        if isinstance(indices, torch.Tensor):
            if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
                raise TypeError(f"indices: expected an integer tensor, got {indices.dtype} (a bool mask is not "
                                "a list of indices)")
            idx = indices.to("cpu", torch.int64).flatten()
        elif isinstance(indices, (list, tuple)) and all(_is_int(i) for i in indices):
            idx = torch.tensor(indices, dtype=torch.int64)
        else:
            raise TypeError(f"indices: expected a list of ints or an integer tensor, got {indices!r}")
        if len(idx) == 0 or bool((idx < 0).any()) or bool((idx >= self.batch_size).any()):
            raise ValueError(f"indices: expected a non-empty list of sequence indices in [0, {self.batch_size}), "
                             f"got {idx.tolist()}")
        _check_memory(len(self._held) * self._layer_bytes(len(idx), self.max_tokens), self.device,
                      f"indices: {len(idx)} sequences")
        dev_idx = idx.to(self.device)

        pages = self._page_table.shape[1]

        def pick(buffers):
            return [None if t is None else t.index_select(0, dev_idx) for t in buffers]

        def pick_pages(pools):  # a sequence's pages move together
            return [None if t is None else
                    t.view(self.batch_size, pages, *t.shape[1:]).index_select(0, dev_idx).view(-1, *t.shape[1:])
                    for t in pools]

        # every new buffer first, then the swap: a failed allocation leaves the cache as it was
        new = [pick_pages(self._key_codes), pick_pages(self._value_codes)] + [
            pick(b) for b in (self._sink_k, self._sink_v, self._recent_k, self._recent_v)]
        keep_state = None if self._keep_state is None else {
            name: pick(group) for name, group in self._keep_state.items()}
        lengths = [lens.index_select(0, idx) for lens in self._lengths]
        device_lengths = None if self._device_lengths is None else pick(self._device_lengths)
        b = len(idx)
        table = _identity_pages(b, pages, self.device)
        slots = torch.arange(b, dtype=torch.int32, device=self.device)
        indptr = torch.arange(b + 1, dtype=torch.int32, device=self.device)
        arrivals = torch.zeros(b, dtype=torch.int32, device=self.device)
        (self._key_codes, self._value_codes, self._sink_k, self._sink_v, self._recent_k, self._recent_v) = new
        self._lengths, self._device_lengths, self.batch_size = lengths, device_lengths, b
        self._keep_state = keep_state
        self._page_table, self._slots, self._step_indptr, self._arrivals = table, slots, indptr, arrivals

    def nbytes(self) -> int:
        """Bytes the cache holds on its device: codes, full-precision windows, sinks and kept tokens
        (all preallocated for max_tokens) with the kept tokens' scores and positions, and the
        quantizer's codebooks, scales and means."""
        buffers = [self._key_codes, self._value_codes, self._sink_k, self._sink_v, self._recent_k, self._recent_v]
        if self._keep_state is not None:
            buffers += list(self._keep_state.values())
        held = sum(t.numel() * t.element_size() for group in buffers for t in group if t is not None)
        return held + self.quantizer.parameter_bytes()


def _virtual_kv(key_codes, value_codes, lengths, sink_k, sink_v, recent_k, recent_v, quantizer: KVQuantizer,
                layer: int, positions=None):
    """(k, v, pos): the sinks, decoded codes and recent windows of every sequence side by side,
    [B, Hkv, W, D] with W = max sinks + max coded + max recent, and pos [B, W] (on the data's
    device) the token position of each entry, -1 where that sequence has none. With equal lengths
    and no `positions` pos is 0..W-1: k and v are the sequence in order. `positions`: (sink row
    positions, code row positions), [B, >= rows] each, where rows are not at consecutive positions
    (kept tokens)."""
    lens = lengths.to(torch.int64)
    smax, cmax, rmax = (int(x) for x in lens.max(0).values)
    ks, vs = [sink_k[:, :, :smax]], [sink_v[:, :, :smax]]
    if cmax:
        ks.append(quantizer.decode_keys(layer, key_codes[:, :, :cmax].contiguous(), sink_k.dtype))
        vs.append(quantizer.decode_values(layer, value_codes[:, :, :cmax].contiguous(), sink_v.dtype))
    ks.append(recent_k[:, :, :rmax])
    vs.append(recent_v[:, :, :rmax])
    s, c, r = (x[:, None] for x in lens.unbind(1))
    parts = []
    for size, start, count in ((smax, 0, s), (cmax, s, c), (rmax, s + c, r)):
        i = torch.arange(size)[None, :]
        parts.append(torch.where(i < count, start + i, -1))
    pos = torch.cat(parts, dim=1).to(sink_k.device)
    if positions is not None:
        stored = torch.cat([positions[0][:, :smax], positions[1][:, :cmax]], 1).to(pos.dtype)
        head = pos[:, :smax + cmax]
        pos = torch.cat([torch.where(head >= 0, stored, head), pos[:, smax + cmax:]], 1)
    # entries a sequence does not hold are unwritten memory (possibly NaN bits): zero them, so a
    # masked-out entry contributes 0 * 0 and not 0 * NaN to the attention output
    valid = (pos >= 0)[:, None, :, None]
    k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    return k.masked_fill(~valid, 0), v.masked_fill(~valid, 0), pos


_PAGE = 64  # code rows per page: one page per 64-token stage of the attention kernel


def _code_capacity(tokens: int) -> int:
    """Code rows per sequence: whole pages, at least one."""
    return max((tokens + _PAGE - 1) // _PAGE, 1) * _PAGE


def _identity_pages(batch: int, pages: int, device) -> torch.Tensor:
    """The page table of sequences owning consecutive pages: row b = b * pages + [0, pages)."""
    return torch.arange(batch * pages, dtype=torch.int32).reshape(batch, pages).to(device)


def _contiguous_codes(pool: torch.Tensor, batch: int) -> torch.Tensor:
    """Pages [batch * pages, Hkv, P, bytes] of an identity page table as [batch, Hkv, pages * P, bytes]."""
    n, h, p, b = pool.shape
    return pool.reshape(batch, n // batch, h, p, b).transpose(1, 2).reshape(batch, h, n // batch * p, b)


_STREAM_TOKENS = 512  # coded tokens decoded at a time by codes_attention


def codes_attention(q: torch.Tensor, key_codes, value_codes, lengths, sink_k, sink_v, recent_k, recent_v,
                    quantizer: KVQuantizer, layer: int, scale: Optional[float] = None) -> torch.Tensor:
    """Attention on a compressed cache (the inputs of QuantizedKVCache._attend_inputs) in float32,
    streaming over the codes: the Tq queries q [B, Hq, Tq, D] of sequence b sit at its last Tq
    positions, causal among themselves. The codes are decoded _STREAM_TOKENS at a time and merged
    by an online softmax, so memory grows with the query block, not with the context. The fused
    kernel (vecinfer.ops.attention) computes the same function on the GPU."""
    b, hq, tq, d = q.shape
    hkv = sink_k.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lens = lengths.to(torch.int64)
    sinks, coded, recent = (x[:, None].to(q.device) for x in lens.unbind(1))  # [B, 1]
    query_pos = (sinks + coded + recent) - tq + torch.arange(tq, device=q.device)  # [B, Tq]
    qg = q.float().reshape(b, hkv, group * tq, d) * scale
    row_pos = query_pos.repeat(1, group)[:, None, :, None]  # [B, 1, g*Tq, 1]: rows are (g, Tq)
    best = torch.full((b, hkv, group * tq, 1), float("-inf"), device=q.device)
    total = torch.zeros_like(best)
    acc = torch.zeros((b, hkv, group * tq, d), device=q.device)

    def attend(k, v, pos):  # k, v [B, Hkv, n, D]; pos [B, n] token positions, -1 for none
        nonlocal best, total, acc
        scores = qg @ k.float().transpose(-1, -2)  # [B, Hkv, g*Tq, n]
        allowed = (pos[:, None, None, :] >= 0) & (pos[:, None, None, :] <= row_pos)
        scores = scores.masked_fill(~allowed, float("-inf"))
        new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
        ref = torch.where(torch.isinf(new_best), torch.zeros_like(new_best), new_best)
        p = torch.exp(scores - ref)
        keep = torch.exp(best - ref)
        # entries a sequence does not hold may be unwritten memory (NaN bits): 0 * NaN must not reach acc
        v = v.float().masked_fill(~(pos >= 0)[:, None, :, None], 0)
        acc = acc * keep + p @ v
        total = total * keep + p.sum(-1, keepdim=True)
        best = new_best

    def positions(start, count, size, first):  # [B, size]: first + i where i < count, else -1
        i = torch.arange(first, first + size, device=q.device)[None, :]
        return torch.where(i < count, start + i, -1)

    smax, cmax, rmax = (int(x) for x in lens.max(0).values)
    if smax:
        attend(sink_k[:, :, :smax], sink_v[:, :, :smax], positions(0, sinks, smax, 0))
    for first in range(0, cmax, _STREAM_TOKENS):
        last = min(first + _STREAM_TOKENS, cmax)
        k = quantizer.decode_keys(layer, key_codes[:, :, first:last].contiguous(), sink_k.dtype)
        v = quantizer.decode_values(layer, value_codes[:, :, first:last].contiguous(), sink_v.dtype)
        attend(k, v, positions(sinks, coded, last - first, first))
    if rmax:
        attend(recent_k[:, :, :rmax], recent_v[:, :, :rmax], positions(sinks + coded, recent, rmax, 0))
    out = acc / total.clamp_min(torch.finfo(torch.float32).tiny)
    return out.reshape(b, hq, tq, d).to(q.dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                        allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention in float32, GQA by head grouping. q [B, Hq, Tq, D], k/v [B, Hkv, N, D].
    By default the Tq queries are the last Tq key positions (causal among themselves);
    `allowed` [B, Tq, N] (bool) says instead which keys each query sees."""
    b, hq, tq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().reshape(b, hkv, group * tq, d)
    scores = (qg @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, g*Tq, N]
    if allowed is None:
        query_pos = n - tq + torch.arange(tq, device=q.device)
        allowed = (torch.arange(n, device=q.device)[None, :] <= query_pos[:, None])[None]  # [1, Tq, N]
    scores = scores.masked_fill(~allowed.repeat(1, group, 1)[:, None], float("-inf"))  # rows are (g, Tq)
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.reshape(b, hq, tq, d).to(q.dtype)
