"""Checksums of a model directory's weight files, and the check that names a damaged file.

A checkpoint written by the trainer carries ``weights_checksums.json`` (written, like every file of
a checkpoint, before the checkpoint is renamed into place)::

    {"algorithm": "sha256", "files": {"model.safetensors": {"size": 1234, "sha256": "..."},
                                      "optimizer.pt": {...}}}

:func:`verify_model_dir` is called before weights are read (``model.load``, ``--init_from``,
``--resume``). It raises :class:`DamagedWeightsError` naming the file when

- a ``*.safetensors`` file is not a complete safetensors file (header unreadable, or the file is
  shorter / longer than its header says: a truncated copy or an interrupted write), checked for every
  directory, with or without checksums (reads only the header);
- a file listed in ``weights_checksums.json`` is missing, has another size, or another sha256 (silent
  bit flips). Hashing reads the file once (about 0.2 s per 100 MB).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

CHECKSUM_FILE = "weights_checksums.json"
_CHUNK = 1 << 22


class DamagedWeightsError(ValueError):
    """A weight file that cannot be trusted; ``file`` is its path."""

    def __init__(self, file, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"damaged checkpoint file {self.file}: {problem}")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def checksum_files(model_dir, names=None) -> dict:
    """``{"algorithm", "files": {name: {"size", "sha256"}}}`` for ``names`` (default: every top-level
    ``*.safetensors`` and ``*.pt`` / ``*.bin`` file of ``model_dir``)."""
    model_dir = Path(model_dir)
    if names is None:
        names = sorted(p.name for p in model_dir.iterdir()
                       if p.is_file() and p.suffix in (".safetensors", ".pt", ".bin"))
    return {"algorithm": "sha256",
            "files": {n: {"size": (model_dir / n).stat().st_size, "sha256": sha256_file(model_dir / n)}
                      for n in names}}


def check_safetensors(path) -> None:
    """The file is a whole safetensors file: readable header, data exactly as long as the header says."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DamagedWeightsError(path, f"{size} bytes: too short for a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise DamagedWeightsError(path, f"header length {n} does not fit in the file ({size} bytes): "
                                                "truncated or not a safetensors file")
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedWeightsError(path, f"unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise DamagedWeightsError(path, "safetensors header is not an object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise DamagedWeightsError(path, f"safetensors header entry {name!r} has no data offsets") from None
    want = 8 + n + end
    if size != want:
        raise DamagedWeightsError(path, f"{size} bytes, the safetensors header describes {want}: "
                                        + ("truncated" if size < want else "trailing bytes"))


def verify_model_dir(model_dir, *, only_weights: bool = True) -> None:
    """Raise :class:`DamagedWeightsError` for a damaged weight file of ``model_dir`` (see module doc).

    ``only_weights``: check the recorded checksums of ``*.safetensors`` files only (serving, export);
    False: of every recorded file (optimizer state too: resume)."""
    model_dir = Path(model_dir)
    for f in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(f)
    record = model_dir / CHECKSUM_FILE
    if not record.is_file():
        return
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
        items = [(str(n), int(v["size"]), str(v["sha256"])) for n, v in files.items()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DamagedWeightsError(record, f"unreadable checksum record ({e})") from None
    for name, size, digest in items:
        if only_weights and not name.endswith(".safetensors"):
            continue
        p = model_dir / name
        if not p.is_file():
            raise DamagedWeightsError(p, f"missing (listed in {CHECKSUM_FILE})")
        have = p.stat().st_size
        if have != size:
            raise DamagedWeightsError(p, f"{have} bytes, {size} when saved (truncated?)")
        if sha256_file(p) != digest:
            raise DamagedWeightsError(p, f"sha256 differs from the one recorded when it was saved "
                                         f"({CHECKSUM_FILE}): the file changed on disk")
