"""The `fleetloop` command: every subcommand is listed, imports and has working --help."""
import subprocess
import sys

import pytest

from fleetloop.cli import COMMANDS


def fleetloop(*args):
    return subprocess.run([sys.executable, "-m", "fleetloop.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    r = fleetloop("--help")
    assert r.returncode == 0, r.stderr
    for name in COMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name):
    r = fleetloop(name, "--help")
    assert r.returncode == 0, r.stderr
    assert f"fleetloop {name}" in r.stdout


def test_bad_actor_config_is_a_clear_error(tmp_path):
    r = fleetloop("actor", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "does not exist" in r.stdout
