"""LearnerCore: one learner step as plain Python -- what every Ray Train worker runs, and what
`fleetloop bench learner` times without Ray.

    batch  = source.next_batch(step)                # S(B_on U B_off): the adaptive sampler
    loss   = algorithm.loss(net, batch)             # G's objective (masked chunk regression,
    theta <- AdamW(theta, grad loss)                #   RECAP: indicator-conditioned)
    source.report_losses(step, batch, l_i)          # per-sample losses -> SOP's w_on averages

The batch source is the sampler in this process (LocalSource) or the replay actor over Ray
(fleetloop.learner.app.RemoteSource). Imports torch and numpy only.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from fleetloop.buffer.sampler import BufferSampler, SampledBatch
from fleetloop.policy.backend import PolicyModel
from fleetloop.policy.train import lr_factor, make_optimizer


@dataclass
class CoreConfig:
    batch_size: int = 128
    lr: float = 3e-4          # below pretraining's 1e-3: fine-tuning a working policy
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 25    # the optimiser starts without moment estimates
    precision: str = "fp32"   # "bf16": autocast the forward/backward (GPU learners); weights stay fp32

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")


class ModelDoesNotFit(RuntimeError):
    """The model, its optimiser state and a batch's activations do not fit the accelerator."""


class BatchSource(Protocol):
    def next_batch(self, step: int) -> SampledBatch | None: ...
    def report_losses(self, step: int, batch: SampledBatch, losses: np.ndarray) -> None: ...


class LocalSource:
    """The sampler in this process."""

    def __init__(self, sampler: BufferSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def next_batch(self, step: int) -> SampledBatch | None:
        return self.sampler.sample(self.batch_size)

    def report_losses(self, step: int, batch: SampledBatch, losses: np.ndarray) -> None:
        self.sampler.observe_losses(step, batch.tasks, batch.meta["task"], batch.meta["online"], losses)


class LossModule(nn.Module):
    """net + the algorithm's objective as one module's forward, so DistributedDataParallel
    (which only syncs gradients of work done inside forward) can wrap it."""

    def __init__(self, net: PolicyModel, algorithm=None):
        super().__init__()
        self.net = net
        self.algorithm = algorithm

    def forward(self, batch: dict[str, torch.Tensor]):
        if self.algorithm is not None:
            return self.algorithm.loss(self.net, batch)
        return self.net.loss(batch)


def to_tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    pin = device.type == "cuda"
    out = {}
    for k, v in arrays.items():
        v = np.ascontiguousarray(v)
        if not v.flags.writeable:  # arrays from Ray's object store are read-only views
            v = v.copy()
        t = torch.from_numpy(v)
        out[k] = (t.pin_memory() if pin else t).to(device, non_blocking=pin)
    return out


class LearnerCore:
    """Model, optimiser and the step loop of one learner process.

    wrap: e.g. ray.train.torch.prepare_model (moves to the device, wraps in DDP when there is
    more than one worker); applied to the LossModule."""

    def __init__(self, net: PolicyModel, source: BatchSource, algorithm=None, config: CoreConfig | None = None,
                 device: str | torch.device = "cpu", wrap: Callable[[nn.Module], nn.Module] | None = None,
                 sync_timing: bool = False):
        self.cfg = config or CoreConfig()
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.source = source
        self.algorithm = algorithm
        module = LossModule(self.net, algorithm)
        self.module = wrap(module) if wrap else module
        self.opt = make_optimizer(self.net, self.cfg.lr, self.cfg.weight_decay)
        self._trainable = self.net.trainable_parameters()
        if not self._trainable:
            raise ValueError("the model has no trainable parameters (everything frozen?)")
        self.step = 0
        self.samples = 0
        self.sync_timing = sync_timing and self.device.type == "cuda"
        self._times: deque = deque(maxlen=50)  # (sample_s, train_s, batch) of recent steps
        self.last_metrics: dict = {}

    def _sync(self) -> None:
        if self.sync_timing:
            torch.cuda.synchronize(self.device)

    def train_step(self) -> dict | None:
        """One learner step. None when the source has no batch (no eligible data yet, or the
        learner is stopping)."""
        t0 = time.perf_counter()
        batch = self.source.next_batch(self.step + 1)
        if batch is None:
            return None
        t1 = time.perf_counter()
        tensors = to_tensors(batch.arrays, self.device)
        b = len(batch.meta["task"])
        # A weight per sample that requires grad gives every sample's loss for free (below).
        w = torch.ones(b, device=self.device, requires_grad=True)
        tensors["weight"] = w
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * lr_factor(self.step, 0, self.cfg.warmup_steps)
        self.module.train()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
                loss, metrics = self.module(tensors)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        except torch.OutOfMemoryError as e:
            raise self._does_not_fit(b, e) from None
        gn = torch.nn.utils.clip_grad_norm_(self._trainable, self.cfg.grad_clip or float("inf"))
        self.opt.step()
        # Per-sample losses l_i for the adaptive mix: the model's loss is
        #   L = sum_i w_i l_i / sum_i w_i   so   dL/dw_i = (l_i - L) / sum_j w_j,
        # hence with w = 1:  l_i = L + B * dL/dw_i  (exact, no second forward pass).
        per_sample = (loss.detach() + b * w.grad).float().cpu().numpy()
        self._sync()
        t2 = time.perf_counter()
        self.step += 1
        self.samples += b
        self.source.report_losses(self.step, batch, per_sample)
        self._times.append((t1 - t0, t2 - t1, b))
        metrics = dict(metrics, step=self.step, grad_norm=float(gn), lr=self.opt.param_groups[0]["lr"],
                       sample_ms=1e3 * (t1 - t0), train_ms=1e3 * (t2 - t1))
        on = np.asarray(batch.meta["online"], bool)
        if on.any():
            metrics["loss_online"] = float(per_sample[on].mean())
        if (~on).any():
            metrics["loss_offline"] = float(per_sample[~on].mean())
        st = np.asarray(batch.meta["staleness"])
        if (st >= 0).any():
            metrics["staleness_mean"] = float(st[st >= 0].mean())
        self.last_metrics = metrics
        return metrics

    def _does_not_fit(self, batch_size: int, e: BaseException) -> ModelDoesNotFit:
        params = self.net.num_parameters()
        trained = self.net.num_parameters(trainable=True)
        have = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 0
        # weights at their own dtype (a bf16 frozen backbone 2 B, fp32 4 B) + the fp32 gradient and
        # AdamW's two moments of what trains (12 B): docs/bring-your-own-vla.md's memory table
        need = sum(p.numel() * p.element_size() for p in self.net.parameters()) + 12 * trained
        return ModelDoesNotFit(
            f"out of memory on {self.device} at batch {batch_size}: {params / 1e6:.0f}M parameters "
            f"({trained / 1e6:.1f}M trained) need ~{need / 2**30:.1f} GiB for weights and optimiser state "
            f"before activations (device has {have / 2**30:.0f} GiB). Lower --batch-size, use LoRA "
            f"(train fewer weights), precision bf16, gradient checkpointing, or more/larger GPUs. ({e})")

    def timing(self) -> dict:
        """Recent per-step time in sampling (waiting for data) vs in the training step."""
        if not self._times:
            return {}
        s, t, b = (np.array(x, np.float64) for x in zip(*self._times))
        busy = s.sum() + t.sum()
        return {"sample_ms": round(1e3 * s.mean(), 2), "train_ms": round(1e3 * t.mean(), 2),
                "samples_per_s": round(b.sum() / busy, 1) if busy > 0 else 0.0,
                "data_wait_fraction": round(s.sum() / busy, 3) if busy > 0 else 0.0}

    # ---- checkpoint state -----------------------------------------------------------------

    def optimizer_state(self) -> tuple[bytes, dict]:
        from fleetloop.learner.checkpoint import optimizer_to_safetensors
        return optimizer_to_safetensors(self.opt)

    def load_optimizer_state(self, data: bytes, meta: dict) -> None:
        from fleetloop.learner.checkpoint import optimizer_from_safetensors
        optimizer_from_safetensors(self.opt, data, meta)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
