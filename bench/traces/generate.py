#!/usr/bin/python3
"""Writes the eviction trace suite: one Mooncake-format trace per shape.

Usage: /usr/bin/python3 bench/traces/generate.py --out DIR [--seed N]
       [--scale F] [--shapes a,b] [--labels DIR] | --list
Each line of DIR/<shape>.jsonl is {"timestamp": ms, "input_length": tokens,
"output_length": tokens, "hash_ids": [...]} with 512-token blocks; the same
seed gives the same bytes. --labels writes, line for line, what each request
is (session, turn, kind, ...) for tests and analysis; the traces themselves
carry nothing beyond Mooncake's fields. The models and their sources:
bench/traces/README.md.
"""
import argparse
import json
import os
import random
import sys

sys.dont_write_bytecode = True  # nothing written into the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tracegen.shapes import SHAPES  # noqa: E402

DEFAULT_SEED = 15


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)  # a reader never sees half a trace


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for <shape>.jsonl")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the hour each trace covers (0.1: test-sized)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset")
    parser.add_argument("--labels", help="directory for <shape>.labels.jsonl")
    parser.add_argument("--list", action="store_true", help="print the shape names and exit")
    args = parser.parse_args()
    if args.list:
        print(";".join(SHAPES))  # a CMake list
        return
    if not args.out:
        parser.error("--out is required")
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not 0.0 < args.scale <= 10.0:
        parser.error("unknown shape(s) %s (known: %s)" % (",".join(unknown), ",".join(SHAPES))
                     if unknown else "--scale must be in (0, 10]")
    os.makedirs(args.out, exist_ok=True)
    if args.labels:
        os.makedirs(args.labels, exist_ok=True)
    for name in shapes:
        # One stream per shape: adding or changing a shape leaves the others' bytes.
        rng = random.Random("%d/%s" % (args.seed, name))
        requests, labels = SHAPES[name](rng, args.scale).encode()
        write_jsonl(os.path.join(args.out, name + ".jsonl"), requests)
        if args.labels:
            write_jsonl(os.path.join(args.labels, name + ".labels.jsonl"), labels)


if __name__ == "__main__":
    main()
