"""Model surgery before compilation: strip what inference does not need, checked pass by pass.

Passes (in order), each reported with how many places it changed and the max abs difference of the
model's output against the untouched eval-mode model on a sample input:

- `eval`: eval mode (BatchNorm uses running stats, dropout off);
- `remove_weight_reparametrizations`: spectral norm and weight norm, both the parametrization
  form (`torch.nn.utils.parametrizations`) and the legacy hook form, baked into plain weights;
- `drop_dropout`: Dropout modules replaced by Identity;
- `fold_batchnorm`: BatchNorm folded into the preceding convolution (torch.fx; models fx cannot
  trace are folded where a Conv is directly followed by its BatchNorm in a Sequential);
- `channels_last` (optional): weights in channels-last layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


@dataclass
class PassReport:
    name: str
    changed: int
    max_abs_diff: float
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        extra = f" ({self.note})" if self.note else ""
        return f"{self.name}: {self.changed} changed, max abs diff {self.max_abs_diff:.3g}{extra}"


def remove_weight_reparametrizations(model: nn.Module) -> tuple[nn.Module, int, str]:
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    count = 0
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                count += 1
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, SpectralNorm):
                nn.utils.remove_spectral_norm(module, hook.name)
                count += 1
            elif isinstance(hook, WeightNorm):
                nn.utils.remove_weight_norm(module, hook.name)
                count += 1
    return model, count, ""


def drop_dropout(model: nn.Module) -> tuple[nn.Module, int, str]:
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, _DROPOUT):
                setattr(parent, name, nn.Identity())
                count += 1
    return model, count, ""


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int, str]:
    before = _count(model, nn.modules.batchnorm._BatchNorm)
    if before == 0:
        return model, 0, ""
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(model, inplace=False)
        return fused, before - _count(fused, nn.modules.batchnorm._BatchNorm), "torch.fx"
    except Exception as exc:  # models with data-dependent control flow cannot be fx-traced
        count = _fold_sequential(model)
        return model, count, f"fx could not trace ({type(exc).__name__}); folded Sequential conv->bn pairs only"


def channels_last(model: nn.Module) -> tuple[nn.Module, int, str]:
    count = sum(1 for p in model.parameters() if p.dim() == 4)
    return model.to(memory_format=torch.channels_last), count, ""


def run_passes(
    model: nn.Module, sample: torch.Tensor, use_channels_last: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, list[PassReport]]:
    """Apply every pass; returns the new model and one report per pass."""
    model = model.eval()
    with torch.inference_mode():
        reference = _first_tensor(model(sample)).clone()
    passes: list[tuple[str, Callable]] = [
        ("remove_weight_reparametrizations", remove_weight_reparametrizations),
        ("drop_dropout", drop_dropout),
        ("fold_batchnorm", fold_batchnorm),
    ]
    if use_channels_last:
        passes.append(("channels_last", channels_last))
    reports = [PassReport("eval", 1, 0.0)]
    for name, fn in passes:
        with torch.no_grad():
            model, changed, note = fn(model)
        model = model.eval()
        x = sample.contiguous(memory_format=torch.channels_last) if name == "channels_last" else sample
        with torch.inference_mode():
            diff = (_first_tensor(model(x)) - reference).abs().max().item()
        report = PassReport(name, changed, diff, note)
        log(f"  surgery {report.line()}")
        reports.append(report)
    return model, reports


def _count(model: nn.Module, kind: type) -> int:
    return sum(1 for m in model.modules() if isinstance(m, kind))


def _fold_sequential(model: nn.Module) -> int:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    count = 0
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = parent._modules[a], parent._modules[b]
            if any(isinstance(conv, c) and isinstance(bn, n) for c, n in _CONV_BN):
                parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
                count += 1
    return count


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"cannot compare model outputs of type {type(out).__name__}")
