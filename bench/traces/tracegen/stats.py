"""The statistics bench/traces/README.md tabulates for each trace."""
import json

from .blocks import BLOCK_TOKENS


def read_trace(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trace_stats(requests):
    """Requests, distinct blocks, mean blocks per request, the fraction of
    requests whose first block was seen before (they reuse some prefix), and
    the ideal prefix hit rate of an infinite cache: tokens of the blocks
    seen before over all tokens (a seen block implies its whole prefix)."""
    seen, reusing, hit_tokens, tokens, blocks = set(), 0, 0, 0, 0
    for r in requests:
        ids, length = r["hash_ids"], r["input_length"]
        known = 0
        while known < len(ids) and ids[known] in seen:
            known += 1
        reusing += known > 0
        hit_tokens += min(known * BLOCK_TOKENS, length)
        tokens += length
        blocks += len(ids)
        seen.update(ids)
    n = max(1, len(requests))
    return {
        "requests": len(requests),
        "distinct_blocks": len(seen),
        "mean_blocks": blocks / n,
        "reuse_fraction": reusing / n,
        "ideal_hit_rate": hit_tokens / max(1, tokens),
        "mean_input": tokens / n,
        "mean_output": sum(r["output_length"] for r in requests) / n,
        "minutes": (requests[-1]["timestamp"] - requests[0]["timestamp"]) / 60000 if requests else 0,
    }


HEADER = ("| trace | requests | distinct blocks | blocks/request | reuse any prefix "
          "| ideal hit rate | mean input | mean output | minutes |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def table_row(name, s):
    return ("| %s | %d | %d | %.1f | %.2f | %.3f | %.0f | %.0f | %.0f |" %
            (name, s["requests"], s["distinct_blocks"], s["mean_blocks"], s["reuse_fraction"],
             s["ideal_hit_rate"], s["mean_input"], s["mean_output"], s["minutes"]))
