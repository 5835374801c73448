"""Choosing the device, mixed precision, and the distributed process group (torchrun)."""
import contextlib
import ctypes
import datetime
import os
import re
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    """A device or distributed set-up the user asked for cannot be had."""


def mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def get_device(preference=None):
    """CUDA, else Apple MPS, else CPU; `preference` ("cuda", "cuda:1", "mps", "cpu") overrides."""
    if preference in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise DeviceError(f"unknown device {preference!r}; use auto, cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {preference!r} was asked for, but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {preference!r} was asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type == "mps":
        if not mps_available():
            raise DeviceError("device 'mps' was asked for, but Apple MPS is not available")
    elif device.type != "cpu":
        raise DeviceError(f"device type {device.type!r} is not supported; use cuda, mps or cpu")
    return device


NATIVE_BF16 = (8, 0)  # the compute capability from which NVIDIA GPUs compute bf16 on their tensor cores (Ampere)

PRECISIONS = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling", "fp32": "fp32"}


def resolve_precision(device, precision="auto"):
    return precision_choice(device, precision)[0]


def precision_choice(device, precision="auto"):
    """(the precision, why auto chose it on a GPU, else None). Auto is bf16 on a CUDA GPU that computes it natively,
    fp16 with loss scaling on an older one (the T4, V100 and RTX 20xx, where bf16 is emulated and fp16 has the tensor
    cores), and fp32 on the CPU and on MPS (whose bf16 needs macOS 14, and whose autocast covers fewer ops). A
    precision asked for is kept."""
    if precision != "auto":
        return precision, None
    if device.type != "cuda":
        return "fp32", None
    name = torch.cuda.get_device_name(device)
    if torch.cuda.get_device_capability(device) >= NATIVE_BF16:
        return "bf16", f"{name} computes bf16 natively"
    return "fp16", f"{name} has no native bf16"


def describe_precision(device, precision="auto"):
    """The precision as a run's header names it, with the reason where auto chose it by the GPU."""
    chosen, reason = precision_choice(device, precision)
    return PRECISIONS[chosen] + (f" ({reason})" if reason else "")


def autocast(device, precision, cache=True):
    """bf16 or fp16 autocast, or nothing; `cache=False` is required while a CUDA graph is being captured."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)
    return contextlib.nullcontext()


def input_dtype(precision):
    """The dtype prepared images are kept in: the half-precision type the model computes in (half the memory)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Runtime:
    """Where this process trains and which rank it is; world_size 1 for a plain `python train.py`."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_runtime(preference=None, timeout_seconds=600):
    """Pick the device; under torchrun (WORLD_SIZE > 1) also join the process group: NCCL on CUDA, gloo on CPU.
    A peer that does not join, or stops answering a collective, fails it after `timeout_seconds`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = get_device(preference)
    if world_size == 1:
        if device.type == "cuda":
            device = use_cuda_device(device.index if device.index is not None else torch.cuda.current_device())
        return Runtime(device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if processes_here > torch.cuda.device_count():
            raise DeviceError(f"{processes_here} processes per node but only {torch.cuda.device_count()} GPU(s): "
                              f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = use_cuda_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DeviceError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {device.type}")
    stop_with_the_launcher()
    timeout = datetime.timedelta(seconds=timeout_seconds)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=attempt_store(rank, world_size, timeout))
    except (RuntimeError, ValueError) as err:  # DistError and its kinds are RuntimeErrors
        raise DeviceError(f"the {world_size} processes did not meet within --dist-timeout {timeout_seconds} s "
                          f"({describe_dist_error(err)}): every node must start the same torchrun command, and "
                          f"reach rank 0's address") from None
    return Runtime(device, rank, world_size)


def attempt_store(rank, world_size, timeout):
    """torchrun's store, seen under a prefix of this attempt's own; None outside torchrun (env:// as usual). After a
    restart (--max-restarts) torch's own set-up reads the failed attempt's keys, and gloo dials a dead process's
    address ("connectFullMesh failed ... Connection refused", torch 2.14 on CPU, a torch-only script too)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    hosted_by_launcher = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not hosted_by_launcher, timeout=timeout)
    return dist.PrefixStore(f"train.py/attempt-{attempt}", store)


def use_cuda_device(index):
    """Make GPU `index` the current one: graph capture, streams and synchronisation without a device argument
    act on the current GPU, so on any other they would capture nothing or wait for the wrong work."""
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def stop_with_the_launcher():
    """Ask Linux to send this worker SIGTERM when the torchrun launcher dies, even by `kill -9`: the worker then
    saves a checkpoint and stops, instead of training on unseen (and holding the run folder) with no launcher."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def teardown_runtime(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor, runtime):
    """Sum a tensor over ranks in place (a no-op in a single process) and return it."""
    if runtime.distributed:
        dist.all_reduce(tensor)
    return tensor


def distribute_model(model, runtime):
    """Wrap in DistributedDataParallel under torchrun; a single process trains the model as it is."""
    if not runtime.distributed:
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast_from_main(tensors, runtime):
    """Overwrite `tensors` on every rank with rank 0's values (a no-op in a single process)."""
    if runtime.distributed:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def on_main_rank(runtime, action, share=False):
    """Run `action` on rank 0 alone and return its result there (on every rank, `share`d, as the checkpoint rank 0
    alone reads); the error it raises, if any, is raised on every rank (a collective under torchrun), so that all
    ranks stop together with the same one-line message."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = action()
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised there
            error = err
    if runtime.distributed:
        shared = [error, result if share else None]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
        result = shared[1] if share else result
    if error is not None:
        error.every_rank_stops = runtime.distributed
        error.shown_by_rank_0 = not runtime.is_main  # the other ranks stop quietly: one line in all
        raise error
    return result


def any_rank(flag, runtime):
    """Whether `flag` holds on any rank (a collective: every rank must call it)."""
    return bool(max_over_ranks(int(flag), runtime))


# What gloo and NCCL say when a collective fails because another process is gone, not through this one's fault.
LOST_PEER_WORDS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "timed out", "Timed out",
                   "remote process exited", "NCCL communicator was aborted")


def describe_lost_peer(error, runtime):
    """What happened, when `error` is a collective that failed because a peer process stopped (killed, its node
    lost, or silent past --dist-timeout); None for any other error."""
    if not runtime.distributed or not (isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(
            word in str(error) for word in LOST_PEER_WORDS)):
        return None
    return f"another process of the {runtime.world_size} stopped ({describe_dist_error(error)})"


def describe_dist_error(error):
    """gloo's and NCCL's message in a few words: the peer's address and what happened, without source paths."""
    text = str(error).split(". This is typically")[0]
    text = re.sub(r"\[[^\]]*\.(cpp|cc|h|hpp):\d+\]\s*", "", text)  # "[../gloo/transport/tcp/pair.cc:545] "
    return " ".join(text.split())[:200]


def leave_together(runtime):
    """At a run's end (after an error or an interrupt every rank stopped on, too): wait for rank 0 to have said
    what it says, then exit alike. torchrun stops the remaining workers the moment one exits with an error; that
    SIGTERM is ignored, as this rank is leaving."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    dist.barrier()


def max_over_ranks(value, runtime):
    """The largest of every rank's `value`, a number (a collective: every rank must call it)."""
    if not runtime.distributed:
        return value
    tensor = torch.tensor([float(value)], device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return type(value)(tensor.item())


# The first torch whose fused SGD reads the lr from a device tensor and whose schedules fill that tensor in place
# (2.3 has the kernel, but its schedules put a number in the tensor's place): the graphed step needs both.
GRAPHED_SGD_TORCH = (2, 4)


def torch_release():
    """(major, minor) of the torch in use."""
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def fused_sgd_available(device):
    return device.type == "cuda" and torch_release() >= GRAPHED_SGD_TORCH
