#!/usr/bin/env python3
"""Side-by-side throughput of resnext-rs and PyTorch on the machine it runs on, same thread count.

    python tools/compare_pytorch.py [--threads 2] [--iters 5] [--quick] [--rounds 3]
    python tools/compare_pytorch.py --ops [--threads 2] [--rounds 3] [--op grouped3x3]
    python tools/compare_pytorch.py --torch-profile [--iters 2]
    python tools/compare_pytorch.py --isa avx2 ...   (both sides capped at AVX2 + FMA)

Builds and runs `throughput` from resnext-bench for each configuration, measures the same
configuration in PyTorch (torchvision's models, `torch.set_num_threads`), and prints a
Markdown table of images/s, the ratio and peak memory (each PyTorch configuration runs in
its own process, so its peak is its own). With `--ops`, compares single
convolutions at the stage shapes of resnext50_32x4d instead (`opbench`, GFLOP/s, forward and
backward). `--isa avx2` caps both sides at AVX2 + FMA on an AVX-512 machine (RESNEXT_ISA
for resnext-rs; ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA for PyTorch, set before torch
loads), the stand-in for an AVX2-only CPU. Not used by the tests or CI.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

# before torch loads: its kernels pick their instruction set once
if "--isa" in sys.argv[:-1]:
    _isa = sys.argv[sys.argv.index("--isa") + 1]
    os.environ["RESNEXT_ISA"] = _isa
    if _isa == "avx2":
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"

import torch
import torch.nn.functional as F
import torchvision

# throughput against batch size and image size (`--sweep`)
SWEEP = [("resnext50_32x4d", b, 224, "eval") for b in (1, 8, 32, 64)] + [
    ("resnext50_32x4d", 8, 320, "eval"),
    ("resnext50_32x4d", 8, 224, "train"),
    ("resnext50_32x4d", 32, 224, "train"),
    ("resnext50_32x4d", 8, 320, "train"),
]

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


OP_CONFIGS = [(op, stage, stride) for op in ("grouped3x3",) for stage in (1, 2, 3, 4) for stride in (1, 2) if stage > 1 or stride == 1] + [
    ("1x1", stage, 1) for stage in (1, 2, 3, 4)]


def op_shape(op, stage, stride, batch):
    hw, width = 56 >> (stage - 1), 128 << (stage - 1)
    if op == "grouped3x3":
        return (batch, width, hw * stride, hw * stride), (width, width // 32, 3, 3), dict(stride=stride, padding=1, groups=32)
    return (batch, 2 * width, hw, hw), (width, 2 * width, 1, 1), {}


def torch_gflops(op, stage, stride, pas, batch, iters):
    xs, ws, kw = op_shape(op, stage, stride, batch)
    x = torch.randn(xs, requires_grad=pas == "bwd")
    w = torch.randn(ws, requires_grad=pas == "bwd")
    y = F.conv2d(x, w, **kw)
    macs = y.numel() * ws[1] * ws[2] * ws[3]
    dy = torch.randn_like(y)

    def run():
        if pas == "fwd":
            with torch.no_grad():
                F.conv2d(x, w, **kw)
        else:
            torch.autograd.grad(F.conv2d(x, w, **kw), (x, w), dy)

    run()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    times.sort()
    # backward counts input + weight gradient only (2× the forward), as opbench does
    flops = 2 * macs if pas == "fwd" else 4 * macs
    if pas == "bwd":
        # subtract the forward the autograd call repeats
        t = time.perf_counter()
        for _ in range(iters):
            with torch.no_grad():
                F.conv2d(x, w, **kw)
        fwd = (time.perf_counter() - t) / iters
        return flops / max(times[len(times) // 2] - fwd, 1e-9) / 1e9
    return flops / times[len(times) // 2] / 1e9


def ours_gflops(op, stage, stride, pas, batch, iters, threads):
    out = subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "resnext-bench", "--bin", "opbench", "--", "--op", op, "--stage", str(stage),
         "--stride", str(stride), "--pass", pas, "--batch", str(batch), "--iters", str(iters), "--threads", str(threads)],
        check=True, capture_output=True, text=True).stdout.splitlines()
    return float(out[-1].split()[-1])


def compare_ops(a):
    rounds = max(a.rounds, 1)
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {a.threads} threads, batch {a.batch}, "
          f"{rounds} alternating round(s), medians\n")
    extra = " ratio range |" if rounds > 1 else ""
    print("| op | stage | stride | pass | resnext-rs GFLOP/s | PyTorch GFLOP/s | ratio |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|" if rounds > 1 else ""))
    for op, stage, stride in OP_CONFIGS:
        if a.op and op != a.op:
            continue
        for pas in ("fwd", "bwd"):
            runs = []
            for _ in range(rounds):
                ours_g = ours_gflops(op, stage, stride, pas, a.batch, 4 * a.iters, a.threads)
                torch_g = torch_gflops(op, stage, stride, pas, a.batch, 4 * a.iters)
                runs.append((ours_g, torch_g, ours_g / torch_g))
            ours_g = statistics.median(r[0] for r in runs)
            torch_g = statistics.median(r[1] for r in runs)
            rng = f" {min(r[2] for r in runs):.2f}-{max(r[2] for r in runs):.2f} |" if rounds > 1 else ""
            print(f"| {op} | {stage} | {stride} | {pas} | {ours_g:.1f} | {torch_g:.1f} | {ours_g / torch_g:.2f} |{rng}", flush=True)


def torch_profile(a):
    """PyTorch's own per-op profile of one resnext50_32x4d training step (batch 8, 224),
    to set beside ours (`RESNEXT_PROFILE=1 ... throughput --mode train`)."""
    from torch.profiler import ProfilerActivity, profile

    model, _ = torch_model("resnext50_32x4d")
    model.train()
    x, y = torch.randn(8, 3, 224, 224), torch.arange(8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.iters):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def torch_in_child(arch, batch, size, mode, iters, threads):
    """PyTorch's img/s and peak RSS for one configuration, each in a fresh process so the
    peak belongs to that configuration alone."""
    out = subprocess.run([sys.executable, __file__, "--torch-one", arch, str(batch), str(size), mode, str(iters), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-one":
        arch, batch, size, mode, iters = sys.argv[2:7]
        threads = int(sys.argv[8]) if len(sys.argv) > 8 else 2
        torch.set_num_threads(threads)
        ips = torch_ips(arch, int(batch), int(size), mode, int(iters))
        print(ips, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="only resnext50_32x4d eval and train at batch 8")
    p.add_argument("--sweep", action="store_true",
                   help="resnext50_32x4d at batch 1, 8, 32, 64 and image size 224, 320 instead")
    p.add_argument("--ops", action="store_true", help="single convolutions at the stage shapes instead of networks")
    p.add_argument("--batch", type=int, default=8, help="batch for --ops")
    p.add_argument("--op", choices=sorted({c[0] for c in OP_CONFIGS}), help="only this op with --ops")
    p.add_argument("--torch-profile", action="store_true",
                   help="print PyTorch's per-op profile of a resnext50_32x4d batch-8 training step instead")
    p.add_argument("--isa", choices=["avx512", "avx2"],
                   help="cap both sides at this instruction set (avx2: the stand-in for an AVX2-only CPU)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each network configuration this many times, alternating the two sides, and "
                        "report medians and the range of the per-round ratios (a shared machine's speed can drift by "
                        "10-30%% over minutes, so one pair of runs can mislead)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.ops:
        compare_ops(a)
        return
    if a.torch_profile:
        torch_profile(a)
        return
    configs = SWEEP if a.sweep else CONFIGS[:3] if a.quick else CONFIGS
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {a.threads} threads\n")
    rounds = max(a.rounds, 1)
    extra = " | ratio range" if rounds > 1 else ""
    print(f"| model | batch | size | mode | resnext-rs img/s | PyTorch img/s | ratio{extra} | resnext-rs peak MB | PyTorch peak MB |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if rounds > 1 else ""))
    med = lambda v: sorted(v)[len(v) // 2]
    for arch, batch, size, mode in configs:
        runs = []
        # the same number of images per measurement whatever the batch: a batch-1 pass is
        # short enough that 5 of them time mostly noise
        iters = a.iters * max(1, 8 // batch)
        for _ in range(rounds):
            ips, mem = ours(arch, batch, size, mode, iters, a.threads)
            tps, tmem = torch_in_child(arch, batch, size, mode, iters, a.threads)
            runs.append((ips, tps, ips / tps, mem, tmem))
        ips, tps, ratio = med([r[0] for r in runs]), med([r[1] for r in runs]), med([r[2] for r in runs])
        mem, tmem = max(r[3] for r in runs), max(r[4] for r in runs)
        rng = f" | {min(r[2] for r in runs):.2f}-{max(r[2] for r in runs):.2f}" if rounds > 1 else ""
        print(f"| {arch} | {batch} | {size} | {mode} | {ips:.2f} | {tps:.2f} | {ratio:.2f}{rng} | {mem:.0f} | {tmem:.0f} |", flush=True)


if __name__ == "__main__":
    main()
