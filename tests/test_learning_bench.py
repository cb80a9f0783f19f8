"""The learning suite, `fleetloop bench learning`, and the demo/eval defects of issue 15: eval
--policy on versions and learner checkpoints, demo --init, robot errors, EGL per thread,
time to 0.8. Tiny step counts: these check wiring and shapes, not learning."""
from __future__ import annotations

import argparse
import json
import threading

import numpy as np
import pytest
import torch

from fleetloop.actor.sim.evaluate import EVAL_SEED, PolicySpecError, load_policy
from fleetloop.actor.sim.tasks import SUITE_DEMOS, SUITE_TASKS, TASKS, parse_task_list
from fleetloop.buffer.store import open_store
from fleetloop.policy.backend import build_model, export_version, save_checkpoint

torch.set_num_threads(1)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    net = build_model("tiny", size="tiny", state_dim=39, action_dim=4, horizon=8, use_images=False)
    d = save_checkpoint(net, tmp_path / "ckpt", extra={"version": "pretrain", "tasks": ["reach-v3", "push-v3"]})
    return net, d


def _obs_act(policy):
    from fleetloop.policy.interface import Observation
    obs = Observation(images={}, state=np.zeros(39, np.float32))
    return np.asarray(policy.act(obs, TASKS["reach-v3"].instruction))


# ---- the suite ----------------------------------------------------------------------------------

def test_suite_has_ten_tasks_with_recipe_and_hard_ones():
    assert len(SUITE_TASKS) == 10 and set(SUITE_TASKS) == set(SUITE_DEMOS)
    assert parse_task_list("suite") == list(SUITE_TASKS)
    assert {"peg-insert-side-v3", "assembly-v3", "pick-place-wall-v3"} <= set(SUITE_TASKS)
    assert all(t in TASKS and SUITE_DEMOS[t] >= 1 for t in SUITE_TASKS)


def test_new_tasks_have_working_experts():
    from fleetloop.actor.sim.env import SimEnv
    from fleetloop.actor.sim.expert import ScriptedExpert
    for task in ("assembly-v3", "hammer-v3"):
        with SimEnv(task) as env:
            ex = ScriptedExpert(task)
            obs, done = env.reset(0), False
            while not done:
                obs, _, done = env.step(ex.action(obs.state))
            assert env.success, task


def test_bench_seeds_are_disjoint_from_evaluation():
    from fleetloop.bench.learning import demo_seeds, online_seed
    for seed in range(5):
        used = demo_seeds(seed, max(SUITE_DEMOS.values())) + [online_seed(seed, r) for r in range(1000)]
        assert max(used) < EVAL_SEED


def test_learner_steps_scale_with_the_trained_tasks():
    """The update-to-data ratio is per online episode: ten trained tasks get ten times the steps
    of one after a round; --steps-per-round still overrides."""
    from fleetloop.bench import learning
    p = argparse.ArgumentParser()
    learning.add_arguments(p)
    args = p.parse_args([])
    assert learning.steps_per_round(args, 1) == args.steps_per_episode
    assert learning.steps_per_round(args, 10) == 10 * args.steps_per_episode
    assert learning.steps_per_round(p.parse_args(["--steps-per-round", "7"]), 10) == 7


def test_change_interval_contains_the_difference():
    from fleetloop.bench.learning import change, rate
    c = change(rate(10, 30), rate(25, 30))
    assert c["diff"] == pytest.approx(0.5, abs=1e-3) and c["ci95"][0] < 0.5 < c["ci95"][1] and c["ci95"][0] > 0
    same = change(rate(10, 30), rate(10, 30))
    assert same["ci95"][0] < 0 < same["ci95"][1]


def test_bench_learning_json_shape(tmp_path, capsys):
    from fleetloop.bench import learning
    p = argparse.ArgumentParser()
    learning.add_arguments(p)
    assert "peg-insert-side-v3" in p.format_help()
    args = p.parse_args(["--tasks", "reach-v3,push-v3", "--train", "reach-v3", "--demos", "1", "--pretrain-steps", "3",
                         "--eval-episodes", "1", "--rounds", "1", "--steps-per-round", "2", "--batch-size", "16",
                         "--conditions", "trained-only,offline-all,l2", "--out", str(tmp_path), "--json"])
    assert learning.run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["trained"] == ["reach-v3"] and doc["held_out"] == ["push-v3"]
    for task, row in doc["per_task"].items():
        assert row["held_out"] == (task == "push-v3")
        for k in ("pretrained", "after", "expert"):  # expert: the teacher's ceiling on the same scenes
            assert set(row[k]) >= {"success_rate", "ci95"}
        assert set(row["by_condition"]) == {"trained-only", "offline-all", "l2"}
    run = doc["runs"][0]["conditions"]
    # the remedy's whole point: the held-out task's demonstrations stay in the sampler's mix
    assert "push-v3" in run["offline-all"]["eligible_frames"]
    assert "push-v3" not in run["trained-only"]["eligible_frames"]
    assert run["trained-only"]["online"]["reach-v3"]["episodes"] == 1
    assert "failed_without_takeover" in run["trained-only"]["online"]["reach-v3"]
    assert (tmp_path / "learning.json").exists()
    assert doc["plot"] == str(tmp_path / "learning.png")
    assert (tmp_path / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run["offline-all"]["online"]["reach-v3"]["success_by_round"] in ([0], [1])


def test_bench_learning_compares_algorithms(tmp_path, capsys):
    """--algos hg-dagger,recap: both from the same pretrained weights, per task `after` with a
    Wilson interval per algorithm; RECAP deploys and is evaluated with indicator positive."""
    from fleetloop.bench import learning
    p = argparse.ArgumentParser()
    learning.add_arguments(p)
    args = p.parse_args(["--tasks", "reach-v3,push-v3", "--train", "reach-v3,push-v3", "--demos", "1",
                         "--pretrain-steps", "3", "--eval-episodes", "1", "--rounds", "2", "--steps-per-round", "2",
                         "--batch-size", "16", "--conditions", "offline-all", "--algos", "hg-dagger,recap",
                         "--out", str(tmp_path), "--json"])
    assert learning.parse_algos(args) == ["hg-dagger", "recap"]
    assert learning.run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["algos"] == ["hg-dagger", "recap"] and set(doc["summary_by_algo"]) == {"hg-dagger", "recap"}
    for row in doc["per_task"].values():
        assert set(row["by_algo"]) == {"hg-dagger", "recap"}
        for a in ("hg-dagger", "recap"):
            assert set(row["by_algo"][a]["after"]) >= {"success_rate", "ci95"}
        assert row["after"] == row["by_algo"]["hg-dagger"]["after"]  # the single-algorithm keys: the first's
    by_algo = doc["runs"][0]["by_algo"]
    assert by_algo["recap"]["offline-all"]["deploy_indicator"] == "positive"
    assert by_algo["recap"]["offline-all"]["algo_stats"]["value_fitted"] is True
    assert by_algo["hg-dagger"]["offline-all"]["deploy_indicator"] == "none"
    assert by_algo["recap"]["offline-all"]["online"]["push-v3"]["episodes"] == 2
    p2 = argparse.ArgumentParser()
    learning.add_arguments(p2)
    assert learning.parse_algos(p2.parse_args(["--algo", "recap"])) == ["recap"]
    with pytest.raises(SystemExit):
        learning.parse_algos(p2.parse_args(["--algos", "hg-dagger,ppo"]))


# ---- fleetloop eval --policy --------------------------------------------------------------------

def test_eval_loads_checkpoint_dir_and_reports_bad_specs(checkpoint, tmp_path):
    net, d = checkpoint
    assert _obs_act(load_policy(str(d))).shape == (8, 4)
    with pytest.raises(PolicySpecError):
        load_policy(str(tmp_path), store_uri=(tmp_path / "s").as_uri())  # a dir with nothing loadable
    with pytest.raises(PolicySpecError):
        load_policy("not-a-version", store_uri=(tmp_path / "s").as_uri())
    with pytest.raises(PolicySpecError):
        load_policy("v000007", store_uri=(tmp_path / "s").as_uri())  # not published


def test_eval_loads_published_versions(checkpoint, tmp_path, redis_client):
    from fleetloop.release.registry import PolicyRegistry
    net, _ = checkpoint
    store_dir = tmp_path / "store"
    reg = PolicyRegistry(open_store(store_dir.as_uri()), redis_client)
    ev = export_version(net)
    v1 = reg.publish(ev.weights, ev.config_json)
    v1 = getattr(v1, "version", v1)
    want = _obs_act(load_policy(str(_d(checkpoint))))
    for spec, kw in ((v1, {"store_uri": store_dir.as_uri()}), ("latest", {"store_uri": store_dir.as_uri()}),
                     (f"policies/{v1}", {"store_uri": store_dir.as_uri()}),
                     (f"{store_dir.as_uri()}/policies/{v1}", {}), (str(store_dir / "policies" / v1), {})):
        p = load_policy(spec, **kw)
        assert p.version == v1
        np.testing.assert_allclose(_obs_act(p), want, atol=1e-5)


def _d(checkpoint):
    return checkpoint[1]


def test_eval_loads_learner_checkpoints(checkpoint, tmp_path):
    from fleetloop.learner.checkpoint import CheckpointStore
    net, _ = checkpoint
    store_dir = tmp_path / "store"
    CheckpointStore(open_store(store_dir.as_uri()), "learner/demo-hg-dagger").save(
        42, {"model": export_version(net).weights}, {})
    want = _obs_act(load_policy(str(_d(checkpoint))))
    for spec, kw in (("learner/demo-hg-dagger", {"store_uri": store_dir.as_uri()}),
                     (f"{store_dir.as_uri()}/learner/demo-hg-dagger", {}),
                     (str(store_dir / "learner" / "demo-hg-dagger"), {})):
        p = load_policy(spec, **kw)
        assert p.version.endswith("@step42")
        np.testing.assert_allclose(_obs_act(p), want, atol=1e-5)


def test_eval_cli_error_is_one_line(tmp_path, capsys):
    from fleetloop.actor.sim import evaluate
    p = argparse.ArgumentParser()
    evaluate.add_arguments(p)
    rc = evaluate.run(p.parse_args(["--policy", str(tmp_path), "--store", (tmp_path / "s").as_uri()]))
    assert rc == 2 and "fleetloop eval:" in capsys.readouterr().err


# ---- fleetloop demo ---------------------------------------------------------------------------------

def test_demo_init_keeps_offline_buffer_of_every_pretrained_task(checkpoint, tmp_path):
    from fleetloop import demo
    from fleetloop.policy.data import list_manifests
    _, d = checkpoint
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    store_uri = (tmp_path / "store").as_uri()
    args = p.parse_args(["--init", str(d), "--tasks", "reach-v3", "--demos-per-task", "1"])
    ckpt, pretrained = demo._initial_policy(store_uri, ["reach-v3"], args)
    assert ckpt == d.resolve() and pretrained == ["reach-v3", "push-v3"]
    keys = list_manifests(open_store(store_uri))
    assert any("push-v3" in k for k in keys) and any("reach-v3" in k for k in keys)
    args = p.parse_args(["--init", str(d), "--tasks", "reach-v3", "--demos-per-task", "1", "--offline-tasks",
                         "trained", "--out", str(tmp_path)])
    store2 = (tmp_path / "store2").as_uri()
    demo._initial_policy(store2, ["reach-v3"], args)
    assert not any("push-v3" in k for k in list_manifests(open_store(store2)))


def test_demo_presets_and_recipe():
    from fleetloop import demo
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--preset", "suite"])
    assert demo.demos_per_task(list(SUITE_TASKS), args) == SUITE_DEMOS
    args = p.parse_args(["--demos-per-task", "2"])
    assert demo.demos_per_task(["reach-v3"], args) == {"reach-v3": 2}


def test_a_robot_that_dies_is_an_error_not_silence():
    from fleetloop import demo

    class Boom:
        env = type("E", (), {"close": lambda self: None})()

        def run_episode(self, seed):
            raise RuntimeError("EGL_BAD_ACCESS in render")

    r = demo.Robot.__new__(demo.Robot)
    r.robot_id, r.tasks, r.sims, r.seed, r.error = "sim-09", ["reach-v3"], {}, 0, None
    r._make_sim = lambda task: Boom()
    import time
    t = threading.Thread(target=r.run_until, args=(time.time() + 30, threading.Event()))
    t.start()
    t.join(10)
    assert not t.is_alive() and "EGL_BAD_ACCESS" in r.error


def test_images_render_in_robot_threads():
    """Each robot thread builds its own envs, so every GL context is current on its own thread
    (envs built in one thread and rendered in another fail with EGL_BAD_ACCESS)."""
    from fleetloop.actor.sim.env import SimEnv
    errors = []

    def robot(task):
        try:
            with SimEnv(task, images=True) as env:
                obs = env.reset(1)
                env.step([0, 0, 0, 0])
                assert obs.images["front"].shape == (64, 64, 3)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=robot, args=(t,)) for t in ("reach-v3", "push-v3", "hammer-v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_time_to_08_counts_robot_success_when_most_episodes_have_a_nudge():
    from fleetloop import demo
    # 12 episodes of one task: all succeed, every one with a 5-step nudge out of 100 steps
    eps = [demo.mark_robot_success({"t": float(i), "task": "peg", "success": True, "steps": 100,
                                    "intervention_steps": 5, "autonomous_success": False}) for i in range(12)]
    t = demo.time_to_08({"peg": eps, "reach": [dict(e, task="reach", autonomous_success=True) for e in eps]})
    assert t["per_task"]["peg"]["robot_success_s"] == 9.0      # the 10th episode fills the window
    assert t["per_task"]["peg"]["autonomous_s"] is None        # never without any takeover
    assert t["fleet_robot_success_s"] == 9.0 and t["fleet_autonomous_s"] is None
    heavy = [demo.mark_robot_success(dict(e, intervention_steps=50)) for e in eps]
    assert demo.time_to_08({"peg": heavy})["per_task"]["peg"]["robot_success_s"] is None


def test_images_default_follows_the_machine(monkeypatch):
    """--images is on by default only where a CUDA GPU trains the policy; --images/--no-images
    decide explicitly."""
    import torch

    from fleetloop import demo
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    assert p.parse_args([]).images is None
    assert p.parse_args(["--images"]).images is True and p.parse_args(["--no-images"]).images is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.images_by_default() is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.images_by_default() is False


def test_bad_counts_are_clear_errors_before_any_work(tmp_path, capsys):
    """Negative or zero counts stop `bench learning` and `fleetloop eval` with a message naming
    the option, before anything is recorded or trained; a broker refuses a non-positive k."""
    from fleetloop.actor.sim import evaluate as ev
    from fleetloop.actor.sim.robot import ChunkBroker
    from fleetloop.bench import learning
    p = argparse.ArgumentParser()
    learning.add_arguments(p)
    for bad in (["--rounds", "0"], ["--steps-per-episode", "-1"], ["--steps-per-round", "-5"], ["--horizon", "0"]):
        with pytest.raises(SystemExit, match=bad[0]):
            learning.bench(p.parse_args(bad + ["--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()
    pe = argparse.ArgumentParser()
    ev.add_arguments(pe)
    assert ev.run(pe.parse_args(["--policy", "expert", "--execute-steps", "-1"])) == 2
    assert "--execute-steps must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="execute_steps"):
        ChunkBroker(policy=None, execute_steps=0)
