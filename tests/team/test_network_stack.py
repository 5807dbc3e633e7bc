"""`make team-up ARGS=--network`: the team's MLflow server with logins, roles and TLS, and
`team user add/remove` printing what a new member exports."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import team
from helpers.tiny_store import free_port

from mnist_pipeline import cli
from mnist_pipeline.team import secure
from mnist_pipeline.team import stack as team_stack

pytestmark = [pytest.mark.slow, pytest.mark.team]


@pytest.fixture(scope="module")
def network_stack():
    with team.running_stack(network=True) as stack:
        yield stack


def exported(text: str) -> dict[str, str]:
    return dict(
        line.removeprefix("export ").split("=", 1)
        for line in text.splitlines()
        if line.startswith("export ")
    )


def test_auth_network_stack_adds_members_whose_role_cannot_move_champion(
    network_stack, monkeypatch, capsys, tmp_path
):
    import mlflow
    from mlflow.exceptions import MlflowException

    assert network_stack.tracking_uri.startswith("https://")
    assert f"MLFLOW_TRACKING_SERVER_CERT_PATH={network_stack.ca}" in network_stack.exports()
    assert stat.S_IMODE(os.stat(network_stack.secrets / "secrets.json").st_mode) == 0o600
    folder = str(network_stack.root)
    assert cli.main(["team", "user", "add", "alice", "--role", "member", "--dir", folder]) == 0
    alice = exported(capsys.readouterr().out)
    with pytest.raises(SystemExit):  # the gate service's own login
        cli.main(["team", "user", "add", "gate", "--role", "gate", "--dir", folder])
    assert "gate service's own login" in capsys.readouterr().err
    gate = {**alice, **secure.load_secrets(network_stack.secrets).gate_env}
    assert alice["MLFLOW_TRACKING_URI"] == network_stack.tracking_uri
    assert alice["MNIST_PIPELINE_GATE_SERVICE"] == "900"

    def use(env: dict[str, str]):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        return mlflow.MlflowClient()

    client = use(alice)
    run = client.create_run(client.create_experiment("team-net"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    client.create_registered_model("net-model")
    version = client.create_model_version(
        "net-model", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    ).version
    with pytest.raises(MlflowException) as refused:
        client.set_registered_model_alias("net-model", "champion", version)
    assert refused.value.error_code == "PERMISSION_DENIED"
    use(gate).set_registered_model_alias("net-model", "champion", version)

    assert cli.main(["team", "user", "remove", "alice", "--dir", folder]) == 0
    client = use(alice)
    with pytest.raises(MlflowException):
        client.search_experiments()


def test_auth_user_commands_need_a_network_stack(tmp_path, capsys):
    plain = team_stack.Stack(str(tmp_path), free_port(), free_port())
    plain.save()
    with pytest.raises(SystemExit):
        cli.main(["team", "user", "add", "x", "--dir", str(tmp_path)])
    assert "ARGS=--network" in capsys.readouterr().err


def test_tls_client_without_the_ca_fails_with_one_clear_line(network_stack, monkeypatch):
    from mnist_pipeline import config
    from mnist_pipeline.errors import TrackingError
    from mnist_pipeline.tracking import store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", network_stack.tracking_uri)
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
    tracking = config.section(
        {
            "tracking": {
                "uri": None,
                "artifact_dir": "mlruns",
                "experiment_name": "no-ca",
                "registered_model": "m",
                "lock_url": None,
            }
        },
        "tracking",
    )
    with pytest.raises(TrackingError) as caught:
        store.connect(tracking)
    message = str(caught.value)
    assert "\n" not in message and "MLFLOW_TRACKING_SERVER_CERT_PATH" in message
    assert "not signed by this machine's public CAs" in message


def test_auth_postgres_refuses_a_connection_without_a_password(network_stack, monkeypatch):
    import psycopg

    rules = (network_stack.cluster.data / "pg_hba.conf").read_text()
    assert "trust" not in rules.replace("no trust", "") and "scram-sha-256" in rules
    url = network_stack.cluster.url("mlflow")
    assert ":" not in url.split("@")[0].removeprefix("postgresql://")  # no password in it
    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(network_stack.root))  # no ~/.pgpass either
    for given in ({}, {"password": "not-the-password"}):
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(url, connect_timeout=5, **given)
        assert "password" in str(refused.value)
    monkeypatch.setenv("PGPASSFILE", str(network_stack.pgpass))  # what team env exports
    assert stat.S_IMODE(os.stat(network_stack.pgpass).st_mode) == 0o600
    with psycopg.connect(url, connect_timeout=5) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
    assert f"PGPASSFILE={network_stack.pgpass}" in network_stack.exports()
