"""Learner checkpoints in the object store: crash-safe, resumable, never pickled.

Layout, under a prefix (default "learner/default"):
  checkpoints/<step:010d>-<time_ns>/model.safetensors      policy weights (config in metadata)
  checkpoints/<...>/optimizer.safetensors                  AdamW moments ("state.<param>.<name>")
  checkpoints/<...>/algorithm.safetensors                  algorithm tensors (RECAP: value net)
  checkpoints/<...>/state.json                             step, optimiser param groups, sampler
                                                           and algorithm state, last published
                                                           version, and each file's sha256
  LATEST                                                   {"checkpoint", "step", "state_sha256"}

Write order: the tensor files, state.json, then LATEST. Every put is atomic, so a crash at any
point leaves LATEST naming a complete checkpoint -- the new one or the previous one. Old
checkpoints are deleted only after LATEST names a newer one (the last `keep` stay). Loading
verifies every file against state.json; if LATEST is missing or names something broken, the
newest checkpoint that verifies is used instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from fleetloop.buffer.store import ObjectNotFound

log = logging.getLogger(__name__)

FORMAT = "fleetloop-learner-checkpoint/1"
FILES = ("model", "optimizer", "algorithm")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- optimiser state as safetensors + JSON --------------------------------------------------

def optimizer_to_safetensors(opt: torch.optim.Optimizer) -> tuple[bytes, dict]:
    """Tensors of opt.state_dict() -> safetensors bytes; the rest (param groups, non-tensor
    per-parameter values) -> a JSON-able dict."""
    from safetensors.torch import save
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = v
    return save(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(opt: torch.optim.Optimizer, data: bytes, meta: dict) -> None:
    from safetensors.torch import load
    state: dict[int, dict] = {}
    for key, v in load(data).items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    # JSON turned tuples (AdamW's betas) into lists; give them back their type.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def arrays_to_safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save
    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def arrays_from_safetensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load
    return dict(load(data)) if data else {}


# ---- the store --------------------------------------------------------------------------------

class CheckpointError(Exception):
    """A checkpoint that fails verification (missing file, digest mismatch, bad JSON)."""


@dataclass
class LoadedCheckpoint:
    key: str                 # the checkpoint's directory key
    step: int
    state: dict              # state.json
    files: dict[str, bytes]  # model, optimizer, algorithm (safetensors bytes)


class CheckpointStore:
    def __init__(self, store, prefix: str = "learner/default", keep: int = 3, fence=None):
        """fence: the learner's lease (fleetloop.learner.lease.Lease) or None; checked before
        state.json, LATEST and pruning, so a learner that lost its lease cannot commit or delete."""
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.store, self.prefix, self.keep = store, prefix.strip("/"), keep
        self.fence = fence

    def _fenced(self) -> None:
        if self.fence is not None:
            self.fence.check()

    @property
    def latest_key(self) -> str:
        return f"{self.prefix}/LATEST"

    def save(self, step: int, files: dict[str, bytes], state: dict) -> str:
        """Write one checkpoint; returns its key. `files` holds model/optimizer/algorithm
        safetensors bytes, `state` anything JSON-able."""
        key = f"{self.prefix}/checkpoints/{int(step):010d}-{time.time_ns()}"
        digests = {}
        for name in FILES:
            data = files.get(name, b"")
            self.store.put(f"{key}/{name}.safetensors", data)
            digests[name] = {"sha256": _sha(data), "bytes": len(data)}
        doc = json.dumps({"format": FORMAT, "step": int(step), "created_ns": time.time_ns(), "files": digests,
                          **state}, sort_keys=True).encode()
        self._fenced()
        self.store.put(f"{key}/state.json", doc)
        # The commit point: only now does a reader see the new checkpoint.
        self._fenced()
        self.store.put(self.latest_key, json.dumps({"checkpoint": key, "step": int(step),
                                                    "state_sha256": _sha(doc)}).encode())
        self._fenced()
        self._prune(keep_key=key)
        return key

    def checkpoints(self) -> list[str]:
        """Directory keys of every checkpoint with a state.json, oldest first."""
        keys = {k.rsplit("/", 1)[0] for k in self.store.list(f"{self.prefix}/checkpoints/")
                if k.endswith("/state.json")}
        return sorted(keys)

    def _prune(self, keep_key: str) -> None:
        """Delete checkpoints older than the newest `keep` complete ones, including leftovers
        of writes that crashed before their state.json (never anything newer than keep_key)."""
        keys = list(self.store.list(f"{self.prefix}/checkpoints/"))
        kept = set(self.checkpoints()[-self.keep:]) | {keep_key}
        for k in sorted(keys, key=lambda k: not k.endswith("/state.json")):  # state.json first: it
            d = k.rsplit("/", 1)[0]                                           # marks a complete one
            if d not in kept and d < keep_key:
                self.store.delete(k)

    def load(self, key: str, state_sha256: str | None = None) -> LoadedCheckpoint:
        try:
            doc = self.store.get(f"{key}/state.json")
        except ObjectNotFound:
            raise CheckpointError(f"{key}: no state.json") from None
        if state_sha256 and _sha(doc) != state_sha256:
            raise CheckpointError(f"{key}: state.json does not match LATEST's digest")
        try:
            state = json.loads(doc)
        except ValueError as e:
            raise CheckpointError(f"{key}: state.json is not JSON: {e}") from None
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{key}: unknown format {state.get('format')!r}")
        files = {}
        for name, want in state["files"].items():
            try:
                data = self.store.get(f"{key}/{name}.safetensors")
            except ObjectNotFound:
                raise CheckpointError(f"{key}: {name}.safetensors missing") from None
            if len(data) != want["bytes"] or _sha(data) != want["sha256"]:
                raise CheckpointError(f"{key}: {name}.safetensors does not match state.json")
            files[name] = data
        return LoadedCheckpoint(key=key, step=int(state["step"]), state=state, files=files)

    def load_latest(self) -> LoadedCheckpoint | None:
        """The checkpoint LATEST names; if that fails, the newest one that verifies; None if
        there is no checkpoint at all."""
        tried = set()
        try:
            pointer = json.loads(self.store.get(self.latest_key))
            tried.add(pointer["checkpoint"])
            return self.load(pointer["checkpoint"], pointer.get("state_sha256"))
        except ObjectNotFound:
            pass
        except (CheckpointError, ValueError, KeyError) as e:
            log.warning("LATEST checkpoint unusable (%s); looking for an older one", e)
        for key in reversed(self.checkpoints()):
            if key in tried:
                continue
            try:
                return self.load(key)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", key, e)
        return None
