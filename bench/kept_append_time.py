"""GPU time of one decode step's append with and without kept tokens (QuantizedKVCache, one layer,
Llama-3.1-8B's 8 KV heads of 128 dims, a 4,096-token prompt): eager calls, CUDA-synchronised."""
import time

import torch

from vecinfer.bench import random_quantizer
from vecinfer.cache import QuantizedKVCache

for keep in (0.0, 0.01):
    q = random_quantizer(8, 128).replace(keep_fraction=keep)
    for batch in (1, 32):
        cache = QuantizedKVCache(q, batch, 8, 128, 8192, device="cuda", dtype=torch.float16)
        prompt = torch.randn((batch, 8, 4096, 128), device="cuda", dtype=torch.float16)
        cache.append(0, prompt, prompt)
        step = torch.randn((batch, 8, 1, 128), device="cuda", dtype=torch.float16)
        for _ in range(5):
            cache.append(0, step, step)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            cache.append(0, step, step)
        torch.cuda.synchronize()
        print(f"keep_fraction {keep}: batch {batch}: {(time.perf_counter() - t0) / 50 * 1e6:.0f} us per append")
