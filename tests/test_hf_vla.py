"""The hf-vla backend on tiny random Idefics3 and PaliGemma bases, through the real
from_pretrained(local_files_only=True) path."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fleetloop.policy.backend import (CheckpointError, backend_class, instruction_featurizer, load_checkpoint,  # noqa: E402
                                      load_tensors, model_from_weights, read_checkpoint_config, save_checkpoint,
                                      weights_metadata)
from fleetloop.policy.hf_vla import HFVLAPolicy, base_digest, provision_base, resolve_base  # noqa: E402
from fleetloop.policy.hf_vla.tiny import make_tiny_base  # noqa: E402

FAMILIES = ["idefics3", "paligemma", "llava", "gemma3", "qwen2_5_vl"]
S, A, H, B, IMG = 5, 3, 4, 6, 24
SMALL = dict(expert_width=32, expert_heads=4, expert_layers=2, max_text_tokens=12, num_steps=5)


pytestmark = pytest.mark.usefixtures("isolated_bases")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {f: make_tiny_base(f, tmp_path_factory.mktemp(f"base-{f}")) for f in FAMILIES}


def build(base, **kw):
    torch.manual_seed(0)
    return HFVLAPolicy.build(base, state_dim=S, action_dim=A, horizon=H, cameras=["front", "wrist"],
                             image_size=IMG, **{**SMALL, **kw})


def make_batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["pick up the red block", "open the drawer", "push the button", "", "a", "close it"]
    return dict(state=torch.randn(B, S, generator=g),
                lang=torch.tensor(np.stack([model.featurize_instruction(t) for t in texts])),
                indicator=torch.tensor([0, 1, 2, 2, 1, 0]),
                images=torch.randint(0, 256, (B, 6, IMG, IMG), generator=g, dtype=torch.uint8),
                actions=(0.5 * torch.randn(B, H, A, generator=g)).clamp(-1, 1),
                action_mask=torch.tensor([[1, 1, 1, 1]] * 4 + [[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32),
                weight=torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 1.0]))


def eval_loss(model, batch):
    was = model.training
    model.eval()
    torch.manual_seed(1234)  # same eps and tau for every evaluation
    with torch.no_grad():
        out = float(np.mean([model.loss(batch)[0].item() for _ in range(4)]))
    model.train(was)
    return out


def sample(model, batch, beta=1.0, seed=7):
    return model.sample_actions(batch, beta=beta, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(bases):
    """Per family: a model trained 30 AdamW steps on one fixed batch, with before/after records."""
    out = {}
    for fam in FAMILIES:
        m = build(bases[fam])
        batch = make_batch(m)
        base_before = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith("vlm.") and ".lora_" not in n}
        lora_b_before = {n: p.detach().clone() for n, p in m.named_parameters() if ".lora_B." in n}
        before = eval_loss(m, batch)
        opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3)
        m.train()
        for _ in range(30):
            loss, metrics = m.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        out[fam] = dict(model=m, batch=batch, before=before, after=eval_loss(m, batch), metrics=metrics,
                        base_before=base_before, lora_b_before=lora_b_before)
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_registered_and_config(bases, fam):
    assert backend_class("hf-vla") is HFVLAPolicy
    m = build(bases[fam])
    cfg = m.config_dict()
    assert cfg["backend"] == "hf-vla" and cfg["base"]["family"] == fam
    assert cfg["base"]["sha256"] == base_digest(bases[fam]) and cfg["base"]["path"] == str(bases[fam].resolve())
    for k in ("state_dim", "action_dim", "horizon", "cameras", "image_size", "lora_rank", "lora_alpha", "lora_targets",
              "backbone_mode", "expert_mode", "indicator_dropout", "action_clip", "dtype", "expert_width"):
        assert k in cfg
    assert m.spec.cameras == ("front", "wrist") and m.spec.horizon == H
    assert m.prefers_trained_only
    with pytest.raises(ValueError, match="camera"):
        HFVLAPolicy.build(bases[fam], state_dim=S, action_dim=A, horizon=H, cameras=[], image_size=IMG)


@pytest.mark.parametrize("fam", FAMILIES)
def test_loss_decreases_and_lora_trains(trained, fam):
    t = trained[fam]
    m = t["model"]
    print(f"{fam}: loss {t['before']:.3f} -> {t['after']:.3f}; params {m.num_parameters()}, "
          f"trainable {m.num_parameters(trainable=True)}")
    assert t["after"] < 0.9 * t["before"]  # 30 steps: 0.72-0.87 of the start across the five families
    assert set(t["metrics"]) >= {"loss", "mse", "uncond_frac"}
    params = dict(m.named_parameters())
    # the backbone's own weights never move; LoRA's B (initialised to 0) does
    assert t["base_before"] and all(torch.equal(params[n], v) for n, v in t["base_before"].items())
    assert t["lora_b_before"] and all(not torch.any(v) for v in t["lora_b_before"].values())
    assert all(torch.any(params[n] != 0) for n in t["lora_b_before"])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("expert.") for n in trainable)
    assert not any("vision" in n for n in trainable)


def test_loss_weights_and_mask(bases):
    m = build(bases["paligemma"]).eval()
    batch = make_batch(m)
    # per-sample losses from the gradient of w: dL/dw_i = (l_i - L) / sum w
    w = batch["weight"].clone().requires_grad_(True)
    torch.manual_seed(3)
    loss, _ = m.loss({**batch, "weight": w})
    (g,) = torch.autograd.grad(loss, w)
    per_sample = g * w.sum() + loss
    assert torch.all(per_sample > 0)
    # masked steps do not count: changing a masked-out action leaves the loss unchanged
    actions = batch["actions"].clone()
    actions[5, 1:] = 0.9
    torch.manual_seed(3)
    loss2, _ = m.loss({**batch, "actions": actions})
    assert torch.allclose(loss, loss2)


@pytest.mark.parametrize("fam", FAMILIES)
def test_sample_actions_shape_clip_and_cfg(trained, fam):
    m, batch = trained[fam]["model"], trained[fam]["batch"]
    a1 = sample(m, batch, beta=1.0)
    assert a1.shape == (B, H, A) and a1.dtype == torch.float32
    assert torch.equal(a1, sample(m, batch, beta=1.0))  # same seed, same chunk
    a2 = sample(m, batch, beta=2.0)
    set_rows = batch["indicator"] != 0
    assert not torch.allclose(a1[set_rows], a2[set_rows])
    assert torch.allclose(a1[~set_rows], a2[~set_rows], atol=1e-6)
    unset = {**batch, "indicator": torch.zeros(B, dtype=torch.long)}
    assert torch.equal(sample(m, unset, beta=2.0), sample(m, unset, beta=1.0))
    # clipping to [-action_clip, action_clip], in raw (denormalised) units
    old = (m.action_mean.clone(), m.action_std.clone())
    try:
        m.set_normalization(m.state_mean, m.state_std, action_mean=[10.0, -10.0, 0.0], action_std=[1.0, 1.0, 1.0])
        a = sample(m, batch)
        assert a.abs().max() <= 1.0 and (a[..., 0] == 1.0).all() and (a[..., 1] == -1.0).all()
        m.settings["action_clip"] = 0
        assert sample(m, batch)[..., 0].min() > 1.0
    finally:
        m.settings["action_clip"] = 1.0
        m.set_normalization(m.state_mean, m.state_std, *old)


@pytest.mark.parametrize("fam", FAMILIES)
def test_backbone_runs_once_per_chunk(trained, fam):
    m, batch = trained[fam]["model"], trained[fam]["batch"]
    calls = {"decoder": [], "vision": 0, "expert": 0}
    hooks = [m.decoder.register_forward_hook(lambda mod, args, kw, out: calls["decoder"].append(kw["inputs_embeds"].shape[0]),
                                             with_kwargs=True),
             m.adapter.vision_modules(m.vlm)[0].register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
             m.expert.register_forward_hook(lambda *a: calls.__setitem__("expert", calls["expert"] + 1))]
    try:
        sample(m, batch, beta=1.0)
        assert calls == {"decoder": [B], "vision": 1, "expert": m.settings["num_steps"]}
        calls.update(decoder=[], vision=0, expert=0)
        sample(m, batch, beta=2.0)  # both CFG branches: one 2B decoder batch, vision once
        assert calls == {"decoder": [2 * B], "vision": 1, "expert": m.settings["num_steps"]}
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("fam", FAMILIES)
def test_export_roundtrip_reproduces_actions(trained, fam):
    m, batch = trained[fam]["model"], trained[fam]["batch"]
    m.set_normalization(np.arange(S) * 0.1, np.ones(S) * 2.0, [0.1, 0.0, -0.1], [0.5, 0.6, 0.7])
    small, full = m.export_weights(trained_only=True), m.export_weights(trained_only=False)
    assert small == m.export_weights(trained_only=True)  # deterministic bytes
    ratio = len(small) / len(full)
    print(f"{fam}: trained-only {len(small)} B / full {len(full)} B = {ratio:.3f}")
    assert ratio < 0.5
    meta = weights_metadata(small)
    assert meta == json.loads(m.config_json()) and "trained_only" not in meta
    names = set(load_tensors(small))
    assert {"state_mean", "state_std", "action_mean", "action_std"} <= names
    assert not any(n.startswith("vlm.") and ".lora_" not in n for n in names)
    want = sample(m, batch, beta=2.0)
    for blob in (small, full):
        m2 = model_from_weights(blob)
        assert isinstance(m2, HFVLAPolicy) and not m2.training
        assert torch.equal(sample(m2, batch, beta=2.0), want)
        assert torch.equal(m2.action_std, m.action_std) and torch.equal(m2.state_mean, m.state_mean)
    assert m2.export_weights(True) == small


def test_forged_and_tampered_weights(tmp_path, bases, trained, monkeypatch):
    m = trained["paligemma"]["model"]
    blob = m.export_weights(trained_only=True)
    cfg = weights_metadata(blob)
    tensors = load_tensors(blob)
    from safetensors.torch import save
    # a tensor of the wrong shape, a missing one, an unexpected one
    bad = dict(tensors)
    bad["expert.action_out.weight"] = torch.zeros(A + 1, m.settings["expert_width"])
    with pytest.raises(CheckpointError, match="shape"):
        model_from_weights(save(bad, metadata={"fleetloop_config": json.dumps(cfg)}))
    bad = {k: v for k, v in tensors.items() if k != "expert.action_out.bias"}
    with pytest.raises(CheckpointError, match="missing"):
        model_from_weights(save(bad, metadata={"fleetloop_config": json.dumps(cfg)}))
    bad = {**tensors, "vlm.evil": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="unexpected"):
        model_from_weights(save(bad, metadata={"fleetloop_config": json.dumps(cfg)}))
    # a forged config cannot resize the structure: width comes from the verified base
    with pytest.raises(CheckpointError):
        model_from_weights(blob, {**cfg, "expert_width": 64})
    # a base that is not here
    with pytest.raises(CheckpointError, match="not provisioned here"):
        model_from_weights(blob, {**cfg, "base": {**cfg["base"], "sha256": "ab" * 32}})
    # corrupt bytes
    with pytest.raises(CheckpointError):
        model_from_weights(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        model_from_weights(blob, sha256="00" * 32)


def test_provision_resolve_and_changed_base(tmp_path, bases, monkeypatch):
    src = bases["idefics3"]
    digest = base_digest(src)
    root = tmp_path / "bases"
    path = provision_base(src, root)
    assert path == root / digest[:16] and base_digest(path) == digest and (path / ".fleetloop-base.json").is_file()
    assert provision_base(src, root) == path  # idempotent
    # the hint is gone: found through $FLEETLOOP_BASE_DIRS
    monkeypatch.setenv("FLEETLOOP_BASE_DIRS", f"{tmp_path / 'nowhere'}:{root}")
    assert resolve_base(digest, tmp_path / "missing") == path.resolve()
    m = build(path)
    blob = m.export_weights(trained_only=True)
    assert model_from_weights(blob) is not None
    # change one file of the provisioned base: the digest no longer matches anywhere
    monkeypatch.setenv("FLEETLOOP_BASE_DIRS", str(root))
    cfg_file = path / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace("{", "{\n", 1))
    with pytest.raises(CheckpointError, match="not provisioned here"):
        resolve_base(digest, path)
    cfg = weights_metadata(blob)
    with pytest.raises(CheckpointError, match="not provisioned here"):
        model_from_weights(blob, {**cfg, "base": {**cfg["base"], "path": str(path)}})
    # ~/.fleetloop/bases is searched too
    monkeypatch.setenv("FLEETLOOP_BASE_DIRS", "")
    home_path = provision_base(src, tmp_path / "home2" / ".fleetloop" / "bases")
    monkeypatch.setenv("HOME", str(tmp_path / "home2"))
    assert resolve_base(digest) == home_path.resolve()


def test_featurizer(bases, trained):
    m = trained["idefics3"]["model"]
    cfg = m.config_dict()
    feat = instruction_featurizer(cfg)
    n = cfg["max_text_tokens"]
    short = feat("pick up the block")
    assert short.shape == (n,) and short.dtype == np.int64
    assert (short == m.pad_id).sum() > 0 and short[0] != m.pad_id
    long = feat(" ".join(["word"] * 200))
    assert long.shape == (n,) and (long != m.pad_id).all()
    np.testing.assert_array_equal(short, m.featurize_instruction("pick up the block"))
    assert not np.array_equal(feat("open the drawer"), short)


def test_checkpoint_dir_roundtrip(tmp_path, trained):
    m, batch = trained["idefics3"]["model"], trained["idefics3"]["batch"]
    d = save_checkpoint(m, tmp_path / "ckpt", extra={"step": 30})
    doc = read_checkpoint_config(d)
    assert doc["backend"] == "hf-vla" and doc["trained_only"] is True and doc["extra"] == {"step": 30}
    m2 = load_checkpoint(d)
    assert torch.equal(sample(m2, batch, beta=1.5), sample(m, batch, beta=1.5))


def test_modes_dtype_and_checkpointing(bases):
    base = bases["paligemma"]
    frozen = build(base, backbone_mode="frozen")
    assert all(n.startswith("expert.") for n, p in frozen.named_parameters() if p.requires_grad)
    full = build(base, backbone_mode="full")
    tr = {n for n, p in full.named_parameters() if p.requires_grad}
    assert any(n.startswith("vlm.language_model.") for n in tr) and not any("vision_tower" in n for n in tr)
    assert not any(".lora_" in n for n, _ in full.named_parameters())
    vis = build(base, freeze_vision=False)
    assert any("vision_tower" in n for n, p in vis.named_parameters() if p.requires_grad)
    # expert LoRA: the expert's own weights are frozen but still exported (they are not in the base)
    el = build(base, expert_mode="lora")
    tr = {n for n, p in el.named_parameters() if p.requires_grad}
    assert any(n.startswith("expert.") and ".lora_" in n for n in tr)
    assert "expert.layers.0.up_proj.base_layer.weight" not in tr
    batch = make_batch(el)
    m2 = model_from_weights(el.export_weights(True))
    assert torch.equal(sample(m2, batch), sample(el, batch))
    # bfloat16 frozen backbone + gradient checkpointing: trainable weights stay float32 and get grads
    bf = build(base, dtype="bfloat16", gradient_checkpointing=True).train()
    assert bf.vlm.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf.trainable_parameters())
    loss, _ = bf.loss(batch)
    loss.backward()
    assert all(p.grad is not None for n, p in bf.named_parameters() if ".lora_A." in n)
    bf.eval()
    assert bf.sample_actions(batch).shape == (B, H, A)
    assert frozen.flops_per_sample() < build(base).flops_per_sample() < full.flops_per_sample()


def test_cli(tmp_path, capsys):
    from fleetloop.policy.hf_vla import cli
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["make-tiny", "--family", "paligemma", "--out", str(tmp_path / "b")])) == 0
    made = json.loads(capsys.readouterr().out)
    assert cli.run(parser.parse_args(["digest", str(tmp_path / "b")])) == 0
    assert capsys.readouterr().out.strip() == made["sha256"]
    assert cli.run(parser.parse_args(["provision", str(tmp_path / "b"), "--bases", str(tmp_path / "bases")])) == 0
    prov = json.loads(capsys.readouterr().out)
    assert prov["sha256"] == made["sha256"] and prov["path"].endswith(made["sha256"][:16])


def test_presets_are_checked(tmp_path):
    from fleetloop.policy.hf_vla.tiny import PRESETS
    assert {"smolvlm-256m", "smolvlm-500m", "paligemma-3b"} <= set(PRESETS)
    with pytest.raises(ValueError, match="idefics3"):
        make_tiny_base("paligemma", tmp_path / "x", preset="smolvlm-256m")
    with pytest.raises(ValueError, match="unknown preset"):
        make_tiny_base("idefics3", tmp_path / "y", preset="smolvlm-9b")
    assert not (tmp_path / "x").exists()


def test_plain_base_holds_no_expert(bases):
    m = build(bases["idefics3"], expert_mode="lora")
    assert not m.baked_expert and "expert" not in m.config_dict()["base"]
    assert any(n.startswith("expert.") and ".lora_" not in n for n in m._export_names(True))
