"""KVQuantizer: per-layer smoothing scales, means and codebooks; calibration, save and load."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from .config import VQConfig
from .kmeans import kmeans
from .ops import hadamard, snap_codebook, vq_decode, vq_encode

FORMAT = "vecinfer-kv-quantizer"
# Version 3: a SHA-256 checksum of the tensors and the metadata, verified on load. Version 2
# (codebooks on the 8-bit grid of snap_codebook) and version 1 (converted to the grid on load) have
# no checksum: they load with a warning that their contents cannot be verified.
FORMAT_VERSION = 3
_LAYER_TENSORS = ("key_scale", "key_mean", "value_mean", "key_codebook", "value_codebook")


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _check_samples(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple)):
        raise TypeError("keys, values: expected lists (one [num_kv_heads, num_tokens, head_dim] tensor per layer)")
    if len(keys) == 0 or len(keys) != len(values):
        raise ValueError(f"keys, values: need the same, non-zero number of layers, got {len(keys)} and {len(values)}")
    shape = None
    for i, (k, v) in enumerate(zip(keys, values)):
        for name, t in (("keys", k), ("values", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3:
                raise ValueError(f"{name}[{i}]: expected [num_kv_heads, num_tokens, head_dim], got {list(t.shape)}")
            if t.shape[0] == 0 or t.shape[1] == 0:
                raise ValueError(f"{name}[{i}]: no samples (shape {list(t.shape)}): need at least one head and token")
            if t.shape[-1] not in (64, 128, 256):
                raise ValueError(f"{name}[{i}]: head_dim must be 64, 128 or 256, got {t.shape[-1]}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}[{i}]: calibration samples contain NaN or infinity")
        if k.shape[0] != v.shape[0] or k.shape[2] != v.shape[2]:
            raise ValueError(f"layer {i}: keys {list(k.shape)} and values {list(v.shape)} differ in heads or head_dim")
        if shape is not None and (k.shape[0], k.shape[2]) != shape:
            raise ValueError(f"layer {i}: {k.shape[0]} heads x {k.shape[2]} dims, layer 0 has {shape[0]} x {shape[1]}")
        shape = (k.shape[0], k.shape[2])
    return shape


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scales(x: torch.Tensor, rule: str, query_absmax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-(head, channel) smoothing scales of samples x [H, N, D] ("query": with the queries'
    per-(KV head, channel) absolute maxima query_absmax [H, D])."""
    if rule == "query":
        # SmoothQuant's balance (alpha 0.5): after scaling, a channel's key and query ranges are equal
        s = (x.abs().amax(dim=1) / query_absmax.clamp_min(1e-6)).sqrt()
    elif rule == "sqrt_max":
        s = x.abs().amax(dim=1).sqrt()
    elif rule == "max":
        s = x.abs().amax(dim=1)
    else:
        s = x.std(dim=1)
    mean = s.mean(dim=1, keepdim=True)
    # keep the overall magnitude: only relative channel sizes change; a constant head (all channels
    # 0 after the mean) gets scale 1, not 0/0
    s = torch.where(mean > 0, s / mean, torch.ones_like(s))
    return s.clamp_min(1e-3).contiguous()


class KVQuantizer:
    """Compression parameters for every layer of a model's KV cache, and the ops that use them."""

    def __init__(self, config: VQConfig, layers: List[Dict[str, Optional[torch.Tensor]]], num_kv_heads: int,
                 head_dim: int):
        self.config = config
        self.layers = layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        for t in self.layers[0].values():
            if t is not None:
                return t.device
        return torch.device("cpu")

    # --- calibration -------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], cfg: VQConfig,
                  progress: bool = True, query_absmax: Optional[Sequence[torch.Tensor]] = None) -> "KVQuantizer":
        """Learns scales, means and k-means codebooks from per-layer post-RoPE samples.

        keys[l], values[l]: [num_kv_heads, num_tokens, head_dim]. Runs on the samples' device.
        query_absmax[l]: [num_kv_heads, head_dim], the largest |query| per channel over the query
        heads of each KV head (vecinfer.evaluate.collect_query_absmax); needed by scale_rule "query".
        """
        if not isinstance(cfg, VQConfig):
            raise TypeError(f"cfg: expected a vecinfer.VQConfig, got {type(cfg).__name__}")
        heads, dim = _check_samples(keys, values)
        if cfg.smooth and cfg.scale_rule == "query" and cfg.method == "vq":
            if query_absmax is None or len(query_absmax) != len(keys) or any(
                    not isinstance(q, torch.Tensor) or tuple(q.shape) != (heads, dim) for q in query_absmax):
                raise ValueError(f"query_absmax: scale_rule 'query' needs one [{heads}, {dim}] tensor of query "
                                 f"maxima per layer ({len(keys)} layers)")
        if cfg.method == "kivi":
            return cls(cfg, [{} for _ in keys], heads, dim)
        groups = heads if cfg.granularity == "head" else 1
        for which, sub, bits, x in (("key", cfg.key_sub_dim, cfg.key_code_bits, keys[0]),
                                    ("value", cfg.value_sub_dim, cfg.value_code_bits, values[0])):
            available = x.shape[1] * dim // sub * (heads // groups)
            if available < (1 << bits):
                raise ValueError(f"{which}s: {x.shape[1]} tokens give {available} sub-vectors per codebook, fewer "
                                 f"than its {1 << bits} centroids; calibrate on more tokens")
        bar = _progress_bar(2 * len(keys) * groups * cfg.kmeans_iters, progress, "calibrating codebooks")
        tick = (lambda: bar.update(1)) if bar is not None else None
        layers = []
        for i, (k, v) in enumerate(zip(keys, values)):
            k, v = k.float(), v.float()
            params: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(_LAYER_TENSORS)
            if cfg.key_mean:
                params["key_mean"] = k.mean(dim=1).contiguous()
                k = k - params["key_mean"][:, None]
            if cfg.value_mean:
                params["value_mean"] = v.mean(dim=1).contiguous()
                v = v - params["value_mean"][:, None]
            if cfg.smooth:
                params["key_scale"] = _scales(k, cfg.scale_rule,
                                              query_absmax[i].float() if cfg.scale_rule == "query" else None)
                k = k / params["key_scale"][:, None]
            if cfg.hadamard:
                k = hadamard(k.contiguous())
            seed = cfg.seed + 1000 * i
            params["key_codebook"] = cls._train(k, groups, cfg.key_sub_dim, cfg.key_code_bits, cfg, seed, tick,
                                                gain=cfg.key_gain)
            params["value_codebook"] = cls._train(v, groups, cfg.value_sub_dim, cfg.value_code_bits, cfg, seed + 1, tick)
            layers.append(params)
        if bar is not None:
            bar.close()
        return cls(cfg, layers, heads, dim)

    @staticmethod
    def _train(x: torch.Tensor, groups: int, sub: int, bits: int, cfg: VQConfig, seed: int, tick,
               gain: float = 1.0) -> torch.Tensor:
        heads = x.shape[0]
        books = []
        for g in range(groups):
            part = x[g * heads // groups:(g + 1) * heads // groups].reshape(-1, sub)
            if part.shape[0] > cfg.max_samples:
                gen = torch.Generator().manual_seed(seed + 7 * g)
                part = part[torch.randperm(part.shape[0], generator=gen)[: cfg.max_samples].to(part.device)]
            books.append(kmeans(part, 1 << bits, cfg.kmeans_iters, seed + 7 * g, progress=tick))
        # On the 8-bit grid the CUDA kernel holds centroids on, so that every path decodes the same values.
        return snap_codebook(torch.stack(books) * gain)

    # --- encode / decode -------------------------------------------------------------------------
    def _layer(self, layer: int) -> Dict[str, Optional[torch.Tensor]]:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        return self.layers[layer]

    def _check_kv(self, name: str, x: torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 3 or x.shape[-3] != self.num_kv_heads or x.shape[-1] != self.head_dim:
            raise ValueError(f"{name}: expected [..., {self.num_kv_heads}, tokens, {self.head_dim}] "
                             f"(num_kv_heads, head_dim of the calibration), got {list(x.shape)}")

    def encode_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        p = self._layer(layer)
        self._check_kv("k", k)
        return vq_encode(k.contiguous(), p["key_codebook"], scale=p["key_scale"], mean=p["key_mean"],
                         hadamard=self.config.hadamard)

    def encode_values(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        p = self._layer(layer)
        self._check_kv("v", v)
        return vq_encode(v.contiguous(), p["value_codebook"], mean=p["value_mean"])

    def decode_keys(self, layer: int, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        p = self._layer(layer)
        return vq_decode(codes, p["key_codebook"], head_dim=self.head_dim, dtype=dtype, scale=p["key_scale"],
                         mean=p["key_mean"], hadamard=self.config.hadamard)

    def decode_values(self, layer: int, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        p = self._layer(layer)
        return vq_decode(codes, p["value_codebook"], head_dim=self.head_dim, dtype=dtype, mean=p["value_mean"])

    def fake_quantize(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """(k_hat, v_hat): keys and values [B, Hkv, T, D] compressed and decompressed, same dtype."""
        if self.config.method == "kivi":
            self._layer(layer)
            self._check_kv("k", k)
            self._check_kv("v", v)
            return kivi_fake_quantize(k, v, self.config.kivi_group)
        return (self.decode_keys(layer, self.encode_keys(layer, k), k.dtype),
                self.decode_values(layer, self.encode_values(layer, v), v.dtype))

    # --- accounting ----------------------------------------------------------------------------
    def parameter_bytes(self) -> int:
        """Bytes of codebooks, scales and means for all layers."""
        return sum(t.numel() * t.element_size() for p in self.layers for t in p.values() if t is not None)

    def bits_per_element(self, tokens: Optional[int] = None) -> float:
        """Average stored bits per K/V element: the codes and the kept tokens (16 bits; without
        `tokens`, keep_fraction of the compressed part, the fixed keep_tokens counting for nothing
        in an unbounded sequence). With `tokens`, a sequence of that many tokens is counted whole:
        compressed part, kept, full-precision residual and sink tokens (16 bits), and the
        per-layer parameters, amortised over one sequence."""
        cfg = self.config
        if cfg.method == "kivi":
            # 2-bit integers plus an fp16 scale and zero per group of kivi_group
            coded = 2 + 2 * 16 / cfg.kivi_group
            coded_k = coded_v = coded
        else:
            coded_k, coded_v = cfg.key_bits, cfg.value_bits
        keep = cfg.keep_fraction
        if tokens is None:
            return (1 - keep) * (coded_k + coded_v) / 2 + keep * 16
        full = min(tokens, cfg.residual + cfg.sink_tokens)
        kept = cfg.kept_budget(tokens - full)
        elements = 2 * tokens * self.num_kv_heads * self.head_dim
        bits = (tokens - full - kept) * self.num_kv_heads * self.head_dim * (coded_k + coded_v)
        bits += (full + kept) * self.num_kv_heads * self.head_dim * 2 * 16
        bits += 8 * self.parameter_bytes() / self.num_layers
        return bits / elements

    def replace(self, **fields) -> "KVQuantizer":
        """The same calibration with other settings that do not change it: sink_tokens, residual,
        keep_fraction, keep_tokens."""
        allowed = {"sink_tokens", "residual", "keep_fraction", "keep_tokens"}
        if set(fields) - allowed:
            raise ValueError(f"replace: only {sorted(allowed)} leave the calibration valid, got {sorted(fields)}")
        return KVQuantizer(dataclasses.replace(self.config, **fields), self.layers, self.num_kv_heads, self.head_dim)

    # --- tensor parallelism -----------------------------------------------------------------------
    def heads(self, start: int, stop: int) -> "KVQuantizer":
        """The quantizer of KV heads [start, stop) alone: what a tensor-parallel rank holding those
        heads uses. Per-head scales and means, and per-head codebooks (granularity "head"), are
        sliced; per-layer codebooks are shared by all heads and kept whole."""
        if not (_is_index(start) and _is_index(stop) and 0 <= start < stop <= self.num_kv_heads):
            raise ValueError(f"start, stop: expected 0 <= start < stop <= {self.num_kv_heads} (the KV heads), got "
                             f"{start!r}, {stop!r}")
        per_head = {"key_scale", "key_mean", "value_mean"}
        if self.config.granularity == "head":
            per_head |= {"key_codebook", "value_codebook"}
        layers = [{name: (t[start:stop].contiguous() if t is not None and name in per_head else t)
                   for name, t in p.items()} for p in self.layers]
        return KVQuantizer(self.config, layers, stop - start, self.head_dim)

    def shard(self, rank: int, world_size: int) -> "KVQuantizer":
        """The quantizer of tensor-parallel rank `rank` of `world_size`, which holds the contiguous KV
        heads [rank * H / world_size, (rank + 1) * H / world_size) (how transformers' tensor
        parallelism splits them). ValueError when world_size does not divide the H KV heads."""
        if not _is_index(world_size) or world_size < 1 or not _is_index(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank, world_size: expected ints with 0 <= rank < world_size, got {rank!r}, "
                             f"{world_size!r}")
        if self.num_kv_heads % world_size:
            raise ValueError(f"world_size: {world_size} ranks do not divide the {self.num_kv_heads} KV heads; each "
                             "rank must hold whole heads (use a world size that divides the KV heads)")
        per = self.num_kv_heads // world_size
        return self.heads(rank * per, (rank + 1) * per)

    # --- persistence ---------------------------------------------------------------------------
    def to(self, device) -> "KVQuantizer":
        layers = [{k: (t.to(device) if t is not None else None) for k, t in p.items()} for p in self.layers]
        return KVQuantizer(self.config, layers, self.num_kv_heads, self.head_dim)

    def save(self, path: str) -> None:
        """Writes a safetensors file of format version 3: the tensors, the config and sizes, and a
        SHA-256 checksum of them all. `path` must be a regular file or not exist yet."""
        from safetensors.torch import save as serialize

        tensors = {f"layer{i}.{name}": t.detach().cpu().contiguous()
                   for i, p in enumerate(self.layers) for name, t in p.items() if t is not None}
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "config": json.dumps(self.config.to_dict()),
                "num_layers": str(self.num_layers), "num_kv_heads": str(self.num_kv_heads),
                "head_dim": str(self.head_dim)}
        if not tensors:  # safetensors needs at least one tensor (kivi has no parameters)
            tensors = {"empty": torch.zeros(1)}
        meta["sha256"] = _checksum(meta, tensors)
        if os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(f"{path}: exists and is not a regular file (a directory, FIFO or device); "
                             "save writes a regular file")
        data = serialize(tensors, metadata=meta)
        with open(path, "wb") as f:
            f.write(data)

    @classmethod
    def load(cls, path: str, device="cpu") -> "KVQuantizer":
        """Loads a saved quantizer, checking that the path is a regular file, the format, version
        and checksum, the config's fields and every tensor's shape, dtype and finiteness; a
        corrupted, truncated or mismatched file raises ValueError. Files of versions 1 and 2 carry
        no checksum: they load with a warning that they cannot be verified."""
        meta, tensors = _read_safetensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a vecinfer quantizer file (format {meta.get('format')!r})")
        version = meta.get("version")
        if version not in ("1", "2", str(FORMAT_VERSION)):
            raise ValueError(f"{path}: format version {version!r}, this vecinfer reads 1 to {FORMAT_VERSION}")
        if version == str(FORMAT_VERSION):
            unsigned = {k: v for k, v in meta.items() if k != "sha256"}
            if meta.get("sha256") != _checksum(unsigned, tensors):
                raise ValueError(f"{path}: checksum mismatch: the file is corrupted or was altered")
        else:
            warnings.warn(f"{path}: a format version {version} file has no checksum, so its contents cannot be "
                          f"verified; save it again to write version {FORMAT_VERSION}")
        try:
            cfg = VQConfig.from_dict(json.loads(meta["config"]))
            num_layers, heads, dim = int(meta["num_layers"]), int(meta["num_kv_heads"]), int(meta["head_dim"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: invalid metadata ({e})") from e
        if num_layers < 1 or heads < 1 or dim not in (64, 128, 256):
            raise ValueError(f"{path}: invalid sizes: {num_layers} layers, {heads} KV heads, head_dim {dim}")
        layers = []
        groups = heads if cfg.granularity == "head" else 1
        expected = {"key_scale": (heads, dim) if cfg.smooth else None,
                    "key_mean": (heads, dim) if cfg.key_mean else None,
                    "value_mean": (heads, dim) if cfg.value_mean else None,
                    "key_codebook": (groups, 1 << cfg.key_code_bits, cfg.key_sub_dim),
                    "value_codebook": (groups, 1 << cfg.value_code_bits, cfg.value_sub_dim)}
        if cfg.method == "kivi":
            expected = dict.fromkeys(expected)
        for i in range(num_layers):
            p: Dict[str, Optional[torch.Tensor]] = {}
            for name, shape in expected.items():
                t = tensors.pop(f"layer{i}.{name}", None)
                if shape is None:
                    if t is not None:
                        raise ValueError(f"{path}: layer{i}.{name} present but the config does not use it")
                    p[name] = None
                    continue
                if t is None:
                    raise ValueError(f"{path}: layer{i}.{name} is missing")
                if t.dtype != torch.float32 or tuple(t.shape) != shape:
                    raise ValueError(f"{path}: layer{i}.{name} is {t.dtype} {list(t.shape)}, expected float32 {list(shape)}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{path}: layer{i}.{name} contains NaN or infinity")
                if name == "key_scale" and not bool((t > 0).all()):
                    raise ValueError(f"{path}: layer{i}.key_scale has non-positive entries")
                if name.endswith("codebook"):
                    snapped = snap_codebook(t)
                    if version == "1":  # written before the grid: converted (a small rounding of centroids)
                        if i == 0 and name == "key_codebook":
                            warnings.warn(f"{path}: a version 1 file; its codebooks are rounded to the 8-bit "
                                          f"centroid grid of version {FORMAT_VERSION} (save it again to update it)")
                        t = snapped
                    elif not torch.equal(snapped, t):
                        raise ValueError(f"{path}: layer{i}.{name} is not on the 8-bit centroid grid (altered file?)")
                p[name] = t.to(device)
            layers.append(p)
        tensors.pop("empty", None)
        if tensors:
            raise ValueError(f"{path}: unexpected tensors {sorted(tensors)[:5]} (more layers than the metadata says?)")
        return cls(cfg, layers, heads, dim)


def _checksum(meta: Dict[str, str], tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata entries and of each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(meta):
        h.update(json.dumps([key, meta[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_safetensors(path: str):
    """(metadata, tensors) of a safetensors file. Only a regular file is read: it is opened without
    blocking (a FIFO would wait for a writer) and checked before reading."""
    from safetensors.torch import load as deserialize

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # FileNotFoundError for a missing file
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file (a directory, FIFO or device)")
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
        tensors = deserialize(data)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("metadata values must be strings")
    except Exception as e:  # safetensors and json raise their own errors for a damaged file
        raise ValueError(f"{path}: not a readable vecinfer quantizer file ({e})") from e
    return meta, tensors


def kivi_fake_quantize(k: torch.Tensor, v: torch.Tensor, group: int = 32):
    """KIVI-style 2-bit asymmetric scalar quantization: keys per channel over groups of `group`
    tokens, values per token over groups of `group` channels; fp16 scale and zero per group."""

    def quant(x: torch.Tensor, dim: int) -> torch.Tensor:
        x32 = x.float().movedim(dim, -1)
        n = x32.shape[-1]
        pad = (-n) % group
        if pad:  # the last, partial group: pad with its own last value (does not widen the range)
            x32 = torch.cat([x32, x32[..., -1:].expand(*x32.shape[:-1], pad)], dim=-1)
        g = x32.reshape(*x32.shape[:-1], -1, group)
        lo = g.amin(-1, keepdim=True).half().float()
        scale = ((g.amax(-1, keepdim=True) - lo) / 3).half().float().clamp_min(1e-8)
        q = ((g - lo) / scale).round().clamp(0, 3)
        out = (q * scale + lo).reshape(*x32.shape)[..., :n]
        return out.movedim(-1, dim).to(x.dtype)

    return quant(k, -2), quant(v, -1)


# Ablation methods: each a VQConfig variant run through the same code path. "vecinfer" is the
# shipped default (VQConfig's defaults); the others switch one lever at a time.
METHOD_OVERRIDES = {
    "vecinfer": {},
    "vecinfer-nosink": {"sink_tokens": 0},
    "paper": {"smooth": True, "hadamard": True, "key_mean": False, "value_mean": False, "sink_tokens": 0},
    "vq": {"smooth": False, "hadamard": False, "key_mean": False, "value_mean": False, "sink_tokens": 0},
    "smooth": {"smooth": True, "hadamard": False, "key_mean": False, "value_mean": False, "sink_tokens": 0},
    "hadamard": {"smooth": False, "hadamard": True, "key_mean": False, "value_mean": False, "sink_tokens": 0},
    "mean": {"smooth": False, "hadamard": False, "key_mean": True, "value_mean": False, "sink_tokens": 0},
    "sinks": {"smooth": False, "hadamard": False, "key_mean": False, "value_mean": False},
    "mean+hadamard": {"smooth": False, "hadamard": True, "key_mean": True, "sink_tokens": 0},
    "vecinfer-nosink+vmean": {"value_mean": True, "sink_tokens": 0},
    "vecinfer-nosink+head": {"granularity": "head", "sink_tokens": 0},
    "vecinfer-nosink+k2.5v1.5": {"key_bits": None, "value_bits": None, "key_sub_dim": 4, "key_code_bits": 10,
                                 "value_sub_dim": 4, "value_code_bits": 6, "sink_tokens": 0},
    "kivi": {"method": "kivi", "sink_tokens": 0},
    # levers on top of the default (issue 14), each run through the real cache and kernel path:
    # one codebook per KV head instead of one per layer
    "vecinfer+head": {"granularity": "head"},
    # query-aware smoothing scales (SmoothQuant's key/query range balance)
    "vecinfer+qscale": {"scale_rule": "query"},
    # bits moved between keys and values at a 2.0 average, as kernel presets: keys 3 bits (4-dim
    # sub-vectors, 4,096 centroids) and values 1 bit (8-dim, 256), or the reverse
    "vecinfer+k3v1": {"key_bits": None, "value_bits": None, "key_sub_dim": 4, "key_code_bits": 12,
                      "value_sub_dim": 8, "value_code_bits": 8},
    "vecinfer+k1v3": {"key_bits": None, "value_bits": None, "key_sub_dim": 8, "key_code_bits": 8,
                      "value_sub_dim": 4, "value_code_bits": 12},
    # the same at a 1.5 average: keys 2 bits, values 1 bit
    "vecinfer+k2v1": {"key_bits": None, "value_bits": None, "key_sub_dim": 4, "key_code_bits": 8,
                      "value_sub_dim": 8, "value_code_bits": 8},
    # keys 2 bits, values 1.5 bits (8-dim sub-vectors, 4,096 centroids): a 1.75 average, leaving
    # room for full-precision kept tokens within 2.0 bits per element
    "vecinfer+k2v15": {"key_bits": None, "value_bits": None, "key_sub_dim": 4, "key_code_bits": 8,
                       "value_sub_dim": 8, "value_code_bits": 12},
}


def build_quantizer(method: str, keys, values, bits: float = 2, residual: int = 128, progress: bool = True,
                    query_absmax=None, **overrides) -> KVQuantizer:
    """A calibrated quantizer for an ablation `method` (see METHOD_OVERRIDES) at `bits` per element
    (query_absmax: see KVQuantizer.calibrate)."""
    if method not in METHOD_OVERRIDES:
        raise ValueError(f"method: expected one of {sorted(METHOD_OVERRIDES)}, got {method!r}")
    fields = {"key_bits": bits, "value_bits": bits, "residual": residual, **METHOD_OVERRIDES[method], **overrides}
    if fields.get("method") == "kivi":
        fields.pop("key_bits"), fields.pop("value_bits")
    elif "key_sub_dim" in fields:  # explicit shapes at a fixed average: only at that average
        average = (fields["key_code_bits"] / fields["key_sub_dim"] + fields["value_code_bits"] / fields["value_sub_dim"]) / 2
        if float(bits) != average:
            raise ValueError(f"method {method!r} fixes its own bit widths ({average:g} bits on average); got bits={bits}")
    cfg = VQConfig(**fields)
    return KVQuantizer.calibrate(keys, values, cfg, progress=progress, query_absmax=query_absmax)

