#!/usr/bin/env python3
"""Writes resnext-train/data/imagenet_classes.txt: the 1000 ImageNet-1k class names in
torchvision's index order (from the metadata torchvision ships with its weights enums;
no download)."""
import os

import torchvision

names = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1.meta["categories"]
assert len(names) == 1000
dst = os.path.join(os.path.dirname(__file__), "..", "resnext-train", "data", "imagenet_classes.txt")
with open(dst, "w") as f:
    f.write("\n".join(names) + "\n")
print(dst)
