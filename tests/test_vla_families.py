"""hf-vla families: each family's own prefix attention, the checkpoint's processor (normalisation,
prompt with image wrapper tokens), Qwen's dynamic-resolution patches, instruction truncation, the
family plug-in hook and unsupported families. Tiny random bases of the real classes (save_pretrained)."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fleetloop.policy.backend import CheckpointError, model_from_weights  # noqa: E402
from fleetloop.policy.hf_vla import HFVLAPolicy, prompt  # noqa: E402
from fleetloop.policy.hf_vla.families import FAMILIES as ADAPTERS  # noqa: E402
from fleetloop.policy.hf_vla.tiny import FAMILIES, make_tiny_base  # noqa: E402

SMALL = dict(expert_width=32, expert_heads=4, expert_layers=2, max_text_tokens=8, num_steps=3)
# Whether image-token states depend on a later prompt token in the family's own forward.
BIDIRECTIONAL_PREFIX = {"paligemma": True, "idefics3": False, "llava": False, "gemma3": False, "qwen2_5_vl": False,
                        "qwen2_vl": False}


pytestmark = pytest.mark.usefixtures("isolated_bases")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {f: make_tiny_base(f, tmp_path_factory.mktemp(f"base-{f}")) for f in FAMILIES}


def build(base, cameras=("front",), image_size=32, **kw):
    torch.manual_seed(0)
    return HFVLAPolicy.build(base, state_dim=3, action_dim=2, horizon=2, cameras=list(cameras), image_size=image_size,
                             **{**SMALL, **kw}).eval()


FRAME = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)


def family_forward_image_states(m, instruction: str) -> torch.Tensor:
    """Last-layer states at the image tokens through the family's own forward, inputs made by the
    checkpoint's processor (Qwen: its image processor + chat template, as Qwen2_5_VLProcessor does)."""
    from PIL import Image
    base = str(m.base_dir)
    img = Image.fromarray(FRAME)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    proc = prompt.processor(base)
    if proc is not None:
        text = (proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) if proc.chat_template
                else "<image>" + instruction)
        enc = dict(proc(text=[text], images=[[img]], return_tensors="pt", **m.adapter.processor_kwargs))
        enc.pop("labels", None)
        if m.family not in ("paligemma", "gemma3"):
            enc.pop("token_type_ids", None)  # the BERT tokenizer's, not the family's
    else:
        tok, ip = prompt.tokenizer(base), prompt.image_processor(base)
        text = m.adapter.expand_image_tokens(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                                             "<|image_pad|>", m.input_hw, ip)
        enc = dict(tok([text], add_special_tokens=False, return_tensors="pt"))
        enc.pop("token_type_ids", None)
        enc.update({k: v for k, v in ip(images=[img], return_tensors="pt").items()})
        enc["mm_token_type_ids"] = (enc["input_ids"] == m.image_token_id).int()
    with torch.no_grad():
        out = m.vlm(**enc, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][enc["input_ids"] == m.image_token_id]


def our_image_states(m, instruction: str) -> torch.Tensor:
    images = torch.from_numpy(FRAME).permute(2, 0, 1)[None]
    lang = torch.from_numpy(m.featurize_instruction(instruction))[None]
    with torch.no_grad():
        hs, _ = m.prefix(m.embed_images(images), lang, torch.zeros(1, dtype=torch.long))
    ids, _ = m.prefix_ids(lang, torch.zeros(1, dtype=torch.long))
    return hs[-1][ids == m.image_token_id]


@pytest.mark.parametrize("fam", FAMILIES)
def test_prefix_attention_is_the_familys_own(bases, fam):
    """Changing the last prompt token changes the image tokens' states exactly where the family's
    own forward (inputs from its processor) says it does: PaliGemma's prefix is bidirectional."""
    m = build(bases[fam])
    a, b = "open the door", "open the window"
    ref_changed = not torch.allclose(family_forward_image_states(m, a), family_forward_image_states(m, b), atol=1e-6)
    ours_changed = not torch.allclose(our_image_states(m, a), our_image_states(m, b), atol=1e-6)
    assert ref_changed == BIDIRECTIONAL_PREFIX[fam]
    assert ours_changed == ref_changed


@pytest.mark.parametrize("fam", FAMILIES)
def test_prompt_is_the_processors(bases, fam):
    """The prefix is the processor's prompt: the family's image wrapper tokens around its image tokens."""
    m = build(bases[fam], cameras=("front", "wrist"))
    tok = prompt.tokenizer(str(m.base_dir))
    head = tok.convert_ids_to_tokens(m.head_ids.tolist())
    qwen = ["<|vision_start|>", "<|vision_end|>"]
    wrappers = {"idefics3": ["<fake_token_around_image>", "<global-img>"], "gemma3": ["<start_of_image>", "<end_of_image>"],
                "qwen2_5_vl": qwen, "qwen2_vl": qwen, "paligemma": [], "llava": []}[fam]
    for w in wrappers:
        assert head.count(w) >= 2, (w, head)  # once per camera
    n_img = int((m.head_ids == m.image_token_id).sum())
    images = torch.zeros(1, 6, 32, 32, dtype=torch.uint8)
    assert m.embed_images(images).shape[:2].numel() == n_img


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_image_statistics_come_from_the_processor(bases, fam, tmp_path):
    """CLIP-normalised families get CLIP's mean/std from the processor (transformers 5 writes them to
    processor_config.json / preprocessor_config.json); a base with no image processor is refused."""
    m = build(bases[fam])
    clip_mean = [0.48145466, 0.4578275, 0.40821073]
    assert np.allclose(m.pixel_mean.flatten().tolist(), clip_mean, atol=1e-6)
    # our pixels equal the processor's for a frame at the tower's size
    from PIL import Image
    ip = prompt.image_processor(str(m.base_dir))
    x = (torch.from_numpy(FRAME).permute(2, 0, 1)[None].float() / 255 - m.pixel_mean) / m.pixel_std
    want = ip(images=[Image.fromarray(FRAME)], return_tensors="pt")["pixel_values"]
    if fam == "qwen2_5_vl":  # the same patches in the same order
        torch.manual_seed(0)
        ours = m.adapter.embed_images(m.vlm, x)
        grid = torch.tensor([[1, 4, 4]])
        theirs = m.vlm.get_image_features(pixel_values=want, image_grid_thw=grid).pooler_output[0]
        assert torch.allclose(ours[0], theirs, atol=1e-5)
    else:
        assert torch.allclose(x, want, atol=1e-5)
    bare = tmp_path / "bare"
    shutil.copytree(bases[fam], bare)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (bare / name).unlink(missing_ok=True)
    prompt.image_processor.cache_clear()
    prompt.processor.cache_clear()
    with pytest.raises(CheckpointError, match="image processor"):
        build(bare)


def test_long_instruction_is_cut_with_a_warning_and_counted(bases, caplog):
    m = build(bases["idefics3"])
    before = prompt.TRUNCATED["instructions"]
    with caplog.at_level(logging.WARNING, logger="fleetloop.policy.hf_vla.prompt"):
        ids = m.featurize_instruction("pick up the red block and put it in the blue bowl on the left please")
        m.featurize_instruction("pick up the red block and put it in the blue bowl on the left please")
    assert (ids != m.pad_id).all() and ids.shape == (SMALL["max_text_tokens"],)
    assert prompt.TRUNCATED["instructions"] == before + 2
    assert sum("max_text_tokens" in r.getMessage() for r in caplog.records) == 1  # once per instruction
    m.featurize_instruction("pick it up")
    assert prompt.TRUNCATED["instructions"] == before + 2


def test_frames_resized_for_the_tower_are_said(bases, caplog):
    with caplog.at_level(logging.WARNING, logger="fleetloop.policy.hf_vla.prompt"):
        m = build(bases["paligemma"], image_size=24)
    assert m.config_dict()["base"]["tower_input_px"] == [32, 32]
    assert any("24x24 px are resized" in r.getMessage() for r in caplog.records)
    # Qwen takes the frame at its own resolution (a multiple of patch * merge)
    assert build(bases["qwen2_5_vl"], image_size=48).input_hw == (48, 48)


def test_unsupported_family_and_the_plugin_hook(bases, tmp_path, monkeypatch):
    """A family with no adapter is refused in one line; a team's module named in family_module adds
    it, and a robot rebuilding the published version imports the same module."""
    saved = ADAPTERS.pop("llava")
    try:
        with pytest.raises(CheckpointError) as e:
            build(bases["llava"])
        assert "'llava'" in str(e.value) and "family_module" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(CheckpointError, match="cannot be imported"):
            build(bases["llava"], family_module="no_such_team_module")
        (tmp_path / "team_families.py").write_text(textwrap.dedent("""
            from fleetloop.policy.hf_vla.families import FamilyAdapter, register_family

            @register_family("llava")
            class TeamLlava(FamilyAdapter):
                features_as_list = True

                def embed_images(self, vlm, pixel):
                    c = vlm.config
                    out = vlm.get_image_features(pixel_values=pixel, vision_feature_layer=c.vision_feature_layer,
                                                 vision_feature_select_strategy=c.vision_feature_select_strategy)
                    return __import__("torch").stack(list(out.pooler_output))
        """))
        monkeypatch.syspath_prepend(str(tmp_path))
        m = build(bases["llava"], family_module="team_families")
        assert type(m.adapter).__name__ == "TeamLlava" and m.config_dict()["family_module"] == "team_families"
        blob = m.export_weights(trained_only=True)
        ADAPTERS.pop("llava")
        sys.modules.pop("team_families")
        m2 = model_from_weights(blob)  # the robot: imports family_module before building
        assert type(m2.adapter).__name__ == "TeamLlava"
    finally:
        ADAPTERS["llava"] = saved


def test_provision_refuses_what_from_pretrained_cannot_load(bases, tmp_path, capsys):
    import argparse

    from fleetloop.policy.hf_vla import cli
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    root = tmp_path / "bases"
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"x")
    assert cli.run(parser.parse_args(["provision", str(empty), "--bases", str(root)])) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and err.count("\n") == 1
    assert not root.exists()  # nothing copied
    other = tmp_path / "bert"
    shutil.copytree(bases["llava"], other)
    (other / "config.json").write_text('{"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, '
                                       '"num_attention_heads": 1, "intermediate_size": 8}')
    assert cli.run(parser.parse_args(["provision", str(other), "--bases", str(root)])) == 2
    err = capsys.readouterr().err
    assert "'bert'" in err and "not a supported hf-vla family" in err and err.count("\n") == 1
    assert not root.exists()
    assert cli.run(parser.parse_args(["provision", str(bases["gemma3"]), "--bases", str(root)])) == 0


def test_does_not_fit_arithmetic_counts_each_weight_at_its_dtype():
    """The learner's out-of-memory message: weights at their dtype + 12 B (fp32 gradient + AdamW's two
    moments) per trained parameter -- the memory table of docs/bring-your-own-vla.md."""
    from types import SimpleNamespace

    from learner.core import LearnerCore
    frozen = torch.empty(2 ** 29, dtype=torch.bfloat16, device="meta")   # 1 GiB in bf16
    trained = torch.empty(2 ** 26, dtype=torch.float32, device="meta")   # 0.25 GiB + 0.75 GiB of optimiser state
    net = SimpleNamespace(parameters=lambda: [frozen, trained],
                          num_parameters=lambda trainable=False: trained.numel() + (0 if trainable else frozen.numel()))
    msg = str(LearnerCore._does_not_fit(SimpleNamespace(net=net, device=torch.device("cpu")), 8, RuntimeError("oom")))
    assert "need ~2.0 GiB" in msg, msg


def test_versions_trained_on_the_old_prompt_are_refused(bases):
    """Adapters trained on the earlier layout (image tokens prepended, no chat template) would act on
    another prompt: such a version (no prompt_layout in its config) is refused, not run."""
    m = build(bases["idefics3"])
    blob = m.export_weights(trained_only=True)
    from fleetloop.policy.backend import weights_metadata
    cfg = weights_metadata(blob)
    assert cfg["prompt_layout"] == "processor"
    old = {k: v for k, v in cfg.items() if k not in ("prompt_layout", "family_module")}
    with pytest.raises(CheckpointError, match="predates"):
        model_from_weights(blob, old)


def test_processor_and_tower_must_agree_on_image_tokens(bases, tmp_path):
    """A processor that announces another number of image tokens than the tower makes is refused at build."""
    import json
    bad = tmp_path / "bad"
    shutil.copytree(bases["gemma3"], bad)
    cfg = json.loads((bad / "processor_config.json").read_text())
    cfg["image_seq_length"] = 9
    (bad / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="image tokens"):
        build(bad)


def test_pretrain_on_an_unusable_base_ends_in_one_line(bases, tmp_path):
    """`fleetloop pretrain --backend hf-vla --base DIR` on a folder that is no model, or a family with
    no adapter: one line naming the base, no traceback."""
    import argparse

    from fleetloop.policy.pretrain import _build
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    for base, why in ((tmp_path, "not a Hugging Face model"), (other, "not a supported hf-vla family")):
        args = argparse.Namespace(set=[], backend="hf-vla", base=str(base), horizon=2)
        with pytest.raises(SystemExit) as e:
            _build(args, 3, 2, ["front"], 32)
        assert why in str(e.value.code) and "\n" not in str(e.value.code), e.value.code


@pytest.mark.parametrize("fam", ["idefics3", "qwen2_5_vl"])
def test_special_token_text_in_an_instruction_stays_text(bases, fam):
    """An instruction that spells a control token ("<image>", a chat-turn marker) is words, not that
    token: otherwise the prompt holds more image tokens than images and the family's forward fails."""
    m = build(bases[fam])
    tok = prompt.tokenizer(str(bases[fam]))
    specials = set(tok.all_special_ids) | {m.image_token_id}
    text = " ".join(tok.convert_ids_to_tokens(sorted(specials)))
    ids = m.featurize_instruction(f"{text} reach")
    assert not (set(ids.tolist()) - {m.pad_id}) & specials
