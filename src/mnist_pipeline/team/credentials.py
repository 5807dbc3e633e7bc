"""Password checks on the team server, remembered once they pass.

MLflow's basic auth checks the password of every request against its stored scrypt hash,
which costs 0.05-0.1 s of CPU by design (the gate service's tests made ~790 requests: ~80 s
of hashing alone). `remember_passed_checks` makes the auth store remember a check that
passed, under the user, the stored hash and an HMAC of the password with a key made at
process start:

- the stored hash is still read on every request (one indexed query), so a changed password
  or a removed user takes effect at once on every server worker; MLflow's own cache
  (`auth_cache_ttl_seconds`) lets the other workers accept the old password until it expires;
- neither a password nor an unkeyed digest of one is kept in memory;
- a wrong password is never remembered: each guess costs a full check, as before.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections import OrderedDict
from typing import Any

MAX_REMEMBERED = 1024  # (user, password) pairs; the least recently used is forgotten first


class PassedChecks:
    """The checks of (user, stored hash, password) that passed, at most `max_remembered`."""

    def __init__(self, max_remembered: int = MAX_REMEMBERED) -> None:
        self.max_remembered = max_remembered
        self._key = secrets.token_bytes(32)
        self._passed: OrderedDict[tuple[str, str, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, username: str, stored_hash: str, password: str) -> bool:
        """Whether `password` matches `stored_hash` (werkzeug's check, unless it passed before)."""
        from werkzeug.security import check_password_hash

        digest = hmac.new(self._key, password.encode("utf-8", "surrogatepass"), "sha256")
        key = (username, stored_hash, digest.digest())
        with self._lock:
            if key in self._passed:
                self._passed.move_to_end(key)
                return True
        if not check_password_hash(stored_hash, password):
            return False
        with self._lock:
            self._passed[key] = None
            while len(self._passed) > self.max_remembered:
                self._passed.popitem(last=False)
        return True


def remember_passed_checks(store: Any) -> None:
    """Make MLflow's auth store (`mlflow.server.auth.store`) check passwords through
    `PassedChecks`. The server has one database, so `use_primary` changes nothing here."""
    from mlflow.exceptions import MlflowException

    passed = PassedChecks()

    def authenticate_user(username: str, password: str, *, use_primary: bool = False) -> bool:
        try:
            stored_hash = store.get_user(username).password_hash
        except MlflowException:  # no such user
            return False
        return passed.check(username, stored_hash, password)

    store.authenticate_user = authenticate_user
