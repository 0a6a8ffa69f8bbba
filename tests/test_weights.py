"""Weights files: every format and naming loads to the same hub-named float32 params; bad files fail clearly."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval import weights as W
from retrieval.errors import WeightsError
from retrieval.variants import ModelConfig, expected_shapes, official_config, random_params

ROOT = Path(__file__).resolve().parent.parent
CLI = str(ROOT / "cli.py")


# ---------------------------------------------------------------- helpers


def to_official(params: dict, cfg: ModelConfig, chunks: int = 0) -> dict:
    """The inverse of the renaming: facebookresearch/dinov2 torch-hub names (optionally chunked blocks.K.N)."""
    out = {}
    top = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.register_tokens": "register_tokens", "embeddings.mask_token": "mask_token"}
    for key, arr in params.items():
        if key in top:
            out[top[key]] = arr
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = arr
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = arr
    per_chunk = cfg.depth // chunks if chunks else 0
    for i in range(cfg.depth):
        src = f"encoder.layer.{i}."
        dst = f"blocks.{i // per_chunk}.{i}." if chunks else f"blocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"norm1.{leaf}"] = params[src + f"norm1.{leaf}"]
            out[dst + f"norm2.{leaf}"] = params[src + f"norm2.{leaf}"]
            out[dst + f"attn.qkv.{leaf}"] = np.concatenate(
                [params[src + f"attention.attention.{p}.{leaf}"] for p in ("query", "key", "value")], axis=0)
            out[dst + f"attn.proj.{leaf}"] = params[src + f"attention.output.dense.{leaf}"]
            if cfg.ffn == "swiglu":
                out[dst + f"mlp.w12.{leaf}"] = params[src + f"mlp.weights_in.{leaf}"]
                out[dst + f"mlp.w3.{leaf}"] = params[src + f"mlp.weights_out.{leaf}"]
            else:
                out[dst + f"mlp.fc1.{leaf}"] = params[src + f"mlp.fc1.{leaf}"]
                out[dst + f"mlp.fc2.{leaf}"] = params[src + f"mlp.fc2.{leaf}"]
        out[dst + "ls1.gamma"] = params[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = params[src + "layer_scale2.lambda1"]
    return out


def to_transformers5(params: dict, prefix: str = "") -> dict:
    """transformers 5's in-memory names (what ``model.state_dict()`` gives)."""
    out = {}
    for key, arr in params.items():
        new = (key.replace("attention.attention.query", "attention.q_proj")
               .replace("attention.attention.key", "attention.k_proj")
               .replace("attention.attention.value", "attention.v_proj")
               .replace("attention.output.dense", "attention.o_proj")
               .replace("mlp.weights_out", "mlp.down_proj"))
        if ".mlp.weights_in." in key:
            gate, up = np.split(arr, 2, axis=0)
            out[prefix + key.replace("weights_in", "gate_proj")] = gate
            out[prefix + key.replace("weights_in", "up_proj")] = up
        else:
            out[prefix + new] = arr
    return out


def torch_save(named: dict, path: Path) -> Path:
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in named.items()}, path)
    return path


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    """A minimal independent safetensors writer: {name: (dtype name, array of the stored bytes)}."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == np.float32, key
        assert a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_")}
    env.update(DINOV2_OFFLINE="1", DINOV2_CACHE=str(tmp_path / "cache"), DINOV2_HUB_URL="http://127.0.0.1:9")
    return env


SMALL2 = official_config("small", depth=2)


@pytest.fixture(scope="module")
def small2():
    return random_params(SMALL2, seed=1)


@pytest.fixture(scope="module")
def giant1():
    cfg = official_config("giant", depth=1)
    return cfg, random_params(cfg, seed=2)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for name in ("DINOV2_WEIGHTS", "DINOV2_HUB_URL", "DINOV2_CACHE", "DINOV2_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DINOV2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DINOV2_OFFLINE", "1")


# ---------------------------------------------------------------- our own formats


def test_safetensors_roundtrip_is_memory_mapped(tmp_path, small2):
    path = W.save_params(small2, tmp_path / "model.safetensors")
    params, cfg = W.load_params(path)
    assert cfg == SMALL2
    assert list(params) == list(expected_shapes(SMALL2))
    assert_same(params, small2)
    assert not params["encoder.layer.1.mlp.fc1.weight"].flags.writeable  # a view of the file, not a copy
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"} and (8 + n) % 8 == 0
    assert header["embeddings.cls_token"]["dtype"] == "F32"


def test_npz_roundtrip_and_convert(tmp_path, small2):
    npz = W.save_params(small2, tmp_path / "vit-dinov2-base.npz")
    params, cfg = W.load_params(npz)
    assert cfg == SMALL2
    assert_same(params, small2)
    out = tmp_path / "sub" / "model.safetensors"
    assert W.convert(npz, out) == SMALL2
    assert_same(W.load_params(out)[0], small2)
    assert W.convert(out, out) == SMALL2  # from memory-mapped, read-only arrays onto the same path
    assert_same(W.load_params(out)[0], small2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]
    # the format comes from the content, not the name
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(out.read_bytes())
    assert W.detect_format(renamed) == "safetensors"
    assert W.load_params(renamed)[1] == SMALL2


def test_npz_other_dtypes_become_float32(tmp_path, small2):
    path = tmp_path / "w.npz"
    np.savez(path, **{k: v.astype(np.float64) for k, v in small2.items()})
    params, _ = W.load_params(path)
    assert_same(params, small2)


def test_f16_and_bf16_safetensors(tmp_path, small2):
    f16 = {k: ("F16", v.astype(np.float16)) for k, v in small2.items()}
    params, cfg = W.load_params(write_safetensors(tmp_path / "f16.safetensors", f16))
    assert cfg == SMALL2
    assert_same(params, {k: v.astype(np.float16).astype(np.float32) for k, v in small2.items()})

    bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in small2.items()}
    bf16 = {k: ("BF16", b) for k, b in bits.items()}
    params, cfg = W.load_params(write_safetensors(tmp_path / "bf16.safetensors", bf16))
    assert cfg == SMALL2
    assert_same(params, {k: (b.astype(np.uint32) << 16).view(np.float32) for k, b in bits.items()})


def test_registers_recognised_from_shapes(tmp_path):
    cfg = official_config("small-reg", depth=1)
    src = random_params(cfg)
    params, got = W.load_params(W.save_params(src, tmp_path / "reg.safetensors"))
    assert got == cfg and got.registers == 4 and got.variant == "small-reg"
    assert_same(params, src)


def test_swiglu_recognised_from_shapes(tmp_path, giant1):
    cfg, src = giant1
    params, got = W.load_params(W.save_params(src, tmp_path / "giant.safetensors"))
    assert got == cfg
    assert (got.ffn, got.hidden, got.dim, got.depth, got.heads) == ("swiglu", 4096, 1536, 1, 24)
    assert params["encoder.layer.0.mlp.weights_in.weight"].shape == (8192, 1536)


def test_non_standard_grid_patch_and_width(tmp_path):
    cfg = ModelConfig(dim=64, depth=3, hidden=96, patch=16, grid=4)
    src = random_params(cfg)
    params, got = W.load_params(W.save_params(src, tmp_path / "tiny.npz"))
    assert got == cfg and got.variant == "vit-d64"
    assert_same(params, src)


def test_dinov2_prefix_stripped_and_transformers5_names(tmp_path, small2):
    named = to_transformers5(small2, prefix="dinov2.")
    assert "dinov2.encoder.layer.0.attention.q_proj.weight" in named
    path = W.save_params(named, tmp_path / "hf5.safetensors")  # any names can be written
    params, cfg = W.load_params(path)
    assert cfg == SMALL2
    assert_same(params, small2)


def test_transformers5_swiglu_gate_up_joined(tmp_path, giant1):
    cfg, src = giant1
    named = to_transformers5(src)
    assert named["encoder.layer.0.mlp.gate_proj.weight"].shape == (4096, 1536)
    params, got = W.load_params(W.save_params(named, tmp_path / "g.npz"))
    assert got == cfg
    np.testing.assert_array_equal(params["encoder.layer.0.mlp.weights_in.weight"],
                                  src["encoder.layer.0.mlp.weights_in.weight"])
    np.testing.assert_array_equal(params["encoder.layer.0.mlp.weights_in.bias"],
                                  src["encoder.layer.0.mlp.weights_in.bias"])


def test_official_names_without_torch_via_npz(tmp_path, small2):
    """The renaming does not depend on the container: official names in an .npz load too."""
    named = to_official(small2, SMALL2)
    del named["mask_token"]  # absent in some official checkpoints; unused at inference
    params, cfg = W.load_params(W.save_params(named, tmp_path / "official.npz"))
    assert cfg == SMALL2
    np.testing.assert_array_equal(params["embeddings.mask_token"], np.zeros((1, 384), np.float32))
    assert_same(params, small2)


def test_file_sha256(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    assert W.file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert W.file_sha256(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_save_refuses_unknown_extension(tmp_path, small2):
    with pytest.raises(WeightsError, match=r"\.safetensors or \.npz"):
        W.save_params(small2, tmp_path / "model.pth")
    assert list(tmp_path.iterdir()) == []


def test_describe(tmp_path):
    cfg = ModelConfig(dim=64, depth=1, grid=4)
    path = W.save_params(random_params(cfg), tmp_path / "t.safetensors")
    info = W.describe(path)
    assert (info.format, info.dtypes, info.config, info.official) == ("safetensors", ("F32",), cfg, None)
    assert info.n_params == sum(int(np.prod(s)) for s in expected_shapes(cfg).values())
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- torch-hub .pth and transformers (torch)


@pytest.mark.torch
@pytest.mark.parametrize("chunks,mask", [(0, "absent"), (0, "(1,D)"), (2, "(1,D)")])
def test_official_pth(tmp_path, small2, chunks, mask):
    named = to_official(small2, SMALL2, chunks=chunks)
    if chunks:
        assert "blocks.1.1.attn.qkv.weight" in named
    if mask == "absent":
        del named["mask_token"]
    path = torch_save(named, tmp_path / "dinov2_vits14_pretrain.pth")
    params, cfg = W.load_params(path)
    assert cfg == SMALL2
    assert_same(params, small2)


@pytest.mark.torch
def test_official_pth_swiglu_and_registers(tmp_path, giant1):
    cfg, src = giant1
    params, got = W.load_params(torch_save(to_official(src, cfg), tmp_path / "dinov2_vitg14_pretrain.pth"))
    assert got == cfg
    assert_same(params, src)
    reg = official_config("small-reg", depth=1)
    src = random_params(reg, seed=5)
    params, got = W.load_params(torch_save(to_official(src, reg), tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    assert got == reg
    assert_same(params, src)


@pytest.mark.torch
def test_legacy_pickle_pth_and_wrapped_state_dict(tmp_path):
    import torch

    cfg = ModelConfig(dim=64, depth=1, grid=4)
    src = random_params(cfg)
    tensors = {k: torch.from_numpy(v) for k, v in to_official(src, cfg).items()}
    path = tmp_path / "legacy.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    assert W.detect_format(path) == "pth"
    assert_same(W.load_params(path)[0], src)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": tensors}, path)
    assert_same(W.load_params(path)[0], src)


@pytest.mark.torch
def test_bf16_pth(tmp_path, small2):
    import torch

    named = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in to_official(small2, SMALL2).items()}
    path = tmp_path / "bf16.pth"
    torch.save(named, path)
    params, cfg = W.load_params(path)
    assert cfg == SMALL2
    ref = to_official(params, SMALL2)
    for key, t in named.items():
        np.testing.assert_array_equal(ref[key], t.float().numpy(), err_msg=key)


def _hf_model(registers: bool = False, depth: int = 2):
    import torch
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    kwargs = dict(hidden_size=384, num_hidden_layers=depth, num_attention_heads=6, intermediate_size=1536,
                  image_size=518, patch_size=14, layer_norm_eps=1e-6)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)).eval()
    return Dinov2Model(Dinov2Config(**kwargs)).eval()


@pytest.mark.torch
def test_transformers_save_pretrained_and_state_dict(tmp_path):
    from safetensors.numpy import load_file

    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    params, cfg = W.load_params(file)
    assert cfg == SMALL2
    assert_same(params, load_file(str(file)))
    # transformers 5's in-memory names, as model.state_dict() gives them
    state = model.state_dict()
    assert "encoder.layer.0.attention.q_proj.weight" in state
    live, cfg2 = W.load_params(torch_save({k: v.numpy() for k, v in state.items()}, tmp_path / "state.pth"))
    assert cfg2 == SMALL2
    assert_same(live, params)
    np.testing.assert_array_equal(live["encoder.layer.1.attention.output.dense.weight"],
                                  state["encoder.layer.1.attention.o_proj.weight"].numpy())


@pytest.mark.torch
def test_transformers_registers_save_pretrained(tmp_path):
    from safetensors.numpy import load_file

    _hf_model(registers=True, depth=1).save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    params, cfg = W.load_params(file)
    assert cfg == official_config("small-reg", depth=1)
    assert_same(params, load_file(str(file)))


@pytest.mark.torch
def test_our_safetensors_load_in_safetensors_and_transformers(tmp_path, small2):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from transformers import Dinov2Model

    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")  # for its config.json
    W.save_params(small2, tmp_path / "hf" / "model.safetensors")  # replaced by our writer's file
    assert_same(load_file(str(tmp_path / "hf" / "model.safetensors")), small2)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = Dinov2Model.from_pretrained(tmp_path / "hf")
    state = loaded.state_dict()
    np.testing.assert_array_equal(state["encoder.layer.1.attention.k_proj.weight"].numpy(),
                                  small2["encoder.layer.1.attention.attention.key.weight"])
    np.testing.assert_array_equal(state["embeddings.position_embeddings"].numpy(),
                                  small2["embeddings.position_embeddings"])


@pytest.mark.torch
def test_bf16_safetensors_written_by_safetensors(tmp_path, small2):
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in small2.items()}
    save_file(tensors, str(tmp_path / "bf16.safetensors"))
    params, cfg = W.load_params(tmp_path / "bf16.safetensors")
    assert cfg == SMALL2
    assert_same(params, {k: t.float().numpy() for k, t in tensors.items()})


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
    path = tmp_path / "legacy.pth"
    path.write_bytes(W._TORCH_LEGACY_MAGIC + b"rest of a pickle")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(WeightsError, match="torch is needed to read .pth") as err:
        W.load_params(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- bad weights


def _bad_files(tmp_path: Path, params: dict) -> dict[str, tuple[Path, str]]:
    """name: (file, a fragment its message must hold)."""
    out = {}

    def save(name, p, ext=".safetensors"):
        return W.save_params(p, tmp_path / f"{name}{ext}")

    p = dict(params)
    del p["encoder.layer.1.mlp.fc1.weight"]
    out["missing"] = (save("missing", p), "missing key encoder.layer.1.mlp.fc1.weight")
    p = dict(params)
    p["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    out["unexpected"] = (save("unexpected", p, ".npz"), "unexpected key encoder.layer.0.extra.weight")
    p = dict(params)
    p["encoder.layer.0.norm1.weight"] = np.zeros(10, np.float32)
    out["shape"] = (save("shape", p), "encoder.layer.0.norm1.weight has shape (10,), expected (384,)")
    p = dict(params)
    p["embeddings.position_embeddings"] = np.zeros((1, 1000, 384), np.float32)
    out["grid"] = (save("grid", p), "square grid + 1")
    good = save("good", params)
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["truncated"] = (trunc, "truncated file: header says")
    npz = save("good", params, ".npz")
    tnpz = tmp_path / "truncated.npz"
    tnpz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    out["truncated_npz"] = (tnpz, "truncated or corrupt zip archive")
    short = tmp_path / "short.safetensors"
    short.write_bytes(good.read_bytes()[:100])
    out["truncated_header"] = (short, "truncated file: header says")
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights\nat all\n")
    out["text"] = (text, W.NOT_WEIGHTS)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    out["empty"] = (empty, "empty file (0 bytes)")
    other = tmp_path / "other.npz"
    np.savez(other, foo=np.zeros(3, np.float32))
    out["foreign"] = (other, "not a DINOv2 checkpoint: no known parameter names (its first key is foo)")
    ints = tmp_path / "ints.npz"
    np.savez(ints, **{k: v.astype(np.int32) for k, v in params.items()})
    out["ints"] = (ints, "floating point expected")
    out["absent"] = (tmp_path / "nowhere" / "model.safetensors", "no such file")
    out["directory"] = (tmp_path, "is a directory")
    return out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, small2):
    return _bad_files(tmp_path_factory.mktemp("bad"), small2)


BAD = ["missing", "unexpected", "shape", "grid", "truncated", "truncated_npz", "truncated_header", "text",
       "empty", "foreign", "ints", "absent", "directory"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_weights_raise_one_line(bad_files, kind):
    path, fragment = bad_files[kind]
    with pytest.raises(WeightsError) as err:
        W.load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message
    assert "\n" not in message


def test_several_problems_counted(tmp_path, small2):
    p = dict(small2)
    del p["layernorm.bias"]
    p["encoder.layer.0.norm1.weight"] = np.zeros(10, np.float32)
    with pytest.raises(WeightsError, match=r"missing key layernorm.bias \(and 1 more problem\)$"):
        W.load_params(W.save_params(p, tmp_path / "two.npz"))


def test_official_shape_error_names_the_file_key(tmp_path, small2):
    named = to_official(small2, SMALL2)
    named["blocks.1.ls2.gamma"] = np.zeros(7, np.float32)
    with pytest.raises(WeightsError, match=r"encoder.layer.1.layer_scale2.lambda1 \(blocks.1.ls2.gamma in the file\)"
                                           r" has shape \(7,\), expected \(384,\)"):
        W.load_params(W.save_params(named, tmp_path / "o.npz"))


def test_duplicate_names_refused(tmp_path, small2):
    p = dict(small2)
    p["dinov2.layernorm.bias"] = p["layernorm.bias"]
    with pytest.raises(WeightsError, match="duplicate parameter layernorm.bias"):
        W.load_params(W.save_params(p, tmp_path / "dup.npz"))


def test_cli_bad_weights_exit_2_one_line(tmp_path, bad_files):
    files = bad_files
    env = clean_env(tmp_path)
    for kind in ("text", "empty", "truncated", "missing"):
        path, fragment = files[kind]
        run = subprocess.run([sys.executable, CLI, "weights", "info", str(path)], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=120)
        assert run.returncode == 2, (kind, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], (kind, run.stderr)
        assert fragment in lines[0]


def test_cli_info_and_convert(tmp_path):
    cfg = ModelConfig(dim=64, depth=2, grid=4)
    npz = W.save_params(random_params(cfg), tmp_path / "vit-dinov2-base.npz")
    env = clean_env(tmp_path)
    out = tmp_path / "out" / "model.safetensors"
    run = subprocess.run([sys.executable, CLI, "weights", "convert", str(npz), str(out)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "vit-d64 (dim 64, depth 2" in run.stdout
    assert_same(W.load_params(out)[0], W.load_params(npz)[0])
    # info on the file resolved like every command: ./vit-dinov2-base.npz in the working directory
    run = subprocess.run([sys.executable, CLI, "weights", "info"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "npz (float32)" in run.stdout and cfg.description in run.stdout
    assert f"{sum(int(np.prod(s)) for s in expected_shapes(cfg).values()):,}" in run.stdout
    assert W.file_sha256(npz) in run.stdout
    run = subprocess.run([sys.executable, CLI, "weights", "info", str(out)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and "safetensors (F32)" in run.stdout, run.stderr
