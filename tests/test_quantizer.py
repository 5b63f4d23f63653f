"""VQConfig, k-means, KVQuantizer calibration / save / load."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from vecinfer.kmeans import assign, kmeans
from vecinfer.quantizer import _checksum, build_quantizer, kivi_fake_quantize


def _samples(layers=2, heads=2, tokens=600, d=64, seed=0, offset=5.0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn((heads, tokens, d), generator=g) + offset * torch.randn((heads, 1, d), generator=g)
            for _ in range(layers)]
    values = [torch.randn((heads, tokens, d), generator=g) for _ in range(layers)]
    return keys, values


@pytest.mark.parametrize("bits,shape", [(4, (2, 8)), (3, (4, 12)), (2, (4, 8)), (1.5, (8, 12)), (1, (8, 8))])
def test_presets(bits, shape):
    cfg = vecinfer.VQConfig(key_bits=bits, value_bits=bits)
    assert (cfg.key_sub_dim, cfg.key_code_bits) == shape == (cfg.value_sub_dim, cfg.value_code_bits)
    assert cfg.key_bits == bits


@pytest.mark.parametrize("kwargs,words", [
    ({"key_bits": 2.5}, "presets"),
    ({"key_sub_dim": 4}, "go together"),
    ({"key_sub_dim": 3, "key_code_bits": 8}, "key_sub_dim must be 2, 4 or 8"),
    ({"value_sub_dim": 4, "value_code_bits": 13}, "value_code_bits"),
    ({"key_bits": 2, "key_sub_dim": 8, "key_code_bits": 8}, "contradicts"),
    ({"residual": -1}, "residual"),
    ({"granularity": "token"}, "granularity"),
    ({"method": "gptq"}, "method"),
    ({"key_gain": 0.9}, "key_gain"),
    ({"key_gain": 4.5}, "key_gain"),
    ({"key_gain": float("nan")}, "key_gain"),
])
def test_config_rejects(kwargs, words):
    with pytest.raises(ValueError, match=words):
        vecinfer.VQConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = vecinfer.VQConfig(key_bits=1.5, value_sub_dim=2, value_code_bits=8, sink_tokens=4)
    assert vecinfer.VQConfig.from_dict(cfg.to_dict()) == cfg


def test_kmeans_is_deterministic_and_beats_its_init():
    x = torch.randn((5000, 4), generator=torch.Generator().manual_seed(1))
    a = kmeans(x, 64, iters=8, seed=3)
    b = kmeans(x, 64, iters=8, seed=3)
    assert torch.equal(a, b)
    one = kmeans(x, 64, iters=1, seed=3)
    err = lambda cb: float(((x - cb[assign(x, cb)]) ** 2).sum(1).mean())  # noqa: E731
    assert err(a) < err(one)


def test_assign_is_nearest():
    g = torch.Generator().manual_seed(2)
    x, cb = torch.randn((777, 8), generator=g), torch.randn((32, 8), generator=g)
    d = torch.cdist(x.double(), cb.double())
    chosen = d.gather(1, assign(x, cb)[:, None]).squeeze(1)
    assert torch.all(chosen <= d.min(1).values + 1e-5)


def test_kmeans_repairs_empty_clusters():
    x = torch.cat([torch.zeros((500, 2)), torch.ones((500, 2))])  # two distinct points, 16 centroids
    cb = kmeans(x, 16, iters=3)
    assert torch.isfinite(cb).all()


def test_kmeans_rejects_bad_samples():
    with pytest.raises(ValueError, match="too few"):
        kmeans(torch.randn((10, 4)), 16)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((100, 4), float("nan")), 16)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_calibrate_shapes_and_quality(granularity):
    keys, values = _samples()
    cfg = vecinfer.VQConfig(granularity=granularity, kmeans_iters=5)
    q = vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)
    groups = 2 if granularity == "head" else 1
    assert q.layers[0]["key_codebook"].shape == (groups, 256, 4)
    assert q.layers[1]["key_scale"].shape == (2, 64) and bool((q.layers[1]["key_scale"] > 0).all())
    k, v = keys[0][None], values[0][None]
    k_hat, v_hat = q.fake_quantize(0, k, v)
    rel = lambda a, b: float(((a - b) ** 2).sum() / (b ** 2).sum())  # noqa: E731
    assert rel(k_hat, k) < 0.05 and rel(v_hat, v) < 0.2


def test_key_mean_matters_for_offset_outliers():
    """Keys with large per-channel constant offsets (like Qwen's k_proj bias): removing the mean
    before smoothing + Hadamard cuts the reconstruction error of the centred keys."""
    keys, values = _samples(offset=40.0)
    err = {}
    for mean in (False, True):
        q = vecinfer.KVQuantizer.calibrate(keys, values, vecinfer.VQConfig(key_mean=mean, kmeans_iters=5),
                                           progress=False)
        k = keys[0][None]
        k_hat, _ = q.fake_quantize(0, k, values[0][None])
        centred = k - k.mean(dim=2, keepdim=True)
        err[mean] = float(((k_hat - k) ** 2).sum() / (centred ** 2).sum())
    assert err[True] < 0.5 * err[False], err


def test_calibrate_rejects_bad_samples():
    keys, values = _samples()
    with pytest.raises(ValueError, match="NaN"):
        bad = [keys[0].clone(), keys[1]]
        bad[0][0, 0, 0] = float("inf")
        vecinfer.KVQuantizer.calibrate(bad, values, vecinfer.VQConfig(), progress=False)
    with pytest.raises(ValueError, match="same, non-zero number of layers"):
        vecinfer.KVQuantizer.calibrate(keys, values[:1], vecinfer.VQConfig(), progress=False)
    with pytest.raises(ValueError, match="head_dim must be"):
        vecinfer.KVQuantizer.calibrate([k[..., :32] for k in keys], [v[..., :32] for v in values],
                                       vecinfer.VQConfig(), progress=False)
    with pytest.raises(ValueError, match="layer 1"):
        vecinfer.KVQuantizer.calibrate([keys[0], keys[1][:1]], [values[0], values[1][:1]], vecinfer.VQConfig(),
                                       progress=False)
    with pytest.raises(ValueError, match="fewer than its 4096 centroids"):
        vecinfer.KVQuantizer.calibrate([k[:, :100] for k in keys], [v[:, :100] for v in values],
                                       vecinfer.VQConfig(key_bits=1.5), progress=False)
    with pytest.raises(TypeError, match="VQConfig"):
        vecinfer.KVQuantizer.calibrate(keys, values, {"key_bits": 2}, progress=False)


def test_save_load_round_trip(tmp_path):
    keys, values = _samples()
    q = vecinfer.KVQuantizer.calibrate(keys, values, vecinfer.VQConfig(value_mean=True, kmeans_iters=3),
                                       progress=False)
    path = str(tmp_path / "q.safetensors")
    q.save(path)
    r = vecinfer.KVQuantizer.load(path)
    assert r.config == q.config and r.num_layers == 2
    k, v = keys[1][None, :, :50], values[1][None, :, :50]
    for a, b in zip(q.fake_quantize(1, k, v), r.fake_quantize(1, k, v)):
        assert torch.equal(a, b)


def _resave(src, dst, edit_tensors=None, edit_meta=None):
    """Rewrites a saved file with edits and a valid checksum of the result (as a writer of bad
    content would), so that load's checks after the checksum are what refuse it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    meta.pop("sha256")
    meta["sha256"] = _checksum(meta, tensors)
    save_file(tensors, dst, metadata=meta)


@pytest.mark.parametrize("damage,words", [
    ("truncate", "not a readable"),
    ("garbage", "not a readable"),
    ("version", "format version"),
    ("format", "not a vecinfer quantizer"),
    ("nan", "NaN"),
    ("shape", "expected float32"),
    ("missing", "missing"),
    ("scale", "non-positive"),
    ("config", "invalid metadata"),
])
def test_load_rejects_damaged_files(tmp_path, damage, words):
    keys, values = _samples(layers=1)
    q = vecinfer.KVQuantizer.calibrate(keys, values, vecinfer.VQConfig(kmeans_iters=2), progress=False)
    good, bad = str(tmp_path / "good.safetensors"), str(tmp_path / "bad.safetensors")
    q.save(good)
    data = open(good, "rb").read()
    if damage == "truncate":
        open(bad, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(bad, "wb").write(b"\x00" * 64)
    elif damage == "version":
        _resave(good, bad, edit_meta=lambda m: m.update(version="99"))
    elif damage == "format":
        _resave(good, bad, edit_meta=lambda m: m.update(format="something-else"))
    elif damage == "config":
        _resave(good, bad, edit_meta=lambda m: m.update(config='{"key_bits": 7}'))
    elif damage == "nan":
        _resave(good, bad, edit_tensors=lambda t: t["layer0.key_codebook"].view(-1).__setitem__(0, float("nan")))
    elif damage == "shape":
        _resave(good, bad, edit_tensors=lambda t: t.update({"layer0.key_codebook": t["layer0.key_codebook"][:, :128].contiguous()}))
    elif damage == "missing":
        _resave(good, bad, edit_tensors=lambda t: t.pop("layer0.value_codebook"))
    elif damage == "scale":
        _resave(good, bad, edit_tensors=lambda t: t["layer0.key_scale"].view(-1).__setitem__(3, -1.0))
    with pytest.raises(ValueError, match=words):
        vecinfer.KVQuantizer.load(bad)


@pytest.mark.parametrize("shape", [(1, 256, 4), (3, 4096, 8), (2, 256, 2), (1, 16, 1)])
def test_snap_codebook_grid(shape):
    """Per codebook and element position: at most 256 levels, evenly spaced from the smallest to the
    largest entry, each entry moved by at most half a step; idempotent."""
    g = torch.Generator().manual_seed(sum(shape))
    cb = torch.randn(shape, generator=g) * torch.rand((1, 1, shape[2]), generator=g) * 3
    cb[:, 5 % shape[1], 0] = 7.0  # an outlier sets the range
    snapped = vecinfer.snap_codebook(cb)
    assert snapped.dtype == torch.float32 and snapped.shape == cb.shape
    lo, hi = cb.amin(1, keepdim=True), cb.amax(1, keepdim=True)
    step = (hi - lo) / 255
    assert torch.equal(snapped.amin(1, keepdim=True), lo)
    assert torch.allclose(snapped.amax(1, keepdim=True), hi, rtol=1e-6, atol=0)
    assert bool(((snapped - cb).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())
    levels = (snapped - lo) / step
    assert bool(((levels - levels.round()).abs() < 1e-3).all())
    assert torch.equal(vecinfer.snap_codebook(snapped), snapped)
    const = torch.full((1, 16, 2), 0.25)
    assert torch.equal(vecinfer.snap_codebook(const), const)


def test_snap_codebook_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        vecinfer.snap_codebook(torch.tensor([[[1.0], [float("nan")]]]))
    with pytest.raises(ValueError, match="power of two"):
        vecinfer.snap_codebook(torch.zeros((1, 100, 4)))
    with pytest.raises(ValueError, match="num_codebooks"):
        vecinfer.snap_codebook(torch.zeros((256, 4)))
    with pytest.raises(TypeError, match="floating"):
        vecinfer.snap_codebook(torch.zeros((1, 256, 4), dtype=torch.int32))


def test_calibrated_codebooks_are_on_the_grid(tmp_path):
    keys, values = _samples(layers=1)
    q = vecinfer.KVQuantizer.calibrate(keys, values, vecinfer.VQConfig(kmeans_iters=2, key_bits=1.5), progress=False)
    for name in ("key_codebook", "value_codebook"):
        assert torch.equal(vecinfer.snap_codebook(q.layers[0][name]), q.layers[0][name])
    # A version 1 file (codebooks off the grid) is converted on load, with a warning; a version 2
    # file whose codebook left the grid is refused.
    good, old, bad = (str(tmp_path / f"{n}.safetensors") for n in ("good", "old", "bad"))
    q.save(good)
    nudge = lambda t: t["layer0.value_codebook"].view(-1).__setitem__(1, float(t["layer0.value_codebook"].view(-1)[1]) + 1e-3)  # noqa: E731
    _resave(good, old, edit_tensors=nudge, edit_meta=lambda m: m.update(version="1"))
    with pytest.warns(UserWarning, match="version 1"):
        r = vecinfer.KVQuantizer.load(old)
    assert torch.equal(r.layers[0]["value_codebook"], vecinfer.snap_codebook(r.layers[0]["value_codebook"]))
    _resave(good, bad, edit_tensors=nudge)
    with pytest.raises(ValueError, match="grid"):
        vecinfer.KVQuantizer.load(bad)


def test_key_gain_scales_the_key_centroids_only():
    """key_gain multiplies the key codebooks (on the grid, which scales with them) and leaves the
    values and the transforms alone; the coded keys' spread around the key mean grows by it."""
    keys, values = _samples()
    cfg = vecinfer.VQConfig(kmeans_iters=4)
    plain = vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)
    gained = vecinfer.KVQuantizer.calibrate(keys, values, vecinfer.VQConfig(kmeans_iters=4, key_gain=1.25),
                                            progress=False)
    with pytest.raises(TypeError, match="key_gain"):
        vecinfer.VQConfig(key_gain=True)
    for a, b in zip(plain.layers, gained.layers):
        assert torch.allclose(b["key_codebook"], 1.25 * a["key_codebook"], rtol=1e-5, atol=1e-6)
        assert torch.equal(b["value_codebook"], a["value_codebook"])
        assert torch.equal(b["key_scale"], a["key_scale"]) and torch.equal(b["key_mean"], a["key_mean"])
    k, v = keys[0][None], values[0][None]
    codes = plain.encode_keys(0, k)
    mean = plain.layers[0]["key_mean"][None, :, None]
    spread = (plain.decode_keys(0, codes, torch.float32) - mean).norm()
    assert torch.allclose((gained.decode_keys(0, codes, torch.float32) - mean).norm(), 1.25 * spread, rtol=1e-4)


def test_kivi_fake_quantize_levels():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn((1, 2, 70, 64), generator=g), torch.randn((1, 2, 70, 64), generator=g)
    kq, vq = kivi_fake_quantize(k, v, 32)
    # keys: per channel within each group of 32 tokens at most 4 distinct levels
    assert all(len(torch.unique(kq[0, 0, s:s + 32, c])) <= 4 for s in (0, 32, 64) for c in range(0, 64, 7))
    assert all(len(torch.unique(vq[0, 1, t, s:s + 32])) <= 4 for t in range(0, 70, 9) for s in (0, 32))
    # uniform 2-bit steps of ~(range of 32 Gaussians)/3: relative MSE about step^2/12 ~ 0.15
    assert 0.08 < float(((kq - k) ** 2).mean()) / float((k ** 2).mean()) < 0.2


def test_build_quantizer_methods_and_bits():
    keys, values = _samples(layers=1)
    q = build_quantizer("kivi", keys, values, progress=False)
    assert q.bits_per_element() == pytest.approx(3.0)
    plain = build_quantizer("vq", keys, values, progress=False, kmeans_iters=2)
    assert plain.layers[0]["key_scale"] is None and not plain.config.hadamard
    assert plain.bits_per_element() == 2.0
    # at 16k tokens: 2 bits for the coded part + 128 fp16 tokens + parameters
    assert 2.0 < plain.bits_per_element(16384) < 2.2
    with pytest.raises(ValueError, match="method"):
        build_quantizer("zip", keys, values)


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU")
def test_calibrate_and_fake_quantize_on_gpu():
    """Calibration on CUDA samples (k-means assignment by the CUDA encode kernel) is as good as on
    the CPU and gives CUDA parameters."""
    keys, values = _samples(layers=1, tokens=1000)
    cfg = vecinfer.VQConfig(kmeans_iters=6)
    cpu = vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)
    gpu = vecinfer.KVQuantizer.calibrate([k.cuda() for k in keys], [v.cuda() for v in values], cfg, progress=False)
    assert gpu.device.type == "cuda"
    k, v = keys[0][None], values[0][None]
    err = lambda q, dev: float(((q.fake_quantize(0, k.to(dev), v.to(dev))[0].cpu() - k) ** 2).sum())  # noqa: E731
    assert err(gpu, "cuda") < 1.2 * err(cpu, "cpu")
