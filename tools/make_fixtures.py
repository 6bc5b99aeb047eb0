#!/usr/bin/env python3
"""Writes the PyTorch parity fixtures under resnext-core/tests/fixtures/.

Needs torch, torchvision and safetensors from PyPI (never needed by the tests):

    pip install torch torchvision safetensors
    python tools/make_fixtures.py

Two fixtures:

* tiny_*: a small CIFAR-layout ResNeXt written here in PyTorch with torchvision's
  module names, random weights and non-trivial batch-norm statistics, saved with
  `safetensors.torch.save_file(model.state_dict())` (int64 num_batches_tracked
  included). Alongside: an input, eval-mode logits, train-mode logits, the running
  statistics after that train-mode forward, and the gradients of a cross-entropy loss.
* r50_*: torchvision's `resnext50_32x4d` with weights from a deterministic generator
  (splitmix64 seeded by the FNV-1a hash of each tensor's name; the Rust test implements
  the same generator, so the 100 MB of weights need not be committed), eval logits at
  224x224, train-mode logits at 64x64 and a few parameter gradients.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "resnext-core", "tests", "fixtures")
M64 = (1 << 64) - 1


def fnv1a(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h ^= b
        h = (h * 0x100000001B3) & M64
    return h


def gen_uniform(name: str, n: int, lo: float, hi: float) -> np.ndarray:
    """splitmix64(fnv1a(name) + i) -> top 24 bits -> [0, 1) -> [lo, hi), computed in f64."""
    with np.errstate(over="ignore"):
        x = (np.uint64(fnv1a(name)) + np.arange(n, dtype=np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
        z = x
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return (lo + (hi - lo) * u).astype(np.float32)


def gen_range(name: str, shape) -> tuple:
    if name.endswith("running_mean"):
        return (-0.1, 0.1)
    if name.endswith("running_var"):
        return (0.5, 1.5)
    if len(shape) == 1:
        return (0.2, 0.6) if name.endswith("weight") else (-0.1, 0.1)
    fan_in = int(np.prod(shape[1:]))
    a = math.sqrt(6.0 / fan_in) if len(shape) == 4 else 1.0 / math.sqrt(fan_in)
    return (-a, a)


def fill_generated(model: nn.Module):
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if name.endswith("num_batches_tracked"):
                t.zero_()
                continue
            lo, hi = gen_range(name, tuple(t.shape))
            t.copy_(torch.from_numpy(gen_uniform(name, t.numel(), lo, hi)).reshape(t.shape))


class Block(nn.Module):
    """torchvision's Bottleneck, parameterised by (in, width, out, stride, groups)."""

    def __init__(self, cin, width, cout, stride, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s)


def stage(cin, width, cout, stride, groups, blocks):
    return nn.Sequential(Block(cin, width, cout, stride, groups), *[Block(cout, width, cout, 1, groups) for _ in range(blocks - 1)])


class TinyCifar(nn.Module):
    """Rust: ResNeXtCifar<3, 16, Stage<16,32,64,1,4,1>, Stage<64,64,128,2,8,2>, Stage<128,64,256,2,8,1>, Linear<256,10>>"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = stage(16, 32, 64, 1, 4, 1)
        self.layer2 = stage(64, 64, 128, 2, 8, 2)
        self.layer3 = stage(128, 64, 256, 2, 8, 1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny():
    torch.manual_seed(0)
    model = TinyCifar()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(OUT, "tiny_weights.safetensors"))

    x = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([1, 0, 9, 4])
    model.eval()
    with torch.no_grad():
        eval_logits = model(x)
    model.train()
    xg = x.clone().requires_grad_(True)
    train_logits = model(xg)
    loss = F.cross_entropy(train_logits, labels)
    loss.backward()
    io = {
        "input": x,
        "labels": labels.to(torch.float32),
        "eval_logits": eval_logits,
        "train_logits": train_logits.detach(),
        "loss": loss.detach().reshape(1),
        "grad.input": xg.grad,
    }
    for name, p in model.named_parameters():
        io["grad." + name] = p.grad
    for name, b in model.named_buffers():
        if not name.endswith("num_batches_tracked"):
            io["after." + name] = b
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(OUT, "tiny_io.safetensors"))


def r50():
    model = torchvision.models.resnext50_32x4d()
    fill_generated(model)
    x224 = torch.from_numpy(gen_uniform("input", 2 * 3 * 224 * 224, -1.0, 1.0)).reshape(2, 3, 224, 224)
    x64 = torch.from_numpy(gen_uniform("input64", 2 * 3 * 64 * 64, -1.0, 1.0)).reshape(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        eval_logits = model(x224)
    # Train-mode gradients of a deep network through batch norm are ill-conditioned in f32
    # (PyTorch's own f32 gradients here are ~1e-2 off the exact ones), so the reference is
    # computed in float64, and PyTorch's f32 error is stored beside it as the bar to meet.
    names = ["fc.bias", "layer4.2.bn3.weight", "layer3.5.conv2.weight", "layer1.0.conv2.weight", "conv1.weight", "bn1.bias"]
    grads, logits = {}, {}
    for dt in (torch.float64, torch.float32):
        m = torchvision.models.resnext50_32x4d()
        fill_generated(m)
        m = m.to(dt).train()
        out = m(x64.to(dt))
        loss = F.cross_entropy(out, torch.tensor([3, 7]))
        loss.backward()
        params = dict(m.named_parameters())
        grads[dt] = {n: params[n].grad.double() for n in names}
        logits[dt] = (out.detach().double(), loss.detach().double().reshape(1))
    io = {"eval_logits": eval_logits, "train_logits": logits[torch.float64][0].float(), "loss": logits[torch.float64][1].float()}
    for n in names:
        exact, f32 = grads[torch.float64][n], grads[torch.float32][n]
        io["grad." + n] = exact.float()
        io["torch_f32_err." + n] = ((f32 - exact).abs().max() / exact.abs().max()).float().reshape(1)
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(OUT, "r50_io.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    tiny()
    r50()
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))
