"""Frames are decoded in the cloud (consumer, sampler, dashboard thumbnails, LeRobot export) through
buffer.codec.decode_image: an oversized frame is refused from its header, before anything is
allocated for its pixels."""
from __future__ import annotations

import io
import resource

import numpy as np
import pytest
from PIL import Image

from fleetloop.buffer.codec import MAX_IMAGE_PIXELS, decode_image, encode_image
from fleetloop.proto.v1 import episode_pb2 as pb


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")  # zeros: a few KB however large
    return buf.getvalue()


def test_a_9000_by_9000_png_is_refused_from_its_header():
    data = png_bytes(9000, 9000)
    assert len(data) < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="9000x9000 exceeds"):
        decode_image(pb.Image(camera="front", encoding="png", data=data))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50  # decoding it would take 81 MB at one channel, 243 MB at three


def test_a_raw_frame_with_a_forged_size_is_refused():
    img = pb.Image(camera="front", encoding="raw", width=100_000, height=100_000, channels=3, data=b"\0" * 12)
    with pytest.raises(ValueError, match="exceeds"):
        decode_image(img)


def test_frames_within_the_limit_decode_as_before():
    arr = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    for encoding in ("png", "raw"):
        assert np.array_equal(decode_image(encode_image(arr, "front", encoding)), arr)
    side = int(MAX_IMAGE_PIXELS ** 0.5)
    assert decode_image(pb.Image(encoding="png", data=png_bytes(side, side))).shape == (side, side, 1)
