#!/usr/bin/env python3
"""Compare two `make all` output folders (e.g. before and after a refactor, both made with the
same OUT and BIN paths, which the outputs record): every safetensors file tensor by tensor and
metadata value by value (the header's key order may differ), every other file byte by byte.
`toy/report.json` records toy-lm's wall time, so it always differs. Needs only Python's
standard library.

usage: scripts/compare-outputs.py OUT_A OUT_B
"""
import json
import os
import struct
import sys


def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), data[a:b])
    return meta, out


def main(a, b):
    files_a = sorted(os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs)
    files_b = sorted(os.path.relpath(os.path.join(r, f), b) for r, _, fs in os.walk(b) for f in fs)
    if files_a != files_b:
        print("file lists differ:", sorted(set(files_a) ^ set(files_b)))
        return 1
    bad = 0
    counts = {"safetensors": 0, "bytes": 0}
    for rel in files_a:
        pa, pb = os.path.join(a, rel), os.path.join(b, rel)
        if rel.endswith(".safetensors"):
            (ma, ta), (mb, tb) = tensors(pa), tensors(pb)
            counts["safetensors"] += 1
            if ta != tb or ma != mb:
                print(f"DIFFERENT tensors or metadata values: {rel}")
                bad += 1
        else:
            counts["bytes"] += 1
            if open(pa, "rb").read() != open(pb, "rb").read():
                print(f"DIFFERENT bytes: {rel}")
                bad += 1
    print(f"{len(files_a)} files: {counts['safetensors']} safetensors (tensors and metadata values), "
          f"{counts['bytes']} byte-compared; {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
