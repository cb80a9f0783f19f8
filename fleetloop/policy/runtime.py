"""VLAPolicy: the robot-side wrapper that implements fleetloop.policy.interface.Policy.

One act() call = one forward pass of the net on a single observation (two, batched, when
classifier-free guidance is on), under torch.inference_mode. The instruction's embedding comes
from the shared language cache, so only the first call with a new instruction pays for MiniLM.
Weights can be swapped in place when the learner publishes a new version.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np
import torch

from fleetloop.policy.interface import Observation
from fleetloop.policy.language import LanguageEncoder, get_encoder
from fleetloop.policy.model import (INDICATOR_NEGATIVE, INDICATOR_POSITIVE, INDICATOR_UNSET, ModelConfig,
                                    VLAPolicyNet, from_safetensors_bytes, load_checkpoint,
                                    read_checkpoint_config)


def indicator_code(indicator: Optional[bool]) -> int:
    """Policy-protocol indicator (None / False / True) -> embedding index."""
    if indicator is None:
        return INDICATOR_UNSET
    return INDICATOR_POSITIVE if indicator else INDICATOR_NEGATIVE


class VLAPolicy:
    """Policy protocol over a VLAPolicyNet.

    beta: classifier-free guidance weight used when an indicator is given (1 = plain
    conditional policy; RECAP evaluates with 1.5-2.5). num_threads: torch intra-op threads
    for this process (a robot runs 1 so the control loop keeps a core); None leaves it."""

    def __init__(self, net: VLAPolicyNet, version: str = "", encoder: LanguageEncoder | None = None,
                 beta: float = 1.0, num_threads: int | None = 1, device: str | torch.device = "cpu"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.version = version
        self.encoder = encoder or get_encoder()
        self.beta = float(beta)
        self._lock = threading.Lock()  # act() and swap_weights() may run on different threads

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, version: str | None = None, **kw) -> "VLAPolicy":
        if version is None:
            version = str(read_checkpoint_config(directory).get("extra", {}).get("version", "")) or \
                os.path.basename(os.path.normpath(directory))
        return cls(load_checkpoint(directory), version=version, **kw)

    @classmethod
    def from_bytes(cls, config: ModelConfig | dict | str | None, data: bytes, version: str,
                   sha256: str | None = None, **kw) -> "VLAPolicy":
        return cls(from_safetensors_bytes(config, data, sha256=sha256), version=version, **kw)

    def swap_weights(self, config: ModelConfig | dict | str | None, data: bytes, version: str,
                     sha256: str | None = None) -> None:
        """Load a published version (verifying sha256) and switch to it atomically: the new net
        is built off to the side, so a bad blob leaves the running policy untouched."""
        net = from_safetensors_bytes(config, data, sha256=sha256, device=self.device)
        with self._lock:
            self.net, self.version = net, version

    # ---- Policy protocol ----------------------------------------------------------------

    @property
    def config(self) -> ModelConfig:
        return self.net.config

    @property
    def horizon(self) -> int:
        return self.net.config.horizon

    @property
    def action_dim(self) -> int:
        return self.net.config.action_dim

    def _images(self, obs: Observation, cfg: ModelConfig) -> torch.Tensor:
        try:
            frames = [obs.images[c] for c in cfg.cameras]
        except KeyError as e:
            raise ValueError(f"observation lacks camera {e.args[0]!r}; policy needs {cfg.cameras}, "
                             f"got {sorted(obs.images)}") from None
        arr = np.concatenate([np.asarray(f, dtype=np.uint8).reshape(f.shape[0], f.shape[1], -1) for f in frames], -1)
        return torch.tensor(arr).permute(2, 0, 1).unsqueeze(0).to(self.device)

    def act(self, obs: Observation, instruction: str, indicator: Optional[bool] = None) -> np.ndarray:
        """float32 [H, A] action chunk, clamped to the action range."""
        lang = torch.tensor(self.encoder.encode(instruction)).view(1, -1)  # copy: the cached array is read-only
        with self._lock:
            net = self.net
        state = torch.tensor(np.asarray(obs.state, dtype=np.float32).reshape(1, -1))  # copy: obs may be read-only
        with torch.inference_mode():
            images = self._images(obs, net.config) if net.config.use_images else None
            ind = torch.full((1,), indicator_code(indicator), dtype=torch.long)
            chunk = net.predict(state.to(self.device), lang.to(self.device), ind.to(self.device),
                                images, beta=self.beta)[0]
            clip = net.config.action_clip
            if clip > 0:
                chunk = chunk.clamp(-clip, clip)
        return chunk.float().cpu().numpy()
