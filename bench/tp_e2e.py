"""Tensor-parallel end-to-end decoding with vecinfer's compressed cache, launched with torchrun.

    torchrun --nproc-per-node 2 bench/tp_e2e.py --model llama-3.1-8b --phases equality,speed --json tp_8b.json
    torchrun --nproc-per-node 2 bench/tp_e2e.py --model llama-3.1-70b --phases speed --json tp_70b_speed.json
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
      torchrun --nproc-per-node 2 bench/tp_e2e.py --model llama-3.1-70b --phases longest --json tp_70b_longest.json
    torchrun --nproc-per-node 2 bench/tp_e2e.py --model tiny --context 600 --longest-start 4096   # CPU, gloo

Every rank builds the model with transformers' tensor parallelism (the model's own tp_plan: the
q/k/v projections split by columns, so each rank holds 1/W of the attention heads and of the KV
heads) from the configuration alone: random weights, nothing downloaded, no tokenizer. A weight's
values depend only on its name (a seeded normal draw of the whole tensor, of which each rank keeps
its shard), so a model in one process gets the same weights. GPUs use NCCL, CPUs gloo. Phases:

  equality  greedy tokens of a random prompt, VecInferCache under tensor parallelism against one
            process with the same quantizer (rank 0 also holds a whole copy of the model: an
            8B-shaped model fits one GPU, a 70B-shaped one does not); transformers' DynamicCache
            the same way, as the control for tensor parallelism's own rounding. Then the
            one-process tokens are fed to the tensor-parallel model and the logits of every step
            compared (a random-weight model's top logits are close, so bf16 greedy tokens part at
            the first near-tie; the logits say whether the runs agree beyond rounding)
  speed     `vecinfer bench --e2e`'s run (bench_e2e.run_one) under tensor parallelism at --context
            tokens: chunked prefill into DynamicCache, a 2-bit quantizer calibrated on the prompt's
            keys and values (every rank's heads gathered) unless --quantizer is given,
            VecInferCache.from_cache; ms per output token of the default cache (eager), StaticCache
            through CUDAGraphDecoder, VecInferCache eager and through CUDAGraphDecoder
  longest   the longest batch-1 context each cache holds: a StaticCache and a VecInferCache with
            synthetic contents (decoding reads every entry alike whatever its value), each made and
            decoded --new-tokens steps (through CUDAGraphDecoder on GPUs), from the length the free
            memory allows (less --margin-gib) down in steps of 5% until one runs

Rank 0 prints a JSON summary at the end (and writes it to --json); figures are per rank where they
are bytes. On GPUs it also checks the issue's bars where the figures allow ("bars": the longest
context at least 6x the 16-bit cache's; at --context, ms per token with CUDA graphs no worse than
the StaticCache's). Each phase is meant to take a few minutes on H200s. Run "longest" in a call of
its own with expandable segments (as above): the allocator's fragments from earlier phases would
otherwise shorten the contexts found.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import zlib

import torch
import torch.distributed as dist

from vecinfer import bench_e2e
from vecinfer.bench_e2e import GiB, LLAMA_31_8B, TINY, decode, eager_step, run_one, synthetic_cache

# Llama-3.1-70B's shape (without its RoPE scaling, like bench_e2e's 8B: speed does not depend on it)
LLAMA_31_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                    rope_theta=500000.0, max_position_embeddings=1 << 22, tie_word_embeddings=False)
MODELS = {"tiny": TINY, "llama-3.1-8b": LLAMA_31_8B, "llama-3.1-70b": LLAMA_31_70B}
PHASES = ("equality", "speed", "longest")
STD = 0.02  # transformers' initializer_range for Llama


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[tp_e2e] {msg}", file=sys.stderr, flush=True)


def setup(timeout_min: float) -> torch.device:
    """torch.distributed from torchrun's environment: NCCL and one GPU per rank, or gloo on the CPU."""
    if "RANK" not in os.environ:
        raise SystemExit("tp_e2e.py runs under torchrun: torchrun --nproc-per-node N bench/tp_e2e.py ...")
    timeout = datetime.timedelta(minutes=timeout_min)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return device


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """Every weight a normal(0, STD) draw seeded by its name (norm weights 1): the whole tensor is
    drawn on the weight's device and a rank keeps its shard, where DTensor's placement puts it (the
    rows transformers itself loads into the rank). A model in one process gets the same values."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if p.dim() == 1 and "norm" in name:
            local.fill_(1.0)
            continue
        gen = torch.Generator(device=local.device).manual_seed(seed + zlib.crc32(name.encode()))
        full = torch.empty(p.shape, dtype=local.dtype, device=local.device).normal_(0.0, STD, generator=gen)
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            full = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        local.copy_(full)
        del full


def build(spec: dict, device: torch.device, dtype: torch.dtype, tensor_parallel: bool, seed: int = 0):
    """The random-weight Llama of `spec`: sharded over the ranks by transformers' tp_plan (loaded
    from no checkpoint: each rank allocates only its shards, on its device), or whole on `device`."""
    import transformers

    from vecinfer.evaluate import _set_attn

    if tensor_parallel:
        config = transformers.LlamaConfig(**spec)
        model = transformers.LlamaForCausalLM.from_pretrained(
            None, config=config, state_dict={}, dtype=dtype, attn_implementation="sdpa",
            distributed_config=transformers.DistributedConfig(tp_size=dist.get_world_size()))
    else:
        model = bench_e2e.build_model(spec, device, dtype)
    init_weights(model, seed)
    _set_attn(model, "sdpa")
    return model.eval()


@torch.no_grad()
def greedy(model, ids: torch.Tensor, cache, new_tokens: int, keep_logits: bool = False):
    """(tokens, margins, logits): `new_tokens` greedy tokens after the prompt `ids` [1, P], the gap
    between the two largest logits at each (how close the choice was), and with keep_logits the
    float32 logits [new_tokens, V] each token was chosen from (else None)."""
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    tokens, margins, kept = [], [], []
    for _ in range(new_tokens):
        top = logits.float().topk(2, dim=-1)
        token = top.indices[:, :1]
        tokens.append(int(token))
        margins.append(float(top.values[0, 0] - top.values[0, 1]))
        if keep_logits:
            kept.append(logits[0].float())
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
    return tokens, margins, torch.stack(kept) if keep_logits else None


@torch.no_grad()
def teacher_forced_logits(model, ids: torch.Tensor, cache, tokens: list) -> torch.Tensor:
    """float32 logits [len(tokens), V]: after the prompt `ids`, then after each of tokens[:-1] fed
    in turn (the logits greedy() chose `tokens` from, when the model agrees with it)."""
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    rows = [logits.float()]
    for token in tokens[:-1]:
        step = torch.tensor([[token]], device=ids.device)
        rows.append(model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1].float())
    return torch.stack(rows)


def _logit_agreement(tp: torch.Tensor, one: torch.Tensor, tokens: list, margins: list) -> dict:
    """How far the tensor-parallel logits `tp` are from the one-process logits `one` (both
    [steps, V], the same tokens fed): the largest difference against the logits' spread, and the
    steps whose argmax differs, each with its one-process margin (a tie within rounding when the
    margin is below twice that step's difference)."""
    diff = (tp - one).abs().amax(dim=-1)
    argmax = tp.argmax(dim=-1).tolist()
    differ = [dict(step=i, margin=margins[i], max_abs_diff=float(diff[i])) for i, t in enumerate(tokens)
              if argmax[i] != t]
    return dict(steps=len(tokens), argmax_equal_steps=len(tokens) - len(differ), argmax_differs=differ,
                max_abs_logit_diff=float(diff.max()), logit_std=float(one.std(dim=-1).mean()),
                relative_diff=float(diff.max() / one.std(dim=-1).mean()))


def _compare(a, b, margins):
    same = a == b
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return dict(equal=same, first_mismatch=first, margin_at_mismatch=None if first is None else margins[first])


def _new_dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def _random_prompt(spec, tokens: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)  # the same ids on every rank
    return torch.randint(0, spec["vocab_size"], (1, tokens), generator=gen, device=device)


def _calibrate_on_prompt(model, ids: torch.Tensor):
    """The default 2-bit quantizer calibrated on the keys and values of the prompt `ids` (every
    rank's heads; the same quantizer on every rank)."""
    from vecinfer.bench_e2e import calibrate_on_cache

    cache = _new_dynamic_cache(model)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return calibrate_on_cache(model, cache)


def phase_equality(model, spec, device, dtype, args, quantizer):
    """(figures, quantizer): greedy tokens under tensor parallelism against one process, then the
    one-process tokens fed to the tensor-parallel model (teacher forcing) and the logits compared
    step by step: greedy tokens part at the first near-tie that the two runs' rounding (different
    reduction orders in bf16) decides differently, which says little about the rest."""
    from vecinfer.hf_cache import VecInferCache

    def caches(m):
        return {"vecinfer": VecInferCache(m, quantizer), "default": _new_dynamic_cache(m)}

    ids = _random_prompt(spec, args.prompt_tokens, device, seed=1)
    if quantizer is None:
        quantizer = _calibrate_on_prompt(model, ids)
    log(f"equality: {args.equality_tokens} greedy tokens after {args.prompt_tokens} prompt tokens, tensor parallel")
    tp = {name: greedy(model, ids, cache, args.equality_tokens) for name, cache in caches(model).items()}
    out, one = None, None
    if dist.get_rank() == 0:
        log("equality: the same in one process (rank 0 holds a whole copy of the model)")
        single = build(spec, device, dtype, tensor_parallel=False)
        one = {name: greedy(single, ids, cache, args.equality_tokens, keep_logits=True)
               for name, cache in caches(single).items()}
        del single
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # the other ranks wait while rank 0 runs the single-process model, then take its tokens
    fed = [{name: one[name][0] for name in one} if one else None]
    dist.broadcast_object_list(fed, src=0)
    log("equality: the one-process tokens fed to the tensor-parallel model")
    forced = {name: teacher_forced_logits(model, ids, cache, fed[0][name]) for name, cache in caches(model).items()}
    if dist.get_rank() == 0:
        out = {name: dict(_compare(tp[name][0], one[name][0], one[name][1]), tokens_tensor_parallel=tp[name][0],
                          tokens_one_process=one[name][0], min_margin=min(one[name][1]),
                          teacher_forced=_logit_agreement(forced[name], one[name][2], one[name][0], one[name][1]))
               for name in ("vecinfer", "default")}
        out.update(prompt_tokens=args.prompt_tokens, new_tokens=args.equality_tokens)
    return out, quantizer


def _static_cache(model, heads: int, tokens: int, max_tokens: int):
    """A StaticCache holding `tokens` tokens (one real token per layer; the count set on the device:
    a StaticCache attends to its whole buffer, masked, whatever it holds)."""
    from transformers.cache_utils import StaticCache

    cfg = model.config
    device = next(model.parameters()).device
    cache = StaticCache(config=cfg, max_cache_len=max_tokens)
    for i, layer in enumerate(cache.layers):
        k = torch.randn((1, heads, 1, cfg.head_dim), device=device, dtype=model.dtype)
        cache.update(k, torch.randn_like(k), i)
        layer.cumulative_length.fill_(tokens)
    return cache


def _all_ranks(ok: bool, device: torch.device) -> bool:
    """Whether `ok` holds on every rank (a rank that failed must not be waited for in a collective)."""
    flag = torch.tensor([1 if ok else 0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(int(flag))


def _decode_at(model, quantizer, kind: str, tokens: int, heads: int, new_tokens: int):
    """Makes a `kind` cache of `tokens` tokens and decodes new_tokens steps (through
    CUDAGraphDecoder on a GPU); (ms per token, None) or (None, why not). Running out of memory is
    caught where it happens on every rank alike (making the cache; the first steps), so the ranks
    agree before going on."""
    from vecinfer.evaluate import _set_attn
    from vecinfer.hf_cache import CUDAGraphDecoder

    device = next(model.parameters()).device
    cache = step = None
    error = None
    try:
        if kind == "static":
            _set_attn(model, "sdpa")
            cache = _static_cache(model, heads, tokens, tokens + new_tokens + 2)
        else:
            cache = synthetic_cache(model, quantizer, tokens=tokens, max_tokens=tokens + new_tokens + 2)
    except torch.OutOfMemoryError as e:
        error = f"making the cache: OutOfMemoryError: {str(e).splitlines()[0][:200]}"
    ms = None
    if _all_ranks(error is None, device):
        try:
            step = CUDAGraphDecoder(model, cache, max_new_tokens=new_tokens + 2) if device.type == "cuda" \
                else eager_step(model, cache)
            token, _ = decode(step, torch.zeros(1, dtype=torch.long, device=device), 2)  # capture and a replay
            _, seconds = decode(step, token, new_tokens)
            ms = 1e3 * seconds / new_tokens
        except torch.OutOfMemoryError as e:
            error = f"decoding: OutOfMemoryError: {str(e).splitlines()[0][:200]}"
        if not _all_ranks(error is None, device):
            ms = None
    error = error or (None if ms is not None else "another rank ran out of memory")
    del step, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms, error


def phase_longest(model, device, args, quantizer) -> dict:
    from vecinfer.ops import code_row_bytes

    cfg, q = model.config, quantizer.config
    world = dist.get_world_size()
    heads = cfg.num_key_value_heads // world
    layers = cfg.num_hidden_layers
    per_token = {"static": layers * 2 * heads * cfg.head_dim * torch.finfo(model.dtype).bits // 8,
                 "vecinfer": layers * heads * (code_row_bytes(cfg.head_dim, q.key_sub_dim, q.key_code_bits)
                                               + code_row_bytes(cfg.head_dim, q.value_sub_dim, q.value_code_bits))}
    cap = args.max_context or cfg.max_position_embeddings
    out = dict(bytes_per_token_per_rank=per_token, max_context_cap=cap)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free = torch.tensor([torch.cuda.mem_get_info(device)[0]], device=device)
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
        out["free_bytes_per_rank"] = int(free)
        budget = int(free) - int(args.margin_gib * GiB)
    elif args.longest_start is None:
        out["skipped"] = "on the CPU give --longest-start (no device memory to size the caches from)"
        return out
    for kind in ("static", "vecinfer"):
        tokens = args.longest_start or min(budget // per_token[kind], cap - args.new_tokens - 2)
        tried = []
        for _ in range(args.longest_tries):
            tokens = tokens // 1024 * 1024
            log(f"longest: {kind} cache at {tokens:,} tokens")
            ms, error = _decode_at(model, quantizer, kind, tokens, heads, args.new_tokens)
            tried.append(dict(tokens=tokens, ms_per_token=ms, error=error))
            if error is None or device.type != "cuda":
                break
            tokens = int(tokens * 0.95)
        fit = [t for t in tried if t["error"] is None]
        out[kind] = dict(max_tokens=fit[0]["tokens"] if fit else None, ms_per_token=fit[0]["ms_per_token"] if fit
                         else None, tried=tried, capped=bool(fit) and fit[0]["tokens"] >= (cap - args.new_tokens - 2)
                         // 1024 * 1024)
    return out


def bars(summary: dict) -> dict:
    """The issue's bars, from the figures: >= 6x the 16-bit cache's longest context, and at the
    speed phase's context ms per token no worse than the StaticCache's (CUDA graphs on both)."""
    out = {}
    longest = summary.get("longest") or {}
    a, b = (longest.get("vecinfer") or {}).get("max_tokens"), (longest.get("static") or {}).get("max_tokens")
    if a and b:
        out["longest_context_ratio"] = a / b
        out["longest_context_at_least_6x"] = a / b >= 6
    row = summary.get("speed") or {}
    if "vecinfer_graph_ms_per_token" in row and "static_graph_ms_per_token" in row:
        out["graph_ms_per_token_vecinfer_over_static"] = row["vecinfer_graph_ms_per_token"] / row[
            "static_graph_ms_per_token"]
        out["graph_ms_per_token_no_worse"] = row["vecinfer_graph_ms_per_token"] <= row["static_graph_ms_per_token"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="model shape (default llama-3.1-8b on GPUs, tiny on the CPU)")
    parser.add_argument("--phases", default="equality,speed,longest", help=f"comma-separated, of {PHASES}")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="equality: prompt tokens")
    parser.add_argument("--equality-tokens", type=int, default=32, help="equality: greedy tokens compared")
    parser.add_argument("--context", type=int, default=131072, help="speed: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="speed and longest: tokens decoded")
    parser.add_argument("--quantizer", default=None, help="a saved quantizer (whole model) instead of calibrating")
    parser.add_argument("--margin-gib", type=float, default=4.0, help="longest: memory per rank kept free")
    parser.add_argument("--longest-start", type=int, default=None, help="longest: first length tried "
                        "(default: what the free memory allows; on the CPU the only length tried)")
    parser.add_argument("--longest-tries", type=int, default=8, help="longest: lengths tried per cache")
    parser.add_argument("--max-context", type=int, default=None, help="longest: at most this many tokens "
                        "(default the config's max_position_embeddings)")
    parser.add_argument("--timeout-min", type=float, default=10.0,
                        help="collective timeout: a rank stuck this long ends the run")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="the model's dtype on GPUs (float32 on the CPU)")
    parser.add_argument("--json", default=None, help="also write the summary here (rank 0)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or any(p not in PHASES for p in phases):
        parser.error(f"--phases: expected a comma-separated list of {PHASES}, got {args.phases!r}")

    import transformers

    from vecinfer.quantizer import KVQuantizer

    transformers.logging.set_verbosity_error()
    device = setup(args.timeout_min)
    name = args.model or ("llama-3.1-8b" if device.type == "cuda" else "tiny")
    spec = MODELS[name]
    if name == "llama-3.1-70b" and "equality" in phases:
        parser.error("--phases equality needs the whole model on rank 0's device: use llama-3.1-8b or tiny")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    world = dist.get_world_size()
    log(f"building {name} over {world} ranks ({device.type}, {dtype})")
    t0 = time.perf_counter()
    model = build(spec, device, dtype, tensor_parallel=True)
    summary = dict(model=name, spec=spec, world_size=world, device=torch.cuda.get_device_name(device)
                   if device.type == "cuda" else "cpu", dtype=str(dtype), torch=torch.__version__,
                   transformers=transformers.__version__, build_s=time.perf_counter() - t0)
    log(f"built in {summary['build_s']:.1f} s")
    quantizer = KVQuantizer.load(args.quantizer, device=device) if args.quantizer else None
    for phase in phases:
        t0 = time.perf_counter()
        log(f"phase {phase}")
        if phase == "equality":
            summary["equality"], quantizer = phase_equality(model, spec, device, dtype, args, quantizer)
        elif phase == "speed":
            summary["speed"], quantizer = run_one(model, 1, args.context, args.new_tokens, quantizer)
        else:
            if quantizer is None:  # only the default 2-bit quantizer's layout matters here
                quantizer = _calibrate_on_prompt(model, _random_prompt(spec, 512, device, seed=2))
            summary["longest"] = phase_longest(model, device, args, quantizer)
        summary[f"{phase}_s"] = time.perf_counter() - t0
        log(f"phase {phase}: {summary[f'{phase}_s']:.1f} s")
    if device.type == "cuda" and args.longest_start is None:  # the bars need GPU-memory-sized runs
        summary["bars"] = bars(summary)
    if dist.get_rank() == 0:
        text = json.dumps(summary, indent=1)
        print(text, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
