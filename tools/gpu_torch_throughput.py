"""PyTorch's throughput of resnext50_32x4d at 224x224 on a CUDA GPU, the figure
tools/gpu_run.sh sets beside resnext-rs's.

    python3 tools/gpu_torch_throughput.py MODE BATCH PRECISION

MODE: eval (no_grad) or train (forward, backward, SGD with momentum); PRECISION: fp32
(TF32 off) or bf16 (autocast to bfloat16). cuDNN's benchmark mode is on. Prints one line,
the images per second (median of 10 after 3 warm-up steps) in NCHW and in channels_last:
`NCHW | CHANNELS_LAST`.
"""

import contextlib
import sys
import time

import torch
import torchvision


def images_per_second(mode, batch, precision, channels_last):
    if precision == "bf16":
        amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        amp = contextlib.nullcontext
    m = torchvision.models.resnext50_32x4d().cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.arange(batch, device="cuda") % 1000
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    m.train(mode == "train")
    times = []
    for _ in range(13):
        torch.cuda.synchronize()
        t = time.time()
        if mode == "train":
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            loss.item()
        else:
            with torch.no_grad(), amp():
                m(x).float().cpu()
        torch.cuda.synchronize()
        times.append(time.time() - t)
    times = sorted(times[3:])
    del m, x, opt
    torch.cuda.empty_cache()
    return batch / times[len(times) // 2]


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("eval", "train") or sys.argv[3] not in ("fp32", "bf16"):
        sys.exit("usage: gpu_torch_throughput.py eval|train BATCH fp32|bf16")
    mode, batch, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rates = [images_per_second(mode, batch, precision, cl) for cl in (False, True)]
    print(" | ".join(f"{r:.1f}" for r in rates))


if __name__ == "__main__":
    main()
