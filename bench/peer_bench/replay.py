"""The trace replay: each request of a Mooncake trace slice against one system.

As `kvstrata replay --live` does (tools/live_replay.cc), per request: look up
the request's block keys (the longest stored prefix), get that prefix, put
the rest (what the engine computed). One client, requests back to back, in a
spawned process like the table's clients. Block ids are the trace's hash ids
+ 1 (0 is no key); every fetched block is checked as in the table.
"""
import json
import multiprocessing
import time

import content
from clients import close_quietly, connect

TOKENS_PER_BLOCK = 512  # the Mooncake trace's block (cachenode's kTraceTokensPerBlock)


def load_trace(path, requests):
    trace = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            trace.append((record["input_length"], [h + 1 for h in record["hash_ids"]]))
            if len(trace) == requests:
                break
    return trace


def distinct_blocks(trace):
    return len({h for _, ids in trace for h in ids})


def replay_client(spec, trace, block_bytes, results):
    outcome = {"error": None}
    adapter = None
    try:
        longest = max(len(ids) for _, ids in trace)
        adapter = connect(spec, block_bytes, longest)
        content.fill_random(adapter, longest)
        hit_blocks = total_blocks = hit_tokens = total_tokens = 0
        refused = wrong = mismatches = 0
        latencies = []
        start = time.perf_counter()
        for input_length, ids in trace:
            t = time.perf_counter()
            prefix = adapter.exists_prefix(ids)
            fetched = 0
            if prefix:
                content.clear_destination(adapter, prefix)
                found = adapter.get(ids[:prefix])
                while fetched < prefix and found[fetched]:
                    fetched += 1
                if fetched < prefix:
                    mismatches += 1  # evicted between the lookup and the get
                for slot in range(fetched):
                    # Blocks are put from the slot of their position in the
                    # request, and a hash id has one position in the trace.
                    if not content.is_right(adapter, slot, slot, ids[slot]):
                        wrong += 1
            rest = ids[fetched:]
            if rest:
                for slot, key_id in enumerate(rest):
                    content.stamp(adapter, fetched + slot, key_id)
                parents = [ids[fetched + i - 1] if fetched + i > 0 else None
                           for i in range(len(rest))]
                refused += len(rest) - adapter.put(rest, parents, first_slot=fetched)
            latencies.append(time.perf_counter() - t)
            hit_blocks += fetched
            total_blocks += len(ids)
            hit_tokens += min(fetched * TOKENS_PER_BLOCK, input_length)
            total_tokens += input_length
        seconds = time.perf_counter() - start
        latencies.sort()
        outcome.update({
            "requests": len(trace), "seconds": seconds, "requests_per_s": len(trace) / seconds,
            "block_hit_rate": hit_blocks / total_blocks, "token_hit_rate": hit_tokens / total_tokens,
            "refused": refused, "wrong": wrong, "lookup_get_mismatches": mismatches,
            "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)] * 1e3,
        })
    except Exception as e:
        outcome["error"] = "%s replay: %s: %s" % (spec["system"], type(e).__name__, e)
    finally:
        close_quietly(adapter)
    results.put(outcome)


def run_replay(spec, trace, block_bytes, timeout):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=replay_client, args=(spec, trace, block_bytes, results))
    worker.start()
    try:
        outcome = results.get(timeout=timeout)
    finally:
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()
    if outcome["error"]:
        raise RuntimeError(outcome["error"])
    return outcome
