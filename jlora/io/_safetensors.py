"""Reading and writing the safetensors format with numpy (bfloat16 via ml_dtypes).

Files are memory-mapped and checked against their header, so a truncated or
corrupt file gives an error naming it rather than garbage weights. Nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}

_FIX = "re-download or re-save the checkpoint (transformers: save_pretrained(dir, safe_serialization=True))"


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor in a ``.safetensors`` file (read-only, memory-mapped views).

  Raises:
    ValueError: the file is missing, truncated or has a malformed header.
  """
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"Safetensors file {path} does not exist; {_FIX}.")
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path} is truncated ({size} bytes, no header); {_FIX}.")
    (header_len,) = struct.unpack("<Q", head)
    if 8 + header_len > size:
      raise ValueError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes "
                       f"in a {size}-byte file); {_FIX}.")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path} has a malformed safetensors header ({e}); {_FIX}.") from None
  data_len = size - 8 - header_len
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if data_len else np.zeros(0, np.uint8)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    if end > data_len:
      raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {end} of data but the file "
                       f"holds {data_len}; {_FIX}.")
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which jlora cannot read; "
                       f"supported: {', '.join(DTYPES)}.")
    dtype = DTYPES[info["dtype"]]
    if end - begin != int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize:
      raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, which does not fit its shape "
                       f"{info['shape']} and dtype {info['dtype']}; the file is corrupt; {_FIX}.")
    tensors[name] = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                  offset=begin).reshape(info["shape"])
    if dtype.kind == "f" or dtype == DTYPES["BF16"]:
      if not np.isfinite(tensors[name]).all():
        raise ValueError(f"{path}: tensor {name!r} holds NaN or inf values; the checkpoint is corrupt or "
                         f"was saved from a diverged run. Use an earlier checkpoint, or {_FIX}.")
  return tensors


def describe(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
  """``name -> (shape, safetensors dtype name such as "BF16")`` of every tensor in ``path``, checked as ``read`` checks it."""
  return {name: (tuple(array.shape), NAMES[array.dtype]) for name, array in read(path).items()}


def write(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
  """Write ``tensors`` to ``path`` atomically (temp file, then rename)."""
  path = Path(path)
  header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in NAMES:
      raise ValueError(f"Cannot write tensor {name!r} of dtype {array.dtype} to safetensors.")
    header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(encoded)))
      f.write(encoded)
      for array in arrays:
        f.write(array.tobytes())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)  # only left after a failure: never a half-written file


def write_text(text: str, path: str | os.PathLike) -> None:
  """Write ``text`` to ``path`` atomically (temp file, then rename; no temp file left on failure)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
