"""The expert rides in the base: `fleetloop vla bake` writes a new base holding a pretrained expert,
and versions on it carry only LoRA (backbone + expert) and the normalisation buffers. Tiny bases."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fleetloop.policy.backend import (CheckpointError, export_version, load_checkpoint, load_tensors,  # noqa: E402
                                      model_from_weights, read_checkpoint_config, save_checkpoint)
from fleetloop.policy.hf_vla import EXPERT_FILE, HFVLAPolicy, base_digest, provision_base  # noqa: E402
from fleetloop.policy.hf_vla.bake import bake_base, bake_model, max_action_difference  # noqa: E402
from fleetloop.policy.hf_vla.tiny import make_tiny_base  # noqa: E402
from fleetloop.release.runtime import PolicyLoader  # noqa: E402

S, A, H, IMG = 5, 3, 4, 24
SMALL = dict(expert_width=32, expert_heads=4, expert_layers=2, max_text_tokens=12, num_steps=4)
NORM = ([0.1] * S, [2.0] * S, [0.2] * A, [0.5] * A)
NORM_NAMES = {"state_mean", "state_std", "action_mean", "action_std"}


pytestmark = pytest.mark.usefixtures("isolated_bases")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base("idefics3", tmp_path_factory.mktemp("base") / "idefics3")


def pretrained(base, **kw):
    """Stands in for a pretrained checkpoint: expert trained in full, LoRA and normalisation moved."""
    torch.manual_seed(0)
    m = HFVLAPolicy.build(base, state_dim=S, action_dim=A, horizon=H, cameras=["front"], image_size=IMG,
                          **{**SMALL, **kw})
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.set_normalization(*NORM)
    return m.eval()


@pytest.fixture(scope="module")
def baked(base, tmp_path_factory):
    """(source checkpoint dir, source model, bake result JSON, baked model) via the CLI."""
    from fleetloop.policy.hf_vla import cli
    root = tmp_path_factory.mktemp("bake")
    src = pretrained(base)
    save_checkpoint(src, root / "ckpt", extra={"step": 100})
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.run(parser.parse_args(["bake", str(root / "ckpt"), "--base-out", str(root / "baked-base"),
                                          "--checkpoint-out", str(root / "baked-ckpt")])) == 0
    out = json.loads(buf.getvalue())
    return dict(root=root, src=src, out=out, model=load_checkpoint(root / "baked-ckpt"))


def test_bake_writes_a_new_base_and_keeps_actions(base, baked):
    out, src, m = baked["out"], baked["src"], baked["model"]
    new_base = baked["root"] / "baked-base"
    assert (new_base / EXPERT_FILE).is_file() and not (base / EXPERT_FILE).exists()
    assert out["base_sha256"] == base_digest(new_base) != base_digest(base) == out["source_base_sha256"]
    assert out["expert_mode"] == "lora" and out["max_action_diff"] == 0.0
    assert out["weights_bytes"] < out["source_weights_bytes"]
    assert m.baked_expert and m.settings["expert_mode"] == "lora"
    assert m.config_dict()["base"]["sha256"] == out["base_sha256"]
    doc = read_checkpoint_config(baked["root"] / "baked-ckpt")
    assert doc["extra"]["step"] == 100 and doc["extra"]["baked_from"]["base_sha256"] == base_digest(base)
    # acts exactly like the pretrained model, guided or not
    assert max_action_difference(src, m) == 0.0
    assert max_action_difference(src, m, seed=3, batch=1) == 0.0
    # the expert LoRA is fresh: B = 0, and it is what trains in the expert
    sd = m.state_dict()
    assert all(not torch.any(sd[n]) for n in sd if n.startswith("expert.") and ".lora_B." in n)
    assert all(".lora_" in n for n, p in m.named_parameters() if p.requires_grad and n.startswith("expert."))


def test_baked_version_is_lora_and_normalisation_only(baked):
    m, src = baked["model"], baked["src"]
    v = export_version(m)
    names = set(load_tensors(v.weights))
    assert names and all(".lora_" in n or n in NORM_NAMES for n in names)
    assert any(n.startswith("expert.") for n in names) and any(n.startswith("vlm.") for n in names)
    assert NORM_NAMES <= names
    assert v.base_sha256 == baked["out"]["base_sha256"]
    assert len(v.weights) < 0.8 * len(export_version(src).weights)  # the source ships the whole expert
    # the version alone rebuilds the model on the baked base (sized from the config + the base)
    m2 = model_from_weights(v.weights)
    assert max_action_difference(m2, m) == 0.0
    # it still trains: the expert moves only through its LoRA, and the change ships
    with torch.no_grad():
        for p in m2.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    m3 = model_from_weights(m2.export_weights(trained_only=True))
    assert max_action_difference(m3, m2) == 0.0 and max_action_difference(m3, m) > 0
    # a full export still carries every tensor (the frozen expert included) and loads
    full = m.export_weights(trained_only=False)
    assert any(n.startswith("expert.") and ".lora_" not in n for n in load_tensors(full))
    assert max_action_difference(model_from_weights(full), m) == 0.0


def _robot_cfg(version, path):
    cfg = json.loads(version.config_json)
    cfg["base"]["path"] = str(path)  # where the learner had it: not on this robot
    return json.dumps(cfg)


def test_robot_without_the_baked_base_refuses(base, baked, tmp_path, monkeypatch):
    bases = tmp_path / "bases"
    provision_base(base, bases)  # the robot holds the ORIGINAL base only
    monkeypatch.setenv("FLEETLOOP_BASE_DIRS", str(bases))
    v = export_version(baked["model"])
    cfg = _robot_cfg(v, tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=v.base_sha256):
        PolicyLoader()(cfg, v.weights, "v2")
    provision_base(baked["root"] / "baked-base", bases)  # provisioned: it loads, and shares across versions
    loader = PolicyLoader()
    r1 = loader(cfg, v.weights, "v2")
    assert r1.model.baked_expert
    m = model_from_weights(v.weights)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    v3 = export_version(m)
    r2 = loader(_robot_cfg(v3, tmp_path / "elsewhere"), v3.weights, "v3")
    assert r2.model is r1.model


def test_tampered_or_mismatched_baked_expert_is_refused(base, baked, tmp_path, monkeypatch):
    bases = tmp_path / "bases"
    prov = provision_base(baked["root"] / "baked-base", bases)
    monkeypatch.setenv("FLEETLOOP_BASE_DIRS", str(bases))
    v = export_version(baked["model"])
    cfg = _robot_cfg(v, tmp_path / "elsewhere")
    assert PolicyLoader()(cfg, v.weights, "v2").model.base_dir == prov
    # same size, different bytes: the base's digest no longer matches the version's
    f = prov / EXPERT_FILE
    data = bytearray(f.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        PolicyLoader()(cfg, v.weights, "v2")
    # a config whose expert settings differ from the baked expert: refused, not silently resized
    cfg2 = json.loads(v.config_json)
    cfg2["expert_layers"] = 3
    with pytest.raises(CheckpointError, match="expert_layers"):
        model_from_weights(v.weights, cfg2)
    # a baked expert of another shape (state_dim 7) under a config for state_dim 5: refused
    other = bake_base(_other_expert(base), tmp_path / "b7")
    cfg3 = json.loads(v.config_json)
    cfg3["base"] = {"sha256": base_digest(other), "path": str(other)}
    with pytest.raises(CheckpointError, match="state_dim"):
        model_from_weights(v.weights, cfg3)


def _other_expert(base):
    torch.manual_seed(0)
    return HFVLAPolicy.build(base, state_dim=7, action_dim=A, horizon=H, cameras=["front"], image_size=IMG, **SMALL)


def test_rebake_merges_expert_lora(baked, tmp_path):
    """A model on a baked base whose expert LoRA trained bakes again: the LoRA is merged in."""
    m = model_from_weights(export_version(baked["model"]).weights)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    again = bake_model(m, tmp_path / "rebaked")
    assert max_action_difference(m, again) < 1e-5
    assert base_digest(again.base_dir) not in (m.base_sha256,)
    with pytest.raises(ValueError, match="backbone_mode"):
        bake_model(pretrained(baked["src"].base_dir, backbone_mode="full"), tmp_path / "nope")


def test_bake_refuses_an_existing_base_out(baked):
    with pytest.raises(FileExistsError):
        bake_base(baked["src"], baked["root"] / "baked-base")


def test_smolvlm_256m_preset_has_the_real_shapes():
    """The preset's architecture (random weights) is SmolVLM-256M's: ~256M parameters, 64 image tokens."""
    from transformers import Idefics3ForConditionalGeneration

    from fleetloop.policy.hf_vla.tiny import family_tokenizer, preset_config
    cfg = preset_config("smolvlm-256m", family_tokenizer("idefics3"))
    t, v = cfg.text_config, cfg.vision_config
    assert (v.image_size // v.patch_size) ** 2 // cfg.scale_factor ** 2 == 64  # image tokens (pixel shuffle)
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads) == (576, 1536, 30, 9, 3)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.image_size, v.patch_size) == \
        (768, 3072, 12, 512, 16)
    with torch.device("meta"):
        full = Idefics3ForConditionalGeneration(cfg)
    n = sum(p.numel() for p in full.parameters())  # with the (untied) LM head: the published 256M
    assert 250e6 < n < 262e6, n
    n_policy = sum(p.numel() for p in full.model.parameters())  # what the policy keeps (no LM head)
    assert 220e6 < n_policy < 235e6, n_policy


def test_failed_bake_leaves_nothing_behind_and_the_retry_works(base, tmp_path):
    """A bake that fails (here: a tolerance no model meets) writes neither --base-out nor
    --checkpoint-out, so the same command runs again."""
    from fleetloop.policy.hf_vla.bake import bake_checkpoint
    save_checkpoint(pretrained(base), tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="acts differently"):
        bake_checkpoint(tmp_path / "ckpt", tmp_path / "new-base", tmp_path / "new-ckpt", tolerance=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no base, checkpoint or staging folder
    out = bake_checkpoint(tmp_path / "ckpt", tmp_path / "new-base", tmp_path / "new-ckpt")
    assert out["base_sha256"] == base_digest(tmp_path / "new-base") and out["max_action_diff"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "new-base", "new-ckpt"]
    # the checkpoint names the base where it ended up (no base dirs configured here: only the hint finds it)
    assert load_checkpoint(tmp_path / "new-ckpt").base_dir == (tmp_path / "new-base").resolve()
