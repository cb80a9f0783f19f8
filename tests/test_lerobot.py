"""LeRobot v3 export/import: layout and metadata, a lossless round trip (images within codec
tolerance), filters, file rolling, a LeRobot-style dataset without fleetloop columns, and clear
errors for directories that are not valid datasets."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from fleetloop.buffer.codec import commit_episode, decode_image, encode_chunk, encode_image, read_episode, read_manifest  # noqa: E402
from fleetloop.buffer.store import LocalStore  # noqa: E402
from fleetloop.proto.v1 import episode_pb2 as pb  # noqa: E402

from fleetloop.cli import main as cli_main  # noqa: E402
from fleetloop.lerobot.export import ExportFilter, export_dataset  # noqa: E402
from fleetloop.lerobot.format import LeRobotFormatError  # noqa: E402
from fleetloop.lerobot.importer import import_dataset, open_dataset  # noqa: E402
from fleetloop.lerobot.video import VideoSettings  # noqa: E402

CAMERAS = ("front", "wrist")
STATE_DIM, ACTION_DIM = 4, 3

# (episode id, robot, steps, outcome, kind, policy version, instruction, intervention [start, end))
EPISODES = [
    ("ep-a", "robot-1", 40, pb.OUTCOME_SUCCESS, pb.EPISODE_KIND_ROLLOUT, "v3", "pick up the cube", (10, 18)),
    ("ep-b", "robot-2", 25, pb.OUTCOME_FAILURE, pb.EPISODE_KIND_ROLLOUT, "v4", "open the drawer", (0, 5)),
    ("ep-c", "robot-1", 130, pb.OUTCOME_UNKNOWN, pb.EPISODE_KIND_DEMONSTRATION, "", "pick up the cube", None),
]


def frame(seed: int, t: int, camera: str) -> np.ndarray:
    """A smooth 64x64 RGB picture with a moving square (easy for a video codec)."""
    y, x = np.mgrid[0:64, 0:64]
    img = np.stack([(x * 3 + seed * 20) % 256, (y * 3 + t * 2) % 256,
                    np.full_like(x, 80 if camera == "front" else 160)], axis=-1).astype(np.uint8)
    p = (t * 2) % 48
    img[p:p + 12, p:p + 12] = (250, 250, 250)
    return img


def make_episode(store, episode_id, robot, n, outcome, kind, policy, instruction, segment, seed,
                 steps_per_chunk=50):
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((n, STATE_DIM)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32)
    flags = np.zeros(n, dtype=bool)
    if segment:
        flags[segment[0]:segment[1]] = True
    steps = [pb.Step(index=i, timestamp_ns=1_700_000_000_000_000_000 + seed * 10**12 + i * 33_333_333,
                     images=[encode_image(frame(seed, i, cam), camera=cam) for cam in CAMERAS],
                     state=states[i].tolist(), action=actions[i].tolist(), intervention=bool(flags[i]),
                     reward=float(i == n - 1))
             for i in range(n)]
    chunks = [(encode_chunk(episode_id, k, steps[s:s + steps_per_chunk]), len(steps[s:s + steps_per_chunk]))
              for k, s in enumerate(range(0, n, steps_per_chunk))]
    manifest = pb.EpisodeManifest(
        episode_id=episode_id, robot_id=robot, task_id=instruction.replace(" ", "-"), instruction=instruction,
        policy_version=policy, kind=kind, outcome=outcome, outcome_source=pb.LABEL_SOURCE_OPERATOR,
        started_ns=steps[0].timestamp_ns, ended_ns=steps[-1].timestamp_ns, num_steps=n,
        action_dim=ACTION_DIM, state_dim=STATE_DIM, cameras=list(CAMERAS),
        interventions=[pb.InterventionSegment(start_step=segment[0], end_step=segment[1],
                                              operator="alice", reason="drift")] if segment else [])
    return commit_episode(store, manifest, chunks)


@pytest.fixture
def fleet_store(tmp_path):
    store = LocalStore(tmp_path / "fleet")
    for seed, spec in enumerate(EPISODES):
        make_episode(store, *spec, seed=seed)
    return store


def load_all(store):
    """episode id -> (manifest, states, actions, flags, {camera: [frames]}, rewards, stamps)."""
    out = {}
    for key in sorted(k for k in store.list("episodes/") if k.endswith("manifest.json")):
        chunks = {}
        ep = read_episode(store, key, keep_chunks=chunks)
        steps = [s for i in sorted(chunks) for s in chunks[i].steps]
        images = {cam: [decode_image(next(im for im in s.images if im.camera == cam)) for s in steps]
                  for cam in ep.manifest.cameras}
        out[ep.manifest.episode_id] = (ep.manifest, ep.states, ep.actions, ep.intervention, images,
                                       np.array([s.reward for s in steps]), [s.timestamp_ns for s in steps])
    return out


def export(store, out, **kw):
    return export_dataset(store, out, progress=False, **kw)


# ---- export ------------------------------------------------------------------------------------

def test_export_layout_and_metadata(fleet_store, tmp_path):
    out = tmp_path / "ds"
    summary = export(fleet_store, out, fps=15)
    total = sum(e[2] for e in EPISODES)
    assert (summary.episodes, summary.frames, summary.tasks, summary.skipped) == (3, total, 2, [])

    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert (info["fps"], info["total_episodes"], info["total_frames"], info["total_tasks"]) == (15, 3, total, 2)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["chunks_size"] == 1000 and info["splits"] == {"train": "0:3"}
    feats = info["features"]
    assert feats["observation.state"]["shape"] == [STATE_DIM] and feats["action"]["shape"] == [ACTION_DIM]
    assert feats["action"]["dtype"] == "float32" and len(feats["action"]["names"]) == ACTION_DIM
    for cam in CAMERAS:
        ft = feats[f"observation.images.{cam}"]
        assert ft["dtype"] == "video" and ft["shape"] == [64, 64, 3]
        assert ft["names"] == ["height", "width", "channels"]
        assert ft["info"]["video.codec"] == "h264" and ft["info"]["video.fps"] == 15
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert feats[name]["shape"] == [1]
    assert feats["fleetloop.intervention"]["dtype"] == "bool" and feats["fleetloop.outcome"]["dtype"] == "string"

    # Frames: one data file, all columns, vectors as fixed-size float32 lists.
    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert data.num_rows == total
    assert set(feats) - {f"observation.images.{c}" for c in CAMERAS} == set(data.column_names)
    assert data.schema.field("action").type == pa.list_(pa.float32(), ACTION_DIM)
    assert data["index"].to_pylist() == list(range(total))
    ts = data["timestamp"].to_numpy()
    assert np.allclose(ts[:40], np.arange(40) / 15, atol=1e-6)

    # Episodes metadata: contiguous frame ranges and video spans.
    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["episode_index"] for e in eps] == [0, 1, 2]
    assert [e["fleetloop.episode_id"] for e in eps] == ["ep-a", "ep-b", "ep-c"]
    assert [e["length"] for e in eps] == [40, 25, 130]
    assert [e["fleetloop.outcome"] for e in eps] == ["success", "failure", "unknown"]
    assert eps[0]["tasks"] == ["pick up the cube"]
    assert eps[1]["dataset_from_index"] == 40 and eps[1]["dataset_to_index"] == 65
    key = "videos/observation.images.front"
    assert eps[0][f"{key}/from_timestamp"] == 0.0
    assert eps[1][f"{key}/from_timestamp"] == pytest.approx(40 / 15)
    assert eps[2][f"{key}/to_timestamp"] == pytest.approx(total / 15)
    assert eps[0]["stats/action/count"] == [40]

    # Tasks, as LeRobot reads them (pandas index "task").
    pd = pytest.importorskip("pandas")
    tasks = pd.read_parquet(out / "meta/tasks.parquet")
    assert tasks.index.name == "task"
    assert dict(zip(tasks.index, tasks["task_index"])) == {"pick up the cube": 0, "open the drawer": 1}

    # Stats match numpy over all frames.
    stats = json.loads((out / "meta/stats.json").read_text())
    actions = np.concatenate([v[2] for v in load_all(fleet_store).values()])
    assert np.allclose(stats["action"]["mean"], actions.mean(axis=0), atol=1e-5)
    assert np.allclose(stats["action"]["std"], actions.std(axis=0), atol=1e-5)
    assert np.allclose(stats["action"]["min"], actions.min(axis=0))
    assert stats["action"]["count"] == [total]
    front = np.concatenate([np.stack(v[4]["front"]) for v in load_all(fleet_store).values()]) / 255.0
    image_stats = stats["observation.images.front"]
    assert np.asarray(image_stats["mean"]).shape == (3, 1, 1)
    assert np.allclose(np.ravel(image_stats["mean"]), front.mean(axis=(0, 1, 2)), atol=0.02)
    assert np.allclose(np.ravel(image_stats["std"]), front.std(axis=(0, 1, 2)), atol=0.02)
    assert np.allclose(np.ravel(image_stats["max"]), front.max(axis=(0, 1, 2)))

    # Videos: one stream per camera holding every frame at n / fps.
    for cam in CAMERAS:
        with av.open(str(out / f"videos/observation.images.{cam}/chunk-000/file-000.mp4")) as c:
            times = [f.time for f in c.decode(c.streams.video[0])]
        assert len(times) == total and times[:3] == pytest.approx([0, 1 / 15, 2 / 15])


def test_round_trip(fleet_store, tmp_path):
    out = tmp_path / "ds"
    export(fleet_store, out)
    target = LocalStore(tmp_path / "offline")
    summary = import_dataset(out, target, progress=False)
    assert summary.episodes == 3 and summary.frames == sum(e[2] for e in EPISODES)

    before, after = load_all(fleet_store), load_all(target)
    assert set(after) == set(before)
    for eid, (m0, s0, a0, f0, img0, r0, t0) in before.items():
        m1, s1, a1, f1, img1, r1, t1 = after[eid]
        assert m1.robot_id == "lerobot-import" and m1.kind == pb.EPISODE_KIND_DEMONSTRATION
        assert m1.num_steps == m0.num_steps
        np.testing.assert_array_equal(s1, s0)
        np.testing.assert_array_equal(a1, a0)
        np.testing.assert_array_equal(f1, f0)
        np.testing.assert_array_equal(r1, r0)
        assert t1 == t0
        assert m1.outcome == m0.outcome and m1.outcome_source == m0.outcome_source
        assert (m1.instruction, m1.task_id) == (m0.instruction, m0.task_id)
        assert list(m1.interventions) == list(m0.interventions)
        assert m1.attributes["source.robot_id"] == m0.robot_id
        assert m1.attributes.get("source.policy_version", "") == m0.policy_version
        assert list(m1.cameras) == list(CAMERAS)
        for cam in CAMERAS:
            diff = np.abs(np.stack(img1[cam]).astype(int) - np.stack(img0[cam]).astype(int))
            assert diff.mean() < 4.0, (eid, cam, diff.mean())

    # Re-importing rewrites the same episodes (same ids), nothing is duplicated.
    import_dataset(out, target, progress=False)
    assert len(load_all(target)) == 3


def test_filters(fleet_store, tmp_path):
    def ids(out):
        rows = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
        return [r["fleetloop.episode_id"] for r in rows]

    cases = {"outcome": (ExportFilter(outcome="success"), ["ep-a"]),
             "robot": (ExportFilter(robot="robot-1"), ["ep-a", "ep-c"]),
             "kind": (ExportFilter(kind="demonstration"), ["ep-c"]),
             "task": (ExportFilter(task="open the drawer"), ["ep-b"]),
             "task_id": (ExportFilter(task="pick-up-the-cube", outcome="unknown"), ["ep-c"])}
    for name, (where, expected) in cases.items():
        export(fleet_store, tmp_path / name, where=where)
        assert ids(tmp_path / name) == expected, name
    with pytest.raises(LeRobotFormatError, match="no episode"):
        export(fleet_store, tmp_path / "none", where=ExportFilter(robot="robot-9"))
    assert not (tmp_path / "none").exists()


def test_export_skips_damaged_and_mismatched_episodes(fleet_store, tmp_path, capsys):
    # an episode with another action size, and one whose stored bytes were damaged
    make_episode(fleet_store, "ep-d", "robot-3", 10, pb.OUTCOME_SUCCESS, pb.EPISODE_KIND_ROLLOUT, "v4",
                 "open the drawer", None, seed=3)
    key = make_episode(fleet_store, "ep-e", "robot-3", 10, pb.OUTCOME_SUCCESS, pb.EPISODE_KIND_ROLLOUT,
                       "v4", "open the drawer", None, seed=4)
    victim = next(k for k in fleet_store.list(key.rsplit("/", 1)[0] + "/") if not k.endswith("manifest.json"))
    fleet_store.put(victim, b"garbage")
    global ACTION_DIM
    saved, ACTION_DIM = ACTION_DIM, 5
    try:
        make_episode(fleet_store, "ep-f", "robot-3", 10, pb.OUTCOME_SUCCESS, pb.EPISODE_KIND_ROLLOUT, "v4",
                     "open the drawer", None, seed=5)
    finally:
        ACTION_DIM = saved
    summary = export(fleet_store, tmp_path / "ds")
    assert summary.episodes == 4
    assert [s.split(":")[0] for s in summary.skipped] == ["episodes/robot-3/ep-e/manifest.json",
                                                          "episodes/robot-3/ep-f/manifest.json"]
    assert "state/action dims 4/5" in summary.skipped[1]
    assert cli_main(["export", "--store", fleet_store.uri, "--out", str(tmp_path / "ds2"), "--no-progress"]) == 0
    assert "skipped episodes/robot-3/ep-f/manifest.json" in capsys.readouterr().err


def test_files_roll_over_and_still_round_trip(fleet_store, tmp_path):
    out = tmp_path / "ds"
    export(fleet_store, out, video=VideoSettings(file_size_mb=1e-6), data_file_size_mb=1e-6)
    for cam in CAMERAS:
        files = sorted((out / f"videos/observation.images.{cam}/chunk-000").glob("file-*.mp4"))
        assert [f.name for f in files] == ["file-000.mp4", "file-001.mp4", "file-002.mp4"]
    assert len(list((out / "data/chunk-000").glob("file-*.parquet"))) == 3
    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["videos/observation.images.front/file_index"] for e in eps] == [0, 1, 2]
    assert [e["data/file_index"] for e in eps] == [0, 1, 2]
    assert all(e["videos/observation.images.front/from_timestamp"] == 0.0 for e in eps)

    target = LocalStore(tmp_path / "offline")
    import_dataset(out, target, progress=False)
    before, after = load_all(fleet_store), load_all(target)
    for eid in before:
        np.testing.assert_array_equal(after[eid][2], before[eid][2])
        assert np.abs(np.stack(after[eid][4]["front"]).astype(int)
                      - np.stack(before[eid][4]["front"]).astype(int)).mean() < 4.0


def test_lerobot_style_dataset_without_fleetloop_columns(fleet_store, tmp_path):
    """A dataset as LeRobot writes it: list<float> vectors, no fleetloop.* columns, an `image`
    feature stored in the parquet instead of a video."""
    out = tmp_path / "ds"
    export(fleet_store, out)
    data_path = out / "data/chunk-000/file-000.parquet"
    data = pq.read_table(data_path)
    keep = [c for c in data.column_names if not c.startswith("fleetloop.") and c != "next.reward"]
    data = data.select(keep)
    for name in ("observation.state", "action"):
        i = data.column_names.index(name)
        data = data.set_column(i, name, data[name].cast(pa.list_(pa.float32())))
    import io

    from PIL import Image as PILImage

    def png(t):
        buf = io.BytesIO()
        PILImage.fromarray(frame(7, t, "top")).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}
    cells = [png(t) for t in data["frame_index"].to_pylist()]
    data = data.append_column("observation.images.top", pa.array(cells, pa.struct([("bytes", pa.binary()),
                                                                                     ("path", pa.string())])))
    pq.write_table(data, data_path)
    eps_path = out / "meta/episodes/chunk-000/file-000.parquet"
    eps = pq.read_table(eps_path)
    pq.write_table(eps.select([c for c in eps.column_names if not c.startswith("fleetloop.")]), eps_path)
    info = json.loads((out / "meta/info.json").read_text())
    info["features"] = {k: v for k, v in info["features"].items()
                        if not k.startswith("fleetloop.") and k != "next.reward"}
    info["features"]["observation.images.top"] = {"dtype": "image", "shape": [64, 64, 3],
                                                  "names": ["height", "width", "channels"]}
    (out / "meta/info.json").write_text(json.dumps(info))

    target = LocalStore(tmp_path / "offline")
    summary = import_dataset(out, target, robot_id="so100-demos", progress=False)
    assert summary.episodes == 3
    imported = load_all(target)
    originals = load_all(fleet_store)
    before = [originals[spec[0]] for spec in EPISODES]  # the export's (chronological) order
    assert len(imported) == 3
    for (m1, s1, a1, f1, img1, _r, _t), (m0, s0, a0, *_rest) in zip(
            sorted(imported.values(), key=lambda v: int(v[0].attributes["lerobot.episode_index"])), before):
        assert m1.robot_id == "so100-demos" and m1.kind == pb.EPISODE_KIND_DEMONSTRATION
        assert m1.episode_id.startswith("ds-") and m1.outcome == pb.OUTCOME_UNKNOWN
        assert not f1.any() and not list(m1.interventions)
        assert m1.instruction == m0.instruction
        np.testing.assert_array_equal(a1, a0)
        np.testing.assert_array_equal(s1, s0)
        assert list(m1.cameras) == ["front", "wrist", "top"]
        np.testing.assert_array_equal(img1["top"][3], frame(7, 3, "top"))  # PNG: lossless


def test_cli_export_then_import(fleet_store, tmp_path, capsys):
    out = tmp_path / "ds"
    target = tmp_path / "offline"
    assert cli_main(["export", "--format", "lerobot", "--store", fleet_store.uri, "--out", str(out),
                     "--outcome", "failure", "--fps", "10", "--no-progress"]) == 0
    assert "exported 1 episodes (25 frames" in capsys.readouterr().out
    assert cli_main(["import", "--format", "lerobot", str(out), "--store", target.as_uri(),
                     "--robot-id", "demo-rig", "--no-progress"]) == 0
    assert "imported 1 episodes (25 frames)" in capsys.readouterr().out
    assert list(load_all(LocalStore(target))) == ["ep-b"]
    # --out must be new or empty
    assert cli_main(["export", "--store", fleet_store.uri, "--out", str(out), "--no-progress"]) == 1
    assert "not an empty directory" in capsys.readouterr().err


# ---- invalid datasets ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot")
    store = LocalStore(root / "fleet")
    for seed, spec in enumerate(EPISODES[:2]):
        make_episode(store, *spec, seed=seed)
    export(store, root / "ds")
    return root / "ds"


def damage_missing_info(ds):
    (ds / "meta/info.json").unlink()


def damage_old_version(ds):
    info = json.loads((ds / "meta/info.json").read_text())
    info["codebase_version"] = "v2.1"
    (ds / "meta/info.json").write_text(json.dumps(info))


def damage_bad_json(ds):
    (ds / "meta/info.json").write_text("{not json")


def damage_missing_column(ds):
    path = ds / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["action"]), path)


def damage_missing_episode_column(ds):
    path = ds / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["dataset_to_index"]), path)


def damage_corrupt_parquet(ds):
    (ds / "data/chunk-000/file-000.parquet").write_bytes(b"PAR1 this is not parquet")


def damage_missing_video(ds):
    (ds / "videos/observation.images.wrist/chunk-000/file-000.mp4").unlink()


def damage_corrupt_video(ds):
    (ds / "videos/observation.images.front/chunk-000/file-000.mp4").write_bytes(b"\x00" * 4096)


def damage_no_episodes(ds):
    shutil.rmtree(ds / "meta/episodes")


def damage_truncated_data(ds):
    path = ds / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 3), path)


@pytest.mark.parametrize("damage, message", [
    (damage_missing_info, "meta/info.json is missing"),
    (damage_old_version, "codebase_version 'v2.1'"),
    (damage_bad_json, "not valid JSON"),
    (damage_missing_column, re.escape("lacks the columns ['action']")),
    (damage_missing_episode_column, re.escape("lacks the columns ['dataset_to_index']")),
    (damage_corrupt_parquet, "not a readable parquet file"),
    (damage_missing_video, "file-000.mp4 is missing"),
    (damage_corrupt_video, "not a readable video"),
    (damage_no_episodes, "no meta/episodes"),
    (damage_truncated_data, "episode 1: .* holds 22 frames of episode 1"),
])
def test_invalid_dataset_is_refused_and_store_untouched(exported, tmp_path, capsys, damage, message):
    ds = tmp_path / "ds"
    shutil.copytree(exported, ds)
    damage(ds)
    store = LocalStore(tmp_path / "offline")
    with pytest.raises(LeRobotFormatError, match=message):
        import_dataset(ds, store, progress=False)
    # Through the CLI: a clear message and a non-zero exit.
    assert cli_main(["import", "--format", "lerobot", str(ds), "--store", store.uri, "--no-progress"]) == 1
    assert "fleetloop import: error:" in capsys.readouterr().err
    # Nothing of a refused episode is in the store (only earlier, complete episodes may be).
    manifests = [k for k in store.list("episodes/") if k.endswith("manifest.json")]
    chunk_dirs = {Path(k).parent for k in store.list("episodes/")}
    assert chunk_dirs == {Path(k).parent for k in manifests}
    if damage is not damage_truncated_data:
        assert manifests == []


def test_not_a_directory(tmp_path):
    with pytest.raises(LeRobotFormatError, match="not a directory"):
        open_dataset(tmp_path / "missing")


# ---- issue 11: a damaged image skips its episode; metadata survives a round trip ----------------

def test_export_skips_an_episode_with_an_undecodable_image(fleet_store, tmp_path):
    """The chunk's digests are right (the robot sent the bad image), so only decoding finds it:
    the episode is skipped and listed, the rest of the store is exported."""
    key = make_episode(fleet_store, "ep-g", "robot-3", 6, pb.OUTCOME_SUCCESS, pb.EPISODE_KIND_ROLLOUT, "v4",
                       "open the drawer", None, seed=6)
    m = read_manifest(fleet_store, key)
    chunks = {}
    read_episode(fleet_store, key, keep_chunks=chunks)
    steps = list(chunks[0].steps)
    bad = steps[3].images[1]
    bad.data = bad.data[:len(bad.data) // 2]  # torn PNG
    del m.chunks[:]
    commit_episode(fleet_store, m, [(encode_chunk("ep-g", 0, steps), len(steps))])
    summary = export(fleet_store, tmp_path / "ds")
    assert summary.episodes == 3
    assert len(summary.skipped) == 1 and summary.skipped[0].startswith("episodes/robot-3/ep-g/manifest.json")
    assert "step 3: camera 'wrist' image does not decode" in summary.skipped[0]


def test_import_keeps_fps_robot_type_and_names_and_export_writes_them_back(fleet_store, tmp_path):
    out = tmp_path / "ds"
    export(fleet_store, out, fps=10)
    info = json.loads((out / "meta/info.json").read_text())
    joints = [f"joint_{i}" for i in range(STATE_DIM)]
    info["robot_type"] = "so100"
    info["features"]["observation.state"]["names"] = {"motors": joints}
    info["features"]["action"]["names"] = [f"motor_{i}" for i in range(ACTION_DIM)]
    (out / "meta/info.json").write_text(json.dumps(info))
    target = LocalStore(tmp_path / "offline")
    import_dataset(out, target, progress=False)
    m = next(iter(load_all(target).values()))[0]
    assert m.attributes["lerobot.fps"] == "10" and m.attributes["lerobot.robot_type"] == "so100"
    again = tmp_path / "again"
    export(target, again)  # no fps given: the imported rate, not the default 30
    info2 = json.loads((again / "meta/info.json").read_text())
    assert info2["fps"] == 10 and info2["robot_type"] == "so100"
    assert info2["features"]["observation.state"]["names"] == {"motors": joints}
    assert info2["features"]["action"]["names"] == [f"motor_{i}" for i in range(ACTION_DIM)]
    # an explicit --fps still wins; a store of fleet episodes keeps fleetloop's defaults
    export(target, tmp_path / "at30", fps=30)
    assert json.loads((tmp_path / "at30/meta/info.json").read_text())["fps"] == 30
    export(fleet_store, tmp_path / "fleet-ds")
    info3 = json.loads((tmp_path / "fleet-ds/meta/info.json").read_text())
    assert info3["fps"] == 30 and info3["robot_type"] == "fleetloop"
    assert info3["features"]["action"]["names"][0] == "action_0"
