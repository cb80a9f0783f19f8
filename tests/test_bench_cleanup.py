"""`bench learner` and `bench broadcast` remove what they write to the temporary folder (a preset
base there is GBs per run): run small, in-process, with the temporary folder redirected."""
from __future__ import annotations

import json
import tempfile

import pytest

from fleetloop.cli import main


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp / TemporaryDirectory write
    return tmp_path


def ours(folder) -> list[str]:
    """What fleetloop left there (torch keeps its own compile cache there too: not ours)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("fleetloop-"))


def bench(capsys, *argv) -> dict:
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_bench_learner_vla_leaves_no_temporary_folder(scratch, capsys):
    pytest.importorskip("transformers")
    out = bench(capsys, "learner", "--backend", "vla", "--device", "cpu", "--threads", "1", "--steps", "1",
                "--warmup", "0", "--batch-size", "2", "--tasks", "1", "--episodes", "2", "--episode-len", "60",
                "--set", "expert_layers=1")
    assert out["backend"] == "hf-vla" and out["samples_per_s"] > 0
    assert ours(scratch) == []  # the tiny base and the frame store were built there


@pytest.mark.timeout(300)
def test_bench_broadcast_vla_leaves_no_temporary_folder(scratch, capsys):
    pytest.importorskip("transformers")
    out = bench(capsys, "broadcast", "--backend", "vla", "--actors", "1", "--rounds", "1", "--timeout", "120",
                "--set", "expert_layers=1")
    assert out["update"]["loaded"] == 1
    assert ours(scratch) == []  # the tiny base and Redis's data folder were there
