"""Kept tokens (VQConfig.keep_fraction, keep_tokens): the rule both caches follow when tokens are
appended to a sequence whose compressed part keeps some tokens in full precision.

One sequence's state is its lengths (sinks + kept, coded, recent) and its buffers:
  sink keys / values      [Hkv, sinks + kept_capacity, D]: the sinks, then the kept tokens (any order)
  window keys / values    [Hkv, residual, D]: the recent window in order (row i is window token i)
  window scores           [residual]: each window token's key novelty, computed as it entered
  kept scores, positions  [kept_capacity]: each kept token's novelty and position
The first tokens fill the sinks; the others enter the window, each scored by its key novelty
against the `residual` keys before it; the tokens pushed out of the window join the kept ones,
the kept_budget(E) highest scores stay (E: the tokens that have left the window so far; the lowest
row, then the earliest candidate, loses ties) and the rest are encoded, into the next code rows.
The batched decode step of cpp/include/vecinfer/kept.h applies the same rule to one token.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch


def key_novelty(before: torch.Tensor, new: torch.Tensor, window: int) -> torch.Tensor:
    """[..., m] float32: the key novelty of each of m new keys [..., Hkv, m, D] whose predecessors
    are `before` [..., Hkv, P, D] (the keys just before them, in order): summed over the KV heads,
    ||k - mu||^2 / ||k||^2 with mu the mean of the `window` keys before k; 0 for a key with none
    before it."""
    # [..., Hkv, D, P + m]: the running sums run along the last, contiguous dimension (a scan along
    # an outer one is a serial loop per column on GPUs: ~3 ms for 8,192 keys of 8 x 128)
    x = torch.cat([before, new], -2).float().transpose(-1, -2).contiguous()
    p, m = before.shape[-2], new.shape[-2]
    sums = torch.nn.functional.pad(x.cumsum(-1), (1, 0))  # sums[..., i]: keys [0, i)
    j = torch.arange(p, p + m, device=x.device)
    first = (j - window).clamp(min=0)
    count = j - first
    mean = (sums[..., j] - sums[..., first]) / count.clamp(min=1).float()
    k = x[..., p:]
    score = (((k - mean) ** 2).sum(-2) / (k ** 2).sum(-2).clamp(min=1e-12)).sum(-2)
    return torch.where(count > 0, score, torch.zeros_like(score))


def advance_keeping(state: Tuple[int, int, int], new: int, sinks: int, residual: int,
                    kept_budget: Callable[[int], int]) -> Tuple[int, int, int]:
    """The lengths (sinks + kept, coded, recent) of a sequence after appending `new` tokens."""
    s_len, c, r = state
    s = min(s_len, sinks)
    kept, to_sink = s_len - s, min(sinks - s, new)
    window_end = r + new - to_sink
    out = max(0, window_end - residual)
    if out:
        left = kept + c + out
        kept, c = kept_budget(left), left - kept_budget(left)
    return s + to_sink + kept, c, window_end - out


class SequenceBuffers(NamedTuple):
    """One sequence's views of one layer's buffers (see the module docstring)."""
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    window_k: torch.Tensor
    window_v: torch.Tensor
    window_scores: torch.Tensor
    kept_scores: torch.Tensor
    kept_positions: torch.Tensor


class Encode(NamedTuple):
    """Tokens a keeping append encodes, in this order, into code rows [coded, coded + n)."""
    coded: int
    keys: torch.Tensor       # [n, Hkv, D]
    values: torch.Tensor
    positions: torch.Tensor  # [n] int32


def plan_keeping(buf: SequenceBuffers, state: Tuple[int, int, int], xk: torch.Tensor, xv: torch.Tensor, sinks: int,
                 residual: int, kept_budget: Callable[[int], int]
                 ) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], Tuple[int, int, int], Optional[Encode]]:
    """Appending the tokens xk, xv [Hkv, n, D] to a sequence in `state`: (writes, new state,
    encode). Nothing is written here: `writes` are (destination view, source) pairs to copy once
    `encode` (None when nothing leaves for the codes) has been encoded."""
    S, W = sinks, residual
    s_len, c, r = state
    s = min(s_len, S)
    kept, to_sink = s_len - s, min(S - s, xk.shape[1])
    left = c + kept  # tokens that have left the window
    writes = [(buf.sink_k[:, s:s + to_sink], xk[:, :to_sink]), (buf.sink_v[:, s:s + to_sink], xv[:, :to_sink])]
    encode = None
    nk, nv = xk[:, to_sink:], xv[:, to_sink:]
    m = nk.shape[1]
    if m:
        # the keys before the new ones: the window, and the sinks while no token has left it
        before = buf.window_k[:, :r] if left else torch.cat([buf.sink_k[:, :s], xk[:, :to_sink], buf.window_k[:, :r]], 1)
        window_k, window_v = torch.cat([buf.window_k[:, :r], nk], 1), torch.cat([buf.window_v[:, :r], nv], 1)
        scores = torch.cat([buf.window_scores[:r], key_novelty(before[:, -W:], nk, W)])
        out = max(0, r + m - W)  # tokens pushed out of the window
        new_r = r + m - out
        writes += [(buf.window_k[:, :new_r], window_k[:, out:]), (buf.window_v[:, :new_r], window_v[:, out:]),
                   (buf.window_scores[:new_r], scores[out:])]
        if out:
            budget = kept_budget(left + out)
            cand_k = torch.cat([buf.sink_k[:, S:S + kept], window_k[:, :out]], 1)
            cand_v = torch.cat([buf.sink_v[:, S:S + kept], window_v[:, :out]], 1)
            cand_s = torch.cat([buf.kept_scores[:kept], scores[:out]])
            cand_p = torch.cat([buf.kept_positions[:kept],
                                torch.arange(S + left, S + left + out, dtype=torch.int32, device=xk.device)])
            order = torch.sort(cand_s, descending=True, stable=True).indices
            stay, go = order[:budget], order[budget:]
            writes += [(buf.sink_k[:, S:S + budget], cand_k[:, stay]), (buf.sink_v[:, S:S + budget], cand_v[:, stay]),
                       (buf.kept_scores[:budget], cand_s[stay]), (buf.kept_positions[:budget], cand_p[stay])]
            if len(go):
                encode = Encode(c, cand_k[:, go].transpose(0, 1), cand_v[:, go].transpose(0, 1), cand_p[go])
    return writes, advance_keeping(state, xk.shape[1], sinks, residual, kept_budget), encode


def apply_writes(writes: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    for destination, source in writes:
        destination.copy_(source)
