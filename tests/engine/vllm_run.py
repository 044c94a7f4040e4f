"""One vLLM engine process for the engine tests: greedy tokens for given prompts.

    python vllm_run.py --model DIR --prompts prompts.json --out result.json \
        [--node HOST:PORT | --nodes A,B,C] [--cache-block-tokens 64] [--extra JSON]

Runs vLLM's offline API (LLM.generate) on its CPU platform, with the engine
core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, unless the caller
sets it) so the scheduler's and the worker's connector objects can be read
after the run. Writes JSON:
{"tokens": [[...], ...], "scheduler": stats, "worker": stats, "degraded": bool}.
Without --node/--nodes the engine runs without a connector (the reference).
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--node")
    parser.add_argument("--nodes")
    parser.add_argument("--cache-block-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--extra", default="{}", help="more kv_connector_extra_config, JSON")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="vLLM's own prefix cache on (off by default: hits must be kvstrata's)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    kwargs = {}
    if args.node or args.nodes:
        # lookup_timeout 1 s, not the default 100 ms: CI's 2 shared cores can stall
        # a lookup round that long, and a miss here would be the machine's, not
        # the connector's (the deadline is tested in connector_test.py).
        extra = {"cache_block_tokens": args.cache_block_tokens, "ucx_transports": "tcp",
                 "lookup_timeout": 1.0}
        if args.nodes:
            extra["nodes"] = args.nodes.split(",")
        else:
            extra["node"] = args.node
        extra.update(json.loads(args.extra))
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvstrataConnector",
            "kv_connector_module_path": "kvstrata.vllm_connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        }
    began = time.monotonic()
    # enable_prefix_caching off by default: every hit must come from kvstrata,
    # not from vLLM's own cache of an earlier prompt in this process.
    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", max_model_len=2048,
              block_size=args.block_size, enforce_eager=True, max_num_seqs=4,
              enable_prefix_caching=args.prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
              seed=0, **kwargs)
    started = time.monotonic() - began
    with open(args.prompts) as f:
        prompts = json.load(f)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, detokenize=False,
                            ignore_eos=True)
    outputs = []
    ttft = []
    for prompt in prompts:  # one at a time: the second engine's lookups see all of the first's saves
        t = time.monotonic()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        ttft.append(time.monotonic() - t)
        outputs.append(list(out[0].outputs[0].token_ids))
    result = {"tokens": outputs, "startup_s": started, "request_s": ttft}
    # With VLLM_ENABLE_V1_MULTIPROCESSING=1 (vLLM's default) the connectors
    # live in the engine-core process: only the tokens are readable here.
    if kwargs and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group
        worker = get_kv_transfer_group()
        worker.wait_for_save()
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler.connector
        scheduler.wait_for_hints(10)
        result["worker"] = dict(worker.stats)
        result["scheduler"] = dict(scheduler.stats)
        result["degraded"] = scheduler.degraded
        result["layouts"] = {name: [layout.kv, layout.kernel_block_tokens, layout.ratio,
                                    layout.heads, layout.head_size, str(layout.dtype)]
                             for name, layout in worker._layouts.items()}
    with open(args.out, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # the engine's threads would otherwise keep the process up


if __name__ == "__main__":
    main()
