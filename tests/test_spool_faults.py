"""Issue 13 defects on the robot side, on a real full disk (a tmpfs of 1 MB; CI runs as root):
ENOSPC is the documented spool-full path, the spool's byte count matches the disk after every
failure, and the synthetic robot never records a dropped episode as committed."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid

import pytest

from fleetloop.actor.recorder import EpisodeRecorder
from fleetloop.actor.spool import Spool
from fleetloop.actor.synthetic import SyntheticActor, synthetic_steps
from fleetloop.proto.v1 import episode_pb2 as pb

import numpy as np


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def record(rec: EpisodeRecorder, kb: int, rng) -> str:
    rec.start("synthetic-v0", "do it", "v000001")
    for step in synthetic_steps(rng, kb * 1024, steps=20):
        rec.add_step(step)
    eid, _ = rec.end(pb.OUTCOME_SUCCESS, pb.LABEL_SOURCE_ROBOT, "t")
    assert rec.flush()
    return eid


def test_enospc_is_spool_full_and_accounting_recovers(small_disk, caplog):
    spool = Spool(small_disk / "spool", max_bytes=950 * 1024)  # the budget is about the disk
    rec = EpisodeRecorder(spool, "robot-d", chunk_steps=4, chunk_bytes=64 * 1024)
    rng = np.random.default_rng(0)
    filler = small_disk / "filler.bin"
    filler.write_bytes(os.urandom(700 * 1024))   # someone else fills the disk
    caplog.set_level(logging.WARNING)
    dropped = [record(rec, 300, rng) for _ in range(4)]  # each runs into ENOSPC part-way
    assert all(rec.was_dropped(e) for e in dropped)
    assert spool.dropped_episodes == 4
    # the documented path: "spool full", one line, no traceback of a "write error"
    assert not [r for r in caplog.records if "write error" in r.getMessage() or r.exc_info]
    assert any("spool full" in r.getMessage() for r in caplog.records)
    # accounting equals the disk after every failure (it used to keep the failed writes)
    on_disk = sum(f.stat().st_size for f in spool.root.rglob("*") if f.is_file())
    assert spool.bytes == on_disk
    assert os.listdir(spool.root) == []          # nothing half-written left behind
    filler.unlink()                              # the disk has room again
    ok = record(rec, 300, rng)
    assert not rec.was_dropped(ok) and spool.sealed() == [ok]
    assert spool.bytes == sum(f.stat().st_size for f in spool.root.rglob("*") if f.is_file())


def test_failed_write_that_is_not_enospc_rolls_back_too(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=10 * 1024 * 1024)
    spool.begin("ep-1", {"x": 1})
    before = spool.bytes
    for f in (spool.root / "ep-1").iterdir():    # the directory vanished under the writer
        f.unlink()
    (spool.root / "ep-1").rmdir()
    with pytest.raises(FileNotFoundError):
        spool.write_chunk("ep-1", 0, b"x" * 1000)
    assert spool.bytes == before                 # the failed chunk is not counted


def test_synthetic_robot_does_not_record_dropped_episodes(tmp_path, redis_server):
    ids_file = tmp_path / "ids.txt"
    # a spool budget smaller than one episode: every episode is dropped
    actor = SyntheticActor("robot-s", (tmp_path / "store").as_uri(), redis_server.url, str(tmp_path / "spool"),
                           spool_max_bytes=100 * 1024)
    noted = []
    ids = actor.record(3, 400 * 1024, on_end=noted.append)
    ids2 = actor.record(2, 400 * 1024)
    actor.close()
    assert noted == [] and ids == [] and ids2 == []
    assert len(actor.dropped) == 5
    # the process form writes the ids file only for committed episodes
    uid = uuid.uuid4().hex[:6]
    out = subprocess.run(
        [sys.executable, "-m", "fleetloop.actor.synthetic", "--robot-id", f"r-{uid}", "--store",
         (tmp_path / "store").as_uri(), "--redis", redis_server.url, "--spool", str(tmp_path / "spool2"),
         "--episodes", "2", "--episode-kb", "400", "--spool-max-mb", "0.1", "--ids-file", str(ids_file),
         "--dropped-file", str(tmp_path / "dropped.txt")],
        capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert not ids_file.exists() or ids_file.read_text().split() == []
    assert len((tmp_path / "dropped.txt").read_text().split()) == 2
