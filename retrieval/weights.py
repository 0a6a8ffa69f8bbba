"""Reading, renaming, checking and writing DINOv2 weights files. No torch needed except for ``.pth``.

Formats, told apart by their content (the extension is only a hint):

- ``safetensors`` (the hub's ``model.safetensors``): parsed here (8-byte little-endian header length,
  JSON header, raw little-endian data) and memory-mapped; F32, F16, BF16 and F64 tensors.
- ``npz`` (the seed's ``vit-dinov2-base.npz``): a NumPy zip archive.
- ``pth`` (official torch-hub checkpoints such as ``dinov2_vitb14_pretrain.pth``, or any ``torch.save``
  of a state dict): read with torch when it is installed.

Every format is renamed into the hub checkpoint's names (the keys of ``variants.expected_shapes``):
official torch-hub names (``blocks.N.attn.qkv`` is split into query/key/value, the chunked
``blocks.K.N.`` layout is flattened), transformers-5 in-memory names (``attention.q_proj``,
``mlp.gate_proj`` + ``mlp.up_proj``), and an optional ``dinov2.`` prefix. The model's shape is then
read off the parameters (``config_from_params``) and every key and shape is checked against it.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import WeightsError
from .variants import OFFICIAL, ModelConfig, expected_shapes

__all__ = [
    "load_params",
    "config_from_params",
    "check_params",
    "to_hub_names",
    "detect_format",
    "save_params",
    "convert",
    "file_sha256",
    "describe",
    "WeightsInfo",
]

NOT_WEIGHTS = "not a weights file (safetensors, .npz or .pth expected)"

# safetensors dtype name -> (numpy dtype of the stored bytes, bytes per element)
_ST_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # the upper half of a float32; widened by a shift
    "F64": np.dtype("<f8"),
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickle of torch's legacy magic number


# ---------------------------------------------------------------- small helpers


def _human(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n < scale * 1000 or unit == "GB":
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"  # pragma: no cover


def _sizes(said: int, has: int) -> tuple[str, str]:
    a, b = _human(said), _human(has)
    if a == b:  # too close to tell apart rounded: give the exact counts
        a, b = f"{said:,} bytes", f"{has:,} bytes"
    return a, b


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _shape(shape) -> str:
    return str(tuple(int(s) for s in shape))


# ---------------------------------------------------------------- format detection and readers


def detect_format(path) -> str:
    """``"safetensors"``, ``"npz"`` or ``"pth"`` from the file's first bytes; WeightsError otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise WeightsError(path, "is a directory, not a weights file")
        with open(path, "rb") as f:
            head = f.read(16)
    except WeightsError:
        raise
    except FileNotFoundError:
        raise WeightsError(path, "no such file") from None
    except OSError as exc:
        raise WeightsError(path, f"cannot read: {exc.strerror or _one_line(exc)}") from None
    if size == 0:
        raise WeightsError(path, f"empty file (0 bytes): {NOT_WEIGHTS}")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            kind = "a .pth" if path.suffix.lower() in _TORCH_SUFFIXES else "an .npz"
            raise WeightsError(path, f"truncated or corrupt zip archive ({kind} file?): {_one_line(exc)}") from None
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "pth"
        if any(n.endswith(".npy") for n in names) or not names:
            return "npz"
        raise WeightsError(path, f"a zip archive without arrays: {NOT_WEIGHTS}")
    if head.startswith(_TORCH_LEGACY_MAGIC) or (head[:1] == b"\x80" and path.suffix.lower() in _TORCH_SUFFIXES):
        return "pth"  # torch's legacy (pickle) format
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 2 <= n <= _MAX_HEADER:
            return "safetensors"
    if size < 9 and path.suffix.lower() == ".safetensors":
        raise WeightsError(path, f"truncated file: {size} bytes, shorter than a safetensors header")
    raise WeightsError(path, NOT_WEIGHTS)


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            said, has = _sizes(8 + n, size)
            raise WeightsError(path, f"truncated file: header says {said}, file has {has}")
        raw_header = f.read(n)
    try:
        header = json.loads(raw_header.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(path, f"corrupt safetensors header: {_one_line(exc)}") from None
    header.pop("__metadata__", None)
    start = 8 + n
    entries = []
    data_end = 0
    for name, info in header.items():
        try:
            dtype, shape = info["dtype"], [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise WeightsError(path, f"corrupt safetensors header: bad entry for {name}") from None
        entries.append((name, dtype, shape, begin, end))
        data_end = max(data_end, end)
    if start + data_end > size:
        said, has = _sizes(start + data_end, size)
        raise WeightsError(path, f"truncated file: header says {said}, file has {has}")
    dtypes = sorted({e[1] for e in entries})
    params: dict[str, np.ndarray] = {}
    if not entries:
        return params, dtypes
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays alive through the arrays' buffers
    for name, dtype, shape, begin, end in entries:
        if dtype not in _ST_DTYPES:
            raise WeightsError(path, f"{name} has dtype {dtype}; F32, F16, BF16 or F64 expected")
        stored = _ST_DTYPES[dtype]
        count = math.prod(shape)
        if end - begin != count * stored.itemsize or begin < 0 or end < begin:
            raise WeightsError(path, f"corrupt safetensors header: {name} {dtype}{_shape(shape)} spans"
                                     f" {end - begin} bytes, expected {count * stored.itemsize}")
        arr = np.frombuffer(mm, dtype=stored, count=count, offset=start + begin)
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif dtype != "F32" or not arr.dtype.isnative:
            arr = arr.astype(np.float32)
        params[name] = arr.reshape(shape)
    return params, dtypes


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    params: dict[str, np.ndarray] = {}
    dtypes = set()
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                arr = npz[name]
                if arr.dtype.kind != "f":
                    raise WeightsError(path, f"{name} has dtype {arr.dtype}; floating point expected")
                dtypes.add(str(arr.dtype))
                params[name] = np.ascontiguousarray(arr, dtype=np.float32)
    except WeightsError:
        raise
    except Exception as exc:  # zipfile/zlib/numpy errors of a damaged archive
        raise WeightsError(path, f"cannot read .npz archive: {_one_line(exc)}") from None
    return params, sorted(dtypes)


def _read_pth(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    try:
        import torch
    except ImportError:
        raise WeightsError(path, "torch is needed to read .pth checkpoints (pip install torch), or use"
                                 " a .safetensors/.npz file (`python cli.py weights convert` where torch is)"
                           ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(path, f"cannot read .pth checkpoint: {_one_line(exc)}") from None
    # training checkpoints wrap the state dict
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "teacher") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(path, f"a .pth file holding a {type(obj).__name__}, not a state dict")
    params: dict[str, np.ndarray] = {}
    dtypes = set()
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(path, f"unexpected key {name} (a {type(value).__name__}, not a tensor)")
        if not value.is_floating_point():
            raise WeightsError(path, f"{name} has dtype {value.dtype}; floating point expected")
        dtypes.add(str(value.dtype).replace("torch.", ""))
        params[str(name)] = value.detach().to(torch.float32).contiguous().numpy()
    return params, sorted(dtypes)


_READERS = {"safetensors": _read_safetensors, "npz": _read_npz, "pth": _read_pth}


def _read(path) -> tuple[dict[str, np.ndarray], str, list[str]]:
    path = Path(path)
    fmt = detect_format(path)
    try:
        params, dtypes = _READERS[fmt](path)
    except OSError as exc:
        raise WeightsError(path, f"cannot read: {exc.strerror or _one_line(exc)}") from None
    return params, fmt, dtypes


# ---------------------------------------------------------------- renaming into hub names

_PREFIXES = ("module.", "backbone.", "dinov2.")
_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "mask_token": "embeddings.mask_token",
}
_BLOCK = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")  # blocks.N.x and the chunked blocks.K.N.x
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_IN_LAYER = [  # (official or transformers-5 name inside a layer, hub name)
    ("attn.proj.", "attention.output.dense."),
    ("ls1.gamma", "layer_scale1.lambda1"),
    ("ls2.gamma", "layer_scale2.lambda1"),
    ("mlp.w12.", "mlp.weights_in."),
    ("mlp.w3.", "mlp.weights_out."),
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.down_proj.", "mlp.weights_out."),
]


def _hub_name(name: str) -> str:
    """The hub name of one key (qkv and gate/up halves keep a marker name, handled by the caller)."""
    key = name
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    if key.startswith("patch_embed.proj."):
        return "embeddings.patch_embeddings.projection." + key[len("patch_embed.proj."):]
    if key.startswith("norm."):
        return "layernorm." + key[len("norm."):]
    m = _BLOCK.match(key)
    if m:
        key = f"encoder.layer.{m.group(1)}.{m.group(2)}"
    m = _LAYER.match(key)
    if m:
        rest = m.group(2)
        for old, new in _IN_LAYER:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        key = f"encoder.layer.{m.group(1)}.{rest}"
    return key


def to_hub_names(raw: dict[str, np.ndarray], path="<params>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Rename any supported naming into hub names. Returns the params and {hub name: name in the file}."""
    params: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    halves: dict[str, dict[str, tuple[str, np.ndarray]]] = {}  # SwiGLU gate/up, joined below

    def put(key: str, arr: np.ndarray, source: str) -> None:
        if key in params:
            raise WeightsError(path, f"duplicate parameter {key} (from {origin[key]} and {source})")
        params[key] = arr
        origin[key] = source

    for name, arr in raw.items():
        key = _hub_name(name)
        m = _LAYER.match(key)
        rest = m.group(2) if m else ""
        if m and rest in ("attn.qkv.weight", "attn.qkv.bias"):
            leaf = rest.rsplit(".", 1)[1]
            rows = arr.shape[0] if arr.ndim else 0
            if arr.ndim not in (1, 2) or rows % 3:
                raise WeightsError(path, f"{name} has shape {_shape(arr.shape)}, expected (3*dim, dim) or (3*dim,)")
            d = rows // 3
            for i, part in enumerate(("query", "key", "value")):
                put(f"encoder.layer.{m.group(1)}.attention.attention.{part}.{leaf}", arr[i * d:(i + 1) * d], name)
        elif m and re.match(r"^mlp\.(gate|up)_proj\.(weight|bias)$", rest):
            half, leaf = rest.split(".")[1].split("_")[0], rest.rsplit(".", 1)[1]
            halves.setdefault(f"encoder.layer.{m.group(1)}.mlp.weights_in.{leaf}", {})[half] = (name, arr)
        else:
            put(key, arr, name)
    for key, parts in halves.items():
        if set(parts) != {"gate", "up"}:
            have = next(iter(parts.values()))[0]
            other = have.replace("gate_proj", "up_proj") if "gate_proj" in have else have.replace("up_proj", "gate_proj")
            raise WeightsError(path, f"missing key {other} (the SwiGLU input needs both gate_proj and up_proj)")
        (gname, gate), (uname, up) = parts["gate"], parts["up"]
        if gate.shape != up.shape:
            raise WeightsError(path, f"{gname} has shape {_shape(gate.shape)} but {uname} has {_shape(up.shape)}")
        put(key, np.concatenate([gate, up], axis=0), f"{gname} + {uname}")

    # the mask token is unused at inference; official checkpoints may lack it or shape it differently
    cls = params.get("embeddings.cls_token")
    if cls is not None and cls.ndim >= 1:
        d = cls.shape[-1]
        mask = params.get("embeddings.mask_token")
        if mask is None:
            params["embeddings.mask_token"] = np.zeros((1, d), np.float32)
            origin["embeddings.mask_token"] = "(absent: zeros)"
        elif mask.size == d and mask.shape != (1, d):
            params["embeddings.mask_token"] = mask.reshape(1, d)
    return params, origin


# ---------------------------------------------------------------- the model's shape, and the check


def _need(params, key, path) -> np.ndarray:
    if key not in params:
        if not any(k.startswith(("embeddings.", "encoder.layer.", "layernorm.")) for k in params):
            first = next(iter(params), None)
            seen = f" (its first key is {first})" if first else " (it holds no tensors)"
            raise WeightsError(path, f"not a DINOv2 checkpoint: no known parameter names{seen}")
        raise WeightsError(path, f"missing key {key}")
    return params[key]


def config_from_params(params: dict[str, np.ndarray], path="<params>") -> ModelConfig:
    """The ModelConfig read off the parameters' shapes (hub names): nothing names the variant."""
    cls = _need(params, "embeddings.cls_token", path)
    if cls.ndim == 0 or cls.shape[-1] == 0:
        raise WeightsError(path, f"embeddings.cls_token has shape {_shape(cls.shape)}, expected (1, 1, dim)")
    dim = int(cls.shape[-1])
    layers = {int(m.group(1)) for k in params if (m := _LAYER.match(k))}
    if not layers:
        raise WeightsError(path, "no transformer layers (encoder.layer.N.* keys) found")
    depth = max(layers) + 1
    ffn, hidden = "mlp", 0
    w_in = sorted((k for k in params if k.endswith(".mlp.weights_in.weight")), key=_layer_index)
    if w_in:
        ffn, hidden = "swiglu", int(params[w_in[0]].shape[0]) // 2 if params[w_in[0]].ndim else 0
    else:
        fc1 = sorted((k for k in params if k.endswith(".mlp.fc1.weight")), key=_layer_index)
        if fc1 and params[fc1[0]].ndim:
            hidden = int(params[fc1[0]].shape[0])
    registers = 0
    reg = params.get("embeddings.register_tokens")
    if reg is not None:
        if reg.ndim != 3:
            raise WeightsError(path, f"embeddings.register_tokens has shape {_shape(reg.shape)}, expected (1, n, {dim})")
        registers = int(reg.shape[1])
    proj = _need(params, "embeddings.patch_embeddings.projection.weight", path)
    if proj.ndim != 4:
        raise WeightsError(path, f"embeddings.patch_embeddings.projection.weight has shape {_shape(proj.shape)},"
                                 f" expected ({dim}, 3, patch, patch)")
    patch = int(proj.shape[-1])
    pos = _need(params, "embeddings.position_embeddings", path)
    rows = int(pos.shape[-2]) if pos.ndim >= 2 else 0
    grid = math.isqrt(max(rows - 1, 0))
    if rows < 2 or grid * grid != rows - 1:
        raise WeightsError(path, f"embeddings.position_embeddings has shape {_shape(pos.shape)}: the rows must be"
                                 " a square grid + 1 (CLS)")
    return ModelConfig(dim=dim, depth=depth, ffn=ffn, hidden=hidden, registers=registers, patch=patch, grid=grid)


def _layer_index(key: str) -> int:
    m = _LAYER.match(key)
    return int(m.group(1)) if m else -1


def check_params(params: dict[str, np.ndarray], cfg: ModelConfig, path="<params>",
                 origin: dict[str, str] | None = None) -> None:
    """Keys and shapes against ``expected_shapes(cfg)``; WeightsError naming the first problem."""
    origin = origin or {}
    expected = expected_shapes(cfg)
    problems = []

    def label(key):
        src = origin.get(key)
        return key if not src or src == key or src.startswith("(") else f"{key} ({src} in the file)"

    for key, shape in expected.items():
        if key not in params:
            problems.append(f"missing key {key}")
    for key, shape in expected.items():
        if key in params and tuple(params[key].shape) != shape:
            problems.append(f"{label(key)} has shape {_shape(params[key].shape)}, expected {_shape(shape)}")
    for key in params:
        if key not in expected:
            problems.append(f"unexpected key {origin.get(key, key)}")
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise WeightsError(path, problems[0] + more)


def _finish(raw: dict[str, np.ndarray], path) -> tuple[dict[str, np.ndarray], ModelConfig]:
    params, origin = to_hub_names(raw, path)
    cfg = config_from_params(params, path)
    check_params(params, cfg, path, origin)
    return {key: params[key] for key in expected_shapes(cfg)}, cfg


def load_params(path) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Read any supported weights file into float32 arrays keyed by hub names, with the model's config.

    Arrays of an F32 safetensors file are read-only views of a memory map. Raises WeightsError with one
    line naming the file and its first problem (missing/unexpected key, wrong shape, truncation, format).
    """
    raw, _, _ = _read(path)
    return _finish(raw, path)


# ---------------------------------------------------------------- writing


def _write_safetensors(params: dict[str, np.ndarray], f) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    arrays = []
    offset = 0
    for name in sorted(params):
        arr = np.ascontiguousarray(params[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the safetensors writer does
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
        if arr.size:
            f.write(memoryview(arr.reshape(-1)).cast("B"))


def save_params(params: dict[str, np.ndarray], path) -> Path:
    """Write float32 params to ``.safetensors`` (hub layout) or ``.npz``, chosen by the extension; atomic."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz"):
        raise WeightsError(path, "cannot write this format: use a .safetensors or .npz file name")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise WeightsError(path, f"cannot write: {exc.strerror or _one_line(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if suffix == ".safetensors":
                _write_safetensors(params, f)
            else:
                np.savez(f, **{k: np.asarray(v, dtype=np.float32) for k, v in params.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise WeightsError(path, f"cannot write: {exc.strerror or _one_line(exc)}") from None
        raise
    return path


def convert(src, dst) -> ModelConfig:
    """Load ``src`` (any supported format and naming) and write it to ``dst`` in hub names."""
    params, cfg = load_params(src)
    save_params(params, dst)
    return cfg


def file_sha256(path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
    except FileNotFoundError:
        raise WeightsError(path, "no such file") from None
    except OSError as exc:
        raise WeightsError(path, f"cannot read: {exc.strerror or _one_line(exc)}") from None
    return digest.hexdigest()


# ---------------------------------------------------------------- inspection (``weights info``)


@dataclass(frozen=True)
class WeightsInfo:
    path: Path
    format: str  # safetensors / npz / pth
    dtypes: tuple[str, ...]  # as stored in the file
    size: int  # bytes
    config: ModelConfig
    n_params: int
    sha256: str
    official: str | None  # the OFFICIAL variant whose pinned hash the file has, if any


def describe(path, *, with_sha256: bool = True) -> WeightsInfo:
    """Everything ``weights info`` shows: loads and checks the file (cheap: memory-mapped)."""
    path = Path(path)
    raw, fmt, dtypes = _read(path)
    params, cfg = _finish(raw, path)
    digest = file_sha256(path) if with_sha256 else ""
    official = next((name for name, row in OFFICIAL.items() if row[3] and row[3] == digest), None)
    return WeightsInfo(path=path, format=fmt, dtypes=tuple(dtypes), size=path.stat().st_size, config=cfg,
                       n_params=int(sum(a.size for a in params.values())), sha256=digest, official=official)
