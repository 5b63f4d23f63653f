"""VQConfig: how keys and values are compressed."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

# bits per element -> (sub-vector length, code width). bits/element = code_bits / sub_dim.
PRESETS = {4: (2, 8), 3: (4, 12), 2: (4, 8), 1.5: (8, 12), 1: (8, 8)}

METHODS = ("vq", "kivi")
SCALE_RULES = ("sqrt_max", "max", "std", "query")
GRANULARITIES = ("layer", "head")
_FLAGS = ("smooth", "hadamard", "key_mean", "value_mean")
# int fields and their smallest values; every int is below 2**31 (token counts are int32 in a cache)
_INTS = {"residual": 0, "sink_tokens": 0, "kivi_group": 1, "kmeans_iters": 1, "max_samples": 1, "seed": 0,
         "keep_tokens": 0}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _preset(bits, which: str):
    key = float(bits)
    for b, shape in PRESETS.items():
        if float(b) == key:
            return shape
    raise ValueError(f"{which}_bits: presets are {sorted(PRESETS)} bits/element, got {bits!r}; "
                     f"or give {which}_sub_dim and {which}_code_bits explicitly")


@dataclass(frozen=True)
class VQConfig:
    """Compression settings for keys and values (independently).

    key_bits / value_bits pick a preset (4, 3, 2, 1.5, 1 bits/element); key_sub_dim/key_code_bits
    (and value_*) set the sub-vector length (2, 4, 8) and code width (4..12 bits) explicitly.
    smooth: divide keys by per-(KV head, channel) scales; hadamard: rotate keys by Walsh-Hadamard;
    key_mean / value_mean: subtract a per-(KV head, channel) mean first (exact for attention: a
    key mean shifts all scores of a query equally, a value mean comes back out because the
    attention weights sum to one). scale_rule: how smoothing scales are computed from the keys
    ("sqrt_max", "max", "std"), or "query": sqrt(max|key| / max|query|) per channel, the
    SmoothQuant balance of key and query ranges (calibration then needs query statistics). residual: the most recent tokens kept in full precision;
    sink_tokens: the first tokens kept in full precision (default 4: on SmolLM2-135M adding
    them to the transforms took 2-bit perplexity from +17.8% to +4.0%, see QUALITY.md). granularity: one codebook per layer or
    per KV head. method "kivi" selects the KIVI-style scalar baseline (2 bits, group 32).
    keep_fraction, keep_tokens: of the E tokens of a sequence that have left the recent window,
    max(keep_tokens, round(keep_fraction * E)) (at most E) stay in full precision, chosen per layer
    by key novelty (how far a key lies from the mean of the `residual` keys before it, relative to
    its norm, summed over the KV heads); the attention reads them as it reads the sinks. Both 0
    (the default) keep none; kept tokens need a recent window (residual > 0). A budget of
    keep_tokens alone stops growing once E reaches it, so the decode steps after that all have
    the same shape of work (CUDAGraphDecoder captures them).
    key_gain: the key codebooks' centroids are multiplied by it after k-means (before the 8-bit
    grid). k-means decodes a key as the mean of its cell, which lies closer to the keys' mean than
    the key, so a key unlike the others (a fact's) scores lower against its query than it should,
    while the exact tokens (sinks, window, kept) do not; a gain > 1 gives the coded keys' spread
    back. 1 (the default) leaves the codebooks as k-means made them.
    """

    key_bits: Optional[float] = None
    value_bits: Optional[float] = None
    key_sub_dim: Optional[int] = None
    key_code_bits: Optional[int] = None
    value_sub_dim: Optional[int] = None
    value_code_bits: Optional[int] = None
    smooth: bool = True
    hadamard: bool = True
    key_mean: bool = True
    value_mean: bool = False
    scale_rule: str = "sqrt_max"
    residual: int = 128
    sink_tokens: int = 4
    granularity: str = "layer"
    method: str = "vq"
    kivi_group: int = 32
    kmeans_iters: int = 20
    max_samples: int = 65536
    seed: int = 0
    keep_fraction: float = 0.0
    keep_tokens: int = 0
    key_gain: float = 1.0

    def __post_init__(self):
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, low in _INTS.items():
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if not low <= value < 2**31:
                raise ValueError(f"{name} must be in [{low}, 2**31), got {value}")
        for name in ("scale_rule", "granularity", "method"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        for which in ("key", "value"):
            bits = getattr(self, f"{which}_bits")
            sub, code = getattr(self, f"{which}_sub_dim"), getattr(self, f"{which}_code_bits")
            for name, value in ((f"{which}_sub_dim", sub), (f"{which}_code_bits", code)):
                if value is not None and not _is_int(value):
                    raise TypeError(f"{name} must be an int, got {value!r}")
            if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float))):
                raise TypeError(f"{which}_bits must be a number, got {bits!r}")
            if sub is None and code is None:
                sub, code = _preset(2 if bits is None else bits, which)
            elif sub is None or code is None:
                raise ValueError(f"{which}_sub_dim and {which}_code_bits go together")
            elif bits is not None and float(bits) != code / sub:
                raise ValueError(f"{which}_bits={bits} contradicts {which}_code_bits/{which}_sub_dim = {code}/{sub}")
            if sub not in (2, 4, 8):
                raise ValueError(f"{which}_sub_dim must be 2, 4 or 8, got {sub}")
            if not 4 <= code <= 12:
                raise ValueError(f"{which}_code_bits must be from 4 to 12, got {code}")
            object.__setattr__(self, f"{which}_sub_dim", int(sub))
            object.__setattr__(self, f"{which}_code_bits", int(code))
            object.__setattr__(self, f"{which}_bits", code / sub)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        keep = self.keep_fraction
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise TypeError(f"keep_fraction must be a number, got {keep!r}")
        if not 0 <= keep < 1:
            raise ValueError(f"keep_fraction must be in [0, 1), got {keep!r}")
        object.__setattr__(self, "keep_fraction", float(keep))
        gain = self.key_gain
        if isinstance(gain, bool) or not isinstance(gain, (int, float)):
            raise TypeError(f"key_gain must be a number, got {gain!r}")
        if not 1 <= gain <= 4:  # also refuses NaN
            raise ValueError(f"key_gain must be in [1, 4], got {gain!r}")
        object.__setattr__(self, "key_gain", float(gain))
        if self.keeps_tokens and (self.residual == 0 or self.method != "vq"):
            raise ValueError("keep_fraction, keep_tokens: kept tokens are chosen as they leave the recent window, so "
                             f"they need residual > 0 and method 'vq' (got residual={self.residual}, "
                             f"method={self.method!r})")

    @property
    def keeps_tokens(self) -> bool:
        """Whether tokens that leave the recent window may stay in full precision."""
        return bool(self.keep_fraction or self.keep_tokens)

    def kept_budget(self, compressed: int) -> int:
        """How many of a sequence's `compressed` tokens (those that left the recent window) stay in
        full precision: max(keep_tokens, round(keep_fraction * compressed)), at most compressed."""
        return min(compressed, max(self.keep_tokens, int(self.keep_fraction * compressed + 0.5)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict of VQConfig fields, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VQConfig fields: {sorted(unknown)}")
        return cls(**d)
