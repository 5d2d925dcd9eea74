"""Data-parallel training across processes: ``torchrun --nproc_per_node=N -m medmix train ...``.

Every process holds the whole (in-memory) dataset and the same per-epoch permutation (drawn from the shared seed,
which is what ``DistributedSampler.set_epoch`` does); each global batch of ``--batch-size`` images is cut into
``world_size`` contiguous shards, one per process, and the per-process losses are weighted by their share, so that
DistributedDataParallel's gradient average equals the gradient of the global batch mean. The augmentation draws
its random parameters for the whole global batch on every process and each process keeps its own rows, so the
images seen are the ones a single process would see. BatchNorm layers are synchronised across processes
(``nn.SyncBatchNorm`` on GPUs; on CPUs, where PyTorch's SyncBatchNorm does not run, :class:`CPUSyncBatchNorm`).
Only process 0 evaluates, logs and writes files; its decisions (early stop, errors) are broadcast to the others.

The process group is initialised from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) with NCCL when CUDA is available, else gloo; collectives time out after
``$MEDMIX_DDP_TIMEOUT_MIN`` minutes (default 60: process 0 may evaluate a large split while the others wait).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ConfigError, MedmixError


@dataclass
class Context:
    """Where this process stands: rank, world size, device; no-ops for a single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.owns_group or _initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- collectives
    def broadcast_int(self, value: int) -> int:
        """Process 0's ``value`` on every process."""
        return int(self.broadcast_object(int(value)))

    def broadcast_object(self, obj: Any) -> Any:
        """Process 0's ``obj`` (a small picklable value such as a path) on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on process 0 only. If it raises, every process raises (process 0 its own error, the others a
        short :class:`MedmixError`), so no process waits forever for a partner that has failed."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below after telling the others
                error = e
        ok = self.broadcast_int(0 if error is None else 1) == 0
        if error is not None:
            raise error
        if not ok:
            raise MedmixError("stopped: process 0 failed (its message says why)")
        return result

    def close(self) -> None:
        if self.owns_group and _initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(ddp: bool | None) -> Context:
    """``ddp``: True = required (torchrun's variables must be set), None = when torchrun started several
    processes, False = never. Joins an already initialised default process group instead of creating one."""
    try:  # launched by torchrun (or a compatible launcher) with more than one process?
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    if ddp is False or (ddp is None and not several and not _initialized()):
        return Context()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; train without --ddp")
    cuda = torch.cuda.is_available()
    owns = not dist.is_initialized()
    if owns:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"--ddp needs torchrun's environment ({', '.join(missing)} not set); launch with "
                              f"torchrun --nproc_per_node=N -m medmix train ...")
        try:
            dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                    timeout=timedelta(minutes=float(os.environ.get("MEDMIX_DDP_TIMEOUT_MIN", "60"))))
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"could not join the process group ({str(e).splitlines()[0] if str(e) else e})") \
                from None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if cuda and dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rows of a global batch of ``n`` that process ``rank`` trains on: contiguous, sizes differ by at most 1."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


# ----------------------------------------------------------------------------------------------- BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient is summed too (every process's loss depends on every process's
    statistics)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    backward = forward  # the gradient (one per process) is summed the same way


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are computed over the whole global batch (all processes), for CPU
    tensors and the gloo backend, where ``nn.SyncBatchNorm`` refuses to run. Same parameters and buffers as the
    BatchNorm it replaces (checkpoints load into plain BatchNorm); in eval mode it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and _initialized()):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        inv = torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        y = (x - mean.to(x.dtype).view(shape)) * inv
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm -> a synchronised one (``nn.SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` on CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(m: nn.Module) -> nn.Module:
        out = m
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, CPUSyncBatchNorm):
            out = CPUSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            if m.affine:
                out.weight, out.bias = m.weight, m.bias
            out.running_mean, out.running_var = m.running_mean, m.running_var
            out.num_batches_tracked = m.num_batches_tracked
            out.train(m.training)
        for name, child in m.named_children():
            out.add_module(name, convert(child))
        return out

    return convert(model)

