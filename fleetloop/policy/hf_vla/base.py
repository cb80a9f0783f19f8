"""Base provisioning: a base is a local Hugging Face directory named by a content digest.

    digest = sha256( sorted lines f"{relpath}\\0{sha256(file bytes)}\\n" over the model's files )

The model's files are every regular file except hidden ones: a path with a component that starts
with "." is left out -- .cache/huggingface/ (the download metadata huggingface_hub writes beside a
snapshot, with timestamps: two machines downloading the same checkpoint would otherwise disagree),
.git/, .gitattributes, and the stamp file provision_base writes. provision_base copies only the
model's files. A checkpoint names its base by that digest; resolve_base finds a verified copy on
this machine or raises CheckpointError."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from fleetloop.policy.backend import CheckpointError

STAMP_FILE = ".fleetloop-base.json"
EXPERT_FILE = "fleetloop_expert.safetensors"  # a pretrained action expert baked into a base (bake.py)
ENV_BASE_DIRS = "FLEETLOOP_BASE_DIRS"

# (resolved path) -> (stat signature, digest): a multi-GB base is hashed once per process, and again
# only if some file's size or mtime changed.
_VERIFIED: dict[str, tuple[tuple, str]] = {}
_LOCK = threading.Lock()


def is_model_file(relpath: Path) -> bool:
    """A file of the model itself (not download metadata, version control or our stamp)."""
    return not any(part.startswith(".") for part in relpath.parts)


def model_files(root: Path) -> list[Path]:
    """The files the digest covers, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and is_model_file(p.relative_to(root)))


def _signature(root: Path, files: list[Path]) -> tuple:
    out = []
    for p in files:
        st = p.stat()
        out.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def base_digest(directory) -> str:
    """sha256 of a base directory's contents (cached per process by a stat signature of its files)."""
    root = Path(directory).resolve()
    if not root.is_dir():
        raise CheckpointError(f"base directory {root} does not exist")
    files = model_files(root)
    sig = _signature(root, files)
    with _LOCK:
        hit = _VERIFIED.get(str(root))
    if hit is not None and hit[0] == sig:
        return hit[1]
    lines = sorted(f"{p.relative_to(root).as_posix()}\0{_file_sha(p)}\n" for p in files)
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    with _LOCK:
        _VERIFIED[str(root)] = (sig, digest)
    return digest


def _not_model_files(directory: str, names: list[str]) -> set[str]:
    """copytree's ignore: hidden files and folders (is_model_file), at every level."""
    return {n for n in names if n.startswith(".")}


def provision_base(src_dir, bases_root) -> Path:
    """Copy a base into bases_root/<digest[:16]>, verify the copy, write a stamp; idempotent."""
    src = Path(src_dir)
    digest = base_digest(src)
    dest = Path(bases_root) / digest[:16]
    if dest.is_dir():
        if base_digest(dest) == digest:
            return dest
        raise CheckpointError(f"{dest} exists but does not hold base {digest}: remove it and provision again")
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=_not_model_files)
    got = base_digest(tmp)
    if got != digest:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"copy of {src} hashed to {got}, expected {digest} (source changed while copying?)")
    (tmp / STAMP_FILE).write_text(json.dumps({"sha256": digest, "source": str(src.resolve())}, indent=1))
    os.replace(tmp, dest)
    _VERIFIED.pop(str(tmp.resolve()), None)
    return dest


def base_search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(ENV_BASE_DIRS, "").split(":") if p]
    return dirs + [Path.home() / ".fleetloop" / "bases"]


def resolve_base(sha256: str, hint_path: str | os.PathLike | None = None) -> Path:
    """A local directory whose digest is `sha256`: the hint path, then <root>/<sha[:16]> or any
    stamped <root>/* (or <root> itself) for each root in $FLEETLOOP_BASE_DIRS and ~/.fleetloop/bases."""
    sha256 = str(sha256).lower()
    candidates: list[Path] = []
    if hint_path:
        candidates.append(Path(hint_path))
    for root in base_search_dirs():
        candidates += [root / sha256[:16], root]
        if root.is_dir():
            for d in sorted(root.iterdir()):
                try:
                    if json.loads((d / STAMP_FILE).read_text()).get("sha256") == sha256:
                        candidates.append(d)
                except (OSError, ValueError, AttributeError):
                    pass
    tried = []
    for c in dict.fromkeys(candidates):  # in order, once each
        if not (c / "config.json").is_file():
            continue
        got = base_digest(c)
        if got == sha256:
            return c.resolve()
        tried.append(f"{c} has digest {got[:16]}..")
    raise CheckpointError(f"base {sha256} not provisioned here: looked in the hint {hint_path!s}, "
                          f"${ENV_BASE_DIRS} and ~/.fleetloop/bases"
                          + (f" ({'; '.join(tried)})" if tried else "")
                          + "; copy it with `fleetloop vla provision SRC`")
