#!/usr/bin/python3
"""KvstrataConnector with fake vLLM scheduler and request objects, against a real node."""
import os
import subprocess
import sys
import types
import unittest

import torch

import kvstrata
from kvstrata.testing import NodeProcess
from kvstrata.vllm_connector import (KVConnectorBase_V1, KVConnectorRole, KvstrataConnector,
                                     KvstrataConnectorMetadata, _output_tokens)

LAYERS, HEADS, HEAD, BS, CACHE = 3, 2, 8, 16, 64  # cache blocks of 4 engine blocks


def config(node, **extra):
    settings = {"node": node, "cache_block_tokens": CACHE, "num_layers": LAYERS,
                "num_kv_heads": HEADS, "head_size": HEAD, "dtype": "float32"}
    settings.update(extra)
    return types.SimpleNamespace(
        kv_transfer_config=types.SimpleNamespace(kv_connector_extra_config=settings),
        model_config=types.SimpleNamespace(model="fake-model", dtype=torch.float32),
        cache_config=types.SimpleNamespace(block_size=BS),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1))


class FakeRequest:
    def __init__(self, request_id, tokens, output_token_ids=None):
        self.request_id = request_id
        self.prompt_token_ids = tokens
        if output_token_ids is not None:
            self.output_token_ids = output_token_ids


class FakeBlocks:  # vLLM's KVCacheBlocks: one group of block ids
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (list(self.ids),)


def scheduler_output(req_id, tokens, block_ids, computed, scheduled):
    new = types.SimpleNamespace(req_id=req_id, prompt_token_ids=tokens, block_ids=(block_ids,),
                                num_computed_tokens=computed)
    cached = types.SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[])
    return types.SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                                 num_scheduled_tokens={req_id: scheduled})


def layer(i):
    return "model.layers.%d.self_attn.attn" % i


def kv_caches(num_blocks, seed=None):
    g = torch.Generator().manual_seed(seed or 0)
    make = (lambda: torch.randn(2, num_blocks, BS, HEADS, HEAD, generator=g)) if seed else (
        lambda: torch.zeros(2, num_blocks, BS, HEADS, HEAD))
    return {layer(i): make() for i in range(LAYERS)}


class Side:
    """A scheduler-side and a worker-side connector, as vLLM creates them."""

    def __init__(self, node, caches, **extra):
        self.scheduler = KvstrataConnector(config(node, **extra), KVConnectorRole.SCHEDULER)
        self.worker = KvstrataConnector(config(node, **extra), KVConnectorRole.WORKER)
        self.worker.register_kv_caches(caches)
        self.caches = caches

    def step(self, output, forward=None):
        self.worker.bind_connector_metadata(self.scheduler.build_connector_meta(output))
        self.worker.start_load_kv(None)
        for i in range(LAYERS):
            self.worker.wait_for_layer_load(layer(i))
            if forward:
                forward(i)
            self.worker.save_kv_layer(layer(i), self.caches[layer(i)], None)
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()


class ConnectorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.node = NodeProcess(dram_bytes=128 << 20)

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()

    def prefill(self, req_id, tokens, caches, block_ids):
        """Publishes what a local prefill of `tokens` computed into `block_ids`."""
        side = Side(self.node.address, caches)
        request = FakeRequest(req_id, tokens)
        self.assertEqual(side.scheduler.get_num_new_matched_tokens(request, 0), (0, False))
        side.scheduler.update_state_after_alloc(request, FakeBlocks(block_ids), 0)
        side.step(scheduler_output(req_id, tokens, block_ids, 0, len(tokens)))
        self.assertEqual(side.scheduler.request_finished(request, block_ids), (False, None))
        return side

    def test_is_a_v1_connector(self):
        self.assertTrue(issubclass(KvstrataConnector, KVConnectorBase_V1))
        for method in ("get_num_new_matched_tokens", "update_state_after_alloc",
                       "build_connector_meta", "request_finished", "register_kv_caches",
                       "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
                       "get_finished"):
            self.assertTrue(callable(getattr(KvstrataConnector, method)), method)

    def test_publishes_full_cache_blocks_only_and_loads_them_elsewhere(self):
        tokens = list(range(5000, 5000 + 150))  # 2 full cache blocks of 64, 22 tokens over
        source = kv_caches(16, seed=3)
        src_ids = list(range(15, 5, -1))  # 10 engine blocks, scattered
        side = self.prefill("p", tokens, source, src_ids)
        self.assertEqual(side.worker.stats["saved_blocks"], 2)
        ns = side.worker._namespace(LAYERS - 1)
        self.assertEqual(ns.lookup(ns.keys(tokens)), 2)  # the partial third block is not there

        dest = kv_caches(16)
        decode = Side(self.node.address, dest)
        request = FakeRequest("d", tokens)
        # Already computed locally (e.g. vLLM's own prefix cache): only the rest is new.
        self.assertEqual(decode.scheduler.get_num_new_matched_tokens(request, 32), (96, False))
        # The scheduler may ask again; the last answer is the one it allocates for.
        self.assertEqual(decode.scheduler.get_num_new_matched_tokens(request, 0), (128, False))
        dst_ids = [2, 9, 4, 11, 0, 7, 1, 13, 3, 5]
        decode.scheduler.update_state_after_alloc(request, FakeBlocks(dst_ids), 128)
        order = []
        decode.step(scheduler_output("d", tokens, dst_ids, 128, len(tokens) - 128),
                    forward=order.append)
        self.assertEqual(order, [0, 1, 2])
        self.assertEqual(decode.worker.stats["loaded_tokens"], 128)
        for i in range(LAYERS):
            for e in range(8):  # the 8 engine blocks of the loaded prefix
                self.assertTrue(torch.equal(dest[layer(i)][:, dst_ids[e]], source[layer(i)][:, src_ids[e]]))
            for e in (8, 9):  # computed locally, untouched by the load
                self.assertEqual(float(dest[layer(i)][:, dst_ids[e]].abs().sum()), 0.0)
        self.assertEqual(decode.worker.stats["saved_blocks"], 0)  # it was cached: no republish
        self.assertEqual(decode.worker.get_block_ids_with_load_errors(), set())
        self.assertEqual(decode.worker.get_finished({"d"}), (None, None))

    def test_never_loads_the_last_prompt_token(self):
        tokens = list(range(7000, 7000 + 128))  # exactly two cache blocks
        source = kv_caches(8, seed=4)
        self.prefill("p2", tokens, source, list(range(8)))
        decode = Side(self.node.address, kv_caches(8))
        # 127 tokens could be loaded; whole engine blocks only: 112.
        self.assertEqual(decode.scheduler.get_num_new_matched_tokens(FakeRequest("d2", tokens), 0),
                         (112, False))
        request = FakeRequest("d2", tokens)
        decode.scheduler.update_state_after_alloc(request, FakeBlocks(list(range(8))), 112)
        decode.step(scheduler_output("d2", tokens, list(range(8)), 112, 16))
        for i in range(LAYERS):
            self.assertTrue(torch.equal(decode.caches[layer(i)][:, :7], source[layer(i)][:, :7]))
            self.assertEqual(float(decode.caches[layer(i)][:, 7].abs().sum()), 0.0)

    def test_a_prefix_counts_only_when_every_layer_has_it(self):
        tokens = list(range(9000, 9000 + 192))
        side = self.prefill("p3", tokens, kv_caches(12, seed=5), list(range(12)))
        ns = side.worker._namespace(1)
        ns.delete(ns.keys(tokens)[1:])  # layer 1 lost blocks 1 and 2
        decode = Side(self.node.address, kv_caches(12))
        self.assertEqual(decode.scheduler.get_num_new_matched_tokens(FakeRequest("d3", tokens), 0),
                         (64, False))

    def test_a_block_evicted_after_the_lookup_is_a_load_error(self):
        tokens = list(range(11000, 11000 + 130))
        side = self.prefill("p4", tokens, kv_caches(9, seed=6), list(range(9)))
        decode = Side(self.node.address, kv_caches(9))
        request = FakeRequest("d4", tokens)
        self.assertEqual(decode.scheduler.get_num_new_matched_tokens(request, 0), (128, False))
        ns = side.worker._namespace(2)
        ns.delete(ns.keys(tokens)[1:2])
        decode.scheduler.update_state_after_alloc(request, FakeBlocks(list(range(9))), 128)
        decode.step(scheduler_output("d4", tokens, list(range(9)), 128, 2))
        self.assertEqual(decode.worker.get_block_ids_with_load_errors(), set(range(8)))

    def test_load_window_bounds_fetches_in_flight(self):
        tokens = list(range(13000, 13000 + 64))
        self.prefill("p5", tokens, kv_caches(5, seed=7), list(range(5)))
        decode = Side(self.node.address, kv_caches(5), load_window=1)
        meta = KvstrataConnectorMetadata()
        from kvstrata.vllm_connector import TransferSpec
        meta.loads.append(TransferSpec("d5", tokens, list(range(5)), 0, 48))
        decode.worker.bind_connector_metadata(meta)
        decode.worker.start_load_kv(None)
        issued = [name for name, s in decode.worker._loads.items() if s["future"] is not None]
        self.assertEqual(issued, [layer(0)])
        for i in range(LAYERS):
            decode.worker.wait_for_layer_load(layer(i))
        self.assertEqual(decode.worker.stats["loaded_tokens"], 48)

    def test_rejects_bad_layouts(self):
        with self.assertRaises(ValueError):
            KvstrataConnector(config(self.node.address, cache_block_tokens=40),
                              KVConnectorRole.WORKER)
        worker = KvstrataConnector(config(self.node.address), KVConnectorRole.WORKER)
        with self.assertRaises(ValueError):
            worker.register_kv_caches({layer(0): torch.zeros(2, 4, 8, HEADS, HEAD)})

    def test_an_unreachable_node_is_a_miss(self):
        with NodeProcess(dram_bytes=64 << 20) as other:
            address = other.address
        scheduler = KvstrataConnector(config(address, timeout=2.0), KVConnectorRole.SCHEDULER)
        self.assertEqual(scheduler.get_num_new_matched_tokens(FakeRequest("x", list(range(100))), 0),
                         (0, False))

    def finish_after_prefill(self, address, tokens, output_token_ids, **extra):
        """A scheduler that published `tokens` (as far as whole cache blocks go),
        after the request finished with `output_token_ids`."""
        scheduler = KvstrataConnector(config(address, **extra), KVConnectorRole.SCHEDULER)
        request = FakeRequest("h", tokens, output_token_ids)
        scheduler.update_state_after_alloc(request, FakeBlocks([]), 0)
        scheduler.build_connector_meta(scheduler_output("h", tokens, list(range(10)), 0,
                                                        len(tokens)))
        self.assertEqual(scheduler.request_finished(request, []), (False, None))
        return scheduler

    def test_request_finished_hints_the_last_published_block_of_every_layer(self):
        tokens = list(range(15000, 15000 + 150))  # 2 whole cache blocks
        side = self.prefill("hp", tokens, kv_caches(16, seed=5), list(range(10)))
        stats = side.scheduler._client.stats
        self.assertTrue(side.scheduler.wait_for_hints(10))  # prefill()'s own finish
        before = stats()["request_hints"]
        scheduler = self.finish_after_prefill(self.node.address, tokens, [1] * 37)
        self.assertTrue(scheduler.wait_for_hints(10))
        self.assertEqual(scheduler.stats["request_hints"], LAYERS)
        self.assertEqual(scheduler.stats["hint_errors"], 0)
        self.assertEqual(stats()["request_hints"], before + LAYERS)
        # vLLM's Request has num_output_tokens; else output_token_ids; else unknown (0).
        self.assertEqual(_output_tokens(types.SimpleNamespace(num_output_tokens=5,
                                                              output_token_ids=[1])), 5)
        self.assertEqual(_output_tokens(FakeRequest("o", [], [1] * 37)), 37)
        self.assertEqual(_output_tokens(FakeRequest("o", [])), 0)
        # Nothing whole was published: no hint.
        short = self.finish_after_prefill(self.node.address, tokens[:50], [1])
        self.assertTrue(short.wait_for_hints(10))
        self.assertEqual(short.stats["request_hints"], 0)
        # Hints off.
        off = self.finish_after_prefill(self.node.address, tokens, [1], request_hints=False)
        self.assertTrue(off.wait_for_hints(10))
        self.assertEqual(off.stats["request_hints"], 0)
        self.assertEqual(stats()["request_hints"], before + LAYERS)

    def test_a_failing_hint_never_raises(self):
        with NodeProcess(dram_bytes=64 << 20) as other:
            address = other.address
        scheduler = self.finish_after_prefill(address, list(range(150)), [1, 2],
                                              timeout=2.0, hint_timeout=1.0)
        self.assertTrue(scheduler.wait_for_hints(30))
        self.assertEqual(scheduler.stats["hint_errors"], 1)  # stops at the first failing layer
        self.assertEqual(scheduler.stats["request_hints"], 0)
        scheduler.shutdown()

    def test_exiting_with_hints_in_flight_exits_cleanly(self):
        # A daemon thread inside an RPC when the interpreter finalizes aborts
        # the process ("terminate called without an active exception"): the
        # sender must stop its thread at exit.
        script = """
import sys
sys.path.insert(0, %r)
import connector_test as t
s = t.KvstrataConnector(t.config(%r, num_layers=1000), t.KVConnectorRole.SCHEDULER)
tokens = list(range(20000, 20150))
r = t.FakeRequest("x", tokens, [1])
s.update_state_after_alloc(r, t.FakeBlocks([]), 0)
s.build_connector_meta(t.scheduler_output("x", tokens, list(range(10)), 0, len(tokens)))
s.request_finished(r, [])
import time
time.sleep(0.2)  # the hint thread is now inside its RPCs (1000 layers' worth)
""" % (os.path.dirname(os.path.abspath(__file__)), self.node.address)
        for _ in range(3):
            run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                 timeout=120)
            self.assertEqual(run.returncode, 0, run.stderr)


if __name__ == "__main__":
    unittest.main()
