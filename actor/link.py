"""The robot side of the robot link: a thin gRPC client with a deadline on every call.

`RobotLinkClient` is what a Python robot stack uses. `LinkedPolicy` and `LinkCallbacks` adapt
it to the simulator's SimRobot (fleetloop.actor.sim.robot), so the simulated robots drive the
daemon through exactly the path a real robot uses. Any other language can generate a client
from proto/fleetloop/v1/robot_link.proto (include path `proto`) and do the same calls:
docs/robot-link.md, with a Node.js client in docs/examples/node/.

Security of the link (docs/robot-link.md, "Securing the link"): by default the daemon listens on
loopback or a unix socket and needs nothing. A robot whose control stack runs on another host
uses TLS -- with client certificates (mutual TLS) when the daemon has a client CA -- and/or a
bearer token. `LinkSecurity` is the daemon's side (built from the actor's [grpc] settings), the
keyword options of `RobotLinkClient` the robot's side.
"""
from __future__ import annotations

import collections
import hmac
import ipaddress
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import grpc
import numpy as np

from fleetloop.buffer.codec import encode_image
from fleetloop.policy.interface import Observation
from fleetloop.proto.v1 import episode_pb2 as pb
from fleetloop.proto.v1 import robot_link_pb2 as rl
from fleetloop.proto.v1 import robot_link_pb2_grpc as rl_grpc


def observation_to_proto(obs: Observation, image_encoding: str = "png") -> rl.Observation:
    return rl.Observation(images=[encode_image(img, camera=cam, encoding=image_encoding) for cam, img in obs.images.items()],
                          state=np.asarray(obs.state, dtype=np.float32).ravel().tolist())


# -- securing the link ------------------------------------------------------------------------

TOKEN_MIN_CHARS = 16
Pem = Union[str, bytes, os.PathLike, None]   # PEM bytes, or the path of a PEM file


def _pem(value: Pem) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return open(value, "rb").read()


def read_tokens(path: Union[str, os.PathLike]) -> tuple[str, ...]:
    """A token file: one token per line (several during a rotation); blank lines and lines
    starting with '#' are skipped."""
    lines = open(path, encoding="utf-8").read().splitlines()
    return tuple(t.strip() for t in lines if t.strip() and not t.strip().startswith("#"))


def is_loopback(address: str) -> bool:
    """True for a unix socket or a loopback host (127.0.0.0/8, ::1, localhost)."""
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a host name or 0.0.0.0 / [::] (every interface)


@dataclass(frozen=True)
class LinkSecurity:
    """How the daemon's robot link authenticates its caller.

    tls_cert/tls_key: the daemon's certificate chain and key (PEM): the link speaks TLS.
    client_ca: CA certificate(s) (PEM); with it the daemon requires a client certificate signed
      by one of them (mutual TLS) and refuses the handshake otherwise.
    tokens: accepted bearer tokens (metadata `authorization: Bearer <token>`); a call without
      one or with another is refused with UNAUTHENTICATED. Several during a rotation.
    insecure: allow a non-loopback address with neither TLS nor a token (a private network).
    """
    tls_cert: Optional[bytes] = None
    tls_key: Optional[bytes] = field(default=None, repr=False)
    client_ca: Optional[bytes] = None
    tokens: tuple[str, ...] = field(default=(), repr=False)
    insecure: bool = False

    @classmethod
    def from_files(cls, tls_cert: Pem = None, tls_key: Pem = None, client_ca: Pem = None,
                   token: Optional[str] = None, token_file=None, insecure: bool = False) -> "LinkSecurity":
        tokens = (token,) if token else ()
        if token_file:
            tokens += read_tokens(token_file)
        return cls(_pem(tls_cert), _pem(tls_key), _pem(client_ca), tokens, insecure)

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both the certificate and its key")
        if self.client_ca and not self.tls_cert:
            raise ValueError("client certificates (client_ca) need TLS: set tls_cert and tls_key too")
        for t in self.tokens:
            if len(t) < TOKEN_MIN_CHARS:
                raise ValueError(f"a robot link token must have at least {TOKEN_MIN_CHARS} characters")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mutual_tls(self) -> bool:
        return self.client_ca is not None

    def describe(self) -> str:
        parts = (["mutual TLS" if self.mutual_tls else "TLS"] if self.tls else ["plaintext"])
        if self.tokens:
            parts.append(f"bearer token ({len(self.tokens)} accepted)")
        return " + ".join(parts)

    def check_address(self, address: str) -> None:
        """Refuse to serve a non-loopback address with neither TLS nor a token (unless insecure):
        anyone on that network could drive the robot's episodes and read its policy's actions."""
        if is_loopback(address) or self.insecure or self.tls or self.tokens:
            return
        raise ValueError(f"the robot link would listen on {address}, which is not loopback, with no authentication: "
                         "set TLS (tls_cert + tls_key, and client_ca for client certificates) or a token "
                         "(token / token_file), or insecure = true for a private network (docs/robot-link.md)")

    def server_credentials(self) -> Optional[grpc.ServerCredentials]:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)

    def interceptors(self) -> list:
        return [TokenInterceptor(self.tokens)] if self.tokens else []


def _refuse(message: str):
    def handler(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return grpc.unary_unary_rpc_method_handler(handler)   # every RobotLink method is unary


class TokenInterceptor(grpc.ServerInterceptor):
    """Every call must carry `authorization: Bearer <token>` with an accepted token (compared in
    constant time); otherwise UNAUTHENTICATED with a short message, before the request is read."""

    def __init__(self, tokens):
        self._tokens = [t.encode() for t in tokens]
        self._missing = _refuse("missing robot link token: send the metadata 'authorization: Bearer <token>'")
        self._wrong = _refuse("wrong robot link token")

    def intercept_service(self, continuation, handler_call_details):
        auth = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                auth = value if isinstance(value, str) else value.decode("latin-1")
                break
        if not auth:
            return self._missing
        scheme, _, token = auth.partition(" ")
        ok = False
        for t in self._tokens:  # no early exit: the time does not say which token was close
            ok |= hmac.compare_digest(token.strip().encode(), t)
        if scheme.lower() != "bearer" or not ok:
            return self._wrong
        return continuation(handler_call_details)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, d, request):
        md = [m for m in (d.metadata or ()) if m[0] != "authorization"] + [self._header]
        return continuation(_CallDetails(d.method, d.timeout, md, d.credentials,
                                         getattr(d, "wait_for_ready", None), getattr(d, "compression", None)),
                            request)


class RobotLinkClient:
    """address: host:port or unix:/path. For a secured daemon (docs/robot-link.md):

    root_ca: the CA that signed the daemon's certificate (PEM bytes or a path): the channel uses
      TLS. tls=True with no root_ca uses the system's trust store.
    client_cert / client_key: this robot stack's certificate and key, for a daemon that requires
      client certificates (mutual TLS).
    token: a bearer token sent with every call.
    server_name: the name to check the daemon's certificate against when it differs from the
      address's host (e.g. connecting by IP to a certificate issued for a name).
    """

    def __init__(self, address: str, robot_id: str = "", timeout_s: float = 2.0, image_encoding: str = "png", *,
                 tls: bool = False, root_ca: Pem = None, client_cert: Pem = None, client_key: Pem = None,
                 token: Optional[str] = None, server_name: Optional[str] = None):
        options = [("grpc.max_send_message_length", 32 << 20)]
        if bool(client_cert) != bool(client_key):
            raise ValueError("a client certificate needs its key (client_cert and client_key)")
        if tls or root_ca or client_cert:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=_pem(root_ca), private_key=_pem(client_key),
                                                 certificate_chain=_pem(client_cert))
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        channel = grpc.intercept_channel(self.channel, _BearerToken(token)) if token else self.channel
        self.stub = rl_grpc.RobotLinkStub(channel)
        self.robot_id, self.timeout_s, self.image_encoding = robot_id, timeout_s, image_encoding
        self.episode_id: Optional[str] = None
        self.policy_version = ""
        self.takeover_requested = False
        self.paused = False
        # from the last act(): the policy's H, the episode step row 0 is for, and the step of the
        # observation the chunk was computed from (first_step - chunk_step rows were already past)
        self.horizon = 0
        self.first_step = 0
        self.chunk_step = 0

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def start_episode(self, task_id: str, instruction: str, kind: int = pb.EPISODE_KIND_ROLLOUT) -> str:
        r = self.stub.StartEpisode(rl.StartEpisodeRequest(robot_id=self.robot_id, task_id=task_id,
                                                          instruction=instruction, kind=kind), timeout=self.timeout_s)
        self.episode_id, self.policy_version = r.episode_id, r.policy_version
        return r.episode_id

    def act(self, obs: Observation) -> np.ndarray:
        """The actions to execute from now on, time-aligned: an [n, A] array whose row 0 is the
        action for the current step (the step after the last report_step), row 1 for the next,
        ... n <= H: with asynchronous inference the chunk may have been computed a few steps ago
        from an older observation, and the rows for steps already past are dropped. Execute at
        most the rows returned (reporting each step), then call act() again."""
        r = self.stub.Act(rl.ActRequest(episode_id=self.episode_id, observation=observation_to_proto(obs, self.image_encoding)),
                          timeout=self.timeout_s)
        self.takeover_requested, self.paused = r.takeover_requested, r.paused
        rows = r.rows or r.horizon  # a daemon without the field sends whole chunks
        self.horizon, self.first_step, self.chunk_step = r.horizon, r.first_step, r.chunk_step
        return np.asarray(r.actions, dtype=np.float32).reshape(rows, r.action_dim)

    def report_step(self, obs: Observation, action, intervention: bool, policy_chunk=None, operator: str = "") -> None:
        r = self.stub.ReportStep(rl.ReportStepRequest(
            episode_id=self.episode_id, observation=observation_to_proto(obs, self.image_encoding),
            action=np.asarray(action, dtype=np.float32).ravel().tolist(), intervention=intervention,
            operator=operator,
            policy_chunk=[] if policy_chunk is None else np.asarray(policy_chunk, np.float32).ravel().tolist()),
            timeout=self.timeout_s)
        self.takeover_requested, self.paused = r.takeover_requested, r.paused

    def begin_intervention(self, operator: str, reason: str) -> None:
        self.stub.BeginIntervention(rl.InterventionRequest(episode_id=self.episode_id, operator=operator, reason=reason),
                                    timeout=self.timeout_s)

    def end_intervention(self) -> None:
        self.stub.EndIntervention(rl.InterventionRequest(episode_id=self.episode_id), timeout=self.timeout_s)

    def end_episode(self, outcome: int, source: int = pb.LABEL_SOURCE_ENVIRONMENT, labelled_by: str = "") -> rl.EndEpisodeResponse:
        r = self.stub.EndEpisode(rl.EndEpisodeRequest(episode_id=self.episode_id, outcome=outcome,
                                                      outcome_source=source, labelled_by=labelled_by),
                                 timeout=self.timeout_s)
        self.episode_id = None
        return r

    def status(self) -> rl.StatusResponse:
        return self.stub.Status(rl.StatusRequest(), timeout=self.timeout_s)

    def get_spec(self) -> rl.GetSpecResponse:
        """The running policy's spec (state/action dims, cameras, image size) and the limits."""
        return self.stub.GetSpec(rl.GetSpecRequest(), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()


class LinkedPolicy:
    """The Policy protocol over the robot link: the daemon runs the network, this side only
    ships observations. Honours an operator's pause by waiting (bounded) before acting.

    act() returns the daemon's time-aligned rows ([n, A], n <= horizon; row 0 for the current
    step), not necessarily a whole [H, A] chunk: a broker executes at most those rows (and at
    most its k) before asking again -- ChunkBroker does."""

    def __init__(self, client: RobotLinkClient, max_pause_s: float = 600.0):
        self.client, self.max_pause_s = client, max_pause_s
        self.horizon = 0
        self.action_dim = 0

    @property
    def version(self) -> str:
        return self.client.policy_version

    def act(self, obs: Observation, instruction: str, indicator: Optional[bool] = None) -> np.ndarray:
        chunk = self.client.act(obs)
        waited = 0.0
        while self.client.paused and waited < self.max_pause_s:
            time.sleep(0.1)
            waited += 0.1
            chunk = self.client.act(obs)
        self.horizon, self.action_dim = self.client.horizon or chunk.shape[0], chunk.shape[1]
        return chunk


def link_callbacks(client: RobotLinkClient, on_end=None):
    """SimRobot callbacks that forward every event over the link (import kept local: the
    simulator is optional on a real robot)."""
    from fleetloop.actor.sim.robot import EpisodeCallbacks

    class LinkCallbacks(EpisodeCallbacks):
        def start(self, task, instruction):
            client.start_episode(task, instruction)

        def on_step(self, obs, action, intervention, policy_chunk):
            client.report_step(obs, action, intervention, policy_chunk)
            return client.takeover_requested

        def on_takeover(self, reason, operator):
            client.begin_intervention(operator, reason)

        def on_handback(self):
            client.end_intervention()

        def end(self, result):
            r = client.end_episode(result.outcome, pb.LABEL_SOURCE_ENVIRONMENT, "sim-success-detector")
            if on_end:
                on_end(result, r)

    return LinkCallbacks()
