"""The champion over REST: its ONNX export behind MLflow's scoring protocol, predictions and
bad requests, and MLflow's own server on the same logged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import config as test_config
from helpers import tiny_store
from helpers.digits import synthetic_digits
from helpers.serving import alive, post

from mnist_pipeline.config.loading import tracking_config
from mnist_pipeline.errors import ServerError
from mnist_pipeline.serve.model_server import main, model_server_command
from mnist_pipeline.tracking.served_artifacts import Served
from mnist_pipeline.tracking.store import connect


# --- the command line (no server) ----------------------------------------------------------

SERVED = Served(folder=Path("/models/v3/artifacts"), name="mnist-classifier", version="3")


def test_command_serves_the_onnx_model_on_loopback():
    command = model_server_command(test_config.section("tracking"), port=5124, served=SERVED)
    argv = command.argv
    # This package's app (MLflow's scoring protocol, ONNX Runtime) by uvicorn.
    assert argv[:5] == [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "mnist_pipeline.serve.app:create",
    ]

    def option(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert option("--host") == "127.0.0.1"
    assert option("--port") == "5124"
    assert option("--workers") == "1"
    env = command.env_overrides
    assert env["MNIST_SERVE_MODEL_DIR"] == "/models/v3/artifacts"
    assert (env["MNIST_SERVE_MODEL_NAME"], env["MNIST_SERVE_MODEL_VERSION"]) == (
        "mnist-classifier",
        "3",
    )
    assert env["MNIST_SERVE_MAX_BODY_BYTES"] == str(16 * 1024 * 1024)
    assert (env["MNIST_SERVE_MAX_BATCH"], env["MNIST_SERVE_MAX_WAIT_MS"]) == ("256", "2")
    assert env["MNIST_SERVE_PRECISION"] == "float32"  # the float graph unless --int8
    assert "MLFLOW_TRACKING_URI" not in env  # the server never opens the store
    assert command.env_overrides["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert command.url == "http://127.0.0.1:5124/invocations"
    assert command.ready_url == "http://127.0.0.1:5124/ping"
    assert not command.warnings


def test_mlflow_is_mlflow_models_serve_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    command = model_server_command(test_config.section("tracking"), port=5124, mlflow=True)
    argv = command.argv
    assert argv[:5] == [sys.executable, "-m", "mlflow", "models", "serve"]
    assert argv[argv.index("--model-uri") + 1] == "models:/mnist-classifier@champion"
    assert argv[argv.index("--env-manager") + 1] == "local"
    assert command.env_overrides["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_onnx_int8_is_this_servers_option_not_mlflows():
    tracking = test_config.section("tracking")
    command = model_server_command(tracking, served=SERVED, int8=True)
    assert command.env_overrides["MNIST_SERVE_PRECISION"] == "int8"
    with pytest.raises(ServerError, match="--int8 with --mlflow: MLflow's server runs the float"):
        model_server_command(tracking, mlflow=True, int8=True)


def test_limits_out_of_range_are_refused():
    with pytest.raises(ServerError, match="--max-body-bytes: got 0"):
        model_server_command(test_config.section("tracking"), max_body_bytes=0, served=SERVED)
    with pytest.raises(ServerError, match="--max-batch 0, --max-wait-ms 2: expected"):
        model_server_command(test_config.section("tracking"), max_batch=0, served=SERVED)


def test_explicit_wide_bind_is_warned():
    command = model_server_command(test_config.section("tracking"), host="0.0.0.0", served=SERVED)
    assert any("exposes this server" in w for w in command.warnings)
    assert command.url.startswith("http://127.0.0.1:")


def test_serving_without_a_store_says_what_to_do(tmp_path, monkeypatch, capsys):
    test_config.write_params(tmp_path)  # a checkout whose pipeline has not run yet
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["--port", str(tiny_store.free_port())])
    assert exit_info.value.code == 1
    assert "no tracking store at sqlite:///" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # nothing created by asking


def test_serving_before_the_first_champion_says_what_to_do(tmp_path, monkeypatch, capsys):
    test_config.write_params(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    connect(test_config.section("tracking"))  # a store with no registered model yet
    with pytest.raises(SystemExit) as exit_info:
        main(["--port", str(tiny_store.free_port())])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "no version of 'mnist-classifier' is 'champion' yet" in err
    assert "--model-uri models:/mnist-classifier/<version>" in err


# --- the real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tiny_store.Store:
    return tiny_store.build(tmp_path_factory.mktemp("serving-repo"), tiny_store.synthetic_splits())


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """`models:/mnist-classifier@champion` served as `make serve` serves it."""
    log = tmp_path_factory.mktemp("serving-log") / "server.log"
    with tiny_store.server(store, lambda cfg, port: model_server_command(cfg, port=port), log) as (
        _,
        port,
    ):
        yield port


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("key", ["inputs", "instances"])
def test_champion_predicts_like_the_keras_model(server, store, key):
    images, _ = synthetic_digits(16, seed=7)
    predictions, body = _predictions(server, images, key)
    assert predictions.shape == (16, 10)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-5)
    expected = store.served(images)  # calibrated with the version's temperature
    np.testing.assert_array_equal(predictions.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(predictions, expected, atol=1e-5)
    # Each answer below the version's abstention threshold is marked, none hidden.
    assert json.loads(body)["unsure"] == (predictions.max(axis=1) < store.threshold).tolist()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_whole_number_floats_are_pixels(server, store):
    """255.0 is the pixel 255: JSON writers that only know floats still work."""
    images, _ = synthetic_digits(2, seed=8)
    status, body = post(server, {"inputs": images.astype(float).tolist()})
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["predictions"], store.served(images), atol=1e-5)


DIGITS = synthetic_digits(2, seed=9)[0].astype(int)
SHAPE = "does not match expected shape"
PIXELS = "pixels must be whole numbers in 0..255"
MALFORMED = {
    "rows of 27 pixels": ({"inputs": DIGITS[:, :27].tolist()}, SHAPE),
    "flat 784 vectors": ({"inputs": DIGITS.reshape(2, -1).tolist()}, SHAPE),
    "one image without a batch axis": ({"inputs": DIGITS[0].tolist()}, SHAPE),
    "a batch of batches": ({"inputs": [DIGITS.tolist()]}, SHAPE),
    "negative pixels": ({"inputs": (DIGITS - 300).tolist()}, PIXELS),
    "pixels over 255": ({"inputs": (DIGITS + 300).tolist()}, PIXELS),
    "negative whole floats": ({"inputs": (DIGITS - 1.0).tolist()}, PIXELS),
    "Infinity": (json.dumps({"inputs": DIGITS.tolist()}).replace("0", "Infinity", 1), PIXELS),
    "strings": ({"inputs": [[["a"] * 28] * 28]}, "values, such as 'a'"),
    "NaN": (json.dumps({"inputs": DIGITS.tolist()}).replace("0", "NaN", 1), "got nan"),
    "integers beyond 64 bits": ({"inputs": [[[10**30] * 28] * 28]}, "too large"),
    "ragged rows": ({"inputs": [[[1, 2], [3]]]}, "inhomogeneous"),
    "null": ({"inputs": None}, "expected a list of images, got NoneType"),
    "an empty batch": ({"inputs": []}, "an empty batch"),
    "no inputs key": ({"pixels": DIGITS.tolist()}, "exactly one of the input fields"),
    "both inputs and instances": (
        {"inputs": DIGITS.tolist(), "instances": DIGITS.tolist()},
        "exactly one of the input fields",
    ),
    "a bare list": (DIGITS.tolist(), "expected a JSON object, got list"),
    "invalid JSON": ('{"inputs": [[[0, 1,', "valid JSON"),
    "an empty body": (b"", "valid JSON"),
    "bytes that are not UTF-8": (b'\xff\xfe{"inputs": 1}', "valid JSON"),
    "deeply nested inputs": (
        '{"inputs": ' + "[" * 500 + "]" * 500 + "}",
        "not an array of numbers",
    ),
    "params for a model that takes none": (
        {"inputs": DIGITS.tolist(), "params": {"k": 1}},
        "this model takes no parameters",
    ),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_payload_gets_a_400_with_a_reason(server, case):
    body, reason = MALFORMED[case]
    status, answer = post(server, body)
    assert status == 400, (status, answer[:300])
    error = json.loads(answer)
    assert error["error_code"] == "BAD_REQUEST"
    assert reason in error["message"], error["message"][:500]
    assert alive(server)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_unsupported_content_type_gets_a_415(server):
    status, answer = post(server, "0,0,0\n", content_type="text/plain")
    assert status == 415 and b"only supports the following content types" in answer
    assert alive(server)


# Three requests MLflow 3.17's scoring server answers wrongly (docs/serving.md names the
# lines); this server answers them.


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fractional_floats_are_refused(server):
    """MLflow casts `inputs` with np.array(data, dtype=uint8): 0.5 would silently be pixel 0."""
    status, answer = post(server, {"inputs": (DIGITS / 255.0).tolist()})
    assert status == 400, answer[:300]
    assert "pixels must be whole numbers in 0..255 (uint8), got 0." in json.loads(answer)["message"]
    assert alive(server)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_missing_content_type_is_a_client_error(server):
    """MLflow's `invocations()` splits the header without checking it is there (a 500)."""
    status, answer = post(server, {"inputs": DIGITS.tolist()}, content_type=None)
    assert status == 415 and b"no Content-Type header" in answer
    assert alive(server)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deeply_nested_json_is_a_client_error(server):
    """json.loads raises RecursionError, which MLflow does not catch (a 500)."""
    status, answer = post(server, "[" * 100_000 + "]" * 100_000)
    assert status == 400 and b"nested too deeply" in answer
    assert alive(server)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_request_variants_are_answered_alike(server, store):
    """What MLflow's clients send besides the plain body: the charset spelled out, and
    empty `params`."""
    images, _ = synthetic_digits(3, seed=10)
    expected = store.served(images)
    for content_type, body in (
        ("application/json; charset=UTF-8", {"inputs": images.tolist()}),
        ("application/json", {"inputs": images.tolist(), "params": {}}),
    ):
        status, answer = post(server, body, content_type=content_type)
        assert status == 200, answer[:300]
        np.testing.assert_allclose(json.loads(answer)["predictions"], expected, atol=1e-5)
    status, answer = post(
        server, {"inputs": images.tolist()}, content_type="application/json; charset=latin-1"
    )
    assert status == 415 and b"only supports UTF-8" in answer


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_onnx_server_process_loads_no_tensorflow(server, store):
    """The server's process answers without TensorFlow: no TensorFlow library is mapped into
    it after it has answered."""
    images, _ = synthetic_digits(4, seed=11)
    assert post(server, {"inputs": images.tolist()})[0] == 200
    pid = _listening_pid(server)
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "onnxruntime" in maps
    assert "tensorflow" not in maps.lower(), "a TensorFlow library is loaded in the server"


def _predictions(port: int, images: np.ndarray, key: str = "inputs") -> tuple[np.ndarray, bytes]:
    """The server's float32 predictions for `images` (its answer must be a 200), and the body."""
    status, body = post(port, {key: images.tolist()})
    assert status == 200, body[:500]
    return np.asarray(json.loads(body)["predictions"], dtype=np.float32), body


def _listening_pid(port: int) -> int:
    """The process that listens on `port` on loopback (the server: uvicorn, one worker)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inode = fields[9]
    assert inode is not None, f"nothing listens on {port}"
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
        except OSError:
            continue
    raise AssertionError(f"no process holds the socket of port {port}")


@pytest.mark.slow
def test_onnx_app_imports_neither_tensorflow_nor_mlflow(store, monkeypatch):
    """Making the app and answering a request, in a fresh process: neither TensorFlow nor
    MLflow (nor Keras) is ever imported."""
    from mnist_pipeline.tracking import served_artifacts

    monkeypatch.setenv("DVC_ROOT", str(store.root))
    with tempfile.TemporaryDirectory() as cache:
        folder = served_artifacts.locate(
            tracking_config(store.root), "models:/mnist-classifier@champion", cache
        ).folder
    script = f"""
import asyncio, json, os, sys
os.environ["MNIST_SERVE_MODEL_DIR"] = {str(folder)!r}
from mnist_pipeline.serve import app
served = app.create()
sent = []
async def send(message): sent.append(message)
body = json.dumps({{"inputs": [[[0] * 28] * 28]}}).encode()
messages = iter([{{"type": "http.request", "body": body, "more_body": False}}])
async def receive(): return next(messages)
scope = {{"type": "http", "method": "POST", "path": "/invocations",
          "headers": [(b"content-type", b"application/json")]}}
asyncio.run(served(scope, receive, send))
print(sent[0]["status"], json.loads(sent[1]["body"])["unsure"])
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"tensorflow", "keras", "mlflow"}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    status, loaded = done.stdout.splitlines()
    assert status.startswith("200 [") and loaded == "[]"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_models_serve_runs_the_onnx_pyfunc(store, tmp_path_factory):
    """`mlflow models serve` on the logged model (the pyfunc runs the ONNX export): the
    same answers, from a process whose pyfunc needs no TensorFlow."""
    log = tmp_path_factory.mktemp("mlflow-serve-log") / "server.log"
    command_for = lambda cfg, port: model_server_command(cfg, port=port, mlflow=True)  # noqa: E731
    with tiny_store.server(store, command_for, log) as (_, port):
        images, _ = synthetic_digits(5, seed=12)
        predictions, _ = _predictions(port, images)
        np.testing.assert_allclose(predictions, store.served(images), atol=1e-5)
        assert "tensorflow" not in Path(f"/proc/{_listening_pid(port)}/maps").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_onnx_int8_graph_is_served_once_the_gate_found_it_servable(
    store, tmp_path_factory, monkeypatch
):
    """The evaluate stage measured the champion's int8 graph and tagged the version with
    its figures. With the tag saying servable, `--int8` serves it (/version and /metrics say
    so, the labels are the Keras model's); with the tag saying otherwise it is refused with
    the gate's figures, before any server starts."""
    from mnist_pipeline.tracking import registry

    monkeypatch.setenv("DVC_ROOT", str(store.root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tracking_config(store.root)
    connect(cfg)
    name = cfg.registered_model
    tags = registry.version(name, store.version).tags
    # What the evaluate stage measured (a tiny model on 100 images: one image flipping
    # would decide it, so serving is tried on a tag set here).
    assert tags[registry.INT8_SERVABLE] in ("true", "false"), tags
    assert "the int8 graph's labels differ on" in tags[registry.INT8_PARITY]
    registry.set_version_tags(name, store.version, {registry.INT8_SERVABLE: "true"})
    log = tmp_path_factory.mktemp("int8-log") / "server.log"
    int8 = lambda cfg, port: model_server_command(cfg, port=port, int8=True)  # noqa: E731
    with tiny_store.server(store, int8, log) as (_, port):
        images, _ = synthetic_digits(40, seed=9)
        predictions, _ = _predictions(port, images)
        np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-5)
        expected = store.served(images)
        assert (predictions.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.95
        status, body = post(port, b"", content_type=None, path="/version")
        assert json.loads(body)["precision"] == "int8"
        status, body = post(port, b"", content_type=None, path="/metrics")
        assert b'mnist_served_model_info{model="mnist-classifier"' in body
        assert b'precision="int8"' in body and b'precision="float32"' not in body
    said = "the int8 graph's labels differ on 9 of 100 test images (...): not servable"
    registry.set_version_tags(
        name, store.version, {registry.INT8_SERVABLE: "false", registry.INT8_PARITY: said}
    )
    try:
        with pytest.raises(ServerError, match=r"int8 graph is not servable: the int8 graph's"):
            model_server_command(cfg, int8=True)
    finally:
        registry.set_version_tags(name, store.version, tags)


def test_onnx_int8_is_refused_for_a_version_without_an_int8_graph(tmp_path):
    from mnist_pipeline.errors import ModelError
    from mnist_pipeline.tracking import served_artifacts

    (tmp_path / "model.onnx").write_bytes(b"")  # a version logged before int8 graphs
    old = Served(folder=tmp_path, name="mnist-classifier", version="2")
    with pytest.raises(ModelError, match=r"version 2 of 'mnist-classifier' has no int8 graph"):
        served_artifacts.require_int8_servable(
            test_config.section("tracking"), old, "models:/mnist-classifier/2"
        )
