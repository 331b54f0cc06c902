"""Several processes with torch.distributed, as started by `torchrun --nproc_per_node K`.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op or an identity,
so one code path serves one process and many. Rank 0 alone writes outputs, checkpoints
and MLflow runs; every rank holds the data and computes the same loss.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

from stages.lib.cli import UserError, log


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def setup(device_type):
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); return this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        log(f"distributed: rank {rank()} of {world()} on {device}")
    return device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(batch_size, what):
    """This rank's share of a global batch; the batch must split evenly."""
    if batch_size % world():
        raise UserError(f"params.yaml: {what} = {batch_size}: must be divisible by the {world()} processes")
    return batch_size // world()


def wrap(model, device, sync_batchnorm):
    """DistributedDataParallel around model (SyncBatchNorm first when asked and on CUDA)."""
    if world() == 1:
        return model
    if sync_batchnorm and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_batchnorm:
        log("distributed: SyncBatchNorm needs CUDA; BatchNorm statistics stay per process on the CPU")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def gather(tensor):
    """Concatenate every rank's (b, ...) tensor along dim 0 -> (world * b, ...), gradients included."""
    if world() == 1:
        return tensor
    return torch.cat(all_gather(tensor), dim=0)


def any_rank(flag, device):
    """True on every rank when any rank's flag is true (e.g. a signal reached one of them)."""
    if world() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world() == 1:
        return [obj]
    objects = [None] * world()
    dist.all_gather_object(objects, obj)
    return objects


def barrier():
    if world() > 1:
        dist.barrier()


def main_only(context):
    """`context` on rank 0; elsewhere a stand-in whose methods do nothing."""
    return context if is_main() else contextlib.nullcontext(_Silent())


class _Silent:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None
