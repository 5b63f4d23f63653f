"""vecinfer: a 2-bit vector-quantized KV cache with attention on the compressed codes."""
from __future__ import annotations

import torch  # noqa: F401  (the extension receives torch tensors; import torch first)

from . import _C
from .config import VQConfig
from .quantizer import KVQuantizer
from .cache import QuantizedKVCache
from .paged import PagedKVCache
from .ops import (
    attention,
    code_row_bytes,
    hadamard,
    inverse_transform_keys,
    merge_states,
    snap_codebook,
    transform_keys,
    transform_queries,
    unpack_codes,
    vq_decode,
    vq_encode,
)

__version__ = "0.1.0"


def cuda_built() -> bool:
    """Whether the compiled core contains the CUDA kernels (False for a CPU-only build)."""
    return _C.cuda_built()


def cuda_available() -> bool:
    """Whether CUDA tensors can be used: kernels built, a GPU present and recent enough (sm_80+)."""
    if not (_C.cuda_built() and torch.cuda.is_available()):
        return False
    try:
        _C.check_device()
    except RuntimeError:
        return False
    return True


__all__ = [
    "attention",
    "KVQuantizer",
    "PagedKVCache",
    "QuantizedKVCache",
    "VQConfig",
    "code_row_bytes",
    "cuda_available",
    "cuda_built",
    "hadamard",
    "inverse_transform_keys",
    "merge_states",
    "snap_codebook",
    "transform_keys",
    "transform_queries",
    "unpack_codes",
    "vq_decode",
    "vq_encode",
]
