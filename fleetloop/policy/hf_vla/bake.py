"""Bake a pretrained action expert into a base, so that versions need not ship it.

A version of an hf-vla model holds what trains. With the expert trained in full, every update
ships the whole expert (a pi0-sized 300M expert is ~10% of the model). Baking makes the pretrained
expert part of the base:

    new base       = the checkpoint's base files (hard-linked, else copied)
                     + EXPERT_FILE: the expert's weights (LoRA merged, if it had any), its
                       settings in the safetensors metadata ("fleetloop_expert")
                     -> its own digest (base_digest covers the model's files)
    new checkpoint = on the new base, expert_mode="lora" by default: the backbone LoRA adapters
                     (and any other trained backbone tensors) and the normalisation buffers
                     carried over, fresh expert LoRA (B = 0): it acts exactly as the pretrained
                     model (checked here), and a version is backbone LoRA + expert LoRA +
                     normalisation only.

The normalisation statistics stay in the version (they are per data set and a few hundred bytes).
Robots must be provisioned with the NEW base (`fleetloop vla provision BASE_OUT`)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from fleetloop.policy.backend import CheckpointError, read_checkpoint_config, save_checkpoint
from fleetloop.policy.hf_vla.base import EXPERT_FILE, model_files

EXPERT_FORMAT = "fleetloop-expert/1"


def expert_state(model) -> dict[str, torch.Tensor]:
    """The expert's weights under the plain ActionExpert names, LoRA merged into them if it has any."""
    from peft.tuners.lora import LoraLayer
    expert = copy.deepcopy(model.expert).float()
    for m in expert.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    out = {}
    for n, t in expert.state_dict().items():
        if ".lora_" in n:
            continue
        out[n.replace(".base_layer.", ".")] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def expert_meta(model) -> dict[str, Any]:
    sp, s = model.spec, model.settings
    return {"format": EXPERT_FORMAT, "state_dim": sp.state_dim, "action_dim": sp.action_dim, "horizon": sp.horizon,
            "expert_width": int(s["expert_width"]), "expert_layers": int(s["expert_layers"]),
            "expert_heads": int(s["expert_heads"]), "expert_mlp_ratio": float(s["expert_mlp_ratio"]),
            "kv_dim": int(model.expert.layers[0].kv_norm.normalized_shape[0]) if len(model.expert.layers) else 0,
            "source_base": model.base_sha256}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def bake_base(model, base_out) -> Path:
    """Write base_out = model's base files + its expert (EXPERT_FILE). Returns the directory."""
    from safetensors.torch import save
    src, out = Path(model.base_dir), Path(base_out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --base-out")
    if out.resolve() == src.resolve():
        raise ValueError("the baked base must be a new directory")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for p in model_files(src):  # the files the digest covers (no download metadata, no stamp)
            rel = p.relative_to(src)
            if rel.as_posix() != EXPERT_FILE:  # a re-bake replaces the expert
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(p, tmp / rel)
        data = save(expert_state(model), metadata={"fleetloop_expert": json.dumps(expert_meta(model), sort_keys=True)})
        (tmp / EXPERT_FILE).write_bytes(data)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out.resolve()


def _carry(src, dst) -> list[str]:
    """Copy the source's trained non-expert tensors (backbone LoRA, trained vision/backbone weights,
    normalisation) into dst; the expert's come from the base (and its fresh LoRA stays B = 0)."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    want = dst._export_names(True)
    src_has_lora = any(".lora_" in n and not n.startswith("expert.") for n in src_sd)
    carried = []
    with torch.no_grad():
        for n in want:
            if n.startswith("expert."):
                continue
            if n in src_sd and tuple(src_sd[n].shape) == tuple(dst_sd[n].shape):
                dst_sd[n].copy_(src_sd[n])
                carried.append(n)
            elif ".lora_" in n and not src_has_lora:
                continue  # a new adapter on a backbone the source did not adapt: fresh (B = 0)
            else:
                raise ValueError(f"cannot carry {n} over from the checkpoint (backbone LoRA settings changed? "
                                 "bake keeps lora_rank, lora_alpha and lora_targets)")
    lost = [n for n in src._export_names(True) if not n.startswith("expert.") and n not in set(want)]
    if lost:
        raise ValueError(f"the baked checkpoint would drop {len(lost)} trained tensors, e.g. {lost[:3]} "
                         "(a backbone trained in full cannot be baked: only the expert goes into the base)")
    return carried


def bake_model(model, base_out, **overrides) -> Any:
    """Bake `model`'s expert into a new base at base_out and return the model rebuilt on it
    (expert_mode "lora" unless overridden, trained backbone tensors + normalisation carried over)."""
    from fleetloop.policy.hf_vla import HFVLAPolicy
    if model.settings["backbone_mode"] == "full":
        raise ValueError("bake needs backbone_mode lora or frozen: a backbone trained in full is not in any base")
    new_base = bake_base(model, base_out)
    sp = model.spec
    settings = {**model.settings, "expert_mode": "lora", **overrides}
    torch.manual_seed(0)  # the fresh expert LoRA's A matrices: reproducible
    baked = HFVLAPolicy.build(new_base, state_dim=sp.state_dim, action_dim=sp.action_dim, horizon=sp.horizon,
                              cameras=list(sp.cameras), image_size=sp.image_size, **settings)
    _carry(model, baked)
    return baked.eval()


@torch.no_grad()
def max_action_difference(a, b, seed: int = 0, batch: int = 2) -> float:
    """Largest |a - b| over action chunks of the two models on the same random observations and noise."""
    sp = a.spec
    g = torch.Generator().manual_seed(seed)
    texts = ["pick up the cube", "open the drawer"] * batch
    lang = torch.tensor(np.stack([a.featurize_instruction(t) for t in texts[:batch]]))
    inputs = {"state": torch.randn(batch, sp.state_dim, generator=g), "lang": lang,
              "indicator": torch.tensor(([2, 1] * batch)[:batch]),
              "images": torch.randint(0, 256, (batch, 3 * len(sp.cameras), sp.image_size, sp.image_size),
                                      generator=g, dtype=torch.uint8)}
    noise = torch.randn(batch, sp.horizon, sp.action_dim, generator=g)
    was = a.training, b.training
    a.eval(), b.eval()
    try:
        return float((a.sample_actions(inputs, beta=1.5, noise=noise)
                      - b.sample_actions(inputs, beta=1.5, noise=noise)).abs().max())
    finally:
        a.train(was[0]), b.train(was[1])


def bake_checkpoint(checkpoint_dir, base_out, checkpoint_out, overrides: Mapping | None = None,
                    verify: bool = True, tolerance: float = 1e-5) -> dict:
    """`fleetloop vla bake`: checkpoint_dir (an hf-vla checkpoint) -> a new base at base_out and a
    checkpoint at checkpoint_out on it. verify: both act the same (max |diff| <= tolerance).

    All or nothing: the base is baked and checked in a hidden folder beside base_out and moved
    into place only once the checkpoint is written, so a bake that fails (verification, a full
    disk, an interrupt) leaves neither behind and the same command can simply be run again."""
    from fleetloop.policy.backend import load_checkpoint
    doc = read_checkpoint_config(checkpoint_dir)
    if doc["backend"] != "hf-vla":
        raise CheckpointError(f"{checkpoint_dir} is a {doc['backend']!r} checkpoint; bake needs hf-vla")
    final = Path(base_out)
    if final.exists() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists and is not empty: choose a new --base-out")
    ckpt_out = Path(checkpoint_out)
    ckpt_existed = ckpt_out.exists()
    src = load_checkpoint(checkpoint_dir)
    staging = final.with_name(f".{final.name}.baking-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    moved = False
    try:
        baked = bake_model(src, staging, **dict(overrides or {}))
        diff = max_action_difference(src, baked) if verify else None
        if diff is not None and diff > tolerance:
            raise RuntimeError(f"the baked model acts differently from the checkpoint (max |diff| {diff:.3g}); "
                               f"nothing was written")
        if final.exists():
            final.rmdir()  # empty (checked above)
        os.replace(staging, final)
        moved = True
        baked.base_dir = final.resolve()  # the checkpoint names the base where it now lies
        extra = dict(doc.get("extra") or {})
        extra["baked_from"] = {"checkpoint": str(Path(checkpoint_dir).resolve()),
                               "weights_sha256": doc["weights_sha256"], "base_sha256": src.base_sha256}
        save_checkpoint(baked, ckpt_out, extra=extra, trained_only=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if moved:
            shutil.rmtree(final, ignore_errors=True)
        if not ckpt_existed:
            shutil.rmtree(ckpt_out, ignore_errors=True)
        raise
    out = read_checkpoint_config(checkpoint_out)
    return {"base": str(baked.base_dir), "base_sha256": baked.base_sha256,  # the staged copy's digest: moving keeps it
            "source_base_sha256": src.base_sha256, "checkpoint": str(Path(checkpoint_out).resolve()),
            "expert_mode": baked.settings["expert_mode"], "weights_bytes": out["weights_bytes"],
            "source_weights_bytes": doc.get("weights_bytes"), "max_action_diff": diff}


__all__ = ["EXPERT_FILE", "bake_base", "bake_checkpoint", "bake_model", "expert_state", "max_action_difference"]
