"""Atomic writes and content hashes.

Nothing a later stage trusts is ever half-written: every output is written to a temporary
file beside its target and moved into place with `os.replace`, which is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(
    target: str | os.PathLike[str], suffix: str = "", mode: int = 0o644
) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success move it onto `target`.

    On any exception the temporary file is removed and `target` is left as it was.
    `suffix` keeps an extension some writers insist on (Keras wants `.keras`). `mode`: the
    file's permissions (0o600 for secrets: the file is never readable by others, even
    before it is moved into place).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes 0600; outputs are ordinary readable files
        _fsync(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(
    target: str | os.PathLike[str], mode: str = "w", permissions: int = 0o644
) -> Iterator[IO[Any]]:
    """Open a temporary file beside `target` for writing; replace `target` on success."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(target, mode=permissions) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh


def write_bytes(target: str | os.PathLike[str], data: bytes, permissions: int = 0o644) -> None:
    with atomic_open(target, "wb", permissions) as fh:
        fh.write(data)


def write_text(target: str | os.PathLike[str], text: str, permissions: int = 0o644) -> None:
    with atomic_open(target, "w", permissions) as fh:
        fh.write(text)


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    """Strict JSON (NaN/inf become null, numpy values plain Python), written atomically."""
    write_text(target, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def rounded(value: float) -> float:
    """A metric for a JSON file: 6 significant decimals; NaN stays NaN (`write_json` makes it
    null)."""
    import math

    return round(float(value), 6) if math.isfinite(value) else math.nan


def json_safe(obj: Any) -> Any:
    """`obj` with NaN/inf floats as None and numpy scalars/arrays as plain Python values.

    `json.dumps` writes NaN as the bare token `NaN`, which is not JSON; this makes any
    nesting of dicts, lists, tuples and numpy values loadable by strict parsers.
    """
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tree_sha256(folder: str | os.PathLike[str]) -> str:
    """One digest of every file under `folder`: relative paths and contents, in sorted order
    (what a model's artifacts were when it was approved)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
