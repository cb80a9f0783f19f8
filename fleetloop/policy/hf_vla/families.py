"""Family adapters for the hf-vla backend: where a Hugging Face VLM keeps its vision tower, connector
and decoder, how it turns pixels into image tokens, and what its own forward needs besides
input_ids to build the prefix (its attention mask, its positions).

The prefix always runs through the family's **own** model forward (`vlm(input_ids=...,
mm_encoder_outputs=...)`), so each family keeps its own attention pattern and positions:

    family        prefix attention                         positions
    idefics3      causal                                   1-D
    llava         causal                                   1-D
    paligemma     bidirectional over image + prompt        1-D, 1-indexed
    gemma3        causal, bidirectional within each image  1-D
    qwen2_5_vl    causal                                   M-RoPE (t, h, w) from its get_rope_index

Adding a family without editing the package: subclass FamilyAdapter in a module of your own,
decorate it with @register_family("your_model_type"), and name the module in the hf-vla setting
`family_module` (e.g. `--set family_module=myteam.vla_families`). The module is imported wherever
the model is built -- learner and robots alike -- so it must be installed on both."""
from __future__ import annotations

import importlib
from typing import Any

import torch

FAMILIES: dict[str, "FamilyAdapter"] = {}


def register_family(*model_types: str):
    """Class decorator: the adapter serves these `model_type`s (config.json)."""
    def deco(cls):
        inst = cls()
        for t in model_types:
            FAMILIES[t] = inst
        cls.model_types = tuple(model_types)
        return cls
    return deco


class UnsupportedFamily(ValueError):
    pass


def load_family_module(name: str) -> None:
    """Import a team's adapter module (the `family_module` setting); one-line error if it cannot be."""
    if not name:
        return
    try:
        importlib.import_module(name)
    except ImportError as e:
        raise UnsupportedFamily(f"family_module {name!r} cannot be imported here ({e}): install it on every "
                                f"learner node and robot") from None


def family_for(model_type: str) -> "FamilyAdapter":
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedFamily(f"a {model_type!r} model is not a supported hf-vla family (supported: "
                                f"{', '.join(sorted(FAMILIES))}); add an adapter with the family_module "
                                f"setting (docs/bring-your-own-vla.md)") from None


def _stack(features) -> torch.Tensor:
    """get_image_features' pooler_output -> [N images, T tokens, D] (some families return per-image lists)."""
    if isinstance(features, (list, tuple)):
        return torch.stack(list(features))
    return features


class FamilyAdapter:
    """Defaults fit a family whose model has vision_tower / multi_modal_projector / language_model
    and a get_image_features(pixel_values) returning [N, T, D]; override what differs."""
    model_types: tuple[str, ...] = ()
    position_offset = 0            # PaliGemma counts positions from 1
    features_as_list = False       # the forward takes image features as a per-image tuple (LLaVA, Qwen)
    processor_kwargs: dict[str, Any] = {}  # passed to the processor when the prompt layout is built

    def vision_modules(self, vlm) -> list:
        return [vlm.vision_tower, vlm.multi_modal_projector]

    def decoder(self, vlm):
        return vlm.language_model

    def input_size(self, hf_cfg, image_processor, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The pixel size the tower takes for a frame of frame_hw (fixed-size towers ignore the frame)."""
        s = int(hf_cfg.vision_config.image_size)
        return s, s

    def embed_images(self, vlm, pixel: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, h, w] -> image tokens [N, T, D] as the family's forward merges them."""
        return _stack(vlm.get_image_features(pixel_values=pixel, return_dict=True).pooler_output)

    def forward_kwargs(self, vlm, ids: torch.Tensor, image_mask: torch.Tensor, n_images: int,
                       input_hw: tuple[int, int]) -> dict:
        """What the family's forward needs besides input_ids/attention_mask/image features."""
        return {}

    def position_ids(self, mask: torch.Tensor) -> torch.Tensor | None:
        """1-D positions that skip padding (padding sits inside the prompt); None: the family computes them."""
        return (mask.long().cumsum(1) - 1).clamp_min(0) + self.position_offset

    def encoder_output(self, features: torch.Tensor):
        """Image tokens [N, T, D] in the form the family's forward takes as mm_encoder_outputs["image"]."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(pooler_output=tuple(features.unbind(0)) if self.features_as_list
                                          else features)

    def expand_image_tokens(self, text: str, image_token: str, input_hw, image_processor) -> str:
        """Only where the checkpoint's processor class cannot be built here: its image-token expansion."""
        raise UnsupportedFamily(f"{type(self).__name__} needs the checkpoint's processor (AutoProcessor) to lay out "
                                f"the prompt")

    def vision_patches(self, hf_cfg, input_hw: tuple[int, int]) -> int:
        """Vision transformer tokens per frame (for the FLOP count)."""
        p = int(hf_cfg.vision_config.patch_size)
        return (input_hw[0] // p) * (input_hw[1] // p)


@register_family("idefics3", "smolvlm")
class Idefics3Adapter(FamilyAdapter):
    """Idefics3 / SmolVLM: SigLIP-like vision_model -> connector (pixel shuffle + linear) -> Llama text_model.
    One global image per camera: the processor's image splitting is off (a 64 px camera frame has
    nothing to split)."""
    processor_kwargs = {"do_image_splitting": False}

    def vision_modules(self, vlm):
        return [vlm.vision_model, vlm.connector]

    def decoder(self, vlm):
        return vlm.text_model

    def embed_images(self, vlm, pixel):
        # Not get_image_features: it silently drops all-zero (black) frames.
        return vlm.connector(vlm.vision_model(pixel_values=pixel).last_hidden_state)


@register_family("paligemma")
class PaliGemmaAdapter(FamilyAdapter):
    """PaliGemma: SigLIP vision_tower -> projector -> Gemma. token_type_ids 0 everywhere: the whole
    prefix (image + prompt) attends bidirectionally, as PaliGemma's (and pi0's) prefix does."""
    position_offset = 1

    def forward_kwargs(self, vlm, ids, image_mask, n_images, input_hw):
        return {"token_type_ids": torch.zeros_like(ids)}


@register_family("llava")
class LlavaAdapter(FamilyAdapter):
    """LLaVA (1.5 layout): CLIP vision_tower (a chosen hidden layer, CLS dropped) -> MLP projector -> Llama."""
    features_as_list = True

    def embed_images(self, vlm, pixel):
        cfg = vlm.config
        return _stack(vlm.get_image_features(pixel_values=pixel, vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                             return_dict=True).pooler_output)


@register_family("gemma3")
class Gemma3Adapter(FamilyAdapter):
    """Gemma 3: SigLIP -> average pool to mm_tokens_per_image -> projector -> Gemma 3. token_type_ids
    1 on image tokens: each image attends bidirectionally within itself, text causally."""

    def forward_kwargs(self, vlm, ids, image_mask, n_images, input_hw):
        return {"token_type_ids": image_mask.long()}


@register_family("qwen2_5_vl", "qwen2_vl")
class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL / Qwen2.5-VL: dynamic resolution. A frame is resized to the nearest multiple of
    patch_size * merge_size inside the processor's pixel bounds (smart_resize), cut into patches
    in the processor's order (the frame repeated temporal_patch_size times), and described by its
    grid_thw; the decoder's M-RoPE positions come from the model's own get_rope_index."""
    features_as_list = True

    def vision_modules(self, vlm):
        return [vlm.visual]

    def input_size(self, hf_cfg, image_processor, frame_hw):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        ip = image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        size = getattr(ip, "size", None) or {}
        lo = size.get("shortest_edge") or getattr(ip, "min_pixels", None)
        hi = size.get("longest_edge") or getattr(ip, "max_pixels", None)
        if not lo or not hi:
            raise UnsupportedFamily("the Qwen image processor names no min/max pixels")
        h, w = smart_resize(frame_hw[0], frame_hw[1], factor=factor, min_pixels=lo, max_pixels=hi)
        return int(h), int(w)

    @staticmethod
    def _grid(vlm, input_hw):
        p = int(vlm.config.vision_config.patch_size)
        return [1, input_hw[0] // p, input_hw[1] // p]

    def embed_images(self, vlm, pixel):
        v = vlm.config.vision_config
        n, c, h, w = pixel.shape
        p, m, tp = int(v.patch_size), int(v.spatial_merge_size), int(v.temporal_patch_size)
        gh, gw = h // p, w // p
        # the processor's patch order: (t, h/m, w/m, m, m) patches of (c, tp, p, p) values
        x = pixel.unsqueeze(1).expand(n, tp, c, h, w)
        x = x.reshape(n, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = x.reshape(n * gh * gw, c * tp * p * p)
        grid = torch.tensor([self._grid(vlm, (h, w))] * n, device=pixel.device)
        return _stack(vlm.get_image_features(pixel_values=flat, image_grid_thw=grid, return_dict=True).pooler_output)

    def forward_kwargs(self, vlm, ids, image_mask, n_images, input_hw):
        grid = torch.tensor([self._grid(vlm, input_hw)] * n_images, device=ids.device)
        return {"mm_token_type_ids": image_mask.int(), "image_grid_thw": grid}

    def expand_image_tokens(self, text, image_token, input_hw, image_processor):
        # Qwen2_5_VLProcessor.__call__ (its class needs torchvision for videos): each <|image_pad|>
        # becomes grid_h * grid_w / merge_size**2 of them
        ip = image_processor
        n = (input_hw[0] // int(ip.patch_size)) * (input_hw[1] // int(ip.patch_size)) // int(ip.merge_size) ** 2
        return text.replace(image_token, image_token * n)

    def position_ids(self, mask):
        return None  # M-RoPE: the model's get_rope_index, from input_ids, grid_thw and the mask


__all__ = ["FAMILIES", "FamilyAdapter", "UnsupportedFamily", "family_for", "load_family_module", "register_family"]
