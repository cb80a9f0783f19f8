"""The policy seam: the one interface through which the actor runtime, the learner, pretraining,
evaluation, the registry and the benchmarks use a model, so that none of them knows which model
it is.

A *backend* is a PolicyModel subclass registered under a name:

    tiny     fleetloop's own 0.5M-parameter VLA (fleetloop.policy.model.VLAPolicyNet)
    hf-vla   a pretrained Hugging Face vision-language model + a flow-matching action expert,
             LoRA on the backbone (fleetloop.policy.hf_vla)

What a PolicyModel offers (an nn.Module):

    spec                       ObservationSpec: what a robot must send (cameras, image size,
                               state and action dims) and what it gets back (H x A chunks)
    featurize_instruction(s)   instruction text -> a fixed-shape numpy array, cached per
                               instruction by callers and fed back as batch["lang"]
                               (tiny: a MiniLM embedding; hf-vla: token ids)
    loss(batch)                (scalar, metrics): the weighted mean of per-sample losses,
                               L = sum_i w_i l_i / sum_i w_i, masked by batch["action_mask"]
    sample_actions(inputs, beta)  final action chunks [B, H, A] for a batch of observations
                               (state, lang, indicator, images), classifier-free guided when
                               an indicator is set and beta != 1
    trainable_parameters()     what the optimiser updates (LoRA + expert, or everything)
    export_weights(trained_only)  safetensors bytes, the config in their metadata
    set_normalization(...)     state/action statistics that travel with the weights

and the module-level functions below build, save, load and rebuild models from published
weights by the backend name written in every config. Batches are dicts of tensors with the keys
state [B,S] float, lang [B,...], indicator [B] int64 (0 unset, 1 negative, 2 positive),
images [B, 3*cams, S, S] uint8, actions [B,H,A], action_mask [B,H], weight [B].
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
import torch.nn as nn

from fleetloop.files import write_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMATS = ("fleetloop-vla/1", "fleetloop-policy/2")  # /1: written before backends existed
CHECKPOINT_FORMAT = "fleetloop-policy/2"
DEFAULT_BACKEND = "tiny"
INDICATOR_UNSET, INDICATOR_NEGATIVE, INDICATOR_POSITIVE = 0, 1, 2


class CheckpointError(Exception):
    """A checkpoint or weights blob that cannot be loaded: missing file, hash mismatch,
    corrupt bytes, weights that do not fit the config, or a base that is not here."""


@dataclass(frozen=True)
class ObservationSpec:
    """What a robot must send to this policy and what it gets back."""
    state_dim: int
    action_dim: int
    horizon: int                                      # H: actions per chunk
    cameras: tuple[str, ...] = ()                     # () = state + language only
    image_size: int = 64                              # square RGB frames, uint8, this many pixels a side
    image_encodings: tuple[str, ...] = ("png", "raw")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cameras"], d["image_encodings"] = list(self.cameras), list(self.image_encodings)
        return d


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PolicyModel(nn.Module):
    """Base class of every backend's model. Subclasses set `backend` and implement the methods
    that raise NotImplementedError; `@register_backend` makes them loadable by name."""

    backend: ClassVar[str] = ""

    # ---- what it is ------------------------------------------------------------------------

    @property
    def spec(self) -> ObservationSpec:
        raise NotImplementedError

    def config_dict(self) -> dict:
        """Everything needed to rebuild this model's structure (JSON-able). Must include
        "backend" unless the backend is the default."""
        raise NotImplementedError

    def config_json(self) -> str:
        return json.dumps(self.config_dict(), sort_keys=True)

    # ---- inputs ----------------------------------------------------------------------------

    def featurize_instruction(self, instruction: str) -> np.ndarray:
        raise NotImplementedError

    # ---- learning and acting -----------------------------------------------------------------

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def sample_actions(self, inputs: Mapping[str, torch.Tensor], beta: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def set_normalization(self, state_mean, state_std, action_mean=None, action_std=None) -> None:
        raise NotImplementedError

    # ---- weights -------------------------------------------------------------------------------

    def export_weights(self, trained_only: bool = False) -> bytes:
        """safetensors bytes; the config JSON rides in the metadata (one entry, so the bytes
        are deterministic). trained_only: just what training changes (plus the normalisation
        buffers), on top of a base the config names; otherwise every tensor."""
        raise NotImplementedError

    def load_weights(self, tensors: Mapping[str, torch.Tensor], trained_only: bool = False) -> None:
        raise NotImplementedError

    # ---- for benchmarks ----------------------------------------------------------------------

    def num_parameters(self, trainable: bool = False) -> int:
        return sum(p.numel() for p in (self.trainable_parameters() if trainable else self.parameters()))

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (forward + backward), for MFU. Default: 6 x parameters
        (one token per sample); transformer backends count their tokens."""
        return 6.0 * self.num_parameters()


# ---- the registry of backends -----------------------------------------------------------------

BACKENDS: dict[str, type[PolicyModel]] = {}
_BUILTIN = {"tiny": "fleetloop.policy.model", "hf-vla": "fleetloop.policy.hf_vla"}


def register_backend(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.backend = name
        BACKENDS[name] = cls
        return cls
    return deco


def backend_class(name: str) -> type[PolicyModel]:
    if name not in BACKENDS and name in _BUILTIN:
        import importlib
        importlib.import_module(_BUILTIN[name])
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown policy backend {name!r}: choose from {sorted(set(BACKENDS) | set(_BUILTIN))}") from None


def backend_names() -> list[str]:
    return sorted(set(BACKENDS) | set(_BUILTIN))


def backend_of(config: Mapping) -> str:
    return str(config.get("backend") or DEFAULT_BACKEND)


def parse_config(config: str | bytes | Mapping) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    try:
        d = json.loads(config)
    except ValueError as e:
        raise CheckpointError(f"model config is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError("model config must be a JSON object")
    return d


# A backend class implements these classmethods (see fleetloop.policy.model for the simplest):
#   build(spec_fields..., **options) -> model        new model for pretraining
#   from_config(config: dict, tensors, trained_only: bool) -> model   rebuild from weights
#   instruction_featurizer(config: dict) -> (str -> np.ndarray)   cheap, no weights needed

def build_model(backend: str, **options: Any) -> PolicyModel:
    """A new, untrained model (pretraining). Options are the backend's (see its build())."""
    return backend_class(backend).build(**options)


def weights_metadata(data: bytes) -> dict:
    """The config a weights blob carries (safetensors header metadata), without loading it."""
    try:
        n = int.from_bytes(data[:8], "little")
        if not 0 < n <= min(len(data) - 8, 100 << 20):
            raise ValueError(f"header length {n} out of range")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        return parse_config(meta["fleetloop_config"])
    except (ValueError, KeyError, TypeError, CheckpointError) as e:
        raise CheckpointError(f"weights carry no usable fleetloop_config metadata ({e}); pass the config") from None


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt safetensors weights ({len(data)} bytes): {e}") from None


def model_from_weights(data: bytes, config: str | Mapping | None = None, sha256: str | None = None,
                       device: str | torch.device = "cpu") -> PolicyModel:
    """Rebuild a model from a weights blob (a published version, a learner checkpoint).
    `sha256`, if given, must match the bytes first; `config` None reads it from the blob.
    Returns the model in eval mode."""
    if sha256 is not None and sha256_hex(data) != sha256.lower():
        raise CheckpointError(f"weights sha256 mismatch: expected {sha256}, got {sha256_hex(data)}")
    cfg = weights_metadata(data) if config is None else parse_config(config)
    tensors = load_tensors(data)
    model = backend_class(backend_of(cfg)).from_config(cfg, tensors)
    return model.to(device).eval()


def instruction_featurizer(config: str | Mapping) -> Callable[[str], np.ndarray]:
    """instruction -> the array the model takes as batch["lang"], from the config alone (the
    replay service builds batches without holding the model)."""
    cfg = parse_config(config)
    return backend_class(backend_of(cfg)).instruction_featurizer(cfg)


def spec_from_config(config: str | Mapping) -> ObservationSpec:
    """A model's ObservationSpec from its config alone (every backend's config carries the spec
    fields; the tiny backend's `use_images: false` means no cameras)."""
    c = parse_config(config)
    try:
        cameras = tuple(c.get("cameras") or ()) if c.get("use_images", True) else ()
        return ObservationSpec(state_dim=int(c["state_dim"]), action_dim=int(c["action_dim"]),
                               horizon=int(c["horizon"]), cameras=cameras, image_size=int(c.get("image_size", 64)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"model config lacks the observation spec ({e})") from None


@dataclass
class ExportedVersion:
    """What the registry publishes for a model: weights, config, and what they need."""
    weights: bytes
    config_json: str
    backend: str
    base_sha256: str          # "" when the weights are self-contained


def export_version(model: PolicyModel, trained_only: bool | None = None) -> ExportedVersion:
    """A model as a publishable version. trained_only None: the backend's preference (LoRA
    backends ship only adapters + expert; the base is named by its digest)."""
    if trained_only is None:
        trained_only = bool(getattr(model, "prefers_trained_only", False))
    cfg = model.config_dict()
    base = str((cfg.get("base") or {}).get("sha256", "")) if trained_only else ""
    return ExportedVersion(model.export_weights(trained_only=trained_only), model.config_json(),
                           model.backend if model.backend != DEFAULT_BACKEND else "", base)


# ---- checkpoint directories -------------------------------------------------------------------

def save_checkpoint(model: PolicyModel, directory: str | os.PathLike, extra: Mapping | None = None,
                    trained_only: bool | None = None) -> Path:
    """<dir>/model.safetensors then <dir>/config.json (backend, model config, the weights'
    sha256, free-form `extra`). trained_only None: the backend's preference (a LoRA model
    saves only what it trains; its base is named in the config)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if trained_only is None:
        trained_only = bool(getattr(model, "prefers_trained_only", False))
    data = model.export_weights(trained_only=trained_only)
    write_atomic(d / WEIGHTS_FILE, data)
    doc = {"format": CHECKPOINT_FORMAT, "backend": model.backend, "model": model.config_dict(),
           "weights_sha256": sha256_hex(data), "weights_bytes": len(data), "trained_only": trained_only,
           "extra": dict(extra or {})}
    write_atomic(d / CONFIG_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())
    return d


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint dir (keys: format, backend, model, weights_sha256, extra)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a fleetloop checkpoint directory")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") not in CHECKPOINT_FORMATS or "model" not in doc:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}, expected {CHECKPOINT_FORMAT}")
    doc.setdefault("backend", backend_of(doc["model"]))
    return doc


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> PolicyModel:
    """Load a checkpoint written by save_checkpoint, verifying the weights' sha256."""
    doc = read_checkpoint_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found (config.json present: incomplete checkpoint)")
    cfg = dict(doc["model"])
    if doc["backend"] != DEFAULT_BACKEND:
        cfg["backend"] = doc["backend"]
    try:
        return model_from_weights(path.read_bytes(), cfg, sha256=doc.get("weights_sha256"), device=device)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


__all__ = ["BACKENDS", "CheckpointError", "ObservationSpec", "PolicyModel", "backend_class", "backend_names",
           "build_model", "instruction_featurizer", "load_checkpoint", "model_from_weights",
           "read_checkpoint_config", "register_backend", "save_checkpoint", "sha256_hex", "weights_metadata",
           "spec_from_config", "export_version", "ExportedVersion"]
