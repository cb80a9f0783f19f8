"""`fleetloop bench learning`: does online post-training on some tasks keep the others?

    fleetloop bench learning --json                                   # the suite, defaults
    fleetloop bench learning --train reach-v3,push-v3,pick-place-v3 --seeds 0,1 --json
    fleetloop bench learning --pretrain-only --json                   # the pretraining recipe alone

Per benchmark seed s:
  1. offline buffer: the suite's expert demonstrations (per-task counts: tasks.SUITE_DEMOS, or
     --demos), scene seeds s*10000 + 0..n-1 (disjoint from evaluation's 1,000,000+);
  2. pretraining: behaviour cloning on all suite tasks (`fleetloop pretrain`, cached per seed);
  3. "pretrained": evaluate on every task, --eval-episodes episodes on the fixed evaluation seeds;
  4. per condition, from the same pretrained weights: online HG-DAgger post-training on the
     --train subset only -- rounds of one episode per trained task (the current weights on a
     simulated robot, the simulated human taking over per the --gate style, "attentive" by
     default), each followed by --steps-per-episode learner steps per episode of the round; the
     learner is fleetloop's own (buffer.sampler's
     task-balanced adaptive sampler, the HG-DAgger algorithm, learner.core.LearnerCore), in this
     process and in lock-step instead of over Ray/Redis/gRPC, so a run costs CPU for learning
     only and is deterministic for a seed;
  5. "after": every task again on the same evaluation seeds.
Once per run, "expert": the scripted expert (demonstrator and simulated human) on the same
evaluation seeds -- the teacher's ceiling. Every evaluation executes EXECUTE_STEPS actions of a
chunk before re-planning, as the robots do.

Conditions (--conditions):
  trained-only   the sampler's offline buffer holds the trained tasks' demonstrations only (what a
                 fleet whose store holds only its current tasks' data does: SOP's setup)
  offline-all    the offline buffer of every pretrained task stays in the mix (the default in
                 `fleetloop demo --init`): held-out tasks keep 1/M of each batch, offline-only
  l2             trained-only + an L2 pull of the weights toward the pretrained ones (--l2)

Per task it reports `pretrained` and `after` (success_rate, ci95 Wilson; successes pooled over
seeds -- every seed its own pretrained policy, the same evaluation scenes), `held_out`, and per
condition the change after - pretrained with Newcombe's 95% interval for a difference of two
proportions; per condition the held-out and trained tasks pooled, and the tasks at or above 0.95
and at the expert's level. learning.png (next to learning.json) plots it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("fleetloop.bench.learning")

CONDITIONS = ("trained-only", "offline-all", "l2")
ALGOS = ("hg-dagger", "recap")
DEFAULT_TRAIN = ("reach-v3", "push-v3", "pick-place-v3")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fleetloop.actor.sim.tasks import SUITE_DEMOS
    suite = ", ".join(f"{t} ({n} demos)" for t, n in SUITE_DEMOS.items())
    p.description = ("Held-out generality: pretrain on the suite, post-train online on a subset, evaluate every task "
                     f"before and after on the same seeds. The suite: {suite}.")
    p.add_argument("--tasks", default="suite", help="tasks pretrained on ('suite': the 10-task suite above)")
    p.add_argument("--train", default=",".join(DEFAULT_TRAIN), help="the subset post-trained online")
    p.add_argument("--demos", default="suite",
                   help="demonstrations per task: 'suite' (the recipe above), N, or task=N,... over the recipe")
    p.add_argument("--seeds", default="0", help="benchmark seeds, comma-separated (demos, init, online scenes)")
    p.add_argument("--conditions", default="trained-only,offline-all", help=f"of {', '.join(CONDITIONS)}")
    p.add_argument("--algo", default=None, choices=ALGOS, help="the online algorithm (default hg-dagger)")
    p.add_argument("--algos", default=None,
                   help="several, comma-separated (e.g. hg-dagger,recap): each from the same pretrained weights, "
                        "same budget, same evaluation scenes")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--size", default="tiny", help="tiny backend size preset")
    p.add_argument("--horizon", type=int, default=8, help="H: actions per predicted chunk (robots execute 4 of them)")
    p.add_argument("--images", action=argparse.BooleanOptionalAction, default=None,
                   help="camera images too (default: on with a CUDA GPU, off on a CPU-only machine: they cost "
                        "several times the CPU there; docs/learning.md, 'Images')")
    p.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes per task, before and after")
    p.add_argument("--rounds", type=int, default=20, help="online rounds (one episode per trained task each)")
    p.add_argument("--steps-per-episode", type=int, default=25,
                   help="learner steps per online episode (the update-to-data ratio; a round of M trained "
                        "tasks is followed by M times this many steps)")
    p.add_argument("--steps-per-round", type=int, default=None,
                   help="learner steps after each round, overriding --steps-per-episode")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--l2", type=float, default=1.0, help="l2 condition: weight of sum((theta - theta0)^2)")
    p.add_argument("--gate", default="attentive", choices=("attentive", "strict", "relaxed"),
                   help="the simulated human's takeover style (actor.sim.gating.GatingConfig.style)")
    p.add_argument("--autonomous", default="none", choices=("none", "success", "all"),
                   help="HG-DAgger: which robot-driven frames train besides the human's (see hg_dagger.py)")
    p.add_argument("--pretrain-only", action="store_true", help="stop after the pretrained evaluation")
    p.add_argument("--out", default="runs/bench-learning", help="work directory (store, checkpoints, JSON)")
    p.add_argument("--json", action="store_true", help="print the JSON only")


# ---- statistics ----------------------------------------------------------------------------------

def rate(successes: int, episodes: int) -> dict:
    from fleetloop.stats import wilson_interval
    lo, hi = wilson_interval(successes, episodes)
    return {"success_rate": round(successes / episodes, 4) if episodes else 0.0, "ci95": [round(lo, 4), round(hi, 4)],
            "successes": int(successes), "episodes": int(episodes)}


def change(before: dict, after: dict) -> dict:
    """after - before with Newcombe's hybrid Wilson 95% interval (independent proportions)."""
    p1, (l1, u1) = before["success_rate"], before["ci95"]
    p2, (l2, u2) = after["success_rate"], after["ci95"]
    d = p2 - p1
    return {"diff": round(d, 4), "ci95": [round(d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), 4),
                                          round(d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2), 4)]}


def parse_demos(text: str, tasks: list[str]) -> dict[str, int]:
    from fleetloop.actor.sim.tasks import SUITE_DEMOS, get_task
    base = {t: SUITE_DEMOS.get(t, 5) for t in tasks}
    if text in ("", "suite"):
        return base
    if text.isdigit():
        return {t: int(text) for t in tasks}
    for part in text.split(","):
        task, _, n = part.partition("=")
        get_task(task.strip())
        if task.strip() not in base or not n.strip().isdigit():
            raise SystemExit(f"--demos {part!r}: expected TASK=N for a task in --tasks")
        base[task.strip()] = int(n)
    return base


# ---- the pieces ----------------------------------------------------------------------------------

def demo_seeds(seed: int, n: int) -> list[int]:
    return [seed * 10_000 + i for i in range(n)]


def steps_per_round(args, trained_tasks: int) -> int:
    """Learner steps after a round of one episode per trained task. Per episode, not per round,
    so the update-to-data ratio does not shrink as tasks are added: at a fixed 50 per round, ten
    trained tasks got 5 steps per episode and the hard ones did not move (docs/learning.md)."""
    if args.steps_per_round is not None:
        return int(args.steps_per_round)
    return int(args.steps_per_episode) * max(1, trained_tasks)


def online_seed(seed: int, round_: int) -> int:
    return seed * 10_000 + 5_000 + round_


def pretrain_suite(store_uri: str, work: Path, demos: dict[str, int], seed: int, args) -> Path:
    """Collect the recipe's demonstrations and behaviour-clone on all of them (cached by settings)."""
    from fleetloop.actor.sim.collect import collect_task
    from fleetloop.policy import pretrain as pretrain_mod
    target = work / "pretrained"
    key = {"demos": demos, "seed": seed, "steps": args.pretrain_steps, "size": args.size, "images": args.images,
           "horizon": args.horizon}
    if (target / "model.safetensors").exists() and (target / "bench-key.json").exists() \
            and json.loads((target / "bench-key.json").read_text()) == key:
        return target
    for task, n in demos.items():
        collect_task(store_uri, task, demo_seeds(seed, n), images=args.images)
    parser = argparse.ArgumentParser()
    pretrain_mod.add_arguments(parser)
    argv = ["--store", store_uri, "--out", str(target), "--size", args.size, "--steps", str(args.pretrain_steps),
            "--horizon", str(args.horizon),
            "--seed", str(seed), "--threads", "1", "--log-every", str(max(1, args.pretrain_steps)),
            "--tasks", *demos]
    if not args.images:
        argv.append("--state-only")
    stdout, sys.stdout = sys.stdout, sys.stderr  # pretrain prints progress; keep stdout for the JSON
    try:
        pretrain_mod.pretrain(parser.parse_args(argv))
    finally:
        sys.stdout = stdout
    (target / "bench-key.json").write_text(json.dumps(key))
    return target


def evaluate_counts(policy, tasks: list[str], episodes: int, images: bool,
                    indicator=None) -> dict[str, tuple[int, int]]:
    from fleetloop.actor.sim.evaluate import evaluate
    return {r.task: (r.successes, r.episodes)
            for r in evaluate(policy, tasks, episodes, images=images, indicator=indicator)}


class L2Anchor:
    """An algorithm wrapper: the wrapped algorithm's loss + weight * sum((theta - theta0)^2)
    over the trainable parameters (L2-SP). Everything else (the data side) is the wrapped one's."""

    def __init__(self, algorithm, net, weight: float):
        self._algo, self.weight = algorithm, float(weight)
        self._anchor = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}

    def __getattr__(self, name):
        return getattr(self._algo, name)

    def loss(self, net, batch):
        loss, metrics = self._algo.loss(net, batch)
        reg = sum(((p - self._anchor[n]) ** 2).sum() for n, p in net.named_parameters() if n in self._anchor)
        return loss + self.weight * reg, dict(metrics, l2_to_pretrained=float(reg.detach()))


def deploy_settings(algo) -> tuple:
    """(indicator, beta) robots run a version with: RECAP's "advantage positive" with its guidance
    weight, as the algorithm publishes them (inference_settings); HG-DAgger none."""
    g = algo.inference_settings()
    return g.indicator, g.beta


def post_train(ckpt: Path, store, train: list[str], offline_tasks: list[str], seed: int, condition: str, args,
               algo_name: str = "hg-dagger"):
    """Online post-training (HG-DAgger or RECAP) on `train` from the checkpoint; returns
    (policy runtime, stats, (indicator, beta) to evaluate it with)."""
    import numpy as np

    from fleetloop.actor.sim.collect import StoreEpisodeWriter
    from fleetloop.actor.sim.env import SimEnv
    from fleetloop.actor.sim.expert import ScriptedExpert
    from fleetloop.actor.sim.gating import GatingConfig, SimTeleoperator
    from fleetloop.actor.sim.robot import EXECUTE_STEPS, SimRobot
    from fleetloop.buffer.codec import read_episode, read_manifest
    from fleetloop.buffer.index import FrameIndex, PayloadCache, entry_from_loaded
    from fleetloop.buffer.sampler import BufferSampler, SamplerConfig
    from fleetloop.learner.algorithms import make_algorithm
    from fleetloop.learner.core import CoreConfig, LearnerCore, LocalSource
    from fleetloop.policy.backend import export_version, instruction_featurizer, load_checkpoint
    from fleetloop.policy.data import list_manifests
    from fleetloop.release.runtime import PolicyRuntime
    from fleetloop.proto.v1 import episode_pb2 as pb

    import torch
    torch.manual_seed(seed)
    net = load_checkpoint(ckpt)
    spec = net.spec
    algo = make_algorithm(algo_name, **({"seed": seed} if algo_name == "recap"
                                        else {"autonomous": args.autonomous}))
    if algo_name == "recap":
        from fleetloop.policy.language import get_encoder
        algo.bind(get_encoder().encode)  # the value function's instruction embedding
    indicator, beta = deploy_settings(algo)
    index = FrameIndex()
    for key in list_manifests(store):
        m = read_manifest(store, key)
        if m.kind == pb.EPISODE_KIND_DEMONSTRATION and m.task_id in offline_tasks:
            index.add(entry_from_loaded(read_episode(store, key)))
    sampler = BufferSampler(index, SamplerConfig(horizon=spec.horizon, seed=seed), algo,
                            encode=instruction_featurizer(net.config_json()),
                            image_fn=PayloadCache(store).images if spec.cameras else None,
                            cameras=list(spec.cameras), image_size=spec.image_size)
    learner_algo = L2Anchor(algo, net, args.l2) if condition == "l2" else algo
    core = LearnerCore(net, LocalSource(sampler, args.batch_size), learner_algo,
                       CoreConfig(batch_size=args.batch_size, lr=args.lr))
    tag = condition if algo_name == "hg-dagger" else f"{algo_name}-{condition}"
    writer = StoreEpisodeWriter(store, robot_id=f"bench-{tag}-s{seed}", kind=pb.EPISODE_KIND_ROLLOUT,
                                labelled_by="metaworld-success")
    images = bool(spec.cameras)
    robots = {}
    for i, task in enumerate(train):
        teleop = SimTeleoperator(ScriptedExpert(task, seed=seed * 100 + i), GatingConfig.style(args.gate),
                                 seed=seed * 100 + i)
        env = SimEnv(task, images=images, image_size=spec.image_size, camera=list(spec.cameras) or "front")
        robots[task] = SimRobot(env, PolicyRuntime(net, version="init", beta=beta), teleop=teleop, callbacks=writer,
                                execute_steps=EXECUTE_STEPS, indicator=indicator)
    stats = {t: {"episodes": 0, "successes": 0, "with_intervention": 0, "intervention_steps": 0, "steps": 0,
                 "autonomous_successes": 0, "failed_without_takeover": 0, "success_by_round": []} for t in train}
    t0 = time.time()
    try:
        for r in range(args.rounds):
            version = f"v{r + 1:06d}"
            policy = PolicyRuntime.from_bytes(None, export_version(net, trained_only=False).weights, version, beta=beta)
            for task, robot in robots.items():
                robot.set_policy(policy)
                writer.episode_id = f"online-{tag}-s{seed}-{task}-r{r:04d}"
                res = robot.run_episode(online_seed(seed, r))
                index.add(entry_from_loaded(read_episode(store, writer.last_manifest_key)))
                s = stats[task]
                autonomous = bool(res.success and not res.segments)
                s["episodes"] += 1
                s["successes"] += int(res.success)
                s["autonomous_successes"] += int(autonomous)
                s["with_intervention"] += int(bool(res.segments))
                # a failure the gate never reacted to: no correction, so HG-DAgger learns nothing from it
                s["failed_without_takeover"] += int(not res.success and not res.segments)
                s["intervention_steps"] += res.intervention_steps
                s["steps"] += res.num_steps
                s["success_by_round"].append(int(autonomous))  # for the plot's curve
            sampler.set_learner_version(version)
            algo.refresh(index)  # RECAP: the value function (fitted once), advantages, thresholds; HG-DAgger: no-op
            for _ in range(steps_per_round(args, len(train))):
                core.train_step()
    finally:
        for robot in robots.values():
            robot.env.close()
    net.eval()
    final = PolicyRuntime.from_bytes(None, export_version(net, trained_only=False).weights, "post-trained", beta=beta)
    return final, {"algo": algo_name, "deploy_indicator": "positive" if indicator else "none", "deploy_beta": beta,
                   "learner_steps": core.step, "online_s": round(time.time() - t0, 1),
                   "online": stats, "final_loss": round(float(core.last_metrics.get("loss", float("nan"))), 4),
                   "eligible_frames": sampler.eligible_frames(),
                   **({"algo_stats": _jsonable(algo.stats())} if algo_name == "recap" else {})}, (indicator, beta)


def _jsonable(doc):
    return json.loads(json.dumps(doc, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ---- the benchmark ---------------------------------------------------------------------------------

def parse_algos(args) -> list[str]:
    names = [a.strip() for a in (args.algos or args.algo or "hg-dagger").split(",") if a.strip()]
    for a in names:
        if a not in ALGOS:
            raise SystemExit(f"unknown algorithm {a!r}: choose from {', '.join(ALGOS)}")
    return list(dict.fromkeys(names))


def bench(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)
    from fleetloop.actor.sim.tasks import parse_task_list
    from fleetloop.buffer.store import open_store
    from fleetloop.release.runtime import PolicyRuntime

    tasks = parse_task_list(args.tasks)
    train = parse_task_list(args.train) if args.train else []
    for name in ("rounds", "eval_episodes", "horizon", "batch_size", "pretrain_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("steps_per_episode", "steps_per_round"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.images is None:
        from fleetloop.demo import images_by_default
        args.images = images_by_default()
    if not set(train) <= set(tasks):
        raise SystemExit(f"--train {train} must be a subset of --tasks {tasks}")
    held = [t for t in tasks if t not in train]
    conditions = [] if args.pretrain_only else [c.strip() for c in args.conditions.split(",") if c.strip()]
    for c in conditions:
        if c not in CONDITIONS:
            raise SystemExit(f"unknown condition {c!r}: choose from {', '.join(CONDITIONS)}")
    algos = parse_algos(args)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    demos = parse_demos(args.demos, tasks)
    out = Path(args.out).resolve()
    started = time.time()
    # The teacher's ceiling: the scripted expert (the demonstrator and the simulated human) on the
    # same evaluation scenes. A student that imitates it is not expected to beat it.
    from fleetloop.actor.sim.expert import ExpertPolicy
    expert = {k: rate(*v) for k, v in evaluate_counts(ExpertPolicy(), tasks, args.eval_episodes, False).items()}
    runs = []
    for seed in seeds:
        work = out / f"seed-{seed}"
        work.mkdir(parents=True, exist_ok=True)
        store_uri = (work / "store").as_uri()
        store = open_store(store_uri)
        t = time.time()
        ckpt = pretrain_suite(store_uri, work, demos, seed, args)
        pre_s = time.time() - t
        t = time.time()
        before = evaluate_counts(PolicyRuntime.from_checkpoint(ckpt, version="pretrained"), tasks,
                                 args.eval_episodes, args.images)
        run = {"seed": seed, "pretrain_s": round(pre_s, 1), "eval_s": round(time.time() - t, 1),
               "pretrained": {k: rate(*v) for k, v in before.items()}, "by_algo": {}}
        log.info("seed %d pretrained: %s", seed, {k: v["success_rate"] for k, v in run["pretrained"].items()})
        for algo in algos:
            run["by_algo"][algo] = {}
            for cond in conditions:
                offline = tasks if cond == "offline-all" else train
                policy, stats, (indicator, _beta) = post_train(ckpt, store, train, offline, seed, cond, args, algo)
                t = time.time()
                after = evaluate_counts(policy, tasks, args.eval_episodes, args.images, indicator=indicator)
                run["by_algo"][algo][cond] = dict(stats, eval_s=round(time.time() - t, 1),
                                                  after={k: rate(*v) for k, v in after.items()})
                log.info("seed %d %s %s after: %s", seed, algo, cond,
                         {k: v["success_rate"] for k, v in run["by_algo"][algo][cond]["after"].items()})
        run["conditions"] = run["by_algo"][algos[0]]  # the single-algorithm shape: the first one's
        runs.append(run)
    return summarise(args, tasks, train, held, demos, seeds, conditions, runs, time.time() - started, algos,
                     expert=expert)


def _pool(runs: list[dict], getter, tasks: list[str]) -> dict:
    s = sum(getter(r)[t]["successes"] for r in runs for t in tasks)
    n = sum(getter(r)[t]["episodes"] for r in runs for t in tasks)
    return rate(s, n)


def _after(algo: str, cond: str):
    return lambda r: r["by_algo"][algo][cond]["after"]


def summarise(args, tasks, train, held, demos, seeds, conditions, runs, wall_s, algos=("hg-dagger",),
              expert: dict | None = None) -> dict:
    algos = list(algos)
    expert = expert or {}
    default = "offline-all" if "offline-all" in conditions else (conditions[0] if conditions else None)
    per_task = {}
    for t in tasks:
        pre = _pool(runs, lambda r: r["pretrained"], [t])
        row = {"held_out": t in held, "demos": demos[t], "pretrained": pre, "expert": expert.get(t),
               "pretrained_per_seed": [r["pretrained"][t]["success_rate"] for r in runs]}
        if conditions:
            row["by_algo"] = {}
            for algo in algos:
                by_cond = {}
                for c in conditions:
                    a = _pool(runs, _after(algo, c), [t])
                    by_cond[c] = {"after": a, "change": change(pre, a),
                                  "worse_than_pretrained_interval": a["success_rate"] < pre["ci95"][0],
                                  "clear_of_pretrained_interval": a["ci95"][0] > pre["ci95"][1],
                                  # at the teacher's level: not below the expert's interval
                                  "at_expert_level": (t in expert and a["success_rate"] >= expert[t]["ci95"][0]),
                                  "after_per_seed": [r["by_algo"][algo][c]["after"][t]["success_rate"] for r in runs]}
                row["by_algo"][algo] = {"after": by_cond[default]["after"], "change": by_cond[default]["change"],
                                        "by_condition": by_cond}
            # the single-algorithm shape: `after` and `by_condition` are the first algorithm's
            row["after"] = row["by_algo"][algos[0]]["after"]
            row["by_condition"] = row["by_algo"][algos[0]]["by_condition"]
        per_task[t] = row
    summary_by_algo = {}
    for algo in algos:
        summary = {}
        for c in conditions:
            doc = {}
            for name, group in (("held_out", held), ("trained", train)):
                if not group:
                    continue
                pre = _pool(runs, lambda r: r["pretrained"], group)
                a = _pool(runs, _after(algo, c), group)
                doc[name] = {"pretrained": pre, "after": a, "change": change(pre, a)}
            doc["held_out_worse_than_pretrained_interval"] = [
                t for t in held if per_task[t]["by_algo"][algo]["by_condition"][c]["worse_than_pretrained_interval"]]
            doc["tasks_at_or_above_0_95"] = [t for t in tasks
                                             if per_task[t]["by_algo"][algo]["by_condition"][c]["after"]["success_rate"] >= 0.95]
            doc["tasks_at_expert_level"] = [t for t in tasks
                                            if per_task[t]["by_algo"][algo]["by_condition"][c]["at_expert_level"]]
            summary[c] = doc
        summary_by_algo[algo] = summary
    settings = {k: v for k, v in vars(args).items() if k not in ("json",)}
    return {"benchmark": "learning", "tasks": tasks, "trained": train, "held_out": held, "seeds": seeds,
            "algos": algos, "algo": algos[0],
            "conditions": conditions, "after_is": default, "eval_episodes_per_task_per_seed": args.eval_episodes,
            "online_episodes_per_trained_task": args.rounds, "learner_steps": args.rounds * steps_per_round(args, len(train)),
            "per_task": per_task, "summary": summary_by_algo[algos[0]] if conditions else {},
            "summary_by_algo": summary_by_algo, "wall_s": round(wall_s, 1), "settings": settings,
            "runs": runs}


CURVE_WINDOW = 5  # rounds in the plot's rolling online success


def plot(result: dict, path: Path) -> None:
    """learning.png: left, per task the pretrained, post-trained (per algorithm, the default
    condition) and expert success with Wilson 95% intervals; right, per trained task the online
    autonomous success (no takeover) over rounds, rolling over CURVE_WINDOW rounds and pooled
    over seeds, with its Wilson band -- success over time (in rounds) for the first algorithm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fleetloop.stats import wilson_interval
    tasks, algos, cond = result["tasks"], result["algos"], result["after_is"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    series = [("pretrained", lambda row: row["pretrained"])]
    conds = result["conditions"]
    for a in algos:
        for c in conds:
            label = f"{a} after" + (f" ({c})" if len(conds) > 1 else "")
            series.append((label, (lambda a, c: lambda row: row["by_algo"][a]["by_condition"][c]["after"])(a, c)))
    width = 0.8 / (len(series) + 1)
    x = np.arange(len(tasks))
    for k, (label, get) in enumerate(series + [("expert", lambda row: row.get("expert"))]):
        vals = [get(result["per_task"][t]) for t in tasks]
        if any(v is None for v in vals):
            continue
        y = np.array([v["success_rate"] for v in vals])
        err = np.array([[v["success_rate"] - v["ci95"][0] for v in vals], [v["ci95"][1] - v["success_rate"] for v in vals]])
        ax1.bar(x + (k - len(series) / 2) * width, y, width, yerr=err, capsize=2, label=label,
                color="lightgrey" if label == "expert" else None, edgecolor="grey" if label == "expert" else None)
    ax1.axhline(0.95, ls=":", color="grey", lw=1)
    ax1.set_xticks(x, [t.replace("-v3", "") for t in tasks], rotation=35, ha="right", fontsize=8)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("success (Wilson 95%)")
    ax1.set_title(f"{len(result['seeds'])} seed(s) x {result['eval_episodes_per_task_per_seed']} episodes per task")
    ax1.legend(fontsize=7, loc="lower right")
    drawn = 0
    if cond and result["runs"]:
        algo = algos[0]
        for t in result["trained"]:
            per_seed = [r["by_algo"][algo][cond]["online"][t].get("success_by_round") for r in result["runs"]]
            if not per_seed or any(not s for s in per_seed):
                continue
            n_rounds = min(len(s) for s in per_seed)
            xs, ys, lo, hi = [], [], [], []
            for i in range(n_rounds):
                w = [s[j] for s in per_seed for j in range(max(0, i - CURVE_WINDOW + 1), i + 1)]
                a, b = wilson_interval(sum(w), len(w))
                xs.append(i + 1)
                ys.append(sum(w) / len(w))
                lo.append(a)
                hi.append(b)
            line, = ax2.plot(xs, ys, label=t.replace("-v3", ""), lw=1.2)
            ax2.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.08)
            drawn += 1
        ax2.set_xlabel("online round (one episode per trained task)")
        ax2.set_ylabel(f"autonomous success, rolling {CURVE_WINDOW} rounds")
        ax2.set_ylim(0, 1.05)
        ax2.set_title(f"online, {algo}, {cond}")
    if drawn:
        ax2.legend(fontsize=6, ncol=2, loc="lower right")
    else:
        ax2.text(0.5, 0.5, "no online rounds recorded", ha="center", va="center", transform=ax2.transAxes)
    fig.suptitle("fleetloop bench learning", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    if not args.json:
        logging.basicConfig(level=logging.INFO)
    result = bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "learning.png"
    plot(result, png)
    result["plot"] = str(png)
    (out / "learning.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(json.dumps({t: {"held_out": v["held_out"], "pretrained": v["pretrained"]["success_rate"],
                              **({f"{a} {c}": x["after"]["success_rate"] for a, ba in v.get("by_algo", {}).items()
                                  for c, x in ba["by_condition"].items()})}
                          for t, v in result["per_task"].items()}, indent=1))
        print(json.dumps(result["summary_by_algo"], indent=1))
        print(f"wrote {out / 'learning.json'}")
    return 0
