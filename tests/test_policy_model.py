"""The VLA network, its checkpoints, the runtime wrapper and the language encoder (CPU, fast)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fleetloop.policy.data import chunk_targets
from fleetloop.policy.interface import Observation, Policy
from fleetloop.policy.language import EMBED_DIM, cosine, get_encoder
from fleetloop.policy.model import (INDICATOR_NEGATIVE, INDICATOR_POSITIVE, INDICATOR_UNSET, SIZES, CheckpointError,
                                    ModelConfig, VLAPolicyNet, drop_indicator, from_safetensors_bytes, guide,
                                    load_checkpoint, random_shift, save_checkpoint, sha256_hex,
                                    to_safetensors_bytes)
from fleetloop.release.runtime import PolicyLoader, PolicyRuntime
from fleetloop.policy.train import make_optimizer, train_step

torch.set_num_threads(1)


class FakeEncoder:
    """Deterministic 384-d vectors without loading MiniLM (the real one is tested separately)."""

    def encode(self, s: str) -> np.ndarray:
        v = np.random.default_rng(abs(hash(s)) % 2**32).standard_normal(EMBED_DIM).astype(np.float32)
        return v / np.linalg.norm(v)


def make_batch(cfg: ModelConfig, b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"state": torch.randn(b, cfg.state_dim, generator=g),
             "lang": torch.nn.functional.normalize(torch.randn(b, cfg.lang_dim, generator=g), dim=-1),
             "indicator": torch.randint(0, 3, (b,), generator=g),
             "actions": torch.rand(b, cfg.horizon, cfg.action_dim, generator=g) * 2 - 1,
             "action_mask": torch.ones(b, cfg.horizon)}
    if cfg.use_images:
        batch["images"] = torch.randint(0, 256, (b, cfg.image_channels, cfg.image_size, cfg.image_size),
                                        dtype=torch.uint8, generator=g)
    return batch


def outputs(net: VLAPolicyNet, batch) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(batch["state"], batch["lang"], batch["indicator"], batch.get("images"))


@pytest.fixture(scope="module")
def tiny_img():
    torch.manual_seed(0)
    return VLAPolicyNet(ModelConfig.preset("tiny", use_images=True))


# ---- shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("use_images", [False, True])
def test_shapes(size, use_images):
    cfg = ModelConfig.preset(size, use_images=use_images)
    net = VLAPolicyNet(cfg)
    batch = make_batch(cfg, 3)
    assert outputs(net, batch).shape == (3, cfg.horizon, cfg.action_dim)
    net.train()
    loss, metrics = net.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss", "l1", "mse", "uncond_frac"} <= set(metrics)


def test_config_json_round_trip():
    cfg = ModelConfig.preset("small", state_dim=12, cameras=["front", "wrist"])
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert cfg.image_channels == 6
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "future_field": 1})
    with pytest.raises(ValueError, match="unknown size"):
        ModelConfig.preset("huge")


def test_two_cameras_stack_on_channels():
    cfg = ModelConfig.preset("tiny", cameras=["front", "wrist"])
    net = VLAPolicyNet(cfg)
    assert outputs(net, make_batch(cfg, 2)).shape == (2, 8, 4)


# ---- loss ---------------------------------------------------------------------------------

def test_indicator_dropout_statistics():
    ind = torch.full((20_000,), INDICATOR_POSITIVE)
    dropped = drop_indicator(ind, 0.3, torch.Generator().manual_seed(0))
    frac = (dropped == INDICATOR_UNSET).float().mean().item()
    assert abs(frac - 0.3) < 0.015  # binomial sd ~0.003
    assert set(dropped.unique().tolist()) == {INDICATOR_UNSET, INDICATOR_POSITIVE}  # only ever -> unset
    assert torch.equal(drop_indicator(ind, 0.0), ind)

    # Inside the loss: applied in training mode only.
    cfg = ModelConfig.preset("tiny", use_images=False)
    net = VLAPolicyNet(cfg)
    batch = make_batch(cfg, 4000)
    batch["indicator"] = torch.full((4000,), INDICATOR_NEGATIVE)
    net.train()
    torch.manual_seed(1)
    assert abs(net.loss(batch)[1]["uncond_frac"] - 0.3) < 0.03
    net.eval()
    assert net.loss(batch)[1]["uncond_frac"] == 0.0


def test_loss_mask_and_weights():
    cfg = ModelConfig.preset("tiny", use_images=False, loss="l2")
    net = VLAPolicyNet(cfg).eval()
    batch = make_batch(cfg, 4)
    batch["action_mask"][:, 5:] = 0
    base, _ = net.loss(batch)
    junk = dict(batch, actions=batch["actions"].clone())
    junk["actions"][:, 5:] = 100.0  # past the episode end: must not count
    assert torch.allclose(net.loss(junk)[0], base)
    # Zero weight on a sample removes it entirely.
    w = dict(batch, weight=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    junk_last = dict(w, actions=w["actions"].clone())
    junk_last["actions"][3] = 50.0
    three = {k: v[:3] for k, v in batch.items()}
    assert torch.allclose(net.loss(junk_last)[0], net.loss(three)[0], atol=1e-6)


@pytest.mark.parametrize("use_images", [False, True])
def test_loss_decreases_when_overfitting(use_images):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", use_images=use_images)
    net = VLAPolicyNet(cfg)
    batch = make_batch(cfg, 16)
    opt = make_optimizer(net, lr=3e-3)
    first = train_step(net, opt, batch)["loss"]
    for _ in range(150):
        last = train_step(net, opt, batch)["loss"]
    assert last < 0.3 * first, (first, last)


def test_random_shift_is_a_replicated_translation():
    cols = torch.arange(64, dtype=torch.uint8).expand(8, 3, 64, 64).contiguous()  # pixel value = column
    out = random_shift(cols, 4, torch.Generator().manual_seed(0))
    assert out.shape == cols.shape and out.dtype == torch.uint8
    shifts = set()
    for row in out[:, 0, 0, :].long():
        k = int(row[32]) - 32
        assert abs(k) <= 4
        assert torch.equal(row, (torch.arange(64) + k).clamp(0, 63))
        shifts.add(k)
    assert len(shifts) > 1  # per-sample offsets, not one per batch


def test_chunk_targets_mask():
    acts = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunks, mask = chunk_targets(acts, 3)
    assert chunks.shape == (5, 3, 2) and mask.shape == (5, 3)
    np.testing.assert_array_equal(chunks[1], acts[1:4])
    np.testing.assert_array_equal(mask[3], [1, 1, 0])
    np.testing.assert_array_equal(mask[4], [1, 0, 0])


# ---- guidance -----------------------------------------------------------------------------

def test_guidance_formula(tiny_img):
    cond, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
    assert torch.allclose(guide(cond, uncond, 1.0), cond)
    assert torch.allclose(guide(cond, uncond, 0.0), uncond)
    assert torch.allclose(guide(cond, uncond, 2.0), torch.tensor([1.5, -4.0]))

    net = tiny_img.eval()
    with torch.no_grad():
        net.indicator_emb.weight[INDICATOR_POSITIVE] += 1.0  # make the branches differ visibly
    cfg = net.config
    b = make_batch(cfg, 3)
    ind = torch.tensor([INDICATOR_POSITIVE, INDICATOR_NEGATIVE, INDICATOR_UNSET])
    with torch.no_grad():
        c = net(b["state"], b["lang"], ind, b["images"])
        u = net(b["state"], b["lang"], torch.zeros_like(ind), b["images"])
    g = net.predict(b["state"], b["lang"], ind, b["images"], beta=2.0)
    assert torch.allclose(g, u + 2.0 * (c - u), atol=1e-5)
    assert not torch.allclose(g[0], c[0])
    assert torch.equal(net.predict(b["state"], b["lang"], ind, b["images"], beta=1.0), c)


# ---- checkpoints --------------------------------------------------------------------------

def test_save_load_bit_exact(tmp_path, tiny_img):
    net = tiny_img
    net.set_state_stats(np.linspace(-1, 1, 39), np.linspace(0.1, 2, 39))
    save_checkpoint(net, tmp_path / "ckpt", extra={"version": "v7"})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    doc = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert doc["weights_sha256"] == sha256_hex((tmp_path / "ckpt" / "model.safetensors").read_bytes())
    loaded = load_checkpoint(tmp_path / "ckpt")
    batch = make_batch(net.config, 5)
    assert torch.equal(outputs(net, batch), outputs(loaded, batch))
    assert torch.equal(loaded.state_std, net.state_std)
    policy = PolicyRuntime.from_checkpoint(tmp_path / "ckpt")
    assert policy.version == "v7"


def test_safetensors_bytes_round_trip(tiny_img):
    data = to_safetensors_bytes(tiny_img)
    assert data == to_safetensors_bytes(tiny_img)  # deterministic: same weights, same sha
    batch = make_batch(tiny_img.config, 4)
    for config in (tiny_img.config, tiny_img.config.to_json(), None):  # None: from the blob's metadata
        net = from_safetensors_bytes(config, data, sha256=sha256_hex(data))
        assert torch.equal(outputs(tiny_img, batch), outputs(net, batch))


def test_bad_checkpoints(tmp_path, tiny_img):
    data = to_safetensors_bytes(tiny_img)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        from_safetensors_bytes(tiny_img.config, data, sha256="0" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        from_safetensors_bytes(tiny_img.config, b"\x00" * 64)
    with pytest.raises(CheckpointError, match="do not fit config"):
        from_safetensors_bytes(ModelConfig.preset("small"), data)

    d = tmp_path / "ckpt"
    save_checkpoint(tiny_img, d)
    weights = d / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # flip one weight bit
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(d)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors not found"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(tmp_path / "nothing-here")


def test_wrong_state_dim_is_a_clear_error(tiny_img):
    cfg = tiny_img.config
    b = make_batch(cfg, 2)
    with pytest.raises(ValueError, match="state has 7 dims but this policy was built for state_dim=39"):
        tiny_img(torch.zeros(2, 7), b["lang"], b["indicator"], b["images"])
    policy = PolicyRuntime(tiny_img)
    obs = Observation(images={"front": np.zeros((64, 64, 3), np.uint8)}, state=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="state has 7 dims"):
        policy.act(obs, "reach")
    with pytest.raises(ValueError, match="lacks camera 'front'"):
        policy.act(Observation(state=np.zeros(39, np.float32)), "reach")
    with pytest.raises(ValueError, match="images have shape"):
        policy.act(Observation(images={"front": np.zeros((32, 32, 3), np.uint8)}, state=np.zeros(39)), "reach")


# ---- runtime ------------------------------------------------------------------------------

def test_runtime_act_and_swap(tiny_img):
    policy = PolicyRuntime(tiny_img, version="v1", beta=2.0)
    assert isinstance(policy, Policy) and (policy.horizon, policy.action_dim) == (8, 4)
    obs = Observation(images={"front": np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)},
                      state=np.random.default_rng(1).standard_normal(39).astype(np.float32))
    for indicator in (None, True, False):
        chunk = policy.act(obs, "push the puck", indicator)
        assert chunk.shape == (8, 4) and chunk.dtype == np.float32
        assert np.all(np.abs(chunk) <= 1.0)
    # PolicySlot's load_fn: each published tiny version is its own model (nothing shared).
    new = VLAPolicyNet(tiny_img.config)
    loader = PolicyLoader()
    v2 = loader(None, to_safetensors_bytes(new), "v2")
    assert v2.version == "v2" and v2.model is not tiny_img and policy.model is tiny_img
    with torch.no_grad():
        new.head.bias.fill_(0.5)
    np.testing.assert_allclose(loader(None, to_safetensors_bytes(new), "v3").act(obs, "push the puck"), 0.5, atol=0.2)
    assert policy.act(obs, "push the puck").shape == (8, 4)  # v1 untouched
    with pytest.raises(CheckpointError):
        loader(None, b"\x00" * 64, "v4")


def test_instruction_cache_is_bounded(tiny_img):
    from fleetloop.release import runtime
    policy = PolicyRuntime(tiny_img)
    obs = Observation(images={"front": np.zeros((64, 64, 3), np.uint8)}, state=np.zeros(39, np.float32))
    for i in range(runtime.INSTRUCTION_CACHE_SIZE + 20):
        policy.act(obs, f"instruction number {i}")
    assert len(policy._lang) == runtime.INSTRUCTION_CACHE_SIZE


# ---- language -----------------------------------------------------------------------------

def test_language_encoder_semantics():
    enc = get_encoder()
    texts = ["pick up the red block", "grasp the red cube", "open the drawer", "press the button on the wall"]
    e = enc.encode_many(texts)
    assert e.shape == (4, EMBED_DIM) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert cosine(e[0], e[1]) > cosine(e[0], e[2]) + 0.1
    assert cosine(e[0], e[1]) > cosine(e[0], e[3]) + 0.1
    assert enc.encode("grasp the red cube") is enc.cache["grasp the red cube"]  # cached, not recomputed
    enc.precompute(["close the window"])
    assert "close the window" in enc.cache


@pytest.mark.slow
def test_native_encoder_matches_sentence_transformers():
    """The torch-only MiniLM forward equals the package's own sentence-transformers loader."""
    pytest.importorskip("sentence_transformers")
    from fleetloop.policy.language import LanguageEncoder
    texts = ["reach to the red goal", "Open the drawer, then close it again!"]
    ref = LanguageEncoder("sentence-transformers").encode_many(texts)
    np.testing.assert_allclose(get_encoder().embed(texts), ref, atol=1e-5)


def test_evaluation_renders_only_what_the_policy_reads(tiny_img):
    """`fleetloop eval` asks the policy's ObservationSpec whether to render: a state + language
    policy gets no camera (rendering it anyway cost ~10x the evaluation's CPU), an image policy
    its own cameras and size."""
    from fleetloop.actor.sim.evaluate import policy_image_needs
    state_only = VLAPolicyNet(ModelConfig.preset("tiny", use_images=False))
    assert policy_image_needs(PolicyRuntime(state_only))[0] is False
    images, size, cameras = policy_image_needs(PolicyRuntime(tiny_img))
    assert images is True and size == tiny_img.config.image_size and cameras == list(tiny_img.config.cameras)
