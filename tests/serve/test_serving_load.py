"""The model server under abuse and under load: fuzzed bodies, oversized bodies, a soak.

One real server (`make serve`'s command, a small body limit) on loopback for the module.
"""

from __future__ import annotations

import http.client
import json
import random

import numpy as np
import pytest
from helpers import tiny_store
from helpers.digits import synthetic_digits
from helpers.serving import alive, post

from mnist_pipeline.config.loading import tracking_config
from mnist_pipeline.serve import load
from mnist_pipeline.serve.guard import RequestRefused, check
from mnist_pipeline.serve.model_server import model_server_command
from mnist_pipeline.serve.process import start, stop, wait_until_ready


LIMIT = 256 * 1024  # bytes: a batch of ~90 images as JSON


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(port, server process) for a tiny champion, with LIMIT as the body limit."""
    store = tiny_store.build(tmp_path_factory.mktemp("load-repo"), tiny_store.synthetic_splits())
    port = tiny_store.free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_ROOT", str(store.root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        command = model_server_command(tracking_config(store.root), port=port, max_body_bytes=LIMIT)
        log_path = tmp_path_factory.mktemp("load-log") / "server.log"
        with open(log_path, "wb") as log:
            process = start(command, log=log)
            try:
                wait_until_ready(process, command.ready_url)
                yield port, process
            finally:
                stop(process)


# --- the guard alone (no server) -----------------------------------------------------------


def test_a_well_formed_batch_comes_back_as_uint8_images():
    images, _ = synthetic_digits(3, seed=1)
    for key in ("inputs", "instances"):
        parsed = check("application/json", json.dumps({key: images.astype(float).tolist()}))
        assert parsed.dtype == np.uint8
        np.testing.assert_array_equal(parsed, images)


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"inputs": [[[1] * 28] * 27]}, 400, "does not match expected shape (-1, 28, 28)"),
        ({"inputs": [[[1] * 28] * 28], "params": {"a": 1}}, 400, "takes no parameters"),
        ({"inputs": [["a"] * 28] * 28}, 400, "pixels must be whole numbers"),
        ([[[1] * 28] * 28], 400, "expected a JSON object, got list"),
        ({"dataframe_split": {"data": [[1]]}}, 400, "exactly one of the input fields"),
    ],
)
def test_everything_but_an_image_batch_is_refused_with_its_reason(body, status, reason):
    with pytest.raises(RequestRefused) as refused:
        check("application/json", json.dumps(body).encode())
    assert refused.value.status == status and reason in refused.value.reason
    with pytest.raises(RequestRefused) as refused:
        check("text/csv", b"1,2,3")
    assert refused.value.status == 415


def test_an_app_needs_a_positive_limit():
    from mnist_pipeline.serve.app import ServingApp

    with pytest.raises(ValueError, match="max_body_bytes: got 0"):
        ServingApp(model=None, max_body_bytes=0)


# --- the real server -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bodies_over_the_limit_get_a_413(served):
    port, _ = served
    images, _ = synthetic_digits(200, seed=2)  # ~560 KB as JSON
    status, answer = post(port, {"inputs": images.tolist()})
    assert status == 413, answer[:300]
    assert f"limit of {LIMIT} bytes" in json.loads(answer)["message"]
    # No Content-Length: the body arrives in chunks and is counted as it comes.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        chunks = (b"[" * 4096 for _ in range(LIMIT // 4096 + 2))
        connection.request(
            "POST",
            "/invocations",
            body=chunks,
            encode_chunked=True,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 413 and b"limit of" in response.read()
    finally:
        connection.close()
    ok, answer = post(port, {"inputs": images[:50].tolist()})  # under the limit: answered
    assert ok == 200, answer[:300]
    assert alive(port)


CONTENT_TYPES = [
    None,
    "",
    "application/json",
    "application/json",
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/json; charset=utf-16",
    "application/json; boundary=x",
    "APPLICATION/JSON",
    "application/json;;",
    "text/csv",
    "text/plain",
    "application/vnd.apache.parquet",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "image/png",
    "*/*",
    "application/",
    "\t",
    "application/json\x7f",
    "text/csv; charset=utf-8",
]


def fuzz_value(rng: random.Random, depth: int = 0) -> object:
    """A random JSON value: numbers of every kind, strings, nulls, lists, objects."""
    kind = rng.randrange(10 if depth < 4 else 6)
    return [
        lambda: rng.randint(-300, 600),
        lambda: rng.uniform(-1, 300),
        lambda: rng.choice(
            [
                float("nan"),
                float("inf"),
                -float("inf"),
                10**40,
                2**63,
                -(2**63) - 1,
                1e308,
                0.5,
                -0.0,
                True,
                False,
            ]
        ),
        lambda: rng.choice(["", "7", "a" * rng.randint(1, 50), "\u00e9\u4e2d"]),
        lambda: None,
        lambda: rng.randint(0, 255),
        lambda: [fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 5))],
        lambda: [fuzz_value(rng, depth + 1)] * rng.randint(0, 30),
        lambda: {
            rng.choice(
                [
                    "inputs",
                    "instances",
                    "x",
                    "params",
                    "dataframe_split",
                    "dataframe_records",
                    "columns",
                    "data",
                ]
            ): fuzz_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))
        },
        lambda: rng.choice([[], {}, [[]], [[[]]]]),
    ][kind]()


def fuzz_images(rng: random.Random) -> object:
    """Almost-images: wrong shapes, a few wrong values, ragged rows, extra axes."""
    shape = [
        rng.choice([0, 1, 2, 27, 28, 28, 28, 29]) for _ in range(rng.choice([1, 2, 3, 3, 3, 4]))
    ]
    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, shape).tolist()
    if rng.random() < 0.6 and shape and shape[0] and pixels:
        row = pixels
        while isinstance(row, list) and row and isinstance(row[0], list):
            row = row[rng.randrange(len(row))]
        if isinstance(row, list) and row:
            row[rng.randrange(len(row))] = fuzz_value(rng, 4)
            if rng.random() < 0.3:
                row.pop()
    return pixels


def fuzz_body(rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:  # raw bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    if kind == 1:  # deep nesting, arrays or objects, closed or not
        depth = rng.choice([10, 100, 1_000, 5_000, 100_000])
        opener, closer = rng.choice([("[", "]"), ('{"inputs": ', "}"), ('{"a":', "}")])
        body = (opener * depth + "0" + closer * depth * rng.randint(0, 1)).encode()
        return b'{"inputs": ' + body + b"}" if rng.random() < 0.3 else body
    document = (
        {rng.choice(["inputs", "instances"]): fuzz_images(rng)} if kind < 6 else fuzz_value(rng)
    )
    if rng.random() < 0.2 and isinstance(document, dict):
        document[rng.choice(["inputs", "instances", "params", "extra"])] = fuzz_value(rng)
    text = json.dumps(document)
    if kind == 6 and text:  # truncated
        text = text[: rng.randrange(len(text))]
    encoding = rng.choice(["utf-8"] * 6 + ["utf-16", "utf-32", "latin-1"])
    body = text.encode(encoding, errors="replace")
    if rng.random() < 0.05:  # oversized
        body = body + b" " * (LIMIT + 1)
    return body


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzzed_requests_get_no_5xx_and_the_server_stays_up(served):
    port, process = served
    rng = random.Random(20261129)
    statuses: dict[int, int] = {}
    for index in range(1200):
        body = fuzz_body(rng)
        content_type = rng.choice(CONTENT_TYPES)
        headers = {"Accept": rng.choice(["*/*", "text/html", ""])}
        try:
            status, answer = post(port, body, content_type=content_type, headers=headers)
        except (ConnectionError, http.client.HTTPException) as err:
            pytest.fail(f"request {index} ({content_type!r}, {body[:120]!r}): {err!r}")
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (index, content_type, body[:200], answer[:500])
        if status != 200:
            assert answer.strip(), (index, status)  # a reason, never an empty 4xx
    assert process.poll() is None and alive(port)
    assert sum(count for status, count in statuses.items() if 400 <= status < 500) >= 1000, statuses


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_10000_requests_from_16_clients(served):
    port, process = served
    images, _ = synthetic_digits(64, seed=4)
    bodies = [json.dumps({"inputs": images[i : i + 1].tolist()}).encode() for i in range(64)]
    url = f"http://127.0.0.1:{port}/invocations"
    load.run_clients(url, bodies, 200, 16)  # warm-up: every thread pool and buffer in place
    rss: list[int] = []
    result = load.run_clients(
        url,
        bodies,
        10_000,
        16,
        every=1000,
        on_every=lambda done: rss.append(load.tree_rss_bytes(process.pid)),
    )
    print(
        f"soak: {result.count} requests, 16 clients, {result.per_s():.0f} req/s, "
        f"p50 {result.quantile_ms(0.5):.1f} ms, p99 {result.quantile_ms(0.99):.1f} ms; "
        f"server RSS {rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB"
    )
    assert result.count == 10_000 and result.failed == 0, result.errors
    assert len(rss) == 10 and rss[-1] <= 1.10 * rss[0], [r // 2**20 for r in rss]
    assert alive(port)
