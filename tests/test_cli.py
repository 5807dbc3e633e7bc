"""`mnist-pipeline`'s argument handling: each command's help reaches the user."""

from __future__ import annotations

import pytest

from mnist_pipeline import cli


def test_cli_team_help_is_the_team_stacks_own(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["team", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mnist-pipeline team")
    assert "{up,down,status,env,user}" in out and "--network" in out


def test_cli_team_without_an_action_names_what_is_missing(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["team"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("error: the following arguments are required: action")


def test_cli_champion_history_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["champion", "history", "--help"])
    assert done.value.code == 0
    assert "--limit" in capsys.readouterr().out
