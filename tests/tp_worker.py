"""The tensor-parallel side of tests/test_tp.py, and what both sides share.

    torchrun --standalone --nproc-per-node 2 tests/tp_worker.py DIR

Every rank loads the tiny models test_tp.py saved in DIR with transformers' tensor parallelism
(tp_plan "auto", gloo on the CPU), generates greedily with a VecInferCache given the whole
quantizer file, calibrates under tensor parallelism, checks that a world size that does not divide
the KV heads is refused, and writes what it saw to DIR/rank<r>.pt for the test to compare with the
single-process run.
"""
from __future__ import annotations

import os
import sys

import torch

VOCAB = 96
NEW_TOKENS = 20
# (model folder, quantizer file) of each generation case
CASES = {"llama-layer": ("llama", "llama-layer.safetensors"),
         "llama-head": ("llama", "llama-head.safetensors"),
         "qwen2-layer": ("qwen2", "qwen2-layer.safetensors")}
CALIBRATION_TEXT = " ".join(f"w{(i * 7919) % 1000}" for i in range(300))


def tokenizer(text, add_special_tokens=True):
    """Bytes to ids in [3, VOCAB): the calibration texts' tokens (the tiny models have no tokenizer)."""
    return {"input_ids": [3 + b % (VOCAB - 3) for b in text.encode()]}


def calibration_config(granularity="layer"):
    import vecinfer

    # a short recent window and two sinks, so that most of each generation attends to codes
    return vecinfer.VQConfig(residual=8, sink_tokens=2, granularity=granularity, kmeans_iters=4)


def calibrate(model, granularity="layer"):
    import vecinfer.hf

    return vecinfer.hf.calibrate(model, tokenizer, CALIBRATION_TEXT, calibration_config(granularity),
                                 max_tokens=512, chunk=128, progress=False)


def prompt():
    """Two left-padded prompts (40 and 31 tokens) and their attention mask."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    return ids, mask


def generate(model, quantizer):
    """(cache, tokens [2, 40 + NEW_TOKENS], logits of every new token [NEW_TOKENS, 2, VOCAB])."""
    from vecinfer.hf_cache import VecInferCache

    ids, mask = prompt()
    cache = VecInferCache(model, quantizer)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    return cache, out.sequences, torch.stack(out.scores)


def load(path, tensor_parallel: bool):
    import transformers

    from vecinfer.hf import _from_pretrained

    kwargs = {}
    if tensor_parallel:
        try:
            kwargs["distributed_config"] = transformers.DistributedConfig(tp_plan="auto")
        except AttributeError:  # transformers 4.x
            kwargs["tp_plan"] = "auto"
    model = _from_pretrained(transformers.AutoModelForCausalLM, path, dtype=torch.float32, **kwargs)
    return model.eval()


def main(folder: str) -> None:
    import transformers

    import vecinfer
    from vecinfer.hf_cache import VecInferCache

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    rank = int(os.environ["RANK"])
    seen = {}
    models = {name: load(os.path.join(folder, name), tensor_parallel=True) for name in ("llama", "qwen2")}
    for case, (name, qfile) in CASES.items():
        quantizer = vecinfer.KVQuantizer.load(os.path.join(folder, qfile))
        cache, tokens, logits = generate(models[name], quantizer)
        layer = cache._codes_layers()[0]
        seen[case] = dict(tokens=tokens, logits=logits, shard=tuple(cache.tensor_parallel[:2]),
                          code_heads=cache.codes._key_codes[layer].shape[1],
                          quantizer={k: v for k, v in cache.quantizer.layers[0].items() if v is not None})
    # calibration under tensor parallelism, then generation with the quantizer it made
    quantizer = calibrate(models["llama"])
    quantizer.save(os.path.join(folder, f"tp-calibrated-rank{rank}.safetensors"))
    _, tokens, logits = generate(models["llama"], quantizer)
    seen["tp-calibrated"] = dict(tokens=tokens, logits=logits)
    # 3 KV heads over 2 ranks: refused when the cache is made
    odd = load(os.path.join(folder, "llama-3kv"), tensor_parallel=True)
    try:
        VecInferCache(odd, vecinfer.KVQuantizer.load(os.path.join(folder, "llama-3kv.safetensors")))
        seen["odd"] = None
    except ValueError as e:
        seen["odd"] = str(e)
    torch.save(seen, os.path.join(folder, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
