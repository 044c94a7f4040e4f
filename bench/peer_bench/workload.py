"""One point of the put/get table: C client processes against one system.

Each client is its own process (spawned, so no client library state crosses
a fork and Python's GIL serialises nothing between clients). A point has two
phases, each started by all clients together at a barrier and lasting
`seconds`:
- put: batches of fresh keys from the client's source slots. When the keys a
  client has put would pass its share of half the capacity, it deletes them
  (untimed) and goes on, so no system ever evicts during the phase.
- get: the client first puts a working set (untimed, within the same share),
  then fetches it batch by batch in a cycle, and checks every value.
Before the put phase each client warms up (one untimed put and get); after
the get phase the first client clears the system for the next point.
Latency is per call (one batch); throughput is the sum over clients of bytes
moved / time spent inside calls, so the checking between calls (the same for
every system) is not counted against any of them.
"""
import multiprocessing
import time

import content
from clients import close_quietly, connect

# Bounds the get phase's working set, so setting it up stays short at 16 KiB
# (it is already at most half the capacity over all clients).
MAX_WORKING_SET = 2048


def key_share(capacity, value_bytes, batch, clients):
    """Keys one client may hold: half the capacity split evenly, whole batches."""
    per_client = capacity // 2 // clients // value_bytes
    return max(batch, per_client // batch * batch)


def run_client(spec, point, client_index, barrier, results):
    value_bytes, batch, clients = point["value_bytes"], point["batch"], point["clients"]
    outcome = {"put_lat": [], "get_lat": [], "put_bytes": 0, "get_bytes": 0, "put_busy": 0.0,
               "get_busy": 0.0, "put_refused": 0, "get_missed": 0, "wrong": 0, "error": None}
    adapter = None
    try:
        adapter = connect(spec, value_bytes, batch)
        content.fill_random(adapter, batch)
        share = key_share(point["capacity"], value_bytes, batch, clients)
        next_id = (point["index"] + 1) << 44 | client_index << 36

        def fresh_batch():
            nonlocal next_id
            ids = list(range(next_id + 1, next_id + 1 + batch))
            next_id += batch
            for slot, key_id in enumerate(ids):
                content.stamp(adapter, slot, key_id)
            return ids

        # Untimed warm-up: a client's first calls set up its connections
        # (kvstrata's UCX endpoint, Mooncake's TCP connection to the segment).
        warm = fresh_batch()
        adapter.put(warm)
        adapter.get(warm)
        adapter.delete(warm)

        barrier.wait()
        live = []
        end = time.perf_counter() + point["seconds"]
        while time.perf_counter() < end:
            if len(live) + batch > share:
                adapter.delete(live)
                live = []
            ids = fresh_batch()
            t = time.perf_counter()
            stored = adapter.put(ids)
            dt = time.perf_counter() - t
            outcome["put_lat"].append(dt)
            outcome["put_busy"] += dt
            outcome["put_bytes"] += stored * value_bytes
            outcome["put_refused"] += batch - stored
            live.extend(ids)
        adapter.delete(live)

        working = []
        while (len(working) + 1) * batch <= max(batch, min(share, MAX_WORKING_SET)):
            ids = fresh_batch()
            if adapter.put(ids) != batch:
                raise RuntimeError("%s refused part of the get phase's working set" % spec["system"])
            working.append(ids)
        barrier.wait()
        end = time.perf_counter() + point["seconds"]
        turn = 0
        while time.perf_counter() < end:
            ids = working[turn % len(working)]
            turn += 1
            # Each batch was put from slots 0..batch-1 (fresh_batch re-stamps them).
            content.clear_destination(adapter, batch)
            t = time.perf_counter()
            found = adapter.get(ids)
            dt = time.perf_counter() - t
            outcome["get_lat"].append(dt)
            outcome["get_busy"] += dt
            for slot, key_id in enumerate(ids):
                if not found[slot]:
                    outcome["get_missed"] += 1
                elif content.is_right(adapter, slot, slot, key_id):
                    outcome["get_bytes"] += value_bytes
                else:
                    outcome["wrong"] += 1
        adapter.delete([k for ids in working for k in ids])
        # Mooncake refuses to remove values read within its lease (10 s by
        # default): once every client is done, one drops what is left.
        barrier.wait()
        if client_index == 0:
            adapter.clear()
    except Exception as e:  # reported by the parent, which fails the run
        outcome["error"] = "%s client %d: %s: %s" % (spec["system"], client_index,
                                                     type(e).__name__, e)
        barrier.abort()
    finally:
        close_quietly(adapter)
    results.put(outcome)


def percentile(values, fraction):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def run_point(spec, point, timeout):
    """Runs one point; returns {"put": {...}, "get": {...}} or raises on an error."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(point["clients"])
    results = ctx.Queue()
    workers = [ctx.Process(target=run_client, args=(spec, point, i, barrier, results))
               for i in range(point["clients"])]
    for w in workers:
        w.start()
    outcomes = []
    try:
        for _ in workers:
            outcomes.append(results.get(timeout=timeout))
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    errors = [o["error"] for o in outcomes if o["error"]]
    if errors:
        raise RuntimeError("; ".join(errors))
    summary = {}
    for phase in ("put", "get"):
        lat = [x for o in outcomes for x in o[phase + "_lat"]]
        summary[phase] = {
            "gbps": sum(o[phase + "_bytes"] / o[phase + "_busy"] for o in outcomes
                        if o[phase + "_busy"] > 0) / 1e9,
            "p50_us": percentile(lat, 0.50) * 1e6,
            "p99_us": percentile(lat, 0.99) * 1e6,
            "calls": len(lat),
        }
    summary["put"]["refused"] = sum(o["put_refused"] for o in outcomes)
    summary["get"]["missed"] = sum(o["get_missed"] for o in outcomes)
    summary["get"]["wrong"] = sum(o["wrong"] for o in outcomes)
    return summary
