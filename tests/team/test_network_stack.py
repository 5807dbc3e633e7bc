"""`make team-up ARGS=--network`: the team's MLflow server with logins, roles and TLS, and
`team user add/remove` printing what a new member exports."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import team
from helpers.tiny_store import free_port

from mnist_pipeline import cli
from mnist_pipeline.team import stack as team_stack

pytestmark = [pytest.mark.slow, pytest.mark.team]


@pytest.fixture(scope="module")
def network_stack():
    with team.running_stack(network=True) as stack:
        yield stack


def exported(text: str) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in text.splitlines()
                if line.startswith("export "))


def test_network_stack_adds_members_who_cannot_move_champion(network_stack, monkeypatch,
                                                             capsys, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    assert network_stack.tracking_uri.startswith("https://")
    assert f"MLFLOW_TRACKING_SERVER_CERT_PATH={network_stack.ca}" in network_stack.exports()
    assert stat.S_IMODE(os.stat(network_stack.secrets / "secrets.json").st_mode) == 0o600
    folder = str(network_stack.root)
    assert cli.main(["team", "user", "add", "alice", "--role", "member", "--dir", folder]) == 0
    alice = exported(capsys.readouterr().out)
    assert cli.main(["team", "user", "add", "gate", "--role", "gate", "--dir", folder]) == 0
    gate = exported(capsys.readouterr().out)
    assert alice["MLFLOW_TRACKING_URI"] == network_stack.tracking_uri

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
    version = client.create_model_version("net-model", f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id).version
    with pytest.raises(MlflowException) as refused:
        client.set_registered_model_alias("net-model", "champion", version)
    assert refused.value.error_code == "PERMISSION_DENIED"
    use(gate).set_registered_model_alias("net-model", "champion", version)

    assert cli.main(["team", "user", "remove", "alice", "--dir", folder]) == 0
    client = use(alice)
    with pytest.raises(MlflowException):
        client.search_experiments()


def test_network_user_commands_need_a_network_stack(tmp_path, capsys):
    plain = team_stack.Stack(str(tmp_path), free_port(), free_port())
    plain.save()
    with pytest.raises(SystemExit):
        cli.main(["team", "user", "add", "x", "--dir", str(tmp_path)])
    assert "ARGS=--network" in capsys.readouterr().err
