"""The model class of test archives; copied as model.py into eager-mode archives."""

import torch
from torch import nn


class TinyClassifier(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear; big weights so classes separate clearly."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=5, stride=4, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
