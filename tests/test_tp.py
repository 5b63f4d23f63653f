"""Tensor parallelism: KVQuantizer.heads / shard, and VecInferCache under transformers' tensor
parallelism (tp_plan "auto", two ranks under torchrun with gloo on the CPU) against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import vecinfer

transformers = pytest.importorskip("transformers")

import tp_worker  # noqa: E402  (tests/ is on sys.path: the worker and this test share its helpers)
from vecinfer.hf_cache import VecInferCache, tensor_parallel_shard  # noqa: E402

WORLD = 2


def _quantizer(granularity, heads=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, 64, 64, generator=gen) * torch.rand(heads, 1, 64, generator=gen) * 4 for _ in range(2)]
    values = [torch.randn(heads, 64, 64, generator=gen) for _ in range(2)]
    cfg = vecinfer.VQConfig(granularity=granularity, value_mean=True, kmeans_iters=3)
    return vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_heads_encode_and_decode_like_the_whole_quantizer(granularity):
    """A quantizer of heads [a, b) codes and decodes those heads exactly as the whole one does."""
    whole = _quantizer(granularity)
    x = torch.randn(2, 4, 9, 64, generator=torch.Generator().manual_seed(1)) * 3
    for a, b in ((0, 2), (2, 4), (1, 3), (3, 4), (0, 4)):
        part = whole.heads(a, b)
        assert part.num_kv_heads == b - a and part.num_layers == whole.num_layers
        for layer in range(whole.num_layers):
            k_codes = whole.encode_keys(layer, x)
            v_codes = whole.encode_values(layer, x)
            assert torch.equal(part.encode_keys(layer, x[:, a:b]), k_codes[:, a:b])
            assert torch.equal(part.encode_values(layer, x[:, a:b]), v_codes[:, a:b])
            assert torch.equal(part.decode_keys(layer, k_codes[:, a:b].contiguous(), torch.float32),
                               whole.decode_keys(layer, k_codes, torch.float32)[:, a:b])
            assert torch.equal(part.decode_values(layer, v_codes[:, a:b].contiguous(), torch.float32),
                               whole.decode_values(layer, v_codes, torch.float32)[:, a:b])


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_shards_partition_the_heads(granularity, tmp_path):
    """Rank r of W holds heads [r H/W, (r+1) H/W): the shards' per-head tables are the whole
    table's rows in rank order; per-layer codebooks are the whole one's; a shard saves and loads."""
    whole = _quantizer(granularity)
    for world in (1, 2, 4):
        shards = [whole.shard(r, world) for r in range(world)]
        for layer in range(whole.num_layers):
            for name, t in whole.layers[layer].items():
                if t is None:
                    assert all(s.layers[layer][name] is None for s in shards)
                elif name.endswith("codebook") and granularity == "layer":
                    assert all(torch.equal(s.layers[layer][name], t) for s in shards)
                else:
                    assert torch.equal(torch.cat([s.layers[layer][name] for s in shards]), t)
    whole.shard(1, 2).save(str(tmp_path / "shard.safetensors"))
    loaded = vecinfer.KVQuantizer.load(str(tmp_path / "shard.safetensors"))
    assert loaded.num_kv_heads == 2
    assert all(torch.equal(loaded.layers[1][n], t) for n, t in whole.shard(1, 2).layers[1].items() if t is not None)


def test_shard_refuses_a_world_size_that_does_not_divide_the_heads():
    whole = _quantizer("head", heads=4)
    with pytest.raises(ValueError, match="3 ranks do not divide the 4 KV heads"):
        whole.shard(0, 3)
    for rank, world in ((2, 2), (-1, 2), (0, 0), (True, 2), (0, 2.0)):
        with pytest.raises(ValueError, match="rank, world_size"):
            whole.shard(rank, world)
    for start, stop in ((1, 1), (3, 2), (-1, 2), (0, 5), (0.0, 2)):
        with pytest.raises(ValueError, match="start, stop"):
            whole.heads(start, stop)


# --- two ranks under torchrun --------------------------------------------------------------------


def _tiny(family, heads, kv_heads, seed):
    common = dict(vocab_size=tp_worker.VOCAB, hidden_size=32 * heads, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=1024,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger random weights: sharper next-token distributions, fewer near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.generation_config.pad_token_id = 0
    return model


def _torchrun(script: str, *args: str, timeout: int = 240) -> None:
    """`torchrun --standalone --nproc-per-node 2 script args` on one CPU thread per rank, GPUs hidden
    (this is the gloo/CPU proof; transformers would otherwise put rank r on cuda:r, which a machine
    with one GPU lacks); fails the test with the ranks' output when it fails or hangs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", script, *args]
    try:
        run = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{(e.stderr or '')[-4000:]}")
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}"


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Saves the models and quantizers, runs tests/tp_worker.py on two ranks, and returns the
    folder and what each rank saw."""
    folder = tmp_path_factory.mktemp("tp")
    models = {"llama": _tiny("llama", 8, 4, 0), "qwen2": _tiny("qwen2", 4, 2, 1), "llama-3kv": _tiny("llama", 6, 3, 2)}
    for name, model in models.items():
        model.save_pretrained(str(folder / name))
    tp_worker.calibrate(models["llama"]).save(str(folder / "llama-layer.safetensors"))
    tp_worker.calibrate(models["llama"], "head").save(str(folder / "llama-head.safetensors"))
    tp_worker.calibrate(models["qwen2"]).save(str(folder / "qwen2-layer.safetensors"))
    tp_worker.calibrate(models["llama-3kv"]).save(str(folder / "llama-3kv.safetensors"))
    _torchrun(tp_worker.__file__, str(folder))
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(tp_worker.CASES))
def test_tensor_parallel_greedy_equals_one_process(tp_run, case):
    """Greedy tokens on both ranks equal the single-process run's, with the same quantizer file;
    the logits agree to float32 rounding (the ranks' partial sums are added in another order)."""
    folder, ranks = tp_run
    name, qfile = tp_worker.CASES[case]
    model = tp_worker.load(str(folder / name), tensor_parallel=False)
    whole = vecinfer.KVQuantizer.load(str(folder / qfile))
    cache, tokens, logits = tp_worker.generate(model, whole)
    assert cache.tensor_parallel is None and tensor_parallel_shard(model) is None
    heads = whole.num_kv_heads // WORLD
    for r, seen in enumerate(ranks):
        got = seen[case]
        assert torch.equal(got["tokens"], tokens), f"rank {r}"
        torch.testing.assert_close(got["logits"], logits, atol=2e-4, rtol=1e-4)
        # each rank's cache holds its heads only, with the whole quantizer's rows for them
        assert got["shard"] == (r, WORLD) and got["code_heads"] == heads
        for name, t in got["quantizer"].items():
            per_layer = name.endswith("codebook") and whole.config.granularity == "layer"
            assert torch.equal(t, whole.layers[0][name] if per_layer else whole.layers[0][name][r * heads:(r + 1) * heads])


def test_calibration_under_tensor_parallelism(tp_run):
    """vecinfer.hf.calibrate on the sharded model gathers every head's samples: both ranks return
    the same whole-model quantizer, close to the one-process calibration, and generation with it
    equals one process's generation with that file."""
    folder, ranks = tp_run
    files = [vecinfer.KVQuantizer.load(str(folder / f"tp-calibrated-rank{r}.safetensors")) for r in range(WORLD)]
    one = vecinfer.KVQuantizer.load(str(folder / "llama-layer.safetensors"))
    assert files[0].num_kv_heads == one.num_kv_heads == 4
    for layer in range(one.num_layers):
        for name, t in one.layers[layer].items():
            if t is None:
                continue
            assert all(torch.equal(f.layers[layer][name], files[0].layers[layer][name]) for f in files)
            if not name.endswith("codebook"):  # k-means itself may settle differently on samples this close
                torch.testing.assert_close(files[0].layers[layer][name], t, atol=1e-4, rtol=1e-4)
    model = tp_worker.load(str(folder / "llama"), tensor_parallel=False)
    _, tokens, logits = tp_worker.generate(model, files[0])
    for seen in ranks:
        assert torch.equal(seen["tp-calibrated"]["tokens"], tokens)
        torch.testing.assert_close(seen["tp-calibrated"]["logits"], logits, atol=2e-4, rtol=1e-4)


def test_world_size_not_dividing_the_kv_heads_is_refused(tp_run):
    _, ranks = tp_run
    for seen in ranks:
        assert seen["odd"] is not None and "2 does not divide the model's 3 KV heads" in seen["odd"]


def test_a_shard_of_a_quantizer_is_refused_by_one_process():
    """One process sees every KV head: a rank's shard does not fit it (the whole quantizer is expected)."""
    model = _tiny("llama", 8, 4, 0)
    whole = tp_worker.calibrate(model)
    with pytest.raises(ValueError, match="pass the whole model's quantizer"):
        VecInferCache(model, whole.shard(0, 2))


def test_tensor_parallel_benchmark_runs_on_the_cpu(tmp_path):
    """bench/tp_e2e.py, the GPU benchmark's script, on the CPU path (tiny model, gloo): every phase
    runs and the tokens under tensor parallelism equal one process's."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "tp_e2e.py")
    out = tmp_path / "tp.json"
    _torchrun(script, "--model", "tiny", "--prompt-tokens", "300", "--equality-tokens", "12", "--context", "400",
              "--new-tokens", "4", "--longest-start", "2048", "--json", str(out))
    summary = json.loads(out.read_text())
    assert summary["world_size"] == WORLD
    for name in ("vecinfer", "default"):
        got = summary["equality"][name]
        assert got["equal"] and got["tokens_tensor_parallel"] == got["tokens_one_process"]
        assert len(got["tokens_one_process"]) == 12
        forced = got["teacher_forced"]  # float32 on the CPU: the logits agree to rounding
        assert forced["steps"] == 12 and forced["argmax_equal_steps"] == 12 and not forced["argmax_differs"]
        assert forced["relative_diff"] < 1e-3, forced
    speed = summary["speed"]
    assert speed["prompt_tokens"] == 400 and speed["vecinfer_eager_ms_per_token"] > 0
    # each rank holds half the KV heads: its codes are smaller than its 16-bit cache
    assert 0 < speed["vecinfer_cache_bytes"] < speed["default_cache_bytes"]
    for kind in ("static", "vecinfer"):
        assert summary["longest"][kind]["max_tokens"] == 2048 and summary["longest"][kind]["ms_per_token"] > 0
