"""What the checkpoint's own processor says: image normalisation, the prompt layout (its chat
template with the family's image wrapper tokens) and instruction token ids.

The prefix is   [head][instruction ids, padded][indicator ids, padded][tail]
where head + "<instruction>" + tail is what the checkpoint's processor makes of a user turn with
one image per camera and the instruction (chat template when it has one, its image-token
expansion: SmolVLM's <fake_token_around_image><global-img><image>..., Qwen's
<|vision_start|><|image_pad|>...<|vision_end|>, PaliGemma's <image>...<bos>). head and tail depend
only on the base and the cameras, so they are derived on each machine and never exported; a
batch's `lang` holds only the instruction's ids (what robots featurize)."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from fleetloop.policy.backend import CheckpointError

log = logging.getLogger(__name__)
SENTINEL = "INSTRUCTIONSLOT"
TRUNCATED = {"instructions": 0}  # instructions cut to max_text_tokens in this process
_warned: set[str] = set()


@functools.lru_cache(maxsize=8)
def tokenizer(base_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(base_dir, local_files_only=True)


@functools.lru_cache(maxsize=8)
def image_processor(base_dir: str):
    """The checkpoint's image processor (from processor_config.json or preprocessor_config.json)."""
    from transformers import AutoImageProcessor
    try:
        return AutoImageProcessor.from_pretrained(base_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"base {base_dir} has no image processor that transformers can load "
                              f"({str(e).splitlines()[0][:200]}): its image normalisation is unknown") from None


@functools.lru_cache(maxsize=8)
def processor(base_dir: str):
    """The checkpoint's full processor, or None where its class cannot be built here (Qwen's needs
    torchvision for its video half: then the Qwen rule below expands the image tokens)."""
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(base_dir, local_files_only=True)
    except (ImportError, AttributeError, OSError, ValueError) as e:
        log.info("base %s: AutoProcessor unavailable here (%s); using its tokenizer + image processor",
                 base_dir, (str(e).strip().splitlines() or [type(e).__name__])[0][:120])
        return None


def image_stats(base_dir) -> tuple[list[float], list[float]]:
    """image_mean / image_std of the checkpoint's image processor; refuses to guess."""
    ip = image_processor(str(base_dir))
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if not getattr(ip, "do_normalize", True):
        return [0.0] * 3, [1.0] * 3
    try:
        mean, std = [float(x) for x in mean], [float(x) for x in std]
    except TypeError:
        raise CheckpointError(f"the image processor of base {base_dir} ({type(ip).__name__}) states no "
                              f"image_mean/image_std") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"the image processor of base {base_dir} has image_mean {mean}, image_std {std}: "
                              f"expected 3 values each, std > 0")
    return mean, std


def _render(base_dir: str, adapter, image_token: str, n_images: int, input_hw, instruction: str) -> list[int]:
    """Token ids of a user turn with n_images images and the instruction, as the checkpoint's
    processor (or, without one, its chat template + the family's expansion) makes it."""
    from PIL import Image
    msgs = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": instruction}]}]
    proc = processor(base_dir)
    if proc is not None:
        template = getattr(proc, "chat_template", None)
        text = (proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) if template
                else image_token * n_images + instruction)
        dummy = [Image.new("RGB", (input_hw[1], input_hw[0]))] * n_images
        return [int(x) for x in proc(text=[text], images=[dummy], **adapter.processor_kwargs)["input_ids"][0]]
    tok = tokenizer(base_dir)
    if not getattr(tok, "chat_template", None):
        raise CheckpointError(f"base {base_dir}: no processor and no chat template to lay out the prompt")
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return [int(x) for x in tok(adapter.expand_image_tokens(text, image_token, input_hw, image_processor(base_dir)),
                                add_special_tokens=False)["input_ids"]]


def layout(base_dir, adapter, image_token_id: int, n_images: int, input_hw) -> tuple[list[int], list[int]]:
    """(head ids, tail ids) around the instruction slot: what the prompt with an instruction and the
    prompt with none have in common before and after it (robust to how the tokenizer merges the
    instruction with its neighbours)."""
    base_dir = str(base_dir)
    tok = tokenizer(base_dir)
    image_token = tok.convert_ids_to_tokens(int(image_token_id))
    full = _render(base_dir, adapter, image_token, n_images, input_hw, SENTINEL)
    empty = _render(base_dir, adapter, image_token, n_images, input_hw, "")
    head = 0
    while head < min(len(full), len(empty)) and full[head] == empty[head]:
        head += 1
    tail = 0
    while tail < min(len(full), len(empty)) - head and full[-1 - tail] == empty[-1 - tail]:
        tail += 1
    slot = tok.decode(full[head:len(full) - tail]).replace(" ", "")
    if SENTINEL.lower() not in slot.lower():  # (an uncased tokenizer lower-cases it)
        raise CheckpointError(f"base {base_dir}: cannot find the instruction in the processor's prompt "
                              f"(the slot decodes to {slot[:60]!r})")
    return full[:head], full[len(full) - tail:]


def featurize(tok, text: str, max_tokens: int, pad_id: int) -> np.ndarray:
    """The instruction's token ids (no special tokens: the template supplies them), padded to
    max_tokens. A longer instruction is cut, counted in TRUNCATED and warned about once per text.
    Text that spells a special token ("<image>", a turn marker) is tokenized as text: a robot's
    instruction must not add image slots or turns to the prompt."""
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(ids) > max_tokens:
        TRUNCATED["instructions"] += 1
        if text not in _warned and len(_warned) < 1000:
            _warned.add(text)
            log.warning("instruction of %d tokens cut to max_text_tokens=%d (raise it with --set max_text_tokens=N): "
                        "%.80r", len(ids), max_tokens, text)
        ids = ids[:max_tokens]
    out = np.full(max_tokens, pad_id, dtype=np.int64)
    out[:len(ids)] = ids
    return out


def pad_id(tok) -> int:
    # A tokenizer without a pad token pads with EOS (padding is masked by position, never by id alone).
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def describe_resize(frame_hw, input_hw, base_dir: Path) -> None:
    key = (tuple(frame_hw), tuple(input_hw), str(base_dir))
    if frame_hw != input_hw and key not in _warned_resize:
        _warned_resize.add(key)
        log.warning("camera frames of %dx%d px are resized (bilinear, antialiased) to %dx%d px, the vision tower's "
                    "input for base %s", frame_hw[0], frame_hw[1], input_hw[0], input_hw[1], Path(base_dir).name)


_warned_resize: set = set()
