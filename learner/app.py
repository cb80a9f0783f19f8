"""The learner as a Ray application.

    handle = start_learner("file:///tmp/store", "redis://127.0.0.1:6379/0", algo="hg-dagger",
                           init_checkpoint="ckpt/")
    ...; handle.stats(); handle.stop()

Processes:
  driver          start_learner(): connects to Ray (local cluster by default; RAY_ADDRESS or
                  ray_address joins one), restores the last checkpoint, publishes the initial
                  version if the fleet has none, starts the replay actor and the trainer.
  replay actor    fleetloop.learner.replay.ReplayService: index, consumer, labels, algorithm
                  data side, sampler, stats writer. One per learner.
  train workers   Ray Train TorchTrainer, ScalingConfig(num_workers, use_gpu): each runs
                  LearnerCore (DDP across workers); batches come from the replay actor, one
                  prefetched call ahead. Rank 0 publishes a version every `publish_every` steps
                  through PolicyRegistry and writes a checkpoint every `checkpoint_every`.
A worker that dies is restarted by Ray Train (FailureConfig) and resumes from the last
checkpoint; a restarted learner resumes from it too (weights, optimiser, step, sampler and
algorithm state) and rebuilds its index from the store.

CPU budget (the demo shares 2 cores with simulated robots): torch uses `torch_threads` (1)
per process, and `max_updates_per_s` caps the learner's step rate.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class LearnerConfig:
    store_uri: str = ""
    redis_url: str = ""
    algo: str = "hg-dagger"
    algo_options: dict = field(default_factory=dict)
    init_checkpoint: str | None = None      # pretrained checkpoint dir (used when no learner checkpoint)
    run_name: str = "default"               # checkpoints under learner/<run_name>/
    publish_every: int = 25                 # K: learner steps between published versions
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 25
    precision: str = "fp32"                 # "bf16": autocast on GPU learners
    publish_trained_only: bool | None = None  # None: the backend's choice (LoRA: adapters + expert only)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    worker_resources: dict = field(default_factory=dict)  # more resources per worker, e.g. a node label {"trainer": 1}
    placement_strategy: str = "PACK"        # Ray Train's: PACK, SPREAD, STRICT_SPREAD (one worker per node), STRICT_PACK
    replay_on_driver_node: bool = True      # the replay actor on the driver's node (not on a training node)
    torch_threads: int = 1
    max_updates_per_s: float | None = None  # None: as fast as it goes
    max_steps: int | None = None            # stop by itself after this many steps (tests, benches)
    sampler: dict = field(default_factory=dict)  # SamplerConfig fields: window, alpha, w_min, ...
    buffer: dict = field(default_factory=dict)   # BufferLimits fields: max_frames, max_bytes, max_age_s
    reconcile_interval_s: float = 300.0     # store-vs-index scan period (also on any sign of Redis data loss)
    gc_every_publishes: int = 20            # version retention (fleetloop/retention.py) every N publishes; 0: off
    retention: dict = field(default_factory=dict)  # RetentionPolicy fields: keep_last, keep_every, stack_depth
    publish_initial: bool = True            # publish the init weights if the registry has no version
    stats_interval_s: float = 1.0
    max_failures: int = 3                   # worker-group restarts Ray Train may do
    lease_ttl_s: float = 15.0               # the learner lease (learner/lease.py): expiry after the driver dies
    lease_wait_s: float = 60.0              # how long a new learner waits for an old one's lease to expire
    ray_address: str | None = None
    ray_num_cpus: int | None = None         # for a local cluster started here
    storage_path: str | None = None         # Ray Train's run directory (we checkpoint to the store)
    seed: int = 0

    @property
    def checkpoint_prefix(self) -> str:
        return f"learner/{self.run_name}"


# ---- the train loop (runs in each Ray Train worker) -----------------------------------------

class RemoteSource:
    """BatchSource over the replay actor, prefetching: the next batch is requested before the
    current one trains, so sampling overlaps the step."""

    def __init__(self, replay, rank: int, batch_size: int):
        self.replay, self.rank, self.batch_size = replay, rank, batch_size
        self._pending: tuple[int, Any] | None = None
        self.stopped = False
        self.waiting = False

    def _request(self, step: int):
        return self.replay.sample.remote(self.rank, step, self.batch_size)

    def next_batch(self, step: int):
        import ray
        ref = self._pending[1] if self._pending and self._pending[0] == step else self._request(step)
        self._pending = None
        reply = ray.get(ref)
        self.waiting = bool(reply.get("wait"))
        if reply.get("stop"):
            self.stopped = True
            return None
        if self.waiting:
            return None
        self._pending = (step + 1, self._request(step + 1))
        return reply["batch"]

    def report_losses(self, step: int, batch, losses) -> None:
        self.replay.report_losses.remote(step, batch.tasks, batch.meta["task"], batch.meta["online"], losses)


def _train_worker(loop_cfg: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import redis
    import torch

    from fleetloop.buffer.store import open_store
    from fleetloop.learner.algorithms import make_algorithm
    from fleetloop.learner.checkpoint import CheckpointStore, arrays_to_safetensors
    from fleetloop.learner.core import CoreConfig, LearnerCore
    from fleetloop.policy.backend import export_version, model_from_weights
    from fleetloop.release.registry import PolicyRegistry

    cfg = LearnerConfig(**loop_cfg["config"])
    torch.set_num_threads(cfg.torch_threads)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    replay = loop_cfg["replay"]
    store = open_store(cfg.store_uri)
    lease = None
    if loop_cfg.get("lease"):  # fencing: every publish and checkpoint checks it (learner/lease.py)
        from fleetloop.learner.lease import Lease
        lease = Lease.from_spec(loop_cfg["lease"])
    ckpts = CheckpointStore(store, cfg.checkpoint_prefix, keep=cfg.keep_checkpoints, fence=lease)

    loaded = ckpts.load_latest()
    if loaded is not None:
        net = model_from_weights(loaded.files["model"])
        published = dict(loaded.state.get("published", {}))
    else:
        net = model_from_weights(ray.get(loop_cfg["init_weights"]))
        published = dict(loop_cfg["published"])
    torch.manual_seed(cfg.seed + rank)
    source = RemoteSource(replay, rank, cfg.batch_size)
    algorithm = make_algorithm(cfg.algo, **cfg.algo_options)  # learner side: its loss()
    core = LearnerCore(net, source, algorithm,
                       CoreConfig(batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  grad_clip=cfg.grad_clip, warmup_steps=cfg.warmup_steps, precision=cfg.precision),
                       device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model)
    if loaded is not None:
        core.step = loaded.step
        core.load_optimizer_state(loaded.files["optimizer"], loaded.state["optimizer"])
    ray.get(replay.begin.remote(rank, core.step))
    log.info("rank %d starts at step %d (%s)", rank, core.step, "checkpoint " + loaded.key if loaded else "init")

    registry = None
    if rank == 0:
        client = redis.Redis.from_url(cfg.redis_url, socket_timeout=30, socket_connect_timeout=5)
        registry = PolicyRegistry(store, client, fence=lease)
        if loaded is not None and published.get("version"):
            # Versions the previous incarnation published after this checkpoint still count.
            later = [v for v in registry.list_versions()
                     if v["version"] > published["version"] and v.get("algorithm") == cfg.algo]
            published["count"] = published.get("count", 0) + len(later)
        if published.get("version"):
            replay.published.remote(published["version"], published.get("step", 0), published.get("count", 0))
    losses: list[float] = []
    extra: dict = {}

    errors: dict[str, int] = {}
    fenced_out: list[str] = []  # set when the lease is lost: this worker must stop writing

    def guarded(fn) -> None:
        """Publishing and checkpointing are side effects: a store or Redis hiccup is logged and
        counted, and the next one retries; training goes on. A lost lease stops the worker."""
        from fleetloop.learner.lease import LeaseLost
        if fenced_out:
            return
        try:
            fn()
        except LeaseLost as e:
            fenced_out.append(str(e))
            log.error("ALERT rank %d fenced out at step %d (%s): no more publishes or checkpoints",
                      rank, core.step, e)
        except Exception as e:  # noqa: BLE001
            errors[fn.__name__] = errors.get(fn.__name__, 0) + 1
            extra["errors"] = dict(errors)
            log.warning("%s failed at step %d: %s", fn.__name__, core.step, e)

    def publish() -> None:
        t = time.perf_counter()
        v = export_version(core.net, cfg.publish_trained_only)
        m = registry.publish(v.weights, v.config_json, backend=v.backend, base_sha256=v.base_sha256,
                             parent_version=published.get("version", ""), learner_step=core.step,
                             algorithm=cfg.algo,
                             metrics={"loss": float(np.mean(losses)) if losses else float("nan")},
                             guidance=algorithm.inference_settings())
        published.update(version=m.version, step=core.step, count=published.get("count", 0) + 1)
        replay.published.remote(m.version, core.step, published["count"])
        extra["publish_ms"] = round(1e3 * (time.perf_counter() - t), 1)
        losses.clear()
        if cfg.gc_every_publishes and published["count"] % cfg.gc_every_publishes == 0:
            guarded(retention)

    def retention() -> None:
        from fleetloop.retention import RetentionPolicy, collect
        out = collect(registry, RetentionPolicy(**cfg.retention), fence=lease)
        extra["retention"] = {"kept": out["kept"], "deleted": len(out["deleted"]), "freed_mb":
                              round(out["freed_bytes"] / 1e6, 1)}

    def checkpoint() -> None:
        t = time.perf_counter()
        state, algo_tensors = ray.get(replay.export_state.remote())
        opt_bytes, opt_meta = core.optimizer_state()
        # What trains is all a checkpoint needs (a LoRA model's base is named in its config).
        key = ckpts.save(core.step, {"model": export_version(core.net).weights, "optimizer": opt_bytes,
                                     "algorithm": arrays_to_safetensors(algo_tensors)},
                         {**state, "optimizer": opt_meta, "published": published, "algo": cfg.algo,
                          "core": core.config_dict()})
        extra.update(checkpoint_ms=round(1e3 * (time.perf_counter() - t), 1), last_checkpoint=key)

    last_publish_step = core.step
    min_period = 1.0 / cfg.max_updates_per_s if cfg.max_updates_per_s else 0.0
    while True:
        t0 = time.monotonic()
        if cfg.max_steps is not None and core.step >= cfg.max_steps:
            break  # every rank decides this at the same step
        if fenced_out or (lease is not None and core.step % cfg.publish_every == 0 and not _lease_held(lease)):
            fenced_out.append(fenced_out[0] if fenced_out else "lease lost")
            break  # a zombie (its driver died): stop training too
        metrics = core.train_step()
        if metrics is None:
            if source.stopped:
                break
            time.sleep(0.5)  # no eligible data yet
            continue
        if rank == 0:
            losses.append(metrics["loss"])
            if core.step % cfg.publish_every == 0:
                guarded(publish)
                last_publish_step = core.step
            if core.step % cfg.checkpoint_every == 0:
                guarded(checkpoint)
            replay.record_step.remote({**metrics, **core.timing(), **extra,
                                       "samples": cfg.batch_size * ctx.get_world_size()})
        wait = min_period - (time.monotonic() - t0)
        if wait > 0:
            time.sleep(wait)
    if fenced_out:
        log.error("rank %d stops: fenced out (%s)", rank, fenced_out[0])
        return
    if rank == 0:
        replay.set_status.remote("finishing")
        if core.step > last_publish_step:
            guarded(publish)  # what was learned since the last publish reaches the fleet
        guarded(checkpoint)
        replay.record_step.remote({**core.last_metrics, **core.timing(), **extra, "samples": 0})


def _lease_held(lease) -> bool:
    try:
        return lease.held()
    except Exception:  # noqa: BLE001 -- Redis unreachable: the next publish's check decides
        return True


# ---- the driver -------------------------------------------------------------------------------

def _init_weights(cfg: LearnerConfig) -> bytes:
    """The pretrained checkpoint's weights (verified), as the learner ships them."""
    from fleetloop.policy.backend import export_version, load_checkpoint
    if not cfg.init_checkpoint:
        raise ValueError("no learner checkpoint to resume from and no init checkpoint given "
                         "(--init CHECKPOINT_DIR, e.g. the output of `fleetloop pretrain`)")
    return export_version(load_checkpoint(cfg.init_checkpoint)).weights


class LearnerHandle:
    """A running learner. stats() reads the replay actor; stop() finishes the current step on
    every worker, publishes and checkpoints, and tears the actors down."""

    def __init__(self, cfg: LearnerConfig, replay, trainer, started_ray: bool, renewer=None):
        self.config = cfg
        self.replay = replay
        self.trainer = trainer
        self._started_ray = started_ray
        self._renewer = renewer  # LeaseRenewer of this learner's lease (renewed from start_learner on)
        self.lease = renewer.lease if renewer is not None else None
        if renewer is not None:
            renewer.on_lost = self._lease_lost
        self.error: BaseException | None = None
        self.result = None
        self._thread = threading.Thread(target=self._fit, name="learner-fit", daemon=True)
        self._thread.start()
        self._final: dict | None = None

    def _fit(self) -> None:
        import ray
        try:
            self.result = self.trainer.fit()
            ray.get(self.replay.set_status.remote("stopped"))
        except BaseException as e:  # noqa: BLE001 -- reported through .error and the stats hash
            self.error = e
            log.exception("learner failed")
            try:
                ray.get(self.replay.set_status.remote("failed", repr(e)))
            except Exception:  # noqa: BLE001
                pass

    def _lease_lost(self) -> None:
        import ray
        try:
            ray.get(self.replay.set_status.remote("fenced", "lease lost to another learner"), timeout=10)
            self.replay.request_stop.remote()
        except Exception:  # noqa: BLE001
            pass

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        import ray
        if self._final is not None:
            return self._final
        return ray.get(self.replay.stats.remote())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the learner stops by itself (max_steps) or fails. True if it stopped."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_ready(self, timeout: float = 300.0) -> dict:
        """Block until the train workers have started (Ray Train's worker group takes tens of
        seconds to come up, much longer on a CPU-starved machine: start robots after this)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["status"] not in ("starting",):
                return s
            if not self.running or time.monotonic() > deadline:
                raise TimeoutError(f"learner not training after {timeout:.0f}s (status {s['status']}, "
                                   f"error {self.error!r})")
            time.sleep(0.5)

    def wait_for(self, step: int | None = None, versions: int | None = None, timeout: float = 120.0) -> dict:
        """Poll until the learner reaches `step` and/or has published `versions`; returns stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if (step is None or s["step"] >= step) and (versions is None or s["versions_published"] >= versions):
                return s
            if not self.running or time.monotonic() > deadline:
                raise TimeoutError(f"learner at step {s['step']}, {s['versions_published']} versions "
                                   f"(status {s['status']}, error {self.error!r})")
            time.sleep(0.5)

    def stop(self, timeout: float = 120.0) -> dict:
        import ray
        if self._final is not None:
            return self._final
        try:
            ray.get(self.replay.request_stop.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001
            log.warning("could not ask the learner to stop: %s", e)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("trainer did not stop within %.0fs", timeout)
        try:
            ray.get(self.replay.set_status.remote("failed" if self.error else "stopped",
                                                  repr(self.error) if self.error else None), timeout=30)
            self._final = ray.get(self.replay.stats.remote(), timeout=30)
            ray.get(self.replay.close.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001
            log.warning("replay actor: %s", e)
            self._final = {"status": "failed", "error": repr(e)}
        ray.kill(self.replay)
        if self._renewer is not None:
            self._renewer.stop()
            self.lease.release()
        if self._started_ray:
            ray.shutdown()
        return self._final


def start_learner(store_uri: str | None = None, redis_url: str | None = None, algo: str = "hg-dagger",
                  init_checkpoint: str | None = None, *, config: LearnerConfig | None = None,
                  **options: Any) -> LearnerHandle:
    """Start the learner; returns at once (the replay actor has rebuilt its index and, for RECAP,
    fitted its value function; the trainer is starting). `options` are LearnerConfig fields."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fleetloop import config as fl_config
    from fleetloop.buffer.store import open_store
    from fleetloop.learner.checkpoint import CheckpointStore
    from fleetloop.learner.replay import ReplayService
    from fleetloop.policy.backend import instruction_featurizer, spec_from_config, weights_metadata

    cfg = dataclasses.replace(config or LearnerConfig(), **options)
    cfg.store_uri = store_uri or cfg.store_uri or fl_config.default_store_uri()
    cfg.redis_url = redis_url or cfg.redis_url or fl_config.default_redis_url() or ""
    if not cfg.redis_url:
        raise ValueError("the learner needs a Redis URL (--redis or FLEETLOOP_REDIS_URL)")
    cfg.algo = algo or cfg.algo
    cfg.init_checkpoint = init_checkpoint or cfg.init_checkpoint
    from fleetloop.learner.algorithms import make_algorithm
    make_algorithm(cfg.algo, **cfg.algo_options)  # fail fast on a bad name/option

    started_ray = False
    if not ray.is_initialized():
        # "local" starts a fresh cluster rather than joining whatever `ray start` left behind.
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        from fleetloop.learner.ray_setup import HOOK
        kw: dict[str, Any] = {"include_dashboard": False, "runtime_env": {"worker_process_setup_hook": HOOK}}
        if address == "local" and cfg.ray_num_cpus:
            kw["num_cpus"] = cfg.ray_num_cpus
        ray.init(address=address, **kw)
        started_ray = True

    # The lease first: nothing below writes unless this learner holds it (learner/lease.py).
    import redis as redis_lib
    from fleetloop.learner.lease import Lease
    lease = Lease(redis_lib.Redis.from_url(cfg.redis_url, socket_timeout=10, socket_connect_timeout=5),
                  cfg.run_name, ttl_s=cfg.lease_ttl_s)
    try:
        lease.acquire(wait_s=cfg.lease_wait_s)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    from fleetloop.learner.lease import LeaseRenewer
    renewer = LeaseRenewer(lease).start()  # from now on: rebuilding a big index outlasts the TTL
    store = open_store(cfg.store_uri)
    loaded = CheckpointStore(store, cfg.checkpoint_prefix, keep=cfg.keep_checkpoints).load_latest()
    published: dict = {}
    if loaded is not None:  # (the replay actor restores the sampler and algorithm state itself)
        weights = loaded.files["model"]
        published = loaded.state.get("published", {})
        log.info("resuming from %s (step %d)", loaded.key, loaded.step)
    else:
        weights = _init_weights(cfg)
    model_cfg = weights_metadata(weights)
    spec = spec_from_config(model_cfg)
    instruction_featurizer(model_cfg)  # fail here (e.g. a base not provisioned), not in the replay actor

    if not published:
        from fleetloop.release.registry import PolicyRegistry
        registry = PolicyRegistry(store, redis_lib.Redis.from_url(cfg.redis_url), fence=lease)
        current = registry.pointer().get("version") or registry.latest_version()
        if current:
            published = {"version": current, "step": 0, "count": 0}
        elif cfg.publish_initial:  # robots need a version to run and to tag their episodes with
            m = registry.publish(weights, json.dumps(model_cfg, sort_keys=True), learner_step=0, algorithm="pretrain",
                                 backend=str(model_cfg.get("backend", "")),
                                 base_sha256=_base_of(model_cfg, weights),
                                 guidance=make_algorithm(cfg.algo, **cfg.algo_options).inference_settings())
            published = {"version": m.version, "step": 0, "count": 0}

    replay_cfg = {"store_uri": cfg.store_uri, "redis_url": cfg.redis_url, "algo": cfg.algo,
                  "algo_options": cfg.algo_options, "sampler": {"seed": cfg.seed, **cfg.sampler,
                                                                "horizon": spec.horizon},
                  "model_config": model_cfg, "cameras": list(spec.cameras), "image_size": spec.image_size,
                  "run_name": cfg.run_name, "stats_interval_s": cfg.stats_interval_s,
                  "checkpoint_prefix": cfg.checkpoint_prefix, "torch_threads": cfg.torch_threads,
                  "buffer": dict(cfg.buffer), "reconcile_interval_s": cfg.reconcile_interval_s}
    # Threaded (stats and loss reports need not queue behind a batch); restarted if it dies,
    # rebuilding its index from the store and its state from the newest checkpoint. It needs no
    # CPU reservation, so Ray could put it on any node -- and a training node that dies would take
    # it along. It goes on the driver's node (hard affinity: Ray 2.60 ignores a soft one for a
    # zero-resource actor; if that node dies, the driver and its lease die with it anyway).
    replay_opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 4, "max_restarts": 3}
    if cfg.replay_on_driver_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        replay_opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)
    replay = ray.remote(ReplayService).options(**replay_opts).remote(replay_cfg)
    try:
        ray.get(replay.ready.remote())
        if published.get("version"):
            ray.get(replay.published.remote(published["version"], published.get("step", 0), published.get("count", 0)))
    except BaseException:
        ray.kill(replay)
        renewer.stop()
        lease.release()
        if started_ray:
            ray.shutdown()
        raise

    storage = cfg.storage_path or os.path.join(tempfile.gettempdir(), "fleetloop-ray-train")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": asdict(cfg), "replay": replay, "init_weights": ray.put(weights),
                           "published": published, "lease": lease.spec(cfg.redis_url)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.use_gpu else {}),
                                                           **cfg.worker_resources},
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=f"fleetloop-{cfg.run_name}-{int(time.time())}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    return LearnerHandle(cfg, replay, trainer, started_ray, renewer=renewer)


def _base_of(model_cfg: dict, weights: bytes) -> str:
    """The base digest a weights blob needs: set iff the blob holds only trained tensors."""
    from fleetloop.policy.backend import backend_class, backend_of
    if not getattr(backend_class(backend_of(model_cfg)), "prefers_trained_only", False):
        return ""
    return str((model_cfg.get("base") or {}).get("sha256", ""))


def config_json(cfg: LearnerConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)
