"""The team server's remembered password checks (team/credentials.py), against werkzeug's real
scrypt hashes: a passed check is not repeated, anything else is checked in full."""

from __future__ import annotations

import pytest
import werkzeug.security
from werkzeug.security import generate_password_hash

from mnist_pipeline.team.credentials import PassedChecks, remember_passed_checks


@pytest.fixture
def full_checks(monkeypatch) -> list[str]:
    """The passwords werkzeug checked in full, in order."""
    checked: list[str] = []
    real = werkzeug.security.check_password_hash

    def counting(stored: str, password: str) -> bool:
        checked.append(password)
        return real(stored, password)

    monkeypatch.setattr(werkzeug.security, "check_password_hash", counting)
    return checked


def test_auth_a_passed_check_is_remembered_and_a_wrong_password_never_is(full_checks):
    passed = PassedChecks()
    stored = generate_password_hash("right horse battery")
    assert passed.check("alice", stored, "right horse battery")
    assert passed.check("alice", stored, "right horse battery")
    assert full_checks == ["right horse battery"]
    assert not passed.check("alice", stored, "wrong")
    assert not passed.check("alice", stored, "wrong")
    assert full_checks == ["right horse battery", "wrong", "wrong"]
    assert passed.check("bob", stored, "right horse battery")  # another user: checked again
    assert full_checks == ["right horse battery", "wrong", "wrong", "right horse battery"]


def test_auth_a_changed_password_takes_effect_at_once(full_checks):
    passed = PassedChecks()
    old = generate_password_hash("old password")
    assert passed.check("alice", old, "old password")
    new = generate_password_hash("new password")  # what the store holds after the change
    assert not passed.check("alice", new, "old password")
    assert passed.check("alice", new, "new password")
    assert len(full_checks) == 3


def test_auth_remembers_at_most_its_bound(full_checks):
    passed = PassedChecks(max_remembered=2)
    stored = {name: generate_password_hash(f"{name} pass") for name in ("a", "b", "c")}
    for name in ("a", "b", "c"):
        assert passed.check(name, stored[name], f"{name} pass")
    assert passed.check("c", stored["c"], "c pass")  # remembered
    assert passed.check("a", stored["a"], "a pass")  # forgotten: the least recently used
    assert full_checks == ["a pass", "b pass", "c pass", "a pass"]


def test_auth_store_reads_the_stored_hash_on_every_request(tmp_path, full_checks):
    """MLflow's own auth store on SQLite: a changed password and a removed user take effect
    at once, remembered or not."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{tmp_path / 'auth.db'}")
    store.create_user("alice", "first password")
    remember_passed_checks(store)
    assert store.authenticate_user("alice", "first password")
    assert store.authenticate_user("alice", "first password", use_primary=True)
    assert full_checks == ["first password"]
    store.update_user("alice", password="second password")
    assert not store.authenticate_user("alice", "first password")
    assert store.authenticate_user("alice", "second password")
    store.delete_user("alice")
    assert not store.authenticate_user("alice", "second password")
    assert not store.authenticate_user("nobody", "second password")
