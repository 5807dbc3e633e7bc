"""The team's gate service: on a server with logins, the only way a version becomes `champion`.

    python -m mnist_pipeline.team.gate_service CONFIG    (make team-up ARGS=--network runs it)

Members register candidate versions; they may not move `champion` (`release_gate.py`). This
service runs under the `gate` login. MLflow's registry webhook (`model_version.created`,
signed with the stack's secret) wakes it when a version is registered, and it also looks on
start and every `scan_interval_s`, so a delivery it missed, or a version registered while it
was down, is decided all the same. Each version without a verdict is decided in order, one at
a time (`evaluation.promotion.rescore`):

1. download the registered model and score it on the service's own copy of the test split
   and the corrupted suite (the test split's hash is pinned in CONFIG: a different file is
   refused at start), and check its served export: nothing a member's run reports is used;
2. under the promotion lock, decide with the gate rules in CONFIG (copied from the checkout
   that started the stack, not from any member's `-S`), tag the version with the scores and
   the digest of its files (`gate.sha256`), move `champion` if it passed, append the history;
3. write the verdict on the version (`gate.verdict`), last: a member's evaluate stage waits
   for that tag. Killed before it, the service decides the version again when it is back.

`GET /health` says what it is doing; `POST /webhook` takes MLflow's deliveries.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from ..errors import DataError, ModelError, PipelineError, ServerError

SIGNATURE_WINDOW_S = 300  # a delivery older (or newer) than this is refused: no replays
MAX_BODY = 1 << 20
WEBHOOK_PATH = "/webhook"
EVENT: Final = "model_version.created"


@dataclass(frozen=True)
class ServiceConfig:
    """What the service decides on and with what; `service.json` in the stack's secrets."""

    registered_model: str
    port: int
    data: str  # holds processed/test.npz and corrupted/ (the suite)
    test_sha256: str  # the pinned test split
    tracking_uri: str
    lock_url: str | None
    records: str  # the service's own per-version results on the suite
    evaluate: dict[str, Any]
    gate: dict[str, Any]
    scan_interval_s: float = 10.0

    @staticmethod
    def load(path: Path) -> ServiceConfig:
        try:
            return ServiceConfig(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise ServerError(
                f"{path}: not a gate service config ({err}); run make team-up "
                "ARGS=--network to write it again"
            ) from None


def signature_problem(secret: str, headers: Any, body: bytes, now: float) -> str | None:
    """Why a delivery's `X-MLflow-Signature` does not prove it came from the MLflow server
    (HMAC-SHA256 of "{delivery id}.{timestamp}.{body}" with the webhook's secret), or None."""
    delivery = headers.get("X-MLflow-Delivery-Id") or ""
    stamp = headers.get("X-MLflow-Timestamp") or ""
    given = headers.get("X-MLflow-Signature") or ""
    if not (delivery and stamp and given.startswith("v1,")):
        return "unsigned delivery"
    try:
        if abs(now - int(stamp)) > SIGNATURE_WINDOW_S:
            return f"timestamp {stamp} is more than {SIGNATURE_WINDOW_S} s away"
    except ValueError:
        return f"timestamp {stamp!r} is not a number"
    expected = base64.b64encode(
        hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    if not hmac.compare_digest(expected, given[3:]):
        return "signature does not match"
    return None


@dataclass
class State:
    started: float = field(default_factory=time.time)
    decided: int = 0
    deliveries: int = 0
    refused_deliveries: int = 0
    deciding: str | None = None
    last: dict[str, Any] | None = None
    error: str | None = None


class Service:
    def __init__(self, cfg: ServiceConfig, secret: str) -> None:
        from ..config import section
        from ..data import suite
        from ..data.splits import load_split

        self.cfg, self.secret = cfg, secret
        self.evaluate_cfg = section({"evaluate": cfg.evaluate}, "evaluate")
        self.gate_cfg = section({"gate": cfg.gate}, "gate")
        data = Path(cfg.data)
        self.test = load_split(data / "processed", "test")
        if self.test.sha256() != cfg.test_sha256:
            raise DataError(
                f"{data / 'processed' / 'test.npz'}: sha256 {self.test.sha256()[:12]}…, but "
                f"the gate service is pinned to {cfg.test_sha256[:12]}…: it decides on the "
                "test set it was started with only (remove the folder and run make team-up "
                "ARGS=--network to pin the checkout's current one)"
            )
        self.suite = suite.load(data / "corrupted", self.test)
        self.records = Path(cfg.records)
        self.records.mkdir(parents=True, exist_ok=True)
        self.wake = threading.Event()
        self.state = State()

    # --- deciding ----------------------------------------------------------------------------

    def pending(self) -> list[str]:
        """Versions of the registered model without the service's verdict, oldest first."""
        from ..evaluation.promotion import VERDICT_TAG
        from ..tracking import registry

        return sorted(
            (
                str(v.version)
                for v in registry.versions(self.cfg.registered_model)
                if VERDICT_TAG not in (v.tags or {})
            ),
            key=int,
        )

    def decide_pending(self) -> None:
        for number in self.pending():
            self.decide(number)

    def decide(self, number: str) -> None:
        from ..evaluation import promotion

        name = self.cfg.registered_model
        self.state.deciding = number
        say(f"version {number}: scoring it on the pinned test set and the corrupted suite")

        def scored(scores: Any, shift: Any) -> None:
            say(
                f"version {number}: accuracy {scores.accuracy:.4f}, corrupted mean "
                f"{shift.mean_accuracy:.4f}; waiting for the promotion lock"
            )

        try:
            result = promotion.rescore(
                name,
                number,
                self.test,
                self.suite,
                self.evaluate_cfg,
                self.gate_cfg,
                self.cfg.lock_url,
                self.records,
                on_scored=scored,
            )
        except ModelError as err:  # the version itself cannot be scored: a rejection
            promotion.refuse(
                name,
                number,
                f"the gate service could not score it: {err}",
                self.test,
                self.gate_cfg,
                self.cfg.lock_url,
            )
            self.state.last = {"version": number, "passed": False, "reason": str(err)}
            say(f"version {number}: rejected, could not score it: {err}")
            return
        finally:
            self.state.deciding = None
        judgement = result.judgement
        self.state.decided += 1
        self.state.last = {
            "version": number,
            "passed": judgement.verdict.passed,
            "champion": judgement.champion_after,
        }
        from ..evaluation import gate

        say(gate.summary_line(judgement.verdict, number, judgement.champion_before))

    def run(self, stop: threading.Event) -> None:
        """Decide what is pending, then again on each delivery or every scan interval."""
        while not stop.is_set():
            self.wake.clear()
            try:
                self.decide_pending()
                self.state.error = None
            except PipelineError as err:
                self.state.error = str(err)
                say(f"will try again: {err}")
            except Exception as err:  # noqa: BLE001 - a server error must not stop the service
                self.state.error = f"{type(err).__name__}: {err}"
                say(f"will try again after an unexpected error:\n{traceback.format_exc()}")
            self.wake.wait(self.cfg.scan_interval_s)

    # --- deliveries ----------------------------------------------------------------------------

    def delivered(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        problem = signature_problem(self.secret, headers, body, time.time())
        if problem:
            self.state.refused_deliveries += 1
            say(f"refused a webhook delivery: {problem}")
            return 401, {"error": problem}
        self.state.deliveries += 1
        try:
            event = json.loads(body)
            kind = f"{event['entity']}.{event['action']}"
            model = event.get("data", {}).get("name")
        except (ValueError, KeyError, TypeError, AttributeError):
            return 400, {"error": "not an MLflow webhook payload"}
        if kind == EVENT and model == self.cfg.registered_model:
            self.wake.set()
            return 200, {"queued": event["data"].get("version")}
        return 200, {"ignored": kind}


def say(text: str) -> None:
    print(f"gate service: {text}", flush=True)


def handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path != "/health":
                self._answer(404, {"error": f"no {self.path}; try /health"})
                return
            self._answer(
                200, {"registered_model": service.cfg.registered_model, **asdict(service.state)}
            )

        def do_POST(self) -> None:  # noqa: N802
            if self.path != WEBHOOK_PATH:
                self._answer(404, {"error": f"no {self.path}; deliveries go to {WEBHOOK_PATH}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._answer(413, {"error": f"body of {length} bytes"})
                return
            self._answer(*service.delivered(self.headers, self.rfile.read(length)))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # each delivery is said by the service itself

    return Handler


def main(argv: list[str] | None = None) -> int:
    from .. import startup

    startup.prepare()
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.team.gate_service", description=__doc__.splitlines()[0]
    )
    parser.add_argument("config", type=Path, help="service.json, written by make team-up")
    args = parser.parse_args(argv)
    startup.load_tensorflow()  # the service scores models with Keras
    from ..errors import reported

    with reported("gate service"):
        import os

        import mlflow

        from ..tracking import store
        from . import secure

        cfg = ServiceConfig.load(args.config)
        secret = os.environ.get(secure.WEBHOOK_SECRET_ENV, "")
        if not secret:
            raise ServerError(
                f"{secure.WEBHOOK_SECRET_ENV} is not set: the service cannot "
                "check that deliveries come from the MLflow server"
            )
        store.silence()
        mlflow.set_tracking_uri(cfg.tracking_uri)
        service = Service(cfg, secret)
        try:
            server = ThreadingHTTPServer(("127.0.0.1", cfg.port), handler(service))
        except OSError as err:
            raise ServerError(f"port {cfg.port} on 127.0.0.1: {err.strerror}") from None
        stop = threading.Event()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        say(
            f"deciding on {cfg.registered_model} as {os.environ.get('MLFLOW_TRACKING_USERNAME')}"
            f" against {cfg.tracking_uri}; deliveries to http://127.0.0.1:{cfg.port}"
            f"{WEBHOOK_PATH}; test set {cfg.test_sha256[:12]}…"
        )
        try:
            service.run(stop)
        finally:
            server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
