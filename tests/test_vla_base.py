"""A base's digest covers the model's own files only: the same checkpoint downloaded on two
machines gets the same digest, whatever download metadata huggingface_hub left beside it."""
from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fleetloop.policy.hf_vla.base import base_digest, provision_base  # noqa: E402
from fleetloop.policy.hf_vla.tiny import make_tiny_base  # noqa: E402

pytest.importorskip("transformers")


def test_digest_ignores_download_metadata(tmp_path):
    plain = make_tiny_base("idefics3", tmp_path / "plain")
    downloaded = tmp_path / "downloaded"
    shutil.copytree(plain, downloaded)
    # What huggingface_hub's snapshot_download(local_dir=...) writes beside the files (timestamps,
    # etags: different on every machine), plus a git checkout's metadata.
    meta = downloaded / ".cache" / "huggingface"
    (meta / "download").mkdir(parents=True)
    (meta / ".gitignore").write_text("*\n")
    (meta / "download" / "config.json.metadata").write_text("a1b2c3\n1733468400.123\n")
    (downloaded / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert base_digest(downloaded) == base_digest(plain)
    (meta / "download" / "config.json.metadata").write_text("a1b2c3\n1733470000.456\n")  # another download
    assert base_digest(downloaded) == base_digest(plain)
    # The model's own files still count.
    (downloaded / "config.json").write_text((downloaded / "config.json").read_text() + " ")
    assert base_digest(downloaded) != base_digest(plain)


def test_provision_copies_only_the_model_files(tmp_path):
    src = make_tiny_base("idefics3", tmp_path / "src")
    (src / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (src / ".cache" / "huggingface" / "download" / "x.metadata").write_text("1733468400.1\n")
    dest = provision_base(src, tmp_path / "bases")
    assert base_digest(dest) == base_digest(src)
    assert not (dest / ".cache").exists()
