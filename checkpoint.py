"""A run's state out to a checkpoint and back in: the snapshot and its finite check, the random generators, the
restore that checks each part against this run, and `load_model`. The files themselves are run_dir.py's."""
import contextlib
import random
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from device_utils import get_device, on_main_rank
from launch import launch_record
from model import build_model
from report import describe_error
from checkpoint_file import CHECKPOINT_FORMAT, NUMBER, CheckpointError, is_a, load_checkpoint, new_run_id
from train_step import NonFiniteLossError


@dataclass
class RunState:
    """Where a run stands; with the model, optimizer and schedule, what a checkpoint restores."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps of the next epoch already done, after an interrupt
    epoch_totals: dict = None  # that partial epoch's running sums, added over ranks
    best_top1: float = 0.0
    history: list = field(default_factory=list)  # one metrics row per epoch
    run_id: str = field(default_factory=new_run_id)  # the same in every checkpoint of one run, through resumes


def unwrap_model(model):
    """The plain module under torch.compile and DistributedDataParallel, so saved keys have no prefixes."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def check_state_is_finite(run):
    """A finite loss can hide diverged BatchNorm statistics: check every float tensor, the weight average's too,
    before anything is saved."""
    models = [unwrap_model(run.model)] + ([run.average.model] if run.average is not None else [])
    floats = [tensor for model in models for tensor in model.state_dict().values() if tensor.is_floating_point()]
    if not torch.stack([tensor.isfinite().all() for tensor in floats]).all():
        epoch = run.state.epoch + (1 if run.state.step else 0)
        raise NonFiniteLossError(f"the weights or BatchNorm statistics became NaN or infinite in epoch {epoch}")
    if run.loss_scale is not None and not run.loss_scale.is_usable(run.loss_scale.scale):
        raise NonFiniteLossError(f"the fp16 loss scale became {float(run.loss_scale.scale):g}: the gradients "
                                 f"overflowed step after step ({run.loss_scale.describe()})")


def save_checkpoint(run, is_best):
    """Snapshot the run's whole state to host memory now, for the run folder to write in the background
    (a collective: every rank calls it, rank 0 writes, and every rank stops if its last write failed).
    A diverged state is never written: the previous checkpoint stays."""
    check_state_is_finite(run)
    rng_states = gather_rng_states(run.runtime)
    if run.run_dir is not None:
        on_main_rank(run.runtime, lambda: run.run_dir.save(checkpoint_of(run, rng_states), is_best))


def checkpoint_of(run, rng_states):
    state = run.state
    return snapshot_to_host({
        "format": CHECKPOINT_FORMAT, "model_config": run.config.model_config,
        "model": unwrap_model(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
        "ema": run.average.model.state_dict() if run.average is not None else None,
        "loss_scale": run.loss_scale.state_dict() if run.loss_scale is not None else None,
        "scheduler": {"last_epoch": state.epoch * run.train_loader.steps_per_epoch + state.step},
        "epoch": state.epoch, "step": state.step,
        "epoch_totals": state.epoch_totals, "best_top1": state.best_top1,
        "early_stopping": run.early_stopping.state_dict(), "history": list(state.history),
        "args": asdict(run.config), "rng": rng_states, "val_split": split_fingerprint(run.val_loader),
        "run_id": state.run_id, "train_data": training_data(run.train_loader), "launch": launch_record(),
    })


def snapshot_to_host(value):
    """A copy of every tensor in `value` in host memory, taken now, so training can go on changing the originals."""
    devices = set()  # the GPUs copied from, each waited for before the copies are read

    def copy(item):
        if isinstance(item, torch.Tensor):
            if item.device.type != "cuda":
                return item.detach().clone()
            devices.add(item.device)
            host = torch.empty(item.shape, dtype=item.dtype, pin_memory=True)
            return host.copy_(item.detach(), non_blocking=True)
        if isinstance(item, dict):
            return {key: copy(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(copy(entry) for entry in item)
        return item

    result = copy(value)
    for device in devices:
        torch.cuda.synchronize(device)
    return result


def split_fingerprint(val_loader):
    return val_loader.fingerprint if val_loader is not None else None


def training_data(train_loader):
    return {"images": len(train_loader.labels), "fingerprint": getattr(train_loader, "fingerprint", "")}


def check_same_training_data(checkpoint, path, train_loader):
    """A resume on other training images (another --data-dir, a changed file) is named as such, not as a schedule
    that does not fit."""
    saved, now = checkpoint.get("train_data"), training_data(train_loader)
    if saved is not None and saved != now:
        raise CheckpointError(f"{path} was trained on other data: {saved['images']} training images (fingerprint "
                              f"{saved['fingerprint']}), this run has {now['images']} (fingerprint "
                              f"{now['fingerprint']}); resume it on the data it was trained on, or start a new run")


def check_same_split(checkpoint, path, val_loader):
    """A resumed run must hold out the very images it held out before, or its validation history means nothing."""
    saved, now = checkpoint.get("val_split"), split_fingerprint(val_loader)
    if "val_split" in checkpoint and saved != now:
        raise CheckpointError(f"{path} was trained with another validation split (fingerprint {saved}, now {now}): "
                              f"the training images or the split's code have changed")


def restore(checkpoint, path, parts, steps_per_epoch):
    """Put the plain model, its optimizer and weight average (`parts`) back where `checkpoint` left them, and return
    where the run stands; a part that does not fit is named in one line."""
    with damage_reported(path, "weights"):
        load_weights(parts.model, checkpoint["model"])
    if parts.average is not None:
        with damage_reported(path, "weight average (--ema)"):
            load_weights(parts.average.model, checkpoint["ema"])
    with damage_reported(path, "optimizer state"):
        load_optimizer_state(parts.optimizer, checkpoint["optimizer"])
    if parts.loss_scale is not None and checkpoint.get("loss_scale") is not None:  # else trained in another precision
        with damage_reported(path, "fp16 loss scale"):
            parts.loss_scale.load_state_dict(checkpoint["loss_scale"])
    with damage_reported(path, "schedule"):
        position = schedule_position(checkpoint["scheduler"])
        if position != checkpoint["epoch"] * steps_per_epoch + checkpoint["step"]:
            raise ValueError(f"it stands at step {position}, not at epoch {checkpoint['epoch']} "
                             f"step {checkpoint['step']}")
    if parts.average is not None:
        parts.average.updates.fill_(position)  # one update per step so far
    return RunState(epoch=checkpoint["epoch"], step=checkpoint["step"], epoch_totals=checkpoint.get("epoch_totals"),
                    best_top1=float(checkpoint["best_top1"]), history=list(checkpoint["history"]),
                    run_id=checkpoint.get("run_id") or new_run_id())


def restore_early_stopping(checkpoint, path, early_stopping):
    with damage_reported(path, "early-stopping record"):
        early_stopping.load_state_dict(checkpoint["early_stopping"])
        if not all(is_a(top1, NUMBER) and 0 <= top1 <= 1 for top1 in early_stopping.top1_history):
            raise ValueError("its top-1 values are not all fractions in [0, 1]")


def load_weights(model, weights):
    """`weights` into `model`, each tensor of the type the model holds it in (load_state_dict would cast an integer
    tensor into a float one without a word)."""
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name in expected and tensor.dtype != expected[name].dtype:
            raise ValueError(f"its {name} is {tensor.dtype}, not {expected[name].dtype}")
    model.load_state_dict(weights)


def restore_generators(checkpoint, path, runtime, seed):
    """Every generator as this rank left it; with another number of processes the draws cannot match the old run
    anyway, so the ranks are only kept apart, and rank 0 says so."""
    with damage_reported(path, "random generator states"):
        rng_states = checkpoint["rng"]
        if len(rng_states) == runtime.world_size:
            restore_rng_state(rng_states[runtime.rank])
            return
        seed_everything(seed + 1000 * checkpoint["epoch"] + runtime.rank)
    if runtime.is_main:
        print(f"note: {path} was trained by {len(rng_states)} processes and this run has {runtime.world_size}: it "
              f"goes on, but will not match, bit for bit, the run that kept its number of processes", file=sys.stderr)


@contextlib.contextmanager
def damage_reported(path, part):
    """A part of a checkpoint that does not fit (misshaped weights, a foreign optimizer state) as one line."""
    try:
        yield
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged: its {part} does not fit this run ({describe_error(err)})") from None


def load_optimizer_state(optimizer, state):
    """SGD's state as this run would have written it: the same settings (the scheduled ones numbers), then the
    momentum buffers in their parameters' layouts. The settings OneCycleLR kept in each group, in checkpoints
    written before the schedule was a function of the step, are left out."""
    expected = optimizer.state_dict()["param_groups"]
    groups = state.get("param_groups")
    if isinstance(groups, list) and all(isinstance(group, dict) for group in groups):
        groups = [{key: value for key, value in group.items() if key not in ONE_CYCLE_SETTINGS} for group in groups]
        state = {**state, "param_groups": groups}
    if not isinstance(groups, list) or len(groups) != len(expected) or not isinstance(state.get("state"), dict):
        raise ValueError("it is not this model's SGD state")
    for group, fresh in zip(groups, expected):
        if not isinstance(group, dict) or set(group) != set(fresh):
            raise ValueError(f"its settings are {sorted(group) if isinstance(group, dict) else group}, not SGD's")
        for key, value in fresh.items():
            if key in SCHEDULED:
                if not (is_a(group[key], NUMBER) or isinstance(group[key], torch.Tensor) and group[key].numel() == 1):
                    raise ValueError(f"its {key} is {group[key]!r}, not a number")
            elif key not in THIS_MACHINES and (type(group[key]) is not type(value) or group[key] != value):
                raise ValueError(f"its {key} is {group[key]!r}, where this run's settings give {value!r}")
    optimizer.load_state_dict(state)
    for group, fresh in zip(optimizer.param_groups, expected):
        group.update({key: fresh[key] for key in THIS_MACHINES if key in fresh})
    lr_to_float(optimizer)
    match_parameter_layouts(optimizer)


# Optimizer settings the schedule moves (their value is the checkpoint's), and those this machine chooses (never
# the checkpoint's: a fused kernel exists only on CUDA).
SCHEDULED = ("lr", "momentum")


THIS_MACHINES = ("fused", "foreach", "differentiable", "capturable")
ONE_CYCLE_SETTINGS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")


def lr_to_float(optimizer):
    """A graphed run keeps the lr in a device tensor; checkpoints and other runs see a plain number."""
    for group in optimizer.param_groups:
        group["lr"] = float(group["lr"])


def match_parameter_layouts(optimizer):
    """Loaded momentum buffers come back contiguous; fused SGD needs each in its parameter's (channels_last) layout."""
    for parameter, state in optimizer.state.items():
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            if buffer.shape != parameter.shape:
                raise ValueError(f"a momentum buffer of shape {tuple(buffer.shape)} for a parameter of shape "
                                 f"{tuple(parameter.shape)}")
            state["momentum_buffer"] = torch.empty_like(parameter).copy_(buffer)


def schedule_position(state):
    """The steps a checkpoint's schedule had taken: {"last_epoch": steps}, as torch's schedulers name it, or (written
    before the schedule was a function of the step) OneCycleLR's whole state, read by its position alone."""
    if set(state) != {"last_epoch"} and not {"total_steps", "_schedule_phases", "last_epoch"} <= set(state):
        raise ValueError(f"it holds {sorted(state)}, not the schedule's position")
    if not (is_a(state["last_epoch"], int) and state["last_epoch"] >= 0):
        raise ValueError(f"its position {state['last_epoch']!r} is not a count of steps")
    return state["last_epoch"]


def seed_everything(seed):
    """Seed every generator; `seed` may exceed NumPy's 32 bits (--seed plus a rank or an epoch), which wraps."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def capture_rng_state():
    name, key, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state):
    random.setstate(state["python"])
    name, key, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(runtime):
    """Every rank's generator states, so each rank of a resumed torchrun run draws as it would have."""
    state = capture_rng_state()
    if not runtime.distributed:
        return [state]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, state)
    return states


def model_from_config(config):
    return build_model(config["name"], config["num_classes"], **config["kwargs"])


def model_with_weights(config, weights, device="cpu"):
    """The model `config` describes, holding `weights`, on `device`, channels_last, in eval mode."""
    model = model_from_config(config)
    load_weights(model, weights)
    return model.to(device, memory_format=torch.channels_last).eval()


def model_from_checkpoint(checkpoint, path, device="cpu"):
    """The checkpoint's model with its weights (the averaged ones of an --ema run)."""
    with damage_reported(path, "model"):
        return model_with_weights(checkpoint["model_config"], checkpoint.get("ema") or checkpoint["model"], device)


def load_model(path, device="cpu"):
    """A trained model back from a checkpoint, in eval mode: `load_model("checkpoint/best.pt")`. A device that
    this machine lacks is named as such (DeviceError), not blamed on the checkpoint."""
    device = get_device(device)
    return model_from_checkpoint(load_checkpoint(path), path, device)
