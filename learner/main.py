"""`fleetloop learner`: run the Ray learner against a store and Redis until interrupted.

  fleetloop learner --store file:///tmp/store --redis redis://127.0.0.1:6379/0 \\
      --algo hg-dagger --init ckpt/ --publish-every 25

Resumes from the newest checkpoint under learner/<run-name>/ in the store when there is one
(--init is then only a fallback). --ray-address (or RAY_ADDRESS) joins a running Ray cluster;
without it a local one is started. Options of the algorithm go in --algo-opt key=value (JSON
values), e.g. --algo-opt value_function='"online"' --algo-opt beta=2.0, or for HG-DAgger
--algo-opt iwr=true.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time

log = logging.getLogger(__name__)


def _kv(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except ValueError:
        return key.replace("-", "_"), value  # a bare string


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fleetloop.config import default_redis_url, default_store_uri
    p.add_argument("--store", default=default_store_uri(), help="store URI (file:///path or s3://bucket/prefix)")
    p.add_argument("--redis", default=default_redis_url() or "redis://127.0.0.1:6379/0", help="Redis URL")
    p.add_argument("--algo", default="hg-dagger", choices=["hg-dagger", "recap"])
    p.add_argument("--algo-opt", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="algorithm option (repeatable; value parsed as JSON when it can be)")
    p.add_argument("--init", dest="init_checkpoint", help="pretrained checkpoint dir (fleetloop pretrain --out)")
    p.add_argument("--run-name", default="default", help="checkpoints go under learner/<run-name>/ in the store")
    p.add_argument("--publish-every", type=int, default=25, help="K: learner steps between published versions")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="bf16 autocast (default: bf16 with --gpu, else fp32)")
    p.add_argument("--publish", choices=["auto", "trained", "full"], default="auto",
                   help="what a version holds: only the trained weights on a named base (LoRA: adapters + "
                        "expert), every weight, or the backend's choice")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-updates-per-s", type=float, default=None, help="cap the learner step rate")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many learner steps")
    p.add_argument("--window", type=int, default=200, help="W: steps in SOP's loss moving averages")
    p.add_argument("--alpha", type=float, default=2.0, help="SOP's alpha (> 1)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS or a local one)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-every", type=float, default=5.0, help="print stats every N seconds (0: never)")
    from fleetloop.release import rollout
    rollout.add_arguments(p)  # --rollout on|off: the canary gate on new versions (docs/rollout.md)


def run(args) -> int:
    from fleetloop.learner.app import LearnerConfig, start_learner

    cfg = LearnerConfig(
        algo_options=dict(args.algo_opt), run_name=args.run_name, publish_every=args.publish_every,
        checkpoint_every=args.checkpoint_every, batch_size=args.batch_size, lr=args.lr,
        num_workers=args.num_workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
        torch_threads=args.torch_threads, max_updates_per_s=args.max_updates_per_s, max_steps=args.max_steps,
        sampler={"window": args.window, "alpha": args.alpha}, ray_address=args.ray_address,
        ray_num_cpus=args.ray_num_cpus, seed=args.seed,
        precision=args.precision or ("bf16" if args.gpu else "fp32"),
        publish_trained_only={"auto": None, "trained": True, "full": False}[args.publish])
    gate = _start_rollout_gate(args)  # before the learner: it can never move the fleet past the gate
    handle = start_learner(args.store, args.redis, args.algo, args.init_checkpoint, config=cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    last = 0.0
    while not stop.is_set() and handle.running:
        stop.wait(0.5)
        if args.stats_every and time.monotonic() - last >= args.stats_every:
            last = time.monotonic()
            s = handle.stats()
            print(json.dumps({k: s.get(k) for k in ("status", "step", "samples_per_s", "loss", "w_on",
                                                    "current_version", "versions_published", "staleness")},
                             default=str), flush=True)
    final = handle.stop()
    if gate is not None:
        gate.stop()
    print(json.dumps({k: final.get(k) for k in ("status", "step", "versions_published", "current_version",
                                                "last_checkpoint", "error")}, default=str), flush=True)
    return 1 if handle.error else 0


def _start_rollout_gate(args):
    """The rollout gate as a thread of this process, unless --rollout off (docs/rollout.md)."""
    import redis as redis_lib

    from fleetloop.buffer.store import open_store
    from fleetloop.config import S3Settings
    from fleetloop.release import rollout
    from fleetloop.release.registry import PolicyRegistry
    settings = rollout.settings_from_args(args)
    store = open_store(args.store, S3Settings())
    registry = PolicyRegistry(store, redis_lib.Redis.from_url(args.redis, socket_timeout=10))
    if not settings.enabled:
        log.info("rollout gate off: every published version goes to every robot")
        if getattr(args, "rollout", None) == "off":  # release a fleet an earlier gate held
            rollout.RolloutGate(registry, settings).set_enabled(False, by="fleetloop learner --rollout off")
        return None
    if getattr(args, "rollout", None) == "on":  # explicit: overrides an operator's earlier "off"
        registry.redis.set(rollout.ENABLED_KEY, "1")
    gate = rollout.GateService(registry, settings, store=store).start()
    print(f"rollout gate on: new versions go to canaries first (margin {settings.margin}, "
          f"alpha {settings.alpha}, beta {settings.beta}); --rollout off to push every version to every robot",
          flush=True)
    return gate
