"""The team server on a network: MLflow's logins and roles, TLS from the stack's own CA, and
`champion` reserved for the gate identity (team/release_gate.py), on a real `mlflow server
--app-name mnist-auth` on loopback."""

from __future__ import annotations

import os
import ssl
import stat
import urllib.error
import urllib.request

import pytest
from helpers import tiny_store

from mnist_pipeline.serve.process import start, stop, wait_until_ready
from mnist_pipeline.serve.ui import tracking_server_command
from mnist_pipeline.team import secure, users

pytestmark = pytest.mark.slow

MODEL = "mnist-classifier"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, CA file, admin env, users' passwords) of a secured server with three users."""
    folder = tmp_path_factory.mktemp("secure")
    port = tiny_store.free_port()
    plain = tracking_server_command(
        f"sqlite:///{folder / 'mlflow.db'}",
        folder / "artifacts",
        host="127.0.0.1",
        port=port,
        workers=1,
    )
    command, certs = secure.secured(
        plain,
        folder / "secrets",
        names=["127.0.0.1", "localhost"],
        auth_database=f"sqlite:///{folder / 'auth.db'}",
    )
    with open(folder / "server.log", "wb") as log:
        process = start(command, log=log)
        try:
            wait_until_ready(process, command.ready_url, 180, cafile=str(certs.ca))
            admin = secure.load_secrets(folder / "secrets").admin_env
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(certs.ca))
                for key, value in admin.items():
                    patch.setenv(key, value)
                auth = users.client(command.url)
                passwords = {
                    name: users.add(auth, name, role)
                    for name, role in (("alice", "member"), ("vera", "viewer"), ("gate", "gate"))
                }
            yield command.url, str(certs.ca), admin, passwords, folder
        finally:
            stop(process)


def as_user(monkeypatch, server, name):
    import mlflow

    url, ca, _, passwords, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", ca)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", passwords[name])
    mlflow.set_tracking_uri(url)
    return mlflow.MlflowClient(url)


def denied(call) -> str:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        call()
    assert caught.value.error_code == "PERMISSION_DENIED", caught.value
    return str(caught.value)


def test_tls_is_required_and_secrets_and_keys_are_private(server):
    url, ca, _, _, folder = server
    for path in (
        folder / "secrets" / "secrets.json",
        folder / "secrets" / "basic_auth.ini",
        folder / "secrets" / "pki" / "server-key.pem",
        folder / "secrets" / "pki" / "ca-key.pem",
    ):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    with pytest.raises(urllib.error.URLError) as caught:  # our CA is no public CA
        urllib.request.urlopen(f"{url}/health", timeout=10)
    assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)
    context = ssl.create_default_context(cafile=ca)
    with urllib.request.urlopen(f"{url}/health", timeout=10, context=context) as answer:
        assert answer.status == 200
    with pytest.raises(urllib.error.HTTPError) as anonymous:  # no login, no API
        urllib.request.urlopen(
            f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10, context=context
        )
    assert anonymous.value.code == 401
    import base64

    for password in ("wrong-password-1234", ""):  # a wrong password is no login either
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
        token = base64.b64encode(f"alice:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with pytest.raises(urllib.error.HTTPError) as wrong:
            urllib.request.urlopen(request, timeout=10, context=context)
        assert wrong.value.code == 401


def test_role_member_registers_but_only_the_gate_moves_champion(server, monkeypatch, tmp_path):
    alice = as_user(monkeypatch, server, "alice")
    experiment = alice.create_experiment("alice-runs")
    run = alice.create_run(experiment)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    alice.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    alice.set_terminated(run.info.run_id)
    alice.create_registered_model(MODEL)
    version = alice.create_model_version(
        MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    alice.set_registered_model_alias(MODEL, "candidate", version.version)  # others are free
    message = denied(lambda: alice.set_registered_model_alias(MODEL, "champion", version.version))
    assert "only the gate" in message and "alice" in message
    denied(lambda: alice.set_model_version_tag(MODEL, version.version, "gate.passed", "true"))

    # The UI's own route is no way around it.
    url, ca, _, passwords, _ = server
    request = urllib.request.Request(
        f"{url}/ajax-api/2.0/mlflow/registered-models/alias",
        method="POST",
        data=f'{{"name": "{MODEL}", "alias": "champion", "version": "{version.version}"}}'.encode(),
        headers={"Content-Type": "application/json"},
    )
    import base64

    token = base64.b64encode(f"alice:{passwords['alice']}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with pytest.raises(urllib.error.HTTPError) as ui:
        urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context(cafile=ca))
    assert ui.value.code == 403

    gate = as_user(monkeypatch, server, "gate")
    gate.set_registered_model_alias(MODEL, "champion", version.version)
    gate.set_model_version_tag(MODEL, version.version, "gate.passed", "true")
    assert gate.get_model_version_by_alias(MODEL, "champion").version == version.version

    alice = as_user(monkeypatch, server, "alice")
    denied(lambda: alice.delete_model_version(MODEL, version.version))
    denied(lambda: alice.delete_registered_model_alias(MODEL, "champion"))
    denied(lambda: alice.rename_registered_model(MODEL, "elsewhere"))


def test_role_viewer_reads_and_writes_nothing(server, monkeypatch):
    vera = as_user(monkeypatch, server, "vera")
    assert vera.search_experiments()  # reads what members logged
    denied(lambda: vera.create_experiment("vera-runs"))
    experiment = vera.get_experiment_by_name("alice-runs")
    if experiment is not None:
        denied(lambda: vera.create_run(experiment.experiment_id))


def test_auth_removed_user_is_locked_out(server, monkeypatch):
    from mlflow.exceptions import MlflowException

    url, ca, admin, passwords, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", ca)
    for key, value in admin.items():
        monkeypatch.setenv(key, value)
    auth = users.client(url)
    password = users.add(auth, "bob", "member")
    assert len(password) >= 12
    exports = users.exports(url, ca, "bob", password)
    assert f"MLFLOW_TRACKING_PASSWORD={password}" in exports and url.startswith("https://")
    passwords["bob"] = password
    bob = as_user(monkeypatch, server, "bob")
    for _ in range(3):  # his password check passed and is remembered (team/credentials.py)
        bob.search_experiments()
    for key, value in admin.items():
        monkeypatch.setenv(key, value)
    users.remove(auth, "bob")
    bob = as_user(monkeypatch, server, "bob")
    with pytest.raises(MlflowException) as caught:
        bob.search_experiments()
    assert "401" in str(caught.value) or caught.value.error_code == "UNAUTHENTICATED"
