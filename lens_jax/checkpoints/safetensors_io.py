"""A streaming safetensors reader over `safetensors.safe_open` (and a small writer for tests and tools).

Tensors are read one at a time through safetensors' own memory-mapped `safe_open` (numpy framework), so
converting a checkpoint never holds more than the tensor being converted plus the output tree; bfloat16 comes
back as an `ml_dtypes` array (importing ml_dtypes registers it with NumPy). What this module adds: every
file's header is checked first, so a truncated or corrupt file is a SafetensorsError naming the tensor and
the missing bytes, a dtype NumPy cannot hold (float8) is named, and sharded checkpoints
(`model.safetensors.index.json`) read as one mapping.

Sharded checkpoints (`model.safetensors.index.json` with a `weight_map`) and single files are both
accepted; `open_checkpoint(path)` takes a file, an index file or a directory holding either.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, Iterator, Mapping, Tuple

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is malformed, truncated or of an unsupported dtype."""


class _File:
    """One .safetensors file: the header checked here, tensors read through safetensors' safe_open."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise SafetensorsError(f"{path}: {size} bytes is too small to be a safetensors file")
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise SafetensorsError(f"{path}: header length {header_len} exceeds file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: Dict[str, dict] = header
        data_len = size - 8 - header_len
        for name, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            expected = int(np.prod(e["shape"], dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
            if end - begin != expected or end > data_len:
                raise SafetensorsError(
                    f"{path}: tensor {name!r} spans bytes [{begin}, {end}) but needs {expected} bytes "
                    f"and the data section has {data_len} (truncated or corrupt file)")
        self._handle = None

    def get(self, name: str) -> np.ndarray:
        if self._handle is None:
            from safetensors import safe_open
            try:
                self._handle = safe_open(self.path, framework="numpy")
            except Exception as e:   # noqa: BLE001 - safetensors' own SafetensorError
                raise SafetensorsError(f"{self.path}: {e}") from None
        try:
            return self._handle.get_tensor(name)
        except (TypeError, AttributeError) as e:   # a dtype the numpy framework cannot represent
            raise SafetensorsError(f"{self.path}: tensor {name!r} of dtype {self.entries[name]['dtype']} cannot be "
                                   f"read as a NumPy array ({e})") from None


class SafetensorsReader(Mapping[str, np.ndarray]):
    """Read-only mapping name -> np.ndarray over one or more safetensors files, loaded lazily.

    `shape(name)` and `dtype(name)` read only the headers; `reader[name]` / `get(name)` loads one
    tensor.
    """

    def __init__(self, files: Iterable[str]):
        self._where: Dict[str, _File] = {}
        for path in files:
            f = _File(path)
            for name in f.entries:
                if name in self._where:
                    raise SafetensorsError(f"tensor {name!r} appears in both {self._where[name].path} and {path}")
                self._where[name] = f

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._where[name].entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._where[name].entries[name]["dtype"]]

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: self.shape(k) for k in self._where}


def open_checkpoint(path: str, prefer: str = "") -> SafetensorsReader:
    """Opens a safetensors checkpoint given a file, an `*.index.json` or a directory.

    In a directory, an index file is used if present (the one whose name starts with `prefer`, if
    given); otherwise every `*.safetensors` file in it.
    """
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        index = [n for n in names if n.endswith(".safetensors.index.json") and n.startswith(prefer)]
        if index:
            return open_checkpoint(os.path.join(path, index[0]))
        files = [os.path.join(path, n) for n in names if n.endswith(".safetensors") and n.startswith(prefer)]
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        return SafetensorsReader(files)
    if path.endswith(".json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        base = os.path.dirname(path)
        files = sorted(set(weight_map.values()))
        missing = [p for p in files if not os.path.exists(os.path.join(base, p))]
        if missing:
            raise FileNotFoundError(f"{path} names shard files that do not exist: {missing}")
        return SafetensorsReader(os.path.join(base, p) for p in files)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return SafetensorsReader([path])


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a safetensors file from NumPy arrays (used by tests and by tools that export)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise SafetensorsError(f"cannot store {name!r} of dtype {a.dtype}")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
