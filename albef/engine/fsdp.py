"""FSDP2 (`fully_shard`) for the large variants, and its torch.distributed.checkpoint checkpoints.

Sharding: every ViT block and every BERT layer, of the online encoders and of their momentum
copies alike, is one FSDP unit; the root unit takes the rest (embeddings, heads, projections).
The momentum parameters are therefore DTensors sharded exactly like their online twins, so the
EMA (`torch._foreach_lerp_`) runs shard by shard without communication. Buffers (the feature
queues) stay plain tensors, identical on every rank. FSDP2 cannot shard 0-d parameters (`temp`):
they stay replicated and `sync_replicated_grads` averages their gradients, as DDP would.

Checkpoints are directories `step_XXXXXXXX.dcp/`: the model and optimizer shards written by
every rank with `torch.distributed.checkpoint` (loadable at any world size, DCP reshards) plus
`trainer_state.pt` (train state, every rank's RNG state, config) written by rank 0. The
directory is written under a temp name and renamed whole; the `latest` pointer follows. To get
one file for `load_pretrained`: `python -m torch.distributed.checkpoint.format_utils dcp_to_torch
step_XXXXXXXX.dcp model.pt`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from albef.checkpoint import (DCP_TRAINER_STATE, CheckpointError, check_dcp_directory, load_checkpoint_file,
                              load_dcp_state, publish_checkpoint_dir, tmp_checkpoint_dir)
from albef.models.bert import BertEncoder

__all__ = [
    "shard_model", "transformer_blocks", "replicated_params", "gradient_sync",
    "sync_replicated_grads", "clip_sharded_grads", "save_dcp_checkpoint", "load_dcp_checkpoint",
    "load_full_checkpoint",
]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every ViT block and BERT layer of `model` (momentum copies included), in module order."""
    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            blocks.extend(module.blocks)
        elif isinstance(module, BertEncoder):
            blocks.extend(module.layer)
    return blocks


def shard_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None) -> nn.Module:
    """Shard `model` (already on `device`) in place over all ranks with FSDP2.

    `param_dtype` (e.g. bf16) is the dtype parameters are gathered and computed in; gradients
    are reduced and kept in fp32. Parameters must be built identically on every rank.
    """
    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    scalars = {p for p in model.parameters() if p.ndim == 0}  # FSDP2 shards along dim 0 only
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    return model


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters FSDP left whole (their gradients are not reduced by FSDP)."""
    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP2's `no_sync`: with enabled=False, backward accumulates unsharded local gradients."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@torch.no_grad()
def sync_replicated_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over ranks (one all_reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    flat /= torch_dist.get_world_size()
    for grad, value in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(value.view_as(grad))


@torch.no_grad()
def clip_sharded_grads(params: list[nn.Parameter], max_norm: float | None, device: torch.device) -> Tensor:
    """Total gradient 2-norm over sharded (DTensor) and replicated gradients, as a plain tensor
    equal on every rank; with `max_norm`, gradients are scaled down to it as clip_grad_norm_."""
    sharded = [p.grad for p in params if isinstance(p.grad, DTensor)]
    plain = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    norms = [nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []
    norms += [nn.utils.get_total_norm(plain)] if plain else []
    if not norms:
        return torch.zeros((), device=device)
    norm = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm is not None:
        nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ----------------------------------------------------------------------------- checkpoints


def save_dcp_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                        ckpt_dir: Path, step: int, keep_last: int) -> Path:
    """Write `ckpt_dir/step_{step:08d}.dcp/` (a collective: every rank calls it)."""
    distributed = torch_dist.is_initialized()
    rank = torch_dist.get_rank() if distributed else 0
    tmp = [tmp_checkpoint_dir(ckpt_dir, step) if rank == 0 else None]
    if distributed:
        torch_dist.broadcast_object_list(tmp, src=0)  # one directory for all ranks
    tmp_dir = Path(tmp[0])
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp_dir)
    except Exception as err:
        raise CheckpointError(f"could not write checkpoint shards to {tmp_dir}: "
                              f"{type(err).__name__}: {str(err).strip().splitlines()[0]}") from err
    path = ckpt_dir / f"step_{step:08d}.dcp"
    if rank == 0:
        path = publish_checkpoint_dir(tmp_dir, trainer_state, ckpt_dir, step, keep_last)
    if distributed:
        torch_dist.barrier()
    return path


def load_dcp_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a `.dcp` checkpoint into `model` and `optimizer` (sharded or not, any world size);
    returns its trainer state. Every rank calls it; nothing stored in the directory runs."""
    check_dcp_directory(path)  # a refused file stops here, before DCP reads anything
    trainer_state = load_checkpoint_file(path / DCP_TRAINER_STATE)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        load_dcp_state(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load into this model ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0]}); check the model sizes in the "
                              "config against the checkpoint's config in trainer_state.pt") from err
    return trainer_state


def load_full_checkpoint(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a single-file (DDP / single-process) checkpoint into a sharded model and optimizer."""
    names = {param: name for name, param in model.named_parameters()}
    index = [names[p] for group in optimizer.param_groups for p in group["params"]]
    saved = checkpoint["optimizer"]
    optim_state = {
        "state": {index[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_state_dict(model, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
