"""The learner: LearnerCore's step and per-sample losses, crash-safe checkpoints and resume,
and a short end-to-end run on Ray with real Redis and a file:// store (episodes announced ->
consumed -> trained -> versions published -> restart resumes)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fleetloop import config
from fleetloop.buffer.codec import commit_episode, encode_chunk
from fleetloop.buffer.index import EpisodeEntry, FrameIndex
from fleetloop.buffer.queue import EpisodeAnnouncer
from fleetloop.buffer.sampler import OFFLINE, ONLINE, BufferSampler, SamplerConfig
from fleetloop.buffer.store import LocalStore, open_store
from fleetloop.learner.checkpoint import (CheckpointStore, arrays_from_safetensors, arrays_to_safetensors,
                                          optimizer_from_safetensors, optimizer_to_safetensors)
from fleetloop.learner.core import CoreConfig, LearnerCore, LocalSource
from fleetloop.policy.model import ModelConfig, VLAPolicyNet, from_safetensors_bytes, save_checkpoint, to_safetensors_bytes
from fleetloop.proto.v1 import episode_pb2 as pb

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)
S, A = 39, 4


def encode(instruction: str) -> np.ndarray:
    return np.random.default_rng(len(instruction)).standard_normal(384).astype(np.float32)


def small_index() -> FrameIndex:
    index = FrameIndex()
    rng = np.random.default_rng(0)
    for task in ("a", "b"):
        for k, source in enumerate([OFFLINE] * 3 + [ONLINE] * 3):
            st = rng.standard_normal((30, S)).astype(np.float32)
            index.add(EpisodeEntry(episode_id=f"{task}{k}", manifest_key="", robot_id="r", task_id=task,
                                   instruction=f"do {task}", policy_version="v000001" if source == ONLINE else "",
                                   source=source, outcome="success", outcome_source="", incomplete=False, states=st,
                                   actions=np.tanh(st[:, :A]), intervention=np.zeros(30, bool), chunks=[],
                                   chunk_starts=np.zeros(1, np.int64), ended_ns=0))
    return index


def tiny_net(**kw) -> VLAPolicyNet:
    torch.manual_seed(0)
    return VLAPolicyNet(ModelConfig.preset("tiny", use_images=False, **kw))


class Capture(LocalSource):
    def report_losses(self, step, batch, losses):
        self.last = (batch, losses)
        super().report_losses(step, batch, losses)


def test_per_sample_losses_are_exact():
    index = small_index()
    sampler = BufferSampler(index, SamplerConfig(), encode=encode)
    net = tiny_net(indicator_dropout=0.0)  # deterministic forward
    reference = from_safetensors_bytes(None, to_safetensors_bytes(net))  # weights before the step
    source = Capture(sampler, 64)
    core = LearnerCore(net, source, config=CoreConfig(batch_size=64))
    metrics = core.train_step()
    batch, losses = source.last
    want = []
    for i in range(64):  # each sample's loss, one at a time
        one = {k: torch.from_numpy(np.array(v[i:i + 1])) for k, v in batch.arrays.items()}
        reference.train()
        want.append(reference.loss(one)[0].item())
    np.testing.assert_allclose(losses, want, rtol=1e-4, atol=1e-6)
    assert metrics["loss"] == pytest.approx(np.mean(want), rel=1e-5)
    assert sampler.mix.mean_loss("a", OFFLINE) is not None  # fed back to the adaptive mix


def test_training_reduces_the_loss():
    index = small_index()
    sampler = BufferSampler(index, SamplerConfig(), encode=encode)
    core = LearnerCore(tiny_net(), LocalSource(sampler, 64), config=CoreConfig(lr=1e-3, warmup_steps=5))
    first = np.mean([core.train_step()["loss"] for _ in range(5)])
    for _ in range(60):
        core.train_step()
    last = np.mean([core.train_step()["loss"] for _ in range(5)])
    assert last < 0.8 * first
    t = core.timing()
    assert t["samples_per_s"] > 0 and 0 <= t["data_wait_fraction"] <= 1


# ---- checkpoints -------------------------------------------------------------------------------

class CrashingStore(LocalStore):
    """A store whose put() dies (as the process would) on the first key matching `crash_on`."""

    crash_on: str | None = None

    def put(self, key: str, data: bytes) -> None:
        if self.crash_on and self.crash_on in key:
            self.crash_on = None
            raise KeyboardInterrupt(f"simulated crash while writing {key}")
        super().put(key, data)


def make_checkpoint(ckpts: CheckpointStore, step: int, tag: float) -> str:
    files = {"model": arrays_to_safetensors({"w": np.full(4, tag, np.float32)}),
             "optimizer": b"", "algorithm": arrays_to_safetensors({})}
    return ckpts.save(step, files, {"sampler": {"tag": tag}})


@pytest.mark.parametrize("crash_on", ["model.safetensors", "optimizer.safetensors", "state.json", "LATEST"])
def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, crash_on):
    store = CrashingStore(tmp_path / "store")
    ckpts = CheckpointStore(store, "learner/test")
    make_checkpoint(ckpts, 100, 1.0)
    store.crash_on = crash_on
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(ckpts, 200, 2.0)
    loaded = ckpts.load_latest()
    assert loaded.step == 100 and loaded.state["sampler"] == {"tag": 1.0}
    assert arrays_from_safetensors(loaded.files["model"])["w"][0] == 1.0
    # The next save works and becomes the latest; the crashed leftovers get cleaned up.
    make_checkpoint(ckpts, 300, 3.0)
    make_checkpoint(ckpts, 400, 4.0)
    make_checkpoint(ckpts, 500, 5.0)
    assert ckpts.load_latest().step == 500
    dirs = {k.split("/")[3] for k in store.list("learner/test/checkpoints/")}
    assert len(dirs) == 3 and all(d.startswith(("0000000300", "0000000400", "0000000500")) for d in dirs)


def test_broken_latest_falls_back_to_a_verified_checkpoint(tmp_path):
    store = LocalStore(tmp_path / "store")
    ckpts = CheckpointStore(store, "learner/test")
    assert ckpts.load_latest() is None
    make_checkpoint(ckpts, 1, 1.0)
    second = make_checkpoint(ckpts, 2, 2.0)
    store.put("learner/test/LATEST", b"{not json")
    assert ckpts.load_latest().step == 2
    # A corrupt file in the newest checkpoint: verification fails, the older one is used.
    data = bytearray(store.get(f"{second}/model.safetensors"))
    data[-1] ^= 0xFF
    store.put(f"{second}/model.safetensors", bytes(data))
    assert ckpts.load_latest().step == 1


def test_optimizer_state_round_trip():
    net = tiny_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, S), torch.randn(4, 384), torch.zeros(4, dtype=torch.long)).sum().backward()
    opt.step()
    data, meta = optimizer_to_safetensors(opt)
    meta = json.loads(json.dumps(meta))
    opt2 = torch.optim.AdamW(net.parameters(), lr=5.0)
    optimizer_from_safetensors(opt2, data, meta)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for k in a["state"][pid]:
            assert torch.equal(a["state"][pid][k], b["state"][pid][k])


def test_resume_restores_step_optimizer_and_sampler(tmp_path):
    index = small_index()
    ckpts = CheckpointStore(open_store((tmp_path / "store").as_uri()), "learner/r")

    def make(net, sampler_state=None):
        sampler = BufferSampler(index, SamplerConfig(window=10, seed=5), encode=encode)
        if sampler_state:
            sampler.load_state_dict(sampler_state)
        return LearnerCore(net, LocalSource(sampler, 32), config=CoreConfig(warmup_steps=2)), sampler

    core, sampler = make(tiny_net())
    for _ in range(7):
        core.train_step()
    opt_bytes, opt_meta = core.optimizer_state()
    ckpts.save(core.step, {"model": to_safetensors_bytes(core.net), "optimizer": opt_bytes},
               {"sampler": sampler.state_dict(), "optimizer": opt_meta})

    loaded = ckpts.load_latest()
    core2, sampler2 = make(from_safetensors_bytes(None, loaded.files["model"]), loaded.state["sampler"])
    core2.step = loaded.step
    core2.load_optimizer_state(loaded.files["optimizer"], loaded.state["optimizer"])
    assert core2.step == 7
    assert sampler2.online_fractions() == sampler.online_fractions()
    assert sampler2.mix.state_dict() == sampler.mix.state_dict()
    # The resumed learner takes exactly the step the original would have taken.
    torch.manual_seed(123)
    m1 = core.train_step()
    torch.manual_seed(123)
    m2 = core2.train_step()
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6) and m2["step"] == 8
    for p1, p2 in zip(core.net.parameters(), core2.net.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6)


# ---- end to end on Ray -------------------------------------------------------------------------

def write_episode(store, eid: str, task: str, steps: int, seed: int, kind: int, version: str = "",
                  intervention: tuple[int, int] | None = None, outcome: int = pb.OUTCOME_SUCCESS) -> str:
    rng = np.random.default_rng(seed)
    st = rng.standard_normal((steps, S)).astype(np.float32)
    act = np.tanh(st[:, :A])
    msgs = [pb.Step(index=t, state=st[t], action=act[t],
                    intervention=bool(intervention and intervention[0] <= t < intervention[1])) for t in range(steps)]
    m = pb.EpisodeManifest(episode_id=eid, robot_id="sim-0", task_id=task, instruction=f"do {task}", kind=kind,
                           outcome=outcome, num_steps=steps, action_dim=A, state_dim=S, policy_version=version)
    return commit_episode(store, m, [(encode_chunk(eid, 0, msgs), steps)])


def stats_hash(client) -> dict:
    return {k.decode(): json.loads(v) for k, v in client.hgetall(config.LEARNER_STATS_KEY).items()}


@pytest.mark.timeout(400)
def test_learner_end_to_end_on_ray(ray_cluster, redis_server, redis_client, tmp_path):
    from fleetloop.learner.app import start_learner
    from fleetloop.release.registry import PolicyRegistry

    store = open_store((tmp_path / "store").as_uri())
    for task in ("a", "b"):
        for k in range(4):
            write_episode(store, f"demo-{task}-{k}", task, 40, k, pb.EPISODE_KIND_DEMONSTRATION)
    save_checkpoint(tiny_net(), tmp_path / "init")
    opts = dict(publish_every=10, checkpoint_every=15, batch_size=32, storage_path=str(tmp_path / "ray"),
                stats_interval_s=0.2)
    handle = start_learner(store.uri, redis_server.url, "hg-dagger", str(tmp_path / "init"), max_steps=30, **opts)
    # The fleet streams rollouts with interventions while the learner runs.
    announcer = EpisodeAnnouncer(redis_client)
    for k in range(4):
        key = write_episode(store, f"roll-{k}", "a", 30, 100 + k, pb.EPISODE_KIND_ROLLOUT, version="v000001",
                            intervention=(5, 15), outcome=pb.OUTCOME_FAILURE)
        announcer.announce(pb.EpisodeEvent(episode_id=f"roll-{k}", manifest_key=key, robot_id="sim-0", task_id="a"))
    assert handle.wait(300), "learner did not finish its 30 steps"
    final = handle.stop()
    assert handle.error is None and final["status"] == "stopped"
    assert final["step"] == 30
    assert final["consumer"]["indexed"] + final["rebuild"]["indexed"] >= 12
    assert final["buffer"]["tasks"]["a"]["online"]["episodes"] == 4
    # Versions: the pretrained one (published at start) + one every 10 steps.
    registry = PolicyRegistry(store, redis_client)
    versions = registry.list_versions()
    assert [v["learner_step"] for v in versions] == [0, 10, 20, 30]
    assert [v["algorithm"] for v in versions] == ["pretrain", "hg-dagger", "hg-dagger", "hg-dagger"]
    assert registry.pointer()["version"] == versions[-1]["version"] == final["current_version"]
    m = registry.manifest(versions[-1]["version"])
    assert m.parent_version == versions[-2]["version"] and m.HasField("inference")  # how robots run it
    # Dashboard figures in Redis.
    s = stats_hash(redis_client)
    assert s["status"] == "stopped" and s["step"] == 30 and s["versions_published"] == 3
    assert set(s["w_on"]) == {"a", "b"} and s["w_on"]["b"] == 0.0
    assert s["staleness"]["learner_version"] == 4
    assert s["eligible_frames"]["a"]["online"] == 40  # strict HG-DAgger: the 4 x 10 intervention frames
    assert s["timing"]["train_ms"] > 0

    # An operator relabels a rollout; then the learner restarts: it resumes from its checkpoint
    # (step 30), rebuilds the index from the store and applies the label.
    redis_client.xadd(config.LABEL_STREAM, {"episode_id": "roll-0", "outcome": "success", "by": "op"})
    handle = start_learner(store.uri, redis_server.url, "hg-dagger", str(tmp_path / "init"), max_steps=40, **opts)
    assert handle.wait(300)
    final = handle.stop()
    assert final["step"] == 40 and final["rebuild"]["indexed"] == 12 and final["consumer"]["indexed"] == 0
    assert final["labels"]["applied"] == 1
    versions = registry.list_versions()
    assert [v["learner_step"] for v in versions][-1] == 40
    assert registry.manifest(versions[-1]["version"]).parent_version == versions[-2]["version"]
