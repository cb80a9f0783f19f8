"""RECAP's guidance reaches the robots: the learner publishes the indicator and guidance beta its
algorithm trains for in each version's signed manifest, the robot's loader builds its runtime
with them (a robot's setting may override), the runtime samples with them, and the heartbeat
says what runs. Real Redis, store, Ray learner, actor daemon and robot link; nothing mocked."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fleetloop import config
from fleetloop.actor.weights import PolicySlot
from fleetloop.buffer.codec import commit_episode, encode_chunk
from fleetloop.buffer.store import open_store
from fleetloop.policy.backend import export_version, save_checkpoint
from fleetloop.release.guidance import Guidance
from fleetloop.policy.interface import Observation
from fleetloop.policy.model import ModelConfig, VLAPolicyNet
from fleetloop.release.registry import PolicyRegistry, manifest_key
from fleetloop.release.runtime import PolicyLoader
from fleetloop.proto.v1 import episode_pb2 as pb

INSTRUCTION = "do a"


def tiny_net() -> VLAPolicyNet:
    torch.manual_seed(0)
    return VLAPolicyNet(ModelConfig.preset("tiny", use_images=False))


def observation(net, seed: int = 3) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(images={}, state=rng.standard_normal(net.spec.state_dim).astype(np.float32))


def sampled(runtime, obs: Observation, indicator: int, beta: float) -> np.ndarray:
    """What the runtime's model samples for obs with this indicator code and beta (the reference
    the robot's output is compared with)."""
    model = runtime.model
    inputs = {"state": torch.tensor(obs.state).unsqueeze(0),
              "lang": torch.from_numpy(np.array(model.featurize_instruction(INSTRUCTION))).unsqueeze(0),
              "indicator": torch.tensor([indicator])}
    with torch.inference_mode():
        return model.sample_actions(inputs, beta=beta)[0].numpy()


def publish(registry: PolicyRegistry, net, guidance) -> str:
    v = export_version(net)
    return registry.publish(v.weights, v.config_json, backend=v.backend, algorithm="recap", guidance=guidance).version


# ---- the weight path, without a learner --------------------------------------------------------

def test_published_guidance_is_signed_loaded_and_overridable(redis_client, tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    registry = PolicyRegistry(store, redis_client)
    net = tiny_net()
    version = publish(registry, net, Guidance(indicator=True, beta=2.0))
    assert registry.list_versions()[-1]["guidance"] == {"indicator": "positive", "beta": 2.0, "overridden": []}

    slot = PolicySlot(PolicyRegistry(store, redis_client), "r0", PolicyLoader())
    assert slot.sync_once() == version
    runtime, _ = slot.begin_episode()
    assert runtime.guidance == Guidance(indicator=True, beta=2.0)
    assert slot.status()["last_load"]["guidance"]["beta"] == 2.0
    obs = observation(net)
    guided = runtime.act(obs, INSTRUCTION)  # no indicator from the caller: the version's own
    assert np.array_equal(guided, sampled(runtime, obs, 2, 2.0))
    assert not np.allclose(guided, sampled(runtime, obs, 0, 1.0))

    # A robot's override: the loader replaces what it is told to, and says so.
    overridden = PolicySlot(PolicyRegistry(store, redis_client), "r1", PolicyLoader(indicator="unset", beta=1.0))
    overridden.sync_once()
    plain, _ = overridden.begin_episode()
    assert plain.guidance == Guidance() and plain.guidance.overridden == ("indicator", "beta")
    assert np.array_equal(plain.act(obs, INSTRUCTION), sampled(plain, obs, 0, 1.0))

    # The settings are signed with the manifest: changed in the store, the version is refused.
    doc = json.loads(store.get(manifest_key(version)))
    doc["inference"]["guidance_beta"] = 9.0
    store.put(manifest_key(version), json.dumps(doc).encode())
    fresh = PolicySlot(PolicyRegistry(store, redis_client), "r2", PolicyLoader())
    assert fresh.sync_once() is None and "signature" in fresh.status()["last_error"].lower()


def test_out_of_range_guidance_refuses_the_version(redis_client, tmp_path):
    """A (signed) version whose beta is absurd is refused with a clear error; the robot keeps what it runs."""
    from fleetloop.proto.v1 import policy_pb2 as ppb

    class Absurd:  # what a buggy learner could write; Guidance itself refuses to hold it
        def to_proto(self):
            return ppb.InferenceSettings(indicator=ppb.IMPROVEMENT_INDICATOR_POSITIVE, guidance_beta=float("nan"))

    store = open_store((tmp_path / "store").as_uri())
    registry = PolicyRegistry(store, redis_client)
    net = tiny_net()
    good = publish(registry, net, Guidance(indicator=True, beta=1.5))
    slot = PolicySlot(PolicyRegistry(store, redis_client), "r0", PolicyLoader())
    assert slot.sync_once() == good
    slot.begin_episode()
    bad = publish(registry, net, Absurd())
    assert slot.sync_once() is None
    assert f"policy {bad} not loaded" in slot.status()["last_error"]
    assert "guidance beta" in slot.status()["last_error"]
    _, running = slot.begin_episode()
    assert running == good
    with pytest.raises(ValueError, match="out of range"):
        Guidance(beta=-1.0)


def test_actor_settings_parse_and_refuse(tmp_path):
    from fleetloop.actor.config import ConfigError, load_actor_config
    base = {"FLEETLOOP_ROBOT_ID": "r0", "FLEETLOOP_STORE": (tmp_path / "s").as_uri(),
            "FLEETLOOP_REDIS_URL": "redis://127.0.0.1:1", "FLEETLOOP_SPOOL_DIR": str(tmp_path / "spool")}
    cfg = load_actor_config(None, env=base)
    assert (cfg.policy_indicator, cfg.policy_guidance_beta) == ("published", None)
    toml = tmp_path / "actor.toml"
    toml.write_text('[policy]\nindicator = "negative"\nguidance_beta = 2.5\n')
    cfg = load_actor_config(toml, env=base)
    assert (cfg.policy_indicator, cfg.policy_guidance_beta) == ("negative", 2.5)
    cfg = load_actor_config(toml, env={**base, "FLEETLOOP_POLICY_INDICATOR": "published",
                                       "FLEETLOOP_POLICY_GUIDANCE_BETA": "published"})
    assert (cfg.policy_indicator, cfg.policy_guidance_beta) == ("published", None)
    with pytest.raises(ConfigError) as e:
        load_actor_config(None, env={**base, "FLEETLOOP_POLICY_INDICATOR": "postive",
                                     "FLEETLOOP_POLICY_GUIDANCE_BETA": "inf"})
    assert len(e.value.errors) == 2 and "accepted" in e.value.errors[0] and "0 to 10" in e.value.errors[1]


def test_actor_help_documents_the_settings(capsys):
    from fleetloop.cli import main
    with pytest.raises(SystemExit):
        main(["actor", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--indicator {published,unset,negative,positive}" in out and "--guidance-beta" in out
    assert "FLEETLOOP_POLICY_INDICATOR" in out and "FLEETLOOP_POLICY_GUIDANCE_BETA" in out


# ---- the whole path: the learner publishes, a real daemon runs it --------------------------------

def write_episode(store, eid: str, steps: int, seed: int, state_dim: int, action_dim: int, outcome: int) -> str:
    rng = np.random.default_rng(seed)
    st = rng.standard_normal((steps, state_dim)).astype(np.float32)
    act = np.tanh(st[:, :action_dim])
    msgs = [pb.Step(index=t, state=st[t], action=act[t]) for t in range(steps)]
    m = pb.EpisodeManifest(episode_id=eid, robot_id="teleop", task_id="a", instruction=INSTRUCTION,
                           kind=pb.EPISODE_KIND_DEMONSTRATION, outcome=outcome, num_steps=steps,
                           action_dim=action_dim, state_dim=state_dim)
    return commit_episode(store, m, [(encode_chunk(eid, 0, msgs), steps)])


def heartbeat(client, robot_id: str) -> dict:
    return json.loads(client.hget(config.HEARTBEAT_PREFIX + robot_id, "status"))


@pytest.mark.timeout(400)
def test_recap_guidance_published_by_the_learner_runs_on_a_daemon(ray_cluster, redis_server, redis_client,
                                                                   tmp_path):
    import redis as redis_lib

    from fleetloop.actor.config import load_actor_config
    from fleetloop.actor.daemon import ActorDaemon, build_daemon_from_config
    from fleetloop.actor.link import RobotLinkClient
    from fleetloop.actor.spool import Spool
    from fleetloop.learner.app import start_learner

    store = open_store((tmp_path / "store").as_uri())
    net = tiny_net()
    S, A = net.spec.state_dim, net.spec.action_dim
    for k in range(6):
        write_episode(store, f"demo-{k}", 30, k, S, A, pb.OUTCOME_SUCCESS if k % 2 else pb.OUTCOME_FAILURE)
    save_checkpoint(net, tmp_path / "init")
    # beta 2.5, not RECAP's default: the number must come from the learner's algorithm
    handle = start_learner(store.uri, redis_server.url, "recap", str(tmp_path / "init"), max_steps=10,
                           publish_every=5, checkpoint_every=10, batch_size=32, stats_interval_s=0.2,
                           storage_path=str(tmp_path / "ray"),
                           algo_options={"value_pretrain_steps": 20, "n_step": 5, "beta": 2.5})
    assert handle.wait(300), "learner did not finish"
    assert handle.stop()["step"] == 10 and handle.error is None
    registry = PolicyRegistry(store, redis_client)
    latest = registry.latest_version()
    manifest = registry.manifest(latest)
    assert manifest.algorithm == "recap" and Guidance.from_manifest(manifest) == Guidance(True, 2.5)

    client = redis_lib.Redis.from_url(redis_server.url)
    slot = PolicySlot(PolicyRegistry(store, client), "robot-0", PolicyLoader(), poll_interval_s=0.5)
    daemon = ActorDaemon("robot-0", store, client, Spool(tmp_path / "spool"), slot, grpc_address="127.0.0.1:0",
                         inference="sync").start()
    link = RobotLinkClient(daemon.address, "robot-0", timeout_s=60.0)
    obs = observation(net)
    try:
        assert slot.wait_ready(latest, timeout=60), slot.status()
        link.start_episode("a", INSTRUCTION)
        assert link.policy_version == latest
        chunk = link.act(obs)  # computed by the daemon on this observation (sync inference)
        daemon.heartbeat()
        beat = heartbeat(redis_client, "robot-0")
        runtime = slot.current_policy
        link.report_step(obs, chunk[0], intervention=False)
        link.end_episode(pb.OUTCOME_SUCCESS)
    finally:
        link.close()
        daemon.stop()
    assert beat["policy_version"] == latest
    assert beat["guidance"] == {"indicator": "positive", "beta": 2.5, "overridden": []}
    assert runtime.guidance == Guidance(indicator=True, beta=2.5)
    # The robot's actions are the model's sample with indicator positive and beta 2.5 -- not the
    # plain conditional policy, nor the unconditional one.
    assert np.allclose(chunk, sampled(runtime, obs, 2, 2.5), atol=1e-6)
    assert not np.allclose(chunk, sampled(runtime, obs, 2, 1.0), atol=1e-3)
    assert not np.allclose(chunk, sampled(runtime, obs, 0, 1.0), atol=1e-3)

    # `fleetloop actor` with an override in its environment runs the same version unguided, and its
    # heartbeat says which settings it replaced.
    env = {"FLEETLOOP_ROBOT_ID": "robot-1", "FLEETLOOP_STORE": store.uri, "FLEETLOOP_REDIS_URL": redis_server.url,
           "FLEETLOOP_SPOOL_DIR": str(tmp_path / "spool1"), "FLEETLOOP_GRPC_ADDRESS": "127.0.0.1:0",
           "FLEETLOOP_POLICY_DEVICE": "cpu", "FLEETLOOP_INFERENCE": "sync", "FLEETLOOP_POLICY_GUIDANCE_BETA": "1"}
    other = build_daemon_from_config(load_actor_config(None, env=env)).start()
    link = RobotLinkClient(other.address, "robot-1", timeout_s=60.0)
    try:
        assert other.policy_source.wait_ready(latest, timeout=60)
        link.start_episode("a", INSTRUCTION)
        plain = link.act(obs)
        other.heartbeat()
        beat = heartbeat(redis_client, "robot-1")
        link.end_episode(pb.OUTCOME_SUCCESS)
    finally:
        link.close()
        other.stop()
    assert beat["guidance"] == {"indicator": "positive", "beta": 1.0, "overridden": ["beta"]}
    assert np.allclose(plain, sampled(runtime, obs, 2, 1.0), atol=1e-6)


def test_eval_runs_a_published_version_as_the_robots_do(redis_client, tmp_path):
    """`fleetloop eval --policy vNNNNNN` uses the version's published guidance; --indicator /
    --beta override it."""
    from fleetloop.actor.sim.evaluate import load_policy
    store = open_store((tmp_path / "store").as_uri())
    version = publish(PolicyRegistry(store, redis_client), tiny_net(), Guidance(indicator=True, beta=2.0))
    assert load_policy(version, store_uri=store.uri).guidance == Guidance(indicator=True, beta=2.0)
    assert load_policy(version, beta=1.0, store_uri=store.uri, indicator="unset").guidance == Guidance()
