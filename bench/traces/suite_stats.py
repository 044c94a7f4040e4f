#!/usr/bin/python3
"""Prints bench/traces/README.md's table for the given traces or directories.

Usage: /usr/bin/python3 bench/traces/suite_stats.py DIR_OR_TRACE...
"""
import glob
import os
import sys

sys.dont_write_bytecode = True  # nothing written into the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tracegen.stats import HEADER, read_trace, table_row, trace_stats  # noqa: E402


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    paths = []
    for arg in sys.argv[1:]:
        paths += sorted(glob.glob(os.path.join(arg, "*.jsonl"))) if os.path.isdir(arg) else [arg]
    print(HEADER)
    for path in paths:
        name = os.path.basename(path)[:-len(".jsonl")] if path.endswith(".jsonl") else path
        print(table_row(name, trace_stats(read_trace(path))))


if __name__ == "__main__":
    main()
