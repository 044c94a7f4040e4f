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

--precision adds a row set on a prefix a precision tier transcoded (issue 20):
a node of its own (--precision_dram_bytes, 16 MiB in 1 MiB slabs, LRU, an
NVMe tier so a block the tier evicts is still there), bf16 paged caches, and
namespaces with coarsest_format=int4_kivi. The prefill worker publishes the
prompt; the decode worker loads it while it is raw (raw-cached); then filler
blocks of another namespace with the same budget are published
(--precision_filler_tiers DRAM tiers' worth), which under LRU pushes the
prompt's blocks down the ladder, and the decode worker loads it again
(transcoded-cached: the connector's
transcoded_blocks counts the layer-blocks that came back coarser than raw,
from result.formats). Prints TTFT recomputed (no cache) / raw-cached /
transcoded-cached, the formats loaded, and the max abs logit difference of
each against the recomputed run (raw-cached must be 0: bf16 bytes round
trip exactly) and whether the greedy token is the same.

--vllm adds a row set measured with a real vLLM engine on CPU (vLLM importable:
run it in tests/engine/setup_venv.sh's virtualenv): a 4-layer random-weight
Llama made with transformers, three engine processes against the same node
(no connector: the baseline; one that prefills and publishes; a fresh one
that loads, and one that loads with async_load), TTFT as the latency of a 1-token greedy request (median of --repeats), and the
scheduler's lookup latency per request (p50/p99, hits and misses) next to
the node's raw Lookup latency for the same key count, in the same run.

    PYTHONPATH=build/client/python tests/engine/run_in_venv.sh bench/ttft_bench.py \
        --node_binary=build/cachenode/kvstrata-node --vllm [--vllm_only]
"""
import argparse
import os
import shutil
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
    parser.add_argument("--precision", action="store_true",
                        help="also the transcoded-prefix row set (precision tiers)")
    parser.add_argument("--precision_only", action="store_true",
                        help="only the transcoded-prefix row set")
    parser.add_argument("--precision_prompt_tokens", default="1000,4000")
    parser.add_argument("--precision_dram_bytes", type=int, default=16 << 20)
    parser.add_argument("--precision_budget", default="int4_kivi")
    parser.add_argument("--precision_filler_tiers", type=float, default=2.5,
                        help="filler published after the raw-cached runs, in DRAM tiers' worth")
    parser.add_argument("--vllm", action="store_true", help="also the real-vLLM row set")
    parser.add_argument("--vllm_only", action="store_true", help="only the real-vLLM row set")
    parser.add_argument("--vllm_prompt_tokens", default="1000,2000,4000")
    parser.add_argument("--vllm_worker", help=argparse.SUPPRESS)  # internal: one engine process
    args = parser.parse_args()
    if args.vllm_worker:
        return vllm_worker(args)
    torch.set_num_threads(args.threads)
    node = None
    address = args.node
    if address is None:
        node = NodeProcess(args.node_binary, dram_bytes=args.dram_bytes)
        address = node.address
    try:
        if not args.vllm_only and not args.precision_only:
            run(args, address)
        if args.precision or args.precision_only:
            run_precision(args)
        if args.vllm or args.vllm_only:
            run_vllm(args, address)
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


# ------------------------------------------------- transcoded-prefix rows

def _stored_formats(client):
    """{format: blocks} over every tier of the node, from Stats."""
    counts = {}
    for entry in client.stats()["formats"]:
        counts[entry["format"]] = counts.get(entry["format"], 0) + entry["blocks"]
    return counts


def run_precision(args):
    import tempfile
    import kvstrata

    if not args.node_binary:
        raise SystemExit("--precision starts its own node: pass --node_binary")
    cfg = TinyConfig()
    model = TinyLM(cfg)
    lengths = [int(x) for x in args.precision_prompt_tokens.split(",")]
    c = args.cache_block_tokens
    blocks = max(lengths) // cfg.block_size + 4
    kv_dtype = torch.bfloat16
    block_bytes = 2 * c * cfg.num_kv_heads * cfg.head_size * 2  # one layer, K and V, bf16
    nvme = tempfile.mkdtemp(prefix="kvstrata-ttft-nvme.")
    node = NodeProcess(args.node_binary, dram_bytes=args.precision_dram_bytes, extra_flags=[
        "--slab_bytes=1048576", "--eviction_policy=lru", "--nvme_dirs=" + nvme,
        "--nvme_capacity_bytes=%d" % (1 << 30)])
    try:
        config = connector_config(node.address, cfg, c, ucx_transports=args.ucx_transports,
                                  dtype="bfloat16", coarsest_format=args.precision_budget)
        local = TinyEngine(model, blocks, kv_dtype=kv_dtype)
        prefill = TinyEngine(model, blocks, config, kv_dtype=kv_dtype)
        decode = TinyEngine(model, blocks, config, kv_dtype=kv_dtype)
        client = kvstrata.Client(node.address, timeout=30.0, ucx_transports=args.ucx_transports)
        # The filler: other prompts' KV blocks (bf16 normal values) under the
        # same budget, published straight through the client (no prefill).
        filler = client.open_namespace(model="ttft-filler", dtype=2, num_layers=1,
                                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_size,
                                       tokens_per_block=c, coarsest_format=args.precision_budget)
        assert filler.block_bytes == block_bytes, filler.block_bytes
        filler_data = torch.randn(16 * block_bytes // 2, generator=torch.Generator().manual_seed(3))
        filler_data = filler_data.to(torch.bfloat16).view(torch.uint8)
        filler_buf = client.register(filler_data)
        filler_state = {"seed": 0}

        def fill(count):
            """Publishes `count` raw filler blocks (16 per call, chained)."""
            for start in range(0, count, 16):
                n = min(16, count - start)
                filler_state["seed"] += 1
                keys = filler.keys(make_prompt(cfg, n * c, 10 ** 6 + filler_state["seed"]))
                filler.publish([(keys[i], keys[i - 1] if i else None, filler_buf, i * block_bytes)
                                for i in range(n)])

        capacity = args.precision_dram_bytes // block_bytes
        local.generate(make_prompt(cfg, 600, 999))  # warm-up: first-call costs
        print("precision tiers: bf16 paged caches, budget %s; node %d MiB DRAM (%d raw blocks of "
              "%d KiB, 1 MiB slabs, LRU) + NVMe; filler: %.1f tiers of another namespace's blocks, same budget"
              % (args.precision_budget, args.precision_dram_bytes >> 20, capacity, block_bytes >> 10,
                 args.precision_filler_tiers))
        print("%7s %9s %9s %9s %9s %12s %-30s %11s %11s %6s" % (
            "tokens", "recomp_s", "raw_s", "transc_s", "ratio", "filler_blk", "layer-blocks loaded",
            "raw_maxdiff", "tr_maxdiff", "argmax"))
        for n in lengths:
            # Half a tier of other blocks first: the prompt lands in a busy tier
            # but without pressure, so the raw-cached rows read it raw. (Into
            # a full tier, leases by bytes may transcode it at once: the kept
            # coarser copies of older blocks take fresh places behind it.)
            fill(capacity // 2)
            prompt = make_prompt(cfg, n, 200 + n)
            layer_blocks = (n // c) * cfg.num_layers
            recomputed = local.generate(prompt)
            prefill.generate(prompt)
            stats = decode.worker_connector.stats
            decode.generate(prompt)  # warm-up (UCX endpoints, staging), loads it raw
            before = stats["transcoded_blocks"]
            raw_runs = [decode.generate(prompt) for _ in range(args.repeats)]
            if stats["transcoded_blocks"] != before:
                raise SystemExit("FAIL: the raw-cached run loaded transcoded blocks")
            # Filler: under LRU the prompt's blocks become victims after about a
            # tier's worth, are transcoded a rung down, take a fresh lease, and
            # so on to the budget, then go to NVMe keeping their format.
            filled = int(args.precision_filler_tiers * capacity)
            fill(filled)
            before = stats["transcoded_blocks"]
            decode.worker_connector.loaded_formats.clear()
            tr_runs = [decode.generate(prompt) for _ in range(args.repeats)]
            transcoded = (stats["transcoded_blocks"] - before) // args.repeats
            loaded = " ".join("%s:%d" % (f, k // args.repeats) for f, k in
                              sorted(decode.worker_connector.loaded_formats.items()))
            raw_ttft = statistics.median(r["ttft"] for r in raw_runs)
            tr_ttft = statistics.median(r["ttft"] for r in tr_runs)
            ref = recomputed["logits"][0]
            raw_diff = float((raw_runs[0]["logits"][0] - ref).abs().max())
            tr_diff = float((tr_runs[0]["logits"][0] - ref).abs().max())
            same = int(torch.argmax(tr_runs[0]["logits"][0])) == int(torch.argmax(ref))
            print("%7d %9.3f %9.3f %9.3f %8.1fx %12d %-30s %11.2e %11.2e %6s"
                  % (n, recomputed["ttft"], raw_ttft, tr_ttft, recomputed["ttft"] / tr_ttft, filled,
                     "%d/%d transcoded %s" % (transcoded, layer_blocks, loaded),
                     raw_diff, tr_diff, "same" if same else "differs"))
            node_formats = " ".join("%s:%d" % kv for kv in sorted(_stored_formats(client).items()))
            print("        logit scale: max abs %.2f; transcoded-cached loaded %d tokens; "
                  "node blocks by format (DRAM+NVMe) %s"
                  % (float(ref.abs().max()), tr_runs[0]["loaded_tokens"], node_formats))
            sys.stdout.flush()
            if raw_diff != 0.0 or raw_runs[0]["loaded_tokens"] == 0:
                raise SystemExit("FAIL: the raw-cached run loaded nothing or its logits differ")
            if transcoded == 0 or tr_runs[0]["loaded_tokens"] == 0:
                raise SystemExit("FAIL: no transcoded block was loaded")
    finally:
        node.stop()
        shutil.rmtree(nvme, ignore_errors=True)


# ------------------------------------------------------------- real vLLM rows

def _percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def vllm_worker(args):
    """One engine process: --vllm_worker=ROLE,MODEL,PROMPTS,OUT (ROLE local, publish,
    cached or async: the connector with async_load)."""
    import json
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # connectors readable here
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    role, model, prompts_file, out = args.vllm_worker.split(",")
    from vllm import LLM, SamplingParams
    kwargs = {}
    if role != "local":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvstrataConnector", "kv_connector_module_path": "kvstrata.vllm_connector",
            "kv_role": "kv_both", "kv_connector_extra_config": {
                "node": args.node, "cache_block_tokens": args.cache_block_tokens,
                "ucx_transports": args.ucx_transports, "async_load": role == "async"}}
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=8192,
              block_size=32, enforce_eager=True, max_num_seqs=1, enable_prefix_caching=False,
              seed=0, **kwargs)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    with open(prompts_file) as f:
        prompts = json.load(f)
    llm.generate([{"prompt_token_ids": prompts["warm"]}], params, use_tqdm=False)
    result = {"ttft": [], "tokens": [], "loaded": []}
    worker = scheduler = None
    if kwargs:
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group
        worker = get_kv_transfer_group()
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler.connector
        scheduler.lookup_seconds.clear()
    # The publisher runs each prompt once (a second run would find it stored);
    # the others `repeats` times, reporting the median.
    repeats = 1 if role == "publish" else prompts["repeats"]
    for prompt in prompts["prompts"]:
        times = []
        for _ in range(repeats):
            before = worker.stats["loaded_tokens"] if worker else 0
            began = time.perf_counter()
            out_ = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            times.append(time.perf_counter() - began)
        result["ttft"].append(statistics.median(times))
        result["tokens"].append(list(out_[0].outputs[0].token_ids))
        result["loaded"].append((worker.stats["loaded_tokens"] - before) if worker else 0)
    if scheduler is not None:
        result["lookups"] = list(scheduler.lookup_seconds)
    with open(out, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # the engine's threads would keep the process up


def run_vllm(args, address):
    import json
    import random
    import subprocess
    import tempfile
    import vllm
    from transformers import LlamaConfig, LlamaForCausalLM
    import kvstrata

    lengths = [int(x) for x in args.vllm_prompt_tokens.split(",")]
    work = tempfile.mkdtemp(prefix="kvstrata-ttft-vllm.")
    model = os.path.join(work, "llama-4l")
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=64, max_position_embeddings=8192)
    LlamaForCausalLM(config).save_pretrained(model)
    r = random.Random(5)
    prompts = {"warm": [r.randrange(1, 4000) for _ in range(300)], "repeats": args.repeats,
               "prompts": [[r.randrange(1, 4000) for _ in range(n)] for n in lengths]}
    prompts_file = os.path.join(work, "prompts.json")
    with open(prompts_file, "w") as f:
        json.dump(prompts, f)

    def engine(role, name):
        out = os.path.join(work, name + ".json")
        argv = [sys.executable, os.path.abspath(__file__), "--node", address,
                "--cache_block_tokens", str(args.cache_block_tokens),
                "--ucx_transports", args.ucx_transports,
                "--vllm_worker", ",".join((role, model, prompts_file, out))]
        with open(os.path.join(work, name + ".log"), "w") as log:
            subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800)
        with open(out) as f:
            return json.load(f)

    local = engine("local", "local")
    publisher = engine("publish", "publisher")
    cached = engine("cached", "consumer")
    asynchronous = engine("async", "consumer-async")
    print()
    print("vLLM %s on CPU: Llama 4 layers, hidden 512, 8 heads (4 KV) x 64, fp32, random weights "
          "(seed 1234); vLLM blocks 32 tokens, cache blocks %d; prefix caching off; node %s"
          % (vllm.__version__, args.cache_block_tokens, address))
    print("%7s %14s %16s %15s %14s %7s %9s %7s" % (
        "tokens", "vllm_local_s", "vllm_publish_s", "vllm_cached_s", "vllm_async_s", "loaded",
        "identical", "ratio"))
    for i, n in enumerate(lengths):
        same = (local["tokens"][i] == cached["tokens"][i] == publisher["tokens"][i]
                == asynchronous["tokens"][i])
        print("%7d %14.3f %16.3f %15.3f %14.3f %7d %9s %6.1fx" % (
            n, local["ttft"][i], publisher["ttft"][i], cached["ttft"][i], asynchronous["ttft"][i],
            cached["loaded"][i], same, local["ttft"][i] / cached["ttft"][i]))
        if not same or cached["loaded"][i] == 0 or asynchronous["loaded"][i] != cached["loaded"][i]:
            raise SystemExit("FAIL: the cached vLLM run loaded nothing or answered differently")
    # Scheduler lookups (one concurrent round over every layer's namespace)
    # against the node's raw Lookup of the same number of keys.
    blocks = max(1, (max(lengths) - 1) // args.cache_block_tokens)
    client = kvstrata.Client(address, ucx_transports=args.ucx_transports)
    ns = client.open_namespace(model="ttft-raw-lookup", tokens_per_block=args.cache_block_tokens,
                               block_bytes=4096)
    keys = ns.keys(list(range(blocks * args.cache_block_tokens)))
    raw = []
    for _ in range(200):
        began = time.perf_counter()
        ns.lookup(keys)
        raw.append(time.perf_counter() - began)
    hits = [s for s, hit in cached.get("lookups", []) if hit]
    misses = [s for s, hit in publisher.get("lookups", []) if not hit]
    print("scheduler lookup per request, ms (p50 / p99): cached %.2f / %.2f (%d), uncached "
          "%.2f / %.2f (%d); node Lookup of %d keys, one namespace: %.3f / %.3f (200)" % (
              1e3 * _percentile(hits, 0.5), 1e3 * _percentile(hits, 0.99), len(hits),
              1e3 * _percentile(misses, 0.5), 1e3 * _percentile(misses, 0.99), len(misses),
              blocks, 1e3 * _percentile(raw, 0.5), 1e3 * _percentile(raw, 0.99)))


if __name__ == "__main__":
    main()
