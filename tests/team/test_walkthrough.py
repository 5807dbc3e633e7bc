"""docs/team.md, step by step: a team stack, two checkouts standing for two machines, every
command a team member runs as a client of the stack's servers."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from helpers import repo
from helpers.digits import ROOT, synthetic_digits
from helpers.tiny_store import free_port

pytestmark = [pytest.mark.slow, pytest.mark.team]


def _exports(stack_dir) -> dict[str, str]:
    """Step 2's `eval "$(make -s team-env)"`: the variables `team env` prints."""
    done = subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.team", "env", "--dir", str(stack_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    exports = {}
    for line in done.stdout.splitlines():
        key, _, value = shlex.split(line.removeprefix("export "))[0].partition("=")
        exports[key] = value
    return exports


def test_the_team_walkthrough(tmp_path, team_stack):
    from mlflow import MlflowClient

    # 1. Start the stack: the fixture ran `python -m mnist_pipeline.team up` in a folder of
    #    its own. 2. Point a checkout at it.
    env = _exports(team_stack.root)
    assert env == {
        "MLFLOW_TRACKING_URI": team_stack.tracking_uri,
        "MNIST_PIPELINE_LOCK_URL": team_stack.lock_url,
        "MNIST_MONITORING_LOG": team_stack.request_log,
    }
    a = repo.make(tmp_path / "a")
    remote = str(team_stack.dvc_remote)
    repo.run(["dvc", "remote", "add", "--local", "-f", "-d", "team", remote], a)

    # 3. Train, gate, push.
    done = repo.run(["dvc", "repro"], a, **env)
    assert "gate: PASSED" in done.stdout, done.stdout[-2000:]
    assert not (a / "mlflow.db").exists() and not (a / "mlartifacts").exists()
    uploaded = [p for p in team_stack.artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "model.keras" for p in uploaded)  # through the server, not a disk
    assert any(p.name == "confusion.png" for p in uploaded)
    repo.run(["dvc", "push"], a, **env)
    repo.run(["git", "add", "dvc.lock", "gate.json", "metrics", "plots"], a)
    repo.run(["git", "commit", "-qm", "Train the tutorial MLP"], a)

    # 4. A second machine: clone, pull, and repro trains nothing.
    b = tmp_path / "b"
    repo.run(["git", "clone", "-q", str(a), str(b)], tmp_path)
    repo.run(["dvc", "remote", "add", "--local", "-f", "-d", "team", remote], b)
    repo.run(["dvc", "pull"], b, **env)
    assert (b / "models/model.keras").is_file() and (b / "data/processed/train.npz").is_file()
    done = repo.run(["dvc", "repro"], b, **env)
    for stage in ("fetch", "preprocess", "train"):
        assert f"Running stage '{stage}'" not in done.stdout, done.stdout[-3000:]
    assert not (b / "mlflow.db").exists()

    # 5. Experiments from a queue with two workers, both clients of the server.
    repo.run(["dvc", "exp", "run", "--queue", "-S", "train.seed=7,8"], a, **env)
    status = repo.run_queue(a, 2, **env)
    assert status.count("Success") == 2, status
    assert not list(a.rglob("mlflow.db"))
    client = MlflowClient(team_stack.tracking_uri)
    experiment = client.get_experiment_by_name("mnist").experiment_id
    runs = client.search_runs([experiment], max_results=100)
    assert (
        len({r.data.tags.get("dvc.experiment") for r in runs if "dvc.experiment" in r.data.tags})
        == 2
    )
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]

    # 6. Look and serve: the server is the UI; the champion comes from its registry.
    done = repo.run([sys.executable, "-m", "mnist_pipeline.serve.ui"], a, **env)
    assert f"open {team_stack.tracking_uri}" in done.stdout
    port = free_port()
    server = repo.start(
        [sys.executable, "-m", "mnist_pipeline.serve.model_server", "--port", str(port)], a, **env
    )
    try:
        images, labels = synthetic_digits(4, seed=9)
        body = json.dumps({"inputs": images.tolist()}).encode()
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.communicate()[1][-3000:]
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    body,
                    {"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    predictions = json.load(response)["predictions"]
                break
            except OSError:
                assert time.monotonic() < deadline, "the model server did not answer"
                time.sleep(1)
        assert np.argmax(predictions, axis=1).tolist() == labels.tolist()
    finally:
        repo.stop(server)
    done = repo.run(["mnist-predict", str(ROOT / "examples/three.png")], a, **env)
    assert done.stdout.startswith(f"{ROOT / 'examples/three.png'}: "), done.stdout

    # 7. Multi-worker training, from the second machine: one run, by the chief.
    before = {r.info.run_id for r in client.search_runs([experiment], max_results=100)}
    single = json.loads((b / "metrics/evaluate.json").read_text())["test_accuracy"]
    done = repo.run(
        [
            "dvc",
            "exp",
            "run",
            "-n",
            "two-workers",
            "-S",
            "runtime.distribute=multi_worker",
            "-S",
            "runtime.workers=2",
        ],
        b,
        **env,
    )
    assert "gate:" in done.stdout
    new = [
        r for r in client.search_runs([experiment], max_results=100) if r.info.run_id not in before
    ]
    assert [
        (r.info.run_name, r.info.status, r.data.params.get("runtime.resolved_workers")) for r in new
    ] == [("two-workers", "FINISHED", "2")]  # one run, by the chief
    assert abs(repo.exp_metric(b, "two-workers") - single) <= 0.02  # the same model, trained apart
