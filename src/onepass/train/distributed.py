"""Data-parallel training on torch.distributed: the process group torchrun sets up, DDP or FSDP2
around the loss module, the rank's share of each step, and collective sums.

Run it with `torchrun --nproc_per_node N -m onepass train CONFIG.yaml`; without torchrun there is
no process group and every function here is the identity of one process.

Two rules make N ranks equal one process with the same global batch:
- the step's loss normaliser (trained tokens, sequences or turns) is summed over every rank
  before any backward pass, and each rank's loss is multiplied by N because DDP and FSDP
  average gradients over ranks where the objective wants their sum;
- every rank runs the same number of forward/backward passes: where a step's micro-batches do
  not divide among the ranks, the short ranks run a padding micro-batch whose loss weights are
  zero (a collective left waiting would hang the job).
"""

from __future__ import annotations

import logging
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

from onepass.compat import ddp_without_buffer_sync, distributed_store
from onepass.errors import OnepassError
from onepass.train.device import default_device

log = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp"]
T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """Where this process stands: rank, world size, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def init(timeout_minutes: float = 30.0) -> Cluster:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU);
    a plain single process gets a one-rank Cluster and no process group."""
    if launched_by_torchrun() and not dist.is_initialized():
        if torch.cuda.is_available():
            device = local_cuda_device()
            torch.cuda.set_device(device)
            # bound now: NCCL then knows its device before the first collective (no guess, no hang)
            dist.init_process_group("nccl", timeout=timedelta(minutes=timeout_minutes), device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_minutes))
    return current()


def local_cuda_device() -> torch.device:
    """This rank's GPU: LOCAL_RANK among the GPUs the process sees. A launcher that shows each rank only
    its own GPU (CUDA_VISIBLE_DEVICES per rank, Slurm's --gpus-per-task) makes that index 0."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def current() -> Cluster:
    """The Cluster of this process (one rank unless a process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Cluster(device=default_device())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = local_cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    return Cluster(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(finished: bool = True) -> None:
    """Leave the process group. A rank that `finished` its work first waits at a barrier for the others,
    so no rank tears down its connections (and its communication threads) while a peer is still
    sending on them; after an error the others may never arrive, so a failing rank leaves at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def end_process(status: int = 0, finished: bool | None = None) -> None:
    """End a torchrun worker: leave the process group (`shutdown`), flush what it printed, and exit at
    once. Past this point the interpreter's own teardown would free the process group's last
    references (device meshes, FSDP state) and its communication threads while the runtime is being
    torn down, which aborted one run in a few ("terminate called without an active exception", rank 0
    or 1, after both had left the group); a worker has nothing left to clean up that the operating
    system does not. `finished`: every rank got here together (default: when `status` is 0)."""
    shutdown(finished=status == 0 if finished is None else finished)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def rank_share(items: Sequence[T], cluster: Cluster) -> tuple[list[T], int]:
    """This rank's items (i, i + N, i + 2N, ...) and how many padding passes it must add so that
    every rank runs the same number of passes."""
    mine = list(items[cluster.rank::cluster.world_size])
    most = -(-len(items) // cluster.world_size)
    return mine, most - len(mine)


def all_reduce_sum(values: Sequence[float], cluster: Cluster) -> list[float]:
    """Element-wise sum over ranks (float64, so counts and losses add exactly as in one process)."""
    if not cluster.is_distributed:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64,
                          device=cluster.device if cluster.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast(value: T, cluster: Cluster) -> T:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not cluster.is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=cluster.device if cluster.device.type == "cuda" else None)
    return box[0]


def agree_on_error(error: str | None, cluster: Cluster) -> str | None:
    """The first rank's error message (or None when every rank succeeded), on every rank: a
    collective step that failed on one rank then fails on all with the same message."""
    if not cluster.is_distributed:
        return error
    errors: list[str | None] = [None] * cluster.world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def barrier(cluster: Cluster) -> None:
    if cluster.is_distributed:
        dist.barrier()


_main_first_calls = itertools.count()  # every rank enters main_first the same number of times


@contextlib.contextmanager
def main_first(cluster: Cluster, poll_seconds: float = 0.2, notice_seconds: float = 300.0) -> Iterator[None]:
    """Run the block in three waves: rank 0, then the first rank of every other machine, then the
    rest; e.g. rank 0 fills the prepared-data cache, and where machines do not share it, each
    machine fills its own once. A wave starts when every rank of the waves before it has left the
    block, even by raising.

    The waiting ranks poll a counter in the process group's key-value store instead of sitting in a
    collective barrier, so preparing a large dataset may take longer than the process group's
    timeout (an NCCL barrier would abort the job). If rank 0 dies instead, torchrun stops every rank.
    A waiting rank says every `notice_seconds` what it waits for."""
    if not cluster.is_distributed:
        yield
        return
    call = next(_main_first_calls)
    wave = 0 if cluster.rank == 0 else 1 if cluster.local_rank == 0 else 2
    waves: list[int] = [0] * cluster.world_size
    dist.all_gather_object(waves, wave)  # how many ranks each wave has (no assumption about machine sizes)
    store = distributed_store()
    started = time.monotonic()
    noticed = started
    for earlier in range(wave):
        key, expected = f"onepass/main_first/{call}/{earlier}", waves.count(earlier)
        while store.add(key, 0) < expected:
            time.sleep(poll_seconds)
            if time.monotonic() - noticed >= notice_seconds:
                noticed = time.monotonic()
                log.info(f"rank {cluster.rank}: waiting for rank 0 to prepare the data "
                         f"({(noticed - started) / 60:.0f} min so far)")
    try:
        yield
    finally:
        store.add(f"onepass/main_first/{call}/{wave}", 1)


def parallelize(module: torch.nn.Module, cluster: Cluster, strategy: Strategy,
                find_unused_parameters: bool = False, bf16: bool = False) -> torch.nn.Module:
    """Wrap the loss module for data parallelism: DDP (replicated weights, all-reduced gradients) or
    FSDP2 (`fully_shard` per decoder layer and at the root: sharded parameters, gradients and
    optimizer state; with `bf16`, parameters are gathered and computed in bf16 while the sharded
    master weights, the gradient reduction and the optimizer stay fp32). One process without a
    process group trains the module as it is."""
    if not cluster.is_distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are identical everywhere; not syncing them in forward keeps forward free
        # of collectives, so evaluation can run on each rank's own share. Gradients live in the
        # all-reduce buckets (no second copy); find_unused_parameters for models whose forward skips
        # parameters (mixture-of-experts routing).
        return DistributedDataParallel(module, gradient_as_bucket_view=True,
                                       find_unused_parameters=find_unused_parameters, **ddp_without_buffer_sync())
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(cluster.device.type, (cluster.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root keeps its parameters (embeddings, final norm, output layer) gathered from forward to
    # backward: the output layer's gradient arrives there (made in forward by the fused loss, or from
    # chunks recomputed in backward for soft-capped heads), and the embeddings' follows it. Its inputs
    # are not cast: the policy's default would walk into the Batch and round its fp32 loss weights
    # (1/25 → 0.0400390625 in bf16) under sequence and turn normalisation.
    root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                       cast_forward_inputs=False)
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=root_policy)
    return module


def loads_weights(cluster: Cluster, strategy: Strategy) -> bool:
    """Whether this rank reads the model's weights from disk: under FSDP2 only rank 0 does; the others
    build the model on the meta device and receive their shards from it (`receive_weights`), so a
    machine with N ranks holds one full copy of the weights while loading, not N."""
    return not (cluster.is_distributed and strategy == "fsdp") or cluster.is_main


def loading_device(cluster: Cluster, strategy: Strategy) -> torch.device:
    """Where this rank loads the model. Under FSDP2 on GPUs, rank 0 reads the whole model into CPU memory,
    not onto one GPU (a model that needs sharding does not fit on one): `fully_shard` moves it to the GPU
    one decoder layer at a time as it shards it."""
    if cluster.is_distributed and strategy == "fsdp" and cluster.device.type == "cuda":
        return torch.device("cpu")
    return cluster.device


def receive_weights(module: torch.nn.Module, rank0_state: dict[str, torch.Tensor] | None, cluster: Cluster) -> None:
    """After `parallelize` under FSDP2: each rank's shards of rank 0's weights (`rank0_state`, the
    module's state dict taken before sharding; None elsewhere), and rank 0's buffers, including those
    not in a state dict (rotary frequency tables)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not cluster.is_main:
        module.to_empty(device=cluster.device)
    set_model_state_dict(module, rank0_state if cluster.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found by the classes transformers marks `_no_split_modules`."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    layers = [sub for sub in module.modules() if type(sub).__name__ in names]
    if not layers:
        raise OnepassError(f"strategy: fsdp found no decoder layers to shard in {type(module).__name__} (no "
                           "_no_split_modules). Fix: use strategy: ddp for this model.")
    return layers


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """DDP: skip the gradient all-reduce for all but the last micro-batch of a step (each rank holds
    whole gradients anyway). FSDP2 reduce-scatters after every micro-batch: skipping it would hold
    the whole model's unsharded fp32 gradients on every rank across the step, which is what
    sharding is there to avoid."""
    if enabled or not dist.is_initialized() or not hasattr(module, "no_sync"):
        yield
    else:
        with module.no_sync():
            yield


def gradient_scale(cluster: Cluster) -> float:
    """DDP and FSDP average gradients over ranks; the objective is a sum, so each rank's loss is
    scaled by N before backward."""
    return float(cluster.world_size) if cluster.is_distributed else 1.0


def full_value(tensor: torch.Tensor) -> float:
    """A float from a (possibly sharded) scalar, e.g. the gradient norm under FSDP."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return float(tensor)


def report_error(message: str, cluster: Cluster) -> None:
    """Print a user error once for the whole job: the first rank to fail prints it (ranks stopped by
    the same error stay quiet), using the process group's own key-value store."""
    first = True
    if cluster.is_distributed:
        try:
            first = distributed_store().add("onepass/errors_reported", 1) == 1
        except Exception:  # the store went away with rank 0: better twice than never
            first = True
    if first:
        log.error(f"error: {message}")
