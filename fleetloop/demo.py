"""`fleetloop demo`: the whole loop on one machine with embedded defaults.

  1. services: a private Redis (started and stopped here), a local-directory store, local Ray;
  2. offline data and the pretrained policy: expert demonstrations -> behaviour cloning (cached
     in the output directory, so a second run starts at step 3);
  3. "before": evaluate the pretrained policy on every demo task;
  4. the loop: the Ray learner + N actor daemons, each driven over its gRPC robot link by a
     simulated MetaWorld robot with a simulated human (HG-DAgger gating) + the dashboard;
  5. "after": evaluate the newest published version on the same evaluation seeds;
  6. DIR/results.json and DIR/success.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from fleetloop.stats import rolling_rate, time_to_success

log = logging.getLogger("fleetloop.demo")


# Presets: which tasks the robots run, and how many demonstrations per task pretraining gets.
PRESETS = {"demo": "demo", "suite": "suite"}
TIME_TO_WINDOW = 10  # episodes in the rolling success behind "time to 0.8" (table and plot alike)


def add_arguments(p) -> None:
    p.add_argument("--robots", type=int, default=4)
    p.add_argument("--algo", choices=["hg-dagger", "recap"], default="hg-dagger")
    p.add_argument("--minutes", type=float, default=5.0, help="wall time of online post-training")
    p.add_argument("--out", default="runs/demo", help="output directory (results.json, success.png, store)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated MetaWorld tasks the robots post-train on ('demo', 'suite'; default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="demo: reach/push/pick-place, 5 demonstrations each; suite: the 10-task learning suite with "
                        "its per-task demonstration recipe (fleetloop.actor.sim.tasks.SUITE_DEMOS)")
    p.add_argument("--demos-per-task", type=int, default=None,
                   help="offline demonstrations per task (default: the preset's; 5 for demo)")
    p.add_argument("--init", "--pretrained", dest="init", default=None, metavar="CHECKPOINT",
                   help="start from this pretrained policy (a checkpoint directory) instead of pretraining here")
    p.add_argument("--offline-tasks", choices=["pretrained", "trained"], default="pretrained",
                   help="whose demonstrations form the offline buffer the learner keeps mixing in: every task the "
                        "initial policy was pretrained on (default; keeps held-out tasks from being forgotten) or "
                        "only the post-trained --tasks")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--eval-episodes", type=int, default=30, help="evaluation episodes per task, before and after")
    p.add_argument("--images", action=argparse.BooleanOptionalAction, default=None,
                   help="give the policy the 64x64 camera too (default: on where a CUDA GPU trains the "
                        "policy, off on a CPU-only machine, where it costs several times the CPU: "
                        "docs/learning.md, 'Images')")
    p.add_argument("--size", default="tiny", help="tiny backend: model size preset")
    p.add_argument("--backend", default="tiny", choices=["tiny", "hf-vla"],
                   help="policy backend: fleetloop's tiny model, or a Hugging Face VLM + flow-matching expert "
                        "with LoRA (implies --images)")
    p.add_argument("--base", help="hf-vla: a local Hugging Face VLM directory (default: a tiny random model "
                                  "of --vla-family built in OUT/base, for a CPU run of the whole loop)")
    p.add_argument("--vla-family", default="idefics3",
                   help="hf-vla without --base: idefics3, paligemma, llava, gemma3 or qwen2_5_vl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hf-vla: a backend setting")
    p.add_argument("--publish-every", type=int, default=25, help="K: learner steps per published version")
    p.add_argument("--control-hz", type=float, default=None, help="pace each robot in real time (default: as fast as the CPU goes)")
    p.add_argument("--dashboard-port", type=int, default=8080, help="0: a free port; -1: no dashboard")
    p.add_argument("--seed", type=int, default=0)


def images_by_default() -> bool:
    """The camera is on by default where the budget allows it: a CUDA GPU to train the vision
    encoder on. On a CPU-only machine rendering and training on 64x64 frames cost several times
    the CPU of state + language (measured: docs/learning.md, 'Images'), so it is off there."""
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 -- no usable torch build: the CPU default
        return False


def _pretrained(out: Path, store_uri: str, tasks: list[str], args) -> Path:
    """Offline buffer + behaviour cloning, cached by settings in OUT/pretrained."""
    from fleetloop.policy import pretrain as pretrain_mod

    demos = demos_per_task(tasks, args)
    key = {"tasks": tasks, "demos": demos, "steps": args.pretrain_steps, "images": args.images,
           "size": args.size, "seed": args.seed, "backend": args.backend, "base": args.base, "set": args.set}
    # The offline buffer goes into this run's store every time (seconds; episode ids are
    # deterministic, so a re-run rewrites the same episodes); pretraining is cached.
    _collect_offline(store_uri, demos, args)
    target = Path(args.pretrained_dir) if getattr(args, "pretrained_dir", None) else out / "pretrained"
    if (target / "model.safetensors").exists() and (target / "demo-key.json").exists() \
            and json.loads((target / "demo-key.json").read_text()) == key:
        log.info("using the cached pretrained policy in %s", target)
        return target
    t0 = time.time()
    parser = argparse.ArgumentParser()
    pretrain_mod.add_arguments(parser)
    argv = ["--store", store_uri, "--out", str(target), "--size", args.size, "--steps", str(args.pretrain_steps),
            "--seed", str(args.seed), "--threads", "1", "--tasks", *tasks]
    if not args.images:
        argv.append("--state-only")
    if args.backend != "tiny":
        argv += ["--backend", args.backend, "--base", args.base, "--batch-size", "32", "--lr", "3e-4"]
        for kv in args.set:
            argv += ["--set", kv]
    pretrain_mod.pretrain(parser.parse_args(argv))
    (target / "demo-key.json").write_text(json.dumps(key))
    log.info("pretrained in %.0fs", time.time() - t0)
    return target


def demos_per_task(tasks: list[str], args) -> dict[str, int]:
    """Demonstrations per task: --demos-per-task for all, else the suite recipe for suite tasks
    under --preset suite, else 5."""
    from fleetloop.actor.sim.tasks import SUITE_DEMOS
    if args.demos_per_task is not None:
        return {t: int(args.demos_per_task) for t in tasks}
    return {t: (SUITE_DEMOS.get(t, 5) if args.preset == "suite" else 5) for t in tasks}


def _collect_offline(store_uri: str, demos: dict[str, int], args) -> None:
    from fleetloop.actor.sim.collect import collect_task
    log.info("recording expert demonstrations: %s", demos)
    for task, n in demos.items():
        collect_task(store_uri, task, list(range(args.seed, args.seed + n)), images=args.images)


def _initial_policy(store_uri: str, tasks: list[str], args) -> tuple[Path, list[str]]:
    """--init: the given checkpoint, and the offline buffer of the tasks it was pretrained on
    (its summary says which) -- or of --tasks only with --offline-tasks trained. Returns the
    checkpoint directory and the tasks pretrained on (for the held-out evaluation)."""
    from fleetloop.policy.backend import read_checkpoint_config
    ckpt = Path(args.init).resolve()
    doc = read_checkpoint_config(ckpt)  # raises CheckpointError with the path if it is not one
    pretrained_tasks = [t for t in (doc.get("extra", {}).get("tasks") or []) if isinstance(t, str)]
    from fleetloop.actor.sim.tasks import TASKS
    unknown = [t for t in pretrained_tasks if t not in TASKS]
    if unknown:
        log.warning("--init was pretrained on tasks this catalogue does not simulate: %s (ignored)", unknown)
    pretrained_tasks = [t for t in pretrained_tasks if t in TASKS]
    from fleetloop.policy.backend import spec_from_config
    wants_images = bool(spec_from_config(doc["model"]).cameras)
    if wants_images != bool(args.images):
        log.info("--init %s %s camera images: --images set to %s", ckpt, "takes" if wants_images else "takes no",
                 wants_images)
        args.images = wants_images
    offline = tasks + [t for t in pretrained_tasks if t not in tasks] if args.offline_tasks == "pretrained" else tasks
    _collect_offline(store_uri, demos_per_task(offline, args), args)
    return ckpt, pretrained_tasks


def versions_published(before: str | None, latest: str | None) -> int:
    """How many versions were published after `before` up to `latest` (version numbers are
    contiguous: fleetloop.release.registry). Counting the registry's list instead would count what
    retention left of them."""
    from fleetloop.release.registry import _seq
    return max(0, _seq(latest) - _seq(before))


def heartbeat_guidance(client, robot_ids) -> dict:
    """robot -> {"policy_version", "guidance"} as its last heartbeat in Redis says (what runs there)."""
    from fleetloop.dashboard.heartbeat import read_one
    out = {}
    for rid in robot_ids:
        beat = read_one(client, rid) or {}
        out[rid] = {"policy_version": beat.get("policy_version"), "guidance": beat.get("guidance")}
    return out


def _guidance_line(beats: dict) -> str:
    def one(b):
        g = b.get("guidance") or {}
        return f"{g.get('indicator', '?')}/beta {g.get('beta', '?')}"
    return " ".join(f"{rid}={b.get('policy_version') or '-'}:{one(b)}" for rid, b in beats.items())


def _evaluate(policy, tasks, episodes, images) -> dict:
    from fleetloop.actor.sim.evaluate import evaluate
    return {r.task: {"episodes": r.episodes, "successes": r.successes, "success_rate": round(r.success_rate, 4),
                     "ci95": [round(r.ci95[0], 4), round(r.ci95[1], 4)],
                     "successes_per_hour_at_30hz": round(r.successes_per_hour, 1)}
            for r in evaluate(policy, tasks, episodes, images=images)}


class Robot:
    """One simulated robot: an actor daemon (gRPC server, spool, uploader, policy slot) and a
    MetaWorld robot driving it over the robot link with a simulated human watching."""

    def __init__(self, index: int, tasks: list[str], store, redis_url: str, spool_root: Path, images: bool,
                 control_hz, seed: int):
        import redis as redis_lib

        from fleetloop.actor.daemon import ActorDaemon
        from fleetloop.actor.link import LinkedPolicy, RobotLinkClient, link_callbacks
        from fleetloop.actor.sim.env import SimEnv
        from fleetloop.actor.sim.expert import ScriptedExpert
        from fleetloop.actor.sim.gating import GatingConfig, SimTeleoperator
        from fleetloop.actor.sim.robot import EXECUTE_STEPS, SimRobot
        from fleetloop.actor.spool import Spool
        from fleetloop.actor.weights import PolicySlot
        from fleetloop.release.registry import PolicyRegistry
        from fleetloop.release.runtime import PolicyLoader

        self.robot_id = f"sim-{index:02d}"
        # Robot i starts on task i and then rotates, so every task gets fleet time for any N.
        self.tasks = tasks[index % len(tasks):] + tasks[:index % len(tasks)]
        client = redis_lib.Redis.from_url(redis_url, socket_timeout=10)
        slot = PolicySlot(PolicyRegistry(store, client), self.robot_id, poll_interval_s=2.0,
                          load_fn=PolicyLoader())
        self.daemon = ActorDaemon(self.robot_id, store, client, Spool(spool_root / self.robot_id), slot,
                                  grpc_address="127.0.0.1:0").start()
        self.link = RobotLinkClient(self.daemon.address, self.robot_id, timeout_s=10.0)
        self.slot = slot
        self.episodes: list[dict] = []
        self.t0 = time.time()

        def on_end(result, response):
            self.episodes.append({"t": time.time() - self.t0, "robot": self.robot_id, "task": result.task,
                                  "success": bool(result.success), "policy_version": result.policy_version,
                                  "steps": result.num_steps, "intervention_steps": result.intervention_steps,
                                  "autonomous_success": bool(result.success and not result.segments)})

        def sim_robot(task: str) -> SimRobot:
            teleop = SimTeleoperator(ScriptedExpert(task, seed=seed), GatingConfig.style("attentive"), seed=seed)
            return SimRobot(SimEnv(task, images=images), LinkedPolicy(self.link), teleop=teleop,
                            callbacks=link_callbacks(self.link, on_end), execute_steps=EXECUTE_STEPS, control_hz=control_hz)

        # The simulated robots are built in the robot's own thread (run_until): with --images each
        # env owns an EGL context, and a context made current on the thread that created it cannot
        # be made current on another (EGL_BAD_ACCESS) -- built here, in the main thread, the last
        # one created stayed current there and its robot died at its first render.
        self._make_sim = sim_robot
        self.sims: dict = {}
        self.seed = seed
        self.error: str | None = None

    def run_until(self, deadline: float, stop: threading.Event) -> None:
        """Run episodes until the deadline. Any error ends this robot: it is kept in self.error
        (results.json's robot_errors; the demo then exits non-zero) and logged at once."""
        import grpc
        k = 0
        try:
            while time.time() < deadline and not stop.is_set():
                task = self.tasks[k % len(self.tasks)]
                if task not in self.sims:
                    self.sims[task] = self._make_sim(task)
                try:
                    self.sims[task].run_episode(seed=self.seed * 10_000 + k)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:  # no policy yet: wait for the first version
                        time.sleep(0.5)
                        continue
                    raise
                k += 1
        except grpc.RpcError as e:
            self.error = f"{e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001 -- whatever kills a robot is reported, not swallowed
            self.error = f"{type(e).__name__}: {e}"
            log.exception("robot %s died after %d episodes", self.robot_id, k)
        finally:
            for sim in self.sims.values():  # in this thread: its GL contexts are current here
                try:
                    sim.env.close()
                except Exception:  # noqa: BLE001
                    pass
        if self.error:
            log.error("ROBOT %s DIED after %d episodes: %s", self.robot_id, k, self.error)

    def stop(self) -> None:
        self.link.close()
        self.daemon.stop()


def _plot(path: Path, per_task: dict, before: dict, after: dict, minutes: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (task, eps) in enumerate(sorted(per_task.items())):
        c = colors[i % len(colors)]
        roll = rolling_rate(eps, TIME_TO_WINDOW)
        if roll:
            t = [r[0] / 60 for r in roll]
            ax.plot(t, [r[1] for r in roll], color=c, label=f"{task} (fleet, rolling {TIME_TO_WINDOW} episodes)")
            ax.fill_between(t, [r[2] for r in roll], [r[3] for r in roll], color=c, alpha=0.15)
        for x, ev, marker in ((0, before.get(task), "o"), (minutes, after.get(task), "s")):
            if ev:
                ax.errorbar([x], [ev["success_rate"]], yerr=[[ev["success_rate"] - ev["ci95"][0]],
                                                            [ev["ci95"][1] - ev["success_rate"]]],
                            fmt=marker, color=c, capsize=4)
    ax.axhline(0.8, color="grey", ls=":", lw=1)
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("success rate (autonomous, Wilson 95%)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("fleetloop demo: per-task success over wall time (o = pretrained eval, s = final eval)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _start_dashboard(redis_url: str, store, port: int):
    """The dashboard on the demo's Redis and store; reads are open (a local demo), writes take
    the operator token from FLEETLOOP_OPERATOR_TOKENS or a one-off token printed here."""
    import redis as redis_lib

    from fleetloop.dashboard.app import DashboardServer, build_app
    from fleetloop.dashboard.auth import OPERATOR, generated_operator_token, load_tokens
    tokens = load_tokens()
    note = ""
    if not len(tokens):
        token = generated_operator_token()
        tokens.add("demo-operator", token, OPERATOR, "generated")
        note = f"#token={token}"
    app, _dash = build_app(redis_lib.Redis.from_url(redis_url, socket_timeout=10), store, tokens, open_read=True)
    try:
        server = DashboardServer(app, host="127.0.0.1", port=port).start()
    except (RuntimeError, OSError) as e:  # port taken: the demo goes on without it
        log.warning("dashboard not started on port %d: %s", port, e)
        return None
    print(f"fleetloop demo: dashboard at {server.url}/{note}", flush=True)
    return server


# An episode is "robot success" when it succeeded and the robot drove at least this share of its
# steps: the human's correction was a nudge, not the job. Strictly autonomous success (no takeover
# at all) is reported too, but the gate takes over on action *disagreement* with the expert, so a
# policy that succeeds its own way still gets grabbed in most episodes of a hard task: measured on
# the fleet, strict autonomy can stay under 0.8 while the evaluated policy is at 0.9+.
ROBOT_SHARE = 0.9


def mark_robot_success(e: dict) -> dict:
    e["robot_success"] = bool(e["success"] and e["intervention_steps"] <= (1 - ROBOT_SHARE) * max(1, e["steps"]))
    return e


def time_to_08(per_task: dict[str, list[dict]]) -> dict:
    """Per task and fleet-wide, the loop time at which rolling success over the task's last
    TIME_TO_WINDOW episodes first reaches 0.8, for two definitions of success: robot_success
    (the robot drove >= 90% of the steps) and autonomous (no takeover at all). Fleet-wide: the
    time by which every task had got there (the slowest task); None if one never did."""
    out: dict = {"window_episodes": TIME_TO_WINDOW, "robot_share": ROBOT_SHARE, "per_task": {}}
    for key, name in (("robot_success", "robot_success_s"), ("autonomous_success", "autonomous_s")):
        times = {}
        for task, eps in per_task.items():
            t = time_to_success(eps, window=TIME_TO_WINDOW, key=key)
            times[task] = None if t is None else round(t, 1)
            out["per_task"].setdefault(task, {})[name] = times[task]
        out[f"fleet_{name}"] = None if not times or any(v is None for v in times.values()) else max(times.values())
    return out


def _print_eval(title: str, ev: dict) -> None:
    if not ev:
        return
    print(f"fleetloop demo: {title}:", flush=True)
    for task, v in ev.items():
        print(f"  {task:26s} {v['success_rate']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]  n={v['episodes']}", flush=True)


def run(args) -> int:
    results = run_demo(args)
    print(json.dumps({t: {"before": (v["before"] or {}).get("success_rate"), "before_ci95": (v["before"] or {}).get("ci95"),
                          "after": (v["after"] or {}).get("success_rate"), "after_ci95": (v["after"] or {}).get("ci95"),
                          "held_out": v.get("held_out", False), "significant": v["improved_significantly"]}
                      for t, v in results["per_task"].items()}, indent=1))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'success.png'}")
    if results.get("robot_errors"):
        print(f"fleetloop demo: FAILED: {len(results['robot_errors'])} robot(s) died: "
              + "; ".join(f"{k}: {v}" for k, v in results["robot_errors"].items()), file=sys.stderr)
        return 1
    return 0


def run_demo(args) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)

    from fleetloop import config
    from fleetloop.actor.sim.tasks import parse_task_list
    from fleetloop.buffer.store import open_store
    from fleetloop.learner.app import start_learner
    from fleetloop.release.guidance import Guidance
    from fleetloop.release.registry import PolicyRegistry
    from fleetloop.release.runtime import PolicyRuntime
    from fleetloop.services import RedisServer

    if args.tasks is None:
        args.tasks = PRESETS[args.preset]
    tasks = parse_task_list(args.tasks)
    if args.images is None:
        args.images = images_by_default()
        log.info("camera images %s (%s; --images/--no-images decides)", "on" if args.images else "off",
                 "a CUDA GPU is here" if args.images else "no GPU here: on a CPU the camera costs several times the CPU")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.backend != "tiny":
        args.images = True  # a vision-language model sees the camera
        if not args.base:  # no weights can be downloaded: a tiny random model of a real family
            from fleetloop.policy.hf_vla.tiny import make_tiny_base
            target = out / f"base-{args.vla_family}"
            if not (target / "config.json").exists():
                make_tiny_base(args.vla_family, target, seed=args.seed)
            args.base = str(target)
    store_uri = (out / "store").as_uri()
    redis_server = None
    redis_url = config.default_redis_url()
    if not redis_url:
        redis_server = RedisServer(data_dir=str(out / "redis")).start()
        redis_url = redis_server.url
    import redis as redis_lib
    client = redis_lib.Redis.from_url(redis_url)
    store = open_store(store_uri)
    registry = PolicyRegistry(store, client)
    results: dict = {"algo": args.algo, "robots": args.robots, "minutes": args.minutes, "tasks": tasks,
                     "images": args.images, "settings": vars(args)}
    robots: list[Robot] = []
    learner = dashboard = None
    try:
        t_start = time.time()
        if args.init:
            pretrained, pretrained_tasks = _initial_policy(store_uri, tasks, args)
        else:
            pretrained, pretrained_tasks = _pretrained(out, store_uri, tasks, args), list(tasks)
        held_out = [t for t in pretrained_tasks if t not in tasks]  # pretrained on, not post-trained on
        eval_tasks = tasks + held_out
        results.update({"init": str(pretrained), "held_out_tasks": held_out,
                        "offline_tasks": tasks + held_out if args.offline_tasks == "pretrained" or not args.init else tasks})
        log.info("evaluating the pretrained policy: %d episodes per task", args.eval_episodes)
        before = _evaluate(PolicyRuntime.from_checkpoint(pretrained, version="pretrained"), eval_tasks,
                           args.eval_episodes, args.images) if args.eval_episodes else {}
        _print_eval("before (pretrained)", before)

        published_before = registry.latest_version()  # to count the versions this run publishes
        learner = start_learner(store_uri, redis_url, args.algo, str(pretrained), run_name=f"demo-{args.algo}",
                                publish_every=args.publish_every, torch_threads=1, ray_num_cpus=2,
                                batch_size=128 if args.backend == "tiny" else 32,
                                seed=args.seed)
        learner.wait_ready(timeout=300)
        if args.dashboard_port >= 0:
            dashboard = _start_dashboard(redis_url, store, args.dashboard_port)
        for i in range(args.robots):
            robots.append(Robot(i, tasks, store, redis_url, out / "spool", args.images,
                                args.control_hz, seed=args.seed * 1000 + i + 1))
        t_loop = time.time()
        for r in robots:
            r.t0 = t_loop
        deadline = t_loop + args.minutes * 60
        stop = threading.Event()
        threads = [threading.Thread(target=r.run_until, args=(deadline, stop), name=r.robot_id) for r in robots]
        for t in threads:
            t.start()
        reported: set = set()
        stop_when = getattr(args, "stop_when", None)  # bench scaling: end the loop once its figure is in
        stopped_early_at = None
        while any(t.is_alive() for t in threads):
            stop.wait(5)
            st = learner.stats()
            eps = sorted((e for r in robots for e in list(r.episodes)), key=lambda e: e["t"])
            if stop_when is not None and stopped_early_at is None and stop_when(eps):
                stopped_early_at = round(time.time() - t_loop, 1)
                log.info("t=%4.0fs stopping the loop early: the stop condition is met", stopped_early_at)
                stop.set()
            rolling = {}
            for task in tasks:
                w = [mark_robot_success(dict(e)) for e in eps if e["task"] == task][-TIME_TO_WINDOW:]
                if w:
                    rolling[task] = (f"{sum(e['robot_success'] for e in w)}/{len(w)}"
                                     f"({sum(e['autonomous_success'] for e in w)})")
            log.info("t=%4.0fs episodes=%d learner step=%s versions=%s  success over the last %d per task, "
                     "robot drove >= %d%% (no takeover at all): %s  heartbeats (version:indicator/beta): %s",
                     time.time() - t_loop, len(eps), st.get("step"), st.get("versions_published"), TIME_TO_WINDOW,
                     round(ROBOT_SHARE * 100), " ".join(f"{k}={v}" for k, v in rolling.items()),
                     _guidance_line(heartbeat_guidance(client, [r.robot_id for r in robots])))
            for r in robots:
                if r.error and r.robot_id not in reported:
                    reported.add(r.robot_id)
                    print(f"fleetloop demo: ROBOT {r.robot_id} DIED: {r.error}", file=sys.stderr, flush=True)
        for t in threads:
            t.join()
        learner_final = learner.stop()
        learner = None

        final_version = registry.latest_version()
        manifest, weights = registry.fetch(final_version)
        # evaluated as the robots ran it: with the guidance its manifest publishes (RECAP:
        # indicator "positive", beta 1.5)
        published_guidance = Guidance.from_manifest(manifest)
        final_policy = PolicyRuntime.from_bytes(manifest.config_json, weights, final_version,
                                                guidance=published_guidance)
        log.info("evaluating %s (guidance %s): %d episodes per task", final_version,
                 published_guidance.describe(), args.eval_episodes)
        after = _evaluate(final_policy, eval_tasks, args.eval_episodes, args.images) if args.eval_episodes else {}
        _print_eval(f"after ({final_version})", after)

        episodes = [mark_robot_success(e) for e in sorted((e for r in robots for e in r.episodes), key=lambda e: e["t"])]
        per_task: dict = {t: [e for e in episodes if e["task"] == t] for t in tasks}
        hours = (stopped_early_at if stopped_early_at is not None else args.minutes * 60) / 3600
        swap = [r.slot.status() for r in robots]
        for r in robots:
            r.daemon.heartbeat()  # their last word before the results are written
        robots_guidance = heartbeat_guidance(client, [r.robot_id for r in robots])
        t08 = time_to_08(per_task)
        results.update({
            "final_version": final_version,
            "versions_published": versions_published(published_before, final_version),
            "versions_retained": len(registry.list_versions()),  # what retention left of them
            "guidance": {"published": published_guidance.describe(), "robots": robots_guidance},
            "time_to_0_8": t08,
            "learner": learner_final,
            "wall_s": {"total": round(time.time() - t_start, 1), "loop": round(args.minutes * 60, 1)
                       if stopped_early_at is None else stopped_early_at},
            "stopped_early_at_s": stopped_early_at,
            "per_task": {},
            "weight_swap": {
                "publish_to_loaded_s_p50": [s["publish_to_loaded_s"].get("p50") for s in swap],
                "publish_to_loaded_s_max": [s["publish_to_loaded_s"].get("max") for s in swap],
                "loaded_to_swapped_s_p50": [s["loaded_to_swapped_s"].get("p50") for s in swap],
                "swaps": [s["swaps"] for s in swap]},
            "robot_errors": {r.robot_id: r.error for r in robots if r.error},
            "episodes": len(episodes),
            "fleet_time_to_0_8_success_s": t08["fleet_robot_success_s"],
        })
        for task in eval_tasks:
            eps = per_task.get(task, [])
            b, a = before.get(task), after.get(task)
            versions = [e["policy_version"] for e in eps]
            results["per_task"][task] = {
                "held_out": task in held_out,
                "before": b, "after": a,
                "improved_significantly": bool(a and b and a["ci95"][0] > b["ci95"][1]),
                "episodes": len(eps),
                "episodes_with_intervention": sum(e["intervention_steps"] > 0 for e in eps),
                "intervention_step_rate": round(sum(e["intervention_steps"] for e in eps)
                                                / max(1, sum(e["steps"] for e in eps)), 4),
                "online_successes": sum(e["success"] for e in eps),
                "autonomous_successes": sum(e["autonomous_success"] for e in eps),
                "successes_per_hour": round(sum(e["success"] for e in eps) / hours, 1),
                "robot_successes": sum(e["robot_success"] for e in eps),
                "time_to_0_8_success_s": t08["per_task"].get(task, {}).get("robot_success_s"),
                "time_to_0_8_autonomous_s": t08["per_task"].get(task, {}).get("autonomous_s"),
                "policy_versions": {"distinct": len(set(versions)), "first": versions[0] if versions else None,
                                    "last": versions[-1] if versions else None},
            }
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "episodes.json").write_text(json.dumps(episodes))  # the full record: every episode
        _plot(out / "success.png", per_task, before, after, args.minutes)
        return results
    finally:
        for r in robots:
            try:
                r.stop()
            except Exception:  # shutting down: keep going
                log.exception("stopping %s", r.robot_id)
        if learner is not None:
            learner.stop()
        if dashboard is not None:
            dashboard.stop()
        if redis_server is not None:
            redis_server.stop()
