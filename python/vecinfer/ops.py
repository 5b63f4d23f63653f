"""The transform and codec ops on torch tensors.

CPU tensors run the C++ reference implementations, CUDA tensors the kernels, on the current CUDA
stream of the tensor's device. Inputs are validated before any memory is touched: a wrong dtype
raises TypeError, a wrong shape, device, layout or codebook raises ValueError naming the argument.

Shapes: element tensors are [..., heads, tokens, head_dim] with head_dim 64, 128 or 256 and dtype
float32, float16 or bfloat16. Scale and mean tables are float32 [num_kv_heads, head_dim]; head h of
the input uses row h // (heads // num_kv_heads) (GQA: query heads share their KV head's row).
Codebooks are float32 [num_codebooks, 2**code_bits, sub_dim]: one per layer (num_codebooks = 1)
or one per KV head. Codes are uint8 [..., heads, tokens, code_row_bytes], bit-packed (see
cpp/include/vecinfer/types.h for the exact layout).

Tensors must be CPU or CUDA tensors and not lazily negated or conjugated views (torch._neg_view,
.conj(): DLPack would drop the flag), and an `out` must not require grad (the ops write it outside
autograd); ints must be Python ints (not bools) that fit in 64 bits. An output is allocated only
after its input is validated and its size checked against the device's memory (ValueError). On
the CPU, scales must be finite and > 0, means and codebooks finite, and vq_encode's input finite
(ValueError otherwise). On CUDA the same values are checked here, by the transform and codec ops,
with one reduction and host synchronisation per call (skipped while a CUDA graph is captured);
the decode attention and the caches' appends do not check them (they must not synchronise): they
rely on valid tables (KVQuantizer checks its own) and finite inputs.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Optional

import torch

from . import _C

Tensor = torch.Tensor

_KEY, _QUERY, _KEY_INVERSE = 0, 1, 2


def _check_tensor(value, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: tensors must be on the CPU or a CUDA device, got {value.device}")
    if value.is_neg() or value.is_conj():
        raise ValueError(f"{name}: a lazily negated or conjugated view; call .resolve_neg() / .resolve_conj()")


def _check_out(out: Optional[Tensor]) -> None:
    _check_tensor(out, "out", optional=True)
    if out is not None and out.requires_grad:
        raise ValueError("out: requires grad; the ops write it outside autograd (pass a tensor that does not)")


def _check_int(value, name: str) -> int:
    """A Python int (not a bool) that fits in int64: what the compiled core takes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name}: {value} does not fit in 64 bits")
    return value


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    return float(value)


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_memory(nbytes: int, device, what: str) -> None:
    """ValueError, before allocating, when `what` needs more bytes than the device's total memory
    (instead of an allocator error or, where memory is overcommitted, an out-of-memory kill)."""
    device = torch.device(device)
    available = _device_memory(device)
    if nbytes > available:
        raise ValueError(f"{what}: needs {nbytes} bytes, more than the {device.type} device's memory "
                         f"({available} bytes)")


def _empty(shape, dtype: torch.dtype, device, what: str) -> Tensor:
    _check_memory(math.prod(shape) * dtype.itemsize, device, what)
    return torch.empty(shape, dtype=dtype, device=device)


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def code_row_bytes(head_dim: int, sub_dim: int, code_bits: int) -> int:
    """Bytes one row of head_dim elements takes as packed codes (head_dim/sub_dim codes of code_bits)."""
    n = _C.code_row_bytes(_check_int(head_dim, "head_dim"), _check_int(sub_dim, "sub_dim"),
                          _check_int(code_bits, "code_bits"))
    if n == 0:
        raise ValueError(
            f"unsupported code shape: head_dim={head_dim} (64/128/256), sub_dim={sub_dim} (2/4/8), "
            f"code_bits={code_bits} (4..12)")
    return n


def _check_values_on_cuda(x: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                          mean: Optional[Tensor] = None, codebook: Optional[Tensor] = None) -> None:
    """The value checks the C++ makes on the CPU, for CUDA tensors (non-empty contiguous ones: any
    other is refused by the binding next, before a reduction could allocate for an expanded view)."""
    if not any(t is not None and t.is_cuda for t in (x, scale, mean, codebook)):
        return
    if torch.cuda.is_current_stream_capturing():
        return

    def bad(t, positive=False):
        if t is None or not t.is_cuda or t.numel() == 0:
            return False
        if not t.is_contiguous() or not t.is_floating_point():
            return False
        return not bool(torch.isfinite(t).all()) or (positive and not bool((t > 0).all()))

    if bad(scale, positive=True):
        raise ValueError("scale: entries must be finite and > 0")
    if bad(mean):
        raise ValueError("mean: entries must be finite")
    if bad(codebook):
        raise ValueError("codebook: entries must be finite")
    if bad(x):
        raise ValueError("x: contains NaN or infinity; codes are not valid")


def _transform(x: Tensor, scale: Optional[Tensor], mean: Optional[Tensor], hadamard: bool, kind: int,
               out: Optional[Tensor]) -> Tensor:
    _check_tensor(x, "x")
    _check_tensor(scale, "scale", optional=True)
    _check_tensor(mean, "mean", optional=True)
    _check_out(out)
    if out is None:
        _C.check_elements(x, "x")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _check_values_on_cuda(scale=scale, mean=mean)
    with _device_guard(x):
        _C.transform(x.detach(), out.detach(), None if scale is None else scale.detach(),
                     None if mean is None else mean.detach(), bool(hadamard), kind, _stream(x))
    return out


def hadamard(x: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    """Orthonormal Walsh-Hadamard transform along the last dimension (its own inverse)."""
    return _transform(x, None, None, True, _KEY, out)


def transform_keys(k: Tensor, scale: Optional[Tensor] = None, mean: Optional[Tensor] = None, *,
                   hadamard: bool = True, out: Optional[Tensor] = None) -> Tensor:
    """Smoothing + rotation of keys: H((k - mean) / scale)."""
    return _transform(k, scale, mean, hadamard, _KEY, out)


def transform_queries(q: Tensor, scale: Optional[Tensor] = None, *, hadamard: bool = True,
                      out: Optional[Tensor] = None) -> Tensor:
    """The matching query transform H(q * scale): q'.k' = q.k - q.mean for every key."""
    return _transform(q, scale, None, hadamard, _QUERY, out)


def inverse_transform_keys(y: Tensor, scale: Optional[Tensor] = None, mean: Optional[Tensor] = None, *,
                           hadamard: bool = True, out: Optional[Tensor] = None) -> Tensor:
    """Undoes transform_keys: scale * H(y) + mean."""
    return _transform(y, scale, mean, hadamard, _KEY_INVERSE, out)


def vq_encode(x: Tensor, codebook: Tensor, *, scale: Optional[Tensor] = None, mean: Optional[Tensor] = None,
              hadamard: bool = False, out: Optional[Tensor] = None) -> Tensor:
    """Nearest-centroid codes of x, bit-packed: uint8 [..., code_row_bytes].

    With scale, mean or hadamard, x is first transformed as by transform_keys, in the same pass
    (raw post-RoPE keys in, codes out). Each sub-vector gets its nearest centroid in squared L2
    distance (the lowest index among equals).
    """
    _check_tensor(x, "x")
    _check_tensor(codebook, "codebook")
    _check_tensor(scale, "scale", optional=True)
    _check_tensor(mean, "mean", optional=True)
    _check_out(out)
    if out is None:
        _C.check_elements(x, "x")
        row_bytes = _row_bytes_for(x.shape[-1], codebook)
        out = torch.empty((*x.shape[:-1], row_bytes), dtype=torch.uint8, device=x.device)
    _check_values_on_cuda(x, scale, mean, codebook)
    with _device_guard(x):
        _C.vq_encode(x.detach(), out, codebook.detach(), None if scale is None else scale.detach(),
                     None if mean is None else mean.detach(), bool(hadamard), _stream(x))
    return out


def vq_decode(codes: Tensor, codebook: Tensor, *, head_dim: int, dtype: torch.dtype = torch.float16,
              scale: Optional[Tensor] = None, mean: Optional[Tensor] = None, hadamard: bool = False,
              out: Optional[Tensor] = None) -> Tensor:
    """Centroids of packed codes, [..., head_dim] of dtype; with scale, mean or hadamard the
    result is mapped back by inverse_transform_keys in the same pass."""
    _check_tensor(codes, "codes")
    _check_tensor(codebook, "codebook")
    _check_tensor(scale, "scale", optional=True)
    _check_tensor(mean, "mean", optional=True)
    _check_out(out)
    if out is None:
        if codes.dim() == 0:
            raise ValueError("codes: expected shape [..., code_row_bytes], got a scalar")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype: expected torch.float32, float16 or bfloat16, got {dtype}")
        shape = (*codes.shape[:-1], _check_int(head_dim, "head_dim"))
        out = _empty(shape, dtype, codes.device, f"head_dim: an output {list(shape)} of {dtype}")
    _check_values_on_cuda(scale=scale, mean=mean, codebook=codebook)
    with _device_guard(codes):
        _C.vq_decode(codes.detach(), out, codebook.detach(), None if scale is None else scale.detach(),
                     None if mean is None else mean.detach(), bool(hadamard), _stream(codes))
    return out


def _row_bytes_for(head_dim: int, codebook: Tensor) -> int:
    # Only sizes the output; the binding validates the codebook and reports a bad one precisely.
    if codebook.dim() != 3 or codebook.shape[1] < 1:
        raise ValueError(f"codebook: expected shape [num_codebooks, 2**code_bits, sub_dim], got {list(codebook.shape)}")
    code_bits = max(int(codebook.shape[1]) - 1, 0).bit_length()
    n = _C.code_row_bytes(head_dim, int(codebook.shape[2]), code_bits)
    return max(n, 1)


def snap_codebook(codebook: Tensor) -> Tensor:
    """The codebook [num_codebooks, 2**code_bits, sub_dim] on the 8-bit grid the CUDA kernel holds
    centroids on: per codebook and element position, with lo and hi the smallest and largest entry
    and step = (hi - lo) / 255, each entry becomes lo + step * round((x - lo) / step) (float32, on
    the codebook's device). Idempotent; KVQuantizer's codebooks are on the grid already."""
    _check_tensor(codebook, "codebook")
    if not codebook.is_floating_point():
        raise TypeError(f"codebook: expected a floating-point tensor, got {codebook.dtype}")
    if codebook.dim() != 3:
        raise ValueError(f"codebook: expected [num_codebooks, 2**code_bits, sub_dim], got {list(codebook.shape)}")
    snapped = codebook.detach().to("cpu", torch.float32).contiguous().clone()
    _C.snap_codebook(snapped)
    return snapped.to(codebook.device)


def unpack_codes(codes: Tensor, code_bits: int, num_codes: int) -> Tensor:
    """Packed codes uint8 [..., code_row_bytes] -> int64 centroid indices [..., num_codes]."""
    _check_tensor(codes, "codes")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes: expected a uint8 tensor, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[-1] * 8 < code_bits * num_codes:
        raise ValueError(f"codes: {num_codes} codes of {code_bits} bits do not fit rows of shape {list(codes.shape)}")
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    bits = ((codes[..., None] >> shifts) & 1).flatten(-2)[..., : num_codes * code_bits]
    weights = 1 << torch.arange(code_bits, device=codes.device, dtype=torch.int64)
    return (bits.reshape(*codes.shape[:-1], num_codes, code_bits).to(torch.int64) * weights).sum(-1)


def attention(q: Tensor, key_codes: Tensor, value_codes: Tensor, lengths: Tensor, key_codebook: Tensor,
              value_codebook: Tensor, *, sink_keys: Optional[Tensor] = None, sink_values: Optional[Tensor] = None,
              recent_keys: Optional[Tensor] = None, recent_values: Optional[Tensor] = None,
              key_scale: Optional[Tensor] = None, key_mean: Optional[Tensor] = None,
              value_mean: Optional[Tensor] = None, hadamard: bool = True, scale: Optional[float] = None,
              return_lse: bool = False, max_coded: Optional[int] = None, out: Optional[Tensor] = None,
              page_table: Optional[Tensor] = None, recent_ring: bool = False,
              query_indptr: Optional[Tensor] = None, max_queries: Optional[int] = None):
    """Attention of q [B, Hq, Tq, D] over a compressed cache, without dequantizing it to memory.

    Per sequence b, lengths[b] = (sinks, coded, recent) (int32 [B, 3]): positions [0, sinks) are
    sink_keys/values[b, :, :sinks] (full precision), the next `coded` positions are key_codes /
    value_codes[b, :, :coded] (uint8 [B, Hkv, capacity, code_row_bytes]; keys encoded after the
    transform (key_scale, key_mean, hadamard), values after subtracting value_mean), the last
    `recent` are recent_keys/values[b, :, :recent]. With `page_table` (int32 [B, max_pages]) the
    codes are paged instead: key_codes / value_codes are pools [num_pages, Hkv, page_size,
    code_row_bytes] (page_size a power of two >= 16) and coded token t of sequence b is row
    t % page_size of page page_table[b, t // page_size]; pages may be shared and in any order.
    With recent_ring the recent window is a ring (as PagedKVCache keeps it): recent token i of
    sequence b is row (coded + i) % recent_capacity of recent_keys/values[b].
    The Tq queries are the last Tq positions of each sequence, causal among themselves; query head
    h reads KV head h // (Hq // Hkv). Softmax scale 1/sqrt(D) unless given. Returns out [B, Hq, Tq,
    D] in q's dtype, and with return_lse the float32 log-sum-exp of the scaled scores [B, Hq, Tq]
    (to merge partial results exactly).

    CPU tensors run the double-precision reference; CUDA tensors (float16/bfloat16, codebooks of
    the bit presets) a fused kernel: for Tq <= 16 the decode kernel, which holds centroids on the
    8-bit grid of snap_codebook (codebooks made by KVQuantizer are on it already; others are rounded
    to it); for longer query blocks the long-query kernel (tensor-core tiles, centroids as given).
    `lengths` and `page_table` on the CPU are checked before the kernel runs; on the GPU the kernel
    clamps lengths to the capacities and page ids to the pools instead (no host synchronisation).
    max_coded, an upper bound of the coded lengths, sizes the split-KV plan (default: the code
    capacity). `out` may be given (q's shape and dtype).

    Ragged query blocks (sequences with different numbers of queries, as a chunked prefill of
    several sequences has them): q packed [total_queries, Hq, D] with query_indptr (int32 [B + 1],
    on q's device): the queries of sequence b are rows query_indptr[b]:query_indptr[b + 1] of q,
    the last positions of its sequence (a sequence may have none). out has q's shape, lse is
    [total_queries, Hq]. query_indptr is read on the host to check it and size the call (a
    synchronisation when it is on the GPU), unless it is on the GPU and max_queries (at least every
    sequence's count) is given: then nothing is read and the kernel clamps the counts to
    max_queries and the rows to q (as lengths are clamped), so the call can be captured in a CUDA
    graph. On CUDA every ragged call runs the long-query kernel.
    """
    for name, t in (("q", q), ("key_codes", key_codes), ("value_codes", value_codes), ("lengths", lengths),
                    ("key_codebook", key_codebook), ("value_codebook", value_codebook)):
        _check_tensor(t, name)
    for name, t in (("sink_keys", sink_keys), ("sink_values", sink_values), ("recent_keys", recent_keys),
                    ("recent_values", recent_values), ("key_scale", key_scale), ("key_mean", key_mean),
                    ("value_mean", value_mean), ("page_table", page_table)):
        _check_tensor(t, name, optional=True)
        if name.startswith(("sink", "recent")) and t is not None and t.dim() != 4:
            raise ValueError(f"{name}: expected [batch, num_kv_heads, tokens, head_dim], got {list(t.shape)}")
    _check_out(out)
    if key_codes.dim() != 4:
        raise ValueError(f"key_codes: expected a 4-D tensor [B, heads, tokens, bytes], got {list(key_codes.shape)}")
    if max_queries is not None and (_check_int(max_queries, "max_queries") < 1 or query_indptr is None):
        raise ValueError(f"max_queries: expected an int >= 1 with query_indptr, got {max_queries!r}"
                         f"{'' if query_indptr is not None else ' without query_indptr'}")
    counts = None  # the queries per sequence, when known on the host
    if query_indptr is None:
        if q.dim() != 4:
            raise ValueError(f"q: expected a 4-D tensor [B, heads, queries, head_dim], got {list(q.shape)}")
        b, num_queries = q.shape[0], q.shape[2]
    elif max_queries is not None and query_indptr.is_cuda:
        _check_indptr(query_indptr, q)
        b, num_queries = query_indptr.numel() - 1, max_queries
    else:
        counts = _query_counts(query_indptr, q)
        b, num_queries = counts.numel(), int(counts.max())
    hkv, d = key_codes.shape[1], q.shape[-1]
    if page_table is None and key_codes.shape[0] != b:  # before lengths is compared with b
        raise ValueError(f"key_codes: holds {key_codes.shape[0]} sequences, q {b}")

    # an absent part is an empty one: [B, Hkv, 0, D]
    parts = [torch.empty((b, hkv, 0, d), dtype=q.dtype, device=q.device) if t is None else t
             for t in (sink_keys, sink_values, recent_keys, recent_values)]
    if lengths.dtype != torch.int32:
        raise TypeError(f"lengths: expected an int32 tensor, got {lengths.dtype}")
    capacity = key_codes.shape[2]
    if page_table is not None:
        if page_table.dtype != torch.int32 or page_table.dim() != 2:
            raise TypeError(f"page_table: expected an int32 tensor [B, max_pages], got {page_table.dtype} "
                            f"{list(page_table.shape)}")
        capacity = page_table.shape[1] * key_codes.shape[2]
        if not page_table.is_cuda:
            if bool(((page_table < 0) | (page_table >= key_codes.shape[0])).any()):
                raise ValueError(f"page_table: page ids must be in [0, {key_codes.shape[0]}) (the pools' pages)")
            if q.is_cuda:
                page_table = page_table.to(q.device, non_blocking=True)
    if not lengths.is_cuda:
        if lengths.dim() != 2 or lengths.shape != (b, 3):
            raise ValueError(f"lengths: expected [{b}, 3] (sinks, coded, recent), got {list(lengths.shape)}")
        caps = torch.tensor([parts[0].shape[2], capacity, parts[2].shape[2]], dtype=torch.int32)
        if bool((lengths < 0).any()):
            raise ValueError("lengths: negative length")
        if bool((lengths > caps).any()):
            raise ValueError(f"lengths: a sequence holds more tokens than the buffers' capacity "
                             f"(sinks {caps[0]}, coded {caps[1]}, recent {caps[2]})")
        # every sequence holds its queries (ragged counts unread on the host: the kernel's clamps)
        queries = num_queries if query_indptr is None else counts if counts is not None else 0
        if bool((lengths.sum(1) < queries).any()):
            raise ValueError("lengths: a sequence holds fewer tokens than its queries")
        if max_coded is None:
            max_coded = int(lengths[:, 1].max())
        if q.is_cuda:
            lengths = lengths.to(q.device, non_blocking=True)
    if max_coded is None:
        max_coded = capacity
    max_coded = _check_int(max_coded, "max_coded")
    scale = 1.0 / d ** 0.5 if scale is None else _check_real(scale, "scale")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if return_lse else None
    args = [q.detach(), out, lse, key_codes.detach(), value_codes.detach(), lengths,
            *(t.detach() for t in parts), key_codebook.detach(), value_codebook.detach(),
            None if key_scale is None else key_scale.detach(), None if key_mean is None else key_mean.detach(),
            None if value_mean is None else value_mean.detach(), bool(hadamard), scale, max_coded,
            None if page_table is None else page_table.detach(), None, bool(recent_ring)]
    with _device_guard(q):
        workspace = None
        if q.is_cuda:
            # split-KV partial results; torch's caching allocator makes this cheap and stream-safe
            def shape(cb):  # (sub_dim, code_bits); a malformed codebook is reported by the binding
                return (int(cb.shape[2]), max(int(cb.shape[1]) - 1, 0).bit_length()) if cb.dim() == 3 else (0, 0)

            # sink and recent rows (a malformed part is reported by the binding)
            fp_capacity = sum(int(t.shape[2]) if t.dim() == 4 else 0 for t in (parts[0], parts[2]))
            nbytes = _C.attention_workspace_bytes(b, q.shape[1], hkv, num_queries, d,
                                                  *shape(key_codebook), *shape(value_codebook), max_coded,
                                                  fp_capacity, query_indptr is not None)
            workspace = torch.empty(max(nbytes, 16), dtype=torch.uint8, device=q.device)
        _C.attention(*args, workspace, _stream(q), None if query_indptr is None else query_indptr.detach(),
                     num_queries)
    return (out, lse) if return_lse else out


def _check_indptr(query_indptr: Tensor, q: Tensor) -> None:
    """query_indptr's type, shape and device against the packed q [total_queries, Hq, D]."""
    _check_tensor(query_indptr, "query_indptr")
    if q.dim() != 3:
        raise ValueError(f"q: with query_indptr expected packed [total_queries, heads, head_dim], got {list(q.shape)}")
    if query_indptr.dtype != torch.int32 or query_indptr.dim() != 1 or query_indptr.numel() < 2:
        raise ValueError(f"query_indptr: expected an int32 tensor [B + 1] (B >= 1), got {query_indptr.dtype} "
                         f"{list(query_indptr.shape)}")
    if query_indptr.device != q.device:
        raise ValueError(f"query_indptr: must be on q's device ({q.device}), got {query_indptr.device}")
    if q.shape[0] < 1:
        raise ValueError("q: holds no queries")


def _query_counts(query_indptr: Tensor, q: Tensor) -> Tensor:
    """The queries per sequence (int64, on the CPU) of a ragged call, after checking query_indptr
    against the packed q [total_queries, Hq, D]."""
    _check_indptr(query_indptr, q)
    indptr = query_indptr.cpu().long()
    counts = indptr[1:] - indptr[:-1]
    if int(indptr[0]) != 0 or int(indptr[-1]) != q.shape[0] or bool((counts < 0).any()):
        raise ValueError(f"query_indptr: must rise from 0 to {q.shape[0]} (the rows of q), never falling; got "
                         f"{indptr.tolist()[:8]}{' ...' if indptr.numel() > 8 else ''}")
    return counts


def merge_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor):
    """Attention over the union of two disjoint sets of keys, from the attention over each:
    out_* [..., D] with lse_* [...] (float32, natural-log log-sum-exp of the scaled scores, as
    vecinfer.attention(return_lse=True) gives them). Returns (out, lse): out in out_a's dtype, lse
    float32. A side with lse = -inf (no keys) contributes nothing; both empty give out 0, lse -inf.
    Computed in float32; exact up to rounding (cascade / shared-prefix attention)."""
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        _check_tensor(t, name)
    if out_a.shape != out_b.shape or out_a.dtype != out_b.dtype or out_a.device != out_b.device:
        raise ValueError(f"out_a, out_b: expected the same shape, dtype and device, got {list(out_a.shape)} "
                         f"{out_a.dtype} {out_a.device} and {list(out_b.shape)} {out_b.dtype} {out_b.device}")
    if not out_a.is_floating_point():
        raise TypeError(f"out_a, out_b: expected floating-point tensors, got {out_a.dtype}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected a float32 tensor, got {t.dtype}")
        if out_a.dim() == 0 or t.shape != out_a.shape[:-1] or t.device != out_a.device:
            raise ValueError(f"{name}: expected shape {list(out_a.shape[:-1])} on {out_a.device} (out's shape "
                             f"without its last dimension), got {list(t.shape)} on {t.device}")
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a.float() * (wa / safe)[..., None] + out_b.float() * (wb / safe)[..., None]).to(out_a.dtype)
    return out, m + torch.log(total)
