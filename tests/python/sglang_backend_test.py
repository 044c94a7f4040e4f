#!/usr/bin/python3
"""kvstrata.sglang_backend against the real SGLang (tests/engine/sglang-requirements.txt).

Everything SGLang-side is SGLang's own: the HiCacheStorage base class and
HiCacheStorageConfig, the dynamic backend factory, device KV pools and MHA/MLA
host pools built on CPU in every host layout, page hashes from
get_hash_str/get_storage_hash_str, the HiCache controller's own page
get/set/hit-query functions calling the backend, and a whole HiCacheController
with its storage threads. The nodes are real kvstrata-node processes
($KVSTRATA_NODE).

Started with /usr/bin/python3, the test creates (or reuses) the cached SGLang
virtualenv with tests/engine/setup_sglang_venv.sh and re-runs itself in it;
exit 77 (ctest: skipped) when the package index cannot be reached.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = 77


def _enter_sglang_venv():
    try:
        import sglang.srt.mem_cache.hicache_storage  # noqa: F401
        return
    except ImportError:
        if os.environ.get("KVSTRATA_SGLANG_VENV_ENTERED"):
            raise
    setup = os.path.join(HERE, "..", "engine", "setup_sglang_venv.sh")
    done = subprocess.run(["bash", setup], stdout=subprocess.PIPE, text=True)
    if done.returncode == SKIP:
        print("SKIP: SGLang cannot be installed (package index unreachable)")
        sys.exit(SKIP)
    if done.returncode != 0:
        sys.exit("setup_sglang_venv.sh failed with status %d" % done.returncode)
    python = os.path.join(done.stdout.strip().splitlines()[-1], "bin", "python")
    os.environ["KVSTRATA_SGLANG_VENV_ENTERED"] = "1"
    os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])


if __name__ == "__main__":
    _enter_sglang_venv()

import logging  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import unittest  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)

import torch  # noqa: E402
from sglang.srt.managers.cache_controller import HiCacheController  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import (  # noqa: E402
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
)
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.mem_cache.storage import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str, get_storage_hash_str  # noqa: E402

import kvstrata  # noqa: E402
from kvstrata.sglang_backend import KvstrataHiCacheStorage, page_block_keys  # noqa: E402
from kvstrata.testing import NodeProcess  # noqa: E402

PAGE = 4  # tokens per SGLang page
LAYERS = 3
MHA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]
MLA_LAYOUTS = ["layer_first", "page_first", "page_first_direct"]
# Small slabs: a pool whose blocks exceed them is cheap to build, and a node
# needs little memory.
SMALL_SLABS = ["--slab_bytes=%d" % (256 << 10)]
DYNAMIC = {"backend_name": "kvstrata", "module_path": "kvstrata.sglang_backend",
           "class_name": "KvstrataHiCacheStorage"}


def mha_host_pool(layout, dtype=torch.bfloat16, heads=2, head_dim=8, layers=LAYERS):
    device = MHATokenToKVPool(64, PAGE, dtype, heads, head_dim, layers, "cpu", False,
                              start_layer=0, end_layer=layers)
    info = device.get_device_pool_infos()[0].buffer_info
    return MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=device.size, start_layer=0,
                                end_layer=layers)


def mla_host_pool(layout, dtype=torch.bfloat16, kv_lora_rank=16, rope_dim=8):
    device = MLATokenToKVPool(64, PAGE, dtype, kv_lora_rank, rope_dim, LAYERS, "cpu", False,
                              0, LAYERS)
    info = device.get_device_pool_infos()[0].buffer_info
    return MLATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=device.size, start_layer=0,
                                end_layer=LAYERS, target_layer_num=LAYERS)


def fill_random(host_pool, seed):
    raw = host_pool.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(seed)))


def page_bytes(host_pool, index):
    return host_pool.get_data_page(int(index), flat=True).contiguous().view(torch.uint8)


def storage_config(extra, *, mla=False, tp_rank=0, tp_size=1, model="test/model"):
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=False,
        model_name=model, extra_config=dict(extra))


def page_keys(tokens, prior=None):
    return get_hash_str(tokens, prior, page_size=PAGE)


class SGLangBackendTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.node = NodeProcess(dram_bytes=64 << 20, extra_flags=SMALL_SLABS)

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()

    def backend(self, host_pool, node="", mla=False, **extra):
        config = dict(DYNAMIC, timeout=5.0)
        if node is not None:
            config["node"] = node or self.node.address
        config.update(extra)
        storage = StorageBackendFactory.create_backend(
            "dynamic", storage_config(config, mla=mla), host_pool)
        # What HybridCacheController.attach_storage_backend does next (SGLang
        # 0.5.23 uses it for every model; a plain model's group is the KV anchor).
        storage.register_mem_pool_host(host_pool)
        storage.register_mem_host_pool_v2(host_pool, PoolName.KV)
        storage.on_host_pools_registered()
        return storage

    def pages(self, host_pool, count):
        indices = host_pool.alloc(count * PAGE)
        self.assertIsNotNone(indices)
        return indices

    def assert_same_pages(self, pool_a, indices_a, pool_b, indices_b):
        for i in range(0, len(indices_a), PAGE):
            self.assertTrue(torch.equal(page_bytes(pool_a, indices_a[i]),
                                        page_bytes(pool_b, indices_b[i])),
                            "page %d differs" % (i // PAGE))

    # ---- loading -----------------------------------------------------------

    def test_dynamic_factory_loads_the_backend(self):
        pool = mha_host_pool("page_first")
        storage = self.backend(pool)
        self.assertIsInstance(storage, KvstrataHiCacheStorage)
        self.assertIsInstance(storage, HiCacheStorage)
        self.assertIs(storage.mem_pool_host, pool)
        # SGLang's own check of the dynamic config comes before ours.
        with self.assertRaisesRegex(ValueError, "class_name"):
            StorageBackendFactory.create_backend(
                "dynamic", storage_config({"backend_name": "kvstrata",
                                           "module_path": "kvstrata.sglang_backend"}), pool)

    def test_pools_it_cannot_store_are_refused_at_attach(self):
        # K and V of different widths (SGLang's AsymmetricMHATokenToKVPoolHost):
        # two block sizes per page, which one namespace cannot hold.
        from sglang.srt.mem_cache.pool_host.mha import get_mha_host_pool_cls
        device = MHATokenToKVPool(64, PAGE, torch.bfloat16, 2, 8, LAYERS, "cpu", False,
                                  v_head_dim=4, start_layer=0, end_layer=LAYERS)
        info = device.get_device_pool_infos()[0].buffer_info
        host = get_mha_host_pool_cls(info)(info, 2.0, 0, PAGE, "page_first", pin_memory=False,
                                          device="cpu", device_capacity_tokens=device.size,
                                          start_layer=0, end_layer=LAYERS)
        with self.assertRaisesRegex(ValueError, "pieces of sizes"):
            self.backend(host, model="asym")
        storage = self.backend(mha_host_pool("page_first"), model="asym")
        with self.assertRaisesRegex(ValueError, "pieces of sizes"):
            storage.register_mem_host_pool_v2(host, PoolName.SWA)

    def test_v2_side_pools_of_hybrid_models(self):
        # A hybrid model's group: the KV anchor plus side pools. SGLang builds
        # an SWA model's window layers as an MHA host pool of their own (here
        # 1 layer, 4 heads), an indexer-like pool shares the KV indices.
        kv_w, kv_r = mha_host_pool("page_first"), mha_host_pool("page_first")
        swa_w, swa_r = (mha_host_pool("page_first", heads=4, layers=1) for _ in range(2))
        idx_w, idx_r = (mha_host_pool("page_first", heads=1, layers=2) for _ in range(2))
        for pool, seed in ((kv_w, 90), (swa_w, 91), (idx_w, 92)):
            fill_random(pool, seed)
        writer, reader = self.backend(kv_w, model="hybrid"), self.backend(kv_r, model="hybrid")
        for storage, swa, idx in ((writer, swa_w, idx_w), (reader, swa_r, idx_r)):
            storage.register_mem_host_pool_v2(swa, PoolName.SWA)
            storage.register_mem_host_pool_v2(idx, PoolName.INDEXER)
        keys = page_keys(list(range(6000, 6000 + 6 * PAGE)))
        kv_slots, swa_slots, idx_slots = (self.pages(p, 6) for p in (kv_w, swa_w, idx_w))
        self.assertEqual(writer.batch_set_v1(keys, kv_slots), [True] * 6)
        # SWA state only for the window ending at page 5; indexer for pages 0..3.
        got = writer.batch_set_v2([
            PoolTransfer(name=PoolName.SWA, host_indices=swa_slots[4 * PAGE:], keys=keys[4:]),
            PoolTransfer(name=PoolName.INDEXER, host_indices=idx_slots[:4 * PAGE], keys=keys[:4])])
        self.assertEqual(got, {PoolName.SWA: [True, True], PoolName.INDEXER: [True] * 4})

        trailing = PoolTransfer(name=PoolName.SWA, keys=keys[-2:],
                                hit_policy=PoolHitPolicy.TRAILING_PAGES)
        result = reader.batch_exists_v2(keys, [trailing])
        self.assertEqual((result.kv_hit_pages, result.restorable_prefix_pages), (6, [6]))
        all_pages = PoolTransfer(name=PoolName.INDEXER, hit_policy=PoolHitPolicy.ALL_PAGES)
        result = reader.batch_exists_v2(keys, [all_pages])
        self.assertEqual((result.kv_hit_pages, result.extra_pool_hit_pages[PoolName.INDEXER]), (4, 4))
        self.assertEqual(reader.batch_exists_v2(keys, [trailing, all_pages]).kv_hit_pages, 0)
        missing = PoolTransfer(name=PoolName.MAMBA, keys=keys[-1:],
                               hit_policy=PoolHitPolicy.TRAILING_PAGES)
        self.assertEqual(reader.batch_exists_v2(keys, [missing]).kv_hit_pages, 0)

        swa_to, idx_to = self.pages(swa_r, 2), self.pages(idx_r, 4)
        got = reader.batch_get_v2([
            PoolTransfer(name=PoolName.SWA, host_indices=swa_to, keys=keys[4:]),
            PoolTransfer(name=PoolName.INDEXER, host_indices=idx_to, keys=keys[:4]),
            PoolTransfer(name=PoolName.MAMBA, host_indices=swa_to, keys=keys[:1])])
        self.assertEqual(got, {PoolName.SWA: [True, True], PoolName.INDEXER: [True] * 4,
                               PoolName.MAMBA: [False]})
        self.assert_same_pages(swa_w, swa_slots[4 * PAGE:], swa_r, swa_to)
        self.assert_same_pages(idx_w, idx_slots[:4 * PAGE], idx_r, idx_to)
        # A side pool is its own namespace: its blocks never answer for KV.
        self.assertEqual(reader.batch_exists(page_keys(list(range(6000, 6000 + PAGE)))), 1)

    def test_bad_config_is_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "timeout"):
            KvstrataHiCacheStorage(storage_config(dict(DYNAMIC, timeout="soon")))
        with self.assertRaisesRegex(ValueError, "tenant"):
            KvstrataHiCacheStorage(storage_config(dict(DYNAMIC, tenant=3)))
        with self.assertRaisesRegex(ValueError, "model identity"):
            KvstrataHiCacheStorage(storage_config(DYNAMIC, model=None))
        with self.assertRaisesRegex(TypeError, "HiCacheStorageConfig"):
            KvstrataHiCacheStorage({"node": self.node.address})
        if not hasattr(kvstrata, "Cluster"):
            with self.assertRaisesRegex(ValueError, "Cluster"):
                KvstrataHiCacheStorage(storage_config(dict(DYNAMIC, nodes=["127.0.0.1:1"])))
        # A node that refuses the namespace (blocks above its slab limit) fails start-up.
        big = mha_host_pool("page_first", dtype=torch.float32, heads=8, head_dim=1024)
        storage = KvstrataHiCacheStorage(storage_config(dict(DYNAMIC, node=self.node.address)))
        with self.assertRaisesRegex(ValueError, "rejected the namespace"):
            storage.register_mem_pool_host(big)

    def test_long_model_names_fit_the_node_limit(self):
        # The node takes names of at most 256 bytes; long paths stay distinct.
        pools = [mha_host_pool("page_first") for _ in range(2)]
        stores = [self.backend(pool, model="/models/" + "x" * 300 + suffix)
                  for pool, suffix in zip(pools, ("a", "b"))]
        for storage in stores:
            self.assertLessEqual(len(storage._pools["kv"].identity), 256)
        self.assertNotEqual(stores[0]._pools["kv"].identity, stores[1]._pools["kv"].identity)
        keys = page_keys(list(range(PAGE)))
        self.assertEqual(stores[0].batch_set_v1(keys, self.pages(pools[0], 1)), [True])
        self.assertEqual(stores[1].batch_exists(keys), 0)

    # ---- round trips -------------------------------------------------------

    def round_trip(self, make_pool, layout, mla):
        writer_pool, reader_pool = make_pool(layout), make_pool(layout)
        fill_random(writer_pool, seed=1)
        writer = self.backend(writer_pool, mla=mla, model="rt-%s-%s" % (mla, layout))
        reader = self.backend(reader_pool, mla=mla, model="rt-%s-%s" % (mla, layout))
        keys = page_keys(list(range(100, 100 + 6 * PAGE)))
        written = self.pages(writer_pool, 6)
        # Zero copy (interface_v1) out of the writer's host pool pages 0..2...
        self.assertEqual(writer.batch_set_v1(keys[:3], written[:3 * PAGE]), [True] * 3)
        # ... and the generic path (flat pages) for pages 3..5.
        flat = [writer_pool.get_data_page(int(written[i * PAGE])) for i in range(3, 6)]
        self.assertTrue(writer.batch_set(keys[3:], flat))
        self.assertEqual(reader.batch_exists(keys), 6)

        # A second engine loads all six zero-copy into other slots of its own pool.
        filler = self.pages(reader_pool, 1)  # so the indices differ from the writer's
        loaded = self.pages(reader_pool, 6)
        self.assertNotEqual(filler[0].item(), loaded[0].item())
        self.assertEqual(reader.batch_get_v1(keys, loaded), [True] * 6)
        self.assert_same_pages(writer_pool, written, reader_pool, loaded)
        # And through the generic path: flat pages, byte for byte SGLang's own.
        for i, got in enumerate(reader.batch_get(keys)):
            self.assertTrue(torch.equal(got.view(torch.uint8), page_bytes(writer_pool, written[i * PAGE])))

    def test_mha_round_trip_in_every_host_layout(self):
        for layout in MHA_LAYOUTS:
            with self.subTest(layout=layout):
                self.round_trip(mha_host_pool, layout, mla=False)

    def test_mla_round_trip_in_every_host_layout(self):
        for layout in MLA_LAYOUTS:
            with self.subTest(layout=layout):
                self.round_trip(mla_host_pool, layout, mla=True)

    def test_fp16_and_fp32_pools(self):
        for dtype in (torch.float16, torch.float32):
            with self.subTest(dtype=dtype):
                a, b = mha_host_pool("page_first", dtype), mha_host_pool("page_first", dtype)
                fill_random(a, seed=2)
                sa, sb = self.backend(a, model="dt"), self.backend(b, model="dt")
                keys = page_keys(list(range(2 * PAGE)))
                ia, ib = self.pages(a, 2), self.pages(b, 2)
                self.assertEqual(sa.batch_set_v1(keys, ia), [True, True])
                self.assertEqual(sb.batch_get_v1(keys, ib), [True, True])
                self.assert_same_pages(a, ia, b, ib)

    def test_fp8_caches_are_stored_raw_and_kept_apart(self):
        # SGLang keeps fp8 KV as uint8; the engine's --kv-cache-dtype tells
        # e4m3 from e5m2, and only the same format may share blocks.
        keys = page_keys(list(range(700, 700 + 2 * PAGE)))
        pools = {}
        for fmt, dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
            a, b = mha_host_pool("page_first", dtype), mha_host_pool("page_first", dtype)
            self.assertEqual(a.kv_buffer.dtype, torch.uint8)
            fill_random(a, seed=40)
            pools[fmt] = (a, b)
        e4m3_writer = self.backend(pools["fp8_e4m3"][0], model="fp8", kv_cache_dtype="fp8_e4m3")
        written = self.pages(pools["fp8_e4m3"][0], 2)
        self.assertEqual(e4m3_writer.batch_set_v1(keys, written), [True, True])
        e5m2_reader = self.backend(pools["fp8_e5m2"][1], model="fp8", kv_cache_dtype="fp8_e5m2")
        self.assertEqual(e5m2_reader.batch_exists(keys), 0)
        e4m3_reader = self.backend(pools["fp8_e4m3"][1], model="fp8", kv_cache_dtype="fp8_e4m3")
        loaded = self.pages(pools["fp8_e4m3"][1], 2)
        self.assertEqual(e4m3_reader.batch_get_v1(keys, loaded), [True, True])
        self.assert_same_pages(pools["fp8_e4m3"][0], written, pools["fp8_e4m3"][1], loaded)
        # Outside a launched engine nothing else says which fp8 it is.
        with self.assertRaisesRegex(ValueError, "kv_cache_dtype"):
            self.backend(mha_host_pool("page_first", torch.float8_e4m3fn), model="fp8")

    def test_layouts_and_dtypes_never_share_blocks(self):
        # The stored bytes of a page depend on the host layout and dtype: a
        # reader with another one must miss, never load bytes it misreads.
        first = mha_host_pool("page_first")
        keys = page_keys(list(range(500, 500 + 2 * PAGE)))
        self.assertEqual(self.backend(first, model="iso").batch_set_v1(keys, self.pages(first, 2)),
                         [True, True])
        for other in (mha_host_pool("layer_first"), mha_host_pool("page_first_direct"),
                      mha_host_pool("page_first", torch.float16)):
            self.assertEqual(self.backend(other, model="iso").batch_exists(keys), 0)
        self.assertEqual(self.backend(mha_host_pool("page_first"), model="iso").batch_exists(keys), 2)

    # ---- existence, misses, keys ------------------------------------------

    def test_exists_counts_the_stored_prefix(self):
        pool = mha_host_pool("layer_first")
        storage = self.backend(pool, model="prefix")
        keys = page_keys(list(range(7, 7 + 5 * PAGE)))
        indices = self.pages(pool, 5)
        self.assertEqual(storage.batch_exists(keys), 0)
        self.assertEqual(storage.batch_set_v1(keys[:3], indices[:3 * PAGE]), [True] * 3)
        self.assertEqual(storage.batch_exists(keys), 3)
        self.assertEqual(storage.batch_exists(keys[:2]), 2)
        self.assertTrue(storage.exists(keys[2]))
        self.assertFalse(storage.exists(keys[3]))
        # A hole: page 4 stored, page 3 not; the prefix still ends at 3.
        self.assertEqual(storage.batch_set_v1(keys[4:], indices[4 * PAGE:]), [True])
        self.assertEqual(storage.batch_exists(keys), 3)
        self.assertEqual(storage.batch_exists([]), 0)

    def test_a_page_missing_one_piece_does_not_exist(self):
        # layer_first stores 2 * LAYERS blocks per page; the node may evict one.
        pool = mha_host_pool("layer_first")
        storage = self.backend(pool, model="pieces")
        keys = page_keys(list(range(900, 900 + 2 * PAGE)))
        indices = self.pages(pool, 2)
        self.assertEqual(storage.batch_set_v1(keys, indices), [True, True])
        pieces = storage._pools["kv"].pieces
        self.assertEqual(pieces, 2 * LAYERS)
        namespace = storage._namespace(storage._pools["kv"])
        self.assertEqual(namespace.delete([page_block_keys(keys[1], pieces)[3]]), 1)
        self.assertEqual(storage.batch_exists(keys), 1)
        self.assertFalse(storage.exists(keys[1]))
        self.assertEqual(storage.batch_get_v1(keys, self.pages(pool, 2)), [True, False])

    def test_a_missing_key(self):
        pool = mha_host_pool("page_first")
        fill_random(pool, seed=3)
        storage = self.backend(pool, model="missing")
        key = page_keys(list(range(3000, 3000 + PAGE)))[0]
        self.assertFalse(storage.exists(key))
        self.assertIsNone(storage.get(key))
        target = pool.get_dummy_flat_data_page()
        self.assertIsNone(storage.get(key, target))
        self.assertEqual(storage.batch_get([key, key]), [None, None])
        indices = self.pages(pool, 1)
        before = page_bytes(pool, indices[0]).clone()
        self.assertEqual(storage.batch_get_v1([key], indices), [False])
        self.assertTrue(torch.equal(page_bytes(pool, indices[0]), before))

    def test_keys_follow_sglang_page_hashes(self):
        pool = mha_host_pool("page_first")
        storage = self.backend(pool, model="hashes")
        shared = list(range(40, 40 + 2 * PAGE))
        first = page_keys(shared + [1] * (2 * PAGE))
        self.assertEqual(storage.batch_set_v1(first, self.pages(pool, 4)), [True] * 4)
        # Another prompt with the same first two pages: SGLang's chained hashes
        # agree on those two and on nothing after the divergence.
        second = page_keys(shared + [2] * (2 * PAGE))
        self.assertEqual(second[:2], first[:2])
        self.assertEqual(storage.batch_exists(second), 2)
        # The continuation of a prefix hashes from the prefix's last page hash.
        self.assertEqual(page_keys([1] * (2 * PAGE), first[1]), first[2:])
        # Same tokens under another cache_salt / extra key: SGLang seeds the
        # chain differently and nothing is shared.
        salted = get_storage_hash_str(RadixKey(shared, cache_salt="s1"), None, page_size=PAGE)
        lora = get_storage_hash_str(RadixKey(shared, extra_key="lora-a"), None, page_size=PAGE)
        self.assertNotEqual(salted, first[:2])
        self.assertEqual(storage.batch_exists(salted), 0)
        self.assertEqual(storage.batch_exists(lora), 0)
        with self.assertRaisesRegex(ValueError, "page key"):
            page_block_keys(b"bytes", 2)

    def test_tenants_do_not_collide(self):
        pool_a, pool_b = mha_host_pool("page_first"), mha_host_pool("page_first")
        fill_random(pool_a, seed=10)
        fill_random(pool_b, seed=11)
        a = self.backend(pool_a, tenant="tenant-a", model="shared-model")
        b = self.backend(pool_b, tenant="tenant-b", model="shared-model")
        keys = page_keys(list(range(2 * PAGE)))
        ia, ib = self.pages(pool_a, 2), self.pages(pool_b, 2)
        self.assertEqual(a.batch_set_v1(keys, ia), [True, True])
        self.assertEqual(b.batch_exists(keys), 0)
        self.assertEqual(b.batch_get(keys), [None, None])
        self.assertEqual(b.batch_set_v1(keys, ib), [True, True])
        # Each tenant reads back its own bytes under the very same page hashes.
        for storage, pool, source in ((a, pool_a, ia), (b, pool_b, ib)):
            got = storage.batch_get(keys)
            for i in range(2):
                self.assertTrue(torch.equal(got[i].view(torch.uint8), page_bytes(pool, source[i * PAGE])))
        self.assertFalse(torch.equal(page_bytes(pool_a, ia[0]), page_bytes(pool_b, ib[0])))

    def test_tp_ranks_of_mha_are_separate_and_mla_is_shared(self):
        keys = page_keys(list(range(77, 77 + PAGE)))
        def make(mla, rank):
            pool = mla_host_pool("page_first") if mla else mha_host_pool("page_first")
            config = storage_config(dict(DYNAMIC, node=self.node.address), mla=mla,
                                    tp_rank=rank, tp_size=2, model="tp-model")
            storage = KvstrataHiCacheStorage(config)
            storage.register_mem_pool_host(pool)
            return storage, pool
        for mla, expected in ((False, 0), (True, 1)):
            (r0, p0), (r1, _) = make(mla, 0), make(mla, 1)
            self.assertEqual(r0.batch_set_v1(keys, self.pages(p0, 1)), [True])
            # MHA ranks hold different heads; MLA's latent is the same on every rank.
            self.assertEqual(r1.batch_exists(keys), expected)

    # ---- SGLang's controller calling the backend -------------------------

    def test_hicache_controller_page_functions(self):
        # HiCacheController's own prefetch/backup page functions, bound to a
        # minimal controller state: the exact calls SGLang makes.
        writer_pool, reader_pool = mha_host_pool("page_first"), mha_host_pool("page_first")
        fill_random(writer_pool, seed=20)
        writer = self.backend(writer_pool, model="ctl", interface_v1=1)
        reader = self.backend(reader_pool, model="ctl")
        ctl_w = types.SimpleNamespace(storage_backend=writer, storage_host_pool=writer_pool,
                                      mem_pool_host=writer_pool, page_size=PAGE)
        ctl_r = types.SimpleNamespace(storage_backend=reader, storage_host_pool=reader_pool,
                                      mem_pool_host=reader_pool, page_size=PAGE)
        tokens = list(range(300, 300 + 4 * PAGE))
        keys = page_keys(tokens)
        written = self.pages(writer_pool, 4)
        extra = HiCacheStorageExtraInfo(prefix_keys=None)
        self.assertTrue(HiCacheController._page_set_zero_copy(ctl_w, keys[:2], written[:2 * PAGE], extra))
        self.assertTrue(HiCacheController._generic_page_set(ctl_w, keys[2:], written[2 * PAGE:]))

        # The prefetch thread's hit query hashes the tokens itself.
        operation = types.SimpleNamespace(last_hash=None, token_ids=RadixKey(tokens + [9] * PAGE),
                                          prefix_keys=None, request_id="r1",
                                          is_terminated=lambda: False)
        hashes, hit_tokens = HiCacheController._storage_hit_query(ctl_r, operation)
        self.assertEqual((hashes, hit_tokens), (keys, 4 * PAGE))

        loaded = self.pages(reader_pool, 4)
        self.assertEqual(HiCacheController._page_get_zero_copy(ctl_r, operation, keys[:2], loaded[:2 * PAGE]), 2)
        self.assertEqual(HiCacheController._generic_page_get(ctl_r, operation, keys[2:], loaded[2 * PAGE:]), 2)
        self.assert_same_pages(writer_pool, written, reader_pool, loaded)
        missing = page_keys([5] * PAGE)
        self.assertEqual(HiCacheController._page_get_zero_copy(ctl_r, operation, missing, self.pages(reader_pool, 1)), 0)

    def test_controller_threads_share_one_backend(self):
        # SGLang calls one backend from its backup, prefetch and prefetch-IO
        # threads at once.
        import threading
        writer_pool, reader_pool = mha_host_pool("page_first"), mha_host_pool("page_first")
        fill_random(writer_pool, seed=50)
        storage = self.backend(writer_pool, model="threads")
        reader = self.backend(reader_pool, model="threads")
        prompts = [page_keys([p] * (2 * PAGE)) for p in range(12)]
        slots = [self.pages(writer_pool, 2) for _ in prompts]
        errors, loaded = [], {}

        def backup():
            for keys, slot in zip(prompts, slots):
                if storage.batch_set_v1(keys, slot) != [True, True]:
                    errors.append("write %s" % keys[0])

        def prefetch():
            pending = set(range(len(prompts)))
            deadline = time.monotonic() + 30
            while pending and time.monotonic() < deadline:
                for i in sorted(pending):
                    if reader.batch_exists(prompts[i]) == 2:
                        target = self.pages(reader_pool, 2)
                        if reader.batch_get_v1(prompts[i], target) != [True, True]:
                            errors.append("read %d" % i)
                        loaded[i] = target
                        pending.discard(i)
            if pending:
                errors.append("never stored: %s" % sorted(pending))

        threads = [threading.Thread(target=backup), threading.Thread(target=prefetch),
                   threading.Thread(target=lambda: [storage.batch_exists(k) for k in prompts * 5])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(sorted(loaded), list(range(len(prompts))))
        for i, target in loaded.items():
            self.assert_same_pages(writer_pool, slots[i], reader_pool, target)

    def test_storage_metrics_for_sglang(self):
        pool = mha_host_pool("page_first")
        plain = self.backend(pool, model="metrics")
        self.assertIsNone(plain.get_stats())  # metrics off: SGLang uses its defaults
        config = storage_config(dict(DYNAMIC, node=self.node.address), model="metrics")
        config.enable_storage_metrics = True
        storage = KvstrataHiCacheStorage(config)
        storage.register_mem_pool_host(pool)
        keys = page_keys(list(range(8000, 8000 + 3 * PAGE)))
        self.assertEqual(storage.batch_set_v1(keys, self.pages(pool, 3)), [True] * 3)
        self.assertEqual(len(storage.batch_get(keys[:2])), 2)
        metrics = storage.get_stats()
        self.assertEqual((metrics.backup_pgs, metrics.prefetch_pgs), ([3], [2]))
        self.assertTrue(all(bw > 0 for bw in metrics.backup_bandwidth + metrics.prefetch_bandwidth))
        self.assertEqual(storage.get_stats().backup_pgs, [])  # drained

    # ---- clients and clusters ---------------------------------------------

    def test_a_ready_client_object(self):
        # The backend takes any object with the namespace API (a Client here,
        # a kvstrata.Cluster where the binding has one) instead of an address.
        pool_a, pool_b = mha_host_pool("page_first"), mha_host_pool("page_first")
        fill_random(pool_a, seed=60)
        client = kvstrata.Client(self.node.address, timeout=5.0)
        config = storage_config(dict(DYNAMIC, node="127.0.0.1:1"), model="given")
        a = KvstrataHiCacheStorage(config, client=client)
        b = KvstrataHiCacheStorage(config, {"client": client})  # the factory's kwargs dict
        for storage, pool in ((a, pool_a), (b, pool_b)):
            storage.register_mem_pool_host(pool)
        keys = page_keys(list(range(1234, 1234 + 2 * PAGE)))
        written, loaded = self.pages(pool_a, 2), self.pages(pool_b, 2)
        self.assertEqual(a.batch_set_v1(keys, written), [True, True])
        self.assertEqual(b.batch_get_v1(keys, loaded), [True, True])
        self.assert_same_pages(pool_a, written, pool_b, loaded)
        self.assertGreaterEqual(client.stats()["published_blocks"], 4)

    @unittest.skipUnless(hasattr(kvstrata, "Cluster"), "this binding has no kvstrata.Cluster")
    def test_three_node_cluster_and_one_node_killed(self):
        nodes = [NodeProcess(dram_bytes=16 << 20, extra_flags=SMALL_SLABS) for _ in range(3)]
        try:
            addresses = [n.address for n in nodes]
            pool_a, pool_b = mha_host_pool("page_first"), mha_host_pool("page_first")
            fill_random(pool_a, seed=70)
            a = self.backend(pool_a, node=None, nodes=addresses, model="cluster")
            b = self.backend(pool_b, node=None, nodes=addresses, model="cluster")
            keys = page_keys(list(range(5000, 5000 + 12 * PAGE)))
            written = self.pages(pool_a, 12)
            self.assertEqual(a.batch_set_v1(keys, written), [True] * 12)
            # The blocks are spread over the nodes; a second engine (its own
            # cluster client) finds and loads every page, whichever node holds it.
            per_node = [kvstrata.Client(n.address).stats()["published_blocks"] for n in nodes]
            self.assertEqual(sum(per_node), 24)
            self.assertTrue(all(count > 0 for count in per_node), per_node)
            self.assertEqual(b.batch_exists(keys), 12)
            loaded = self.pages(pool_b, 12)
            self.assertEqual(b.batch_get_v1(keys, loaded), [True] * 12)
            self.assert_same_pages(pool_a, written, pool_b, loaded)
            # One node dies: its pages miss, the rest still load, nothing raises.
            nodes[1].process.kill()
            nodes[1].process.wait()
            got = b.batch_get_v1(keys, self.pages(pool_b, 12))
            self.assertEqual(len(got), 12)
            self.assertIn(False, got)
            self.assertIn(True, got)
            self.assertLessEqual(b.batch_exists(keys), got.index(False))
        finally:
            for n in nodes:
                n.stop()

    def test_hicache_controller_threads_end_to_end(self):
        # SGLang's real HiCacheController, with its own backup, prefetch,
        # prefetch-IO and prefetch-sync threads, on CPU pools; this test plays
        # the scheduler's part between them the way UnifiedRadixCache does
        # (_try_alloc_storage_hit: allocate host slots for the hit, hand the
        # operation to prefetch_buffer, collect PrefetchAcks).
        import threading
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.runtime_context import get_parallel

        node = NodeProcess(dram_bytes=16 << 20, extra_flags=SMALL_SLABS)

        def controller(extra, seed):
            device = MHATokenToKVPool(256, PAGE, torch.bfloat16, 2, 8, LAYERS, "cpu", False,
                                      start_layer=0, end_layer=LAYERS)
            allocator = PagedTokenToKVPoolAllocator(256, PAGE, torch.bfloat16, "cpu", device, False)
            host = MHATokenToKVPoolHost(device.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE,
                                        "page_first", pin_memory=False, device="cpu",
                                        device_capacity_tokens=device.size, start_layer=0,
                                        end_layer=LAYERS)
            fill_random(host, seed)
            # One process, TP/PP of 1: what a launched engine publishes.
            with get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                                         attn_dcp_size=1, attn_dcp_rank=0):
                return HiCacheController(
                    allocator, host, PAGE, None, threading.Event(), write_policy="write_through",
                    io_backend="direct", storage_backend="dynamic", model_name="ctl-threads",
                    storage_backend_extra_config=dict(DYNAMIC, node=node.address, timeout=3.0,
                                                      connect_timeout=2.0, **extra))

        def prefetch(ctl, request_id, tokens):
            operation = ctl.prefetch(request_id, tokens)
            hit = ctl.prefetch_hit_queue.get(timeout=30)
            self.assertIs(hit, operation)
            if hit.storage_hit_count == 0:
                return hit, None, 0
            slots = ctl.mem_pool_host.alloc(hit.storage_hit_count)
            hit.hash_value = hit.hash_value[:hit.storage_hit_count // PAGE]
            hit.host_indices = slots
            ctl.prefetch_buffer.put(hit)
            completed = 0
            while True:
                ack = ctl.ack_prefetch_queue.get(timeout=30)
                if ack.completed_req:
                    return hit, slots, completed
                completed = max(completed, ack.completed_tokens or 0)

        writer = controller({"interface_v1": 1}, seed=80)  # zero-copy calls
        reader = controller({}, seed=81)                    # generic calls
        try:
            self.assertEqual(writer.page_set_func.__name__, "_page_set_zero_copy")
            self.assertEqual(reader.page_get_func.__name__, "_generic_page_get")
            tokens = list(range(2000, 2000 + 6 * PAGE))
            written = writer.mem_pool_host.alloc(len(tokens))
            writer.write_storage(written, tokens, hash_value=page_keys(tokens))
            done = writer.ack_backup_queue.get(timeout=30)
            self.assertEqual(done.completed_tokens, len(tokens))

            # A longer prompt of the reader: the stored 6 pages hit, then load.
            hit, slots, completed = prefetch(reader, "r1", tokens + [1] * (2 * PAGE))
            self.assertEqual((hit.storage_hit_count, completed), (len(tokens), len(tokens)))
            for i in range(6):
                self.assertTrue(torch.equal(page_bytes(writer.mem_pool_host, written[i * PAGE]),
                                            page_bytes(reader.mem_pool_host, slots[i * PAGE])))

            # The node dies: SGLang's threads get misses and failed writes, keep
            # running, and every operation is still acknowledged.
            node.process.kill()
            node.process.wait()
            hit, _, _ = prefetch(reader, "r2", tokens)
            self.assertEqual(hit.storage_hit_count, 0)
            more = list(range(9000, 9000 + 2 * PAGE))
            writer.write_storage(writer.mem_pool_host.alloc(len(more)), more,
                                 hash_value=page_keys(more))
            self.assertEqual(writer.ack_backup_queue.get(timeout=30).completed_tokens, 0)
            self.assertTrue(writer.backup_thread.is_alive() and reader.prefetch_thread.is_alive())
        finally:
            for ctl in (writer, reader):
                ctl.detach_storage_backend()
            node.stop()

    # ---- faults -----------------------------------------------------------

    def test_unreachable_node_degrades(self):
        pool = mha_host_pool("page_first")
        start = time.monotonic()
        storage = self.backend(pool, node="127.0.0.1:1", connect_timeout=1.0, reconnect_interval=60.0)
        keys = page_keys(list(range(2 * PAGE)))
        indices = self.pages(pool, 2)
        self.assertEqual(storage.batch_exists(keys), 0)
        self.assertFalse(storage.exists(keys[0]))
        self.assertIsNone(storage.get(keys[0]))
        self.assertEqual(storage.batch_get_v1(keys, indices), [False, False])
        self.assertEqual(storage.batch_set_v1(keys, indices), [False, False])
        self.assertFalse(storage.batch_set(keys, [pool.get_data_page(int(indices[0]))] * 2))
        # One connect attempt, then misses at once until reconnect_interval.
        self.assertLess(time.monotonic() - start, 10.0)
        self.assertGreaterEqual(storage.stats["errors"], 1)

    def test_node_killed_mid_way(self):
        node = NodeProcess(dram_bytes=16 << 20, extra_flags=SMALL_SLABS)
        port = node.port
        pool = mha_host_pool("page_first")
        fill_random(pool, seed=30)
        storage = self.backend(pool, node=node.address, model="killed", timeout=3.0,
                               connect_timeout=2.0, reconnect_interval=0.5)
        keys = page_keys(list(range(60, 60 + 3 * PAGE)))
        written = self.pages(pool, 3)
        self.assertEqual(storage.batch_set_v1(keys[:2], written[:2 * PAGE]), [True, True])
        self.assertEqual(storage.batch_exists(keys), 2)

        node.process.kill()
        node.process.wait()
        start = time.monotonic()
        target = self.pages(pool, 3)
        # Every call answers the way the base class spells failure; none raises.
        self.assertEqual(storage.batch_exists(keys), 0)
        self.assertFalse(storage.exists(keys[0]))
        self.assertEqual(storage.batch_get_v1(keys[:2], target[:2 * PAGE]), [False, False])
        self.assertEqual(storage.batch_get(keys[:2]), [None, None])
        self.assertIsNone(storage.get(keys[0]))
        self.assertEqual(storage.batch_set_v1(keys[2:], written[2 * PAGE:]), [False])
        self.assertFalse(storage.set(keys[2], pool.get_data_page(int(written[2 * PAGE]))))
        self.assertLess(time.monotonic() - start, 30.0)
        node.stop()

        # A node back on the same address: the backend reconnects by itself
        # (the new node is empty: what was cached died with the old one).
        revived = NodeProcess(dram_bytes=16 << 20, extra_flags=SMALL_SLABS + ["--listen=127.0.0.1:%d" % port])
        try:
            deadline = time.monotonic() + 20
            while storage.batch_set_v1(keys[:1], written[:PAGE]) != [True]:
                self.assertLess(time.monotonic(), deadline, "no reconnect")
                time.sleep(0.2)
            self.assertEqual(storage.batch_exists(keys), 1)
            self.assertGreaterEqual(storage.stats["reconnects"], 1)
            self.assertEqual(storage.batch_get_v1(keys[:1], target[:PAGE]), [True])
            self.assertTrue(torch.equal(page_bytes(pool, target[0]), page_bytes(pool, written[0])))
        finally:
            revived.stop()

    def test_malformed_calls_fail_without_raising(self):
        pool = mha_host_pool("page_first")
        storage = self.backend(pool, model="malformed")
        keys = page_keys(list(range(2 * PAGE)))
        indices = self.pages(pool, 2)
        # Host indices for one page, keys for two; a flat page of the wrong size.
        self.assertEqual(storage.batch_set_v1(keys, indices[:PAGE]), [False, False])
        self.assertFalse(storage.batch_set(keys[:1], [torch.zeros(3)]))
        self.assertEqual(storage.batch_get(keys[:1], [torch.zeros(3)]), [None])
        self.assertFalse(storage.batch_set(keys, None))


if __name__ == "__main__":
    unittest.main(verbosity=2)
