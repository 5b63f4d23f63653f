"""vecinfer.attention as a torch custom operator (`torch.ops.vecinfer.attention`), with a fake
implementation, so that a decode step calling it can be traced by torch.compile (fullgraph) and
captured in a CUDA graph. For graph capture pass `lengths` on the GPU and `max_coded` (then no
host synchronisation happens inside the call). It returns (out, lse), lse the float32 log-sum-exp
of the scaled scores [B, Hq, Tq], so an engine can merge the result with its own attention over
other keys (vecinfer.merge_states)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import ops


@torch.library.custom_op("vecinfer::attention", mutates_args=())
def attention(q: torch.Tensor, key_codes: torch.Tensor, value_codes: torch.Tensor, lengths: torch.Tensor,
              key_codebook: torch.Tensor, value_codebook: torch.Tensor, sink_keys: torch.Tensor,
              sink_values: torch.Tensor, recent_keys: torch.Tensor, recent_values: torch.Tensor,
              key_scale: Optional[torch.Tensor], key_mean: Optional[torch.Tensor],
              value_mean: Optional[torch.Tensor], hadamard: bool, scale: float,
              max_coded: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """See vecinfer.attention; every argument explicit (the custom-op schema has no defaults)."""
    return ops.attention(q, key_codes, value_codes, lengths, key_codebook, value_codebook, sink_keys=sink_keys,
                         sink_values=sink_values, recent_keys=recent_keys, recent_values=recent_values,
                         key_scale=key_scale, key_mean=key_mean, value_mean=value_mean, hadamard=hadamard,
                         scale=scale, max_coded=max_coded, return_lse=True)


@attention.register_fake
def _attention_fake(q, key_codes, value_codes, lengths, key_codebook, value_codebook, sink_keys, sink_values,
                    recent_keys, recent_values, key_scale, key_mean, value_mean, hadamard, scale, max_coded):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty(q.shape[:3], dtype=torch.float32, device=q.device))


@torch.library.custom_op("vecinfer::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor, lengths: torch.Tensor,
                    key_codebook: torch.Tensor, value_codebook: torch.Tensor, sink_keys: torch.Tensor,
                    sink_values: torch.Tensor, recent_keys: torch.Tensor, recent_values: torch.Tensor,
                    key_scale: Optional[torch.Tensor], key_mean: Optional[torch.Tensor],
                    value_mean: Optional[torch.Tensor], hadamard: bool, scale: float, max_coded: int,
                    page_table: torch.Tensor, recent_ring: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """vecinfer.attention on paged codes with the recent window a ring (the layout of PagedKVCache
    and QuantizedKVCache) or, recent_ring=False, in order (QuantizedKVCache with kept tokens),
    returning (out, lse)."""
    return ops.attention(q, key_pages, value_pages, lengths, key_codebook, value_codebook, sink_keys=sink_keys,
                         sink_values=sink_values, recent_keys=recent_keys, recent_values=recent_values,
                         key_scale=key_scale, key_mean=key_mean, value_mean=value_mean, hadamard=hadamard,
                         scale=scale, max_coded=max_coded, return_lse=True, page_table=page_table,
                         recent_ring=recent_ring)


@paged_attention.register_fake
def _paged_attention_fake(q, key_pages, value_pages, lengths, key_codebook, value_codebook, sink_keys, sink_values,
                          recent_keys, recent_values, key_scale, key_mean, value_mean, hadamard, scale, max_coded,
                          page_table, recent_ring=True):
    return _attention_fake(q, key_pages, value_pages, lengths, key_codebook, value_codebook, sink_keys, sink_values,
                           recent_keys, recent_values, key_scale, key_mean, value_mean, hadamard, scale, max_coded)
