"""Attention on the compressed cache (vecinfer.attention): the CPU reference and the CUDA kernel
against an independent float64 reference (numpy bit unpacking, explicit Hadamard matrix, plain
softmax), on random and real K/V, awkward lengths, mixed lengths in a batch, empty parts."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import vecinfer
from conftest import CUDA, codebook_for_heads, hadamard_matrix, table_for_heads, unpack_codes

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm_80+)")
# bits/element preset -> (sub_dim, code_bits)
PRESETS = {4: (2, 8), 3: (4, 12), 2: (4, 8), 1.5: (8, 12), 1: (8, 8)}


class Case:
    """Random compressed-cache inputs; everything on the CPU until .to(device)."""

    def __init__(self, gen, *, batch=2, hkv=2, group=4, tq=1, d=128, key_bits=2, value_bits=2, lengths,
                 dtype=torch.float16, capacity=None, per_head=False, transforms=True, value_mean=True):
        ks, kb = PRESETS[key_bits]
        vs, vb = PRESETS[value_bits]
        self.d, self.group, self.tq, self.dtype = d, group, tq, dtype
        self.lengths = torch.tensor(lengths, dtype=torch.int32).reshape(batch, 3)
        sink_cap = max(int(self.lengths[:, 0].max()), 1)
        recent_cap = max(int(self.lengths[:, 2].max()), 1)
        coded_max = int(self.lengths[:, 1].max())
        cap = capacity if capacity is not None else (coded_max + 15) // 16 * 16 + 16
        groups = hkv if per_head else 1

        def randn(*shape, s=1.0):
            return torch.randn(shape, generator=gen, dtype=torch.float64).mul(s)

        self.q = randn(batch, hkv * group, tq, d, s=1.5).to(dtype)
        self.sink_k = randn(batch, hkv, sink_cap, d, s=2).to(dtype)
        self.sink_v = randn(batch, hkv, sink_cap, d).to(dtype)
        self.recent_k = randn(batch, hkv, recent_cap, d, s=2).to(dtype)
        self.recent_v = randn(batch, hkv, recent_cap, d).to(dtype)
        # on the kernel's 8-bit centroid grid, as KVQuantizer's codebooks are
        self.key_codebook = vecinfer.snap_codebook(randn(groups, 1 << kb, ks, s=1.2).float())
        self.value_codebook = vecinfer.snap_codebook(randn(groups, 1 << vb, vs).float())
        self.key_codes = torch.randint(0, 256, (batch, hkv, cap, d // ks * kb // 8), generator=gen, dtype=torch.uint8)
        self.value_codes = torch.randint(0, 256, (batch, hkv, cap, d // vs * vb // 8), generator=gen, dtype=torch.uint8)
        self.key_scale = (torch.rand((hkv, d), generator=gen) * 1.5 + 0.5) if transforms else None
        self.key_mean = randn(hkv, d).float() if transforms else None
        self.hadamard = transforms
        self.value_mean = randn(hkv, d, s=0.5).float() if value_mean else None
        self.shapes = ((ks, kb), (vs, vb))

    def to(self, device):
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and name != "lengths":
                setattr(self, name, value.to(device))
        return self

    def run(self, q=None, **kw):
        key_codes, value_codes = (self.key_pool, self.value_pool) if self.page_table is not None else \
            (self.key_codes, self.value_codes)
        return vecinfer.attention(self.q if q is None else q, key_codes, value_codes, self.lengths, self.key_codebook,
                                  self.value_codebook, sink_keys=self.sink_k, sink_values=self.sink_v,
                                  recent_keys=self.recent_k, recent_values=self.recent_v, key_scale=self.key_scale,
                                  key_mean=self.key_mean, value_mean=self.value_mean, hadamard=self.hadamard,
                                  page_table=self.page_table, **kw)

    page_table = None

    def page(self, gen, page_size, shared_pages=0):
        """Moves the codes into page pools in shuffled order, with spare pages of random bytes; with
        shared_pages, sequence 1 reads sequence 0's first pages (its codes are made equal first)."""
        b, hkv, cap, _ = self.key_codes.shape
        assert cap % page_size == 0
        per = cap // page_size
        if shared_pages:
            n = shared_pages * page_size
            self.key_codes[1, :, :n] = self.key_codes[0, :, :n]
            self.value_codes[1, :, :n] = self.value_codes[0, :, :n]
        total = b * per + 3
        ids = torch.randperm(total, generator=gen)[: b * per].reshape(b, per).to(torch.int32)
        if shared_pages:
            ids[1, :shared_pages] = ids[0, :shared_pages]
        pools = []
        for codes in (self.key_codes, self.value_codes):
            pool = torch.randint(0, 256, (total, hkv, page_size, codes.shape[-1]), generator=gen, dtype=torch.uint8)
            for s in range(b):
                for i in range(per):
                    pool[int(ids[s, i])] = codes[s, :, i * page_size:(i + 1) * page_size].cpu()
            pools.append(pool.to(codes.device))
        self.key_pool, self.value_pool = pools
        self.page_table = ids.to(self.key_codes.device)
        return self

    def dequantized(self, b):
        """float64 (keys, values) [Hkv, n_b, D] of sequence b in original coordinates (on the CPU)."""
        (ks, kb), (vs, vb) = self.shapes
        d, hkv = self.d, self.key_codes.shape[1]
        sinks, coded, recent = (int(x) for x in self.lengths[b])

        def decode(codes, codebook, sub, bits):
            idx = unpack_codes(codes[b, :, :coded].cpu(), bits, d // sub)  # [H, T, M]
            books = codebook_for_heads(codebook, hkv)  # [H, C, S]
            return torch.stack([books[h][idx[h]] for h in range(hkv)]).reshape(hkv, coded, d)

        keys = decode(self.key_codes, self.key_codebook, ks, kb)
        if self.hadamard:
            keys = keys @ hadamard_matrix(d)
        if self.key_scale is not None:
            keys = keys * table_for_heads(self.key_scale.cpu(), hkv)
        if self.key_mean is not None:
            keys = keys + table_for_heads(self.key_mean.cpu(), hkv)
        values = decode(self.value_codes, self.value_codebook, vs, vb)
        if self.value_mean is not None:
            values = values + table_for_heads(self.value_mean.cpu(), hkv)
        k = torch.cat([self.sink_k[b, :, :sinks].cpu().double(), keys, self.recent_k[b, :, :recent].cpu().double()], 1)
        v = torch.cat([self.sink_v[b, :, :sinks].cpu().double(), values, self.recent_v[b, :, :recent].cpu().double()], 1)
        return k, v

    def reference(self, scale=None, low_precision=None, counts=None):
        """float64 attention (or, with low_precision=dtype, plain PyTorch at that precision on the
        inputs rounded to it, to measure the error an unfused implementation makes). With counts
        (ragged queries), sequence b's queries are the first counts[b] of self.q[b], and the result
        is packed: out [total, Hq, D], lse [total, Hq]."""
        b_, hq, tq_max, d = self.q.shape
        scale = 1 / math.sqrt(d) if scale is None else scale
        outs, lses = [], []
        for b in range(b_):
            tq = tq_max if counts is None else counts[b]
            k, v = self.dequantized(b)
            n = k.shape[1]
            q = self.q[b, :, :tq].cpu().double().reshape(k.shape[0], self.group * tq, d)
            if low_precision is not None:
                dev = self.q.device
                qq, kk, vv = (x.to(dev).to(low_precision) for x in (q, k, v))
                s = (qq @ kk.transpose(-1, -2)) * scale
            else:
                s = (q @ k.transpose(-1, -2)) * scale
            pos = (n - tq + torch.arange(tq)).repeat(self.group).to(s.device)
            mask = torch.arange(n, device=s.device)[None, :] > pos[:, None]
            s = s.masked_fill(mask, float("-inf"))
            if low_precision is not None:
                o = torch.softmax(s.float(), -1).to(low_precision) @ vv
                outs.append(o.double().cpu().reshape(hq, tq, d))
            else:
                outs.append((torch.softmax(s, -1) @ v).reshape(hq, tq, d))
                lses.append(torch.logsumexp(s, -1).reshape(hq, tq))
        if counts is not None:  # packed: [count, Hq, ...] per sequence
            out = torch.cat([o.transpose(0, 1) for o in outs])
            lse = torch.cat([x.transpose(0, 1) for x in lses]) if lses else None
            return (out, lse) if low_precision is None else out
        out = torch.stack(outs)
        return (out, torch.stack(lses)) if low_precision is None else out

    def packed_queries(self, counts):
        """(q packed [total, Hq, D], query_indptr int32 [B + 1]) of the first counts[b] queries of
        each sequence, on q's device."""
        q = torch.cat([self.q[b, :, :c].transpose(0, 1) for b, c in enumerate(counts)]).contiguous()
        indptr = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32, device=self.q.device)
        return q, indptr


def check(case, device, scale=None, counts=None):
    """The op on `device` against the float64 reference, by FlashAttention's rule: error at most
    twice plain PyTorch's at the same precision, plus a floor. Poisoned output, NaN check, LSE.
    With counts (ragged queries), sequence b attends with its first counts[b] queries, packed."""
    case.to(device)
    q, indptr = case.packed_queries(counts) if counts is not None else (case.q, None)
    poison = torch.full_like(q, float("nan"))
    out, lse = case.run(q=q, query_indptr=indptr, scale=scale, return_lse=True, out=poison)
    assert out.data_ptr() == poison.data_ptr() and lse.shape == q.shape[:-1]
    ref, ref_lse = case.reference(scale, counts=counts)
    got = out.double().cpu()
    assert not torch.isnan(got).any(), "NaN in the output (unwritten or poisoned)"
    err = float((got - ref).abs().max())
    if case.dtype == torch.float32:
        bound = 1e-5 * max(1.0, float(ref.abs().max()))
    else:
        torch_err = float((case.reference(scale, low_precision=case.dtype, counts=counts) - ref).abs().max())
        bound = 2 * torch_err + 2e-3 * max(1.0, float(ref.abs().max()))
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e}"
    lse_err = float((lse.double().cpu() - ref_lse).abs().max())
    assert lse_err <= 1e-2 * max(1.0, float(ref_lse.abs().max())), f"lse error {lse_err:.3e}"


# ---- CPU reference path (runs in CI) ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("bits", [(2, 2), (4, 1.5), (3, 1)])
def test_cpu_matches_float64_reference(gen, dtype, d, bits):
    case = Case(gen, d=d, dtype=dtype, key_bits=bits[0], value_bits=bits[1], tq=2,
                lengths=[4, 37, 9, 0, 17, 3])
    check(case, "cpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("page_size,shared", [(16, 0), (32, 2), (64, 1)])
def test_paged_codes(gen, device, page_size, shared):
    """Codes in page pools, pages shuffled (and shared between two sequences): the same function."""
    case = Case(gen, d=128, tq=2, lengths=[4, 300, 40, 2, 187, 9], capacity=320)
    check(case.page(gen, page_size, shared_pages=shared), device)


def test_paged_codes_rejects_bad_page_ids(gen):
    case = Case(gen, d=64, lengths=[4, 40, 16, 2, 10, 3], capacity=64).page(gen, 16)
    case.page_table[1, 0] = case.key_pool.shape[0]
    with pytest.raises(ValueError, match="page ids"):
        case.run()
    case.page_table = case.page_table[:, :2].contiguous().float()
    with pytest.raises(TypeError, match="page_table"):
        case.run()
    case = Case(gen, d=64, lengths=[4, 40, 16, 2, 10, 3], capacity=64).page(gen, 16)
    case.key_pool, case.value_pool = case.key_pool[:, :, :12].contiguous(), case.value_pool[:, :, :12].contiguous()
    with pytest.raises(ValueError, match="power of two"):
        case.run()


@pytest.mark.parametrize("counts", [[3, 0, 5], [1, 1, 1], [0, 7, 2]])
def test_cpu_ragged_queries(gen, counts):
    """Packed queries with query_indptr: each sequence attends with its own number of queries
    (none included), causal at the end of its own sequence."""
    case = Case(gen, batch=3, d=64, tq=7, dtype=torch.float32, lengths=[4, 40, 9, 0, 17, 7, 2, 30, 1])
    check(case, "cpu", counts=counts)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_ragged_queries_reject_bad_indptr(gen, device):
    case = Case(gen, batch=2, d=64, tq=4, lengths=[4, 40, 9, 0, 17, 7]).to(device)
    q, indptr = case.packed_queries([4, 2])
    for bad, match in [([1, 4, 6], "rise from 0"), ([0, 4, 5], "rise from 0"), ([0, 5, 4], "never falling"),
                       ([0, 7, 6], "never falling")]:
        with pytest.raises(ValueError, match=match):
            case.run(q=q, query_indptr=torch.tensor(bad, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="int32"):
        case.run(q=q, query_indptr=indptr.long())
    with pytest.raises(ValueError, match="packed"):
        case.run(q=case.q, query_indptr=indptr)
    with pytest.raises(ValueError, match="max_queries"):
        case.run(q=q, query_indptr=indptr, max_queries=0)
    with pytest.raises(ValueError, match="without query_indptr"):
        case.run(max_queries=4)
    with pytest.raises(TypeError, match="max_queries"):
        case.run(q=q, query_indptr=indptr, max_queries=4.0)
    with pytest.raises(ValueError, match="fewer tokens than its queries"):
        case.lengths[1] = torch.tensor([0, 1, 0], dtype=torch.int32)
        case.run(q=q, query_indptr=indptr)


@pytest.mark.parametrize("group,tq", [(1, 1), (4, 3), (16, 2)])
@pytest.mark.parametrize("per_head", [False, True])
def test_cpu_groups_and_queries(gen, group, tq, per_head):
    case = Case(gen, d=64, group=group, tq=tq, per_head=per_head, dtype=torch.float32, lengths=[2, 20, 5, 1, 3, 0])
    check(case, "cpu", scale=0.3)


# ---- CUDA kernel ------------------------------------------------------------------------------

LENGTHS = [1, 17, 127, 128, 129, 4097]


@needs_cuda
@pytest.mark.parametrize("coded", LENGTHS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_lengths_and_dims(gen, coded, d, dtype):
    case = Case(gen, d=d, dtype=dtype, lengths=[4, coded, 128, 0, max(coded // 3, 1), 5])
    check(case, "cuda")


@needs_cuda
@pytest.mark.parametrize("key_bits", [4, 3, 2, 1.5, 1])
@pytest.mark.parametrize("value_bits", [4, 3, 2, 1.5, 1])
def test_cuda_bit_presets(gen, key_bits, value_bits):
    case = Case(gen, d=128, key_bits=key_bits, value_bits=value_bits, lengths=[4, 300, 128, 2, 77, 40])
    check(case, "cuda")


@needs_cuda
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("tq", [1, 2, 4, 16])
def test_cuda_groups_and_queries(gen, group, tq):
    # recent window shorter than Tq for one sequence: the causal mask then reaches coded tokens
    case = Case(gen, d=64, group=group, tq=tq, lengths=[4, 200, 128, 0, 150, 3], per_head=group == 4)
    check(case, "cuda")


@needs_cuda
@pytest.mark.parametrize("lengths", [
    [4, 0, 100, 0, 0, 7],             # no coded tokens at all
    [0, 1000, 0, 3, 50, 0],           # empty recent windows, no sinks
    [4, 20000, 128, 0, 3, 1],         # very different lengths in one batch
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_empty_parts_and_mixed_lengths(gen, lengths, dtype):
    check(Case(gen, d=128, dtype=dtype, tq=4, lengths=lengths), "cuda")


@needs_cuda
@pytest.mark.parametrize("transforms,value_mean", [(False, False), (True, False), (False, True)])
def test_cuda_without_transforms(gen, transforms, value_mean):
    check(Case(gen, d=128, transforms=transforms, value_mean=value_mean, lengths=[4, 500, 64, 4, 250, 128]), "cuda")


@needs_cuda
def test_cuda_long_sequence(gen):
    # 100003 coded tokens: split-KV across the GPU, exact merge
    check(Case(gen, batch=1, hkv=2, group=4, d=128, lengths=[4, 100003, 128]), "cuda")


@needs_cuda
def test_cuda_paged_long_sequence_with_unequal_lengths(gen):
    # many pages per split, a page table read on the device, lengths ending mid-page
    case = Case(gen, batch=3, hkv=2, group=4, d=128, lengths=[4, 9001, 128, 0, 4133, 7, 1, 17, 2], capacity=9088)
    check(case.page(gen, 64, shared_pages=30), "cuda")


@needs_cuda
def test_cuda_rounds_codebooks_to_the_grid(gen):
    """An off-grid codebook gives attention over its snapped version (the documented rounding)."""
    case = Case(gen, d=128, lengths=[4, 500, 64, 4, 250, 128]).to("cuda")
    snapped = case.key_codebook.clone()
    lo, hi = snapped.amin(1, keepdim=True), snapped.amax(1, keepdim=True)
    noise = (torch.rand_like(snapped) - 0.5) * 0.6 * (hi - lo) / 255  # under half a grid step
    case.key_codebook = torch.where((snapped == lo) | (snapped == hi), snapped, snapped + noise)
    assert not torch.equal(case.key_codebook, snapped)
    out = case.run()
    case.key_codebook = snapped
    torch.testing.assert_close(out, case.run(), atol=0, rtol=0)


@needs_cuda
def test_cuda_matches_cpu_reference(gen):
    case = Case(gen, d=128, tq=3, lengths=[4, 700, 128, 1, 33, 9])
    cpu_out = case.run()
    gpu_out = case.to("cuda").run().cpu()
    assert float((gpu_out.double() - cpu_out.double()).abs().max()) < 5e-3


@needs_cuda
@pytest.mark.parametrize("tq", [1, 20])  # 20: the long-query kernel
def test_cuda_lengths_on_device_are_clamped(gen, tq):
    # lengths beyond the buffers, passed on the GPU (no host check): clamped, never out of bounds
    case = Case(gen, d=64, tq=tq, lengths=[4, 40, 16, 2, 10, 30]).to("cuda")
    bad = torch.tensor([[100, 10**6, 10**6], [-5, -1, 3]], dtype=torch.int32, device="cuda")
    out = vecinfer.attention(case.q, case.key_codes, case.value_codes, bad, case.key_codebook, case.value_codebook,
                             sink_keys=case.sink_k, sink_values=case.sink_v, recent_keys=case.recent_k,
                             recent_values=case.recent_v)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


def real_kv_case(gen, d, tq, recent=64, group=3):
    """Real post-RoPE K/V of SmolLM2-135M (shipped), compressed with a quantizer calibrated on the
    first half (on the GPU); the queries are the sequence's own last tq keys, scaled by 1.3. At
    d = 128 two heads sit side by side (real statistics at that head_dim)."""
    from vecinfer.demo import load_real_kv

    _, keys, values, _ = load_real_kv()
    k, v = keys[0], values[0]  # [Hkv, T, 64]
    if d == 128:
        k = torch.cat([k[:1], k[1:2]], -1)
        v = torch.cat([v[:1], v[1:2]], -1)
    hkv, t = k.shape[0], k.shape[1]
    cfg = vecinfer.VQConfig(key_bits=2, value_bits=2, value_mean=True)
    quant = vecinfer.KVQuantizer.calibrate([k[:, :t // 2]], [v[:, :t // 2]], cfg, progress=False).to("cuda")
    p = quant.layers[0]
    sinks = 4
    coded = t - sinks - recent
    cap = (coded + 15) // 16 * 16
    kk, vv = k[None].half().cuda(), v[None].half().cuda()
    case = Case(gen, batch=1, hkv=hkv, group=group, tq=tq, d=d, lengths=[sinks, coded, recent])
    case.key_codes = torch.zeros((1, hkv, cap, d // 4), dtype=torch.uint8, device="cuda")
    case.value_codes = torch.zeros_like(case.key_codes)
    case.key_codes[:, :, :coded] = quant.encode_keys(0, kk[:, :, sinks:sinks + coded].contiguous())
    case.value_codes[:, :, :coded] = quant.encode_values(0, vv[:, :, sinks:sinks + coded].contiguous())
    case.q = (kk[:, :, -tq:].repeat_interleave(group, 1) * 1.3).contiguous()
    case.sink_k, case.sink_v = kk[:, :, :sinks].contiguous(), vv[:, :, :sinks].contiguous()
    case.recent_k, case.recent_v = kk[:, :, -recent:].contiguous(), vv[:, :, -recent:].contiguous()
    case.key_codebook, case.value_codebook = p["key_codebook"], p["value_codebook"]
    case.key_scale, case.key_mean, case.value_mean = p["key_scale"], p["key_mean"], p["value_mean"]
    return case


@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_real_kv(gen, d):
    check(real_kv_case(gen, d, tq=2), "cuda")


# ---- bad input --------------------------------------------------------------------------------

def _bad_input_case(gen, device="cpu"):
    return Case(gen, d=64, lengths=[4, 40, 16, 2, 10, 3]).to(device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("mutate,error,match", [
    (lambda c: setattr(c, "q", c.q[:1]), ValueError, "key_codes"),                       # batch mismatch
    (lambda c: setattr(c, "q", c.q[:, :7].contiguous()), ValueError, "query heads"),                  # heads not a multiple
    (lambda c: setattr(c, "q", c.q[..., :32].contiguous()), ValueError, "head_dim"),       # dim
    (lambda c: setattr(c, "key_codes", c.key_codes[..., :8].contiguous()), ValueError, "key_codes"),
    (lambda c: setattr(c, "value_codes", c.value_codes[:, :, :16].contiguous()), ValueError, "value_codes"),
    (lambda c: setattr(c, "key_codebook", c.key_codebook[:, :100].contiguous()), ValueError, "key_codebook"),
    (lambda c: setattr(c, "key_scale", c.key_scale[:, :32].contiguous()), ValueError, "scale"),
    (lambda c: setattr(c, "value_mean", c.value_mean[:1].repeat(3, 1)), ValueError, "value_mean"),
    (lambda c: setattr(c, "sink_k", c.sink_k.float()), TypeError, "sink_keys"),
    (lambda c: setattr(c, "recent_v", c.recent_v[:, :1]), ValueError, "recent_values"),
    (lambda c: setattr(c, "lengths", c.lengths.long()), TypeError, "lengths"),
    (lambda c: setattr(c, "lengths", torch.tensor([[4, 40, 16]], dtype=torch.int32)), ValueError, "lengths"),
    (lambda c: c.lengths.__setitem__((0, 1), 10**6), ValueError, "capacity"),
    (lambda c: c.lengths.__setitem__((1, 0), -1), ValueError, "negative"),
    (lambda c: c.lengths.__setitem__((1,), 0), ValueError, "fewer tokens"),
    (lambda c: setattr(c, "key_codes", c.key_codes.float()), TypeError, "uint8"),
])
def test_bad_input_raises(gen, device, mutate, error, match):
    case = _bad_input_case(gen, device)
    mutate(case)
    with pytest.raises(error, match=match):
        case.run()


@needs_cuda
def test_cuda_rejects_unsupported(gen):
    case = _bad_input_case(gen, "cuda")
    case.q = case.q.float()
    for name in ("sink_k", "sink_v", "recent_k", "recent_v"):
        setattr(case, name, getattr(case, name).float())
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        case.run()
    case = _bad_input_case(gen, "cuda")
    case.key_codebook = torch.randn((1, 1 << 10, 4), device="cuda")
    case.key_codes = torch.zeros((2, 2, 48, 64 // 4 * 10 // 8), dtype=torch.uint8, device="cuda")
    case.value_codes = case.value_codes[:, :, :48].contiguous()
    with pytest.raises(ValueError, match="presets"):
        case.run()


# ---- the cache's attend on the fused kernel ----------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key_bits,value_bits", [(2, 2), (4, 1.5)])
def test_cache_attend_runs_the_kernel_with_unequal_lengths(gen, dtype, key_bits, value_bits):
    """QuantizedKVCache.attend on the GPU (the fused kernel) against the cache's own reference path
    (dequantize, then attention) on a left-padded batch whose sequences differ in length."""
    from vecinfer.cache import codes_attention

    keys = [torch.randn((2, 600, 128), generator=gen) + 2 * torch.randn((2, 1, 128), generator=gen)]
    values = [torch.randn((2, 600, 128), generator=gen)]
    cfg = vecinfer.VQConfig(key_bits=key_bits, value_bits=value_bits, residual=32, sink_tokens=4, kmeans_iters=3)
    quantizer = vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)
    cache = vecinfer.QuantizedKVCache(quantizer, 3, 2, 128, 700, device="cuda", dtype=dtype)
    assert cache._fused_attention_supported(torch.empty((3, 8, 1, 128), device="cuda", dtype=dtype))
    k = (torch.randn((3, 2, 500, 128), generator=gen) + 1).to(dtype).cuda()
    v = torch.randn((3, 2, 500, 128), generator=gen).to(dtype).cuda()
    cache.append(0, k, v, skip=torch.tensor([0, 130, 497]))  # 500, 370 and 3 tokens
    for _ in range(5):
        cache.append(0, k[:, :, :1], v[:, :, :1])
    q = torch.randn((3, 8, 2, 128), generator=gen).to(dtype).cuda()
    out = cache.attend(0, q)
    ref = codes_attention(q, *cache._attend_inputs(0), cache.quantizer, 0)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
