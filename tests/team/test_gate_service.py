"""The gate service on a team server with logins (team/gate_service.py): members register
candidates, the service scores them itself on its pinned copy of the test data, decides with
the gate rules and is the only one to move `champion`; a member's evaluate waits for its
verdict. Real servers: PostgreSQL, `mlflow server --app-name mnist-auth` with TLS, MLflow's
registry webhook, and the service process `make team-up ARGS=--network` starts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import repo, team
from helpers.digits import graded_model, synthetic_digits

from mnist_pipeline import config
from mnist_pipeline.data import corruptions, suite
from mnist_pipeline.data.splits import Split, save_split
from mnist_pipeline.evaluation import promotion
from mnist_pipeline.files import tree_sha256, write_json
from mnist_pipeline.team import secure, users
from mnist_pipeline.team import stack as team_stack


pytestmark = [pytest.mark.slow, pytest.mark.team]

WAIT_S = 240
TEST_IMAGES = 200  # 20 per class: a model that misreads k classes scores 1 - k/10


@dataclass
class World:
    stack: team_stack.Stack
    checkout: Path
    test: Split
    members: dict[str, dict[str, str]]  # each member's client exports


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate-service")
    checkout = repo.make(root / "checkout", gate={"min_class_recall": 0.0})
    test = Split(*synthetic_digits(TEST_IMAGES, seed=3))
    save_split(checkout / "data/processed", "test", test)
    suite.save(
        checkout / "data/corrupted",
        corruptions.generate(test.images, ["fog"], seed=0),
        test,
        seed=0,
    )
    with team.running_stack(network=True, checkout=checkout) as stack:
        assert team_stack.alive(stack.gate_pid), stack.gate_note
        members = {}
        with team_stack.login(stack, secure.load_secrets(stack.secrets).admin_env):
            auth = users.client(stack.tracking_uri)
            for name in ("alice", "bob"):
                password = users.add(auth, name, "member")
                members[name] = dict(
                    line.removeprefix("export ").split("=", 1)
                    for line in users.exports(
                        stack.tracking_uri, str(stack.ca), name, password
                    ).splitlines()
                )
        yield World(stack, checkout, test, members)


def as_member(world: World, name: str, monkeypatch) -> None:
    import mlflow

    for key, value in {
        **world.members[name],
        team_stack.LOCK_ENV: world.stack.lock_url,
        team_stack.PASSWORD_FILE_ENV: str(world.stack.pgpass),
        promotion.GATE_SERVICE_ENV: str(WAIT_S),
    }.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(world.stack.tracking_uri)


def model_name(world: World) -> str:
    import yaml

    params = yaml.safe_load((world.checkout / "params.yaml").read_text())
    return params["tracking"]["registered_model"]


def member_run(
    world: World, broken: tuple[int, ...], name: str, metrics: dict[str, float] | None = None
) -> dict:
    """A member's training run as the train stage leaves it (and any metrics it claims)."""
    from mnist_pipeline.tracking import runs, store
    from mnist_pipeline.training import calibration, job

    import yaml

    params = yaml.safe_load((world.checkout / "params.yaml").read_text())
    experiment = store.connect(
        config.section(
            {"tracking": {**params["tracking"], "experiment_name": "gate-service"}}, "tracking"
        )
    )
    model = graded_model(broken)
    with runs.run(
        experiment,
        run_name=name,
        tags={"data.test_sha256": world.test.sha256(), "data.sha256": "synthetic"},
    ) as run_id:
        uri = job.log_served(model, calibration.IDENTITY)
        if metrics:
            runs.log_metrics(metrics, run_id=run_id)
    return {"run_id": run_id, "model_uri": uri, "model": model}


def health(world: World) -> dict:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{world.stack.gate_port}/health", timeout=10
    ) as answer:
        return json.loads(answer.read())


def champion(world: World) -> str | None:
    from mnist_pipeline.tracking import registry

    held = registry.champion(model_name(world))
    return str(held.version) if held else None


def test_gate_service_rejects_a_member_s_forged_metrics_and_scores_the_real_model(
    world, monkeypatch
):
    from mlflow.exceptions import MlflowException

    from mnist_pipeline.tracking import registry

    as_member(world, "alice", monkeypatch)
    name = model_name(world)
    # Nothing registered yet: a server with logins answers 403 for the missing model, which
    # is no champion (the champion stage of a member's first dvc repro asks just this).
    assert champion(world) is None
    # A model that misreads 6 of 10 classes (accuracy 0.4), whose run claims 100%.
    forged = member_run(
        world, tuple(range(6)), "forged", metrics={"test_accuracy": 1.0, "test_macro_f1": 1.0}
    )
    version = registry.register(
        forged["model_uri"],
        name,
        tags={
            "run_id": forged["run_id"],
            "test_accuracy": "1.0",
            "data.test_sha256": world.test.sha256(),
        },
    )
    number = str(version.version)
    with pytest.raises(MlflowException):  # nor may the member write the verdict itself
        registry.set_version_tags(name, number, {promotion.VERDICT_TAG: '{"passed": true}'})

    judgement = promotion.await_verdict(name, number, WAIT_S)
    assert not judgement.verdict.passed
    assert "accuracy" in judgement.verdict.reason
    tags = registry.version(name, number).tags
    assert float(tags["test_accuracy"]) == pytest.approx(0.4)  # the service's, not the claim
    assert tags["gate.passed"] == "false" and champion(world) is None
    # MLflow's webhook woke the service (it also looks every few seconds).
    assert health(world)["deliveries"] >= 1


def test_gate_service_decides_for_a_member_s_evaluate_stage(world, monkeypatch, tmp_path):
    from mnist_pipeline.tracking import logged_models, registry
    from mnist_pipeline.training import models

    as_member(world, "alice", monkeypatch)
    name = model_name(world)
    run = member_run(world, (0, 1, 2), "alice-candidate")  # accuracy 0.7
    paths = config.section(
        {
            "paths": {
                **{key: str(tmp_path / value) for key, value in _paths(world).items()},
                "processed": str(world.checkout / "data/processed"),
                "corrupted": str(world.checkout / "data/corrupted"),
            }
        },
        "paths",
    )
    Path(paths.model).parent.mkdir(parents=True, exist_ok=True)
    models.save(run.pop("model"), paths.model)
    write_json(paths.run, run)
    import yaml

    params = yaml.safe_load((world.checkout / "params.yaml").read_text())
    decision = promotion.evaluate(
        paths,
        config.section(params, "evaluate"),
        config.section(params, "gate"),
        config.section(params, "tracking"),
    )
    assert decision.verdict.passed, decision.line
    report = json.loads(Path(paths.gate).read_text())
    assert report["decided_by"] == "gate service"
    assert report["champion_version"] == decision.version == champion(world)
    # The service pinned the approved files' digest on the version.
    digest = registry.version(name, decision.version).tags[promotion.DIGEST_TAG]
    folder = logged_models.download(registry.version_uri(name, decision.version), tmp_path / "m")
    assert digest == tree_sha256(folder)


def test_gate_service_two_members_registering_at_once_get_one_correct_champion(world, monkeypatch):
    from mnist_pipeline.tracking import history, registry

    as_member(world, "alice", monkeypatch)
    name = model_name(world)
    before = champion(world)
    assert before is not None, "the previous test leaves a champion (accuracy 0.7)"
    runs = {
        "alice": member_run(world, (0, 1), "alice-0.8"),
        "bob": member_run(world, (0,), "bob-0.9"),
    }
    numbers: dict[str, str] = {}
    go = threading.Barrier(2)

    def register(member: str) -> None:
        go.wait()
        numbers[member] = str(
            registry.register(
                runs[member]["model_uri"], name, tags={"run_id": runs[member]["run_id"]}
            ).version
        )

    threads = [threading.Thread(target=register, args=(m,)) for m in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    verdicts = {m: promotion.await_verdict(name, n, WAIT_S) for m, n in numbers.items()}
    assert champion(world) == numbers["bob"]  # the better one, whatever the order
    assert verdicts["bob"].verdict.passed
    assert float(registry.version(name, numbers["bob"]).tags["test_accuracy"]) == pytest.approx(0.9)
    decided = [e for e in history.entries(name) if e["candidate"] in numbers.values()]
    assert len(decided) == 2 and all(e.get("login") == secure.GATE_LOGIN for e in decided)


def test_gate_service_killed_mid_decision_leaves_the_alias_and_decides_when_back(
    world, monkeypatch
):
    from mnist_pipeline.tracking import locks, registry

    as_member(world, "bob", monkeypatch)
    name = model_name(world)
    before = champion(world)
    run = member_run(world, (), "bob-1.0")
    log_size = world.stack.gate_log.stat().st_size
    with locks.held("registry", world.stack.lock_url):  # the service scores, then waits here
        number = str(
            registry.register(run["model_uri"], name, tags={"run_id": run["run_id"]}).version
        )
        _wait_for_log(world, log_size, f"version {number}: accuracy 1.0000")
        os.killpg(world.stack.gate_pid, signal.SIGKILL)
        _wait_gone(world.stack.gate_pid)
    assert champion(world) == before
    assert promotion.VERDICT_TAG not in registry.version(name, number).tags
    stack, _ = team_stack.up(world.stack.root, 0, 0, network=True, checkout=world.checkout)
    world.stack.gate_pid = stack.gate_pid
    judgement = promotion.await_verdict(name, number, WAIT_S)
    assert judgement.verdict.passed and champion(world) == number


def test_gate_service_digest_refuses_a_champion_whose_files_were_rewritten(
    world, monkeypatch, tmp_path
):
    import base64
    import ssl

    from mlflow import MlflowClient

    from mnist_pipeline.errors import ModelError
    from mnist_pipeline.tracking import registry, served_artifacts

    as_member(world, "alice", monkeypatch)
    name = model_name(world)
    import yaml

    tracking = config.section(
        yaml.safe_load((world.checkout / "params.yaml").read_text()), "tracking"
    )
    served = served_artifacts.locate(tracking, registry.champion_uri(name), tmp_path / "a")
    assert (served.folder / "model.onnx").is_file() and served.version == champion(world)
    # A member may write the experiment's artifacts, the approved version's among them
    # (MLflow's artifact routes check the experiment, not the registry)...
    root = MlflowClient().get_model_version_download_uri(name, served.version)
    path = root.removeprefix("mlflow-artifacts:").lstrip("/")
    request = urllib.request.Request(
        f"{world.stack.tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{path}/artifacts/"
        "calibration.json",
        data=b'{"temperature": 0.01, "threshold": 0.0}',
        method="PUT",
    )
    login = world.members["alice"]
    token = base64.b64encode(
        f"{login['MLFLOW_TRACKING_USERNAME']}:{login['MLFLOW_TRACKING_PASSWORD']}".encode()
    ).decode()
    request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(cafile=str(world.stack.ca))
    with urllib.request.urlopen(request, timeout=30, context=context) as answer:
        assert answer.status == 200
    # ...but what serves the champion checks the files against the digest the gate approved.
    with pytest.raises(ModelError, match="rewritten after approval"):
        served_artifacts.locate(tracking, registry.champion_uri(name), tmp_path / "b")


def test_role_rollback_needs_the_gate_login_and_records_who_asked(world, monkeypatch):
    from mnist_pipeline.errors import PromotionError
    from mnist_pipeline.evaluation import rollback
    from mnist_pipeline.tracking import history, registry

    as_member(world, "alice", monkeypatch)
    name = model_name(world)
    held = champion(world)
    earlier = next(
        e
        for e in reversed(history.entries(name))
        if e.get("outcome") == "promoted" and e["candidate"] != held
    )["candidate"]
    with pytest.raises(PromotionError, match="only the gate service's login moves it"):
        rollback.move(
            name,
            earlier,
            "alice tries",
            test_sha256=world.test.sha256(),
            lock_url=world.stack.lock_url,
        )
    assert champion(world) == held
    for key, value in secure.load_secrets(world.stack.secrets).gate_env.items():
        monkeypatch.setenv(key, value)
    moved = rollback.move(
        name,
        earlier,
        "the files of the champion were rewritten",
        test_sha256=world.test.sha256(),
        lock_url=world.stack.lock_url,
    )
    assert champion(world) == earlier == moved.version
    entry = history.entries(name)[-1]
    assert entry["outcome"] == "rolled back" and entry["login"] == secure.GATE_LOGIN
    assert entry["user"]  # the person (OS account) who ran it
    assert registry.version(name, held).tags[registry.WITHDRAWN]


def test_gate_service_refuses_unsigned_and_forged_deliveries(world):
    body = json.dumps(
        {
            "entity": "model_version",
            "action": "created",
            "data": {"name": model_name(world), "version": "1"},
        }
    ).encode()
    url = f"http://127.0.0.1:{world.stack.gate_port}/webhook"
    refused_before = health(world)["refused_deliveries"]
    for headers in (
        {},
        {
            "X-MLflow-Delivery-Id": "x",
            "X-MLflow-Timestamp": str(int(time.time())),
            "X-MLflow-Signature": "v1,AAAA",
        },
    ):
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 401
    assert health(world)["refused_deliveries"] == refused_before + 2


def _paths(world: World) -> dict:
    import yaml

    return yaml.safe_load((world.checkout / "params.yaml").read_text())["paths"]


def _wait_for_log(world: World, offset: int, text: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(world.stack.gate_log, "rb") as log:
            log.seek(offset)
            if text.encode() in log.read():
                return
        time.sleep(0.1)
    pytest.fail(f"the gate service never said {text!r}: {world.stack.gate_log.read_text()[-3000:]}")


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while team_stack.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
