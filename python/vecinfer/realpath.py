"""Quality through the path users run: a real model, a real KV cache object, streaming decode.

Every method is a transformers Cache that the model is run with, token blocks fed one after
another, as generation feeds them:
  - "fp": transformers' DynamicCache (full precision);
  - a vecinfer method (a `vecinfer.quantizer.METHOD_OVERRIDES` name: the default "vecinfer" and
    the levers "vecinfer+head", "vecinfer+k3v1", ...): `VecInferCache` with a calibrated
    quantizer: a prompt is attended in full precision and encoded, then every block of `block`
    tokens is appended (tokens leaving the recent window are encoded once) and attends to the
    codes through `QuantizedKVCache.attend` (on a GPU the fused kernel; on the CPU its reference);
    "<method>+keep-novel-<percent>[-<tokens>]" keeps that percent of the compressed tokens, and at
    least <tokens>, in full precision in the cache, chosen by key novelty (VQConfig.keep_fraction,
    keep_tokens);
  - a transformers QuantizedCache backend (`BASELINES`: "fp8", "quanto-int2", "quanto-int4",
    "hqq-int2", "hqq-int4"), with transformers' defaults (recent window of 128 tokens);
  - the fake-quantization proxy of a vecinfer method (`proxy_factory`, evaluate.py's attention),
    optionally with full-precision outlier tokens (`OutlierTokens`, a lever the kernel lacks) or
    a fixed budget of full-precision tokens chosen by a score as they leave the window
    (`KeptTokens`, "proxy:<method>+keep-<rule>-<percent>[-<tokens>]", e.g.
    "proxy:vecinfer+keep-novel-1"; <tokens>: a floor on the budget, "keep-novel-0-64" keeps 64).

- `stream(model, ids, cache, prefill, block)`: feeds ids through the cache; returns the summed
  negative log-likelihood of every next token after the first and the last position's logits.
- `perplexity(model, ids, make_cache, window, prefill, block)`: windows of `window` tokens, each a
  fresh cache.
- `retrieval(model, tok, methods, context_tokens, trials, task)`: passkey ("passkey") or several
  keys with one asked ("multikey"), at `trials` depths spread over the context, each with its own
  random key; the document is prefilled once per trial, each method's cache made from it, then the
  question and the greedy answer are decoded against each method's cache.
- `eval_real(...)`: the real path of `vecinfer eval`.
"""
from __future__ import annotations

import contextlib
import heapq
import math
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .evaluate import _device

# transformers QuantizedCache backends: name -> (backend, nbits); fp8 takes no nbits
BASELINES = {"fp8": ("fp8", None), "quanto-int2": ("quanto", 2), "quanto-int4": ("quanto", 4),
             "hqq-int2": ("hqq", 2), "hqq-int4": ("hqq", 4)}
_BACKEND_PACKAGES = {"quanto": "optimum-quanto", "hqq": "hqq"}

# the classic passkey prompt (Mohtashami & Jaggi, 2023): a task line, repeated filler, the key
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
# several facts, one asked: each a name and its own key
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry")
MULTIKEY_LINE = "The pass key of {name} is {key}. Remember it. "
MULTIKEY_QUESTION = "\nWhat is the pass key of {name}? The pass key of {name} is"
TASKS = ("passkey", "multikey")


def baseline_available(name: str) -> Optional[str]:
    """None when the transformers QuantizedCache backend `name` can run here, else why not."""
    if name not in BASELINES:
        return f"unknown baseline {name!r} (known: {sorted(BASELINES)})"
    backend = BASELINES[name][0]
    if backend == "fp8":  # transformers' own: its fp8 layer exists in the releases that have the backend
        import transformers.cache_utils

        if not hasattr(transformers.cache_utils, "Fp8QuantizedLayer"):
            return f"{name} needs a transformers release with the fp8 QuantizedCache backend (this is {transformers.__version__})"
        return None
    module = {"quanto": "optimum.quanto", "hqq": "hqq"}.get(backend)
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return (f"{name} needs the {_BACKEND_PACKAGES[backend]} package (pip install {_BACKEND_PACKAGES[backend]}, or "
                'the "baselines" extra of vecinfer)')
    return None


def cache_factory(method: str, model, quantizer=None) -> Callable[..., object]:
    """A function `make(prefilled=None)` for `method` ("fp", a BASELINES name, or any other name
    with `quantizer`: a VecInferCache): a fresh cache, or, given a DynamicCache that a forward pass
    over a prompt filled, a cache holding that prompt as the method stores a prompt it was
    prefilled with (the prompt's attention itself is full precision for every method)."""
    from transformers import DynamicCache

    from .hf import _cache_layer_kv, _num_cache_layers

    def layers(prefilled):
        return [_cache_layer_kv(prefilled, i) for i in range(_num_cache_layers(prefilled))]

    if method == "fp":
        def make_fp(prefilled=None):
            cache = DynamicCache()
            for i, (k, v) in enumerate(layers(prefilled) if prefilled is not None else []):
                cache.update(k.clone(), v.clone(), i)
            return cache
        return make_fp
    if method in BASELINES:
        from transformers.cache_utils import QuantizedCache

        why = baseline_available(method)
        if why is not None:
            raise RuntimeError(why)
        backend, nbits = BASELINES[method]
        kwargs = {} if nbits is None else {"nbits": nbits}

        def make_baseline(prefilled=None):
            cache = QuantizedCache(backend=backend, config=model.config, **kwargs)
            for i, (k, v) in enumerate(layers(prefilled) if prefilled is not None else []):
                cache.update(k.clone(), v.clone(), i)  # a prompt's update: quantized once, returned as is
            return cache
        return make_baseline
    if quantizer is None:
        raise ValueError(f"method {method!r}: a vecinfer method needs a calibrated quantizer")
    from .hf_cache import VecInferCache

    def make_vecinfer(prefilled=None):
        if prefilled is None:
            return VecInferCache(model, quantizer)
        return VecInferCache.from_cache(model, quantizer, prefilled)
    return make_vecinfer


class OutlierTokens:
    """The fake-quantization proxy of a lever the decode kernel does not have: tokens whose key
    encoding error is large kept in full precision, chosen as they are encoded.

    Wraps a KVQuantizer for `vecinfer.evaluate` (fake_quantize, config): a token of layer l (all
    its KV heads) stays exact when the squared error of its keys, summed over heads, is above the
    layer's threshold: the (1 - fraction) quantile of that error over the calibration keys. Its
    codes would not be read; storing it costs 16 bits per element for about `fraction` of the tokens."""

    def __init__(self, quantizer, keys: Sequence[torch.Tensor], fraction: float = 0.01):
        if not 0 < fraction < 1:
            raise ValueError(f"fraction: expected a number in (0, 1), got {fraction!r}")
        self.inner, self.config, self.fraction = quantizer, quantizer.config, fraction
        self.thresholds = []
        for layer, k in enumerate(keys):  # [Hkv, N, D]
            err = self._key_error(layer, k[None].float())[0]
            self.thresholds.append(float(torch.quantile(err, 1.0 - fraction)))
        self.kept = self.seen = 0

    def _key_error(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        k_hat = self.inner.decode_keys(layer, self.inner.encode_keys(layer, k.contiguous()), k.dtype)
        return ((k - k_hat).float() ** 2).sum(dim=(1, 3))  # [B, T]

    def fake_quantize(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k_hat, v_hat = self.inner.fake_quantize(layer, k, v)
        keep = (((k - k_hat).float() ** 2).sum(dim=(1, 3)) > self.thresholds[layer])[:, None, :, None]  # [B, 1, T, 1]
        self.kept += int(keep.sum())
        self.seen += keep.numel()
        return torch.where(keep, k, k_hat), torch.where(keep, v, v_hat)

    def bits_per_element(self) -> float:
        return (1 - self.fraction) * self.inner.bits_per_element() + self.fraction * 16


KEEP_RULES = ("kerr", "verr", "novel", "hnovel", "vnovel", "kvnovel", "attn")


class KeptTokens:
    """The fake-quantization proxy of a lever the decode kernel does not have: a fixed budget of
    tokens kept in full precision, chosen by a score computable when a token leaves the recent
    window (its codes would not be read; the kernel would read it as it reads the sink tokens).

    Per layer (all KV heads of the layer together), the tokens with the largest score stay exact,
    round(fraction * n) of the n compressed so far and at least `floor`, selected as they leave the
    window (see `fake_quantize_range`). Scores of token j, summed over KV heads:
      - "kerr":   ||k_j - k_hat_j||^2 / ||k_j||^2 (key encoding error relative to the key's norm);
      - "verr":   ||v_j - v_hat_j||^2 (value encoding error);
      - "novel":  ||k_j - m_j||^2 / ||k_j||^2, m_j the mean key of the `window` positions before j
                  (how far the key is from what came just before it);
      - "hnovel": "novel" per KV head, each head keeping its own round(fraction * n) tokens;
      - "vnovel": the same for the values; "kvnovel": the sum of the two;
      - "attn":   the softmax attention the queries i in [j, j + window) give to j (averaged over
                  the query heads of each KV head; queries seen through `observe_query`, as the
                  fake-quant attention function passes them; H2O / SnapKV-like heavy hitters).
    `kept` / `seen` count the (token, KV head) pairs of every call (a re-quantized tail is counted
    again)."""

    def __init__(self, quantizer, rule: str, fraction: float = 0.02, window: Optional[int] = None, floor: int = 0):
        if rule not in KEEP_RULES:
            raise ValueError(f"rule: expected one of {KEEP_RULES}, got {rule!r}")
        if not 0 <= fraction < 1 or floor < 0 or not (fraction > 0 or floor > 0):
            raise ValueError(f"fraction, floor: expected a fraction in [0, 1) and a token count >= 0, not both zero; "
                             f"got {fraction!r}, {floor!r}")
        self.inner, self.config, self.rule, self.fraction = quantizer, quantizer.config, rule, fraction
        self.floor = int(floor)
        self.window = int(window if window is not None else (quantizer.config.residual or 128))
        self.queries: Dict[int, torch.Tensor] = {}  # layer -> [B, Hq, T, D], positions 0..T-1
        self._state: Dict[int, list] = {}  # layer -> the streaming selection of the current sequence
        self.kept = self.seen = 0

    def observe_query(self, layer: int, query: torch.Tensor, key_length: int) -> None:
        """The queries of positions [key_length - Tq, key_length) (a call starting at 0 starts a sequence)."""
        if self.rule != "attn":
            return
        b, h, tq, d = query.shape
        start = key_length - tq
        prev = self.queries.get(layer)
        if start == 0 or prev is None:
            prev = query.new_zeros(b, h, 0, d, dtype=torch.float32)
        if prev.shape[2] > start:
            prev = prev[:, :, :start]
        elif prev.shape[2] < start:  # positions not seen: zero queries (they weigh nothing)
            prev = torch.cat([prev, prev.new_zeros(b, h, start - prev.shape[2], d)], dim=2)
        self.queries[layer] = torch.cat([prev, query.float()], dim=2)

    @torch.no_grad()
    def observe_prompt(self, model, ids: Sequence[int]) -> None:
        """Runs `ids` through the model (full-precision attention) to see the prompt's queries."""
        if self.rule != "attn":
            return
        from .evaluate import fake_quant_attention

        with fake_quant_attention(model, None) as state:
            state.observer = self
            model(input_ids=torch.as_tensor([list(ids)], device=_device(model)), use_cache=False, logits_to_keep=1)

    def _mean_before(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """[B, H, hi - lo, D]: the mean of x over the `window` positions before each of [lo, hi)."""
        a = max(0, lo - self.window)
        c = torch.cumsum(torch.cat([x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3]), x[:, :, a:hi]], dim=2), dim=2)
        j = torch.arange(lo, hi, device=x.device)
        first = (j - self.window).clamp(min=a)
        n = (j - first).clamp(min=1).to(x.dtype)[:, None]
        return (c[:, :, j - a] - c[:, :, first - a]) / n

    def _novelty(self, x: torch.Tensor, lo: int, hi: int, per_head: bool = False) -> torch.Tensor:
        xs = x[:, :, lo:hi]
        d = ((xs - self._mean_before(x, lo, hi)) ** 2).sum(-1) / (xs ** 2).sum(-1).clamp(min=1e-12)
        if lo == 0:
            d[:, :, 0] = 0.0  # nothing before it
        return d if per_head else d.sum(1)  # [B, Hkv, n] or [B, n]

    def _attention(self, layer: int, key: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        q = self.queries.get(layer)
        b, hkv, tk, d = key.shape
        if q is None:
            return key.new_zeros(b, hi - lo)
        qe = min(q.shape[2], hi + self.window - 1, tk)  # queries [lo, qe) can see [lo, hi) in their window
        if qe <= lo:
            return key.new_zeros(b, hi - lo)
        g = q.shape[1] // hkv
        qs = q[:, :, lo:qe].reshape(b, hkv, g * (qe - lo), d)
        s = torch.matmul(qs, key[:, :, :qe].transpose(-1, -2)).view(b, hkv, g, qe - lo, qe) * d ** -0.5
        i = torch.arange(lo, qe, device=key.device)[:, None]
        j = torch.arange(qe, device=key.device)[None, :]
        p = torch.softmax(s.masked_fill(j > i, float("-inf")), dim=-1)[..., lo:hi]  # [B, Hkv, G, nq, hi - lo]
        inwin = (j[:, lo:hi] <= i) & (j[:, lo:hi] > i - self.window)
        seen = (q[:, :, lo:qe].abs().sum(dim=(1, 3)) > 0).to(p.dtype)  # queries never observed weigh nothing
        return (p * inwin * seen[:, None, None, :, None]).sum(dim=3).mean(dim=2).sum(dim=1)

    def scores(self, layer: int, key: torch.Tensor, value: torch.Tensor, k_hat, v_hat, lo: int, hi: int):
        """[B, hi - lo] the rule's score of positions [lo, hi) (key, value: all positions, [B, Hkv, T, D]);
        [B, Hkv, hi - lo] for a per-head rule."""
        k, v = key.float(), value.float()
        if self.rule == "kerr":
            ks = k[:, :, lo:hi]
            return (((ks - k_hat.float()) ** 2).sum(-1) / (ks ** 2).sum(-1).clamp(min=1e-12)).sum(1)
        if self.rule == "verr":
            return ((v[:, :, lo:hi] - v_hat.float()) ** 2).sum(dim=(1, 3))
        if self.rule in ("novel", "hnovel"):
            return self._novelty(k, lo, hi, per_head=self.rule == "hnovel")
        if self.rule == "vnovel":
            return self._novelty(v, lo, hi)
        if self.rule == "kvnovel":
            return self._novelty(k, lo, hi) + self._novelty(v, lo, hi)
        return self._attention(layer, k, lo, hi)

    def fake_quantize_range(self, layer: int, key: torch.Tensor, value: torch.Tensor, lo: int, hi: int):
        """(k_hat, v_hat) of positions [lo, hi) of key / value [B, Hkv, T, D], the kept ones exact.

        The budget is fixed per sequence: max(floor, round(fraction * n)) tokens, n the positions of the
        first call of the sequence (a prompt, a perplexity window: what a cache sized for its
        context would reserve), growing as round(fraction * positions taken) only beyond that.
        The selection streams, as an encoder would: positions are taken in order as they leave
        the window; each enters the kept set, and while the set holds more than the budget, its
        lowest-scoring token leaves it (and would be encoded then). With a fixed budget this
        keeps exactly the top-budget scores of the sequence. A call starting at or before the
        first position of the last sequence starts a new one; a later call continues it from the
        last position taken (a re-quantized tail that the caller reuses keeps the selection it
        had then)."""
        k, v = key[:, :, lo:hi], value[:, :, lo:hi]
        k_hat, v_hat = self.inner.fake_quantize(layer, k, v)
        b = k.shape[0]
        state = self._state.get(layer)
        if state is None or lo <= state[0] or state[2] != b:
            # first, end, batch, positions taken, heaps, the sequence's budget fixed by its first call
            groups = k.shape[1] if self.rule == "hnovel" else 1  # one choice per head, or per layer
            heaps = [[[] for _ in range(groups)] for _ in range(b)]
            state = [lo, lo, b, 0, heaps, max(self.floor, int(self.fraction * (hi - lo) + 0.5))]
            self._state[layer] = state
        first, end, _, taken, heaps, fixed = state
        if hi > end:
            score = self.scores(layer, key, value, None, None, end, hi) if self.rule not in ("kerr", "verr") else \
                self.scores(layer, key, value, k_hat[:, :, end - lo:], v_hat[:, :, end - lo:], end, hi)
            score = (score if score.dim() == 3 else score[:, None]).tolist()  # [B, groups, n]
            for t in range(hi - end):
                taken += 1
                budget = max(fixed, int(self.fraction * taken + 0.5))
                for r in range(b):
                    for g, heap in enumerate(heaps[r]):
                        heapq.heappush(heap, (score[r][g][t], end + t))
                        while len(heap) > budget:
                            heapq.heappop(heap)
            state[1], state[3] = hi, taken
        groups = len(heaps[0])
        keep = torch.zeros(b, groups, hi - lo, 1, dtype=torch.bool, device=k.device)
        for r in range(b):
            for g, heap in enumerate(heaps[r]):
                pos = [p - lo for _, p in heap if lo <= p < hi]
                if pos:
                    keep[r, g, pos] = True
        self.kept += int(keep.sum()) * (k.shape[1] // groups)  # token-heads kept
        self.seen += b * k.shape[1] * (hi - lo)
        return torch.where(keep, k, k_hat), torch.where(keep, v, v_hat)

    def fake_quantize(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Positions 0..T-1 of k / v [B, Hkv, T, D] all compressed (no context before them)."""
        return self.fake_quantize_range(layer, k, v, 0, k.shape[2])

    def kept_fraction(self) -> float:
        return self.kept / max(self.seen, 1)

    def bits_per_element(self) -> float:
        f = self.kept / self.seen if self.seen else self.fraction
        return (1 - f) * self.inner.bits_per_element() + f * 16


def parse_keep(spec: str):
    """(rule, fraction, floor) of a method's "+keep-<rule>[-<percent>[-<tokens>]]" suffix (without
    "+keep-"): the percent defaults to 2, the floor in tokens to 0."""
    rule, *rest = spec.split("-")
    if len(rest) > 2:
        raise ValueError(f"'+keep-{spec}': expected '+keep-<rule>[-<percent>[-<tokens>]]'")
    pct, floor = rest + ["2", "0"][len(rest):]
    return rule, float(pct) / 100, int(floor)


def proxy_factory(model, quantizer) -> Callable[..., object]:
    """The fake-quantization proxy as a retrieval method: `make(prefilled)` copies the prefilled
    prompt into a full-precision DynamicCache, and `make.context()` is the block (evaluate's
    fake_quant_attention, incremental) in which the later tokens see the prompt's old positions
    compressed and decompressed by `quantizer`."""
    from .evaluate import fake_quant_attention

    make = cache_factory("fp", model)

    def make_proxy(prefilled=None):
        return make(prefilled)
    if getattr(quantizer, "rule", None) == "attn":  # KeptTokens: a rule that needs the prompt's queries
        make_proxy.observe = lambda ids: quantizer.observe_prompt(model, ids)
    make_proxy.context = lambda: fake_quant_attention(model, quantizer, incremental=True)
    make_proxy.quantizer = quantizer
    return make_proxy


@torch.no_grad()
def stream(model, ids: Sequence[int], cache, prefill: int = 128, block: int = 16, score: bool = True):
    """Feeds `ids` through the model with `cache`: ids[:prefill] in one forward, then blocks of
    `block` tokens. Returns (nll_sum, scored, last_logits): the summed negative log-likelihood of
    ids[1:] (every next token; 0 and 0 when not `score`) and the float32 logits of the last position."""
    if prefill < 1 or block < 1:
        raise ValueError(f"prefill and block must be >= 1, got {prefill} and {block}")
    ids = torch.as_tensor(list(ids), dtype=torch.long, device=_device(model))
    n = ids.numel()
    if n < 1:
        raise ValueError("ids: empty")
    nll, scored, last = 0.0, 0, None
    bounds = [(0, min(prefill, n))] + [(s, min(s + block, n)) for s in range(min(prefill, n), n, block)]
    for s, e in bounds:
        # without scoring only the last position's logits are needed (skips most of the LM head)
        keep = {} if score else {"logits_to_keep": 1}
        out = model(input_ids=ids[None, s:e], past_key_values=cache, use_cache=True, **keep)
        logits = out.logits[0].float()
        if score:
            targets = ids[s + 1:e + 1]  # the last position of the sequence has no target
            k = targets.numel()
            if k:
                nll += float(F.cross_entropy(logits[:k], targets, reduction="sum"))
                scored += k
        last = logits[-1]
        del out, logits
    return nll, scored, last


@torch.no_grad()
def perplexity(model, ids: Sequence[int], make_cache: Callable[[], object], window: int = 2048, prefill: int = 128,
               block: int = 16, progress: bool = False) -> dict:
    """Perplexity of `ids` in non-overlapping windows of `window` tokens, each streamed through a
    fresh cache from make_cache() (see `stream`); every token of a window but its first is scored."""
    ids = list(ids)
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    total, count, windows, t0 = 0.0, 0, 0, time.perf_counter()
    starts = [s for s in range(0, len(ids), window) if len(ids) - s >= 2]
    for s in starts:
        nll, k, _ = stream(model, ids[s:s + window], make_cache(), prefill, block)
        total, count, windows = total + nll, count + k, windows + 1
        if progress:
            print(f"  window {windows}/{len(starts)}: running ppl {math.exp(total / count):.3f}", file=sys.stderr,
                  flush=True)
    if count == 0:
        raise ValueError("ids: need at least 2 tokens")
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": windows,
            "seconds": time.perf_counter() - t0}


def _tokens(tok, text: str) -> List[int]:
    from .hf import tokenize

    return tokenize(tok, text, add_special_tokens=False)[0]


def retrieval_prompt(tok, context_tokens: int, depth: float, task: str, rng: random.Random, keys: int = 3):
    """(prompt ids, expected key, question start) for one trial: the key line(s) at `depth` percent
    of the filler (multikey: `keys` names with their own keys, the asked one at `depth`, the others
    at random depths), about `context_tokens` tokens in all, BOS (if the tokenizer adds one) first;
    ids[question start:] is the question."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if not 2 <= keys <= len(NAMES) and task == "multikey":
        raise ValueError(f"keys: expected 2 to {len(NAMES)} for multikey, got {keys}")
    key = str(rng.randint(10000, 99999))
    if task == "passkey":
        needles = [(depth, PASSKEY_LINE.format(key=key))]
        question = PASSKEY_QUESTION
    else:
        names = rng.sample(NAMES, keys)
        others = [str(rng.randint(10000, 99999)) for _ in names[1:]]
        needles = [(depth, MULTIKEY_LINE.format(name=names[0], key=key))]
        needles += [(rng.uniform(0, 100), MULTIKEY_LINE.format(name=n, key=k)) for n, k in zip(names[1:], others)]
        question = MULTIKEY_QUESTION.format(name=names[0])
    from .hf import tokenize

    bos = tokenize(tok, "")[0]  # what the tokenizer adds in front (BOS or nothing)
    fixed = len(bos) + len(_tokens(tok, INTRO + question)) + sum(len(_tokens(tok, t)) for _, t in needles)
    per_filler = len(_tokens(tok, FILLER * 8)) / 8
    repeats = max(0, int((context_tokens - fixed) / per_filler))
    # the needles go between filler sentences: at round(depth% of the repeats)
    slots: List[List[str]] = [[] for _ in range(repeats + 1)]
    for d, text in sorted(needles, key=lambda x: x[0]):
        slots[int(round(repeats * min(max(d, 0.0), 100.0) / 100.0))].append(text)
    body = "".join("".join(slots[i]) + (FILLER if i < repeats else "") for i in range(repeats + 1))
    document = bos + _tokens(tok, INTRO + body.rstrip())
    return document + _tokens(tok, question), key, len(document)


@torch.no_grad()
def answer(model, tok, question: Sequence[int], cache, block: int = 16, max_new_tokens: int = 8) -> str:
    """Feeds the `question` tokens through `cache` (which holds the document) in blocks of
    `block`, then decodes `max_new_tokens` greedily through it, one token at a time."""
    device = _device(model)
    logits = None
    for s in range(0, len(question), block):
        part = torch.as_tensor(list(question[s:s + block]), dtype=torch.long, device=device)[None]
        logits = model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()
    eos = getattr(tok, "eos_token_id", None)
    new: List[int] = []
    for i in range(max_new_tokens):
        nxt = int(logits.argmax())
        new.append(nxt)
        if nxt == eos or i == max_new_tokens - 1:
            break
        logits = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=cache,
                       use_cache=True).logits[0, -1].float()
    return tok.decode(new)


@torch.no_grad()
def retrieval(model, tok, methods: Dict[str, Callable[..., object]], context_tokens: int, trials: int = 20,
              task: str = "passkey", seed: int = 0, block: int = 16, keys: int = 3, max_new_tokens: int = 8,
              progress: bool = False) -> Dict[str, List[dict]]:
    """`trials` retrieval trials at depths spread evenly over 0-100% (trial i at 100 * i / (trials - 1)),
    each with its own random key (from `seed`, so every method sees the same prompts), for each
    method of `methods` (name -> cache_factory(...)); success = the key's digits appear in the
    greedy answer. The document (everything before the question) is the prompt: one full-precision
    forward pass per trial fills a DynamicCache, from which each method's cache is made as that
    method stores a prompt; then the question (in blocks of `block`) and the answer are decoded
    against each method's cache: a document given first and asked about in a later turn."""
    from transformers import DynamicCache

    device = _device(model)
    out: Dict[str, List[dict]] = {name: [] for name in methods}
    for i in range(trials):
        depth = 100.0 * i / max(trials - 1, 1)
        rng = random.Random(f"{seed}-{task}-{context_tokens}-{i}")
        ids, key, question_at = retrieval_prompt(tok, context_tokens, depth, task, rng, keys)
        prefilled = DynamicCache()
        model(input_ids=torch.tensor([ids[:question_at]], device=device), past_key_values=prefilled, use_cache=True,
              logits_to_keep=1)
        for name, make in methods.items():
            t0 = time.perf_counter()
            if getattr(make, "observe", None) is not None:  # KeptTokens "attn": the document's queries
                make.observe(ids[:question_at])
            with getattr(make, "context", contextlib.nullcontext)():  # the proxy's attention
                text = answer(model, tok, ids[question_at:], make(prefilled), block, max_new_tokens)
            out[name].append({"task": task, "context_tokens": len(ids), "depth": depth, "key": key,
                              "success": key in text, "answer": text, "seconds": time.perf_counter() - t0})
            if progress:
                print(f"  {name} {task} {context_tokens} depth {depth:.0f}%: {'yes' if key in text else 'no '} "
                      f"{text!r}", file=sys.stderr, flush=True)
        del prefilled
    return out


def eval_real(args, methods: List[str], model, tok, eval_ids: List[int], keys, values, queries, report: dict,
              log) -> int:
    """The real path of `vecinfer eval` (see evaluate.eval_main for the arguments): perplexity of
    eval_ids streamed through each method's cache (--tokens 0: none), and retrieval at the
    --retrieval lengths; prints the table, writes --json. Returns the exit status."""
    from .evaluate import _build, _bits, _int_list, _write_json, needs_calibration
    from .evaluate import perplexity as fakequant_perplexity

    report.update({"path": "real", "prefill": args.prefill, "block": args.block, "methods": {}})
    lengths = _int_list(args.retrieval)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            log(f"vecinfer eval: --tasks: expected some of {TASKS}, got {t!r}")
            return 2
    retrieving = methods if args.retrieval_methods is None else \
        [m.strip() for m in args.retrieval_methods.split(",") if m.strip()]
    factories: Dict[str, Callable[..., object]] = {}
    built: Dict[str, object] = {}
    for method in methods:
        row: dict = {}
        report["methods"][method] = row
        quant = None
        if method in BASELINES:
            why = baseline_available(method)
            if why is not None:
                log(f"{method}: skipped: {why}")
                row["skipped"] = why
                continue
            row["bits_per_element"] = {"fp8": 8.0, "quanto-int2": 2.0, "quanto-int4": 4.0, "hqq-int2": 2.0,
                                       "hqq-int4": 4.0}[method]
        elif needs_calibration(method):
            # "proxy:<method>": the fake-quantization proxy of <method>, on the same prompts;
            # "<method>+outliers": 1% outlier tokens in full precision (proxy only: not in the kernel)
            proxy = method.startswith("proxy:")
            base = method[len("proxy:"):] if proxy else method
            outliers = base.endswith("+outliers")
            base = base[:-len("+outliers")] if outliers else base
            keep = None  # kept tokens (the cache's key novelty; any rule on the proxy)
            if "+keep-" in base:
                base, spec = base.split("+keep-", 1)
                keep = parse_keep(spec)
            t0 = time.perf_counter()
            try:
                if outliers and not proxy:
                    raise ValueError("outlier tokens are not in the cache: measure them as proxy:" + method)
                if keep and not proxy and keep[0] != "novel":
                    raise ValueError(f"the cache keeps tokens by key novelty ('+keep-novel-<percent>[-<tokens>]'); "
                                     f"{method!r} exists on the proxy only: measure it as proxy:{method}")
                if base not in built:  # one calibration per base method, shared by its levers
                    built[base] = _build(base, keys, values, args.bits, args.residual, args.sink_tokens,
                                         not args.quiet, queries, key_gain=args.key_gain)
                quant = built[base]
                if quant.config.method != "vq" and not proxy:
                    raise ValueError(f"method {quant.config.method!r} is a fake-quantization baseline (--path fakequant)")
            except Exception as e:  # one bad method should not lose the others
                log(f"{method}: {e}")
                row["error"] = str(e)
                continue
            if outliers:
                quant = OutlierTokens(quant, keys, 0.01)
            if keep and proxy:
                quant = KeptTokens(quant, keep[0], keep[1], floor=keep[2])
            elif keep:
                quant = quant.replace(keep_fraction=keep[1], keep_tokens=keep[2])
            row["config"] = quant.config.to_dict()  # the cache's kept tokens included; the proxy's wrap it
            if keep:
                row["keep"] = {"rule": keep[0], "fraction": keep[1], "tokens": keep[2]}
            row["calibrate_seconds"] = time.perf_counter() - t0
            row["bits_per_element"] = _bits(quant)
            if proxy:
                row["proxy"] = True
                factories[method] = proxy_factory(model, quant)
                if eval_ids and args.tokens > 0:
                    log(f"{method}: proxy perplexity over {len(eval_ids)} tokens ...")
                    row.update(fakequant_perplexity(model, eval_ids, quant, window=args.window))
                    log(f"{method}: ppl {row['ppl']:.4f} ({row['seconds']:.1f} s)")
                continue
        else:
            row["bits_per_element"] = 16.0
        factories[method] = cache_factory(method, model, quant)
        if eval_ids and args.tokens > 0:
            log(f"{method}: perplexity over {len(eval_ids)} tokens (windows of {args.window}, prefill {args.prefill}, "
                f"blocks of {args.block}) ...")
            row.update(perplexity(model, eval_ids, factories[method], args.window, args.prefill, args.block,
                                  progress=not args.quiet))
            log(f"{method}: ppl {row['ppl']:.4f} ({row['seconds']:.1f} s)")
        if args.json:
            _write_json(args.json, report)
    chosen = {m: f for m, f in factories.items() if m in retrieving}
    for n in lengths:
        for task in tasks:
            log(f"retrieval: {task} at {n} tokens, {args.trials} trials, methods {list(chosen)} ...")
            res = retrieval(model, tok, chosen, n, args.trials, task, block=args.block, keys=args.keys,
                            progress=not args.quiet)
            for m, rows in res.items():
                report["methods"][m].setdefault("retrieval", {})[f"{task}@{n}"] = {
                    "success": sum(r["success"] for r in rows), "trials": len(rows), "rows": rows}
            if args.json:
                _write_json(args.json, report)
    for m, make in factories.items():  # how many tokens the outlier proxies kept in full precision
        quant = getattr(make, "quantizer", None)
        if isinstance(quant, (OutlierTokens, KeptTokens)):
            report["methods"][m]["outlier_fraction"] = quant.kept / max(quant.seen, 1)
            report["methods"][m]["bits_per_element"] = _bits(quant)  # with the fraction actually kept
    fp = report["methods"].get("fp", {}).get("ppl")
    for row in report["methods"].values():
        if fp is not None and "ppl" in row:
            row["delta_ppl"] = row["ppl"] - fp
            row["delta_ppl_percent"] = 100.0 * (row["ppl"] / fp - 1.0)
    print(format_real_table(report))
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def format_real_table(report: dict) -> str:
    """The real-path report as a text table: one row per method, ppl and each retrieval setting."""
    settings = sorted({k for row in report["methods"].values() for k in row.get("retrieval", {})},
                      key=lambda k: (int(k.split("@")[1]), k))
    lines = [f"model {report['model']}, real path (prefill {report['prefill']}, blocks of {report['block']}), "
             f"text {report['text']} ({report['tokens']} tokens, windows of {report['window']}), "
             f"calibrated on {report['calib_text']}"]
    head = f"{'method':<22} {'bits/el':>8} {'ppl':>10} {'vs fp':>8}" + "".join(f" {k:>14}" for k in settings)
    lines += [head, "-" * len(head)]
    for name, row in report["methods"].items():
        if "skipped" in row or "error" in row:
            lines.append(f"{name:<22} {'skipped' if 'skipped' in row else 'error'}: {row.get('skipped') or row['error']}")
            continue
        bits = f"{row['bits_per_element']:.3f}" if row.get("bits_per_element") is not None else "?"
        ppl = f"{row['ppl']:.4f}" if "ppl" in row else ""
        delta = f"{row['delta_ppl_percent']:+.2f}%" if "delta_ppl_percent" in row else ""
        cells = ""
        for k in settings:
            r = row.get("retrieval", {}).get(k)
            cells += f" {(str(r['success']) + '/' + str(r['trials'])) if r else '':>14}"
        lines.append(f"{name:<22} {bits:>8} {ppl:>10} {delta:>8}{cells}")
    return "\n".join(lines)


__all__ = ["BASELINES", "KEEP_RULES", "KeptTokens", "TASKS", "answer", "parse_keep", "baseline_available", "cache_factory", "eval_real", "format_real_table",
           "perplexity", "retrieval", "retrieval_prompt", "stream"]
