"""Online/offline buffers over the frame index, and SOP's task-balanced adaptive sampler.

Buffers (views, no copies):
  B_on  = every frame the fleet sent (source ONLINE: rollouts, with their interventions)
  B_off = the demonstrations (source OFFLINE)
split per task. An algorithm decides which frames of a buffer train and how much (a per-frame
sampling weight; 0 = never), optionally in classes with a fixed mix (IWR: 50% intervention,
50% autonomous), which recorded actions are valid chunk targets, and the RECAP indicator.

One draw of a batch element (SOP, Sec. "adaptive sampling"):
  1. task m ~ Uniform(tasks)                        each of the M tasks gets 1/M of the batch
  2. online with probability w_on(m), else offline
  3. a frame of that buffer with probability proportional to its weight (within its class)

  w_on(m) = exp(alpha * l_on) / (exp(alpha * l_on) + exp(l_off)),  clipped to [0.2, 0.8]

l_on / l_off are moving averages of task m's training loss on online / offline samples over the
last W = 200 learner steps; alpha > 1 favours online data when the policy does worse there.
Warm-up (SOP does not say): while the shorter of the two windows holds n < W steps, w_on is
blended from 0.5 toward the formula in proportion n / W, so a handful of noisy early losses
cannot swing the mix. A task with no eligible online frames samples offline only (w_on = 0), one
with no offline frames online only (w_on = 1).

Every sample carries the policy version that produced its episode; staleness is the learner's
current version number minus that one (online samples; demonstrations have no version).

Imports only numpy here (the GPU benchmark machine has torch and numpy, nothing else).
"""
from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

# Same values as fleetloop.buffer.index.ONLINE/OFFLINE (not imported: index pulls in protobuf).
ONLINE, OFFLINE = "online", "offline"
SOURCES = (ONLINE, OFFLINE)
INDICATOR_UNSET = 0  # fleetloop.policy.model.INDICATOR_UNSET


# ---- the adaptive online fraction ---------------------------------------------------------

def online_fraction(l_on: float, l_off: float, alpha: float) -> float:
    """SOP's w_on = exp(alpha*l_on) / (exp(alpha*l_on) + exp(l_off)), unclipped.
    Computed as the equal sigmoid(alpha*l_on - l_off), which cannot overflow."""
    z = alpha * l_on - l_off
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass
class SamplerConfig:
    window: int = 200          # W: learner steps in the loss moving averages
    alpha: float = 2.0         # > 1: favour the online buffer when its loss is higher
    w_min: float = 0.2         # clip for w_on
    w_max: float = 0.8
    loss_scale: float = 1.0    # losses are multiplied by this before the formula (1 = as in SOP)
    horizon: int = 8           # H: chunk length of the targets
    refresh_s: float = 1.0     # newly indexed episodes join the pools at most this often
    seed: int = 0

    def __post_init__(self):
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.alpha <= 1:
            raise ValueError(f"alpha must be > 1 (SOP), got {self.alpha}")
        if not 0.0 <= self.w_min <= self.w_max <= 1.0:
            raise ValueError("need 0 <= w_min <= w_max <= 1")


class AdaptiveMix:
    """Per-task moving-average losses of the online and offline buffers, and w_on from them.
    Windows are indexed by learner step: an entry per step holds (loss sum, sample count) of
    that step; entries older than W steps fall out."""

    def __init__(self, config: SamplerConfig):
        self.cfg = config
        self.step = 0
        self._hist: dict[tuple[str, str], deque] = {}  # (task, source) -> deque[[step, sum, count]]

    def observe(self, step: int, task: str, source: str, loss_sum: float, count: int) -> None:
        if count <= 0 or not math.isfinite(loss_sum):
            return
        h = self._hist.setdefault((task, source), deque())
        if h and h[-1][0] == step:    # several ranks (or calls) report the same step: accumulate
            h[-1][1] += float(loss_sum)
            h[-1][2] += int(count)
        else:
            h.append([int(step), float(loss_sum), int(count)])
        self.step = max(self.step, int(step))
        self._evict(h)

    def rewind(self, step: int) -> None:
        """The learner restarted from a checkpoint at `step`: forget losses from after it."""
        self.step = int(step)
        for h in self._hist.values():
            while h and h[-1][0] > step:
                h.pop()

    def _evict(self, h: deque) -> None:
        while h and h[0][0] <= self.step - self.cfg.window:
            h.popleft()

    def _window(self, task: str, source: str) -> deque:
        h = self._hist.get((task, source), deque())
        self._evict(h)
        return h

    def mean_loss(self, task: str, source: str) -> float | None:
        """Average over the window's steps of each step's mean loss (every step counts once)."""
        h = self._window(task, source)
        if not h:
            return None
        return float(np.mean([s / c for _step, s, c in h]))

    def fraction(self, task: str, has_online: bool = True, has_offline: bool = True) -> float:
        if not has_online:
            return 0.0
        if not has_offline:
            return 1.0
        l_on, l_off = self.mean_loss(task, ONLINE), self.mean_loss(task, OFFLINE)
        if l_on is None or l_off is None:
            return 0.5  # no signal yet
        c = self.cfg
        w = online_fraction(c.loss_scale * l_on, c.loss_scale * l_off, c.alpha)
        w = min(c.w_max, max(c.w_min, w))
        fill = min(1.0, min(len(self._window(task, ONLINE)), len(self._window(task, OFFLINE))) / c.window)
        return 0.5 + fill * (w - 0.5)  # warm-up: 0.5 -> formula as the window fills

    def state_dict(self) -> dict:
        hist: dict[str, dict[str, list]] = {}
        for (task, source), h in self._hist.items():
            hist.setdefault(task, {})[source] = [list(e) for e in h]
        return {"step": self.step, "hist": hist}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        self._hist = {(task, source): deque([int(a), float(b), int(c)] for a, b, c in entries)
                      for task, by_source in state.get("hist", {}).items()
                      for source, entries in by_source.items()}


# ---- what the sampler asks of an algorithm ------------------------------------------------

class FrameRules(Protocol):
    """The data-side part of a learner algorithm (fleetloop.learner.algorithms.Algorithm)."""
    weights_version: int                 # bump when frame_weights/frame_classes would change
    class_mix: dict[int, float] | None   # fixed share per frame class within a buffer (None: by weight)

    def frame_weights(self, entry) -> np.ndarray: ...   # [T] float >= 0
    def frame_classes(self, entry) -> np.ndarray: ...   # [T] int
    def action_labels(self, entry) -> np.ndarray: ...   # [T] bool: recorded action is a valid target
    def indicators(self, entry) -> np.ndarray: ...      # [T] int64: 0 unset, 1 negative, 2 positive


class UniformRules:
    """Every frame, equal weight, one class, no indicator: plain behaviour cloning."""
    weights_version = 0
    class_mix = None

    def frame_weights(self, entry) -> np.ndarray:
        return np.ones(entry.num_steps, np.float32)

    def frame_classes(self, entry) -> np.ndarray:
        return np.zeros(entry.num_steps, np.int8)

    def action_labels(self, entry) -> np.ndarray:
        return np.ones(entry.num_steps, bool)

    def indicators(self, entry) -> np.ndarray:
        return np.zeros(entry.num_steps, np.int64)


_VERSION_NUM = re.compile(r"(\d+)$")


def version_number(version: str) -> int:
    """'v000012' -> 12; -1 when the string carries no number ('' for demonstrations)."""
    m = _VERSION_NUM.search(version or "")
    return int(m.group(1)) if m else -1


def chunk_indices(t: np.ndarray, num_steps: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Target steps t..t+H-1 clipped to the episode, and the mask (t+h < T): the same targets as
    fleetloop.policy.data.chunk_targets, gathered per sampled frame instead of per episode."""
    idx = t[:, None] + np.arange(horizon)[None, :]
    valid = idx < num_steps[:, None]
    return np.minimum(idx, num_steps[:, None] - 1), valid


# ---- pools: the eligible frames of one (task, source) buffer --------------------------------

@dataclass
class _ClassPool:
    ep: np.ndarray       # int32 [n] episode ordinal in the pool
    t: np.ndarray        # int32 [n] step
    cum: np.ndarray      # float64 [n] cumulative weight

    @property
    def total(self) -> float:
        return float(self.cum[-1]) if len(self.cum) else 0.0


class _Pool:
    """The eligible frames of one (task, source) buffer, grouped by class. Append-only (the
    index only ever adds episodes); the flat arrays are rebuilt lazily after appends."""

    def __init__(self):
        self.entries: list = []            # episodes with at least one eligible frame
        self.version_num: list[int] = []   # their policy version numbers (-1: none)
        self.frames = 0                    # eligible frames
        self._parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.classes: dict[int, _ClassPool] = {}
        self._dirty = False

    def add(self, entry, w: np.ndarray, c: np.ndarray) -> None:
        nz = np.flatnonzero(w > 0)
        if not len(nz):
            return
        ordinal = len(self.entries)
        self.entries.append(entry)
        self.version_num.append(version_number(entry.policy_version))
        self.frames += len(nz)
        for k in np.unique(c[nz]):
            sel = nz[c[nz] == k]
            self._parts.setdefault(int(k), []).append((np.full(len(sel), ordinal, np.int32), sel.astype(np.int32), w[sel]))
        self._dirty = True

    def finish(self) -> None:
        if self._dirty:
            for k, parts in self._parts.items():
                if len(parts) > 1:  # keep one concatenated part: later appends stay cheap
                    parts[:] = [tuple(np.concatenate(x) for x in zip(*parts))]
                ep, t, w = parts[0]
                self.classes[k] = _ClassPool(ep, t, np.cumsum(w))
            self._dirty = False

    def draw(self, n: int, rng: np.random.Generator, mix: dict[int, float] | None) -> tuple[list, np.ndarray]:
        """n frames: a class by `mix` (renormalised over the classes present; None: by weight),
        then a frame with probability proportional to its weight."""
        keys = [k for k, c in self.classes.items() if c.total > 0]
        share = np.array([(mix.get(k, 0.0) if mix else self.classes[k].total) for k in keys], np.float64)
        if share.sum() <= 0:  # the mix names none of the classes present: fall back to weights
            share = np.array([self.classes[k].total for k in keys])
        which = rng.choice(len(keys), size=n, p=share / share.sum())
        eps, ts = np.empty(n, np.int64), np.empty(n, np.int64)
        for j, k in enumerate(keys):
            sel = np.flatnonzero(which == j)
            if not len(sel):
                continue
            c = self.classes[k]
            pos = np.searchsorted(c.cum, rng.random(len(sel)) * c.total, side="right")
            pos = np.minimum(pos, len(c.cum) - 1)
            eps[sel], ts[sel] = c.ep[pos], c.t[pos]
        return [self.entries[i] for i in eps], ts


@dataclass
class SampledBatch:
    """A batch in the model's format (numpy, so it crosses process boundaries cheaply) + meta."""
    arrays: dict[str, np.ndarray]  # images?, state, lang, indicator, actions, action_mask, weight
    tasks: list[str]               # task names; meta["task"] indexes into this
    meta: dict[str, Any]           # task [B], online [B], policy_version [B] str, version_num [B],
                                   # staleness [B] (-1: offline), episode_id [B], t [B]


class BufferSampler:
    """Task-balanced adaptive sampling over a FrameIndex (thread-safe).

    index:    fleetloop.buffer.index.FrameIndex (or anything with version/tasks()/episodes())
    rules:    the algorithm's FrameRules (default: uniform BC)
    encode:   instruction -> the policy's instruction features (backend.instruction_featurizer:
              a float32 [384] embedding, or token ids); cached per instruction here
    image_fn: (entry, t) -> {camera: HxWx3 uint8} (PayloadCache.images); needed iff cameras
    cameras:  the model's cameras, stacked on channels in this order (empty: state-only model)
    """

    def __init__(self, index, config: SamplerConfig | None = None, rules: FrameRules | None = None,
                 encode: Callable[[str], np.ndarray] | None = None,
                 image_fn: Callable[[Any, int], dict[str, np.ndarray]] | None = None,
                 cameras: Sequence[str] = (), image_size: int = 64):
        self.index = index
        self.cfg = config or SamplerConfig()
        self.rules = rules or UniformRules()
        self.encode = encode
        self.image_fn = image_fn
        self.cameras = list(cameras)
        self.image_size = image_size
        if self.cameras and image_fn is None:
            raise ValueError("a model with cameras needs image_fn (PayloadCache.images)")
        self.mix = AdaptiveMix(self.cfg)
        self.rng = np.random.default_rng(self.cfg.seed)
        self.learner_version = -1        # number of the newest version the learner published
        self.quarantined: set[str] = set()
        self._lock = threading.RLock()
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._seen: dict[tuple[str, str], int] = {}   # episodes of the index already considered
        self._seen_total = 0
        self._built_index_version = self._built_weights_version = self._built_quarantined = -1
        self._last_refresh = 0.0
        self._lang_cache: dict[str, np.ndarray] = {}
        self._staleness: deque = deque(maxlen=50)  # per-batch arrays of online staleness
        self.batches = 0
        self.skipped_no_images = 0

    # ---- pools ----------------------------------------------------------------------------

    def _eligibility(self, entry) -> tuple[np.ndarray, np.ndarray]:
        w = np.asarray(self.rules.frame_weights(entry), np.float64)
        c = np.asarray(self.rules.frame_classes(entry), np.int64)
        if w.shape != (entry.num_steps,) or c.shape != (entry.num_steps,):
            raise ValueError(f"algorithm returned per-frame arrays of the wrong length for {entry.episode_id}")
        return w, c

    def _usable(self, entry) -> bool:
        if entry.episode_id in self.quarantined or entry.num_steps == 0:
            return False
        if self.cameras and not all(ref.images_bytes for ref in entry.chunks):
            self.skipped_no_images += 1
            return False
        return True

    def refresh(self, force: bool = False) -> None:
        """Bring the pools up to date with the index: append the episodes that arrived since the
        last refresh (at most every `refresh_s`, so a busy fleet does not make every batch pay
        for it); rebuild from scratch when something changed in place (a relabel, new algorithm
        weights, a quarantined episode)."""
        with self._lock:
            idx_version = self.index.version
            in_place = (self.rules.weights_version != self._built_weights_version
                        or len(self.quarantined) != self._built_quarantined)
            if not force and not in_place and idx_version == self._built_index_version:
                return
            now = time.monotonic()
            if not (force or in_place) and self._pools and now - self._last_refresh < self.cfg.refresh_s:
                return
            # The index version counts adds and relabels: if it moved by exactly the number of
            # new episodes, nothing changed in place and appending suffices.
            appended_only = idx_version - self._built_index_version == len(self.index) - self._seen_total
            if force or in_place or not appended_only:
                self._pools, self._seen, self._seen_total, self.skipped_no_images = {}, {}, 0, 0
            for task in self.index.tasks():
                for source in SOURCES:
                    key = (task, source)
                    entries = self.index.episodes(task, source)
                    new = entries[self._seen.get(key, 0):]
                    if not new:
                        continue
                    pool = self._pools.get(key) or _Pool()
                    for e in new:
                        if self._usable(e):
                            pool.add(e, *self._eligibility(e))
                    pool.finish()
                    if pool.entries:
                        self._pools[key] = pool
                    self._seen[key] = len(entries)
                    self._seen_total += len(new)
            self._built_index_version = idx_version
            self._built_weights_version = self.rules.weights_version
            self._built_quarantined = len(self.quarantined)
            self._last_refresh = now

    def tasks(self) -> list[str]:
        """Tasks with at least one eligible frame (the M of 1/M)."""
        with self._lock:
            self.refresh()
            return sorted({task for task, _s in self._pools})

    def online_fractions(self) -> dict[str, float]:
        with self._lock:
            return {t: self.mix.fraction(t, (t, ONLINE) in self._pools, (t, OFFLINE) in self._pools)
                    for t in self.tasks()}

    def eligible_frames(self) -> dict[str, dict[str, int]]:
        with self._lock:
            self.refresh()
            out: dict[str, dict[str, int]] = {}
            for (task, source), pool in self._pools.items():
                out.setdefault(task, {})[source] = pool.frames
            return out

    # ---- drawing --------------------------------------------------------------------------

    def draw(self, batch_size: int) -> tuple[list, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(entries, t, task index, online mask, task names) for batch_size frames, or empty
        lists when nothing is eligible yet."""
        with self._lock:
            tasks = self.tasks()
            if not tasks:
                return [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool), []
            task_idx = self.rng.integers(len(tasks), size=batch_size)          # 1/M per task
            online = np.zeros(batch_size, bool)
            entries: list = [None] * batch_size
            ts = np.zeros(batch_size, np.int64)
            for j, task in enumerate(tasks):
                rows = np.flatnonzero(task_idx == j)
                if not len(rows):
                    continue
                on_pool, off_pool = self._pools.get((task, ONLINE)), self._pools.get((task, OFFLINE))
                w_on = self.mix.fraction(task, on_pool is not None, off_pool is not None)
                is_on = self.rng.random(len(rows)) < w_on                          # online w.p. w_on
                online[rows] = is_on
                for pool, sel in ((on_pool, rows[is_on]), (off_pool, rows[~is_on])):
                    if len(sel):
                        es, t = pool.draw(len(sel), self.rng, self.rules.class_mix)
                        ts[sel] = t
                        for r, e in zip(sel, es):
                            entries[r] = e
            return entries, ts, task_idx, online, tasks

    def _lang(self, instruction: str) -> np.ndarray:
        e = self._lang_cache.get(instruction)
        if e is None:
            if self.encode is None:
                raise ValueError("BufferSampler needs encode= (LanguageEncoder.encode) to build batches")
            e = np.asarray(self.encode(instruction))  # an embedding (float) or token ids (int)
            e = self._lang_cache[instruction] = e.astype(np.float32) if e.dtype.kind == "f" else e
        return e

    def _image(self, entry, t: int) -> np.ndarray:
        by_cam = self.image_fn(entry, int(t))
        try:
            frames = [by_cam[c] for c in self.cameras]
        except KeyError as e:
            raise KeyError(f"episode {entry.episode_id} step {t} lacks camera {e.args[0]!r}") from None
        img = np.concatenate(frames, axis=-1)
        if img.shape[:2] != (self.image_size, self.image_size):  # a setup error, not bad data
            raise RuntimeError(f"episode {entry.episode_id}: images are {img.shape[:2]}, the model takes "
                             f"{self.image_size}x{self.image_size}")
        return img.transpose(2, 0, 1)

    def sample(self, batch_size: int) -> SampledBatch | None:
        """A batch in PolicyModel.loss format, or None while no frame is eligible. An episode
        whose images fail verification is quarantined and the batch redrawn."""
        for _attempt in range(5):
            with self._lock:
                entries, ts, task_idx, online, tasks = self.draw(batch_size)
                if not entries:
                    return None
                try:
                    return self._build(entries, ts, task_idx, online, tasks)
                except _Quarantine as q:
                    self.quarantined.add(q.episode_id)
        raise RuntimeError("could not build a batch: episodes keep failing verification")

    def _build(self, entries, ts, task_idx, online, tasks) -> SampledBatch:
        b, h = len(entries), self.cfg.horizon
        rules = self.rules
        state = np.stack([e.states[t] for e, t in zip(entries, ts)]).astype(np.float32)
        nsteps = np.array([e.num_steps for e in entries])
        idx, valid = chunk_indices(ts, nsteps, h)
        actions = np.stack([e.actions[i] for e, i in zip(entries, idx)]).astype(np.float32)   # [B, H, A]
        labels = np.stack([rules.action_labels(e)[i] for e, i in zip(entries, idx)])         # [B, H]
        # A chunk target is the contiguous run of valid expert/recorded actions from t: stop at
        # the episode end or at the first action the algorithm does not accept as a label.
        mask = np.cumprod(valid & labels, axis=1).astype(np.float32)
        indicator = np.array([rules.indicators(e)[t] for e, t in zip(entries, ts)], np.int64)
        lang = np.stack([self._lang(e.instruction) for e in entries])
        arrays = {"state": state, "lang": lang, "indicator": indicator, "actions": actions,
                  "action_mask": mask, "weight": np.ones(b, np.float32)}
        if self.cameras:
            imgs = []
            for e, t in zip(entries, ts):
                try:
                    imgs.append(self._image(e, t))
                except Exception as err:
                    # Bad payload -- EpisodeRejected (digest mismatch), a missing camera, an
                    # undecodable image: quarantine the episode. Matched by name so this module
                    # needs no protobuf/PIL. A store outage (StoreError) propagates: retry later.
                    if isinstance(err, (ValueError, KeyError)) or type(err).__name__ in _BAD_PAYLOAD:
                        raise _Quarantine(e.episode_id) from err
                    raise
            arrays["images"] = np.ascontiguousarray(np.stack(imgs), dtype=np.uint8)
        versions = [e.policy_version for e in entries]
        vnum = np.array([version_number(v) for v in versions], np.int64)
        staleness = np.where(online & (vnum >= 0) & (self.learner_version >= 0),
                             self.learner_version - vnum, -1)
        if (staleness >= 0).any():
            self._staleness.append(staleness[staleness >= 0])
        self.batches += 1
        meta = {"task": task_idx, "online": online, "policy_version": versions, "version_num": vnum,
                "staleness": staleness, "episode_id": [e.episode_id for e in entries], "t": ts}
        return SampledBatch(arrays, tasks, meta)

    # ---- feedback, versions, stats, state ---------------------------------------------------

    def observe_losses(self, step: int, tasks: Sequence[str], task_idx: Iterable[int],
                       online: Iterable[bool], losses: Iterable[float]) -> None:
        """Per-sample training losses of learner step `step` -> the moving averages."""
        task_idx, online = np.asarray(task_idx), np.asarray(online, bool)
        losses = np.asarray(losses, np.float64)
        with self._lock:
            for j, task in enumerate(tasks):
                for source, sel in ((ONLINE, (task_idx == j) & online), (OFFLINE, (task_idx == j) & ~online)):
                    if sel.any():
                        self.mix.observe(step, task, source, float(losses[sel].sum()), int(sel.sum()))

    def set_learner_version(self, version: str | int) -> None:
        self.learner_version = version if isinstance(version, int) else version_number(version)

    def staleness_stats(self) -> dict:
        """Staleness (learner version - data version) of online samples in the last 50 batches,
        and of the online buffer's frames."""
        with self._lock:
            recent = np.concatenate(list(self._staleness)) if self._staleness else np.zeros(0)
            out: dict[str, Any] = {"learner_version": self.learner_version}
            if len(recent):
                out.update(sampled_mean=round(float(recent.mean()), 3), sampled_p50=float(np.percentile(recent, 50)),
                           sampled_p90=float(np.percentile(recent, 90)), sampled_max=int(recent.max()))
            online = [p for (_task, source), p in self._pools.items() if source == ONLINE]
            v = np.concatenate([p.version_num for p in online]) if online else np.zeros(0)
            if (v >= 0).any() and self.learner_version >= 0:  # per eligible episode of the online buffer
                s = self.learner_version - v[v >= 0]
                out["buffer_mean"] = round(float(s.mean()), 3)
                out["buffer_max"] = int(s.max())
            return out

    def stats(self) -> dict:
        with self._lock:
            self.refresh()
            losses = {t: {s: self.mix.mean_loss(t, s) for s in SOURCES} for t in self.tasks()}
            return {"tasks": self.tasks(), "w_on": self.online_fractions(), "eligible_frames": self.eligible_frames(),
                    "loss_ma": losses, "staleness": self.staleness_stats(), "batches": self.batches,
                    "quarantined": sorted(self.quarantined), "skipped_no_images": self.skipped_no_images}

    def state_dict(self) -> dict:
        """JSON-serialisable: config, moving averages, RNG, learner version, quarantine."""
        with self._lock:
            return {"config": asdict(self.cfg), "mix": self.mix.state_dict(),
                    "rng": self.rng.bit_generator.state, "learner_version": self.learner_version,
                    "quarantined": sorted(self.quarantined), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self.mix.load_state_dict(state.get("mix", {}))
            if "rng" in state:
                self.rng.bit_generator.state = state["rng"]
            self.learner_version = int(state.get("learner_version", -1))
            self.quarantined = set(state.get("quarantined", []))
            self.batches = int(state.get("batches", 0))
            self._built_index_version = -1


_BAD_PAYLOAD = {"EpisodeRejected", "UnidentifiedImageError", "DecodeError"}


class _Quarantine(Exception):
    def __init__(self, episode_id: str):
        super().__init__(episode_id)
        self.episode_id = episode_id
