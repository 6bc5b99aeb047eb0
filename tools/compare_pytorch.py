#!/usr/bin/env python3
"""Side-by-side throughput of resnext-rs and PyTorch on this machine, same thread count.

    /tmp/torchenv/bin/python tools/compare_pytorch.py [--threads 2] [--iters 5] [--quick]

Builds and runs `throughput` from resnext-bench for each configuration, measures the same
configuration in PyTorch (torchvision's models, `torch.set_num_threads`), and prints a
Markdown table of images/s, the ratio and peak memory. Not used by the tests or CI.
"""
import argparse
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

CONFIGS = [
    ("resnext50_32x4d", 8, 224, "eval"),
    ("resnext50_32x4d", 1, 224, "eval"),
    ("resnext50_32x4d", 8, 224, "train"),
    ("resnet50", 8, 224, "eval"),
    ("resnext29_8x64d", 32, 32, "eval"),
]


def torch_model(arch):
    if arch == "resnext29_8x64d":
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from make_fixtures import Block, stage  # noqa: E402

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
                self.bn1 = torch.nn.BatchNorm2d(64)
                self.layer1 = stage(64, 512, 256, 1, 8, 3)
                self.layer2 = stage(256, 1024, 512, 2, 8, 3)
                self.layer3 = stage(512, 2048, 1024, 2, 8, 3)
                self.fc = torch.nn.Linear(1024, 10)

            def forward(self, x):
                x = F.relu(self.bn1(self.conv1(x)))
                x = self.layer3(self.layer2(self.layer1(x)))
                return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

        return Net(), 10
    return getattr(torchvision.models, arch)(), 1000


def torch_ips(arch, batch, size, mode, iters):
    model, classes = torch_model(arch)
    x = torch.randn(batch, 3, size, size)
    y = torch.arange(batch) % classes
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def step():
        if mode == "eval":
            model.eval()
            with torch.no_grad():
                model(x)
        else:
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return batch / times[len(times) // 2]


def ours(arch, batch, size, mode, iters, threads):
    classes = "10" if arch.startswith("resnext29") else "1000"
    out = subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "resnext-bench", "--bin", "throughput", "--", "--arch", arch, "--batch", str(batch),
         "--size", str(size), "--mode", mode, "--iters", str(iters), "--threads", str(threads), "--classes", classes],
        check=True, capture_output=True, text=True).stdout.splitlines()
    ips = float(out[-1].split()[-1])
    mem = next((float(l.split()[-1]) for l in out if l.startswith("peak_rss_mb")), float("nan"))
    return ips, mem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="only resnext50_32x4d eval and train at batch 8")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    configs = CONFIGS[:3] if a.quick else CONFIGS
    print(f"torch {torch.__version__}, {a.threads} threads\n")
    print("| model | batch | size | mode | resnext-rs img/s | PyTorch img/s | ratio | resnext-rs peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, batch, size, mode in configs:
        ips, mem = ours(arch, batch, size, mode, a.iters, a.threads)
        tps = torch_ips(arch, batch, size, mode, a.iters)
        print(f"| {arch} | {batch} | {size} | {mode} | {ips:.2f} | {tps:.2f} | {ips / tps:.2f} | {mem:.0f} |", flush=True)
    print(f"\nPyTorch process peak RSS (all configs): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
