#!/usr/bin/python3
"""SGLang HiCache L3 throughput: kvstrata vs SGLang's own file backend, same pages.

Builds SGLang's own device KV pool and MHA host pool on CPU (a Llama-3-8B-like
shape by default: 32 layers, 8 KV heads of 128, bf16, 64-token pages), fills
the host pages with random bytes, and times, per backend and per path, writing
`--pages` pages in SGLang's batches, the existence query, and reading them back
into other host slots (checked byte for byte); for kvstrata also rewriting
them after a delete (node memory already faulted in, as on a node that has
run for a while). kvstrata: the zero-copy path
(interface_v1: batch_set_v1/batch_get_v1) and the generic path (flat pages:
batch_set/batch_get); SGLang's HiCacheFile (the built-in `file` backend) has
only the generic path, here on --file_dir.

Runs in the SGLang virtualenv of the tests:

    venv=$(tests/engine/setup_sglang_venv.sh)
    PYTHONPATH=build/client/python UCX_TLS=tcp $venv/bin/python bench/sglang_hicache_bench.py \\
        --node_binary=build/cachenode/kvstrata-node
"""
import argparse
import logging
import os
import shutil
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.ERROR)

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402

from kvstrata.sglang_backend import KvstrataHiCacheStorage  # noqa: E402
from kvstrata.testing import NodeProcess  # noqa: E402


def host_pool(args, layout):
    device = MHATokenToKVPool(args.pages * args.page_size, args.page_size, torch.bfloat16,
                              args.heads, args.head_dim, args.layers, "cpu", False,
                              start_layer=0, end_layer=args.layers)
    info = device.get_device_pool_infos()[0].buffer_info
    # Room for the written pages and a second set to read into.
    return MHATokenToKVPoolHost(info, 2.5, 0, args.page_size, layout, pin_memory=False,
                                device="cpu", device_capacity_tokens=device.size,
                                start_layer=0, end_layer=args.layers)


def config(extra, model):
    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                is_page_first_layout=False, model_name=model, extra_config=extra)


def run(name, storage, pool, keys, args, zero_copy, quiet=False):
    page = args.page_size
    written = pool.alloc(len(keys) * page)
    target = pool.alloc(len(keys) * page)
    batches = range(0, len(keys), args.batch)
    start = time.perf_counter()
    for b in batches:
        ks = keys[b:b + args.batch]
        idx = written[b * page:(b + len(ks)) * page]
        if zero_copy:
            assert all(storage.batch_set_v1(ks, idx)), name
        else:  # what HiCacheController._generic_page_set hands the backend
            assert storage.batch_set(ks, [pool.get_data_page(int(idx[i * page]))
                                          for i in range(len(ks))]), name
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    hits = sum(storage.batch_exists(keys[b:b + args.batch]) for b in batches)
    exists_s = time.perf_counter() - start
    assert hits == len(keys), (name, hits)
    start = time.perf_counter()
    for b in batches:
        ks = keys[b:b + args.batch]
        idx = target[b * page:(b + len(ks)) * page]
        if zero_copy:
            assert all(storage.batch_get_v1(ks, idx)), name
        else:  # HiCacheController._generic_page_get
            got = storage.batch_get(ks, [pool.get_dummy_flat_data_page() for _ in ks])
            for i, data in enumerate(got):
                pool.set_from_flat_data_page(int(idx[i * page]), data)
    read_s = time.perf_counter() - start
    for i in range(len(keys)):
        a = pool.get_data_page(int(written[i * page])).view(torch.uint8)
        b = pool.get_data_page(int(target[i * page])).view(torch.uint8)
        assert torch.equal(a, b), (name, i)
    # The first write into a fresh node faults its DRAM in; a long-running
    # node reuses memory. Delete the blocks and write them again to see that.
    rewrite_s = None
    if isinstance(storage, KvstrataHiCacheStorage):
        kv = storage._pools["kv"]
        namespace = storage._namespace(kv)
        for b in batches:
            namespace.delete(storage._chain(kv, keys[b:b + args.batch], None)[0])
        start = time.perf_counter()
        for b in batches:
            ks = keys[b:b + args.batch]
            idx = written[b * page:(b + len(ks)) * page]
            if zero_copy:
                assert all(storage.batch_set_v1(ks, idx)), name
            else:
                assert storage.batch_set(ks, [pool.get_data_page(int(idx[i * page]))
                                              for i in range(len(ks))]), name
        rewrite_s = time.perf_counter() - start
    pool.free(written)
    pool.free(target)
    if quiet:
        return
    page_bytes = pool.get_dummy_flat_data_page().numel() * 2
    gib = len(keys) * page_bytes / (1 << 30)
    print("| %s | %.1f | %.2f | %s | %.2f | %.0f | %.0f | %.2f |" % (
        name, page_bytes / (1 << 20), gib / write_s,
        "%.2f" % (gib / rewrite_s) if rewrite_s else "-", gib / read_s, len(keys) / write_s,
        len(keys) / read_s, exists_s * 1e3 / len(batches)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--node_binary", default=os.environ.get("KVSTRATA_NODE"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--page_size", type=int, default=64)
    parser.add_argument("--pages", type=int, default=48, help="pages written and read per run")
    parser.add_argument("--batch", type=int, default=128, help="pages per call (SGLang: 128)")
    parser.add_argument("--layouts", default="page_first,layer_first")
    parser.add_argument("--file_dir", default=None, help="HiCacheFile directory (default: a temp dir)")
    args = parser.parse_args()

    keys = get_hash_str(list(range(args.pages * args.page_size)), None, page_size=args.page_size)
    # One untimed batch first: connection set-up, registration, first-touch faults.
    warm = get_hash_str([7] * (args.batch * args.page_size), None, page_size=args.page_size)
    page_mib = 2 * args.layers * args.page_size * args.heads * args.head_dim * 2 / (1 << 20)
    # Each layout writes the pages twice (zero-copy and generic namespaces).
    dram = int(2 * len(args.layouts.split(",")) * (args.pages + args.batch) * page_mib
               * (1 << 20)) + (256 << 20)
    file_dir = args.file_dir or tempfile.mkdtemp(prefix="hicache-file.")
    print("| backend, path, host layout | page MiB | write GiB/s | rewrite GiB/s | read GiB/s "
          "| write pages/s | read pages/s | exists ms/batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with NodeProcess(args.node_binary, dram_bytes=dram) as node:
        for layout in args.layouts.split(","):
            pool = host_pool(args, layout)
            raw = pool.kv_buffer.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
            extra = {"node": node.address, "timeout": 60.0}
            for zero_copy in (True, False):
                storage = KvstrataHiCacheStorage(config(extra, "bench-%s-%d" % (layout, zero_copy)))
                storage.register_mem_pool_host(pool)
                run("", storage, pool, warm, args, zero_copy, quiet=True)
                run("kvstrata, %s, %s" % ("zero-copy" if zero_copy else "generic", layout),
                    storage, pool, keys, args, zero_copy)
            shutil.rmtree(file_dir, ignore_errors=True)
            os.makedirs(file_dir)
            storage = HiCacheFile(config({"file_storage_path": file_dir}, "bench-%s" % layout),
                                  file_path=file_dir)
            storage.register_mem_pool_host(pool)
            run("", storage, pool, warm, args, False, quiet=True)
            run("SGLang file, generic, %s" % layout, storage, pool, keys, args, False)
            del pool
    if args.file_dir is None:
        shutil.rmtree(file_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
