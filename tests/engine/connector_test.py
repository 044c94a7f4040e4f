"""KvstrataConnector driven with vLLM 0.32's own objects, against real kvstrata-nodes.

The config is vLLM's (EngineArgs(...).create_engine_config() on a tiny local
model), requests are vllm.v1.request.Request, allocations KVCacheBlocks,
steps SchedulerOutput/NewRequestData/CachedRequestData, KV caches the views
vLLM's create_kv_cache_views builds, and the worker is called in the model
runner's order (bind_connector_metadata, start_load_kv, per layer
wait_for_layer_load ... save_kv_layer, wait_for_save, get_finished,
get_block_ids_with_load_errors, clear_connector_metadata), with the
metadata pickled on its way from the scheduler as between vLLM's processes.
"""
import hashlib
import os
import pickle
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import unittest

import torch
from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.engine.arg_utils import EngineArgs
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheTensor, compute_layout_strides,
                                        create_kv_cache_views)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.request import Request

import kvstrata
from kvstrata import vllm_connector
from kvstrata.testing import NodeProcess
from kvstrata.vllm_connector import KvstrataConnector

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layout_test import read_block  # noqa: E402  (the backends' own K/V reading)
from vllm_engine_test import make_model  # noqa: E402

LAYERS, HEADS, HEAD, BS, CACHE, BLOCKS = 2, 2, 32, 32, 64, 16
NAMES = ["model.layers.%d.self_attn.attn" % i for i in range(LAYERS)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caches(layout=KVCacheLayout.LBHNC, kernel=None, seed=None, dtype=torch.float32):
    """The per-layer KV caches vLLM 0.32 would give register_kv_caches."""
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=HEAD, dtype=dtype)
    layer_stride, block_stride, _, _, _ = compute_layout_strides(spec, BLOCKS, LAYERS, layout)
    size = spec.page_size_bytes * BLOCKS * LAYERS
    raw = torch.zeros(size, dtype=torch.int8)
    if seed is not None:
        width = torch.finfo(dtype).bits // 8
        raw.view(dtype).copy_(torch.randn(size // width, generator=torch.Generator().manual_seed(seed)))
    views = create_kv_cache_views(raw, spec, BLOCKS, layout, KVCacheTensor(
        size=size, layers=NAMES, layer_stride=layer_stride, block_stride=block_stride), kernel)
    return dict(zip(NAMES, views))


def request(req_id, tokens, **kwargs):
    return Request(req_id, list(tokens), SamplingParams(max_tokens=1), None, **kwargs)


def blocks(ids):
    return KVCacheBlocks(blocks=([KVCacheBlock(i) for i in ids],))


class Engine:
    """One engine's scheduler-side and worker-side connectors, driven as vLLM 0.32 drives them."""

    def __init__(self, test, packing="rows", kv=None, **extra):
        self.config = test.config(kv_packing=packing, **extra)
        self.scheduler = KvstrataConnector(self.config, KVConnectorRole.SCHEDULER)
        self.worker = KvstrataConnector(self.config, KVConnectorRole.WORKER)
        self.kv = kv if kv is not None else caches()
        self.worker.register_kv_caches(self.kv)
        self.forwarded = []

    def admit(self, req, ids, computed=0, asynchronous=False):
        """The scheduler's admission: lookup, allocation; returns external tokens."""
        external, is_async = self.scheduler.get_num_new_matched_tokens(req, computed)
        assert is_async is (asynchronous and external > 0)
        self.scheduler.update_state_after_alloc(req, blocks(ids), external)
        return external

    def step(self, new=(), cached=(), scheduled=None, sync_loads=True):
        """One engine step. new: (request, block ids, computed); cached:
        (req_id, new block ids, computed, resumed); scheduled: req_id -> tokens.
        sync_loads False: start_load_kv after the forward pass, as vLLM 0.32's
        model runner does for steps without synchronous loads."""
        out = SchedulerOutput.make_empty()
        for req, ids, computed in new:
            req.num_computed_tokens = computed
            out.scheduled_new_reqs.append(NewRequestData.from_request(req, (list(ids),)))
        c = CachedRequestData.make_empty()
        for req_id, ids, computed, resumed in cached:
            c.req_ids.append(req_id)
            c.new_block_ids.append((list(ids),) if ids else None)
            c.num_computed_tokens.append(computed)
            c.num_output_tokens.append(0)
            c.new_token_ids.append([])
            if resumed:
                c.resumed_req_ids.add(req_id)
        out.scheduled_cached_reqs = c
        out.num_scheduled_tokens = dict(scheduled or {})
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        meta = pickle.loads(pickle.dumps(self.scheduler.build_connector_meta(out)))
        w = self.worker
        w.handle_preemptions(meta)
        w.bind_connector_metadata(meta)
        if sync_loads:
            w.start_load_kv(None)
        for name in NAMES:
            w.wait_for_layer_load(name)
            self.forwarded.append(name)  # attention would run here
            w.save_kv_layer(name, self.kv[name], None)
        if not sync_loads:
            w.start_load_kv(None)
        w.wait_for_save()
        finished = w.get_finished(set())
        errors = w.get_block_ids_with_load_errors()
        w.clear_connector_metadata()
        return finished, errors

    def prefill(self, req, ids):
        """A whole prompt, computed locally in one step."""
        external = self.admit(req, ids)
        n = len(req.prompt_token_ids)
        return external, self.step(new=[(req, ids, external)], scheduled={req.request_id: n - external})


class ConnectorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kvstrata-connector.")
        cls.model = os.path.join(cls.dir, "tiny-llama")
        make_model(cls.model)
        cls.node = NodeProcess(dram_bytes=128 << 20)
        cls.address = cls.node.address

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def config(self, **extra):
        # lookup_timeout 2 s: on a loaded 2-core machine a lookup round can take
        # over the default 100 ms; the deadline itself is tested with 100 ms below.
        settings = {"node": self.address, "cache_block_tokens": CACHE, "ucx_transports": "tcp",
                    "staging_bytes": 8 << 20, "lookup_timeout": 2.0}
        settings.update(extra)
        return EngineArgs(
            model=self.model, skip_tokenizer_init=True, dtype="float32", block_size=BS,
            max_model_len=2048, enforce_eager=True, enable_prefix_caching=False,
            kv_transfer_config=KVTransferConfig(
                kv_connector="KvstrataConnector", kv_connector_module_path="kvstrata.vllm_connector",
                kv_role="kv_both", kv_connector_extra_config=settings)).create_engine_config()

    def stats(self):
        return kvstrata.Client(self.address, timeout=10.0).stats()

    def test_is_what_vllms_factory_loads(self):
        config = self.config()
        self.assertIs(KVConnectorFactory.get_connector_class(config.kv_transfer_config),
                      KvstrataConnector)
        self.assertTrue(issubclass(KvstrataConnector, KVConnectorBase_V1))
        self.assertTrue(KvstrataConnector.requires_piecewise_for_cudagraph({}))
        connector = KvstrataConnector(config, KVConnectorRole.SCHEDULER)
        # The model identity is the served name without the host's path to it.
        self.assertEqual(connector._settings.model_id, "tiny-llama")
        self.assertEqual(connector._settings.layers, [0, 1])

    def test_publish_from_the_cpu_layout_load_into_flash_attention_with_kernel_blocks(self):
        tokens = list(range(5000, 5150))  # 2 whole cache blocks, 22 tokens over
        publisher = Engine(self, packing="rows", kv=caches(seed=3))
        src_ids = [9, 3, 12, 0, 7]
        external, (finished, errors) = publisher.prefill(request("p", tokens), src_ids)
        self.assertEqual((external, finished, errors), (0, (None, None), set()))
        self.assertEqual(publisher.worker.stats["saved_blocks"], 2)  # the partial 3rd: never
        self.assertEqual(publisher.worker.stats["save_errors"], 0)

        # FlashAttention's layout (content packing, LBNHC) with 16-token kernel blocks.
        consumer = Engine(self, packing="content", kv=caches(KVCacheLayout.LBNHC, kernel=16))
        req = request("c", tokens)
        # Already computed locally (vLLM's own prefix cache): only the rest is new.
        self.assertEqual(consumer.scheduler.get_num_new_matched_tokens(req, 32), (96, False))
        dst_ids = [4, 15, 1, 8, 2]
        self.assertEqual(consumer.admit(req, dst_ids), 128)  # the last answer counts
        _, errors = consumer.step(new=[(req, dst_ids, 128)], scheduled={"c": 22})
        self.assertEqual(errors, set())
        self.assertEqual(consumer.forwarded, NAMES)
        self.assertEqual(consumer.worker.stats["loaded_tokens"], 128)
        self.assertEqual(consumer.worker.stats["saved_blocks"], 0)  # stored already
        for name in NAMES:
            for e in range(4):  # the 4 loaded blocks, byte for byte as each backend reads them
                ks, vs = read_block("rows", publisher.kv[name], src_ids[e], 1)
                kd, vd = read_block("content", consumer.kv[name], dst_ids[e], 2)
                self.assertTrue(torch.equal(ks, kd) and torch.equal(vs, vd), (name, e))
            k, v = read_block("content", consumer.kv[name], dst_ids[4], 2)  # computed locally
            self.assertEqual(float(k.abs().sum() + v.abs().sum()), 0.0)

    def test_counters_reach_vllms_stats_hooks(self):
        tokens = list(range(18000, 18150))
        engine = Engine(self, kv=caches(seed=12))
        engine.prefill(request("st", tokens), [0, 1, 2, 3, 4])
        worker = engine.worker.get_kv_connector_stats()
        self.assertEqual(worker.reduce()["saved_blocks"], 2)
        self.assertIsNone(engine.worker.get_kv_connector_stats())  # nothing new since
        scheduler = engine.scheduler.get_kv_connector_stats()
        # vLLM's KVConnectorLogging sums both sides through the class's own stats type.
        total = KvstrataConnector.build_kv_connector_stats(worker.data).aggregate(scheduler)
        self.assertEqual(total.reduce()["lookups"], 1)
        self.assertEqual(total.reduce()["saved_blocks"], 2)
        self.assertFalse(total.is_empty())

    def test_a_node_killed_between_lookup_and_load_is_recomputed(self):
        with NodeProcess(dram_bytes=64 << 20) as node:
            tokens = list(range(19000, 19130))
            Engine(self, node=node.address, kv=caches(seed=13)).prefill(request("k", tokens),
                                                                          [0, 1, 2, 3, 4])
            engine = Engine(self, node=node.address, timeout=2.0)
            req = request("k2", tokens)
            self.assertEqual(engine.admit(req, [5, 6, 7, 8, 9]), 128)
        # The node is gone before the worker's fetch.
        _, errors = engine.step(new=[(req, [5, 6, 7, 8, 9], 128)], scheduled={"k2": 2})
        self.assertEqual(errors, {5, 6, 7, 8})
        self.assertEqual(engine.worker.stats["loaded_tokens"], 0)
        self.assertTrue(engine.worker.degraded)

    def test_asynchronous_loads_finish_through_get_finished(self):
        tokens = list(range(20000, 20150))
        publisher = Engine(self, kv=caches(seed=14))
        publisher.prefill(request("ap", tokens), [9, 3, 12, 0, 7])
        engine = Engine(self, async_load=True)
        req = request("a", tokens)
        # load_async=True: vLLM parks the request (WAITING_FOR_REMOTE_KVS) and
        # schedules nothing of it; the loads start after that step's forward.
        self.assertEqual(engine.admit(req, [4, 15, 1, 8, 2], asynchronous=True), 128)
        finished, errors = engine.step(sync_loads=False)
        deadline = time.monotonic() + 10
        while not finished[1] and time.monotonic() < deadline:  # later, empty steps
            finished, errors = engine.step(sync_loads=False)
        self.assertEqual(finished, (None, {"a"}))
        self.assertEqual(errors, set())
        self.assertEqual(engine.worker.stats["loaded_tokens"], 128)
        for name in NAMES:
            for s_id, d_id in zip([9, 3, 12, 0], [4, 15, 1, 8]):
                self.assertTrue(torch.equal(read_block("rows", publisher.kv[name], s_id, 1)[0],
                                            read_block("rows", engine.kv[name], d_id, 1)[0]))
        # Resumed: scheduled as a new request with its loaded tokens computed;
        # vLLM's second update_state_after_alloc call loads nothing more.
        engine.scheduler.update_state_after_alloc(req, blocks([4, 15, 1, 8, 2]), 0)
        _, errors = engine.step(new=[(req, [4, 15, 1, 8, 2], 128)], scheduled={"a": 22})
        self.assertEqual((errors, engine.worker.stats["loaded_tokens"]), (set(), 128))

    def test_a_failed_asynchronous_load_is_finished_with_its_errors(self):
        with NodeProcess(dram_bytes=64 << 20) as node:
            tokens = list(range(21000, 21130))
            Engine(self, node=node.address, kv=caches(seed=15)).prefill(request("fp", tokens),
                                                                          [0, 1, 2, 3, 4])
            engine = Engine(self, node=node.address, async_load=True, timeout=2.0)
            req = request("f", tokens)
            self.assertEqual(engine.admit(req, [5, 6, 7, 8, 9], asynchronous=True), 128)
        finished, errors = engine.step(sync_loads=False)
        deadline = time.monotonic() + 10
        while not finished[1] and time.monotonic() < deadline:
            finished, errors = engine.step(sync_loads=False)
        # Reported finished, and its blocks as load errors, in the same pass.
        self.assertEqual((finished, errors), ((None, {"f"}), {5, 6, 7, 8}))
        self.assertEqual(engine.worker.stats["loaded_tokens"], 0)

    def test_never_loads_the_last_prompt_token(self):
        tokens = list(range(7000, 7128))  # exactly two cache blocks
        Engine(self, kv=caches(seed=4)).prefill(request("p2", tokens), [0, 1, 2, 3])
        consumer = Engine(self)
        # 127 tokens could be loaded; whole engine blocks only: 96.
        req = request("c2", tokens)
        self.assertEqual(consumer.admit(req, [5, 6, 7, 8]), 96)
        _, errors = consumer.step(new=[(req, [5, 6, 7, 8], 96)], scheduled={"c2": 32})
        self.assertEqual(consumer.worker.stats["loaded_tokens"], 96)
        k, v = read_block("rows", consumer.kv[NAMES[0]], 8, 1)
        self.assertEqual(float(k.abs().sum() + v.abs().sum()), 0.0)

    def test_chunked_prefill_publishes_each_whole_block_once(self):
        tokens = list(range(8000, 8200))  # 3 whole cache blocks
        engine = Engine(self, kv=caches(seed=8))
        req = request("chunked", tokens)
        self.assertEqual(engine.admit(req, list(range(7))), 0)
        engine.step(new=[(req, list(range(7)), 0)], scheduled={"chunked": 100})  # block 0
        self.assertEqual(engine.worker.stats["saved_blocks"], 1)
        engine.step(cached=[("chunked", None, 100, False)], scheduled={"chunked": 100})  # 1, 2
        self.assertEqual(engine.worker.stats["saved_blocks"], 3)
        self.assertEqual(Engine(self).admit(request("again", tokens), list(range(7))), 192)

    def test_a_preempted_request_resumes_into_new_blocks(self):
        tokens = list(range(8500, 8630))  # 2 whole cache blocks
        engine = Engine(self, kv=caches(seed=9))
        req = request("pre", tokens)
        engine.admit(req, [0, 1])
        engine.step(new=[(req, [0, 1], 0)], scheduled={"pre": 64})  # block 0 saved from 0, 1
        # Preempted, then resumed with all-new blocks: block 1 is saved from them.
        engine.step(cached=[("pre", [10, 11, 12, 13, 14], 64, True)], scheduled={"pre": 66})
        self.assertEqual(engine.worker.stats["saved_blocks"], 2)
        consumer = Engine(self)
        r = request("post", tokens)
        self.assertEqual(consumer.admit(r, [3, 4, 5, 6, 7]), 128)
        consumer.step(new=[(r, [3, 4, 5, 6, 7], 128)], scheduled={"post": 2})
        for src, dst in ((0, 3), (1, 4), (12, 5), (13, 6)):
            self.assertTrue(torch.equal(read_block("rows", engine.kv[NAMES[1]], src, 1)[0],
                                        read_block("rows", consumer.kv[NAMES[1]], dst, 1)[0]))

    def test_a_prefix_counts_only_when_every_layer_has_it(self):
        tokens = list(range(9000, 9192))
        publisher = Engine(self, kv=caches(seed=5))
        publisher.prefill(request("p3", tokens), list(range(6)))
        keys = vllm_connector.chain_keys(publisher.worker._chain_id, tokens, CACHE)
        publisher.worker._namespace(1).delete(keys[1:])  # layer 1 lost blocks 1 and 2
        self.assertEqual(Engine(self).admit(request("c3", tokens), list(range(6))), 64)

    def test_a_block_evicted_after_the_lookup_is_a_load_error(self):
        tokens = list(range(11000, 11130))
        publisher = Engine(self, kv=caches(seed=6))
        publisher.prefill(request("p4", tokens), list(range(5)))
        consumer = Engine(self)
        req = request("c4", tokens)
        external, _ = consumer.scheduler.get_num_new_matched_tokens(req, 0)
        self.assertEqual(external, 128)
        keys = vllm_connector.chain_keys(publisher.worker._chain_id, tokens, CACHE)
        publisher.worker._namespace(1).delete(keys[1:2])
        consumer.scheduler.update_state_after_alloc(req, blocks(list(range(5))), external)
        _, errors = consumer.step(new=[(req, list(range(5)), 128)], scheduled={"c4": 2})
        self.assertEqual(errors, {0, 1, 2, 3})  # the request's loaded blocks: recomputed
        self.assertEqual(consumer.worker.stats["load_errors"], 4)

    def test_same_tokens_with_other_salt_lora_or_images_never_share_blocks(self):
        tokens = list(range(12000, 12130))
        image = lambda h: [MultiModalFeatureSpec(data=None, modality="image", identifier=h,
                                                 mm_position=PlaceholderRange(offset=70, length=20))]
        lora = lambda name, path: LoRARequest(name, 1, path)
        variants = {
            "plain": {}, "salt-a": {"cache_salt": "a"}, "salt-b": {"cache_salt": "b"},
            "lora-x": {"lora_request": lora("x", "/adapters/x")},
            "lora-x2": {"lora_request": lora("x", "/adapters/x-v2")},  # same name, other weights
            "image-1": {"mm_features": image("hash-1")},
            "image-2": {"mm_features": image("hash-2")},
        }
        for i, (name, kwargs) in enumerate(variants.items()):
            Engine(self, kv=caches(seed=20 + i)).prefill(request("v-" + name, tokens, **kwargs),
                                                          [0, 1, 2, 3, 4])
        for name, kwargs in variants.items():
            engine = Engine(self)
            r = request("again-" + name, tokens, **kwargs)
            self.assertEqual(engine.admit(r, [5, 6, 7, 8, 9]), 128, name)
            engine.step(new=[(r, [5, 6, 7, 8, 9], 128)], scheduled={r.request_id: 2})
            seed = 20 + list(variants).index(name)
            source = caches(seed=seed)  # what that variant's own publisher held
            # Cache block 1 (engine blocks 2, 3) differs in every variant; block 0
            # too, except for the images, which start in block 1 (as in vLLM,
            # whose extra keys cover only the blocks an image overlaps).
            self.assertTrue(torch.equal(read_block("rows", engine.kv[NAMES[0]], 7, 1)[0],
                                        read_block("rows", source[NAMES[0]], 2, 1)[0]), name)
        # The image covers tokens 70..89: block 0's key is the plain one, block 1's is not.
        plain = vllm_connector.chain_keys(1, tokens, CACHE)
        extras = vllm_connector._block_extras(request("i", tokens, mm_features=image("hash-1")),
                                              2, CACHE)
        self.assertEqual(extras[0], None)
        with_image = vllm_connector.chain_keys(1, tokens, CACHE, extras)
        self.assertEqual(with_image[0], plain[0])
        self.assertNotEqual(with_image[1], plain[1])

    def test_extra_key_chain_test_vectors(self):
        # DESIGN.md §3's chain with vLLM's extra keys folded into the parent
        # (vllm_connector.fold_extra_keys), computed here with hashlib only.
        def key(cid, parent, tokens):
            data = struct.pack("<Q", cid) + parent + b"".join(struct.pack("<I", t) for t in tokens)
            return hashlib.sha256(data).digest()[:16]

        def fold(parent, salt):  # ("cache_salt", salt), type-tagged
            enc = b"t" + struct.pack("<I", 1) + b"t" + struct.pack("<I", 2)
            for s in ("cache_salt", salt):
                enc += b"s" + struct.pack("<I", len(s)) + s.encode()
            return hashlib.sha256(b"kvstrata-extra\0" + parent + enc).digest()[:16]

        cid = vllm_connector.chain_id("tiny-llama", "", 4)
        tokens = list(range(1, 9))
        k0 = key(cid, fold(bytes(16), "s"), tokens[:4])
        k1 = key(cid, k0, tokens[4:])
        self.assertEqual(vllm_connector.chain_keys(cid, tokens, 4, [(("cache_salt", "s"),), None]),
                         [k0, k1])
        self.assertEqual(vllm_connector.chain_keys(cid, tokens, 4),
                         kvstrata.keys(cid, tokens, 4))
        self.assertEqual(k1.hex(), key(cid, k0, tokens[4:]).hex())

    def test_prompt_embeds_requests_are_skipped(self):
        engine = Engine(self)
        req = Request("emb", None, SamplingParams(max_tokens=1), None,
                      prompt_embeds=torch.zeros(70, 128))
        self.assertEqual(engine.scheduler.get_num_new_matched_tokens(req, 0), (0, False))
        engine.scheduler.update_state_after_alloc(req, blocks([0, 1, 2]), 0)
        _, errors = engine.step(new=[(req, [0, 1, 2], 0)], scheduled={"emb": 70})
        self.assertEqual(engine.scheduler.stats["skipped_requests"], 1)
        self.assertEqual(engine.worker.stats["saved_blocks"], 0)
        self.assertEqual(engine.scheduler.request_finished(req, [0, 1, 2]), (False, None))

    def test_node_down_at_start_is_degraded_then_comes_back(self):
        port = free_port()
        address = "127.0.0.1:%d" % port
        engine = Engine(self, node=address, retry_interval=0.3, timeout=2.0)
        tokens = list(range(13000, 13130))
        req = request("down", tokens)
        began = time.monotonic()
        self.assertEqual(engine.admit(req, [0, 1, 2, 3, 4]), 0)
        self.assertEqual(engine.admit(request("down2", tokens), [0, 1, 2, 3, 4]), 0)
        self.assertLess(time.monotonic() - began, 1.0)
        self.assertTrue(engine.scheduler.degraded)
        # Degraded by the first failure (the background namespace warm-up, or
        # the first lookup if it came first): the second asks nothing.
        self.assertGreaterEqual(engine.scheduler.stats["degraded_lookups"], 1)
        self.assertEqual(engine.scheduler.stats["lookup_hits"], 0)
        _, errors = engine.step(new=[(req, [0, 1, 2, 3, 4], 0)], scheduled={"down": 130})
        self.assertEqual(errors, set())
        self.assertGreater(engine.worker.stats["save_errors"], 0)  # counted, never raised
        # A node appears at that address: a background probe notices.
        with NodeProcess(dram_bytes=64 << 20, extra_flags=["--listen=" + address]):
            Engine(self, node=address, kv=caches(seed=7)).prefill(request("up", tokens), [0, 1, 2, 3, 4])
            deadline = time.monotonic() + 10
            found = 0
            while time.monotonic() < deadline and not found:
                found, _ = engine.scheduler.get_num_new_matched_tokens(request("x", tokens), 0)
                time.sleep(0.1)
            self.assertEqual(found, 128)
            self.assertFalse(engine.scheduler.degraded)

    def test_a_slow_node_answers_the_scheduler_within_its_deadline(self):
        with NodeProcess(dram_bytes=64 << 20) as node:
            tokens = list(range(14000, 14130))
            Engine(self, node=node.address, kv=caches(seed=8)).prefill(request("s", tokens), [0, 1, 2, 3, 4])
            engine = Engine(self, node=node.address, lookup_timeout=0.1)
            self.assertEqual(engine.scheduler.get_num_new_matched_tokens(request("s1", tokens), 0)[0], 128)
            os.kill(node.process.pid, signal.SIGSTOP)  # answers nothing, connections stay open
            try:
                stat = "/proc/%d/stat" % node.process.pid
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # the stop lands asynchronously
                    with open(stat) as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "T":
                            break
                    time.sleep(0.01)
                began = time.monotonic()
                self.assertEqual(engine.scheduler.get_num_new_matched_tokens(request("s2", tokens), 0),
                                 (0, False))
                self.assertLess(time.monotonic() - began, 0.5)
                self.assertEqual(engine.scheduler.stats["lookup_timeouts"], 1)
                # Degraded now: the next request does not wait for the node at all.
                began = time.monotonic()
                self.assertEqual(engine.scheduler.get_num_new_matched_tokens(request("s3", tokens), 0),
                                 (0, False))
                self.assertLess(time.monotonic() - began, 0.05)
                self.assertEqual(engine.scheduler.stats["degraded_lookups"], 1)
            finally:
                os.kill(node.process.pid, signal.SIGCONT)

    def test_request_finished_hints_every_layers_last_block(self):
        tokens = list(range(15000, 15150))
        engine = Engine(self, kv=caches(seed=5))
        req = request("h", tokens)
        engine.prefill(req, [0, 1, 2, 3, 4])
        before = self.stats()["request_hints"]
        self.assertEqual(engine.scheduler.request_finished(req, [0, 1, 2, 3, 4]), (False, None))
        self.assertTrue(engine.scheduler.wait_for_hints(10))
        self.assertEqual(engine.scheduler.stats["request_hints"], LAYERS)
        self.assertEqual(self.stats()["request_hints"], before + LAYERS)

    def test_a_failing_hint_never_raises(self):
        with NodeProcess(dram_bytes=64 << 20) as node:
            engine = Engine(self, node=node.address, kv=caches(seed=5), hint_timeout=1.0)
            req = request("hf", list(range(16000, 16150)))
            engine.prefill(req, [0, 1, 2, 3, 4])
        self.assertEqual(engine.scheduler.request_finished(req, [0, 1, 2, 3, 4]), (False, None))
        self.assertTrue(engine.scheduler.wait_for_hints(30))
        self.assertEqual(engine.scheduler.stats["hint_errors"], 1)
        engine.scheduler.shutdown()

    @unittest.skipUnless(torch.cuda.is_available(),
                         "no CUDA device: the pinned-staging / CUDA-stream path is not run here")
    def test_cuda_caches_go_through_pinned_staging(self):
        tokens = list(range(17000, 17150))
        source = {n: t.cuda() for n, t in caches(seed=11).items()}
        publisher = Engine(self, packing="rows", kv=source)
        self.assertTrue(publisher.worker._save_pool.memory.is_pinned())
        publisher.prefill(request("g", tokens), [2, 5, 9, 1, 0])
        self.assertEqual(publisher.worker.stats["saved_blocks"], 2)
        consumer = Engine(self, packing="content",
                          kv={n: t.cuda() for n, t in caches(KVCacheLayout.LBNHC, kernel=16).items()})
        req = request("g2", tokens)
        self.assertEqual(consumer.admit(req, [7, 3, 11, 4, 6]), 128)
        _, errors = consumer.step(new=[(req, [7, 3, 11, 4, 6], 128)], scheduled={"g2": 22})
        self.assertEqual(errors, set())
        for name in NAMES:
            for s_id, d_id in zip([2, 5, 9, 1], [7, 3, 11, 4]):
                ks, vs = read_block("rows", source[name], s_id, 1)
                kd, vd = read_block("content", consumer.kv[name], d_id, 2)
                self.assertTrue(torch.equal(ks, kd) and torch.equal(vs, vd))

    def test_a_precision_budget_opens_layout_namespaces_and_loads_back(self):
        # coarsest_format: fp16 K/V caches go to namespaces with the layout
        # (one layer), which the node may transcode under pressure; here it
        # has room, so the blocks come back raw, byte for byte.
        tokens = list(range(7000, 7150))
        extra = {"coarsest_format": "int4_kivi", "dtype": "float16"}
        publisher = Engine(self, packing="rows", kv=caches(seed=5, dtype=torch.float16), **extra)
        src_ids = [2, 5, 11, 1, 6]
        external, (_, errors) = publisher.prefill(request("pp", tokens), src_ids)
        self.assertEqual((external, errors), (0, set()))
        self.assertEqual(publisher.worker.stats["saved_blocks"], 2)
        ns = publisher.worker._namespace(0)
        self.assertEqual(ns.block_bytes, 2 * CACHE * HEADS * HEAD * 2)
        consumer = Engine(self, packing="rows", kv=caches(dtype=torch.float16), **extra)
        req = request("pc", tokens)
        dst_ids = [3, 8, 0, 14, 9]
        self.assertEqual(consumer.admit(req, dst_ids), 128)
        _, errors = consumer.step(new=[(req, dst_ids, 128)], scheduled={"pc": 22})
        self.assertEqual(errors, set())
        for name in NAMES:
            for e in range(4):
                ks, vs = read_block("rows", publisher.kv[name], src_ids[e], 1)
                kd, vd = read_block("rows", consumer.kv[name], dst_ids[e], 1)
                self.assertTrue(torch.equal(ks, kd) and torch.equal(vs, vd), (name, e))
        # Without the budget it is another (opaque) namespace: nothing shared.
        plain = Engine(self, packing="rows", kv=caches(dtype=torch.float16), dtype="float16")
        self.assertEqual(plain.admit(request("px", tokens), [4, 7, 10, 12, 13]), 0)

    def test_bad_config_is_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "multiple of vLLM's block size"):
            KvstrataConnector(self.config(cache_block_tokens=48), KVConnectorRole.WORKER)
        with self.assertRaisesRegex(ValueError, "replication"):
            KvstrataConnector(self.config(nodes=[self.address], replication=0),
                              KVConnectorRole.SCHEDULER)
        worker = KvstrataConnector(self.config(kv_packing="content"), KVConnectorRole.WORKER)
        with self.assertRaisesRegex(ValueError, "kv heads"):
            worker.register_kv_caches({NAMES[0]: torch.zeros(4, 8, BS, 2 * HEAD)})


if __name__ == "__main__":
    unittest.main()
