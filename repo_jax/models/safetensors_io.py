"""Lazy safetensors reading (memory-mapped numpy views) and streaming writing, without torch.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` and the raw little-endian data. Reading maps the file and returns views, so a
tensor's bytes are only touched when a slice of it is placed on a device; writing computes the
header from shapes first and then streams tensors one at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsFile:
    """One ``.safetensors`` file: ``names()``, ``shape(name)``, ``get(name) -> np.ndarray`` (a view)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + n
        self._mm = None

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mm[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsFolder:
    """An HF checkpoint folder: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            files = {f: SafetensorsFile(folder / f) for f in sorted(set(weight_map.values()))}
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif (folder / SINGLE).is_file():
            single = SafetensorsFile(folder / SINGLE)
            self._where = {name: single for name in single.names()}
        else:
            raise FileNotFoundError(f"{folder} holds neither {SINGLE} nor {INDEX} (only safetensors are loaded, never pickle)")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


def write_folder(
    folder: str | Path,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    *,
    max_shard_bytes: int = 4 << 30,
) -> list[Path]:
    """Writes ``(name, shape, dtype, produce)`` tensors into ``model.safetensors`` or shards + index.

    ``produce()`` is called once per tensor while its shard is written, so only one tensor is
    in host memory at a time.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        nbytes = int(np.prod(item[1], dtype=np.int64)) * np.dtype(item[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        total += _write_file(folder / fname, shard)
        weight_map.update({name: fname for name, *_ in shard})
    if len(shards) > 1:
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [folder / n for n in names]


def write_file(path: str | Path, tensors) -> int:
    """One safetensors file of ``(name, shape, dtype, produce)`` tensors (no sharding); returns its size."""
    return _write_file(Path(path), list(tensors))


def _write_file(path: Path, items) -> int:
    header, offset = {}, 0
    for name, shape, dtype, _ in items:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in items:
            arr = np.ascontiguousarray(produce(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {arr.shape}, header says {tuple(shape)}")
            f.write(arr.tobytes())
    return offset
