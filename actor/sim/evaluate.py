"""`fleetloop eval`: success rate of a policy on simulated tasks, with Wilson 95% intervals.

    fleetloop eval --policy runs/ckpt --tasks reach-v3,push-v3 --episodes 50 [--json]
    fleetloop eval --policy expert --tasks all --episodes 20

The policy runs alone (no interventions), with the same chunk broker the robots use. Episode i
of every task uses scene seed `--seed + i`; the default seed base (1,000,000) keeps evaluation
scenes apart from `fleetloop collect`'s default training seeds (0, 1, ...), and every policy
evaluated with the same flags sees exactly the same scenes -- a paired comparison.

Besides success, it reports mean episode length and successes per hour at a 30 Hz control rate
(failures that fail fast and successes that finish fast both count; SOP reports episodes/hour).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

from fleetloop.actor.sim.env import FRONT_CAMERA, SimEnv
from fleetloop.actor.sim.expert import ExpertPolicy
from fleetloop.actor.sim.robot import EXECUTE_STEPS, SimRobot
from fleetloop.actor.sim.tasks import parse_task_list
from fleetloop.release.guidance import INDICATOR_SETTINGS
from fleetloop.policy.interface import Policy
from fleetloop.stats import wilson_interval

EVAL_SEED = 1_000_000
REPORT_HZ = 30.0


@dataclass
class TaskEval:
    task: str
    episodes: int
    successes: int
    success_rate: float
    ci95: tuple[float, float]
    mean_steps: float
    successes_per_hour: float  # at REPORT_HZ control rate
    steps: int
    wall_s: float
    env_steps_per_s: float     # simulation + policy throughput of this evaluation

    @classmethod
    def from_counts(cls, task: str, successes: int, episodes: int, steps: int, wall_s: float) -> "TaskEval":
        hours = steps / REPORT_HZ / 3600.0
        return cls(task=task, episodes=episodes, successes=successes,
                   success_rate=successes / episodes if episodes else 0.0,
                   ci95=wilson_interval(successes, episodes), mean_steps=steps / episodes if episodes else 0.0,
                   successes_per_hour=successes / hours if hours else 0.0, steps=steps, wall_s=wall_s,
                   env_steps_per_s=steps / wall_s if wall_s > 0 else 0.0)


def policy_image_needs(policy: Policy) -> tuple[bool, int, list[str]]:
    """(images?, image size, cameras) a policy wants. A fleetloop policy says so in its
    ObservationSpec (`spec`; no cameras = state + language, so nothing is rendered); the scripted
    expert reads state only; anything else is assumed to want the default camera."""
    if isinstance(policy, ExpertPolicy):
        return False, 64, [FRONT_CAMERA]
    spec = getattr(policy, "spec", None)
    if spec is not None and hasattr(spec, "cameras"):
        return bool(spec.cameras), int(spec.image_size), list(spec.cameras) or [FRONT_CAMERA]
    cfg = getattr(policy, "config", None)
    if cfg is not None and hasattr(cfg, "use_images"):
        return bool(cfg.use_images), int(getattr(cfg, "image_size", 64)), list(getattr(cfg, "cameras", [FRONT_CAMERA]))
    return True, 64, [FRONT_CAMERA]


def evaluate(policy: Policy, tasks: list[str], episodes: int, *, seed: int = EVAL_SEED,
             images: Optional[bool] = None, image_size: Optional[int] = None, cameras: Optional[list[str]] = None,
             max_steps: Optional[int] = None, execute_steps: Optional[int] = EXECUTE_STEPS,
             indicator: Optional[bool] = None, progress=None) -> list[TaskEval]:
    """Run `episodes` autonomous episodes per task; images/size/cameras default to what the
    policy needs. `progress(task, episode_index, success)`, if given, is called per episode."""
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    want_images, want_size, want_cameras = policy_image_needs(policy)
    images = want_images if images is None else images
    results = []
    for task in tasks:
        with SimEnv(task, images=images, image_size=image_size or want_size, camera=cameras or want_cameras,
                    max_steps=max_steps) as env:
            robot = SimRobot(env, policy, execute_steps=execute_steps, indicator=indicator)
            successes = steps = 0
            started = time.monotonic()
            for i in range(episodes):
                result = robot.run_episode(seed + i)
                successes += int(result.success)
                steps += result.num_steps
                if progress is not None:
                    progress(task, i, result.success)
            results.append(TaskEval.from_counts(task, successes, episodes, steps, time.monotonic() - started))
    return results


def overall(results: list[TaskEval]) -> TaskEval:
    """All tasks pooled (each task weighted by its episodes)."""
    return TaskEval.from_counts("overall", sum(r.successes for r in results), sum(r.episodes for r in results),
                                sum(r.steps for r in results), sum(r.wall_s for r in results))


def format_table(results: list[TaskEval]) -> str:
    rows = [f"{'task':26s} {'success':>7s}  {'95% CI':^12s} {'n':>5s} {'steps':>6s} {'succ/h@30Hz':>11s}"]
    for r in results + ([overall(results)] if len(results) > 1 else []):
        rows.append(f"{r.task:26s} {r.success_rate:7.2f}  [{r.ci95[0]:.2f}, {r.ci95[1]:.2f}] {r.episodes:5d} "
                    f"{r.mean_steps:6.1f} {r.successes_per_hour:11.0f}")
    return "\n".join(rows)


def _rounded(doc: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, tuple) else v)
            for k, v in doc.items()}


class PolicySpecError(ValueError):
    """A --policy that names nothing loadable (the message says what was tried)."""


def _store_and_rest(spec: str, store_uri: Optional[str]) -> tuple[Optional[str], str]:
    """Split 'file:///x/store/policies/v000012' or 's3://b/p/learner/run' into (store URI, key
    under it); a spec without a scheme is relative to `store_uri` (the configured store)."""
    import re
    if "://" in spec:
        m = re.fullmatch(r"(.*?)/((?:policies|learner)/.*)", spec.rstrip("/"))
        if not m:
            raise PolicySpecError(f"--policy {spec!r}: a store URI must end in /policies/<version>, "
                                  "/policies/latest or /learner/<run>")
        return m.group(1), m.group(2)
    return store_uri, spec.strip("/")


def _from_weights(data: bytes, version: str, kwargs: dict, config=None, sha256=None) -> Policy:
    from fleetloop.release.guidance import Guidance
    from fleetloop.release.runtime import PolicyRuntime
    kwargs = dict(kwargs)
    overrides = kwargs.pop("overrides")
    kwargs.setdefault("guidance", Guidance().with_overrides(*overrides))
    return PolicyRuntime.from_bytes(config, data, version, sha256=sha256, **kwargs)


def _published(store, version: str, kwargs: dict) -> Policy:
    """A published version from the store (manifest + weights, sha256-verified), or 'latest'; it
    runs with the guidance its manifest publishes, as on the robots (then --indicator / --beta)."""
    from fleetloop.buffer.store import ObjectNotFound
    from fleetloop.release.registry import manifest_from_bytes, manifest_key

    if version == "latest":
        versions = sorted({k.split("/")[1] for k in store.list("policies/") if k.endswith("/manifest.json")})
        if not versions:
            raise PolicySpecError("no published versions in the store")
        version = versions[-1]
    try:
        m = manifest_from_bytes(store.get(manifest_key(version)), manifest_key(version))
    except ObjectNotFound:
        raise PolicySpecError(f"no published version {version!r} in the store ({manifest_key(version)} not found)") from None
    data = store.get(m.weights_key or f"policies/{version}/model.safetensors")
    from fleetloop.release.guidance import Guidance
    try:
        kwargs = {**kwargs, "guidance": Guidance.from_manifest(m).with_overrides(*kwargs["overrides"])}
    except ValueError as e:
        raise PolicySpecError(str(e)) from None
    return _from_weights(data, version, kwargs, config=m.config_json or None, sha256=m.weights_sha256 or None)


def _learner_checkpoint(store, prefix: str, kwargs: dict) -> Policy:
    """The model of a learner run's newest checkpoint that verifies (learner/<run>)."""
    from fleetloop.learner.checkpoint import CheckpointStore
    loaded = CheckpointStore(store, prefix).load_latest()
    if loaded is None:
        raise PolicySpecError(f"no learner checkpoint under {prefix!r} in the store")
    return _from_weights(loaded.files["model"], f"{prefix.split('/')[-1]}@step{loaded.step}", kwargs)


def load_policy(spec: str, beta: Optional[float] = None, store_uri: Optional[str] = None,
                indicator: str = "published") -> Policy:
    """What --policy names (indicator / beta: fleetloop.release.guidance overrides; "published" /
    None: a published version's own, the plain policy otherwise):

      expert                               the scripted expert
      DIR                                  a checkpoint directory (config.json + model.safetensors),
                                           a published version's directory (manifest.json +
                                           model.safetensors), a learner run's directory (LATEST)
                                           or one of its checkpoints (state.json), or a bare
                                           model.safetensors with its config in the metadata
      v000123 | latest | policies/v000123  a published version in --store
      learner/<run>                        the newest learner checkpoint of a run in --store
      file:///store/policies/v000123, s3://bucket/prefix/learner/<run>, ...   the same, store included
    """
    from pathlib import Path

    from fleetloop.buffer.store import open_store
    from fleetloop.release.runtime import PolicyRuntime

    if spec == "expert":
        return ExpertPolicy()
    from fleetloop.release.guidance import Guidance
    kwargs = {"overrides": (indicator, beta)}
    path = Path(spec)
    if path.is_dir():
        if (path / "config.json").is_file():
            return PolicyRuntime.from_checkpoint(spec, guidance=Guidance().with_overrides(indicator, beta))
        if (path / "LATEST").is_file():  # a learner run directory in a local store
            return _learner_checkpoint(open_store(str(path.parent)), path.name, kwargs)
        if (path / "manifest.json").is_file() and path.parent.name == "policies":
            return _published(open_store(str(path.parent.parent)), path.name, kwargs)
        if (path / "model.safetensors").is_file():  # one learner checkpoint, or weights alone
            return _from_weights((path / "model.safetensors").read_bytes(), path.name, kwargs)
        raise PolicySpecError(f"--policy {spec!r}: a directory, but no config.json, manifest.json, LATEST "
                              "or model.safetensors in it")
    if path.is_file() and path.suffix == ".safetensors":
        return _from_weights(path.read_bytes(), path.parent.name, kwargs)
    uri, rest = _store_and_rest(spec, store_uri)
    if not uri:
        from fleetloop.config import default_store_uri
        uri = default_store_uri()
    store = open_store(uri)
    if rest.startswith("learner/"):
        return _learner_checkpoint(store, rest, kwargs)
    version = rest[len("policies/"):] if rest.startswith("policies/") else rest
    import re
    if version != "latest" and not re.fullmatch(r"v\d{6,}", version):
        raise PolicySpecError(f"--policy {spec!r}: not 'expert', not a directory or .safetensors file, and not a "
                              f"published version (v000123, latest) or learner/<run> in {uri}")
    return _published(store, version, kwargs)


# ---- CLI ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True,
                        help="'expert'; a checkpoint directory; a published version (v000123, latest) or a learner "
                             "run (learner/<run>) in --store; or a store URI ending in /policies/<version> or "
                             "/learner/<run>")
    parser.add_argument("--store", default=None, help="store URI for versions and learner runs "
                                                      "(default: FLEETLOOP_STORE / ~/.fleetloop/store)")
    parser.add_argument("--tasks", default="demo",
                        help="comma-separated task names ('demo' = the demo set, 'all' = every task)")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="first scene seed; episode i uses seed+i")
    parser.add_argument("--images", action=argparse.BooleanOptionalAction, default=None,
                        help="render camera images (default: whatever the policy needs)")
    parser.add_argument("--max-steps", type=int, default=None, help="episode length (default: per task)")
    parser.add_argument("--execute-steps", type=int, default=EXECUTE_STEPS,
                        help="actions executed per chunk before re-planning, as on the fleet's robots "
                             "(0: the whole chunk)")
    parser.add_argument("--indicator", choices=INDICATOR_SETTINGS, default="published",
                        help="RECAP improvement indicator the policy runs with: published = a published "
                             "version's own, as on the robots (RECAP: positive), unset for a checkpoint")
    parser.add_argument("--beta", type=float, default=None,
                        help="classifier-free guidance weight (default: a published version's own, else 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    tasks = parse_task_list(args.tasks)
    if args.execute_steps < 0:
        print(f"fleetloop eval: --execute-steps must be >= 0 (0: the whole chunk), got {args.execute_steps}",
              file=sys.stderr)
        return 2
    from fleetloop.policy.backend import CheckpointError
    try:
        policy = load_policy(args.policy, args.beta, getattr(args, "store", None), indicator=args.indicator)
    except (PolicySpecError, CheckpointError, ValueError) as e:
        print(f"fleetloop eval: {e}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = evaluate(policy, tasks, args.episodes, seed=args.seed, images=args.images,
                       max_steps=args.max_steps, execute_steps=args.execute_steps or None)  # the policy's own indicator
    if args.json:
        doc = {"policy": args.policy, "policy_version": str(policy.version), "episodes_per_task": args.episodes,
               "seed": args.seed, "indicator": args.indicator, "wall_s": round(time.monotonic() - started, 2),
               "tasks": [_rounded(asdict(r)) for r in results], "overall": _rounded(asdict(overall(results)))}
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(f"policy {args.policy} (version {policy.version!r}), {args.episodes} episodes per task")
        print(format_table(results))
    return 0
