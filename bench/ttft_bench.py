#!/usr/bin/python3
"""Time to first token with and without kvstrata, on the tiny engine (torch CPU).

For each prompt length: a local prefill without any cache (the baseline), a
prefill worker that computes the prompt and publishes it through
KvstrataConnector, then a decode worker (its own engine and client) that loads
the prefix from the node and computes only the rest. Prints each TTFT and the
ratio local / cached, measured in this run against the same node. The column
cached_nolayer_s is the decode worker loading every layer before computing
(layerwise_load=false); load_wait_s / nolayer_wait_s are the time each spent
blocked in the connector's load path (the part of the load not overlapped).

    PYTHONPATH=build/client/python /usr/bin/python3 bench/ttft_bench.py \
        --node_binary=build/cachenode/kvstrata-node

The model has random weights (seed 1234, kvstrata.examples.tiny_llm.TinyConfig).
Prompt lengths are 1000..16000: not multiples of the 256-token cache block, so
the decode worker computes the prompt's tail (length mod 256) itself.
"""
import argparse
import os
import statistics
import sys
import time

import torch

from kvstrata.examples.tiny_llm import TinyConfig, TinyEngine, TinyLM, connector_config, make_prompt
from kvstrata.testing import NodeProcess


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node", help="address of a running node; default: start one")
    parser.add_argument("--node_binary", default=os.environ.get("KVSTRATA_NODE"))
    parser.add_argument("--dram_bytes", type=int, default=1 << 30)
    parser.add_argument("--prompt_tokens", default="1000,2000,4000,8000,16000")
    parser.add_argument("--cache_block_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="cached runs per length (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--ucx_transports", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    node = None
    address = args.node
    if address is None:
        node = NodeProcess(args.node_binary, dram_bytes=args.dram_bytes)
        address = node.address
    try:
        run(args, address)
    finally:
        if node is not None:
            node.stop()


def run(args, address):
    cfg = TinyConfig()
    model = TinyLM(cfg)
    lengths = [int(x) for x in args.prompt_tokens.split(",")]
    blocks = max(lengths) // cfg.block_size + 4
    config = connector_config(address, cfg, args.cache_block_tokens,
                              ucx_transports=args.ucx_transports)
    local = TinyEngine(model, blocks)
    prefill = TinyEngine(model, blocks, config)
    decode = TinyEngine(model, blocks, config)
    # The same decode worker, but loading every layer before computing any.
    flat = TinyEngine(model, blocks, connector_config(address, cfg, args.cache_block_tokens,
                                                      ucx_transports=args.ucx_transports,
                                                      layerwise_load=False))
    # Warm-up: first-call costs (oneDNN kernels, UCX endpoints, staging registration).
    warm = make_prompt(cfg, 600, 999)
    local.generate(warm)
    prefill.generate(warm)
    decode.generate(warm)
    flat.generate(warm)

    print("tiny engine: %d layers, hidden %d, %d heads (%d KV) x %d, fp32, random weights (seed %d); "
          "engine blocks %d tokens, cache blocks %d; torch threads %d; node %s"
          % (cfg.num_layers, cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.seed,
             cfg.block_size, args.cache_block_tokens, args.threads, address))
    print("%7s %9s %13s %9s %10s %16s %13s %7s %9s %9s %7s" % (
        "tokens", "local_s", "prefill+pub_s", "cached_s", "load_wait_s", "cached_nolayer_s",
        "nolayer_wait_s", "loaded", "fetch_MiB", "identical", "ratio"))
    ratios = []
    for n in lengths:
        prompt = make_prompt(cfg, n, 100 + n)
        baseline = local.generate(prompt)
        published = prefill.generate(prompt)
        runs, waits, flat_runs, flat_waits = [], [], [], []
        for _ in range(args.repeats):
            stats = decode.worker_connector.stats
            before, waited = stats["fetched_bytes"], stats["load_wait_s"]
            runs.append(decode.generate(prompt))
            fetched = stats["fetched_bytes"] - before
            waits.append(stats["load_wait_s"] - waited)
            waited = flat.worker_connector.stats["load_wait_s"]
            flat_runs.append(flat.generate(prompt))
            flat_waits.append(flat.worker_connector.stats["load_wait_s"] - waited)
        cached_ttft = statistics.median(r["ttft"] for r in runs)
        flat_ttft = statistics.median(r["ttft"] for r in flat_runs)
        identical = (torch.equal(runs[0]["logits"][0], baseline["logits"][0]) and
                     torch.equal(flat_runs[0]["logits"][0], baseline["logits"][0]))
        ratio = baseline["ttft"] / cached_ttft
        ratios.append(ratio)
        print("%7d %9.3f %13.3f %9.3f %11.4f %16.3f %14.4f %7d %9.1f %9s %6.1fx"
              % (n, baseline["ttft"], published["ttft"], cached_ttft, statistics.median(waits),
                 flat_ttft, statistics.median(flat_waits), runs[0]["loaded_tokens"],
                 fetched / (1 << 20), identical, ratio))
        sys.stdout.flush()
        if runs[0]["loaded_tokens"] == 0 or not identical:
            raise SystemExit("FAIL: the cached run loaded nothing or its logits differ")
    print("ratio local/cached TTFT: %s" % ", ".join("%.1fx" % r for r in ratios))


if __name__ == "__main__":
    main()
