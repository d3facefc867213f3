#!/usr/bin/env python3
"""An independent safetensors reader, standard library only (what ecss-extract's test checks
its files with): parses the header as the format's specification says, checks that the data
offsets match each shape and cover the data exactly, and prints JSON, one entry per tensor:
{"NAME": {"dtype": ..., "shape": [...], "bits": [...]}, "__metadata__": {...}} where "bits" are
the elements' raw little-endian values as unsigned integers (so a float's exact bits).
Exits 1 with a message for a file that breaks the format."""
import json
import struct
import sys

SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
         "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}


def main(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        sys.exit(f"{path}: shorter than the header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        sys.exit(f"{path}: header length {length} beyond the file")
    header = json.loads(data[8:8 + length].decode("utf-8"))
    body = data[8 + length:]
    out = {"__metadata__": header.pop("__metadata__", {})}
    spans = []
    for name, entry in header.items():
        size = SIZES[entry["dtype"]]
        count = 1
        for d in entry["shape"]:
            count *= d
        begin, end = entry["data_offsets"]
        if end - begin != count * size:
            sys.exit(f"{path}: {name}: offsets do not match its shape")
        spans.append((begin, end, name))
        raw = body[begin:end]
        bits = list(struct.unpack(f"<{count}{UNSIGNED[size]}", raw)) if count else []
        out[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "bits": bits}
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            sys.exit(f"{path}: {name}: a gap or an overlap before it")
        at = end
    if at != len(body):
        sys.exit(f"{path}: the tensors do not cover the data section")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
