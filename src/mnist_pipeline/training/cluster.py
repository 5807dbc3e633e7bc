"""Which worker this process is in a multi-worker training job, and starting a job's workers
on this machine.

A multi-worker job is described by `TF_CONFIG` (TensorFlow's cluster spec: every worker's
address and this process's place). Set by hand (or by a scheduler) on each machine, every
machine runs the same train command. Unset, the train stage starts `runtime.workers` copies
of itself on loopback ports (`run_local`) and supervises them: when one fails or is killed,
the others are stopped at once and the job fails with one line saying which and why, so a
lost worker never leaves the others waiting on a collective.

Only the chief (worker 0) logs to MLflow and writes the stage's outputs: one run per job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError, TrainingError

TF_CONFIG = "TF_CONFIG"
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class Task:
    """This process's place in the cluster `TF_CONFIG` describes."""

    kind: str
    index: int
    workers: int

    @property
    def is_chief(self) -> bool:
        return self.kind == "chief" or (self.kind == "worker" and self.index == 0)


def task(environ: Mapping[str, str] | None = None) -> Task | None:
    """This process's task, or None when `TF_CONFIG` is not set (single process)."""
    raw = (os.environ if environ is None else environ).get(TF_CONFIG)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        kind, index = spec["task"]["type"], int(spec["task"]["index"])
        cluster = spec["cluster"]
        workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            TF_CONFIG,
            raw,
            'TensorFlow\'s cluster spec: {"cluster": {"worker":'
            ' ["host:port", ...]}, "task": {"type": "worker", "index": i}}'
            f" ({err})",
        ) from None
    if kind not in ("chief", "worker"):
        raise ConfigError(f"{TF_CONFIG}.task.type", kind, "'chief' or 'worker'")
    return Task(kind=kind, index=index, workers=workers)


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def local_specs(workers: int) -> list[str]:
    """`TF_CONFIG` for each of `workers` processes on loopback ports."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    return [
        json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        for index in range(workers)
    ]


def run_local(argv: Sequence[str], workers: int, *, poll_s: float = 0.2) -> None:
    """Run `argv` as `workers` processes of one job on this machine; return when all succeed.

    The chief's output goes where ours goes; the other workers' output is kept and shown only
    if the job fails. Raises `TrainingError` naming the first worker that failed.
    """
    logs = [tempfile.TemporaryFile() for _ in range(workers)]
    processes: list[subprocess.Popen] = []
    try:
        for index, spec in enumerate(local_specs(workers)):
            env = {**os.environ, TF_CONFIG: spec}
            out = None if index == 0 else logs[index]
            processes.append(
                subprocess.Popen(
                    list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
                )
            )
        while True:
            codes = [process.poll() for process in processes]
            failed = [index for index, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                # The others fail on their own within seconds (their all-reduce breaks), so
                # the chief ends its run FAILED; only then are the rest stopped.
                _wait(processes, STOP_GRACE_S)
                codes = [process.poll() for process in processes]
                index = _cause(codes, failed[0])
                _stop(processes)
                tail = _tail(logs[index]) if index else ""
                raise TrainingError(
                    f"worker {index} of {workers} {_exit(codes[index])}; the "
                    "other workers were stopped and the job failed"
                    + (f" (its last output: {tail})" if tail else "")
                )
            if all(code == 0 for code in codes):
                return
            time.sleep(poll_s)
    except BaseException:
        _stop(processes)
        raise
    finally:
        for log in logs:
            log.close()


def _cause(codes: list[int | None], first: int) -> int:
    """The worker whose end failed the job: one killed by a signal, if any (the others'
    all-reduce then breaks and they exit with an error, the chief as fast as the lost worker
    is reaped), else the first seen failing."""
    killed = [index for index, code in enumerate(codes) if code is not None and code < 0]
    return killed[0] if killed else first


def _wait(processes: list[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every running worker (their runs end KILLED), SIGKILL what is left."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _tail(log: object, lines: int = 3) -> str:
    log.seek(0)  # type: ignore[attr-defined]
    text = log.read().decode(errors="replace")  # type: ignore[attr-defined]
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[-600:]


def this_command() -> list[str]:
    """The command line this process was started with, to start its fellow workers."""
    return [sys.executable, *sys.argv]
