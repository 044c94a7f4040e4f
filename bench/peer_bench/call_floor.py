"""Where a batch-1 call's time goes: each system's control round trip alone
(a lookup of one stored key) next to a put and a get of one value.

    run.sh call_floor.py --node_binary=build/cachenode/kvstrata-node [--value_bytes=65536]

The lookup is kvstrata's gRPC Lookup, Mooncake's `is_exist` (one master RPC)
and Redis's EXISTS: what a call costs before any value moves. Put and get
minus that floor is the data path (kvstrata: the UCX transfer the node
drives; Mooncake: its master's allocate/commit RPCs plus the TCP transfer;
Redis: the value through its socket). Medians of `--calls` calls, the three
systems alternating call by call so load from other work hits them alike
(each system then idles while the other two work, as a cache does between an
engine's steps), or with --back_to_back one system's calls after another.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import content  # noqa: E402
import systems  # noqa: E402
from clients import connect  # noqa: E402


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--node_binary", default=os.environ.get("KVSTRATA_NODE"))
    p.add_argument("--value_bytes", type=int, default=64 << 10)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--back_to_back", action="store_true",
                   help="all of one system's calls, then the next system's (no alternation)")
    args = p.parse_args()
    capacity = 256 << 20
    servers = [systems.start_kvstrata(args.node_binary, capacity),
               systems.start_mooncake(systems.find_mooncake_master(None), capacity),
               systems.start_redis(systems.find_redis(None), capacity)]
    try:
        adapters = [connect(s.spec, args.value_bytes, 1) for s in servers]
        times = {(a.name, op): [] for a in adapters for op in ("lookup", "put", "get")}
        for a in adapters:
            content.fill_random(a, 1)
            content.stamp(a, 0, 1)
            assert a.put([1]) == 1, a.name
        if args.back_to_back:
            order = [(i, a) for a in adapters for i in range(args.calls)]
        else:
            order = [(i, a) for i in range(args.calls) for a in adapters]
        for i, a in order:
            if True:
                t = time.perf_counter()
                assert a.exists_prefix([1]) == 1, a.name
                times[(a.name, "lookup")].append(time.perf_counter() - t)
                content.stamp(a, 0, i + 2)
                t = time.perf_counter()
                assert a.put([i + 2]) == 1, a.name
                times[(a.name, "put")].append(time.perf_counter() - t)
                t = time.perf_counter()
                assert a.get([i + 2]) == [True], a.name
                times[(a.name, "get")].append(time.perf_counter() - t)
                assert content.is_right(a, 0, 0, i + 2), a.name
        print("| system | lookup p50 us | put p50 us | get p50 us | put - lookup | get - lookup |")
        print("| --- | --- | --- | --- | --- | --- |")
        for a in adapters:
            lookup, put, get = (median(times[(a.name, op)]) * 1e6 for op in ("lookup", "put", "get"))
            print("| %s | %.0f | %.0f | %.0f | %.0f | %.0f |" % (
                a.name, lookup, put, get, put - lookup, get - lookup))
        for a in adapters:
            a.close()
    finally:
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
