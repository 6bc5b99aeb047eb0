#!/usr/bin/env python3
"""Converts the UCI handwritten digits, as scikit-learn's wheel ships them
(sklearn/datasets/data/digits.csv.gz: 1,797 rows of 64 pixel values 0..16 and a label),
into datasets/data/digits.bin, the embedded default dataset.

    pip install scikit-learn
    python tools/make_digits.py

Format of digits.bin (little-endian):
    8 bytes   magic b"DIGITS01"
    4 bytes   u32 number of samples N
    N * 65    per sample: 64 pixel bytes (8x8, row-major, values 0..16), 1 label byte (0..9)

Source: E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine
Learning Repository, https://doi.org/10.24432/C50P49, licensed CC BY 4.0.
"""
import gzip
import os
import struct

import sklearn

src = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "digits.csv.gz")
rows = [list(map(float, line.split(","))) for line in gzip.open(src, "rt") if line.strip()]
assert len(rows) == 1797 and all(len(r) == 65 for r in rows), "unexpected digits.csv.gz layout"
out = bytearray(b"DIGITS01" + struct.pack("<I", len(rows)))
for r in rows:
    px = [int(v) for v in r[:64]]
    assert all(0 <= v <= 16 for v in px)
    label = int(r[64])
    assert 0 <= label <= 9
    out += bytes(px) + bytes([label])
dst = os.path.join(os.path.dirname(__file__), "..", "datasets", "data", "digits.bin")
with open(dst + ".tmp", "wb") as f:
    f.write(out)
os.replace(dst + ".tmp", dst)
print(dst, len(out), "bytes")
