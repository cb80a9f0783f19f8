"""RECAP (pi*0.6, arXiv 2511.14759) as SOP runs it online: advantage-conditioned policy training.

Per frame (all data trains: demonstrations, autonomous rollouts, corrections):
  1. normalised return R_t and N-step advantage A_t from the value function (value.py)
  2. improvement indicator  I_t = 1[A_t > eps(task, source)]           (2 positive, 1 negative)
     eps per task and buffer so that a target fraction of frames is positive: 0.4 of online
     rollouts, 0.3 of demonstrations (pi*0.6's numbers); eps = quantile_{1-target}(A)
  3. human corrections are forced positive: I_t = 1 for intervention frames
  4. the policy trains on -log pi(a|I,o,l) with I dropped to "unset" 30% of the time (the
     model's indicator_dropout): one net holds the conditional and unconditional policy
  5. robots run I = positive with classifier-free guidance beta (published with the weights):
     a = a_uncond + beta * (a_cond - a_uncond)
Frames whose advantage needs an unknown outcome (the last N steps of an unlabelled episode)
keep I unset and so train the unconditional branch only.

value_function:
  "frozen" (default, as SOP): fitted once when the learner first starts, on every episode
           with a known outcome in the store then (normally the demonstrations), then fixed and
           checkpointed. A frame's advantage never changes, so the policy chases a fixed target,
           and it is cheap (advantages are computed once per episode; only the thresholds move
           as data arrives).
  "online": keeps training on all data with known outcomes (Monte-Carlo returns) every
           refresh, then recomputes every advantage and threshold. Better when the demos lack
           failures, at the price of moving labels and O(frames) work per refresh.
"""
from __future__ import annotations

import time

import numpy as np

from fleetloop.buffer.sampler import OFFLINE, ONLINE, SOURCES
from fleetloop.learner.algorithms.base import (INDICATOR_NEGATIVE, INDICATOR_POSITIVE, INDICATOR_UNSET,
                                               Algorithm, Guidance, register)
from fleetloop.learner.algorithms.value import (ValueConfig, ValueFunction, n_step_advantage, returns_to_go,
                                                step_rewards)


def threshold_for_fraction(advantages: np.ndarray, positive_fraction: float) -> float:
    """eps with mean(A > eps) ~= positive_fraction: the (1 - fraction) quantile."""
    return float(np.quantile(advantages, 1.0 - positive_fraction))


@register("recap")
class Recap(Algorithm):
    def __init__(self, value_function: str = "frozen", n_step: int = 50, bins: int = 201, c_fail: float = 1.0,
                 positive_fraction_online: float = 0.4, positive_fraction_offline: float = 0.3,
                 beta: float = 1.5, value_pretrain_steps: int = 1000, value_online_steps: int = 50,
                 value_batch: int = 256, value_lr: float = 1e-3, value_hidden: int = 256,
                 refresh_interval_s: float = 2.0, seed: int = 0):
        super().__init__()
        if value_function not in ("frozen", "online"):
            raise ValueError(f"value_function must be frozen or online, not {value_function!r}")
        self.mode, self.n_step, self.bins, self.c_fail = value_function, int(n_step), int(bins), float(c_fail)
        self.target = {ONLINE: float(positive_fraction_online), OFFLINE: float(positive_fraction_offline)}
        self.beta = float(beta)
        self.pretrain_steps, self.online_steps = int(value_pretrain_steps), int(value_online_steps)
        self.value_batch, self.value_lr, self.value_hidden = int(value_batch), float(value_lr), int(value_hidden)
        self.refresh_interval_s, self.seed = float(refresh_interval_s), seed
        self.encode = None                         # instruction -> [384]; bound by the replay service
        self.value: ValueFunction | None = None
        self.fitted = False
        self.value_version = 0
        self.task_len: dict[str, int] = {}         # L per task (frozen once set: keeps targets fixed)
        self.eps: dict[str, dict[str, float]] = {}  # task -> source -> threshold
        self.labels_version = 0
        self._adv: dict[str, tuple[tuple, np.ndarray]] = {}
        self._ind: dict[str, tuple[tuple, np.ndarray]] = {}
        self.positive_measured: dict[str, dict[str, float]] = {}
        self._last_refresh = 0.0
        self._seen_index_version = -1
        self.refresh_seconds = 0.0

    def bind(self, encode) -> None:
        self.encode = encode

    # ---- returns -----------------------------------------------------------------------------

    def normaliser(self, task: str) -> float:
        """Z = L + C_fail = L * (1 + c_fail)."""
        return self.task_len[task] * (1.0 + self.c_fail)

    def rewards(self, entry) -> np.ndarray | None:
        """Normalised r_t, or None for an unknown outcome."""
        if entry.outcome not in ("success", "failure"):
            return None
        L = self.task_len.setdefault(entry.task_id, entry.num_steps)
        return step_rewards(entry.num_steps, entry.outcome == "success", self.c_fail * L) / self.normaliser(entry.task_id)

    def returns(self, entry) -> np.ndarray | None:
        r = self.rewards(entry)
        return None if r is None else np.clip(returns_to_go(r), -1.0, 0.0)

    # ---- value function ----------------------------------------------------------------------

    def _lang(self, entry) -> np.ndarray:
        if self.encode is None:
            raise RuntimeError("RECAP needs bind(encode) before it can compute values")
        return np.asarray(self.encode(entry.instruction), np.float32)

    def _training_data(self, entries) -> tuple | None:
        """(states [N,S], lang table [K,384], lang index [N], returns [N]) of every frame whose
        episode has a known outcome."""
        s, idx, y, table, row = [], [], [], [], {}
        for e in entries:
            R = self.returns(e)
            if R is None or e.num_steps == 0:
                continue
            if e.instruction not in row:
                row[e.instruction] = len(table)
                table.append(self._lang(e))
            s.append(e.states)
            idx.append(np.full(e.num_steps, row[e.instruction]))
            y.append(R)
        if not s:
            return None
        return np.concatenate(s), np.stack(table), np.concatenate(idx), np.concatenate(y)

    def fit_value(self, entries, steps: int) -> float | None:
        data = self._training_data(entries)
        if data is None:
            return None
        states, table, lang_idx, targets = data
        if self.value is None:
            self.value = ValueFunction(ValueConfig(state_dim=states.shape[1], lang_dim=table.shape[1],
                                                   hidden=self.value_hidden, bins=self.bins),
                                       lr=self.value_lr, seed=self.seed)
            self.value.set_state_stats(states)
        loss = self.value.train(states, table, lang_idx, targets, steps=steps, batch_size=self.value_batch)
        self.value_version += 1
        return loss

    def advantages(self, entry) -> np.ndarray:
        """A_t (normalised units) for every frame; NaN where the outcome is needed but unknown."""
        key = (entry.outcome, self.value_version, self.task_len.get(entry.task_id))
        hit = self._adv.get(entry.episode_id)
        if hit is not None and hit[0] == key:
            return hit[1]
        t_len = entry.num_steps
        if self.value is None or t_len == 0:
            adv = np.full(t_len, np.nan)
        else:
            v = self.value.predict(entry.states, self._lang(entry))
            r = self.rewards(entry)
            if r is None:  # unknown outcome: steps cost -1/Z as usual, but the end is unknown
                self.task_len.setdefault(entry.task_id, t_len)
                adv = n_step_advantage(-np.ones(t_len) / self.normaliser(entry.task_id), v, self.n_step)
                adv[max(0, t_len - self.n_step):] = np.nan  # these windows reach the unknown end
            else:
                adv = n_step_advantage(r, v, self.n_step)
        self._adv[entry.episode_id] = (key, adv)
        return adv

    # ---- thresholds and indicators -----------------------------------------------------------

    def update_thresholds(self, index) -> None:
        """eps per (task, source) from the advantages of its autonomous frames, and the
        positive fraction the labels come out at once corrections are forced positive."""
        eps: dict[str, dict[str, float]] = {}
        measured: dict[str, dict[str, float]] = {}
        for task in index.tasks():
            for source in SOURCES:
                free, n_forced = [], 0
                for e in index.episodes(task, source):
                    a, iv = self.advantages(e), np.asarray(e.intervention, bool)
                    free.append(a[~iv & np.isfinite(a)])
                    n_forced += int(iv.sum())
                a = np.concatenate(free) if free else np.zeros(0)
                if len(a):
                    eps.setdefault(task, {})[source] = e_ts = threshold_for_fraction(a, self.target[source])
                    measured.setdefault(task, {})[source] = round(
                        (int((a > e_ts).sum()) + n_forced) / (len(a) + n_forced), 4)
        self.eps, self.positive_measured = eps, measured
        self.labels_version += 1

    def indicators(self, entry) -> np.ndarray:
        key = (entry.outcome, self.labels_version, self.value_version)
        hit = self._ind.get(entry.episode_id)
        if hit is not None and hit[0] == key:
            return hit[1]
        a = self.advantages(entry)
        eps = self.eps.get(entry.task_id, {}).get(entry.source)
        ind = np.full(entry.num_steps, INDICATOR_UNSET, np.int64)
        if eps is not None:
            known = np.isfinite(a)
            ind[known] = np.where(a[known] > eps, INDICATOR_POSITIVE, INDICATOR_NEGATIVE)
        ind[np.asarray(entry.intervention, bool)] = INDICATOR_POSITIVE  # corrections are forced positive
        self._ind[entry.episode_id] = (key, ind)
        return ind

    # ---- the periodic hook -------------------------------------------------------------------

    def refresh(self, index, force: bool = False) -> bool:
        """Fit the value function the first time; in online mode keep training it. Then
        recompute thresholds (new episodes change the quantiles). Rate-limited."""
        now = time.monotonic()
        if not force and index.version == self._seen_index_version:
            return False
        if not force and self.fitted and now - self._last_refresh < self.refresh_interval_s:
            return False
        t0 = time.perf_counter()
        self._seen_index_version = index.version
        entries = index.episodes()
        for task in index.tasks():  # L per task: its longest episode when first seen, then fixed
            if task not in self.task_len or not self.fitted:
                self.task_len[task] = max([self.task_len.get(task, 0)] + [e.num_steps for e in index.episodes(task)])
        if not self.fitted:
            if self.fit_value(entries, self.pretrain_steps) is None:
                return False  # nothing with a known outcome yet
            self.fitted = True
        elif self.mode == "online":
            self.fit_value(entries, self.online_steps)
        self.update_thresholds(index)
        self._last_refresh = time.monotonic()
        self.refresh_seconds = time.perf_counter() - t0
        return True

    # ---- publishing, state, stats ------------------------------------------------------------

    def inference_settings(self) -> Guidance:
        return Guidance(indicator=True, beta=self.beta)  # "advantage positive", guided

    def options(self) -> dict:
        return {"value_function": self.mode, "n_step": self.n_step, "bins": self.bins, "c_fail": self.c_fail,
                "positive_fraction_online": self.target[ONLINE], "positive_fraction_offline": self.target[OFFLINE],
                "beta": self.beta}

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {"options": self.options(), "fitted": self.fitted, "value_version": self.value_version,
                "task_len": self.task_len, "eps": self.eps}
        tensors: dict[str, np.ndarray] = {}
        if self.value is not None:
            vmeta, tensors = self.value.state()
            meta["value"] = vmeta
        return meta, tensors

    def load_state(self, meta: dict, tensors: dict[str, np.ndarray]) -> None:
        self.task_len = {k: int(v) for k, v in meta.get("task_len", {}).items()}
        self.eps = meta.get("eps", {})
        self.value_version = int(meta.get("value_version", 0))
        if "value" in meta:
            self.value = ValueFunction(ValueConfig(**meta["value"]["config"]), lr=self.value_lr, seed=self.seed)
            self.value.load_state(meta["value"], tensors)
        self.fitted = bool(meta.get("fitted")) and self.value is not None
        self._adv.clear()
        self._ind.clear()
        self.labels_version += 1

    def stats(self) -> dict:
        out = {"algorithm": self.name, **self.options(), "value_fitted": self.fitted,
               "value_version": self.value_version, "thresholds": self.eps,
               "refresh_s": round(self.refresh_seconds, 3)}
        if self.value is not None:
            out["value_loss"] = self.value.last_loss
            out["value_steps"] = self.value.steps
        out["positive_fraction"] = self.positive_measured
        return out
