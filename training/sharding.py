"""Sharded data parallelism (`train.shard=fsdp`): each of N processes keeps 1/N of the trained modules'
weights, gradients, optimizer state and EMA, with torch's FSDP2 (`fully_shard`, what accelerate's FSDP
plugin applies too) over gloo on CPUs or NCCL on GPUs.

A trained module is sharded block by block: every child with parameters is one FSDP unit, the entries
of a ModuleList / ModuleDict each one (a U-Net's input and output blocks, a transformer's layers), and
the module itself holds what is left (a text encoder's position embedding). A unit's weights are
gathered while its `forward` runs and freed after it, so a task may shard only modules it calls through
`forward` (it names them in `TrainingTask.shardable`); its optimizers are pointed at the sharded
parameters before their first step.

What changes for the loop: FSDP averages the gradients itself (reduce-scatter), so the loop does not;
clipping and the EMA work on the shards (DTensors); image grids run the model on every process; and
checkpoints are as in unsharded runs: every process helps gather full tensors (`gather`), which the main
process writes one file at a time, and a resume cuts its own shards out of the full tensors it reads (`local_shards`,
`optimizer_shards`). A run saved sharded resumes unsharded and the reverse, on any number of processes.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from common.config import ConfigError

if TYPE_CHECKING:
    from training.ema import EMA
    from training.loop import TrainingTask

log = logging.getLogger(__name__)

CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # no forward of their own: their entries are the units


def shardable_modules(task: TrainingTask) -> list[str]:
    """The names of the task's trained modules (those with parameters that require grad), once set up;
    a ConfigError when the task does not let one of them be sharded."""
    names = [name for name, module in task.modules.items() if any(p.requires_grad for p in module.parameters())]
    refused = [name for name in names if name not in task.shardable]
    if refused:
        raise ConfigError(f"train.shard=fsdp: {type(task).__name__} cannot shard its module(s) {refused} (FSDP "
                          f"gathers a module's weights in its forward only, and this task calls them otherwise); "
                          f"set train.shard=none")
    return names


def shard_task(task: TrainingTask, names: list[str], ema: EMA | None, accelerator) -> None:
    """Shard the task's modules `names` (and the EMA's copy of them) over the run's processes and point
    its optimizers at the shards. Call it after `task.setup` and before any optimizer step or load."""
    owner = {p: (name, key) for name in names for key, p in task.modules[name].named_parameters()}
    for opt_name, optimizer in task.optimizers.items():
        params = [p for group in optimizer.param_groups for p in group["params"]]
        inside = [p in owner for p in params]
        if any(inside) and not all(inside):
            raise ConfigError(f"train.shard=fsdp: optimizer '{opt_name}' trains sharded and unsharded parameters "
                              f"together; its gradient clipping needs one kind")
        if optimizer.state:
            raise RuntimeError(f"shard_task: optimizer '{opt_name}' has already stepped; shard before training")
    shadows = {}
    if ema is not None:
        paths = {module: path for path, module in task.ema_target.named_modules()}
        shadows = {name: ema.shadow.get_submodule(paths[task.modules[name]])
                   for name in names if task.modules[name] in paths}
        covered = {p for name in shadows for p in task.modules[name].parameters()}
        if any(p.requires_grad and p not in covered for p in task.ema_target.parameters()):
            raise ConfigError("train.shard=fsdp: the EMA follows trained parameters outside the sharded modules")

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for name in names:
        for module in (task.modules[name], shadows.get(name)):
            if module is not None:
                for unit in _units(module):
                    fully_shard(unit, mesh=mesh)
                if not isinstance(module, CONTAINERS):
                    fully_shard(module, mesh=mesh)
    sharded = {(name, key): p for name in names for key, p in task.modules[name].named_parameters()}
    for optimizer in task.optimizers.values():  # no state yet: only the parameter lists change
        for group in optimizer.param_groups:
            group["params"] = [sharded[owner[p]] if p in owner else p for p in group["params"]]
    log.info("train.shard=fsdp: %s sharded over %d processes", ", ".join(names), accelerator.num_processes)


def _units(module: nn.Module) -> Iterator[nn.Module]:
    """The FSDP units of a module: its children with parameters, a container's entries in its place."""
    for child in module.children():
        if isinstance(child, CONTAINERS):
            yield from _units(child)
        elif any(True for _ in child.parameters()):
            yield child


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def gather(state, keep: bool):
    """`state` (a state dict, an optimizer's, nested dicts and lists) with every DTensor gathered into a
    full CPU tensor, for `keep`ing (the main process); None where `keep` is False. A collective: every
    process calls it on a state of the same structure."""
    if isinstance(state, DTensor):
        full = state.full_tensor()
        return full.cpu() if keep else None
    if isinstance(state, Mapping):
        return {k: gather(v, keep) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gather(v, keep) for v in state)
    return state


def local_shards(state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors `state` cut into this process's shards where `like` (a sharded module's state dict)
    holds a DTensor of the same shape; everything else as it is (a wrong key or shape is left for the
    strict load to name). Every process holds the full tensors, so no communication."""
    return {key: _shard_like(value, like.get(key)) for key, value in state.items()}


def optimizer_shards(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full optimizer state dict (as an unsharded run saves it) with each parameter's state tensors
    cut into this process's shards of that parameter."""
    params = {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups):
        params.update(zip(saved["params"], group["params"]))
    return {**state, "state": {index: {k: _shard_like(v, params.get(index)) for k, v in entries.items()}
                               for index, entries in state["state"].items()}}


def _shard_like(value, target):
    if isinstance(target, DTensor) and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(target.shape):
        return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
    return value


def local_views(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this process's part of the tensor) for each (name, tensor), for checks without communication."""
    for name, t in named:
        yield name, t.to_local() if isinstance(t, DTensor) else t
