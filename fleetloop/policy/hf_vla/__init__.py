"""The "hf-vla" backend: a pretrained Hugging Face vision-language model (Idefics3/SmolVLM,
PaliGemma, LLaVA, Gemma 3, Qwen2.5-VL, or a family added by a plug-in: families.py) as the
backbone, and a flow-matching action expert (pi0 / SmolVLA style) that cross-attends to the
backbone's hidden states.

    prefix  = the checkpoint's own prompt (processor + chat template, prompt.py) with one image per
              camera, the instruction and the indicator text, run through the family's own forward
              (its attention mask and positions)
    expert  = [state token][H action tokens (x_tau, tau)] -> velocity v_theta [B, H, A]

Flow matching (pi0's convention, tau = 1 is noise):
    x_tau = tau * eps + (1 - tau) * a,   u = eps - a,   loss = || v_theta(x_tau, tau, o) - u ||^2
    inference: x_1 = eps ~ N(0, I);  N Euler steps  x <- x - (1/N) v_theta(x, tau, o)

RECAP's indicator is prompt text ("Advantage: positive" / "Advantage: negative"), dropped with
probability indicator_dropout in training; classifier-free guidance mixes the velocities.

LoRA (peft) on the backbone's language model; only LoRA + the expert + the normalisation buffers
are exported with trained_only=True. The base is named in the config by a content digest and
must be provisioned on the machine (fleetloop.policy.hf_vla.base).

A base may also hold a pretrained action expert (EXPERT_FILE, written by `fleetloop vla bake`,
fleetloop.policy.hf_vla.bake): the model then starts from those weights (checked against the
config: a mismatch is a CheckpointError), they count as base weights, and with expert_mode="lora"
a version is only backbone LoRA + expert LoRA + normalisation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fleetloop.policy.backend import (INDICATOR_UNSET, CheckpointError, ObservationSpec, PolicyModel,
                                      register_backend)
from fleetloop.policy.hf_vla.base import EXPERT_FILE, base_digest, provision_base, resolve_base
from fleetloop.policy.hf_vla import prompt
from fleetloop.policy.hf_vla.expert import ActionExpert
from fleetloop.policy.hf_vla.families import FAMILIES, UnsupportedFamily, family_for, load_family_module

INDICATOR_TEXT = {1: "Advantage: negative", 2: "Advantage: positive"}

# Every setting, with its default; all of them are written to config_dict().
DEFAULTS: dict[str, Any] = dict(
    max_text_tokens=48,          # instruction token ids per sample (batch["lang"] width)
    expert_width=0,              # 0: about 3/4 of the backbone width (SmolVLA), a multiple of 8*heads
    expert_layers=0,             # 0: one per backbone decoder layer
    expert_heads=8,
    expert_mlp_ratio=4.0,
    num_steps=10,                # Euler steps at inference
    indicator_dropout=0.3,
    action_clip=1.0,             # 0 disables
    backbone_mode="lora",        # lora | full | frozen
    expert_mode="full",          # full | lora
    lora_rank=16,
    lora_alpha=32,
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
    lora_dropout=0.0,
    freeze_vision=True,
    dtype="float32",             # frozen backbone weights: float32 | bfloat16
    gradient_checkpointing=False,
    family_module="",            # a module registering more family adapters (families.py), imported first
    prompt_layout="processor",   # the checkpoint's processor + chat template (prompt.py); the only one
)
SPEC_KEYS = ("state_dim", "action_dim", "horizon", "cameras", "image_size")
EXPERT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _is_base_name(name: str, baked_expert: bool = False) -> bool:
    """A tensor that comes with the base checkpoint (LoRA adapters do not; the expert's own weights
    do when the base holds a baked expert)."""
    if ".lora_" in name:
        return False
    return name.startswith("vlm.") or (baked_expert and name.startswith("expert."))


# What the baked expert file's metadata must agree on with the config (besides every tensor's shape).
EXPERT_META_KEYS = ("state_dim", "action_dim", "horizon", "expert_width", "expert_layers", "expert_heads",
                    "expert_mlp_ratio", "kv_dim")


def read_baked_expert(base_dir) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(settings, tensors) of the expert baked into a base directory, or None if it holds none.
    Tensor names are the plain ActionExpert's (no LoRA wrapping)."""
    path = Path(base_dir) / EXPERT_FILE
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load
    data = path.read_bytes()
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["fleetloop_expert"])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        tensors = load(data)
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a fleetloop expert file ({e})") from None
    return meta, tensors


def base_config(base_dir, family_module: str = ""):
    """(Hugging Face config, family adapter) of the base at base_dir, family_module imported first
    where one is named; a one-line CheckpointError when transformers cannot read the config or no
    adapter serves its model_type."""
    from transformers import AutoConfig
    try:
        hf_cfg = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"base {base_dir} is not a Hugging Face model transformers can load ({first})") from None
    try:
        load_family_module(str(family_module))
        return hf_cfg, family_for(hf_cfg.model_type)
    except UnsupportedFamily as e:
        raise CheckpointError(f"base {base_dir}: {e}") from None


def _check_settings(s: dict) -> None:
    if s["backbone_mode"] not in ("lora", "full", "frozen"):
        raise ValueError(f"backbone_mode must be lora|full|frozen, got {s['backbone_mode']!r}")
    if s["expert_mode"] not in ("full", "lora"):
        raise ValueError(f"expert_mode must be full|lora, got {s['expert_mode']!r}")
    if s["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {s['dtype']!r}")
    if s["prompt_layout"] != "processor":
        raise ValueError(f"prompt_layout must be 'processor', got {s['prompt_layout']!r}")
    if int(s["max_text_tokens"]) < 1 or int(s["num_steps"]) < 1:
        raise ValueError("max_text_tokens and num_steps must be >= 1")


@register_backend("hf-vla")
class HFVLAPolicy(PolicyModel):
    prefers_trained_only = True

    def __init__(self, base_dir, base_sha256: str, state_dim: int, action_dim: int, horizon: int,
                 cameras, image_size: int, **settings):
        super().__init__()
        from transformers import AutoModelForImageTextToText
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown hf-vla settings {sorted(unknown)}: known {sorted(DEFAULTS)}")
        s = {**DEFAULTS, **settings}
        s["lora_targets"] = list(s["lora_targets"])
        _check_settings(s)
        cameras = list(cameras)
        if not cameras:
            raise ValueError("the hf-vla backend needs at least one camera")
        if min(state_dim, action_dim, horizon, image_size) < 1:
            raise ValueError("state_dim, action_dim, horizon and image_size must be >= 1")
        self.base_dir, self.base_sha256 = Path(base_dir), base_sha256
        self._spec = ObservationSpec(int(state_dim), int(action_dim), int(horizon), tuple(cameras), int(image_size))

        # -- backbone, strictly from the local (verified) directory --
        hf_cfg, self.adapter = base_config(base_dir, s["family_module"])
        self.family = hf_cfg.model_type
        full = AutoModelForImageTextToText.from_pretrained(str(base_dir), local_files_only=True,
                                                           dtype=DTYPES[s["dtype"]])
        self.vlm = full.model  # the LM head is never used: drop it (tied or not)
        del full
        text_cfg = hf_cfg.get_text_config()
        d_model, n_layers = int(text_cfg.hidden_size), int(text_cfg.num_hidden_layers)
        self.image_token_id = int(getattr(hf_cfg, "image_token_id", None) or hf_cfg.image_token_index)
        # the tower's input size for our frames (fixed for most families, the frame's own for Qwen)
        self.input_hw = tuple(self.adapter.input_size(hf_cfg, prompt.image_processor(str(base_dir)),
                                                      (int(image_size), int(image_size))))
        prompt.describe_resize((int(image_size),) * 2, self.input_hw, self.base_dir)

        # -- sizes the expert from the base (never from a weights blob) --
        baked = read_baked_expert(self.base_dir)
        self.baked_expert = baked is not None
        if baked is not None:
            # the base was verified by digest (resolve_base / build); re-check it did not change since
            if base_digest(self.base_dir) != str(base_sha256).lower():
                raise CheckpointError(f"base {self.base_dir} no longer has digest {base_sha256}")
            meta = baked[0]
            for k in ("expert_width", "expert_layers"):  # 0 (the default): whatever the base holds
                if not s[k] and k in meta:
                    s[k] = meta[k]
        heads = int(s["expert_heads"])
        if not s["expert_width"]:
            unit = 8 * heads
            s["expert_width"] = max(unit, int(round(0.75 * d_model / unit)) * unit)
        if not s["expert_layers"]:
            s["expert_layers"] = n_layers
        self.settings = s
        n_exp = int(s["expert_layers"])
        # expert layer i reads decoder layer round((i+1) N / E): evenly spaced, the last one the top
        self.kv_layers = [max(1, round((i + 1) * n_layers / n_exp)) for i in range(n_exp)]
        self.expert = ActionExpert(state_dim, action_dim, horizon, int(s["expert_width"]), n_exp, heads,
                                   d_model, float(s["expert_mlp_ratio"]))
        nn.init.normal_(self.expert.action_out.weight, std=1e-3)
        nn.init.zeros_(self.expert.action_out.bias)
        if baked is not None:
            self._load_baked_expert(*baked, d_model=d_model)

        # -- text: pad id and the pre-tokenised indicator prompts (derived from the base: not exported) --
        tok = prompt.tokenizer(str(base_dir))
        self.pad_id = prompt.pad_id(tok)
        ind = [tok(INDICATOR_TEXT[i], add_special_tokens=False)["input_ids"] for i in (1, 2)]
        width = max(len(x) for x in ind)
        table = torch.full((3, width), self.pad_id, dtype=torch.long)  # row 0 (unset): all padding
        for i, ids in enumerate(ind, start=1):
            table[i, :len(ids)] = torch.tensor(ids)
        self.register_buffer("indicator_ids", table, persistent=False)
        head, tail = prompt.layout(base_dir, self.adapter, self.image_token_id, len(cameras), self.input_hw)
        self.register_buffer("head_ids", torch.tensor(head, dtype=torch.long), persistent=False)
        self.register_buffer("tail_ids", torch.tensor(tail, dtype=torch.long), persistent=False)
        mean, std = prompt.image_stats(self.base_dir)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        # -- normalisation statistics: travel with the weights --
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))
        self.register_buffer("action_mean", torch.zeros(action_dim))
        self.register_buffer("action_std", torch.ones(action_dim))

        self._configure_training()
        self._check_image_tokens()

    @torch.no_grad()
    def _check_image_tokens(self) -> None:
        """The processor's prompt must hold as many image tokens as the tower makes for our frames."""
        sp = self._spec
        frames = torch.zeros(1, 3 * len(sp.cameras), sp.image_size, sp.image_size, dtype=torch.uint8,
                             device=self.head_ids.device)
        made = self.embed_images(frames).shape[:2].numel()
        placed = int((self.head_ids == self.image_token_id).sum())
        if made != placed:
            raise CheckpointError(f"base {self.base_dir}: the processor's prompt holds {placed} image tokens for "
                                  f"{len(sp.cameras)} camera(s), the vision tower makes {made} from "
                                  f"{self.input_hw[0]}x{self.input_hw[1]} px frames")

    @torch.no_grad()
    def _load_baked_expert(self, meta: dict, tensors: dict, d_model: int) -> None:
        """The base's pretrained expert into self.expert; it must be the one this config describes."""
        sp, s = self._spec, self.settings
        want = {"state_dim": sp.state_dim, "action_dim": sp.action_dim, "horizon": sp.horizon,
                "expert_width": int(s["expert_width"]), "expert_layers": int(s["expert_layers"]),
                "expert_heads": int(s["expert_heads"]), "expert_mlp_ratio": float(s["expert_mlp_ratio"]),
                "kv_dim": d_model}
        bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if bad:
            raise CheckpointError(f"the expert baked into base {self.base_sha256[:16]} does not match the config: "
                                  + ", ".join(f"{k} is {g!r} in the base, {w!r} in the config"
                                              for k, (g, w) in sorted(bad.items())))
        sd = self.expert.state_dict()
        missing, extra = sorted(set(sd) - set(tensors)), sorted(set(tensors) - set(sd))
        if missing or extra:
            raise CheckpointError(f"the expert baked into base {self.base_sha256[:16]} has {len(missing)} missing "
                                  f"{missing[:3]} and {len(extra)} unexpected {extra[:3]} tensors")
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(sd[n].shape):
                raise CheckpointError(f"baked expert tensor {n} has shape {tuple(t.shape)}, the config needs "
                                      f"{tuple(sd[n].shape)}")
        for n, t in tensors.items():
            sd[n].copy_(t)

    # ---- what trains -----------------------------------------------------------------------------

    def _configure_training(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        s = self.settings
        for p in self.parameters():
            p.requires_grad_(False)
        decoder = self.adapter.decoder(self.vlm)
        if s["backbone_mode"] == "lora":
            inject_adapter_in_model(LoraConfig(r=int(s["lora_rank"]), lora_alpha=int(s["lora_alpha"]),
                                               lora_dropout=float(s["lora_dropout"]),
                                               target_modules=list(s["lora_targets"])), decoder)
        elif s["backbone_mode"] == "full":
            for p in self.vlm.parameters():
                p.requires_grad_(True)
        if s["backbone_mode"] != "frozen":
            for m in self.adapter.vision_modules(self.vlm):
                for p in m.parameters():
                    p.requires_grad_(not s["freeze_vision"])
        if s["expert_mode"] == "lora":
            inject_adapter_in_model(LoraConfig(r=int(s["lora_rank"]), lora_alpha=int(s["lora_alpha"]),
                                               lora_dropout=float(s["lora_dropout"]),
                                               target_modules=EXPERT_LORA_TARGETS), self.expert)
        else:
            for p in self.expert.parameters():
                p.requires_grad_(True)
        for n, p in self.named_parameters():
            if ".lora_" in n:
                p.requires_grad_(True)
            if p.requires_grad and p.dtype != torch.float32:  # optimiser state and updates in fp32
                p.data = p.data.float()
        if s["gradient_checkpointing"]:
            # only active in train() mode; non-reentrant so frozen inputs need no requires_grad hack
            kw = {"use_reentrant": False}
            if hasattr(self.vlm, "activation_checkpointing_enable"):  # transformers >= 5.x name
                self.vlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)

    # ---- the seam's classmethods --------------------------------------------------------------------

    @classmethod
    def build(cls, base_dir, state_dim: int, action_dim: int, horizon: int, cameras=("front",),
              image_size: int = 64, **settings) -> "HFVLAPolicy":
        """New model on the base at base_dir: expert random, LoRA B = 0, normalisation identity."""
        base_dir = Path(base_dir).resolve()
        return cls(base_dir, base_digest(base_dir), state_dim, action_dim, horizon, cameras, image_size, **settings)

    @classmethod
    def _parse(cls, cfg: Mapping) -> tuple[dict, dict, dict]:
        cfg = dict(cfg)
        base = cfg.pop("base", None)
        cfg.pop("backend", None)
        cfg.pop("trained_only", None)
        if not isinstance(base, Mapping) or "sha256" not in base:
            raise CheckpointError("hf-vla config names no base {'sha256': ..., 'path': ...}")
        try:
            spec = {k: cfg.pop(k) for k in SPEC_KEYS}
        except KeyError as e:
            raise CheckpointError(f"hf-vla config lacks {e}") from None
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:  # a newer config may change semantics: refuse rather than guess
            raise CheckpointError(f"unknown hf-vla config fields {sorted(unknown)}")
        if "prompt_layout" not in cfg:  # trained with image tokens prepended to a bare instruction
            raise CheckpointError("this hf-vla version predates the checkpoint-processor prompt (no prompt_layout): "
                                  "its adapters were trained on another prompt; pretrain again")
        return dict(base), spec, cfg

    @classmethod
    def from_config(cls, cfg: Mapping, tensors: Mapping[str, torch.Tensor],
                    trained_only: bool | None = None) -> "HFVLAPolicy":
        base, spec, settings = cls._parse(cfg)
        path = resolve_base(base["sha256"], base.get("path"))
        try:
            model = cls(path, str(base["sha256"]).lower(), **spec, **settings)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"hf-vla config does not build: {e}") from None
        if trained_only is None:
            trained_only = set(tensors) != set(model._export_names(False))
        model.load_weights(tensors, trained_only=trained_only)
        return model.eval()

    @classmethod
    def instruction_featurizer(cls, cfg: Mapping) -> Callable[[str], np.ndarray]:
        base = cfg.get("base") or {}
        if "sha256" not in base:
            raise CheckpointError("hf-vla config names no base")
        tok = prompt.tokenizer(str(resolve_base(base["sha256"], base.get("path"))))
        n, pad = int(cfg.get("max_text_tokens", DEFAULTS["max_text_tokens"])), prompt.pad_id(tok)
        return lambda text: prompt.featurize(tok, text, n, pad)

    # ---- what it is --------------------------------------------------------------------------------

    @property
    def spec(self) -> ObservationSpec:
        return self._spec

    def config_dict(self) -> dict:
        sp = self._spec
        # informative (derived from the base): the family, and the size frames are resized to for the tower
        base = {"sha256": self.base_sha256, "path": str(self.base_dir), "family": self.family,
                "tower_input_px": list(self.input_hw)}
        if self.baked_expert:
            base["expert"] = "baked"  # informative: the digest already says so
        return {"backend": "hf-vla", "base": base,
                "state_dim": sp.state_dim, "action_dim": sp.action_dim, "horizon": sp.horizon,
                "cameras": list(sp.cameras), "image_size": sp.image_size, **self.settings}

    def featurize_instruction(self, instruction: str) -> np.ndarray:
        return prompt.featurize(prompt.tokenizer(str(self.base_dir)), instruction,
                                int(self.settings["max_text_tokens"]), self.pad_id)

    @property
    def decoder(self) -> nn.Module:
        return self.adapter.decoder(self.vlm)

    # ---- normalisation -------------------------------------------------------------------------------

    @torch.no_grad()
    def set_normalization(self, state_mean, state_std, action_mean=None, action_std=None,
                          min_std: float = 1e-2) -> None:
        def vec(x, n, what):
            t = torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(-1)
            if t.numel() != n:
                raise ValueError(f"{what} has {t.numel()} values, this policy has {n}")
            return t
        sp = self._spec
        self.state_mean.copy_(vec(state_mean, sp.state_dim, "state_mean"))
        self.state_std.copy_(vec(state_std, sp.state_dim, "state_std").clamp_min(min_std))
        if action_mean is not None:
            self.action_mean.copy_(vec(action_mean, sp.action_dim, "action_mean"))
        if action_std is not None:
            self.action_std.copy_(vec(action_std, sp.action_dim, "action_std").clamp_min(min_std))

    # ---- the prefix --------------------------------------------------------------------------------

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3*C, S, S] -> image tokens [B*C, T, D], batch-major, cameras in spec order (the
        order the family's forward scatters them into the prompt's image tokens)."""
        b, c, s, _ = images.shape
        cams = len(self._spec.cameras)
        if c != 3 * cams:
            raise ValueError(f"images have {c} channels, expected {3 * cams} (cameras {list(self._spec.cameras)})")
        x = images.reshape(b * cams, 3, s, images.shape[-1]).float() / 255.0
        if tuple(x.shape[-2:]) != self.input_hw:  # said once at build (prompt.describe_resize) and in the config
            x = F.interpolate(x, size=self.input_hw, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.pixel_mean) / self.pixel_std
        dt = next(self.adapter.vision_modules(self.vlm)[0].parameters()).dtype
        return self.adapter.embed_images(self.vlm, x.to(dt))

    def prefix_ids(self, lang: torch.Tensor, indicator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[head][instruction][indicator][tail] token ids [B, L] and their mask (True = real token)."""
        b = lang.shape[0]
        ind = self.indicator_ids[indicator.long()]
        head, tail = self.head_ids.expand(b, -1), self.tail_ids.expand(b, -1)
        ids = torch.cat([head, lang.long(), ind, tail], dim=1)
        ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
        mask = torch.cat([ones(head), lang != self.pad_id, ind != self.pad_id, ones(tail)], dim=1)
        return ids, mask

    def prefix(self, image_tokens: torch.Tensor, lang: torch.Tensor, indicator: torch.Tensor):
        """Run the family's own forward once on the prompt with the image tokens in place; returns the
        hidden states the expert layers read (float32) and the prefix mask [B, L] (True = real token)."""
        ids, mask = self.prefix_ids(lang, indicator)
        image_mask = ids == self.image_token_id
        n_images = image_tokens.shape[0]
        out = self.vlm(input_ids=ids, attention_mask=mask.long(), position_ids=self.adapter.position_ids(mask),
                       mm_encoder_outputs={"image": self.adapter.encoder_output(image_tokens)},
                       output_hidden_states=True, use_cache=False,
                       **self.adapter.forward_kwargs(self.vlm, ids, image_mask, n_images, self.input_hw))
        return [out.hidden_states[i].float() for i in self.kv_layers], mask

    def _state(self, state: torch.Tensor) -> torch.Tensor:
        if state.shape[-1] != self._spec.state_dim:
            raise ValueError(f"state has {state.shape[-1]} dims but this policy was built for "
                             f"state_dim={self._spec.state_dim}")
        return ((state.float() - self.state_mean) / self.state_std).clamp(-10, 10)

    # ---- learning -----------------------------------------------------------------------------------

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked, weighted flow-matching loss.

            tau ~ 0.001 + 0.999 * Beta(1.5, 1)         (openpi's sample_time: tau = 1 is noise, so the
                                                         Beta(1.5,1) density ~ tau^0.5 favours the noisy end;
                                                         the paper's Beta((s - t)/s) in its t = 0-is-noise
                                                         convention is the same distribution)
            x_tau = tau * eps + (1 - tau) * a,  u = eps - a       (a: normalised actions)
            l_i = sum_h m_ih * mean_a (v_theta - u)^2 / max(1, sum_h m_ih)
            L = sum_i w_i l_i / sum_i w_i
        """
        indicator = batch["indicator"].long()
        p = float(self.settings["indicator_dropout"])
        if self.training and p > 0:
            drop = torch.rand(indicator.shape, device=indicator.device) < p
            indicator = torch.where(drop, torch.zeros_like(indicator), indicator)
        hs, mask = self.prefix(self.embed_images(batch["images"]), batch["lang"], indicator)
        kvs = self.expert.prefix_kv(hs)
        target = batch["actions"].float()
        sp = self._spec
        if tuple(target.shape[1:]) != (sp.horizon, sp.action_dim):
            raise ValueError(f"target chunk {tuple(target.shape[1:])} != model chunk {(sp.horizon, sp.action_dim)}")
        a = (target - self.action_mean) / self.action_std
        b = a.shape[0]
        eps = torch.randn_like(a)
        # Beta(1.5, 1) by inverse CDF: F(x) = x^1.5  ->  x = U^(2/3)
        tau = 0.001 + 0.999 * torch.rand(b, device=a.device) ** (2.0 / 3.0)
        x_tau = tau[:, None, None] * eps + (1 - tau[:, None, None]) * a
        u = eps - a
        v = self.expert(self._state(batch["state"]), x_tau, tau, kvs, mask)
        m = batch["action_mask"].float()                                           # [B, H]
        per_step = (v - u).square().mean(-1)                                       # [B, H]
        per_sample = (per_step * m).sum(1) / m.sum(1).clamp_min(1.0)
        w = batch.get("weight")
        w = torch.ones_like(per_sample) if w is None else w.float()
        loss = (w * per_sample).sum() / w.sum().clamp_min(1e-8)
        with torch.no_grad():
            metrics = {"loss": loss.item(),
                       "mse": ((per_step * m).sum() / m.sum().clamp_min(1.0)).item(),
                       "tau_mean": tau.mean().item(),
                       "uncond_frac": (indicator == INDICATOR_UNSET).float().mean().item()}
        return loss, metrics

    # ---- acting -------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_actions(self, inputs: Mapping[str, torch.Tensor], beta: float = 1.0,
                       generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                       num_steps: int | None = None) -> torch.Tensor:
        """Action chunks [B, H, A]: one backbone pass (both CFG branches in one 2B batch), K/V once,
        then num_steps Euler steps of the expert from x_1 = eps (same eps for both branches):
            v = v_uncond + beta * (v_cond - v_uncond);   x <- x - (1/N) v
        `generator` / `noise` [B,H,A] make it reproducible."""
        sp = self._spec
        state = inputs["state"]
        b = state.shape[0]
        indicator = inputs.get("indicator")
        indicator = torch.zeros(b, dtype=torch.long, device=state.device) if indicator is None else indicator.long()
        guided = beta != 1.0 and bool((indicator != INDICATOR_UNSET).any())
        img = self.embed_images(inputs["images"])  # the vision tower runs once, shared by both branches
        lang = inputs["lang"]
        s = self._state(state)
        if guided:
            img, lang, s = torch.cat([img, img]), torch.cat([lang, lang]), torch.cat([s, s])
            indicator = torch.cat([indicator, torch.zeros_like(indicator)])
        hs, mask = self.prefix(img, lang, indicator)
        kvs = self.expert.prefix_kv(hs)  # reused by every step below
        if noise is None:
            dev = generator.device if generator is not None else state.device
            noise = torch.randn(b, sp.horizon, sp.action_dim, generator=generator, device=dev)
        x = noise.to(device=state.device, dtype=torch.float32)
        n = int(num_steps or self.settings["num_steps"])
        for k in range(n):
            tau = torch.full((x.shape[0],), 1.0 - k / n, device=x.device)
            if guided:
                v2 = self.expert(s, torch.cat([x, x]), torch.cat([tau, tau]), kvs, mask)
                v_c, v_u = v2[:b], v2[b:]
                v = v_u + beta * (v_c - v_u)
                v = torch.where((indicator[:b] == INDICATOR_UNSET)[:, None, None], v_c, v)
            else:
                v = self.expert(s, x, tau, kvs, mask)
            x = x - v / n
        actions = x * self.action_std + self.action_mean
        clip = float(self.settings["action_clip"])
        return actions.clamp(-clip, clip) if clip > 0 else actions

    # ---- weights ------------------------------------------------------------------------------------

    def _export_names(self, trained_only: bool) -> list[str]:
        names = list(self.state_dict())
        if not trained_only:
            return sorted(names)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return sorted(n for n in names if n in trainable or not _is_base_name(n, self.baked_expert))

    def export_weights(self, trained_only: bool = False) -> bytes:
        from safetensors.torch import save
        sd = self.state_dict()
        tensors = {n: sd[n].detach().to("cpu").contiguous() for n in self._export_names(trained_only)}
        return save(tensors, metadata={"fleetloop_config": self.config_json()})

    @torch.no_grad()
    def load_weights(self, tensors: Mapping[str, torch.Tensor], trained_only: bool = False) -> None:
        want = set(self._export_names(trained_only))
        got = set(tensors)
        if got != want:
            missing, extra = sorted(want - got), sorted(got - want)
            raise CheckpointError(f"hf-vla weights ({'trained-only' if trained_only else 'full'}) do not fit the "
                                  f"model built on base {self.base_sha256[:16]}: {len(missing)} missing "
                                  f"{missing[:4]}, {len(extra)} unexpected {extra[:4]}")
        sd = self.state_dict()
        for n in sorted(got):
            if tuple(tensors[n].shape) != tuple(sd[n].shape):
                raise CheckpointError(f"hf-vla weight {n} has shape {tuple(tensors[n].shape)}, the model built "
                                      f"on base {self.base_sha256[:16]} expects {tuple(sd[n].shape)}")
            if not (tensors[n].is_floating_point() or tensors[n].dtype == sd[n].dtype):
                raise CheckpointError(f"hf-vla weight {n} has dtype {tensors[n].dtype}, expected {sd[n].dtype}")
        for n in sorted(got):
            sd[n].copy_(tensors[n])

    # ---- for benchmarks -----------------------------------------------------------------------------

    def prefix_length(self) -> int:
        return (self.head_ids.numel() + self.tail_ids.numel() + int(self.settings["max_text_tokens"])
                + self.indicator_ids.shape[1])

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample, 2*N*T per matmul pass (attention scores not counted):

            vision  (N_v params, T_v = cams * patches tokens):  2 N_v T_v frozen  | 6 N_v T_v trained
            decoder (N_d params, T_p prefix tokens):            2 N_d T_p frozen  | 6 N_d T_p full
                    lora: forward 2 N_d T_p + backward activation grads through the frozen weights
                    2 N_d T_p + LoRA 6 N_lora T_p  ->  4 N_d T_p + 6 N_lora T_p
            expert  (N_e, T_e = 1 + H tokens; its K/V projections N_kv see T_p tokens):
                    6 (N_e - N_kv) T_e + 6 N_kv T_p
        """
        s, sp = self.settings, self._spec
        t_p = self.prefix_length()
        vis = sum(p.numel() for m in self.adapter.vision_modules(self.vlm) for p in m.parameters())
        patches = len(sp.cameras) * self.adapter.vision_patches(self.vlm.config, self.input_hw)
        dec_all = list(self.decoder.named_parameters())
        n_lora = sum(p.numel() for n, p in dec_all if ".lora_" in n)
        n_dec = sum(p.numel() for n, p in dec_all if ".lora_" not in n and "embed_tokens" not in n)
        vis_f = (6 if not s["freeze_vision"] and s["backbone_mode"] != "frozen" else 2) * vis * patches
        dec_f = {"frozen": 2 * n_dec * t_p, "full": 6 * n_dec * t_p,
                 "lora": 4 * n_dec * t_p + 6 * n_lora * t_p}[s["backbone_mode"]]
        n_kv = sum(p.numel() for n, p in self.expert.named_parameters()
                   if ".cross_attn.k_proj" in n or ".cross_attn.v_proj" in n or ".kv_norm" in n)
        n_e = sum(p.numel() for p in self.expert.parameters())
        return float(vis_f + dec_f + 6 * (n_e - n_kv) * (1 + sp.horizon) + 6 * n_kv * t_p)


__all__ = ["FAMILIES", "DEFAULTS", "EXPERT_FILE", "HFVLAPolicy", "base_config", "base_digest", "provision_base",
           "read_baked_expert", "resolve_base"]
