"""PolicyRuntime: the robot-side wrapper that implements fleetloop.policy.interface.Policy for
any backend (fleetloop.policy.backend), and PolicyLoader, which turns published weights into
runtimes for the robot's PolicySlot.

One act() call = one model.sample_actions() on a single observation, under
torch.inference_mode. The instruction's features (a MiniLM embedding, token ids: whatever the
backend takes) are cached per instruction in a bounded LRU, so only the first call with a new
instruction pays for them.

Versions that carry only the trained weights (LoRA adapters + action expert, on top of a base
model the robot holds) share one loaded base: a new version is kept aside as its few MB of
tensors and copied into the shared model the first time an episode acts with it. A GB-sized
backbone is therefore loaded once per robot, not once per version.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Mapping, Optional

import numpy as np
import torch

from fleetloop.policy.backend import (INDICATOR_NEGATIVE, INDICATOR_POSITIVE, INDICATOR_UNSET, CheckpointError,
                                      PolicyModel, backend_class, backend_of, load_checkpoint, load_tensors,
                                      model_from_weights, parse_config, read_checkpoint_config, sha256_hex)
from fleetloop.release.guidance import PUBLISHED, Guidance
from fleetloop.policy.interface import Observation

INSTRUCTION_CACHE_SIZE = 256  # distinct instructions kept per robot (robot input: keep it bounded)


def indicator_code(indicator: Optional[bool]) -> int:
    """Policy-protocol indicator (None / False / True) -> the backends' integer code."""
    if indicator is None:
        return INDICATOR_UNSET
    return INDICATOR_POSITIVE if indicator else INDICATOR_NEGATIVE


class _SharedModel:
    """One model object used by several runtimes; `overlay` names whose trained tensors are
    in it now. The lock serialises inference with overlay switches."""

    def __init__(self, model: PolicyModel):
        self.model = model
        self.lock = threading.Lock()
        self.overlay: object = None


class PolicyRuntime:
    """Policy protocol over a PolicyModel.

    guidance: how it runs (fleetloop.release.guidance.Guidance): the improvement indicator act()
    uses when its caller passes none, and the classifier-free guidance weight beta applied when an
    indicator is set (1 = plain conditional policy; RECAP publishes 1.5). A loaded version gets
    its manifest's (PolicyLoader); `beta` / `indicator` are shorthands. num_threads: torch
    intra-op threads for this process (a robot runs 1 so the control loop keeps a core); None
    leaves it. overlay: trained tensors of this version, copied into the (shared) model before
    acting."""

    def __init__(self, model: PolicyModel | _SharedModel, version: str = "", beta: float = 1.0,
                 num_threads: int | None = 1, device: str | torch.device | None = None,
                 overlay: Mapping[str, torch.Tensor] | None = None, indicator: Optional[bool] = None,
                 guidance: Guidance | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        shared = model if isinstance(model, _SharedModel) else _SharedModel(model)
        if device is not None:
            shared.model.to(device)
        shared.model.eval()
        self._shared = shared
        self._overlay = dict(overlay) if overlay is not None else None
        if self._overlay is None:
            shared.overlay = self  # the model's own weights are this version's
        self.version = version
        self.guidance = guidance if guidance is not None else Guidance(indicator=indicator, beta=beta)
        self._lang: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lang_lock = threading.Lock()

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, version: str | None = None,
                        device: str | torch.device = "cpu", **kw) -> "PolicyRuntime":
        if version is None:
            version = str(read_checkpoint_config(directory).get("extra", {}).get("version", "")) or \
                os.path.basename(os.path.normpath(directory))
        return cls(load_checkpoint(directory, device=device), version=version, **kw)

    @classmethod
    def from_bytes(cls, config: Mapping | str | None, data: bytes, version: str,
                   sha256: str | None = None, **kw) -> "PolicyRuntime":
        return cls(model_from_weights(data, config, sha256=sha256), version=version, **kw)

    # ---- Policy protocol ----------------------------------------------------------------

    @property
    def beta(self) -> float:
        return self.guidance.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.guidance = replace(self.guidance, beta=value)

    @property
    def indicator(self) -> Optional[bool]:
        return self.guidance.indicator

    @property
    def model(self) -> PolicyModel:
        return self._shared.model

    @property
    def spec(self):
        return self.model.spec

    @property
    def horizon(self) -> int:
        return self.model.spec.horizon

    @property
    def action_dim(self) -> int:
        return self.model.spec.action_dim

    def _features(self, instruction: str) -> np.ndarray:
        with self._lang_lock:
            hit = self._lang.get(instruction)
            if hit is not None:
                self._lang.move_to_end(instruction)
                return hit
        feats = np.array(self.model.featurize_instruction(instruction))  # a copy: cached arrays may be read-only
        with self._lang_lock:
            self._lang[instruction] = feats
            while len(self._lang) > INSTRUCTION_CACHE_SIZE:
                self._lang.popitem(last=False)
        return feats

    def _images(self, obs: Observation, cameras) -> torch.Tensor:
        try:
            frames = [obs.images[c] for c in cameras]
        except KeyError as e:
            raise ValueError(f"observation lacks camera {e.args[0]!r}; policy needs {list(cameras)}, "
                             f"got {sorted(obs.images)}") from None
        arr = np.concatenate([np.asarray(f, dtype=np.uint8).reshape(f.shape[0], f.shape[1], -1) for f in frames], -1)
        return torch.tensor(arr).permute(2, 0, 1).unsqueeze(0)

    def act(self, obs: Observation, instruction: str, indicator: Optional[bool] = None) -> np.ndarray:
        """float32 [H, A] action chunk, in the action range. indicator None: this runtime's own
        (guidance.indicator: what the version was published with, or a robot's override)."""
        guidance = self.guidance
        if indicator is None:
            indicator = guidance.indicator
        lang = torch.from_numpy(self._features(instruction)).unsqueeze(0)
        state = torch.tensor(np.asarray(obs.state, dtype=np.float32).reshape(1, -1))  # copy: obs may be read-only
        shared = self._shared
        spec = shared.model.spec
        with torch.inference_mode():
            inputs = {"state": state, "lang": lang,
                      "indicator": torch.full((1,), indicator_code(indicator), dtype=torch.long)}
            if spec.cameras:
                inputs["images"] = self._images(obs, spec.cameras)
            with shared.lock:
                model = shared.model
                if shared.overlay is not self:
                    if self._overlay is None:
                        raise RuntimeError(f"policy {self.version}: its weights were replaced in a shared model")
                    model.load_weights(self._overlay, trained_only=True)
                    shared.overlay = self
                device = next(model.parameters()).device
                # On a GPU the robot computes in bf16 (a VLA's chunk time halves); CPU stays fp32.
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    chunk = model.sample_actions({k: v.to(device) for k, v in inputs.items()}, beta=guidance.beta)[0]
        return chunk.float().cpu().numpy()


def check_overlay(model: PolicyModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """A version's trained tensors must name existing tensors of the model with their shapes."""
    sd = model.state_dict()
    unknown = sorted(set(tensors) - set(sd))
    if unknown:
        raise CheckpointError(f"weights name {len(unknown)} tensors this model does not have, e.g. {unknown[:3]}")
    bad = [k for k, v in tensors.items() if tuple(v.shape) != tuple(sd[k].shape)]
    if bad:
        raise CheckpointError(f"weights have wrong shapes for {len(bad)} tensors, e.g. {bad[0]}: "
                              f"{tuple(tensors[bad[0]].shape)} vs {tuple(sd[bad[0]].shape)}")


class PolicyLoader:
    """PolicySlot's load_fn: (config_json, weights, version, guidance) -> PolicyRuntime.

    A version whose weights hold only trained tensors on top of a base is built once per base
    and structure; later versions of the same structure become overlays on that model (their
    tensors are verified here, off the control loop, and copied in at first use).

    guidance: what the version's signed manifest says it runs with (PolicySlot passes it); the
    robot's settings override it: indicator "published" (keep) or unset/negative/positive, beta
    None (keep) or a number."""

    def __init__(self, device: str | torch.device = "cpu", beta: float | None = None, num_threads: int | None = 1,
                 indicator: str = PUBLISHED):
        Guidance().with_overrides(indicator, beta)  # a bad setting fails here, not at the first version
        self.device, self.beta, self.indicator, self.num_threads = device, beta, indicator, num_threads
        self._shared: tuple[str, _SharedModel] | None = None   # (structure key, model)

    def guidance_for(self, published: Guidance | None) -> Guidance:
        """What a version runs with on this robot: its published settings, then the overrides."""
        return (published or Guidance()).with_overrides(self.indicator, self.beta)

    @staticmethod
    def _structure_key(cfg: dict) -> str:
        return sha256_hex(repr(sorted(cfg.items())).encode())

    def __call__(self, config_json: str | Mapping | None, weights: bytes, version: str,
                 guidance: Guidance | None = None) -> PolicyRuntime:
        from fleetloop.policy.backend import weights_metadata
        cfg = weights_metadata(weights) if config_json is None else parse_config(config_json)
        kw = {"version": version, "num_threads": self.num_threads, "guidance": self.guidance_for(guidance)}
        cls = backend_class(backend_of(cfg))
        if not getattr(cls, "prefers_trained_only", False):
            return PolicyRuntime(model_from_weights(weights, cfg, device=self.device), **kw)
        key = self._structure_key(cfg)
        tensors = load_tensors(weights)
        if self._shared is not None and self._shared[0] == key:
            shared = self._shared[1]
            check_overlay(shared.model, tensors)  # names and shapes, before it can reach a swap
            if len(tensors) < len(shared.model.state_dict()):
                return PolicyRuntime(shared, overlay=tensors, **kw)
        model = cls.from_config(cfg, tensors).to(self.device).eval()
        if len(tensors) >= len(model.state_dict()):  # a full push: self-contained, nothing to share
            return PolicyRuntime(model, **kw)
        shared = _SharedModel(model)
        self._shared = (key, shared)
        return PolicyRuntime(shared, overlay=tensors, **kw)


__all__ = ["CheckpointError", "PolicyLoader", "PolicyRuntime", "indicator_code"]
