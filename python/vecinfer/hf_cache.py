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

Tensor parallelism: under transformers' tensor parallelism (a Llama or Qwen2-family model loaded
with tp_plan="auto" under torchrun) each rank's attention sees its shard of the KV heads; the
cache, given the whole model's quantizer, holds only that rank's heads with the quantizer's rows
for them (tensor_parallel_shard says which). Keys and values are never gathered across ranks.

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
from typing import List, NamedTuple, Optional, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .cache import QuantizedKVCache
from .paged import check_finite_on_cpu
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


# torch.compile runs the handoff between the cache's update and this function (identity of the
# key tensor, a thread-local) and the cache's host bookkeeping eagerly, between compiled graphs.
@torch.compiler.disable
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
    return _left_padding(seen)


def _padding_from_2d_mask(mask: torch.Tensor, tokens: int) -> Optional[torch.Tensor]:
    """Leading padding per sequence from a prompt's 2D attention mask [B, tokens] (1 = token)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] != tokens:
        raise ValueError(f"attention_mask: expected [batch, {tokens}] (the prompt's mask), got "
                         f"{list(getattr(mask, 'shape', []))}")
    return _left_padding(mask.bool())


def _left_padding(seen: torch.Tensor) -> Optional[torch.Tensor]:
    """Padding tokens per sequence from which positions a prompt sees ([B, T] bool); None: none."""
    seen = seen.cpu()
    skip = (~seen).sum(1)
    if not torch.equal(seen, torch.arange(seen.shape[1])[None, :] >= skip[:, None]):
        raise ValueError("VecInferCache: the prompt's attention mask is not left padding (pad on the left: "
                         "tokenizer.padding_side = 'left'; padding elsewhere is not supported)")
    return skip if bool(skip.any()) else None


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _kv_shape(model) -> Tuple[int, int, int]:
    """(layers, KV heads, head_dim) of the whole model, from its config (all ranks' heads under
    tensor parallelism)."""
    text = _text_config(model)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, heads, head_dim


class TensorParallelShard(NamedTuple):
    """This process's place in the model's tensor-parallel group: it holds KV heads
    [rank * heads / world_size, (rank + 1) * heads / world_size)."""
    rank: int
    world_size: int
    group: object  # the torch.distributed ProcessGroup of the tensor-parallel mesh


def tensor_parallel_shard(model) -> Optional[TensorParallelShard]:
    """This rank's shard of the KV heads when transformers' tensor parallelism split the model
    (`from_pretrained(..., tp_plan="auto")` under torchrun), None for a model in one process.

    How transformers splits the heads (verified in transformers 5.x, not assumed): the `colwise`
    style of the Llama / Qwen2 / Mistral plans makes each attention's k_proj (and v_proj) weight,
    [heads * head_dim, hidden], a DTensor placed Shard(0) on the 1-D tensor-parallel mesh
    (distributed/tensor_parallel.py, ColwiseParallel.shard_param), and loads into each rank the rows
    DTensor's placement assigns it, torch.chunk's contiguous split (distributed/sharding_utils.py,
    DtensorShardOperation, through torch's compute_local_shape_and_global_offset). The attention
    reshapes its local projection into heads, so rank r sees heads [r * heads / W, (r + 1) * heads / W)
    when W divides the heads. This reads every key projection's rows off its DTensor and checks
    exactly that; a world size that does not divide the KV heads is a ValueError (transformers would
    give each rank a fraction of a head)."""
    projections = [(m.layer_idx, m.k_proj.weight) for m in model.modules()
                   if isinstance(getattr(m, "k_proj", None), torch.nn.Module) and hasattr(m, "layer_idx")]
    tp_size = getattr(model, "_tp_size", None) or 1
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch without DTensor: no tensor parallelism either
        return None
    sharded = [(i, w) for i, w in projections if isinstance(w, DTensor)]
    if not sharded:
        if tp_size > 1:
            raise ValueError(f"model: split over {tp_size} tensor-parallel ranks, but no attention layer has a k_proj "
                             "weight sharded as a DTensor; VecInferCache under tensor parallelism supports models with "
                             "separate key projections sharded by transformers' tp_plan (Llama, Qwen2, Mistral families)")
        return None
    if len(sharded) != len(projections):
        raise ValueError("model: only some of its attention layers' key projections are tensor-parallel; VecInferCache "
                         "needs every layer's KV heads split the same way")
    import torch.distributed as dist
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # how transformers loads shards

    _, heads, head_dim = _kv_shape(model)
    mesh = sharded[0][1].device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"model: its key projections are sharded over a {mesh.ndim}-D device mesh; VecInferCache "
                         "supports tensor parallelism alone (a 1-D mesh)")
    world, rank = mesh.size(), mesh.get_local_rank()
    if heads % world:
        raise ValueError(f"tensor parallelism over {world} ranks: {world} does not divide the model's {heads} KV heads, "
                         "so a rank would hold a fraction of a head; use a world size that divides the KV heads")
    group = mesh.get_group()
    if dist.get_rank(group) != rank:
        raise ValueError(f"model: mesh rank {rank} is rank {dist.get_rank(group)} of the mesh's process group; "
                         "VecInferCache expects them equal")
    rows = heads // world * head_dim
    for i, w in sharded:
        shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        if (w.device_mesh != mesh or tuple(w.placements) != (Shard(0),) or w.shape[0] != heads * head_dim
                or (shape[0], offset[0]) != (rows, rank * rows)):
            raise ValueError(f"model: layer {i}'s k_proj weight {list(w.shape)} is placed {tuple(w.placements)}, "
                             f"rank {rank} holding rows [{offset[0]}, {offset[0] + shape[0]}); VecInferCache expects "
                             f"Shard(0) with rows [{rank * rows}, {(rank + 1) * rows}) (KV heads "
                             f"[{rank * heads // world}, {(rank + 1) * heads // world}) of {heads})")
    return TensorParallelShard(rank, world, group)


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
    the "vecinfer" attention function. quantizer: calibrated on this model (vecinfer.hf.calibrate),
    for all its KV heads also under tensor parallelism (the cache keeps this rank's heads:
    `tensor_parallel` is the rank's TensorParallelShard, None in one process). max_tokens: tokens
    per sequence to preallocate and never exceed; by default the cache sizes itself on the prompt
    and doubles when full.
    """

    def __init__(self, model, quantizer: KVQuantizer, max_tokens: Optional[int] = None):
        if not isinstance(quantizer, KVQuantizer):
            raise TypeError(f"quantizer: expected a vecinfer.KVQuantizer, got {type(quantizer).__name__}")
        if not hasattr(model, "config"):
            raise TypeError(f"model: expected a transformers model, got {type(model).__name__}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens: expected a positive int or None, got {max_tokens!r}")
        text = _text_config(model)
        num_layers, heads, head_dim = _kv_shape(model)
        if (quantizer.num_layers, quantizer.num_kv_heads, quantizer.head_dim) != (num_layers, heads, head_dim):
            raise ValueError(f"quantizer: calibrated for {quantizer.num_layers} layers x {quantizer.num_kv_heads} KV "
                             f"heads x head_dim {quantizer.head_dim}, the model has {num_layers} x {heads} x {head_dim}"
                             " (under tensor parallelism pass the whole model's quantizer: the cache takes its "
                             "rank's heads itself)")
        # Under tensor parallelism this rank's attention sees only its shard of the KV heads: the
        # cache holds those, with the quantizer's rows for them.
        self.tensor_parallel = tensor_parallel_shard(model)
        if self.tensor_parallel is not None:
            quantizer = quantizer.shard(self.tensor_parallel.rank, self.tensor_parallel.world_size)
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
    @torch.compiler.disable
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

    @classmethod
    def from_cache(cls, model, quantizer: KVQuantizer, cache, attention_mask: Optional[torch.Tensor] = None,
                   max_tokens: Optional[int] = None, release_source: bool = False) -> "VecInferCache":
        """A VecInferCache holding the tokens of a filled full-precision transformers cache (a
        DynamicCache after a chunked prefill of a prompt too long for one forward pass, say),
        encoded once. `attention_mask` [B, S]: the prompt's mask, for left padding (dropped, as on
        a prompt). `release_source`: empty each layer of `cache` once it is encoded, so that memory
        peaks at the source plus one encoded layer; `cache` is unusable afterwards."""
        from .hf import _cache_layer_kv, _num_cache_layers, _release_cache_layer

        out = cls(model, quantizer, max_tokens=max_tokens)
        if _num_cache_layers(cache) != len(out.layers):
            raise ValueError(f"cache: holds {_num_cache_layers(cache)} layers, the model has {len(out.layers)} (fill it "
                             "with a forward pass of the model over the prompt first)")
        skip = None
        for i, layer in enumerate(out.layers):
            key, value = _cache_layer_kv(cache, i)
            if key is None or key.dim() != 4 or key.shape[2] == 0:
                raise ValueError(f"cache: layer {i} holds no tokens; fill it with the prompt first")
            if isinstance(layer, _CodesLayer):
                if skip is None and attention_mask is not None:
                    skip = _padding_from_2d_mask(attention_mask, key.shape[2])
                out._room(i, key).append(i, key, value, skip=skip)
                layer.seen = key.shape[2]
            else:
                layer.update(key, value)
            if release_source:
                _release_cache_layer(cache, i)
        return out

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
        if heads != self.quantizer.num_kv_heads:
            held = "" if self.tensor_parallel is None else (
                f" (rank {self.tensor_parallel.rank} of {self.tensor_parallel.world_size}'s share of the KV heads)")
            raise ValueError(f"VecInferCache: the model's attention passed {heads} KV heads, the cache holds "
                             f"{self.quantizer.num_kv_heads}{held}")
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
        # kept tokens: attention is exact for queries within the recent window, so a longer block
        # runs as consecutive pieces of at most `residual` tokens, each appended then attended
        piece = codes.residual if codes.keeps_tokens else t
        if piece < t:  # every piece's input checked before the first is appended
            check_finite_on_cpu("key", key)
            check_finite_on_cpu("value", value)
        outs = []
        for start in range(0, t, piece):
            end = min(t, start + piece)
            codes.append(layer_idx, key[:, :, start:end], value[:, :, start:end])
            layer.seen += end - start
            outs.append(codes.attend(layer_idx, query[:, :, start:end], scale=kwargs.get("scaling")))  # [B, Hq, Tq, D]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2).contiguous(), None

    def nbytes(self) -> int:
        """Bytes held: the compressed layers' QuantizedKVCache and any full-precision sliding layers."""
        held = self.codes.nbytes() if self.codes is not None else 0
        for layer in self.layers:
            if not isinstance(layer, _CodesLayer) and getattr(layer, "keys", None) is not None:
                held += layer.keys.numel() * layer.keys.element_size() * 2
        return held


class CUDAGraphDecoder:
    """One-token decode steps of a model, captured once in a CUDA graph and replayed, so that a step
    costs the GPU's time and no Python or kernel-launch time.

        cache = VecInferCache.from_cache(model, quantizer, prefilled)  # or after model(prompt, past_key_values=cache)
        decode = CUDAGraphDecoder(model, cache, max_new_tokens=128)
        logits = decode(tokens)  # tokens [B]: each sequence's newest token; logits [B, vocab]

    The first call runs eagerly (a real step that also warms the kernels up) and captures the next
    step; each later call copies the tokens into the graph's input and replays it. The returned
    logits are a buffer that the next call overwrites. The cache's buffers are reserved for
    max_new_tokens up front; nothing else may use the cache while the decoder does.

    `cache`, on a CUDA device:
      - a VecInferCache whose layers are all compressed (no sliding-window layers) and in which
        every sequence is past its sink tokens and its full recent window (a prompt longer than
        sink_tokens + residual), and has its keep_tokens kept tokens (sink_tokens + residual +
        keep_tokens; a keep_fraction is refused), so that every step has the same shape of work; positions continue
        from each sequence's length, so left-padded batches work;
      - or transformers' StaticCache (transformers 5: its layers count their tokens on the GPU),
        without padding: the full-precision comparison under the same graph capture.

    Under tensor parallelism every rank makes its own decoder over its own cache and calls it with
    the same tokens in the same steps: the captured step holds the ranks' collectives.
    """

    def __init__(self, model, cache, max_new_tokens: int):
        from transformers.cache_utils import StaticCache

        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        if isinstance(cache, VecInferCache):
            positions, layers = self._check_codes_cache(cache, max_new_tokens)
        elif isinstance(cache, StaticCache):
            positions, layers = self._check_static_cache(cache, max_new_tokens), []
        else:
            raise TypeError(f"cache: expected a VecInferCache or a transformers StaticCache, got "
                            f"{type(cache).__name__}")
        self.model, self.cache, self.layers, self.steps_left = model, cache, layers, max_new_tokens
        self.positions = positions[:, None]  # each sequence's next position
        self.tokens = torch.zeros_like(self.positions)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None
        self._step_lengths: List[torch.Tensor] = []  # what one replay adds to each layer's lengths

    @staticmethod
    def _check_codes_cache(cache: VecInferCache, max_new_tokens: int):
        codes = cache.codes
        if codes is None or codes.device.type != "cuda":
            raise ValueError("cache: expected a VecInferCache holding a prompt on a CUDA device")
        cfg = codes.quantizer.config
        if cfg.keep_fraction:
            raise ValueError("cache: its quantizer keeps a fraction of the tokens (keep_fraction > 0), a budget that "
                             "grows every so many steps, so that steps differ in shape; CUDAGraphDecoder needs "
                             "keep_fraction=0 (a fixed keep_tokens budget is captured once it is full)")
        layers = cache._codes_layers()
        if len(layers) != len(cache.layers):
            raise ValueError("model: has sliding-window layers (kept in a full-precision cache that grows by "
                             "concatenation); CUDAGraphDecoder needs every layer compressed")
        kept = f" and its keep_tokens={cfg.keep_tokens} kept tokens" if cfg.keep_tokens else ""
        for i in layers:
            full = codes._steady(i, keeping=cfg.keeps_tokens)
            if cfg.keep_tokens:
                full = full and bool((codes._lengths[i][:, 0] - codes.sinks == cfg.keep_tokens).all())
            if not full:
                raise ValueError(f"cache: in layer {i} a sequence has not filled its {codes.sinks} sink tokens, "
                                 f"{codes.residual}-token recent window{kept}; decode eagerly until it has")
        if len({cache.layers[i].seen for i in layers}) != 1:
            raise ValueError("cache: its layers hold different numbers of tokens (a forward pass did not finish)")
        codes.reserve(codes.length(layers[0]) + max_new_tokens)  # the graph keeps the buffers' addresses
        return codes.lengths(layers[0]).to(codes.device), layers

    @staticmethod
    def _check_static_cache(cache, max_new_tokens: int) -> torch.Tensor:
        layer = cache.layers[0]
        if not hasattr(layer, "cumulative_length"):
            raise ValueError("cache: a StaticCache of transformers 5 or later is needed (earlier ones count their "
                             "tokens on the host)")
        if not layer.is_initialized or layer.keys.device.type != "cuda":
            raise ValueError("cache: expected a StaticCache holding a prompt on a CUDA device")
        seen = cache.get_seq_length()
        if seen < 1 or seen + max_new_tokens > layer.max_cache_len:
            raise ValueError(f"cache: holds {seen} tokens of max_cache_len={layer.max_cache_len}; it needs a prompt "
                             f"and room for max_new_tokens={max_new_tokens}")
        return torch.full((layer.keys.shape[0],), seen, dtype=torch.long, device=layer.keys.device)

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.tokens, position_ids=self.positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.positions.add_(1)
        return out.logits[:, -1]

    def _host_state(self):
        """What a step changes on the host: each compressed layer's token count and the cache's
        lengths (a replay changes only the GPU state; a StaticCache has none on the host)."""
        return [(self.cache.layers[i].seen, self.cache.codes._lengths[i]) for i in self.layers]

    def _set_host_state(self, state) -> None:
        for i, (seen, lengths) in zip(self.layers, state):
            self.cache.layers[i].seen = seen
            self.cache.codes._lengths[i] = lengths

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.steps_left == 0:
            raise RuntimeError("CUDAGraphDecoder: the max_new_tokens steps are used up; make a new decoder")
        if not isinstance(tokens, torch.Tensor) or tokens.numel() != self.tokens.shape[0]:
            raise ValueError(f"tokens: expected a tensor of {self.tokens.shape[0]} token ids (one per sequence), "
                             f"got {getattr(tokens, 'shape', type(tokens).__name__)}")
        self.tokens.copy_(tokens.reshape(-1, 1))
        self.steps_left -= 1
        if self.graph is not None:
            self.graph.replay()
            self._set_host_state([(seen + 1, lengths + delta) for (seen, lengths), delta
                                  in zip(self._host_state(), self._step_lengths)])
            return self.logits
        logits = self._forward()  # eager: warms up every kernel before the capture
        before = self._host_state()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        # capturing ran the step's Python (which advanced the host state) but not its GPU work
        self._step_lengths = [after - lengths for (_, after), (_, lengths) in zip(self._host_state(), before)]
        self._set_host_state(before)
        return logits


__all__ = ["ATTENTION_NAME", "CUDAGraphDecoder", "TensorParallelShard", "VecInferCache", "tensor_parallel_shard",
           "use_vecinfer_attention", "vecinfer_attention"]
