"""The robot contract: what the daemon accepts from a robot, checked at the door.

Every ReportStep is checked against the running policy's ObservationSpec (when the policy
describes itself) and against the episode's first accepted step, and every input has a bound
(`LinkLimits`). A step that fails is refused with a short message naming the field and the
expected value; nothing of it is recorded and the episode stays open with its good steps. What
reaches the store is therefore trainable; the consumer's checks (buffer/codec.py read_episode)
stay as a second line. The limits and the spec are what GetSpec / Status report
(docs/robot-link.md).
"""
from __future__ import annotations

import io
import math
import re
import struct
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Optional

from fleetloop.buffer.codec import Limits as StoreLimits
from fleetloop.text import control_refusal
from fleetloop.proto.v1 import robot_link_pb2 as rl

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ENCODINGS = ("png", "raw")
_PNG_COLOR_CHANNELS = {0: 1, 2: 3, 6: 4}  # PNG color type -> channels
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class LinkLimits:
    """Bounds on robot input. Defaults fit the store's (buffer/codec.py Limits) with room to spare."""
    max_id_bytes: int = 128
    max_instruction_bytes: int = 1024
    max_text_bytes: int = 128
    max_cameras: int = 8
    max_image_pixels: int = 2048 * 2048
    max_state_dim: int = 1024
    max_action_dim: int = 256
    max_policy_chunk_values: int = 16384
    max_steps_per_episode: int = StoreLimits().max_steps
    max_episode_bytes: int = StoreLimits().max_bytes - (16 << 20)  # headroom for chunk framing
    max_message_bytes: int = 32 << 20
    # Decoded image bytes (height x width x channels, summed): a 115 KB request of PNG zeros can
    # decode to 128 MiB, so one call may decode this much and all calls together DecodeBudget's.
    max_decoded_bytes_per_call: int = 48 << 20  # e.g. 8 cameras of 1920x1080 RGB, 3 of 2048x2048 RGBA
    max_decoded_bytes_in_flight: int = 128 << 20

    def __post_init__(self):
        if self.max_decoded_bytes_in_flight < self.max_decoded_bytes_per_call:
            raise ValueError("max_decoded_bytes_in_flight must hold at least one call's max_decoded_bytes_per_call")

    def to_proto(self, episode_idle_timeout_s: float = 0.0) -> rl.LinkLimits:
        return rl.LinkLimits(episode_idle_timeout_s=episode_idle_timeout_s, **self.__dict__)


class Rejected(Exception):
    """A call the daemon refuses: `code` is a grpc.StatusCode name, the message is short."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code = code


def short(value, n: int = 32) -> str:
    """A value for an error message: never the whole input (a long id would overflow the gRPC
    metadata limit and echo robot input back)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= n:
        return repr(text) if isinstance(value, str) else text
    return repr(text[:n]) + f"... ({len(text)} chars)"


def check_text(kind: str, value: str, max_bytes: int, required: bool = False) -> str:
    if required and not value:
        raise Rejected(f"{kind} is required")
    n = len(value.encode("utf-8", "surrogatepass"))
    if n > max_bytes:
        raise Rejected(f"{kind} is {n} bytes, the limit is {max_bytes}")
    refusal = control_refusal(kind, value)  # stored text reaches exports, the dashboard and logs
    if refusal:
        raise Rejected(refusal)
    return value


def check_id(kind: str, value: str, limits: LinkLimits, required: bool = True) -> str:
    check_text(kind, value, limits.max_id_bytes, required)
    if value and (not _SAFE_ID.fullmatch(value) or value in ("all", "acks")):
        raise Rejected(f"invalid {kind} {short(value)}: use letters, digits, '.', '_' or '-', "
                       f"starting with a letter or digit")
    return value


def _finite(values) -> int:
    """Index of the first NaN/inf, or -1."""
    for i, v in enumerate(values):
        if not math.isfinite(v):
            return i
    return -1


# ---- the policy's spec ------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """The subset of ObservationSpec the door checks (None: unknown)."""
    known: bool = False
    state_dim: Optional[int] = None
    action_dim: Optional[int] = None
    horizon: Optional[int] = None
    cameras: tuple[str, ...] = ()
    image_size: int = 0
    image_encodings: tuple[str, ...] = ENCODINGS

    @classmethod
    def of(cls, policy) -> "Spec":
        if policy is None:
            return cls()
        try:
            s = getattr(policy, "spec", None)
        except Exception:  # noqa: BLE001 -- a policy whose spec cannot be computed: unknown
            s = None
        if s is not None and hasattr(s, "state_dim") and hasattr(s, "action_dim"):
            cams = tuple(getattr(s, "cameras", ()) or ())
            encs = tuple(e for e in (getattr(s, "image_encodings", ENCODINGS) or ENCODINGS) if e in ENCODINGS)
            return cls(True, int(s.state_dim), int(s.action_dim), int(getattr(s, "horizon", 0) or 0) or None,
                       cams, int(getattr(s, "image_size", 0) or 0) if cams else 0, encs or ENCODINGS)
        a, h = getattr(policy, "action_dim", None), getattr(policy, "horizon", None)
        return cls(False, None, int(a) if isinstance(a, int) and a > 0 else None,
                   int(h) if isinstance(h, int) and h > 0 else None)

    def to_proto(self, version: str = "") -> rl.PolicySpec:
        p = rl.PolicySpec(known=self.known, policy_version=version or "", state_dim=self.state_dim or 0,
                          action_dim=self.action_dim or 0, horizon=self.horizon or 0, cameras=list(self.cameras),
                          image_encodings=list(self.image_encodings))
        if self.cameras:
            p.image_height = p.image_width = self.image_size
            p.image_channels = 3
        return p


# ---- images -----------------------------------------------------------------------------------

class DecodeBudget:
    """A counting semaphore on decoded image bytes, shared by the daemon's calls: a call holds
    its images' decoded size while it decodes (and, for Act, while the policy reads them); one
    that finds no room waits, at most `wait_s` (or its deadline), then gets RESOURCE_EXHAUSTED."""

    def __init__(self, capacity: int, wait_s: float = 2.0):
        self.capacity, self.wait_s = capacity, wait_s
        self.used = 0
        self._cv = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int, timeout_s: Optional[float] = None):
        nbytes = min(nbytes, self.capacity)  # a call over the per-call limit never gets here
        wait = self.wait_s if timeout_s is None else max(0.0, min(self.wait_s, timeout_s))
        with self._cv:
            if not self._cv.wait_for(lambda: self.used + nbytes <= self.capacity, wait):
                raise Rejected(f"the daemon is decoding {self.used} bytes of other calls' images (the limit is "
                               f"{self.capacity}); retry", "RESOURCE_EXHAUSTED")
            self.used += nbytes
        try:
            yield
        finally:
            with self._cv:
                self.used -= nbytes
                self._cv.notify_all()


def check_image_header(img, where: str, limits: LinkLimits, encodings=ENCODINGS) -> tuple[int, int, int]:
    """Declared size, encoding and byte count of one Image; returns (h, w, c). The pixel limit is
    checked on the declared size and, for PNG, on the size in the PNG header: nothing is decoded
    (a decompression bomb is refused unread; decode_png decodes once the call's budget allows)."""
    h, w, c = img.height, img.width, img.channels
    if img.encoding not in encodings:
        raise Rejected(f"{where}: encoding {short(img.encoding, 16)} is not one of {', '.join(encodings)}")
    if not h or not w:
        raise Rejected(f"{where}: height and width are required")
    if c not in (1, 3, 4):
        raise Rejected(f"{where}: {c} channels; 1, 3 or 4 are accepted")
    if h * w > limits.max_image_pixels:
        raise Rejected(f"{where}: {h}x{w} is {h * w} pixels, the limit is {limits.max_image_pixels}")
    n = len(img.data)
    if img.encoding == "raw":
        if n != h * w * c:
            raise Rejected(f"{where}: raw data has {n} bytes, height x width x channels is {h * w * c}")
        return h, w, c
    if not img.data.startswith(_PNG_MAGIC):
        raise Rejected(f"{where}: data is not a PNG (no PNG signature)")
    # The header first, by hand: PIL would refuse a decompression bomb with its own exception
    # (or decode a big one) before we could say what is wrong.
    if len(img.data) < 33 or img.data[12:16] != b"IHDR":
        raise Rejected(f"{where}: the PNG has no header (IHDR)")
    pw, ph, depth, color = struct.unpack(">IIBB", img.data[16:26])
    if (ph, pw) != (h, w):
        raise Rejected(f"{where}: the PNG is {ph}x{pw}, the message declares {h}x{w}")
    mode_c = _PNG_COLOR_CHANNELS.get(color)
    if depth != 8 or mode_c is None:
        raise Rejected(f"{where}: PNG with bit depth {depth}, color type {color}; 8-bit grey, RGB or RGBA "
                       "are accepted")
    if mode_c != c:
        raise Rejected(f"{where}: the PNG has {mode_c} channels, the message declares {c}")
    return h, w, c


def decode_png(img, where: str) -> None:
    """Decodes (and drops) a PNG whose header check_image_header passed: refused if it is damaged."""
    if img.encoding != "png":
        return
    from PIL import Image as PILImage
    try:
        with PILImage.open(io.BytesIO(img.data), formats=["PNG"]) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for damaged data
        raise Rejected(f"{where}: the PNG does not decode ({type(e).__name__})") from None


# ---- steps ------------------------------------------------------------------------------------

@dataclass
class EpisodeShape:
    """Fixed by the episode's first accepted step; every later step must match it."""
    state_dim: int
    action_dim: int
    cameras: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class StepChecker:
    """One per open episode."""

    def __init__(self, spec: Spec, limits: LinkLimits, budget: Optional[DecodeBudget] = None):
        self.spec, self.limits = spec, limits
        self.budget = budget  # None: decoding is bounded per call only
        self.shape: Optional[EpisodeShape] = None
        self.steps = 0
        self.bytes = 0

    def check_observation(self, obs, where: str = "observation") -> dict[str, tuple[int, int, int]]:
        """Checks `obs` (decoding its PNGs within the budget); returns each camera's (h, w, c)."""
        with self.admit(obs, where) as sizes:
            return sizes

    @contextmanager
    def admit(self, obs, where: str = "observation", for_act: bool = False, timeout_s: Optional[float] = None):
        """Checks `obs` and holds its decoded size in the daemon's DecodeBudget until the block
        ends (Act: while the policy decodes and reads it); yields each camera's (h, w, c).
        for_act: the observation goes to the policy, so a camera the policy does not read is
        refused. Every header, the per-call decoded size and the budget are checked before any
        PNG is decoded."""
        lim, spec, shape = self.limits, self.spec, self.shape
        n = len(obs.state)
        if n > lim.max_state_dim:
            raise Rejected(f"{where}.state has {n} values, the limit is {lim.max_state_dim}")
        if spec.state_dim is not None and n != spec.state_dim:
            raise Rejected(f"{where}.state has {n} values, the policy expects {spec.state_dim}")
        if shape is not None and n != shape.state_dim:
            raise Rejected(f"{where}.state has {n} values, this episode's steps have {shape.state_dim}")
        bad = _finite(obs.state)
        if bad >= 0:
            raise Rejected(f"{where}.state[{bad}] is NaN or inf")
        if len(obs.images) > lim.max_cameras:
            raise Rejected(f"{where} has {len(obs.images)} images, the limit is {lim.max_cameras}")
        sizes: dict[str, tuple[int, int, int]] = {}
        for i, img in enumerate(obs.images):
            at = f"{where}.images[{i}]"
            if not img.camera:
                raise Rejected(f"{at}: camera name is required")
            try:
                check_id("camera name", img.camera, lim)
            except Rejected as e:
                raise Rejected(f"{at}: {e}") from None
            if img.camera in sizes:
                raise Rejected(f"{at}: camera {short(img.camera)} appears twice")
            at = f"{where}.images[{i}] ({img.camera})"
            if for_act and spec.known and img.camera not in spec.cameras:
                want = f"only {', '.join(spec.cameras)}" if spec.cameras else "no images"
                raise Rejected(f"{at}: the policy does not read this camera; send Act {want} (GetSpec: spec.cameras)")
            sizes[img.camera] = check_image_header(img, at, lim, spec.image_encodings)
            if img.camera in spec.cameras and sizes[img.camera] != (spec.image_size, spec.image_size, 3):
                h, w, c = sizes[img.camera]
                raise Rejected(f"{at}: {h}x{w}x{c}, the policy expects {spec.image_size}x{spec.image_size}x3")
        missing = [c for c in spec.cameras if c not in sizes]
        if missing:
            raise Rejected(f"{where}: camera {short(missing[0])} is missing; the policy needs "
                           f"{', '.join(spec.cameras)}")
        if shape is not None and sizes != shape.cameras:
            if set(sizes) != set(shape.cameras):
                raise Rejected(f"{where}: cameras {sorted(sizes)}, this episode's steps have {sorted(shape.cameras)}")
            cam = next(c for c in sizes if sizes[c] != shape.cameras[c])
            raise Rejected(f"{where}: camera {cam} is {'x'.join(map(str, sizes[cam]))}, this episode's "
                           f"steps have {'x'.join(map(str, shape.cameras[cam]))}")
        n = sum(h * w * c for h, w, c in sizes.values())
        if n > lim.max_decoded_bytes_per_call:
            raise Rejected(f"{where}: the images decode to {n} bytes (height x width x channels, summed), "
                           f"the limit per call is {lim.max_decoded_bytes_per_call}")
        with (self.budget.hold(n, timeout_s) if self.budget is not None and n else nullcontext()):
            for i, img in enumerate(obs.images):
                decode_png(img, f"{where}.images[{i}] ({img.camera})")
            yield sizes

    def check_step(self, req) -> EpisodeShape:
        """Checks a ReportStepRequest; returns the shape it has (commit with `accept`)."""
        lim, spec, shape = self.limits, self.spec, self.shape
        if self.steps >= lim.max_steps_per_episode:
            raise Rejected(f"the episode has {self.steps} steps, the most one episode may hold; "
                           "end it and start another", "OUT_OF_RANGE")
        a = len(req.action)
        if not a:
            raise Rejected("action is required")
        if a > lim.max_action_dim:
            raise Rejected(f"action has {a} values, the limit is {lim.max_action_dim}")
        if spec.action_dim is not None and a != spec.action_dim:
            raise Rejected(f"action has {a} values, the policy's actions have {spec.action_dim}")
        if shape is not None and a != shape.action_dim:
            raise Rejected(f"action has {a} values, this episode's steps have {shape.action_dim}")
        bad = _finite(req.action)
        if bad >= 0:
            raise Rejected(f"action[{bad}] is NaN or inf")
        if not math.isfinite(req.reward):
            raise Rejected("reward is NaN or inf")
        k = len(req.policy_chunk)
        if k > lim.max_policy_chunk_values:
            raise Rejected(f"policy_chunk has {k} values, the limit is {lim.max_policy_chunk_values}")
        if k and k % a:
            raise Rejected(f"policy_chunk has {k} values, not a multiple of the action's {a}")
        bad = _finite(req.policy_chunk)
        if bad >= 0:
            raise Rejected(f"policy_chunk[{bad}] is NaN or inf")
        check_text("operator", req.operator, lim.max_text_bytes)
        sizes = self.check_observation(req.observation)
        size = req.ByteSize()
        if self.bytes + size > lim.max_episode_bytes:
            raise Rejected(f"the episode has {self.bytes} bytes and this step {size}, over the "
                           f"{lim.max_episode_bytes} bytes one episode may hold; end it and start another",
                           "OUT_OF_RANGE")
        return EpisodeShape(len(req.observation.state), a, sizes)

    def accept(self, shape: EpisodeShape, nbytes: int) -> None:
        if self.shape is None:
            self.shape = shape
        self.steps += 1
        self.bytes += nbytes
