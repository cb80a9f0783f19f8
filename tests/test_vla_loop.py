"""The whole loop with a real VLA backend (hf-vla: a Hugging Face VLM base + flow-matching action
expert, LoRA), for each supported family: pretrain -> publish (adapters + expert only, on a base
named by its digest) -> a real actor daemon acts over gRPC and swaps versions by overlaying
adapters on its one loaded base -> HG-DAgger and RECAP updates on the learner.

Tiny random bases of the real families are built locally (save_pretrained) and loaded through
transformers' own from_pretrained path; nothing is downloaded."""
from __future__ import annotations

import argparse
import time

import numpy as np
import pytest
import torch

from fleetloop.buffer.codec import commit_episode, encode_chunk, encode_image
from fleetloop.buffer.index import EpisodeEntry, FrameIndex
from fleetloop.buffer.sampler import OFFLINE, ONLINE, BufferSampler, SamplerConfig
from fleetloop.buffer.store import open_store
from fleetloop.learner.algorithms import make_algorithm
from fleetloop.learner.core import CoreConfig, LearnerCore, LocalSource
from fleetloop.policy.backend import build_model, export_version, load_checkpoint
from fleetloop.policy.interface import Observation
from fleetloop.release.runtime import PolicyLoader
from fleetloop.proto.v1 import episode_pb2 as pb

pytest.importorskip("transformers")
pytest.importorskip("peft")
S, A, H, IMG = 39, 4, 8, 64
FAMILIES = ["idefics3", "paligemma", "llava", "gemma3", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from fleetloop.policy.hf_vla.tiny import make_tiny_base
    root = tmp_path_factory.mktemp("bases")
    return {f: str(make_tiny_base(f, root / f)) for f in FAMILIES}


def vla(base: str, **settings):
    torch.manual_seed(0)
    return build_model("hf-vla", base_dir=base, state_dim=S, action_dim=A, horizon=H, cameras=["front"],
                       image_size=IMG, expert_layers=2, **settings)


def fake_encode(instruction: str) -> np.ndarray:  # RECAP's value function input (MiniLM in production)
    return np.random.default_rng(len(instruction)).standard_normal(384).astype(np.float32)


def synthetic_index(n_per_source: int = 3, steps: int = 24):
    """Episodes whose actions depend on the state and the image, with interventions and outcomes."""
    index, frames = FrameIndex(), {}
    rng = np.random.default_rng(0)
    for task in ("reach", "push"):
        for k, source in enumerate([OFFLINE] * n_per_source + [ONLINE] * n_per_source):
            eid = f"{task}-{k}"
            st = rng.standard_normal((steps, S)).astype(np.float32)
            iv = np.zeros(steps, bool)
            if source == ONLINE:
                iv[5:15] = True
            index.add(EpisodeEntry(episode_id=eid, manifest_key="", robot_id="r", task_id=task,
                                   instruction=f"{task} the object", policy_version="v000001" if source == ONLINE else "",
                                   source=source, outcome="success" if k % 2 else "failure", outcome_source="",
                                   incomplete=False, states=st, actions=np.tanh(st[:, :A]), intervention=iv,
                                   chunks=[], chunk_starts=np.zeros(1, np.int64), ended_ns=0))
            frames[eid] = rng.integers(0, 256, (steps, IMG, IMG, 3), np.uint8)
    return index, (lambda e, t: {"front": frames[e.episode_id][t]})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algo", ["hg-dagger", "recap"])
def test_learner_core_trains_the_vla(bases, family, algo):
    """What every Ray Train worker runs, on the VLA: the algorithm's labels and indicators reach
    the model, only adapters + expert move, and the published version rebuilds on a robot."""
    torch.set_num_threads(1)
    model = vla(bases[family])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    index, image_fn = synthetic_index()
    options = {"value_pretrain_steps": 30, "n_step": 5} if algo == "recap" else {}
    algorithm = make_algorithm(algo, **options)
    algorithm.bind(fake_encode)
    algorithm.refresh(index)
    sampler = BufferSampler(index, SamplerConfig(horizon=H), algorithm, encode=model.featurize_instruction,
                            image_fn=image_fn, cameras=["front"], image_size=IMG)
    batch = sampler.sample(16)
    assert batch.arrays["lang"].dtype == np.int64  # token ids, not an embedding
    if algo == "recap":
        assert set(np.unique(batch.arrays["indicator"])) & {1, 2}  # advantage labels reach the prompt
    held_out = {k: torch.from_numpy(np.array(v)) for k, v in sampler.sample(64).arrays.items()}

    def fixed_loss() -> float:  # same batch, same flow-matching noise and times
        torch.manual_seed(123)
        model.eval()
        with torch.no_grad():
            return model.loss(held_out)[0].item()

    before = fixed_loss()
    core = LearnerCore(model, LocalSource(sampler, 16), algorithm, CoreConfig(batch_size=16, lr=1e-3, warmup_steps=1))
    losses = [core.train_step()["loss"] for _ in range(15)]
    assert all(np.isfinite(losses))
    assert fixed_loss() < before
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen base weight {n} changed"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at 0: it trained

    v = export_version(model)
    assert v.backend == "hf-vla" and v.base_sha256 == model.config_dict()["base"]["sha256"]
    full = model.export_weights(trained_only=False)
    assert len(v.weights) < 0.5 * len(full)
    runtime = PolicyLoader()(v.config_json, v.weights, "v000002")
    obs = Observation(images={"front": np.zeros((IMG, IMG, 3), np.uint8)}, state=np.zeros(S, np.float32))
    chunk = runtime.act(obs, "reach the object", indicator=True if algo == "recap" else None)
    assert chunk.shape == (H, A) and np.all(np.abs(chunk) <= 1.0)


def test_loader_shares_one_base_across_versions(bases):
    """A robot loads the base once; a new version is its adapters, copied in at first use."""
    model = vla(bases["idefics3"])
    loader = PolicyLoader()
    v1 = export_version(model)
    r1 = loader(v1.config_json, v1.weights, "v1")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    v2 = export_version(model)
    r2 = loader(v2.config_json, v2.weights, "v2")
    assert r2.model is r1.model  # one backbone in memory
    obs = Observation(images={"front": np.full((IMG, IMG, 3), 90, np.uint8)}, state=np.ones(S, np.float32))
    torch.manual_seed(1)
    a2 = r2.act(obs, "push the object")
    torch.manual_seed(1)
    a1 = r1.act(obs, "push the object")  # switches back: v1's adapters are copied in again
    torch.manual_seed(1)
    assert np.array_equal(r2.act(obs, "push the object"), a2)
    assert not np.allclose(a1, a2)
    # Bad adapters never reach a swap: refused when loaded.
    from fleetloop.policy.backend import CheckpointError
    with pytest.raises(CheckpointError):
        loader(v2.config_json, b"\x00" * 100, "v3")


# ---- the whole loop on Ray, through a real daemon ----------------------------------------------

def write_demo(store, eid: str, task: str, steps: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    st = rng.standard_normal((steps, S)).astype(np.float32)
    act = np.tanh(st[:, :A])
    msgs = [pb.Step(index=t, state=st[t], action=act[t],
                    images=[encode_image(rng.integers(0, 256, (IMG, IMG, 3), np.uint8), "front")])
            for t in range(steps)]
    m = pb.EpisodeManifest(episode_id=eid, robot_id="teleop", task_id=task, instruction=f"{task} the object",
                           kind=pb.EPISODE_KIND_DEMONSTRATION, outcome=pb.OUTCOME_SUCCESS, num_steps=steps,
                           action_dim=A, state_dim=S, cameras=["front"])
    return commit_episode(store, m, [(encode_chunk(eid, 0, msgs), steps)])


def pretrain_vla(store_uri: str, base: str, out: str) -> None:
    from fleetloop.policy import pretrain as pretrain_mod
    parser = argparse.ArgumentParser()
    pretrain_mod.add_arguments(parser)
    pretrain_mod.pretrain(parser.parse_args([
        "--store", store_uri, "--out", out, "--backend", "hf-vla", "--base", base, "--steps", "8",
        "--batch-size", "8", "--threads", "1", "--set", "expert_layers=2", "--log-every", "4"]))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family,algo", [("idefics3", "hg-dagger"), ("paligemma", "recap"), ("llava", "hg-dagger"),
                                         ("gemma3", "recap"), ("qwen2_5_vl", "hg-dagger")])
def test_whole_loop_with_a_vla(ray_cluster, redis_server, redis_client, bases, tmp_path, family, algo):
    import redis as redis_lib

    from fleetloop.actor.daemon import ActorDaemon
    from fleetloop.actor.link import RobotLinkClient
    from fleetloop.actor.spool import Spool
    from fleetloop.actor.weights import PolicySlot
    from fleetloop.learner.app import start_learner
    from fleetloop.policy.hf_vla.base import base_digest
    from fleetloop.release.registry import PolicyRegistry

    store = open_store((tmp_path / "store").as_uri())
    for task in ("reach", "push"):
        for k in range(3):
            write_demo(store, f"demo-{task}-{k}", task, 20, k)
    pretrain_vla(store.uri, bases[family], str(tmp_path / "init"))
    assert load_checkpoint(tmp_path / "init").backend == "hf-vla"

    options = {"value_pretrain_steps": 30, "n_step": 5} if algo == "recap" else {}
    handle = start_learner(store.uri, redis_server.url, algo, str(tmp_path / "init"), max_steps=16,
                           publish_every=4, checkpoint_every=8, batch_size=8, stats_interval_s=0.2,
                           storage_path=str(tmp_path / "ray"), algo_options=options)
    registry = PolicyRegistry(store, redis_client)
    client = redis_lib.Redis.from_url(redis_server.url)
    slot = PolicySlot(PolicyRegistry(store, client), "robot-0", PolicyLoader(), poll_interval_s=0.5).start()
    daemon = ActorDaemon("robot-0", store, client, Spool(tmp_path / "spool"), slot,
                         grpc_address="127.0.0.1:0").start()
    link = RobotLinkClient(daemon.address, "robot-0", timeout_s=60.0)
    rng = np.random.default_rng(7)
    versions_run, models = [], set()
    try:
        assert slot.wait_ready(timeout=120), slot.status()
        deadline = time.monotonic() + 420
        episode = 0
        while time.monotonic() < deadline:
            link.start_episode("reach", "reach the object")
            versions_run.append(link.policy_version)
            for t in range(12):
                obs = Observation(images={"front": rng.integers(0, 256, (IMG, IMG, 3), np.uint8)},
                                  state=rng.standard_normal(S).astype(np.float32))
                action = link.act(obs)[0]
                assert action.shape == (A,) and np.all(np.abs(action) <= 1.0)
                link.report_step(obs, action, intervention=4 <= t < 9)  # a human corrects the middle
            link.end_episode(pb.OUTCOME_SUCCESS if episode % 2 else pb.OUTCOME_FAILURE)
            models.add(id(slot.current_policy.model))  # the model behind the runtime this episode used
            episode += 1
            if not handle.running and len(set(versions_run)) >= 3:
                break
            if not handle.running and episode > 40:
                break
        assert handle.wait(60), "learner did not finish"
        final = handle.stop()
    finally:
        link.close()
        daemon.stop()
    assert handle.error is None and final["status"] == "stopped" and final["step"] == 16
    assert final["consumer"]["indexed"] >= 1  # the robot's episodes reached the learner

    digest = base_digest(bases[family])
    listed = registry.list_versions()
    assert len(listed) >= 5  # the pretrained version + one every 4 steps
    manifests = [registry.manifest(v["version"]) for v in listed]
    assert {m.backend for m in manifests} == {"hf-vla"} and {m.base_sha256 for m in manifests} == {digest}
    assert [m.algorithm for m in manifests][1:] == [algo] * (len(manifests) - 1)
    # The robot ran several versions, swapping adapters on one loaded base.
    assert len(set(versions_run)) >= 2, versions_run
    status = slot.status()
    assert status["swaps"] >= 1 and status["errors"] == 0, status
    assert len(models) == 1
    # RECAP's published guidance is what the robot runs (indicator positive, beta 1.5)
    expected = {"indicator": "positive", "beta": 1.5} if algo == "recap" else {"indicator": "unset", "beta": 1.0}
    assert {k: daemon.status()["guidance"][k] for k in expected} == expected
    # An update moves only the adapters + expert: far less than the model.
    assert status["last_load"]["bytes_moved"] < 0.5 * len(load_checkpoint(tmp_path / "init").export_weights(False))
