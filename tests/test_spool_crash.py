"""A kill -9 while the uploader deletes an uploaded episode from the spool (the step after the
commit point), and a sealed entry that is damaged: neither may stall the spool or duplicate an
episode. The fresh-clone CI once hung here: the kill landed after chunk-00000 was deleted but
before end.json, and the restarted uploader retried the missing chunk forever."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np

from fleetloop.actor.recorder import EpisodeRecorder
from fleetloop.actor.spool import DAMAGED, REMOVING, Spool
from fleetloop.actor.synthetic import synthetic_steps
from fleetloop.actor.uploader import Uploader, recover_unsealed
from fleetloop.buffer.codec import manifest_key
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import FrameIndex
from fleetloop.config import DEAD_LETTER_STREAM, EPISODE_STREAM as STREAM
from fleetloop.buffer.store import LocalStore
from fleetloop.proto.v1 import episode_pb2 as pb

ROBOT = "robot-c"


def record(spool: Spool, n: int, seed: int = 0) -> list[str]:
    rec = EpisodeRecorder(spool, ROBOT, chunk_steps=4, chunk_bytes=16 * 1024)
    rng = np.random.default_rng(seed)
    ids = []
    for _ in range(n):
        rec.start("synthetic-v0", "do it", "v000001")
        for step in synthetic_steps(rng, 48 * 1024, steps=16):
            rec.add_step(step)
        eid, _ = rec.end(pb.OUTCOME_SUCCESS, pb.LABEL_SOURCE_ROBOT, "t")
        ids.append(eid)
    assert rec.flush()
    return ids


def on_disk(spool: Spool) -> int:
    return sum(f.stat().st_size for f in spool.root.rglob("*") if f.is_file())


def index_all(store, client, expect: int) -> FrameIndex:
    index = FrameIndex()
    consumer = DataConsumer(store, client, index)
    for _ in range(200):
        consumer.poll_once(block_ms=50)
        if len(index) >= expect:
            break
    while consumer.poll_once(block_ms=100):  # and everything after it (a duplicate would show up here)
        pass
    return index


KILL_MID_DELETE = textwrap.dedent("""
    import os, pathlib, signal, sys
    import redis
    from fleetloop.actor.spool import Spool
    from fleetloop.actor.uploader import Uploader, recover_unsealed
    from fleetloop.buffer.store import LocalStore

    spool_dir, store_dir, redis_url = sys.argv[1:4]
    unlink = pathlib.Path.unlink
    def unlink_then_die(self, *a, **k):   # kill -9 right after the first chunk file is deleted
        unlink(self, *a, **k)
        if self.name.endswith(".flc"):
            os.kill(os.getpid(), signal.SIGKILL)
    pathlib.Path.unlink = unlink_then_die
    Uploader(Spool(spool_dir), LocalStore(store_dir), redis.Redis.from_url(redis_url)).drain_once()
    sys.exit(3)  # not reached
""")


def test_kill_9_while_deleting_an_uploaded_episode(tmp_path, redis_server, redis_client):
    spool = Spool(tmp_path / "spool")
    ids = record(spool, 3)
    script = tmp_path / "kill_mid_delete.py"
    script.write_text(KILL_MID_DELETE)
    proc = subprocess.run([sys.executable, str(script), str(spool.root), str(tmp_path / "store"), redis_server.url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    store = LocalStore(tmp_path / "store")
    first = ids[0]  # uploaded, committed and announced; killed while its spool copy was deleted
    committed = store.get(manifest_key(ROBOT, first))
    assert redis_client.xlen(STREAM) == 1
    left = sorted(os.listdir(spool.root))
    assert left == sorted([REMOVING + first] + ids[1:])  # whole episodes, and one half-deleted aside

    restarted = Spool(spool.root)  # the robot comes back
    assert sorted(os.listdir(spool.root)) == sorted(ids[1:])  # the half-deleted one is finished off
    assert restarted.sealed() == ids[1:] and restarted.unsealed() == []
    assert restarted.bytes == on_disk(restarted)
    assert Uploader(restarted, store, redis_client).drain_once() == 2
    assert os.listdir(spool.root) == [] and restarted.bytes == 0
    assert store.get(manifest_key(ROBOT, first)) == committed  # not re-sealed as an incomplete copy
    index = index_all(store, redis_client, 3)
    assert sorted(e.episode_id for e in index.episodes()) == sorted(ids)
    assert not any(e.incomplete for e in index.episodes())


def test_committed_episode_with_chunks_gone_finishes_instead_of_retrying(tmp_path, redis_server, redis_client,
                                                                         caplog):
    """A spool left by a build that deleted file by file: end.json is there, chunk 0 is not, and
    the store already has the manifest. Before, the uploader retried the missing file forever."""
    spool = Spool(tmp_path / "spool")
    ids = record(spool, 2)
    store = LocalStore(tmp_path / "store")
    uploader = Uploader(spool, store, redis_client)
    real_remove = spool.remove
    spool.remove = lambda eid: (spool.path(eid) / "chunk-00000.flc").unlink()  # the old crash, frozen
    uploader.upload_one(ids[0])
    spool.remove = real_remove
    committed = store.get(manifest_key(ROBOT, ids[0]))

    restarted = Spool(spool.root)
    caplog.set_level(logging.WARNING)
    assert Uploader(restarted, store, redis_client).drain_once() == 2
    assert os.listdir(spool.root) == [] and restarted.damaged == 0
    assert store.get(manifest_key(ROBOT, ids[0])) == committed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    index = index_all(store, redis_client, 2)  # announced twice, indexed once
    assert redis_client.xlen(STREAM) == 3
    assert sorted(e.episode_id for e in index.episodes()) == sorted(ids) and len(index) == 2


def test_damaged_entry_is_set_aside_and_the_rest_upload(tmp_path, redis_server, redis_client, caplog):
    spool = Spool(tmp_path / "spool")
    ids = record(spool, 4)
    (spool.path(ids[0]) / "chunk-00001.flc").unlink()    # deleted by hand, never uploaded
    (spool.path(ids[1]) / "meta.json").write_text('{"robot_id": "robot-c"}')  # what the episode is: gone
    sealed_before = (spool.path(ids[1]) / "end.json").read_bytes()
    (spool.path(ids[2]) / "end.json").write_text("{not j")  # its seal did not survive: sealed again
    (spool.path(ids[3]) / "end.json").write_text("{}")      # nor this one (valid JSON, no fields)
    spool.recount()                                       # (the hand edits above bypassed the count)
    store = LocalStore(tmp_path / "store")
    uploader = Uploader(spool, store, redis_client)
    caplog.set_level(logging.WARNING)
    assert uploader.drain_once() == 2                    # the others are not held up
    assert not store.exists(manifest_key(ROBOT, ids[0]))  # nothing half-committed
    assert sorted(os.listdir(spool.root)) == sorted([DAMAGED + ids[0], DAMAGED + ids[1]])
    assert spool.damaged == 2 and spool.backlog()["damaged_episodes"] == 2 and spool.sealed() == []
    assert spool.bytes == on_disk(spool)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(ids[0] in m and "chunk 1 of" in m and "missing" in m for m in errors)
    assert any(ids[1] in m and "meta.json" in m for m in errors)
    assert (spool.root / (DAMAGED + ids[1]) / "end.json").read_bytes() == sealed_before  # kept as it was
    assert uploader.drain_once() == 0                    # and it is not retried
    # a restart still knows how many are set aside, and they stay on disk for an operator
    assert Spool(spool.root).damaged == 2
    index = index_all(store, redis_client, 2)
    assert sorted(e.episode_id for e in index.episodes()) == sorted(ids[2:])
    for eid in ids[2:]:
        resealed = index.get(eid)
        assert resealed.incomplete and resealed.num_steps == 16  # every step kept, only the outcome unknown
    assert json.loads((spool.root / (DAMAGED + ids[0]) / "meta.json").read_text())["episode_id"] == ids[0]


def test_durable_spool_syncs_what_a_seal_promises(tmp_path, monkeypatch):
    """Power-cut safety is ordering: chunk data on disk before the seal's rename, the rename
    itself synced through the directory. Count the syncs of one episode (a real power cut
    cannot be staged here)."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    spool = Spool(tmp_path / "spool")
    eid = record(spool, 1)[0]
    d = str(spool.path(eid))
    chunks = sorted(str(p) for p in spool.path(eid).glob("chunk-*.flc"))
    assert len(chunks) == 4
    names = [os.path.basename(p) for p in synced]
    assert set(chunks) <= set(synced) and d + "/meta.json" in synced
    assert synced.index(str(spool.root)) < synced.index(chunks[0])        # the episode's directory entry
    assert max(synced.index(c) for c in chunks) < synced.index(d) == len(synced) - 1  # seal last: dir sync
    assert names[-2].startswith(".tmp-")                                   # end.json's data before its rename
    synced.clear()
    record(Spool(tmp_path / "fast", durable=False), 1)
    assert synced == []


def test_recovery_at_start_sets_aside_an_episode_it_cannot_read(tmp_path, caplog):
    """An episode cut short by a crash whose meta.json is garbage must not stop the robot's
    daemon from starting (recovery runs before recording)."""
    spool = Spool(tmp_path / "spool")
    rec = EpisodeRecorder(spool, ROBOT, chunk_steps=4, chunk_bytes=16 * 1024)
    for eid, meta in (("ep-list", "[1, 2]"), ("ep-badid", json.dumps({"robot_id": "no/slashes"}))):
        rec.start("synthetic-v0", "do it", "v000001", episode_id=eid)
        for step in synthetic_steps(np.random.default_rng(0), 8 * 1024, steps=8):
            rec.add_step(step)
        assert rec.flush()
        rec._current = None                              # the process died mid-episode
        (spool.path(eid) / "meta.json").write_text(meta)
    good = record(spool, 1)[0]
    caplog.set_level(logging.WARNING)
    assert recover_unsealed(Spool(spool.root)) == []
    assert sorted(os.listdir(spool.root)) == sorted([DAMAGED + "ep-list", DAMAGED + "ep-badid", good])


def test_a_robot_killed_again_and_again_loses_nothing(tmp_path, redis_server, redis_client):
    """A robot whose daemon dies over and over (a flaky power supply, an OOM killer): sixteen kill -9s
    at random moments -- recording, writing a chunk, sealing, uploading, announcing, deleting, or
    recovering what the last kill left -- each followed by a restart on the same spool. Every
    episode the robot reported as recorded is indexed exactly once, nothing waits in the spool,
    and at most one episode per kill comes extra (the one cut short, marked incomplete)."""
    import random
    import time
    store_uri = (tmp_path / "store").as_uri()
    ids_file = tmp_path / "ids.txt"
    rng = random.Random(7)
    kills = 0

    def cmd(episodes, seed, drain_only=False):
        c = [sys.executable, "-m", "fleetloop.actor.synthetic", "--robot-id", ROBOT, "--store", store_uri,
             "--redis", redis_server.url, "--spool", str(tmp_path / "spool"), "--episodes", str(episodes),
             "--episode-kb", "384", "--seed", str(seed), "--ids-file", str(ids_file)]
        return c + (["--drain-only"] if drain_only else [])

    for k in range(16):
        before = len(ids_file.read_text().split()) if ids_file.exists() else 0
        proc = subprocess.Popen(cmd(40, k), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if ids_file.exists() and len(ids_file.read_text().split()) > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        assert proc.poll() is None, "the robot finished before its kill"
        proc.kill()
        proc.wait()
        kills += 1
    out = subprocess.run(cmd(0, 99, drain_only=True), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.listdir(tmp_path / "spool") == []
    recorded = ids_file.read_text().split()
    assert len(recorded) == len(set(recorded)) >= 16
    store = LocalStore(tmp_path / "store")
    index = index_all(store, redis_client, len(recorded))
    indexed = {e.episode_id for e in index.episodes()}
    assert set(recorded) <= indexed, "an episode the robot had recorded was lost"
    extra = indexed - set(recorded)
    full = {index.get(e).num_steps for e in recorded}
    assert len(extra) <= kills and all(index.get(e).incomplete or index.get(e).num_steps in full for e in extra)
    assert len(index) == len(indexed)
    assert redis_client.xlen(DEAD_LETTER_STREAM) == 0  # nothing announced that could not be read
