"""Surgery passes: each removes what it should and leaves the outputs numerically equal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archiver_scripts.surgery import drop_dropout, fold_batchnorm, remove_weight_reparametrizations, run_passes


class Net(nn.Module):
    def __init__(self, legacy: bool) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm if legacy else nn.utils.parametrizations.spectral_norm
        wn = nn.utils.weight_norm if legacy else nn.utils.parametrizations.weight_norm
        self.features = nn.Sequential(sn(nn.Conv2d(3, 8, 3, padding=1)), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.3))
        self.conv2 = wn(nn.Conv2d(8, 8, 3, padding=1))
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 16 * 16, 5))

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.conv2(self.features(x)))))


def make(legacy: bool) -> nn.Module:
    torch.manual_seed(0)
    net = Net(legacy)
    net.train()
    with torch.no_grad():  # a few training-mode passes: spectral norm's u/v and BN stats move
        for _ in range(3):
            net(torch.randn(4, 3, 16, 16))
    for bn in (net.features[1], net.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "legacy-hooks"])
def test_each_pass_is_equivalent_and_counted(legacy):
    net = make(legacy)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        ref = net(x).clone()
    net, changed, _ = remove_weight_reparametrizations(net)
    assert changed == 2
    assert not any(isinstance(h, object) and type(h).__name__ in ("SpectralNorm", "WeightNorm")
                   for m in net.modules() for h in m._forward_pre_hooks.values())
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in net.modules())
    net, dropped, _ = drop_dropout(net)
    assert dropped == 2 and not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in net.modules())
    net, folded, note = fold_batchnorm(net)
    assert folded == 2 and note == "torch.fx"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with torch.inference_mode():
        assert (net(x) - ref).abs().max().item() < 1e-5


def test_run_passes_reports_every_pass():
    lines = []
    net, reports = run_passes(make(False), torch.randn(2, 3, 16, 16), use_channels_last=True, log=lines.append)
    assert [r.name for r in reports] == ["eval", "remove_weight_reparametrizations", "drop_dropout", "fold_batchnorm", "channels_last"]
    assert all(r.max_abs_diff < 1e-5 for r in reports)
    assert reports[-1].changed == 2 and len(lines) == 4


def test_untraceable_model_falls_back_to_sequential_folding():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.body(x)
            return self.body(-x)

    torch.manual_seed(0)
    net = Branchy().eval()
    net.body[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        ref = net(x).clone()
    net, folded, note = fold_batchnorm(net)
    assert folded == 1 and "could not trace" in note
    with torch.inference_mode():
        assert (net(x) - ref).abs().max().item() < 1e-5
