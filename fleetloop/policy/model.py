"""The VLA policy network: (camera images, proprio state, instruction embedding, RECAP indicator)
-> an action chunk [H, A].

Small on purpose: the fleet demo trains it online on a 2-core CPU. Vision is a 4-layer stride-2
CNN trained from scratch (64x64 -> 4x4 feature map, flattened so object positions survive), the
language embedding comes from a frozen MiniLM outside the net (fleetloop.policy.language), and the
head is a deterministic MLP regressing the whole chunk (as in ACT-style chunking, L1 by default).

RECAP's improvement indicator is an embedding with three rows: 0 unset, 1 negative, 2 positive.
Training replaces it by "unset" with probability `indicator_dropout` (0.3), so one network holds
both the conditional and the unconditional policy; inference can then use classifier-free
guidance on the predicted chunk: a = a_uncond + beta * (a_cond - a_uncond).

Checkpoints are safetensors (weights + buffers) plus config.json; never pickle.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from fleetloop.policy.backend import (CONFIG_FILE, WEIGHTS_FILE, INDICATOR_NEGATIVE, INDICATOR_POSITIVE,  # noqa: F401
                                      INDICATOR_UNSET, CheckpointError, ObservationSpec, PolicyModel,
                                      load_checkpoint, model_from_weights, read_checkpoint_config,
                                      register_backend, save_checkpoint, sha256_hex)
from fleetloop.policy.language import EMBED_DIM

# Width/depth per size preset. "tiny" trains at thousands of samples/s on one CPU core
# (state-only); "small" is the robot default with images; "base" is meant for a GPU learner.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=64, hidden_dim=256, depth=2, cnn_channels=[16, 32, 32, 32]),
    "small": dict(embed_dim=128, hidden_dim=512, depth=3, cnn_channels=[32, 64, 64, 64]),
    "base": dict(embed_dim=256, hidden_dim=1024, depth=4, cnn_channels=[32, 64, 128, 256]),
}


@dataclass
class ModelConfig:
    size: str = "tiny"
    state_dim: int = 39              # MetaWorld observation
    action_dim: int = 4              # MetaWorld: xyz delta + gripper, in [-1, 1]
    horizon: int = 8                 # H: actions per predicted chunk
    lang_dim: int = EMBED_DIM        # all-MiniLM-L6-v2
    use_images: bool = True
    cameras: list[str] = field(default_factory=lambda: ["front"])  # stacked on channels, this order
    image_size: int = 64
    embed_dim: int = 64
    hidden_dim: int = 256
    depth: int = 2                   # residual MLP blocks
    cnn_channels: list[int] = field(default_factory=lambda: [16, 32, 32, 32])
    dropout: float = 0.0
    indicator_dropout: float = 0.3   # RECAP: train the unconditional branch 30% of the time
    loss: str = "l1"                 # "l1" or "l2" regression on the chunk
    image_shift: int = 4             # random-shift augmentation (pixels), training only
    action_clip: float = 1.0         # act() clamps to [-clip, clip]; 0 disables

    def __post_init__(self):
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"loss must be 'l1' or 'l2', got {self.loss!r}")
        if self.use_images and (not self.cameras or self.image_size % 16):
            raise ValueError("use_images needs at least one camera and image_size divisible by 16")
        if min(self.state_dim, self.action_dim, self.horizon) < 1:
            raise ValueError("state_dim, action_dim and horizon must be >= 1")
        self.cameras, self.cnn_channels = list(self.cameras), list(self.cnn_channels)

    @classmethod
    def preset(cls, size: str, **overrides) -> "ModelConfig":
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}: choose from {sorted(SIZES)}")
        return cls(size=size, **{**SIZES[size], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:  # a newer config may change semantics: refuse rather than guess
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str | bytes | Mapping) -> "ModelConfig":
        return cls.from_dict(s if isinstance(s, Mapping) else json.loads(s))

    @property
    def image_channels(self) -> int:
        return 3 * len(self.cameras)


# ---- building blocks --------------------------------------------------------------------

class VisionEncoder(nn.Module):
    """uint8 [B, C, 64, 64] -> [B, out_dim]. Four stride-2 convs to a 4x4 map, then flatten:
    global pooling would throw away where things are, which is what manipulation needs.
    Plain conv + ReLU as in DrQ's encoder: on CPU, GroupNorm + GELU made the training step
    ~30-50% slower (GroupNorm backward alone was 30% of it); the fused features get a
    LayerNorm downstream instead."""

    def __init__(self, in_ch: int, channels: list[int], image_size: int, out_dim: int):
        super().__init__()
        layers, c = [], in_ch
        for c_out in channels:
            layers += [nn.Conv2d(c, c_out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            c = c_out
        self.conv = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.proj = nn.Linear(c * side * side, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 - 0.5
        return self.proj(self.conv(x).flatten(1))


class ResBlock(nn.Module):
    """Pre-LayerNorm residual MLP block."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim, dim))

    def forward(self, x):
        return x + self.net(x)


def drop_indicator(indicator: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each indicator by 'unset' with probability p (the unconditional branch of CFG)."""
    if p <= 0:
        return indicator
    drop = torch.rand(indicator.shape, generator=generator, device=indicator.device) < p
    return torch.where(drop, torch.zeros_like(indicator), indicator)


def guide(cond: torch.Tensor, uncond: torch.Tensor, beta: float) -> torch.Tensor:
    """Classifier-free guidance on the predicted chunk: beta = 1 is the conditional policy,
    beta > 1 pushes further in the direction the indicator moves the action."""
    return uncond + beta * (cond - uncond)


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ-style augmentation: shift each image by up to `pad` pixels, edges replicated.
    Done with clamped gather indices (clamping == replicate padding), which stays in uint8
    and is ~3x cheaper on CPU than pad + crop."""
    b, c, h, w = images.shape
    oy = torch.randint(-pad, pad + 1, (b, 1), generator=generator).to(images.device)
    ox = torch.randint(-pad, pad + 1, (b, 1), generator=generator).to(images.device)
    rows = (oy + torch.arange(h, device=images.device)).clamp(0, h - 1)  # [B, h]
    cols = (ox + torch.arange(w, device=images.device)).clamp(0, w - 1)  # [B, w]
    out = images.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


# ---- the network ------------------------------------------------------------------------

@register_backend("tiny")
class VLAPolicyNet(PolicyModel):
    """The "tiny" backend: trained in full, every tensor is "trained"."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.embed_dim
        # Proprio normalisation lives in the model so a checkpoint is self-contained.
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim))
        self.register_buffer("state_std", torch.ones(cfg.state_dim))
        self.state_proj = nn.Linear(cfg.state_dim, d)
        self.lang_proj = nn.Linear(cfg.lang_dim, d)
        self.indicator_emb = nn.Embedding(3, d)  # 0 unset, 1 negative, 2 positive
        in_dim = 3 * d
        if cfg.use_images:
            self.vision = VisionEncoder(cfg.image_channels, cfg.cnn_channels, cfg.image_size, 2 * d)
            in_dim += 2 * d
        self.in_norm = nn.LayerNorm(in_dim)
        self.trunk = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.GELU(),
                                   *[ResBlock(cfg.hidden_dim, cfg.dropout) for _ in range(cfg.depth)],
                                   nn.LayerNorm(cfg.hidden_dim))
        self.head = nn.Linear(cfg.hidden_dim, cfg.horizon * cfg.action_dim)
        # Start by predicting ~0 (the middle of the action range) instead of random chunks.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    # -- normalisation --

    @torch.no_grad()
    def set_state_stats(self, mean, std, min_std: float = 1e-2) -> None:
        """Set the proprio normaliser. Constant dims (MetaWorld pads some) get std = min_std
        rather than 0, so unseen values there stay bounded instead of exploding."""
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        self._check_state_dim(mean.shape[-1])
        self.state_mean.copy_(mean)
        self.state_std.copy_(std.clamp_min(min_std))

    def _check_state_dim(self, n: int) -> None:
        if n != self.config.state_dim:
            raise ValueError(f"state has {n} dims but this policy was built for state_dim="
                             f"{self.config.state_dim}; wrong robot/env or wrong checkpoint?")

    def _check_inputs(self, state, lang, images):
        self._check_state_dim(state.shape[-1])
        if lang.shape[-1] != self.config.lang_dim:
            raise ValueError(f"language embedding has {lang.shape[-1]} dims, expected {self.config.lang_dim}")
        if self.config.use_images:
            want = (self.config.image_channels, self.config.image_size, self.config.image_size)
            if images is None:
                raise ValueError(f"this policy uses images: pass images [B, {want[0]}, {want[1]}, {want[2]}] uint8")
            if tuple(images.shape[1:]) != want:
                raise ValueError(f"images have shape {tuple(images.shape[1:])} per sample, expected {want} "
                                 f"(cameras {self.config.cameras} stacked on channels)")

    # -- forward --

    def forward(self, state: torch.Tensor, lang: torch.Tensor, indicator: torch.Tensor,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """state [B,S] float, lang [B,384], indicator [B] int64, images [B,C,64,64] uint8
        -> raw action chunk [B, H, A] (not clamped)."""
        self._check_inputs(state, lang, images)
        s = ((state.float() - self.state_mean) / self.state_std).clamp(-10, 10)
        feats = [self.state_proj(s), self.lang_proj(lang.float()), self.indicator_emb(indicator.long())]
        if self.config.use_images:
            feats.append(self.vision(images))
        h = self.trunk(self.in_norm(torch.cat(feats, dim=-1)))
        return self.head(h).view(-1, self.config.horizon, self.config.action_dim)

    @torch.no_grad()
    def predict(self, state, lang, indicator, images=None, beta: float = 1.0) -> torch.Tensor:
        """Guided chunk. Where indicator is unset, or beta == 1, this is the plain forward;
        otherwise both branches run in one batch of 2B and are combined with `guide`."""
        indicator = indicator.long()
        if beta == 1.0 or not bool((indicator != INDICATOR_UNSET).any()):
            return self(state, lang, indicator, images)
        b = state.shape[0]
        both = self(torch.cat([state, state]), torch.cat([lang, lang]),
                    torch.cat([indicator, torch.zeros_like(indicator)]),
                    None if images is None else torch.cat([images, images]))
        cond, uncond = both[:b], both[b:]
        out = guide(cond, uncond, beta)
        # Rows whose indicator is unset have cond == uncond already; keep them exactly.
        return torch.where((indicator == INDICATOR_UNSET)[:, None, None], cond, out)

    # -- training objective --

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked, weighted chunk regression (behaviour cloning; RECAP when indicators are set).

            L = sum_i w_i * l_i / sum_i w_i
            l_i = 1 / (A * sum_h m_ih) * sum_h sum_a m_ih * rho(a_hat_iha - a_iha)
            rho(e) = |e| (l1) or e^2 (l2);  m_ih = action_mask (0 past the episode end)

        a_hat is predicted from (o_i, l_i, I_i) where, in training mode, I_i is replaced by
        'unset' with probability indicator_dropout. That one loss covers both terms of RECAP's
        objective -log pi(a|o,l) - alpha log pi(a|I,o,l) (alpha set by the dropout rate)."""
        cfg = self.config
        indicator = batch["indicator"].long()
        if self.training:
            indicator = drop_indicator(indicator, cfg.indicator_dropout)
        images = batch.get("images") if cfg.use_images else None
        if images is not None and self.training and cfg.image_shift > 0:
            images = random_shift(images, cfg.image_shift)
        pred = self(batch["state"], batch["lang"], indicator, images)
        target = batch["actions"].float()
        if target.shape[1:] != pred.shape[1:]:
            raise ValueError(f"target chunk {tuple(target.shape[1:])} != model chunk {tuple(pred.shape[1:])}")
        mask = batch["action_mask"].float()                                   # [B, H]
        err = pred - target                                                   # [B, H, A]
        rho = err.abs() if cfg.loss == "l1" else err.square()
        per_sample = (rho * mask[..., None]).sum((1, 2)) / (cfg.action_dim * mask.sum(1)).clamp_min(1.0)
        w = batch.get("weight")
        w = torch.ones_like(per_sample) if w is None else w.float()
        loss = (w * per_sample).sum() / w.sum().clamp_min(1e-8)
        with torch.no_grad():
            n = (mask.sum() * cfg.action_dim).clamp_min(1.0)
            metrics = {
                "loss": loss.item(),
                "l1": ((err.abs() * mask[..., None]).sum() / n).item(),
                "mse": ((err.square() * mask[..., None]).sum() / n).item(),
                # Fraction of samples that went through the unconditional branch this step.
                "uncond_frac": (indicator == INDICATOR_UNSET).float().mean().item(),
            }
        return loss, metrics

    # -- the policy seam (fleetloop.policy.backend.PolicyModel) --

    @classmethod
    def build(cls, size: str = "tiny", **fields) -> "VLAPolicyNet":
        return cls(ModelConfig.preset(size, **fields))

    @classmethod
    def from_config(cls, config: Mapping, tensors: Mapping[str, torch.Tensor]) -> "VLAPolicyNet":
        try:
            cfg = ModelConfig.from_dict({k: v for k, v in config.items() if k != "backend"})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad tiny model config: {e}") from None
        net = cls(cfg)
        net.load_weights(tensors)
        return net

    @classmethod
    def instruction_featurizer(cls, config: Mapping):
        from fleetloop.policy.language import get_encoder
        return get_encoder().encode

    @property
    def spec(self) -> ObservationSpec:
        c = self.config
        return ObservationSpec(state_dim=c.state_dim, action_dim=c.action_dim, horizon=c.horizon,
                               cameras=tuple(c.cameras) if c.use_images else (), image_size=c.image_size)

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def featurize_instruction(self, instruction: str) -> np.ndarray:
        from fleetloop.policy.language import get_encoder
        return get_encoder().encode(instruction)

    @torch.no_grad()
    def sample_actions(self, inputs: Mapping[str, torch.Tensor], beta: float = 1.0) -> torch.Tensor:
        chunk = self.predict(inputs["state"], inputs["lang"], inputs["indicator"],
                             inputs.get("images") if self.config.use_images else None, beta=beta)
        clip = self.config.action_clip
        return chunk.clamp(-clip, clip) if clip > 0 else chunk

    def set_normalization(self, state_mean, state_std, action_mean=None, action_std=None) -> None:
        """Proprio only: the head regresses raw actions (already in [-1, 1] on MetaWorld)."""
        self.set_state_stats(state_mean, state_std)

    def export_weights(self, trained_only: bool = False) -> bytes:
        """Deterministic (same weights -> same bytes -> same sha256): safetensors orders tensors
        by dtype and name, but not metadata keys, hence a single metadata entry. Everything is
        trained, so trained_only changes nothing."""
        from safetensors.torch import save
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        return save(tensors, metadata={"fleetloop_config": self.config.to_json()})

    def load_weights(self, tensors: Mapping[str, torch.Tensor], trained_only: bool = False) -> None:
        try:
            self.load_state_dict(dict(tensors), strict=True)
        except RuntimeError as e:
            cfg = self.config
            raise CheckpointError(f"weights do not fit config (size={cfg.size}, state_dim={cfg.state_dim}, "
                                  f"use_images={cfg.use_images}): {e}") from None


# ---- weights (the seam's functions do the rest: fleetloop.policy.backend) ---------------------

def to_safetensors_bytes(net: PolicyModel) -> bytes:
    """Every tensor of `net` as one safetensors blob, its config in the metadata."""
    return net.export_weights()


def from_safetensors_bytes(config: ModelConfig | Mapping | str | None, data: bytes,
                           sha256: str | None = None, device: str | torch.device = "cpu") -> PolicyModel:
    """Rebuild a model from a weights blob (see backend.model_from_weights)."""
    if isinstance(config, ModelConfig):
        config = config.to_dict()
    return model_from_weights(data, config, sha256=sha256, device=device)
