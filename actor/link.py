"""The robot side of the robot link: a thin gRPC client with a deadline on every call.

`RobotLinkClient` is what a Python robot stack uses. `LinkedPolicy` and `LinkCallbacks` adapt
it to the simulator's SimRobot (fleetloop.actor.sim.robot), so the simulated robots drive the
daemon through exactly the path a real robot uses. Any other language can generate a client
from proto/fleetloop/v1/robot_link.proto (include path `proto`) and do the same calls:
docs/robot-link.md, with a Node.js client in docs/examples/node/.
"""
from __future__ import annotations

import time
from typing import Optional

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


class RobotLinkClient:
    def __init__(self, address: str, robot_id: str = "", timeout_s: float = 2.0, image_encoding: str = "png"):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 32 << 20)])
        self.stub = rl_grpc.RobotLinkStub(self.channel)
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
