"""Robot-link requests that do not parse: refused as INVALID_ARGUMENT naming the field.

protobuf refuses a `string` field that is not valid UTF-8 (a lone surrogate from a JavaScript
string, a raw 0xff byte from a C++ stack) while parsing, and gRPC's default deserializer turns
that into INTERNAL "Exception deserializing request!" plus a traceback in the log on every call.
Here each method's deserializer never raises: a request that does not parse becomes an
`Undecodable` naming the first bad field (found by walking the wire format against the message's
descriptor), the method answers INVALID_ARGUMENT, and the log says so at most once a minute per
robot (with the count of the others).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from fleetloop.proto.v1 import robot_link_pb2 as rl

log = logging.getLogger(__name__)

SERVICE = rl.DESCRIPTOR.services_by_name["RobotLink"]


@dataclass(frozen=True)
class Undecodable:
    """A request body that is not a valid message; `message` is what the caller is told."""
    message: str


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def first_bad_utf8(descriptor: Descriptor, data: bytes, prefix: str = "") -> Optional[str]:
    """The path of the first `string` field whose bytes are not UTF-8 (e.g.
    "observation.images[1].camera"), or None. Malformed framing stops the walk (None)."""
    seen: dict[int, int] = {}
    i = 0
    try:
        while i < len(data):
            tag, i = _varint(data, i)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, i = _varint(data, i)
                continue
            if wire in (1, 5):
                i += 8 if wire == 1 else 4
                continue
            if wire != 2:
                return None  # groups or garbage: not a text problem
            n, i = _varint(data, i)
            body, i = data[i:i + n], i + n
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = seen.get(number, 0)
            seen[number] = index + 1
            name = prefix + field.name + (f"[{index}]" if _repeated(field) else "")
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    body.decode("utf-8")  # strict: surrogates (ED A0 80 ...) are refused too
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = first_bad_utf8(field.message_type, body, name + ".")
                if found:
                    return found
    except ValueError:
        return None
    return None


def _repeated(field: FieldDescriptor) -> bool:
    rep = getattr(field, "is_repeated", None)  # protobuf >= 5.29; `label` is deprecated there
    return bool(rep) if rep is not None else field.label == FieldDescriptor.LABEL_REPEATED


def lenient_deserializer(cls) -> Callable[[bytes], object]:
    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError:
            bad = first_bad_utf8(cls.DESCRIPTOR, data)
            if bad:
                return Undecodable(f"{bad} is not valid UTF-8 (text fields must be UTF-8; a lone surrogate "
                                   "or a raw 0xff byte is not)")
            return Undecodable(f"the request is not a valid {cls.DESCRIPTOR.full_name} message")
    return deserialize


class OncePerInterval:
    """Lets a log line through once per `interval_s` per key, counting the ones it held back."""

    def __init__(self, interval_s: float = 60.0):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str) -> Optional[int]:
        """None: stay quiet; else the number held back since the last line."""
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._next[key] = now + self.interval_s
            return self._held.pop(key, 0)


def add_robot_link(servicer, server: grpc.Server, robot_id: str, log_gate: Optional[OncePerInterval] = None) -> None:
    """add_RobotLinkServicer_to_server, with requests that do not parse answered INVALID_ARGUMENT."""
    gate = log_gate or OncePerInterval()

    def guarded(method: str, behaviour):
        def call(request, context):
            if isinstance(request, Undecodable):
                held = gate(robot_id)
                if held is not None:
                    log.warning("robot %s: %s refused: %s%s", robot_id, method, request.message,
                                f" ({held} more such requests in the last minute)" if held else "")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return behaviour(request, context)
        return call

    handlers = {}
    for m in SERVICE.methods:
        req, resp = (message_factory.GetMessageClass(t) for t in (m.input_type, m.output_type))
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            guarded(m.name, getattr(servicer, m.name)), request_deserializer=lenient_deserializer(req),
            response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
