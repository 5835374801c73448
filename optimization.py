"""The optimizer and its schedule: SGD (fused on CUDA, BatchNorm's biases in a group of their own if asked) and the
OneCycle lr and momentum as functions of the step."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from device_utils import fused_sgd_available


def make_optimizer(model, lr, momentum=0.9, weight_decay=5e-4, nesterov=False, bn_bias_lr_scale=1.0):
    """SGD; on CUDA the fused kernel (one launch for every parameter, and it takes the lr as a device tensor).

    With `bn_bias_lr_scale` K other than 1, BatchNorm's biases form a second group at K times the lr and 1/K the
    weight decay, so that their decay per step stays the others' (airbench's bias scaler). The first group holds
    every other parameter; each group's lr is its peak.
    """
    fused = {"fused": True} if fused_sgd_available(next(model.parameters()).device) else {}  # older SGDs lack the flag
    groups = [{"params": list(model.parameters())}]
    if bn_bias_lr_scale != 1:
        biases = [module.bias for module in model.modules()
                  if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.bias is not None]
        scaled = {id(bias) for bias in biases}
        groups = [{"params": [p for p in model.parameters() if id(p) not in scaled]},
                  {"params": biases, "lr": lr * bn_bias_lr_scale, "weight_decay": weight_decay / bn_bias_lr_scale}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **fused)


@dataclass(frozen=True)
class OneCycle:
    """Every step's lr, and its momentum with `momenta`, as a function of the step alone: torch's OneCycleLR
    computed in its own order (cosine; the peak at 30 % of the steps; from peak / 25 up, then down to peak / 250,000),
    written into the optimizer before each step (`apply_to`). A resume needs only the step, and a longer --epochs
    on resume costs nothing."""

    total_steps: int
    peaks: tuple  # each parameter group's peak lr
    momenta: tuple = None  # (low, high): the momentum cycles against the lr, high at the ends, low at the lr's peak
    WARM_UP, START_DIVISOR, END_DIVISOR = 0.3, 25.0, 1e4

    @classmethod
    def for_optimizer(cls, optimizer, total_steps, momenta=None):
        """Each group peaking at the lr it was made with."""
        return cls(total_steps, tuple(float(group["lr"]) for group in optimizer.param_groups), momenta)

    def phase(self, step):
        """(0 while the lr rises, 1 after; the share of that phase done) at 0-based `step`."""
        peak_step = float(self.WARM_UP * self.total_steps) - 1
        if step <= peak_step:
            return 0, step / peak_step
        return 1, (step - peak_step) / (self.total_steps - 1 - peak_step)

    def lrs(self, step):
        phase, done = self.phase(step)
        ends = [(peak / self.START_DIVISOR, peak, peak / self.START_DIVISOR / self.END_DIVISOR) for peak in self.peaks]
        return [cosine(start, peak, done) if phase == 0 else cosine(peak, end, done) for start, peak, end in ends]

    def momentum(self, step):
        phase, done = self.phase(step)
        low, high = self.momenta
        return cosine(high, low, done) if phase == 0 else cosine(low, high, done)

    def apply_to(self, optimizer, step):
        """Put `step`'s lr (and momentum) in the optimizer; a graphed step's lr tensor is filled in place."""
        for group, lr in zip(optimizer.param_groups, self.lrs(step)):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            if self.momenta is not None:
                group["momentum"] = self.momentum(step)


def cosine(start, end, done):
    """From `start` to `end` along half a cosine as `done` goes from 0 to 1 (OneCycleLR's arithmetic, to the bit)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * done) + 1)
