"""The champion over REST with MLflow's model server: predictions, and bad requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
from mnist_pipeline.tracking.store import connect

pytestmark = pytest.mark.xdist_group("serving")


# --- the command line (no server) ----------------------------------------------------------

def test_command_serves_the_champion_on_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    command = model_server_command(test_config.section("tracking"), port=5124)
    argv = command.argv
    # MLflow's scoring app (what `mlflow models serve` runs) behind the guard, by uvicorn.
    assert argv[:5] == [sys.executable, "-m", "uvicorn", "--factory",
                        "mnist_pipeline.serve.model_server:scoring_app"]

    def option(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert option("--host") == "127.0.0.1"
    assert option("--port") == "5124"
    assert option("--workers") == "1"
    env = command.env_overrides
    assert env["MNIST_SERVE_MODEL_URI"] == "models:/mnist-classifier@champion"
    assert env["MNIST_SERVE_MAX_BODY_BYTES"] == str(16 * 1024 * 1024)
    assert env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] == "60"
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # MLflow starts `uvicorn` by name: this environment's must come first.
    assert command.env_overrides["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert command.url == "http://127.0.0.1:5124/invocations"
    assert command.ready_url == "http://127.0.0.1:5124/ping"
    assert not command.warnings


def test_make_serve_names_the_app_by_its_module_path(tmp_path):
    """Run as `python -m` (as `make serve` runs it) the module is `__main__`: the command
    must still name the app where uvicorn can import it."""
    test_config.write_params(tmp_path)
    printed = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.serve.model_server", "--print-command"],
        env={**os.environ, "DVC_ROOT": str(tmp_path)}, capture_output=True, text=True,
        check=True, timeout=120).stdout
    assert "uvicorn --factory mnist_pipeline.serve.model_server:scoring_app" in printed
    assert "MNIST_SERVE_MODEL_URI=models:/mnist-classifier@champion" in printed


def test_plain_is_mlflow_models_serve_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    command = model_server_command(test_config.section("tracking"), port=5124, plain=True)
    argv = command.argv
    assert argv[:5] == [sys.executable, "-m", "mlflow", "models", "serve"]
    assert argv[argv.index("--model-uri") + 1] == "models:/mnist-classifier@champion"
    assert argv[argv.index("--env-manager") + 1] == "local"
    assert "MNIST_SERVE_MODEL_URI" not in command.env_overrides


def test_a_body_limit_below_one_byte_is_refused():
    with pytest.raises(ServerError, match="--max-body-bytes: got 0"):
        model_server_command(test_config.section("tracking"), max_body_bytes=0)


def test_the_server_starts_tensorflow_as_quietly_as_a_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv("MNIST_PIPELINE_DEBUG", raising=False)
    quiet = model_server_command(test_config.section("tracking")).env_overrides
    assert quiet["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert quiet["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    monkeypatch.setenv("MNIST_PIPELINE_DEBUG", "1")
    loud = model_server_command(test_config.section("tracking")).env_overrides
    assert "TF_CPP_MIN_LOG_LEVEL" not in loud


def test_registered_model_name_comes_from_params_yaml(tmp_path):
    test_config.write_params(tmp_path, tracking={"registered_model": "digits-v2"})
    cfg = tracking_config(tmp_path)
    command = model_server_command(cfg)
    assert "MNIST_SERVE_MODEL_URI=models:/digits-v2@champion" in command.shell()


def test_other_model_and_explicit_wide_bind():
    command = model_server_command(test_config.section("tracking"),
                                           model_uri="models:/mnist-classifier/3",
                                           host="0.0.0.0")
    assert "MNIST_SERVE_MODEL_URI=models:/mnist-classifier/3" in command.shell()
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
    with tiny_store.server(store, lambda cfg, port: model_server_command(cfg, port=port),
                           log) as (_, port):
        yield port


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("key", ["inputs", "instances"])
def test_champion_predicts_like_the_keras_model(server, store, key):
    images, _ = synthetic_digits(16, seed=7)
    status, body = post(server, {key: images.tolist()})
    assert status == 200, body[:500]
    predictions = np.asarray(json.loads(body)["predictions"], dtype=np.float32)
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
    "strings": ({"inputs": [[["a"] * 28] * 28]}, "invalid literal"),
    "NaN": (json.dumps({"inputs": DIGITS.tolist()}).replace("0", "NaN", 1), "got nan"),
    "integers beyond 64 bits": ({"inputs": [[[10 ** 30] * 28] * 28]}, "too large"),
    "ragged rows": ({"inputs": [[[1, 2], [3]]]}, "inhomogeneous"),
    "null": ({"inputs": None}, "expects a single n-dimensional array"),
    "an empty batch": ({"inputs": []}, "Failed to enforce schema"),
    "no inputs key": ({"pixels": DIGITS.tolist()}, "exactly one of the input fields"),
    "both inputs and instances": ({"inputs": DIGITS.tolist(), "instances": DIGITS.tolist()},
                                  "exactly one of the input fields"),
    "a bare list": (DIGITS.tolist(), "Received a list"),
    "invalid JSON": ('{"inputs": [[[0, 1,', "valid JSON"),
    "an empty body": (b"", "valid JSON"),
    "bytes that are not UTF-8": (b'\xff\xfe{"inputs": 1}', "valid JSON"),
    "deeply nested inputs": ('{"inputs": ' + "[" * 500 + "]" * 500 + "}", "RecursionError"),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_payload_gets_a_400_with_a_reason(server, case):
    body, reason = MALFORMED[case]
    status, answer = post(server, body)
    assert status == 400, (status, answer[:300])
    error = json.loads(answer)
    assert error["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE")
    assert reason in error["message"], error["message"][:500]
    assert alive(server)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_unsupported_content_type_gets_a_415(server):
    status, answer = post(server, "0,0,0\n", content_type="text/plain")
    assert status == 415 and b"only supports the following content types" in answer
    assert alive(server)


# Three requests MLflow 3.17's scoring server alone answers wrongly (docs/serving.md names
# the lines); the guard in front of it answers them.

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
def test_json_parameters_go_to_mlflow_and_its_answers(server, store):
    """A body the guard does not answer itself (here: a charset spelled out and `params`)
    reaches MLflow's app, which answers it alike."""
    images, _ = synthetic_digits(3, seed=10)
    expected = store.served(images)
    for content_type, body in (("application/json; charset=UTF-8", {"inputs": images.tolist()}),
                               ("application/json", {"inputs": images.tolist(), "params": {}})):
        status, answer = post(server, body, content_type=content_type)
        assert status == 200, answer[:300]
        np.testing.assert_allclose(json.loads(answer)["predictions"], expected, atol=1e-5)
    status, answer = post(server, {"inputs": images.tolist()},
                          content_type="application/json; charset=latin-1")
    assert status == 415 and b"only supports UTF-8" in answer
