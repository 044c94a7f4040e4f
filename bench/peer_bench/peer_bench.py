"""kvstrata against its peers (Mooncake Store, Redis) on loopback, one run.

    peer_bench.py --node_binary=build/cachenode/kvstrata-node      # the full tables
    peer_bench.py --node_binary=... --quick                        # the ctest smoke version

Starts a kvstrata-node, Mooncake Store (mooncake_master + a segment holder)
and a redis-server, each with --capacity_bytes for values, and runs the same
workload against each, point by point, so the three figures of a point are
measured seconds apart: put and get of each value size x batch x
client count (workload.py), then a slice of the Mooncake trace replayed
through each at equal capacity (replay.py). Prints throughput and per-call
p50/p99 per system and point, and kvstrata / peer ratios.

Exit status: 0 done; 1 a system failed or returned wrong bytes; 77 a peer
cannot run here (its package or binary missing: run setup_venv.sh).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import replay  # noqa: E402
import systems  # noqa: E402
import workload  # noqa: E402

SKIP = 77
REPO = os.path.dirname(os.path.dirname(HERE))
SLAB_BYTES = 64 << 20
DEFAULT_TRACE = os.path.join(REPO, "..", "shared", "traces", "mooncake_synthetic_trace.jsonl")


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--node_binary", default=os.environ.get("KVSTRATA_NODE"))
    p.add_argument("--mooncake_master", default=None, help="default: beside this Python")
    p.add_argument("--redis_server", default=None, help="default: redis-server on PATH")
    p.add_argument("--systems", default="kvstrata,mooncake,redis")
    p.add_argument("--value_sizes", type=int_list, default=[16 << 10, 64 << 10, 256 << 10, 1 << 20])
    p.add_argument("--batches", type=int_list, default=[1, 32])
    p.add_argument("--clients", type=int_list, default=[1, 8])
    p.add_argument("--seconds", type=float, default=1.5, help="per phase (put, get) and point")
    # 1 GiB: half of it holds the get phase's working sets of 8 clients at
    # 1 MiB x 32 with room to spare, and three systems at once stay small
    # next to this machine's memory.
    p.add_argument("--capacity_bytes", type=int, default=1 << 30)
    p.add_argument("--trace", default=DEFAULT_TRACE)
    # 2000 requests: 33,310 distinct blocks, of which a third are asked for
    # again; the trace's first hundreds repeat almost nothing.
    p.add_argument("--trace_requests", type=int, default=2000)
    # kvstrata replay --live's default block size.
    p.add_argument("--trace_block_bytes", type=int, default=64 << 10)
    # Capacity for the replay as a fraction of the slice's distinct blocks:
    # small enough that every system must evict (policy_bench uses 5-20% of
    # the whole trace; a 2000-request slice repeats less, so a larger share).
    p.add_argument("--trace_capacity_fraction", type=float, default=0.25)
    p.add_argument("--trace_repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true",
                   help="smoke version: one point (64 KiB x 32, 1 client) and 100 requests")
    args = p.parse_args(argv)
    if args.quick:
        args.value_sizes, args.batches, args.clients = [64 << 10], [32], [1]
        args.seconds, args.trace_requests, args.trace_repeats = 0.3, 100, 1
        args.capacity_bytes = min(args.capacity_bytes, 256 << 20)
    return args


def start_all(args, names, capacity):
    started = {}
    try:
        for name in names:
            if name == "kvstrata":
                started[name] = systems.start_kvstrata(args.node_binary, capacity)
            elif name == "mooncake":
                started[name] = systems.start_mooncake(args.mooncake_master, capacity)
            elif name == "redis":
                started[name] = systems.start_redis(args.redis_server, capacity)
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(started):
    for server in started.values():
        server.stop()


def ratio(a, b):
    return a / b if b and b == b and a == a else float("nan")


def table_header(names):
    peers = [n for n in names if n != "kvstrata"]
    head = ["op", "value", "batch", "clients"]
    for n in names:
        head += ["%s GB/s" % n, "%s p50/p99 us" % n]
    if "kvstrata" in names:
        for n in peers:
            head += ["kvstrata/%s GB/s" % n, "kvstrata/%s p50" % n]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head), flush=True)


def print_rows(point, names):
    peers = [n for n in names if n != "kvstrata"]
    for op in ("put", "get"):
        row = [op, size_text(point["value_bytes"]), str(point["batch"]), str(point["clients"])]
        for n in names:
            r = point["results"][n][op]
            row += ["%.3f" % r["gbps"], "%.0f / %.0f" % (r["p50_us"], r["p99_us"])]
        if "kvstrata" in names:
            k = point["results"]["kvstrata"][op]
            for n in peers:
                r = point["results"][n][op]
                row += ["**%.2f**" % ratio(k["gbps"], r["gbps"]),
                        "%.2f" % ratio(k["p50_us"], r["p50_us"])]
        print("| " + " | ".join(row) + " |", flush=True)


def size_text(n):
    return "%d MiB" % (n >> 20) if n >= 1 << 20 and n % (1 << 20) == 0 else "%d KiB" % (n >> 10)


def run_table(args, names):
    started = start_all(args, names, args.capacity_bytes)
    points, bad = [], []
    try:
        for name, server in started.items():
            print("# %s: %s" % (name, server.version))
        print("# capacity %.0f MiB each; %.1f s per phase and point; p50/p99: per call (one batch)"
              % (args.capacity_bytes / 2**20, args.seconds))
        print()
        table_header(names)
        index = 0
        for value_bytes in args.value_sizes:
            for batch in args.batches:
                for clients in args.clients:
                    point = {"index": index, "value_bytes": value_bytes, "batch": batch,
                             "clients": clients, "seconds": args.seconds,
                             "capacity": args.capacity_bytes, "results": {}}
                    index += 1
                    for name in names:
                        timeout = 120 + 4 * args.seconds
                        result = workload.run_point(started[name].spec, point, timeout)
                        point["results"][name] = result
                        if result["get"]["wrong"] or result["get"]["missed"] or \
                                result["put"]["refused"]:
                            bad.append("%s at %s x %d x %d clients: %d wrong, %d missed, "
                                       "%d puts refused" % (
                                           name, size_text(value_bytes), batch, clients,
                                           result["get"]["wrong"], result["get"]["missed"],
                                           result["put"]["refused"]))
                    points.append(point)
                    print_rows(point, names)
    finally:
        stop_all(started)
    return points, bad


def run_trace(args, names):
    trace = replay.load_trace(args.trace, args.trace_requests)
    distinct = replay.distinct_blocks(trace)
    # Whole 64 MiB units: kvstrata's DRAM tier is carved into slabs of that
    # size and refuses less than one; every system gets the rounded figure.
    wanted = distinct * args.trace_capacity_fraction * args.trace_block_bytes
    capacity = max(1, round(wanted / SLAB_BYTES)) * SLAB_BYTES
    print("\n# trace: %d requests of %s, %d distinct blocks of %s; capacity %.1f MiB "
          "(%.0f%% of the distinct blocks' bytes)" % (
              len(trace), os.path.basename(args.trace), distinct,
              size_text(args.trace_block_bytes), capacity / 2**20,
              100 * capacity / (distinct * args.trace_block_bytes)))
    # Repeats alternate the systems, each on freshly started servers (an
    # empty cache of the same capacity); the fastest repeat of each counts,
    # as other work on the machine only ever slows a repeat down.
    results, every, wrong = {}, {name: [] for name in names}, {name: 0 for name in names}
    for _ in range(args.trace_repeats):
        started = start_all(args, names, capacity)
        try:
            for name in names:
                r = replay.run_replay(started[name].spec, trace, args.trace_block_bytes,
                                      timeout=600)
                every[name].append(r["requests_per_s"])
                wrong[name] += r["wrong"]
                if name not in results or r["requests_per_s"] > results[name]["requests_per_s"]:
                    results[name] = r
        finally:
            stop_all(started)
    for name in names:
        results[name]["every_requests_per_s"] = every[name]
    head = ["system", "requests/s (best of %d)" % args.trace_repeats, "block hit rate",
            "token hit rate", "request p50 / p99 ms", "puts refused", "lookup-then-get misses",
            "kvstrata / system requests/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    k = results.get("kvstrata")
    for name in names:
        r = results[name]
        print("| %s | %.1f | %.3f | %.3f | %.1f / %.1f | %d | %d | %s |" % (
            name, r["requests_per_s"], r["block_hit_rate"], r["token_hit_rate"], r["p50_ms"],
            r["p99_ms"], r["refused"], r["lookup_get_mismatches"],
            "%.2f" % ratio(k["requests_per_s"], r["requests_per_s"]) if k else "-"))
    bad = ["%s replay: %d wrong blocks" % (n, count) for n, count in wrong.items() if count]
    return {"distinct_blocks": distinct, "capacity": capacity, "results": results}, bad


def check_peers(args, names):
    """Why a peer cannot run here, or None."""
    if "mooncake" in names:
        try:
            import mooncake.store  # noqa: F401
        except ImportError as e:
            return "Mooncake Store is not importable (%s): run bench/peer_bench/setup_venv.sh " \
                   "and this script with its Python" % e
        args.mooncake_master = systems.find_mooncake_master(args.mooncake_master)
        if not args.mooncake_master:
            return "mooncake_master not found"
    if "redis" in names:
        try:
            import redis  # noqa: F401
        except ImportError as e:
            return "redis-py is not importable (%s)" % e
        args.redis_server = systems.find_redis(args.redis_server)
        if not args.redis_server:
            return "redis-server not found"
    if "kvstrata" in names:
        try:
            import kvstrata  # noqa: F401
        except ImportError as e:
            return "the kvstrata package is not importable (%s): PYTHONPATH=build/client/python" % e
        if not args.node_binary or not os.access(args.node_binary, os.X_OK):
            return "kvstrata-node not found: --node_binary or $KVSTRATA_NODE"
    return None


def main(argv):
    args = parse_args(argv)
    names = [n for n in args.systems.split(",") if n]
    why = check_peers(args, names)
    if why:
        print("peer_bench: skipped: " + why, file=sys.stderr)
        return SKIP
    points, bad = run_table(args, names)
    trace = None
    if args.trace_requests > 0:
        if os.path.exists(args.trace):
            trace, trace_bad = run_trace(args, names)
            bad += trace_bad
        else:
            print("\n# no trace at %s: the replay table is left out" % args.trace)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"points": points, "trace": trace}, f, indent=1)
    for line in bad:
        print("peer_bench: " + line, file=sys.stderr)
    # A refused put or a miss in the table means a system lost data it had
    # room for; wrong bytes are always a failure.
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
