"""The replay service: the learner's data side, in one process (a Ray actor in the app).

It owns the frame index and everything that writes to it or reads it whole:
  - on start, rebuilds the index from the object store (every episodes/*/manifest.json:
    demonstrations and all rollouts so far), then
  - a DataConsumer thread keeps it current from the Redis episode stream (exactly-once by id),
  - a label thread applies operator outcome labels (the store's labels/*.json, then
    LABEL_STREAM from its start: the rebuilt index holds the manifests' original outcomes),
  - the algorithm's data side (frame weights, RECAP's value function and indicators),
  - the sampler, which serves batches to the train workers (prefetched, one call per batch),
  - a stats thread writing the learner's figures to the Redis hash LEARNER_STATS_KEY.

Why an actor and not threads in the trainer: Ray Train runs the training function in separate
worker processes (one per GPU); a single owner of the index gives every rank the same
buffers, keeps image fetching and RECAP labelling off the GPU processes, and survives a
worker-group restart. Batches cross as numpy arrays through Ray's shared-memory object store.

Stopping is coordinated here so every DDP rank stops after the same step: once a stop is
requested, the highest step any rank has asked a batch for is the last one; later requests
get {"stop": True}.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import redis

from fleetloop import config
from fleetloop.buffer.codec import EpisodeRejected, read_episode
from fleetloop.buffer.consumer import DataConsumer
from fleetloop.buffer.index import BufferLimits, EpisodeEntry, FrameIndex, PayloadCache, entry_from_loaded
from fleetloop.buffer.reconcile import Reconciler
from fleetloop.buffer.sampler import BufferSampler, SamplerConfig
from fleetloop.buffer.store import StoreError, open_store
from fleetloop.learner.algorithms import make_algorithm
from fleetloop.learner.checkpoint import CheckpointStore, arrays_from_safetensors
from fleetloop.learner.status import stale_after_s

log = logging.getLogger(__name__)


def rebuild_index(store, index: FrameIndex, workers: int = 8, retries: int = 3) -> dict:
    """Index every committed episode in the store (list episodes/*/manifest.json ->
    read_episode). Rejected episodes are skipped and counted; a store error is retried."""
    keys = sorted(k for k in store.list("episodes/") if k.endswith("/manifest.json"))

    def load(key):
        for attempt in range(retries + 1):
            try:
                return key, read_episode(store, key), None
            except EpisodeRejected as e:
                return key, None, e.reason
            except (StoreError, OSError):
                if attempt == retries:
                    raise
                time.sleep(0.2 * 2 ** attempt)

    rejected: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="index-rebuild") as pool:
        for key, loaded, reason in pool.map(load, keys):
            if loaded is None:
                rejected[reason] = rejected.get(reason, 0) + 1
                log.warning("rebuild: skipping %s (%s)", key, reason)
            else:
                index.add(entry_from_loaded(loaded))
    return {"manifests": len(keys), "indexed": len(index), "rejected": rejected}


class LabelFollower:
    """Applies operator outcome labels to the index: first the durable copies the dashboard keeps
    in the store (labels/<episode_id>.json), then LABEL_STREAM (episode_id, outcome, by,
    labelled_ns) from its start. Per episode the newest label (labelled_ns) wins, whichever
    path brings it. Labels for episodes not indexed yet wait until the episode arrives."""

    def __init__(self, client: redis.Redis, index: FrameIndex, store=None, stream: str = config.LABEL_STREAM):
        self.client, self.index, self.store, self.stream = client, index, store, stream
        self.last_id = "0-0"  # replay every label: the index was rebuilt from the manifests
        self.latest: dict[str, tuple[int, str]] = {}  # episode_id -> (labelled_ns, outcome)
        self.pending: set[str] = set()
        self.applied = 0
        self.invalid = 0
        self._lock = threading.Lock()

    def apply(self, episode_id: str, outcome: str, labelled_ns: int = 0) -> None:
        if outcome not in ("success", "failure", "unknown"):
            self.invalid += 1
            return
        with self._lock:
            old = self.latest.get(episode_id)
            if old and (old[0] > labelled_ns or old == (labelled_ns, outcome)):
                return  # an older label arriving late, or the same one by the other path
            self.latest[episode_id] = (labelled_ns, outcome)
            if episode_id in self.index:
                self.index.relabel(episode_id, outcome)
                self.applied += 1
                self.pending.discard(episode_id)
            else:
                self.pending.add(episode_id)

    def on_indexed(self, entry: EpisodeEntry) -> None:
        with self._lock:
            label = self.latest.get(entry.episode_id) if entry.episode_id in self.pending else None
        if label is not None:
            self.apply(entry.episode_id, label[1], label[0])

    def load_store_labels(self) -> int:
        n = 0
        for key in (self.store.list("labels/") if self.store is not None else []):
            if key.endswith(".json"):
                try:
                    r = json.loads(self.store.get(key))
                    self.apply(r["episode_id"], r["outcome"], int(r.get("labelled_ns") or 0))
                    n += 1
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("ignoring malformed label %s: %s", key, e)
        return n

    def poll_once(self, block_ms: int = 500) -> int:
        res = self.client.xread({self.stream: self.last_id}, count=256,
                                block=block_ms if block_ms > 0 else None)  # BLOCK 0 = forever
        n = 0
        for _stream, messages in res or []:
            for msg_id, fields in messages:
                f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                     for k, v in fields.items()}
                self.last_id = msg_id.decode() if isinstance(msg_id, bytes) else msg_id
                if f.get("episode_id") and f.get("outcome"):
                    self.apply(f["episode_id"], f["outcome"], int(f.get("labelled_ns") or 0))
                    n += 1
        return n

    def run(self, stop: threading.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                self.poll_once()
                backoff = 0.1
            except redis.RedisError as e:
                log.warning("label stream unavailable (%s); retrying in %.1fs", e, backoff)
                stop.wait(backoff)
                backoff = min(5.0, backoff * 2)


class ReplayService:
    """See the module docstring. `cfg` is a plain dict (it crosses to a Ray actor):
    store_uri, redis_url, algo, algo_options, sampler (SamplerConfig fields), model_config (the
    policy's config: its instruction features), cameras, image_size, run_name, checkpoint_prefix (restore from its latest checkpoint),
    stats_interval_s, torch_threads, consumer (bool), encode (tests: a stand-in encoder)."""

    def __init__(self, cfg: dict):
        import torch
        torch.set_num_threads(int(cfg.get("torch_threads", 1)))
        self.cfg = cfg
        self.store = open_store(cfg["store_uri"])
        self.redis = redis.Redis.from_url(cfg["redis_url"], socket_timeout=10, socket_connect_timeout=5)
        # The online buffer is bounded by cfg["buffer"] (BufferLimits: max_frames, max_bytes,
        # max_age_s; eviction policy in buffer/index.py); the store keeps everything.
        self.index = FrameIndex(BufferLimits(**cfg.get("buffer", {})))
        self.payloads = PayloadCache(self.store, max_bytes=int(cfg.get("payload_cache_mb", 256)) * 1024 * 1024)
        self.algorithm = make_algorithm(cfg.get("algo", "hg-dagger"), **cfg.get("algo_options", {}))
        encode = cfg.get("encode")
        if encode is None:
            from fleetloop.policy.language import get_encoder
            encode = get_encoder().encode
        self.algorithm.bind(encode)  # the value function's language embedding (MiniLM)
        # The policy's own instruction features (tiny: the same embedding; hf-vla: token ids).
        featurize = encode
        if cfg.get("model_config"):
            from fleetloop.policy.backend import instruction_featurizer
            featurize = instruction_featurizer(cfg["model_config"])
        self.sampler = BufferSampler(self.index, SamplerConfig(**cfg.get("sampler", {})), self.algorithm,
                                     encode=featurize, image_fn=self.payloads.images,
                                     cameras=cfg.get("cameras", []), image_size=int(cfg.get("image_size", 64)))
        self.restored_from = self._restore(cfg.get("checkpoint_prefix"))
        self._lock = threading.RLock()   # sampling and labelling refreshes, one at a time
        self._stop_event = threading.Event()
        self.stop_requested = False
        self.stop_step: int | None = None
        self.max_requested_step = 0
        self.started_at = time.time()
        self.status = "starting"
        self.learner: dict = {"step": 0, "versions_published": 0, "current_version": ""}
        self._steps: deque = deque(maxlen=100)  # (time, step, samples) from rank 0
        self.error: str | None = None

        t0 = time.time()
        self.rebuild = rebuild_index(self.store, self.index)
        self.rebuild["seconds"] = round(time.time() - t0, 2)
        self.labels = LabelFollower(self.redis, self.index, self.store)
        self.labels.load_store_labels()    # operator labels before the first labels are computed
        self.labels.poll_once(block_ms=0)
        with self._lock:
            self.algorithm.refresh(self.index)  # RECAP: fits the value function on what is there
        self.consumer = None
        self._threads = []
        if cfg.get("consumer", True):
            self.consumer = DataConsumer(self.store, self.redis, self.index, on_indexed=self.labels.on_indexed,
                                         consumer_name=f"learner-{cfg.get('run_name', 'default')}",
                                         fetch_workers=int(cfg.get("fetch_workers", 4)))
            self._threads.append(self.consumer.start_thread(self._stop_event))
        # Self-healing: committed episodes whose events Redis lost are found in the store.
        self.reconciler = Reconciler(self.store, self.index, name="learner", client=self.redis,
                                     on_indexed=self.labels.on_indexed, group=config.CONSUMER_GROUP,
                                     interval_s=float(cfg.get("reconcile_interval_s", 300.0)),
                                     check_s=float(cfg.get("reconcile_check_s", 5.0)))
        self._threads.append(self.reconciler.start_thread(self._stop_event, initial=False))
        for name, target in (("labels", self.labels.run), ("learner-stats", self._stats_loop)):
            t = threading.Thread(target=target, args=(self._stop_event,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _restore(self, prefix: str | None) -> str | None:
        """Sampler and algorithm state from the learner's latest checkpoint (read here rather
        than passed in, so a restarted replay actor also resumes from the newest one)."""
        if not prefix:
            return None
        loaded = CheckpointStore(self.store, prefix).load_latest()
        if loaded is None:
            return None
        if loaded.state.get("sampler"):
            self.sampler.load_state_dict(loaded.state["sampler"])
        if loaded.state.get("algo") == self.algorithm.name and loaded.state.get("algorithm") is not None:
            # (another algorithm's labels and value function do not apply: start those fresh)
            self.algorithm.load_state(loaded.state["algorithm"], arrays_from_safetensors(loaded.files["algorithm"]))
        return loaded.key

    # ---- called by the train workers ----------------------------------------------------------

    def ready(self) -> dict:
        return {"episodes": len(self.index), "frames": self.index.frames, "rebuild": self.rebuild}

    def begin(self, rank: int, step: int) -> None:
        """A worker (re)starts at `step` (0, or a checkpoint's): forget loss averages past it."""
        with self._lock:
            if rank == 0:
                self.sampler.mix.rewind(step)
                self.learner["step"] = step
            self.status = "training"

    def sample(self, rank: int, step: int, batch_size: int) -> dict:
        with self._lock:
            if self.stop_requested and self.stop_step is not None and step > self.stop_step:
                return {"stop": True}
            self.max_requested_step = max(self.max_requested_step, step)
            self.algorithm.refresh(self.index)
            batch = self.sampler.sample(batch_size)
            if batch is None:
                return {"wait": True}
            return {"batch": batch}

    def report_losses(self, step: int, tasks: list[str], task_idx, online, losses) -> None:
        self.sampler.observe_losses(step, tasks, task_idx, online, losses)

    def record_step(self, metrics: dict) -> None:
        """Rank 0's metrics after a step (loss, timing, ...)."""
        self.learner.update(metrics)
        self._steps.append((time.time(), int(metrics.get("step", 0)), int(metrics.get("samples", 0))))

    def published(self, version: str, step: int, count: int) -> None:
        self.sampler.set_learner_version(version)
        self.learner.update(current_version=version, last_publish_step=step, versions_published=count)

    def export_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Sampler and algorithm state for a checkpoint: (JSON-able dict, named arrays)."""
        with self._lock:
            algo_meta, algo_tensors = self.algorithm.state()
            return {"sampler": self.sampler.state_dict(), "algorithm": algo_meta,
                    "algorithm_name": self.algorithm.name}, algo_tensors

    # ---- called by the driver -----------------------------------------------------------------

    def request_stop(self) -> int:
        with self._lock:
            if not self.stop_requested:
                self.stop_requested = True
                self.stop_step = self.max_requested_step
                self.status = "stopping"
            return self.stop_step

    def set_status(self, status: str, error: str | None = None) -> None:
        self.status = status
        if error:
            self.error = error
        self.write_stats()

    def close(self) -> None:
        self._stop_event.set()
        for t in self._threads:
            t.join(5)
        self.write_stats()

    # ---- stats -----------------------------------------------------------------------------------

    def _rates(self) -> dict:
        if len(self._steps) < 2:
            return {}
        (t0, s0, n0), (t1, s1, _n1) = self._steps[0], self._steps[-1]
        n = sum(x[2] for x in list(self._steps)[1:])
        dt = t1 - t0
        return {"steps_per_s": round((s1 - s0) / dt, 3), "samples_per_s": round(n / dt, 1)} if dt > 0 else {}

    def stats(self) -> dict:
        learner = dict(self.learner)
        s = self.sampler.stats()
        out = {
            "status": self.status, "error": self.error, "algorithm": self.algorithm.name,
            "step": learner.get("step", 0), **self._rates(),
            "loss": learner.get("loss"), "loss_online": learner.get("loss_online"),
            "loss_offline": learner.get("loss_offline"), "loss_ma": s["loss_ma"],
            "w_on": s["w_on"], "buffer": self.index.stats(), "eligible_frames": s["eligible_frames"],
            "staleness": s["staleness"], "versions_published": learner.get("versions_published", 0),
            "current_version": learner.get("current_version", ""),
            "timing": {k: learner.get(k) for k in ("sample_ms", "train_ms", "data_wait_fraction", "publish_ms",
                                                    "checkpoint_ms") if learner.get(k) is not None},
            "consumer": self.consumer.stats.as_dict() if self.consumer else None,
            "labels": {"applied": self.labels.applied, "pending": len(self.labels.pending),
                       "invalid": self.labels.invalid},
            "algo": self.algorithm.stats(), "rebuild": self.rebuild, "restored_from": self.restored_from,
            "reconcile": self.reconciler.stats() if getattr(self, "reconciler", None) else None,
            "quarantined": s["quarantined"], "errors": learner.get("errors", {}),
            "last_checkpoint": learner.get("last_checkpoint"), "uptime_s": round(time.time() - self.started_at, 1),
            "updated_ns": time.time_ns(),
            # readers call it "stale" past this (learner/status.py): a dead learner writes no "stopped"
            "stale_after_s": stale_after_s(float(self.cfg.get("stats_interval_s", 1.0))),
        }
        return out

    def write_stats(self) -> None:
        try:
            doc = self.stats()
            self.redis.hset(self.cfg.get("stats_key", config.LEARNER_STATS_KEY),
                            mapping={k: json.dumps(v, default=_json_default) for k, v in doc.items()})
        except redis.RedisError as e:
            log.warning("could not write learner stats: %s", e)

    def _stats_loop(self, stop: threading.Event) -> None:
        interval = float(self.cfg.get("stats_interval_s", 1.0))
        while not stop.wait(interval):
            self.index.enforce()  # an age limit moves with the clock, not only on add
            self.write_stats()


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
