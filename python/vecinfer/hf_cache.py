"""VecInferCache: a transformers Cache whose attention layers keep keys and values as vecinfer codes.

    cache = VecInferCache(model, quantizer)
    model.generate(**inputs, past_key_values=cache)       # or a manual forward loop

How it plugs in. transformers calls `cache.update(k, v, layer)` and then the model's attention
function. The cache switches the model to the attention function registered here as "vecinfer";
`update` stores nothing and hands the new keys and values to that function, which
  - on the prompt (the layer is empty): runs the model's previous attention (SDPA by default) on
    the prompt in full precision, then appends its keys and values to a QuantizedKVCache once,
    dropping each sequence's left padding (read from the attention mask);
  - on every later step: appends the new tokens and runs `QuantizedKVCache.attend` on the codes;
    the cache is never dequantized into transformers' layout.
Called with any other cache (a DynamicCache for a full-precision comparison, say), the "vecinfer"
function is the model's previous attention, so the model keeps working as before.

Works with transformers 4.56+ and 5.x (their cache-layer APIs differ: both are implemented).
Sliding-window layers (Gemma3's local layers, Qwen2 with use_sliding_window) stay in full
precision in transformers' own sliding-window layer: they hold at most the window. A model whose
every layer has one global sliding window (Mistral's `sliding_window`) is compressed, and refused
with an error once a sequence would outgrow the window. Left padding only; beam search
(reorder_cache), batch expansion and selection work; `crop` works while the tokens removed are
still in full precision (the recent window), and raises otherwise.
"""
from __future__ import annotations

import sys
import threading
from typing import List, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .cache import QuantizedKVCache
from .evaluate import _set_attn
from .quantizer import KVQuantizer

ATTENTION_NAME = "vecinfer"
_GROWTH = 1024  # tokens of room beyond the prompt when the cache sizes itself; then it doubles

# Implementation each model config used before it was switched to "vecinfer" (configs are not
# hashable, so by id).
_PREVIOUS = {}


class _Handoff(threading.local):
    pending = None  # (cache, layer_idx, key_states) from VecInferCache.update, for the attention call


_HANDOFF = _Handoff()


def _previous_attention(module):
    name = _PREVIOUS.get(id(getattr(module, "config", None)), "sdpa")
    if name in (None, ATTENTION_NAME):
        name = "sdpa"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name, ALL_ATTENTION_FUNCTIONS[name]
    # "eager" is not registered: each model file defines its own
    return name, getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def _run_previous(module, query, key, value, attention_mask, **kwargs):
    name, fn = _previous_attention(module)
    if name == "eager" and attention_mask is not None and attention_mask.dtype == torch.bool:
        # "vecinfer" builds SDPA's boolean masks; eager attention adds a float mask
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return fn(module, query, key, value, attention_mask, **kwargs)


def vecinfer_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as "vecinfer" (transformers' AttentionInterface)."""
    pending = _HANDOFF.pending
    if pending is None or pending[2] is not key:
        # a layer of another cache, a sliding-window layer, or no cache at all (a handoff left
        # unconsumed is reported by the cache's next update)
        return _run_previous(module, query, key, value, attention_mask, **kwargs)
    _HANDOFF.pending = None
    cache, layer_idx, _ = pending
    return cache._attention(layer_idx, module, query, key, value, attention_mask, kwargs)


AttentionInterface.register(ATTENTION_NAME, vecinfer_attention)
AttentionMaskInterface.register(ATTENTION_NAME, AttentionMaskInterface._global_mapping["sdpa"])


def use_vecinfer_attention(model) -> None:
    """Switches `model` to the "vecinfer" attention function (VecInferCache does this itself);
    `model.set_attn_implementation(<previous>)` switches back."""
    config = model.config
    if config._attn_implementation == ATTENTION_NAME:
        return
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            _PREVIOUS.setdefault(id(cfg), cfg._attn_implementation)
    _set_attn(model, ATTENTION_NAME)
    if config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{type(model).__name__} does not let its attention implementation be set; VecInferCache "
                         "needs transformers' AttentionInterface (load the model with attn_implementation='vecinfer' "
                         "after importing vecinfer.hf_cache)")


def _padding_from_mask(mask: Optional[torch.Tensor], tokens: int) -> Optional[torch.Tensor]:
    """Leading padding per sequence of a prompt, from the 4D mask of its attention (None: none)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"VecInferCache: expected a 4D attention mask (or None) on the prompt, got "
                         f"{type(mask).__name__} {list(getattr(mask, 'shape', []))}")
    last = mask[:, 0, -1, -tokens:]  # what the last prompt token sees: [B, T]
    seen = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    seen = seen.cpu()
    skip = (~seen).sum(1)
    if not torch.equal(seen, torch.arange(tokens)[None, :] >= skip[:, None]):
        raise ValueError("VecInferCache: the prompt's attention mask is not left padding (pad on the left: "
                         "tokenizer.padding_side = 'left'; padding elsewhere is not supported)")
    return skip if bool(skip.any()) else None


class _CodesLayer(CacheLayerMixin):
    """One compressed layer, as transformers sees it: its length (padding included, as transformers
    counts), the data living in the owner's QuantizedKVCache."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "VecInferCache", layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.seen = 0
        self.is_initialized = True

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query) -> tuple:
        # 5.x passes the query length, 4.56 the cache positions of the queries
        q = query if isinstance(query, int) else query.shape[0]
        return self.seen + q, 0

    def get_max_length(self) -> int:
        return self.owner.max_tokens or -1

    get_max_cache_shape = get_max_length  # the 4.56 name

    def reset(self) -> None:
        self.seen = 0


class VecInferCache(Cache):
    """A transformers Cache that stores the keys and values of a model's attention layers as
    vecinfer codes (a QuantizedKVCache) and runs decode attention on the codes.

    model: a transformers causal LM (Llama, Qwen2, Mistral, Gemma3 families); it is switched to
    the "vecinfer" attention function. quantizer: calibrated on this model (vecinfer.hf.calibrate).
    max_tokens: tokens per sequence to preallocate and never exceed; by default the cache sizes
    itself on the prompt and doubles when full.
    """

    def __init__(self, model, quantizer: KVQuantizer, max_tokens: Optional[int] = None):
        if not isinstance(quantizer, KVQuantizer):
            raise TypeError(f"quantizer: expected a vecinfer.KVQuantizer, got {type(quantizer).__name__}")
        if not hasattr(model, "config"):
            raise TypeError(f"model: expected a transformers model, got {type(model).__name__}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens: expected a positive int or None, got {max_tokens!r}")
        config = model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = text.num_hidden_layers
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if (quantizer.num_layers, quantizer.num_kv_heads, quantizer.head_dim) != (num_layers, heads, head_dim):
            raise ValueError(f"quantizer: calibrated for {quantizer.num_layers} layers x {quantizer.num_kv_heads} KV "
                             f"heads x head_dim {quantizer.head_dim}, the model has {num_layers} x {heads} x {head_dim}")
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * num_layers
        layers: List[CacheLayerMixin] = []
        for i, kind in enumerate(layer_types):
            if kind == "full_attention":
                layers.append(_CodesLayer(self, i))
            elif kind in ("sliding_attention", "chunked_attention"):
                window = text.sliding_window if kind == "sliding_attention" else text.attention_chunk_size
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                raise ValueError(f"model: layer {i} has attention type {kind!r}; VecInferCache supports full "
                                 "attention (compressed) and sliding-window attention (kept in full precision)")
        if not any(isinstance(layer, _CodesLayer) for layer in layers):
            raise ValueError("model: every layer uses sliding-window attention; there is nothing to compress")
        super().__init__(layers=layers)
        self.quantizer, self.max_tokens = quantizer, max_tokens
        self.codes: Optional[QuantizedKVCache] = None  # allocated on the prompt
        use_vecinfer_attention(model)

    # --- the transformers Cache interface ---------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not isinstance(layer, _CodesLayer):
            return layer.update(key_states, value_states, *args, **kwargs)
        stale = _HANDOFF.pending
        _HANDOFF.pending = None
        # an earlier layer of this forward was never consumed (a forward that raised midway leaves
        # a stale handoff too, but the next forward starts again at a lower layer)
        if stale is not None and stale[0] is self and stale[1] < layer_idx:
            raise RuntimeError(f"VecInferCache: the keys layer {stale[1]} gave the cache never reached the 'vecinfer' "
                               "attention function: the model's attention implementation was changed after the cache "
                               "was created (VecInferCache(model, quantizer) sets it), or the model changes keys "
                               "between the cache update and attention")
        _HANDOFF.pending = (self, layer_idx, key_states)
        return key_states, value_states

    def reset(self) -> None:
        self.codes = None
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx, "reorder_cache", beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices, "batch_select_indices", indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.codes is not None:
            self._select(torch.arange(self.codes.batch_size).repeat_interleave(repeats), "batch_repeat_interleave",
                         repeats)

    def crop(self, max_length: int) -> None:
        """Removes tokens from the end: `max_length` < 0 removes that many (transformers 5.x), >= 0
        keeps that many (4.56). Raises ValueError when a token to remove is no longer in full
        precision; the cache is then unchanged."""
        seen = max(layer.get_seq_length() for layer in self.layers)
        remove = -max_length if max_length < 0 else max(seen - max_length, 0)
        if remove == 0:
            return
        if self.codes is not None:
            self.codes.truncate(remove, layers=self._codes_layers())
        for layer in self.layers:
            if isinstance(layer, _CodesLayer):
                layer.seen = max(layer.seen - remove, 0)
            else:
                layer.crop(-remove)

    # --- internals ----------------------------------------------------------------------------
    def _codes_layers(self) -> List[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, _CodesLayer)]

    def _select(self, indices, method: str, arg) -> None:
        if self.codes is not None:
            self.codes.select(indices)
        for layer in self.layers:
            if not isinstance(layer, _CodesLayer):
                getattr(layer, method)(arg)

    def _room(self, layer_idx: int, key: torch.Tensor) -> QuantizedKVCache:
        """The QuantizedKVCache, created on the first prompt and grown to take key's tokens."""
        b, heads, t, dim = key.shape
        if self.codes is None:
            capacity = self.max_tokens or t + _GROWTH
            self.codes = QuantizedKVCache(self.quantizer, b, heads, dim, capacity, device=key.device, dtype=key.dtype,
                                          layers=self._codes_layers())
            self.quantizer = self.codes.quantizer  # keep the device copy
        elif b != self.codes.batch_size:
            raise ValueError(f"VecInferCache: holds {self.codes.batch_size} sequences, the model passed {b}; "
                             "call cache.reset() before a new batch")
        need = self.codes.length(layer_idx) + t
        if need > self.codes.max_tokens:
            if self.max_tokens is not None:
                raise ValueError(f"VecInferCache: {need} tokens exceed max_tokens={self.max_tokens} (layer {layer_idx})")
            self.codes.reserve(max(need, 2 * self.codes.max_tokens))
        return self.codes

    def _attention(self, layer_idx: int, module, query, key, value, attention_mask, kwargs):
        layer = self.layers[layer_idx]
        if kwargs.get("softcap") is not None:
            raise ValueError("VecInferCache: attention logit soft-capping is not supported")
        if module.training and kwargs.get("dropout"):
            raise ValueError("VecInferCache: attention dropout (training mode) is not supported; call model.eval()")
        t = key.shape[2]
        window = kwargs.get("sliding_window")
        if window is not None and layer.seen + t > window:
            raise ValueError(f"VecInferCache: layer {layer_idx} uses a {window}-token sliding window and a sequence "
                             f"would reach {layer.seen + t} tokens; compressed layers attend to all their tokens")
        if layer.seen == 0:  # the prompt: full-precision attention, then encode once
            out = _run_previous(module, query, key, value, attention_mask, **kwargs)
            self._room(layer_idx, key).append(layer_idx, key, value, skip=_padding_from_mask(attention_mask, t))
            layer.seen = t
            return out
        codes = self._room(layer_idx, key)
        codes.append(layer_idx, key, value)
        layer.seen += t
        out = codes.attend(layer_idx, query, scale=kwargs.get("scaling"))  # [B, Hq, Tq, D]
        return out.transpose(1, 2).contiguous(), None

    def nbytes(self) -> int:
        """Bytes held: the compressed layers' QuantizedKVCache and any full-precision sliding layers."""
        held = self.codes.nbytes() if self.codes is not None else 0
        for layer in self.layers:
            if not isinstance(layer, _CodesLayer) and getattr(layer, "keys", None) is not None:
                held += layer.keys.numel() * layer.keys.element_size() * 2
        return held


__all__ = ["ATTENTION_NAME", "VecInferCache", "use_vecinfer_attention", "vecinfer_attention"]
