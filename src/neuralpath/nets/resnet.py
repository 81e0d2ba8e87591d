"""A CIFAR ResNet of the paper family (arXiv 2110.03403 treats skip connections in the path view).

    x (n, 3, 32, 32) -> conv 3x3 (width) -> [BasicBlock] x blocks[0] -> [BasicBlock, stride 2, 2 x width] x blocks[1]
      -> ... -> global average pooling -> dense out_dim

BasicBlock: conv 3x3 -> (BN) -> ReLU -> conv 3x3 -> (BN) -> + shortcut -> ReLU; the shortcut is the identity, or a
1x1 projection (stride 2) where the shape changes. ``blocks=(2, 2, 2, 2), width=64`` is ResNet-18's CIFAR layout.
``bn=False`` (the default for training here) leaves batch norm out: the path view needs every layer to be a fixed
linear map given the gates, which batch statistics are not; ``bn=True`` adds BatchNorm layers that from_module reads
in eval mode (a per-channel scale and a bias unit). Its deep gated network is ``neuralpath.from_module(net, x)``,
and its NPK is exact in closed form (the identity paths and the block's paths add).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1, bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.proj = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not bn) if (stride != 1 or c_in != c_out) else None

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.proj is None else self.proj(x)))


class CifarResNet(nn.Module):
    def __init__(self, blocks=(1, 1, 1), width=16, in_channels=3, out_dim=10, bn=False):
        super().__init__()
        self.config_ = dict(blocks=list(blocks), width=width, in_channels=in_channels, out_dim=out_dim, bn=bn)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=not bn)
        self.stem_bn = nn.BatchNorm2d(width) if bn else nn.Identity()
        layers, c = [], width
        for s, n in enumerate(blocks):
            c_out = width * 2**s
            for b in range(n):
                layers.append(BasicBlock(c, c_out, stride=2 if (s > 0 and b == 0) else 1, bn=bn))
                c = c_out
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, out_dim)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(self.pool(x), 1))
