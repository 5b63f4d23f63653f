"""Quality through the path users run: a real model, a real KV cache object, streaming decode.

Every method is a transformers Cache that the model is run with, token blocks fed one after
another, as generation feeds them:
  - "fp": transformers' DynamicCache (full precision);
  - a vecinfer method (a `vecinfer.quantizer.METHOD_OVERRIDES` name: the default "vecinfer" and
    the levers "vecinfer+head", "vecinfer+k3v1", ...): `VecInferCache` with a calibrated
    quantizer: a prompt is attended in full precision and encoded, then every block of `block`
    tokens is appended (tokens leaving the recent window are encoded once) and attends to the
    codes through `QuantizedKVCache.attend` (on a GPU the fused kernel; on the CPU its reference);
  - a transformers QuantizedCache backend (`BASELINES`: "fp8", "quanto-int2", "quanto-int4",
    "hqq-int2", "hqq-int4"), with transformers' defaults (recent window of 128 tokens);
  - the fake-quantization proxy of a vecinfer method (`proxy_factory`, evaluate.py's attention),
    optionally with full-precision outlier tokens (`OutlierTokens`, a lever the kernel lacks).

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


def proxy_factory(model, quantizer) -> Callable[..., object]:
    """The fake-quantization proxy as a retrieval method: `make(prefilled)` copies the prefilled
    prompt into a full-precision DynamicCache, and `make.context()` is the block (evaluate's
    fake_quant_attention, incremental) in which the later tokens see the prompt's old positions
    compressed and decompressed by `quantizer`."""
    from .evaluate import fake_quant_attention

    make = cache_factory("fp", model)

    def make_proxy(prefilled=None):
        return make(prefilled)
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
            t0 = time.perf_counter()
            try:
                if outliers and not proxy:
                    raise ValueError("outlier tokens are not in the decode kernel: measure them as proxy:" + method)
                quant = _build(base, keys, values, args.bits, args.residual, args.sink_tokens, not args.quiet,
                               queries)
                if quant.config.method != "vq" and not proxy:
                    raise ValueError(f"method {quant.config.method!r} is a fake-quantization baseline (--path fakequant)")
            except Exception as e:  # one bad method should not lose the others
                log(f"{method}: {e}")
                row["error"] = str(e)
                continue
            row["config"] = quant.config.to_dict()
            if outliers:
                quant = OutlierTokens(quant, keys, 0.01)
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
        if isinstance(quant, OutlierTokens):
            report["methods"][m]["outlier_fraction"] = quant.kept / max(quant.seen, 1)
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


__all__ = ["BASELINES", "TASKS", "answer", "baseline_available", "cache_factory", "eval_real", "format_real_table",
           "perplexity", "retrieval", "retrieval_prompt", "stream"]
