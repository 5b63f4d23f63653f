"""PagedKVCache: the compressed KV cache of many sequences in a page pool, driven the way serving
engines drive their attention kernels (plan once per batch composition, run many times).

Layout (every layer holds the same pages; a page id names the same page in each layer's pools):
  key / value code pools   uint8 [num_pages, Hkv, page_size, code_row_bytes] per layer
  page table               int32 [max_seqs, max_pages_per_seq]: coded token t of sequence s is row
                           t % page_size of page page_table[s, t // page_size]
  sinks                    [max_seqs, Hkv, sink_tokens, D] per layer (full precision)
  recent window            [max_seqs, Hkv, residual, D] per layer: a ring, window token j (position
                           sinks + j) in row j % residual while it is recent
  lengths                  int32 [max_seqs, 3] per layer on the device: (sinks, coded, recent)
A sequence is a slot (0 .. max_seqs-1). Pages are reference-counted: `fork` shares the full pages
of a sequence (a shared prompt is stored once) and copies only its partial page and its
full-precision window.

Kept tokens (quantizer.config.keep_tokens or keep_fraction > 0; vecinfer.keeping has the rule):
the sink buffers hold the sinks then the kept tokens, [max_seqs, Hkv, sink_tokens + kept, D], and
the first length counts both; the window is in order (row i is window token i) instead of a ring,
with each window token's score, each kept token's score and position beside it. A step of one
token to each sequence is one call of the kept-token step kernel (vecinfer/kept.h) and one of the
append kernel, with no host synchronisation (it can be captured in a CUDA graph); any other append
(a prompt) runs the rule per sequence from Python. A sequence holds the page of its next code as
well (a step that keeps its token or the one leaving its window still writes that row, unread). The attention reads kept tokens as it reads sinks, which is exact for
queries within the recent window: a plan takes at most `residual` queries per sequence (prefill a
longer prompt in chunks of at most `residual` tokens).

A decode step, as an engine runs it:
    step = cache.plan_append(seqs, [1] * len(seqs))     # once per batch composition
    decode = cache.plan_attention(seqs, num_q_heads)     # idem
    cache.begin(step)                                    # host: pages for this step's codes
    for layer in ...:
        cache.append(layer, k, v, step)                  # k, v: [tokens, Hkv, D], one kernel
        out = decode.run(layer, q)                       # q: [B, Hq, Tq, D]
`append` and `run` neither allocate nor synchronise with the host, so the loop body can be
captured in a CUDA graph and replayed, with `cache.begin(step)` before each replay.

Thread safety: none; one cache is driven from one thread.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Union

import torch

from . import _C
from .keeping import SequenceBuffers, advance_keeping, apply_writes, plan_keeping
from .ops import _check_memory, _check_tensor, _device_guard, _stream, code_row_bytes
from .quantizer import KVQuantizer

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_finite_on_cpu(name: str, t: torch.Tensor) -> None:
    """Rejects NaN or infinity in appended CPU tensors (a token kept in full precision would
    otherwise fail the append that later encodes it). CUDA tensors are not checked: that needs a
    host synchronisation; the kernels rely on finite inputs there."""
    if not t.is_cuda and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinity; the cache is unchanged")


def advance(lengths: torch.Tensor, new_tokens: torch.Tensor, sink_tokens: int, residual: int) -> torch.Tensor:
    """The lengths (sinks, coded, recent) [n, 3] of n sequences after appending new_tokens[i] to
    sequence i (the rule of cpp/include/vecinfer/paged.h, which the append kernel applies on the
    device); CPU int64."""
    s, c, r = lengths.to(torch.int64).unbind(-1)
    new = new_tokens.to(torch.int64)
    to_sink = torch.minimum(sink_tokens - s, new)
    window_end = c + r + new - to_sink
    coded = torch.maximum(c, window_end - residual)
    return torch.stack([s + to_sink, coded, window_end - coded], dim=-1)


class AppendPlan:
    """Where one step's new tokens go: sequences (slots) and tokens per sequence. Made by
    PagedKVCache.plan_append; the device tensors are fixed, so a captured step can be replayed."""

    def __init__(self, cache: "PagedKVCache", seqs: List[int], counts: List[int]):
        self.seqs, self.counts = seqs, counts
        indptr = [0]
        for n in counts:
            indptr.append(indptr[-1] + n)
        self.num_rows = indptr[-1]
        self.max_new_tokens = max(counts)
        self.host_indptr = indptr
        self.seq_slots = torch.tensor(seqs, dtype=torch.int32, device=cache.device)
        self.indptr = torch.tensor(indptr, dtype=torch.int32, device=cache.device)
        self.generation = cache._generation  # the sequences' membership when planned
        self.pending: frozenset = frozenset()  # layers still to append this step (eager use)
        # kept tokens: the lengths before the step begun last, and whether it is a kept-token step
        # (one token to each sequence)
        self.before: dict = {}
        self.kept_step = False
        if cache.keeps_tokens:
            rows = (len(seqs), cache.num_kv_heads, cache.head_dim)
            self.encode_k = torch.empty(rows, dtype=cache.dtype, device=cache.device)
            self.encode_v = torch.empty(rows, dtype=cache.dtype, device=cache.device)
            self.next_lengths = torch.zeros((cache.max_seqs, 3), dtype=torch.int32, device=cache.device)
            self.encode_lengths = torch.zeros((cache.max_seqs, 3), dtype=torch.int32, device=cache.device)


class AttentionPlan:
    """Decode attention over a fixed batch of sequences of a PagedKVCache: the split-KV schedule and
    workspace, made once; `run(layer, q)` launches without planning, allocating or synchronising."""

    def __init__(self, cache: "PagedKVCache", seqs: List[int], num_q_heads: int, counts: List[int], max_coded: int,
                 scale: Optional[float], ragged: bool):
        self.cache, self.seqs = cache, seqs
        # dense [B, Hq, Tq, D], or ragged: packed [total, Hq, D] with the sequences' rows at query_indptr
        self.shape = (sum(counts), num_q_heads, cache.head_dim) if ragged else \
            (len(seqs), num_q_heads, counts[0], cache.head_dim)
        self.query_indptr = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32,
                                         device=cache.device) if ragged else None
        self.scale = cache.head_dim ** -0.5 if scale is None else float(scale)
        self.generation = cache._generation
        self.seq_slots = torch.tensor(seqs, dtype=torch.int32, device=cache.device)
        example = torch.empty(self.shape, dtype=cache.dtype, device=cache.device)
        self._plan = _C.AttentionPlan()
        cfg = cache.quantizer.config
        with _device_guard(example):
            for layer in cache.layers:
                p = cache.quantizer.layers[layer]
                self._plan.add_layer(example, cache._key_pages[layer], cache._value_pages[layer],
                                     cache._lengths[layer], cache._sink_k[layer], cache._sink_v[layer],
                                     cache._ring_k[layer], cache._ring_v[layer], p["key_codebook"],
                                     p["value_codebook"], p["key_scale"], p["key_mean"], p["value_mean"],
                                     cfg.hadamard, max_coded, cache._page_table, self.seq_slots,
                                     not cache.keeps_tokens, self.query_indptr, max(counts))
        self._layer_index = {layer: i for i, layer in enumerate(cache.layers)}
        self.workspace = (torch.empty(max(self._plan.workspace_bytes, 16), dtype=torch.uint8, device=cache.device)
                          if cache.device.type == "cuda" else None)

    def run(self, layer: int, q: torch.Tensor, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of q [B, Hq, Tq, D] (the planned shape, the cache's dtype and device,
        contiguous) over layer `layer` of the planned sequences; the Tq queries are each sequence's
        last Tq tokens. Writes `out` (allocated when not given) and, when given, `lse` (float32
        [B, Hq, Tq], natural-log log-sum-exp of the scaled scores). A ragged plan takes q packed
        [total, Hq, D] (sequence i's queries after those of sequences 0..i-1) and lse [total, Hq]."""
        if self.generation != self.cache._generation:
            raise ValueError("plan: a sequence was added, forked or freed since this plan was made; plan again")
        index = self._layer_index.get(layer)
        if index is None:
            raise ValueError(f"layer: {layer!r} is not a layer of this cache ({list(self.cache.layers)})")
        _check_buffer("q", q, self.shape, self.cache.dtype, self.cache.device)
        if out is None:
            out = torch.empty(self.shape, dtype=q.dtype, device=q.device)
        else:
            _check_buffer("out", out, self.shape, self.cache.dtype, self.cache.device)
        if lse is not None:
            _check_buffer("lse", lse, self.shape[:-1], torch.float32, self.cache.device)
        ws = self.workspace
        self._plan.run(index, q.data_ptr(), out.data_ptr(), 0 if lse is None else lse.data_ptr(), self.scale,
                       0 if ws is None else ws.data_ptr(), 0 if ws is None else ws.numel(),
                       torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0)
        return out


def _check_buffer(name: str, t, shape, dtype, device) -> None:
    _check_tensor(t, name)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {dtype} tensor {list(shape)} on {device}, got "
                         f"{t.dtype} {list(t.shape)} on {t.device}" + ("" if t.is_contiguous() else " (not contiguous)"))
    if t.requires_grad:
        raise ValueError(f"{name}: requires grad; the cache's kernels do not record autograd (pass a detached tensor)")


class PagedKVCache:
    def __init__(self, quantizer: KVQuantizer, num_pages: int, max_seqs: int, max_tokens_per_seq: int,
                 page_size: int = 64, device="cpu", dtype: torch.dtype = torch.float16,
                 layers: Optional[Sequence[int]] = None):
        """A pool of `num_pages` pages of `page_size` coded tokens (a power of two >= 16; 64, one
        page per stage of the attention kernel, costs nothing against contiguous codes) for up to
        `max_seqs` sequences of up to `max_tokens_per_seq` tokens each, for `layers` (default all of
        the quantizer's) of the quantizer's model."""
        if not isinstance(quantizer, KVQuantizer):
            raise TypeError(f"quantizer: expected a vecinfer.KVQuantizer, got {type(quantizer).__name__}")
        cfg = quantizer.config
        if cfg.method != "vq":
            raise ValueError(f"quantizer: the cache stores VQ codes; method {cfg.method!r} is an evaluation baseline")
        for name, value in (("num_pages", num_pages), ("max_seqs", max_seqs),
                            ("max_tokens_per_seq", max_tokens_per_seq), ("page_size", page_size)):
            _positive_int(name, value)
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size: expected a power of two >= 16, got {page_size}")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected torch.float16, bfloat16 or float32, got {dtype}")
        held = list(range(quantizer.num_layers)) if layers is None else list(layers)
        if not held or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < quantizer.num_layers
                           for i in held) or len(set(held)) != len(held):
            raise ValueError(f"layers: expected distinct layer indices in [0, {quantizer.num_layers}), got {held}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.quantizer = quantizer if quantizer.device == self.device else quantizer.to(self.device)
        self.layers = held
        self.num_kv_heads, self.head_dim, self.dtype = quantizer.num_kv_heads, quantizer.head_dim, dtype
        self.num_pages, self.page_size, self.max_seqs = num_pages, page_size, max_seqs
        self.sink_tokens, self.residual = cfg.sink_tokens, cfg.residual
        self.keeps_tokens = cfg.keeps_tokens
        coded_most = max(max_tokens_per_seq - self.sink_tokens, 0)
        # kept tokens: a sequence also holds the page of its next code
        self.max_pages_per_seq = max(1, coded_most // page_size + 1 if self.keeps_tokens else
                                     (coded_most + page_size - 1) // page_size)
        self.max_tokens_per_seq = max_tokens_per_seq
        self.kept_capacity = (cfg.kept_budget(max(max_tokens_per_seq - self.sink_tokens - self.residual, 0))
                              if self.keeps_tokens else 0)
        hkv, d = self.num_kv_heads, self.head_dim
        kb = code_row_bytes(d, cfg.key_sub_dim, cfg.key_code_bits)
        vb = code_row_bytes(d, cfg.value_sub_dim, cfg.value_code_bits)
        scores_bytes = 4 * (self.residual + 2 * self.kept_capacity) if self.keeps_tokens else 0
        layer_bytes = num_pages * hkv * page_size * (kb + vb) + max_seqs * (
            2 * hkv * (self.sink_tokens + self.kept_capacity + self.residual) * d * dtype.itemsize + 3 * 4 +
            scores_bytes)
        _check_memory(len(held) * layer_bytes + max_seqs * (self.max_pages_per_seq + 1) * 4, self.device,
                      f"num_pages, max_seqs: a pool of {num_pages} pages of {page_size} tokens and {max_seqs} "
                      f"sequences x {len(held)} layers")

        def per_layer(*shape, dt=dtype):
            return {i: torch.zeros(shape, dtype=dt, device=self.device) for i in held}

        self._key_pages = per_layer(num_pages, hkv, page_size, kb, dt=torch.uint8)
        self._value_pages = per_layer(num_pages, hkv, page_size, vb, dt=torch.uint8)
        self._sink_k = per_layer(max_seqs, hkv, self.sink_tokens + self.kept_capacity, d)
        self._sink_v = per_layer(max_seqs, hkv, self.sink_tokens + self.kept_capacity, d)
        self._ring_k = per_layer(max_seqs, hkv, self.residual, d)  # kept tokens: the window in order
        self._ring_v = per_layer(max_seqs, hkv, self.residual, d)
        self._lengths = per_layer(max_seqs, 3, dt=torch.int32)
        # kept tokens: each window token's score, each kept token's score and position
        self._window_scores = per_layer(max_seqs, self.residual, dt=torch.float32) if self.keeps_tokens else {}
        self._kept_scores = per_layer(max_seqs, self.kept_capacity, dt=torch.float32) if self.keeps_tokens else {}
        self._kept_positions = per_layer(max_seqs, self.kept_capacity, dt=torch.int32) if self.keeps_tokens else {}
        self._no_rows = torch.empty((max_seqs, hkv, 0, d), dtype=dtype, device=self.device)  # no sinks, no window
        # Host state: the page table (mirrored on the device), page reference counts, free pages and
        # slots, and each live sequence's lengths after the appends planned so far.
        self._host_table = torch.zeros((max_seqs, self.max_pages_per_seq), dtype=torch.int32)
        self._page_table = torch.zeros((max_seqs, self.max_pages_per_seq), dtype=torch.int32, device=self.device)
        self._pages_of: List[List[int]] = [[] for _ in range(max_seqs)]
        self._refs = [0] * num_pages
        self._free_pages = list(range(num_pages - 1, -1, -1))
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._state: dict = {}  # slot -> (sinks, coded, recent) on the host
        self._arrivals = torch.zeros(max_seqs, dtype=torch.int32, device=self.device)
        self._generation = 0

    # ---- sequences ----------------------------------------------------------------------------

    def add_sequence(self) -> int:
        """A new empty sequence; returns its id (a slot)."""
        if not self._free_slots:
            raise ValueError(f"add_sequence: all {self.max_seqs} sequence slots are in use; free one first")
        slot = self._free_slots.pop()
        self._state[slot] = (0, 0, 0)
        for layer in self.layers:
            self._lengths[layer][slot].zero_()
        self._generation += 1
        return slot

    def sequences(self) -> List[int]:
        return sorted(self._state)

    def length(self, seq: int) -> int:
        """Tokens of sequence `seq` (those planned and begun so far)."""
        return sum(self._state[self._check_seq(seq)])

    def free_pages(self) -> int:
        return len(self._free_pages)

    def fork(self, seq: int) -> int:
        """A new sequence holding the same tokens as `seq`: its full pages are shared (reference
        counted); its partial last page, sinks and window are copied. Returns the new id."""
        self._check_seq(seq)
        if not self._free_slots:
            raise ValueError(f"fork: all {self.max_seqs} sequence slots are in use; free one first")
        pages = self._pages_of[seq]
        full = self._state[seq][1] // self.page_size
        copied = pages[full:]  # the partial last page; with kept tokens, the page of the next code
        if len(copied) > len(self._free_pages):
            raise ValueError(f"fork: the page pool is full (the fork needs {len(copied)} page(s) for its partial "
                             "last page and next code)")
        child = self._free_slots.pop()
        shared = pages[:full]
        for p in shared:
            self._refs[p] += 1
        own = shared + [self._take_page() for _ in copied]
        for layer in self.layers:
            for source, target in zip(copied, own[full:]):
                for pool in (self._key_pages[layer], self._value_pages[layer]):
                    pool[target].copy_(pool[source])
            for buf in self._per_sequence_buffers():
                buf[layer][child].copy_(buf[layer][seq])
        self._pages_of[child] = own
        self._state[child] = self._state[seq]
        self._write_table(child)
        self._generation += 1
        return child

    def free(self, seq: int) -> None:
        """Releases sequence `seq`: its pages return to the pool when no other sequence holds them."""
        self._check_seq(seq)
        for p in self._pages_of[seq]:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free_pages.append(p)
        self._pages_of[seq] = []
        del self._state[seq]
        self._free_slots.append(seq)
        self._generation += 1

    def _per_sequence_buffers(self):
        """Every per-layer buffer with one row per slot (a sequence's full-precision tokens and state)."""
        return [buf for buf in (self._sink_k, self._sink_v, self._ring_k, self._ring_v, self._lengths,
                                self._window_scores, self._kept_scores, self._kept_positions) if buf]

    def _check_seq(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq not in self._state:
            raise ValueError(f"seq: {seq!r} is not a live sequence of this cache (live: {self.sequences()})")
        return seq

    def _take_page(self) -> int:
        p = self._free_pages.pop()
        self._refs[p] = 1
        return p

    def _write_table(self, seq: int) -> None:
        pages = self._pages_of[seq]
        row = torch.zeros(self.max_pages_per_seq, dtype=torch.int32)
        row[:len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self._host_table[seq] = row
        self._page_table[seq].copy_(row, non_blocking=False)

    # ---- appending ----------------------------------------------------------------------------

    def plan_append(self, seqs: Sequence[int], counts: Sequence[int]) -> AppendPlan:
        """The metadata of appending counts[i] tokens to sequence seqs[i] (distinct live
        sequences), reusable step after step."""
        seqs, counts = list(seqs), list(counts)
        if not seqs or len(seqs) != len(counts):
            raise ValueError(f"seqs, counts: expected two non-empty lists of equal length, got {len(seqs)} and "
                             f"{len(counts)}")
        for s in seqs:
            self._check_seq(s)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs: a sequence appears twice: {seqs}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
            raise ValueError(f"counts: expected non-negative ints, got {counts}")
        return AppendPlan(self, seqs, counts)

    def begin(self, plan: AppendPlan) -> None:
        """Host side of one execution of `plan` (call it before the step's appends, eager or a graph
        replay): checks capacity, takes the pages the step's codes need, advances the host lengths.
        On error nothing changes."""
        if plan.generation != self._generation:
            raise ValueError("plan: a sequence was added, forked or freed since this plan was made; plan again")
        before = {seq: self._state[seq] for seq in plan.seqs}
        if self.keeps_tokens:
            budget = self.quantizer.config.kept_budget
            states = [advance_keeping(before[seq], n, self.sink_tokens, self.residual, budget)
                      for seq, n in zip(plan.seqs, plan.counts)]
        else:
            states = advance(torch.tensor([before[seq] for seq in plan.seqs]), torch.tensor(plan.counts),
                             self.sink_tokens, self.residual).tolist()
        new_states, needed = {}, 0
        for seq, state in zip(plan.seqs, states):
            state = tuple(state)
            if sum(state) > self.max_tokens_per_seq:
                raise ValueError(f"begin: sequence {seq} would hold {sum(state)} tokens, more than "
                                 f"max_tokens_per_seq={self.max_tokens_per_seq}; the cache is unchanged")
            # kept tokens: the page of the next code too (a kept-token step writes that row)
            pages = state[1] // self.page_size + 1 if self.keeps_tokens else -(-state[1] // self.page_size)
            needed += max(pages - len(self._pages_of[seq]), 0)
            new_states[seq] = (state, pages)
        if needed > len(self._free_pages):
            raise ValueError(f"begin: the step needs {needed} new pages, {len(self._free_pages)} are free; free "
                             "sequences or make a larger pool; the cache is unchanged")
        for seq, (state, pages) in new_states.items():
            grew = pages > len(self._pages_of[seq])
            while len(self._pages_of[seq]) < pages:
                self._pages_of[seq].append(self._take_page())
            if grew:
                self._write_table(seq)
            self._state[seq] = state
        plan.pending = frozenset(self.layers)
        plan.before = before
        plan.kept_step = self.keeps_tokens and self.kept_capacity > 0 and all(n == 1 for n in plan.counts)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, plan: AppendPlan) -> None:
        """Appends the step's tokens to `layer`: keys, values [plan.num_rows, Hkv, D] (sequence i's
        tokens at rows indptr[i]..indptr[i+1], in order; head_dim contiguous), post-RoPE, the
        cache's dtype. One kernel; lengths advance on the device."""
        if layer not in self._lengths:
            raise ValueError(f"layer: {layer!r} is not a layer of this cache ({self.layers})")
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing and layer not in plan.pending:
            raise ValueError(f"append: call cache.begin(plan) before this step's appends (layer {layer} was "
                             "appended already, or the step was not begun)")
        for name, t in (("keys", keys), ("values", values)):
            _check_tensor(t, name)
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(f"{name}: expected {self.dtype} on {self.device}, got {t.dtype} on {t.device}")
            if tuple(t.shape) != (plan.num_rows, self.num_kv_heads, self.head_dim):
                raise ValueError(f"{name}: expected [{plan.num_rows}, {self.num_kv_heads}, {self.head_dim}] (the "
                                 f"plan's tokens), got {list(t.shape)}")
            check_finite_on_cpu(name, t)
        keys, values = keys.detach(), values.detach()
        if self.keeps_tokens:
            if plan.kept_step:
                self._step_keeping(layer, keys, values, plan)
            elif capturing:
                raise ValueError("append: with kept tokens, a CUDA graph can capture only a step of one token per "
                                 "sequence; run this step eagerly")
            else:
                self._append_keeping(layer, keys, values, plan)
        else:
            self._append_tokens(layer, keys, values, plan)
        if not capturing:
            plan.pending = plan.pending - {layer}

    def _append_tokens(self, layer: int, keys: torch.Tensor, values: torch.Tensor, plan: AppendPlan) -> None:
        p, cfg = self.quantizer.layers[layer], self.quantizer.config
        with _device_guard(keys):
            _C.append_tokens(keys, values, plan.seq_slots, plan.indptr, plan.max_new_tokens,
                             self._key_pages[layer], self._value_pages[layer], self._page_table,
                             self._lengths[layer], self._sink_k[layer], self._sink_v[layer], self._ring_k[layer],
                             self._ring_v[layer], p["key_codebook"], p["value_codebook"], p["key_scale"],
                             p["key_mean"], p["value_mean"], cfg.hadamard, self._arrivals, _stream(keys))

    def _encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor, seq_slots: torch.Tensor,
                indptr: torch.Tensor, max_new_tokens: int, lengths: torch.Tensor) -> None:
        """The append kernel with no sinks and no window: sequence i's rows [indptr[i], indptr[i + 1])
        of keys, values [rows, Hkv, D] straight to its code rows from lengths[seq_slots[i]][1] on
        (lengths: int32 [max_seqs, 3] on the device, (0, coded, 0) in the batch's rows; written)."""
        p, cfg = self.quantizer.layers[layer], self.quantizer.config
        none = self._no_rows
        with _device_guard(keys):
            _C.append_tokens(keys, values, seq_slots, indptr, max_new_tokens, self._key_pages[layer],
                             self._value_pages[layer], self._page_table, lengths, none, none, none, none,
                             p["key_codebook"], p["value_codebook"], p["key_scale"], p["key_mean"], p["value_mean"],
                             cfg.hadamard, self._arrivals, _stream(keys))

    def _step_keeping(self, layer: int, keys: torch.Tensor, values: torch.Tensor, plan: AppendPlan) -> None:
        """A kept-token decode step (plan.kept_step): the step kernel, then the append kernel encoding
        the token each sequence leaves out (a sequence still filling its sinks or window writes its
        token to its next code row, unread); device work only."""
        cfg, lengths = self.quantizer.config, self._lengths[layer]
        keys, values = keys.contiguous(), values.contiguous()
        plan.next_lengths.copy_(lengths)  # the kernel writes the batch's rows
        with _device_guard(keys):
            _C.kept_step(keys, values, self._sink_k[layer], self._sink_v[layer], self._ring_k[layer],
                         self._ring_v[layer], self._window_scores[layer], self._kept_scores[layer],
                         self._kept_positions[layer], None, self.max_pages_per_seq * self.page_size, lengths,
                         plan.seq_slots, self.sink_tokens, cfg.keep_fraction, cfg.keep_tokens, plan.encode_k,
                         plan.encode_v, plan.next_lengths, plan.encode_lengths, _stream(keys))
        self._encode(layer, plan.encode_k, plan.encode_v, plan.seq_slots, plan.indptr, 1, plan.encode_lengths)
        lengths.copy_(plan.next_lengths)

    def _append_keeping(self, layer: int, keys: torch.Tensor, values: torch.Tensor, plan: AppendPlan) -> None:
        """Any other append with kept tokens: vecinfer.keeping's rule per sequence, from the lengths
        before the step; the tokens leaving for the codes encoded in one call of the append kernel,
        then the buffers written."""
        cfg = self.quantizer.config
        writes, encoded, after = [], [], []
        for i, (seq, n) in enumerate(zip(plan.seqs, plan.counts)):
            buf = SequenceBuffers(self._sink_k[layer][seq], self._sink_v[layer][seq], self._ring_k[layer][seq],
                                  self._ring_v[layer][seq], self._window_scores[layer][seq],
                                  self._kept_scores[layer][seq], self._kept_positions[layer][seq])
            rows = slice(plan.host_indptr[i], plan.host_indptr[i] + n)
            w, state, encode = plan_keeping(buf, plan.before[seq], keys[rows].transpose(0, 1),
                                            values[rows].transpose(0, 1), self.sink_tokens, self.residual,
                                            cfg.kept_budget)
            writes += w
            after.append(state)
            if encode is not None:
                encoded.append((i, encode))
        if encoded:
            counts = [0] * len(plan.seqs)
            lengths = torch.zeros((self.max_seqs, 3), dtype=torch.int32)
            for i, e in encoded:
                counts[i] = e.keys.shape[0]
                lengths[plan.seqs[i], 1] = e.coded
            indptr = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32, device=self.device)
            self._encode(layer, torch.cat([e.keys for _, e in encoded]), torch.cat([e.values for _, e in encoded]),
                         plan.seq_slots, indptr, max(counts), lengths.to(self.device))
        apply_writes(writes)
        self._lengths[layer][plan.seq_slots.long()] = torch.tensor(after, dtype=torch.int32).to(self.device)

    # ---- attention ----------------------------------------------------------------------------

    def plan_attention(self, seqs: Sequence[int], num_q_heads: int, num_queries: Union[int, Sequence[int]] = 1,
                       max_tokens: Optional[int] = None, scale: Optional[float] = None) -> AttentionPlan:
        """A decode plan for the sequences `seqs` (q's batch order): split-KV schedule and workspace
        for up to `max_tokens` tokens per sequence (default max_tokens_per_seq; a plan stays valid as
        sequences grow up to it, e.g. across graph replays). num_queries: the queries of every
        sequence (q [B, Hq, Tq, D]), or one count per sequence (ragged, e.g. a chunked prefill of
        several requests: q packed [sum, Hq, D]; on a GPU the long-query kernel runs)."""
        seqs = list(seqs)
        if not seqs:
            raise ValueError("seqs: expected at least one sequence")
        for s in seqs:
            self._check_seq(s)
        _positive_int("num_q_heads", num_q_heads)
        ragged = not isinstance(num_queries, int)
        if ragged:
            counts = list(num_queries)
            if len(counts) != len(seqs) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                   for c in counts) or not any(counts):
                raise ValueError(f"num_queries: expected an int or one count >= 0 per sequence ({len(seqs)}), "
                                 f"not all zero; got {num_queries!r}")
        else:
            counts = [_positive_int("num_queries", num_queries)] * len(seqs)
        if self.keeps_tokens and max(counts) > self.residual:
            raise ValueError(f"num_queries: {max(counts)} queries for one sequence; with kept tokens the attention is "
                             f"exact for queries within the recent window, at most residual={self.residual} (append "
                             "and attend a longer prompt in chunks of at most that many tokens)")
        if num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads: {num_q_heads} is not a multiple of the {self.num_kv_heads} KV heads")
        short = [s for s, c in zip(seqs, counts) if self.length(s) < c]
        if short:
            raise ValueError(f"num_queries: {num_queries} queries, but sequences {short} hold fewer tokens")
        most = self.max_tokens_per_seq if max_tokens is None else _positive_int("max_tokens", max_tokens)
        max_coded = min(self.max_pages_per_seq * self.page_size, max(most - self.sink_tokens, 0))
        return AttentionPlan(self, seqs, num_q_heads, counts, max_coded, scale, ragged)

    def nbytes(self) -> int:
        """Bytes the cache holds on its device (pools, windows, sinks, tables) and the quantizer's tables."""
        held = sum(t.numel() * t.element_size()
                   for group in [self._key_pages, self._value_pages] + self._per_sequence_buffers()
                   for t in group.values())
        return held + self._page_table.numel() * 4 + self.quantizer.parameter_bytes()
