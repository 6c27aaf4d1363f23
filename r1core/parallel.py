"""Data parallelism for the recipes: DDP replicas or FSDP2 shards, one training loop for both.

`compute.strategy: ddp` keeps a full replica of the model, its gradients and AdamW state on
every worker and all-reduces gradients; `fsdp` is PyTorch's `fully_shard` (FSDP2) on every
decoder layer and on the root, so that each worker stores 1/N of the parameters, gradients and
optimizer state and gathers a layer's parameters only while it runs. Both run over gloo on CPU
and NCCL on GPU; with no process group (tests, benchmarks in one process) a model is trained
as it is. On GPU with `bf16`, FSDP computes in bfloat16 and keeps fp32 parameters (the
optimizer's master weights) and fp32 gradient reductions; DDP autocasts (`TrainContext.autocast`).

What the loop needs beyond wrapping lives here too: gradient sync only on a step's last
micro-batch, sums and maxima over workers, and the full (gathered) weights of a sharded model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside `module` (itself, or a wrapper's `lm`)."""
    return next(m for m in module.modules() if hasattr(m, "_no_split_modules"))


def wrap(module: torch.nn.Module, compute, device: torch.device, *, trainable: bool = True) -> torch.nn.Module:
    """`module` on `device`, with activation checkpointing if asked, replicated (DDP) or sharded
    (FSDP2) over the process group; a frozen model (a GRPO reference) is sharded too under
    FSDP and left a plain replica under DDP."""
    module = module.to(device)
    if trainable and compute.gradient_checkpointing:
        hf_model(module).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not is_distributed():
        return module
    if compute.strategy == "fsdp":
        return shard(module, mixed_precision(compute, device))
    if not trainable:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def mixed_precision(compute, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute, fp32 parameters and reductions on GPU with `bf16`; fp32 throughout on CPU."""
    if compute.bf16 and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(module: torch.nn.Module, mp_policy: MixedPrecisionPolicy) -> torch.nn.Module:
    """`fully_shard` on every decoder layer (the classes transformers names as unsplittable),
    then on the root, which holds the embeddings, final norm and output layer (tied or not)."""
    layer_classes = set(hf_model(module)._no_split_modules or [])
    for m in list(module.modules()):
        if type(m).__name__ in layer_classes:
            fully_shard(m, mp_policy=mp_policy)
    fully_shard(module, mp_policy=mp_policy)
    return module


def no_sync(model: torch.nn.Module, last: bool):
    """Gradients are reduced over workers only on a step's last micro-batch."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce(value: float, op: str, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def full_state_dict(module: torch.nn.Module, *, everywhere: bool) -> dict[str, torch.Tensor]:
    """The unsharded weights of `module` (a collective under FSDP: every worker calls it): on
    every worker with `everywhere`, else on rank 0 only, in CPU memory (others get {})."""
    if not any(isinstance(m, FSDPModule) for m in module.modules()):
        return module.state_dict()
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def full_tensors(module: torch.nn.Module):
    """(name, full tensor) of `module`'s weights one at a time, so that at most one unsharded
    parameter exists at once (a collective under FSDP: every worker iterates all of it)."""
    from torch.distributed.tensor import DTensor

    for name, t in module.state_dict().items():
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def local_bytes(tensors) -> int:
    """Bytes this worker stores for `tensors` (a sharded tensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is not None:
            local = t.to_local() if isinstance(t, DTensor) else t
            total += local.numel() * local.element_size()
    return total


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
