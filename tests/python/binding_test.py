#!/usr/bin/python3
"""The kvstrata Python binding against a real kvstrata-node ($KVSTRATA_NODE)."""
import gc
import hashlib
import struct
import unittest

import numpy as np
import torch

import kvstrata
from kvstrata.testing import NodeProcess

BLOCK = 64 << 10


class DlpackOnly:
    """An object that exports its memory only through __dlpack__."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, stream=None):
        return self.array.__dlpack__()


class NodeClientCase(unittest.TestCase):
    """Tests sharing one 64 MiB node and one client of it (cls.node, cls.client)."""

    @classmethod
    def setUpClass(cls):
        cls.node = NodeProcess(dram_bytes=64 << 20)
        cls.client = kvstrata.Client(cls.node.address, timeout=10.0)

    @classmethod
    def tearDownClass(cls):
        del cls.client
        cls.node.stop()


class BindingTest(NodeClientCase):
    def namespace(self, model):
        return self.client.open_namespace(tenant="test", model=model, tokens_per_block=4,
                                          block_bytes=BLOCK)

    def test_keys_match_the_specification(self):
        # DESIGN.md §3, computed here with hashlib.
        def reference(ns_id, tokens, per_block):
            keys, previous = [], bytes(16)
            for start in range(0, len(tokens) - per_block + 1, per_block):
                data = struct.pack("<Q", ns_id) + previous + b"".join(
                    struct.pack("<I", t) for t in tokens[start:start + per_block])
                previous = hashlib.sha256(data).digest()[:16]
                keys.append(previous)
            return keys

        tokens = list(range(1000, 1010))
        ns = self.namespace("keys")
        self.assertEqual(ns.keys(tokens), reference(ns.id, tokens, 4))
        self.assertEqual(len(ns.keys(tokens)), 2)  # the partial block gets no key
        self.assertEqual(kvstrata.keys(0x0123456789ABCDEF, np.arange(8, dtype=np.uint32), 4)[0].hex(),
                         "fca41ba1df85097534eac94507e4c469")
        # numpy int64, torch and lists agree; chaining from a parent continues the chain.
        self.assertEqual(ns.keys(np.array(tokens)), ns.keys(torch.tensor(tokens)))
        self.assertEqual(ns.keys(tokens[4:], parent=ns.keys(tokens)[0])[0], ns.keys(tokens)[1])

    def test_round_trip_through_every_kind_of_buffer(self):
        ns = self.namespace("roundtrip")
        keys = ns.keys(list(range(5 * 4)))
        rng = np.random.default_rng(1)
        source = rng.integers(0, 256, size=5 * BLOCK, dtype=np.uint8)
        items = [(k, keys[i - 1] if i else None, source, i * BLOCK) for i, k in enumerate(keys)]
        result = ns.publish(items)
        self.assertEqual(result.outcomes, [kvstrata.Outcome.OK] * 5)
        self.assertEqual(result.bytes, 5 * BLOCK)
        self.assertEqual(ns.publish(items[:1]).outcomes, [kvstrata.Outcome.ALREADY_PRESENT])
        self.assertEqual(ns.lookup(keys), 5)
        self.assertEqual(ns.lookup_tiers(keys), ["dram"] * 5)
        self.assertEqual(ns.lookup(keys[:2] + [bytes(16)] + keys[3:]), 2)

        destinations = {
            "numpy": np.zeros(5 * BLOCK, dtype=np.uint8),
            "bytearray": bytearray(5 * BLOCK),
            "memoryview": memoryview(bytearray(5 * BLOCK)),
            "torch": torch.zeros(5 * BLOCK // 4, dtype=torch.float32),
            "registered": self.client.register(np.zeros(5 * BLOCK, dtype=np.uint8)),
            "allocated": self.client.allocate(5 * BLOCK),
            "dlpack": DlpackOnly(np.zeros(5 * BLOCK // 8, dtype=np.float64)),
        }
        for name, destination in destinations.items():
            with self.subTest(name):
                result = ns.fetch([(k, destination, i * BLOCK) for i, k in enumerate(keys)])
                self.assertEqual(result.count(kvstrata.Outcome.OK), 5)
                if isinstance(destination, torch.Tensor):
                    got = destination.view(torch.uint8).numpy()
                elif isinstance(destination, DlpackOnly):
                    got = destination.array.view(np.uint8)
                elif isinstance(destination, kvstrata.Buffer):
                    got = np.frombuffer(memoryview(destination), dtype=np.uint8)
                else:
                    got = np.frombuffer(destination, dtype=np.uint8)
                np.testing.assert_array_equal(got, source)

    def test_async_keeps_buffers_alive_and_reports_misses(self):
        ns = self.namespace("async")
        keys = ns.keys(list(range(64 * 4)))
        source = torch.arange(64 * BLOCK // 4, dtype=torch.int32)
        future = ns.publish_async([(k, keys[i - 1] if i else None, source.clone(), i * BLOCK)
                                   for i, k in enumerate(keys)])
        gc.collect()  # the clone has no other reference: the future holds it
        self.assertEqual(future.wait().count(kvstrata.Outcome.OK), 64)
        self.assertTrue(future.done())
        self.assertEqual(future.wait().bytes, 64 * BLOCK)  # wait() is repeatable

        destination = torch.zeros_like(source)
        missing = ns.keys(list(range(900, 904)))[0]
        future = ns.fetch_async([(k, destination, i * BLOCK) for i, k in enumerate(keys)] +
                                [(missing, bytearray(BLOCK), 0)])
        del destination  # the future keeps it alive until the bytes have landed
        gc.collect()
        result = future.wait(timeout=30.0)
        self.assertEqual(result.outcomes[:64], [kvstrata.Outcome.OK] * 64)
        self.assertEqual(result.outcomes[64], kvstrata.Outcome.NOT_FOUND)
        # A future dropped without wait() finishes its transfer first.
        target = torch.zeros_like(source)
        ns.fetch_async([(k, target, i * BLOCK) for i, k in enumerate(keys)])
        gc.collect()
        self.assertTrue(torch.equal(target, source))

    def test_errors_carry_the_status_code(self):
        ns = self.namespace("errors")
        key = ns.keys([1, 2, 3, 4])[0]
        with self.assertRaises(kvstrata.Error) as caught:
            ns.fetch([(key, bytearray(BLOCK - 1), 0)])
        self.assertEqual(caught.exception.code, kvstrata.OUT_OF_RANGE)
        self.assertEqual(caught.exception.code_name, "OUT_OF_RANGE")
        with self.assertRaises(kvstrata.Error) as caught:
            ns.lookup([b"short"])
        self.assertEqual(caught.exception.code, kvstrata.INVALID_ARGUMENT)
        with self.assertRaises(kvstrata.Error) as caught:
            ns.fetch([(key, bytes(BLOCK), 0)])  # read-only destination
        self.assertEqual(caught.exception.code, kvstrata.INVALID_ARGUMENT)
        with self.assertRaises(kvstrata.Error) as caught:
            self.client.register(torch.zeros(4, 4).t())  # not contiguous
        self.assertEqual(caught.exception.code, kvstrata.INVALID_ARGUMENT)
        with self.assertRaises(kvstrata.Error) as caught:
            self.client.register(np.zeros((4, 4), dtype=np.float32).T)
        self.assertEqual(caught.exception.code, kvstrata.INVALID_ARGUMENT)
        with self.assertRaises(kvstrata.Error) as caught:
            self.client.register(DlpackOnly(np.zeros((4, 4), dtype=np.float32).T))
        self.assertEqual(caught.exception.code, kvstrata.INVALID_ARGUMENT)
        with self.assertRaises(kvstrata.Error) as caught:
            self.client.open_namespace(model="too-big", tokens_per_block=4, block_bytes=1 << 40)
        self.assertEqual(caught.exception.code, kvstrata.INVALID_ARGUMENT)
        self.assertIsInstance(caught.exception, RuntimeError)

    def test_unreachable_node_is_unavailable(self):
        with NodeProcess(dram_bytes=64 << 20) as other:
            address = other.address
        client = kvstrata.Client(address, timeout=2.0)
        with self.assertRaises(kvstrata.Error) as caught:
            client.open_namespace(model="gone", tokens_per_block=4, block_bytes=BLOCK)
        self.assertIn(caught.exception.code, (kvstrata.UNAVAILABLE, kvstrata.DEADLINE_EXCEEDED))

    def test_stats_count_the_traffic(self):
        ns = self.namespace("stats")
        before = self.client.stats()["published_blocks"]
        keys = ns.keys(list(range(8)))
        data = bytearray(2 * BLOCK)
        ns.publish([(keys[0], None, data, 0), (keys[1], keys[0], data, BLOCK)])
        self.assertEqual(self.client.stats()["published_blocks"], before + 2)
        self.assertEqual(ns.delete(keys), 2)
        self.assertEqual(ns.lookup(keys), 0)

    def test_request_finished_hints_the_node(self):
        ns = self.namespace("hints")
        keys = ns.keys(list(range(100, 108)))
        ns.publish([(keys[0], None, bytearray(BLOCK), 0)])
        before = self.client.stats()["request_hints"]
        self.assertIs(ns.request_finished(keys[0], 321), True)
        self.assertIs(ns.request_finished(keys[1], 0, timeout=5.0), False)  # never published
        self.assertEqual(self.client.stats()["request_hints"], before + 2)
        with self.assertRaises(kvstrata.Error) as caught:
            ns.request_finished(b"seven b", 1)
        self.assertEqual(caught.exception.code, kvstrata.INVALID_ARGUMENT)
        with self.assertRaises(TypeError):
            ns.request_finished(keys[0], -1)  # output_tokens is unsigned
        self.assertEqual(self.client.stats()["request_hints"], before + 2)


class PrecisionTest(unittest.TestCase):
    """A namespace with a precision budget on a node short of DRAM: cold blocks
    are transcoded instead of evicted, and fetch hands them back decoded to
    fp16 with their stored format named."""

    def test_budget_transcodes_and_fetch_decodes(self):
        node = NodeProcess(dram_bytes=16 << 20, extra_flags=["--slab_bytes=1048576",
                                                              "--eviction_policy=lru"])
        try:
            client = kvstrata.Client(node.address, timeout=20.0)
            layers, tokens, heads, dim = 2, 16, 8, 128
            with self.assertRaises(ValueError):
                client.open_namespace(tenant="test", model="p", dtype=1, num_layers=layers,
                                      num_kv_heads=heads, head_dim=dim, tokens_per_block=tokens,
                                      coarsest_format="int3")
            ns = client.open_namespace(tenant="test", model="p", dtype=1, num_layers=layers,
                                       num_kv_heads=heads, head_dim=dim, tokens_per_block=tokens,
                                       coarsest_format="int4_kivi")
            count, block = 320, ns.block_bytes
            self.assertEqual(block, layers * 2 * tokens * heads * dim * 2)
            rng = np.random.default_rng(7)
            kv = rng.standard_normal((count, block // 2)).astype(np.float16)
            keys = ns.keys(list(range(count * tokens)))
            buffer = client.allocate(4 * block)
            view = np.frombuffer(buffer, dtype=np.float16).reshape(4, block // 2)
            for start in range(0, count, 4):
                view[:] = kv[start:start + 4]
                result = ns.publish([(keys[start + k], keys[start + k - 1] if start + k else None,
                                      buffer, k * block) for k in range(4)])
                self.assertEqual(result.count(kvstrata.Outcome.OK), 4)
            out = client.allocate(count * block)
            result = ns.fetch([(keys[i], out, i * block) for i in range(count)])
            self.assertEqual(len(result.formats), count)
            got = np.frombuffer(out, dtype=np.float16).reshape(count, block // 2)
            ceilings = {"raw": 0.0, "fp8_e4m3": 0.06, "int4_kivi": 0.2}
            seen = set()
            for i, (outcome, fmt) in enumerate(zip(result.outcomes, result.formats)):
                if outcome != kvstrata.Outcome.OK:
                    continue
                seen.add(fmt)
                a, b = kv[i].astype(np.float64), got[i].astype(np.float64)
                error = np.linalg.norm(a - b) / np.linalg.norm(a)
                self.assertLessEqual(error, ceilings[fmt], "block %d stored as %s" % (i, fmt))
            self.assertIn("raw", seen)
            self.assertTrue(seen & {"fp8_e4m3", "int4_kivi"}, seen)
            stats = client.stats()
            self.assertGreater(stats["transcoded_blocks"], 0)
            by_format = {f["format"]: f["blocks"] for f in stats["formats"] if f["tier"] == "dram"}
            self.assertGreater(by_format.get("fp8_e4m3", 0) + by_format.get("int4_kivi", 0), 0)
        finally:
            node.stop()


class ClusterTest(unittest.TestCase):
    """kvstrata.Cluster: three real nodes behind the single-node namespace API."""

    def test_three_nodes_as_one_cache(self):
        nodes = [NodeProcess(dram_bytes=64 << 20) for _ in range(3)]
        try:
            addresses = [n.address for n in nodes]
            cluster = kvstrata.Cluster(nodes=addresses, timeout=5.0)
            self.assertEqual(sorted(n["address"] for n in cluster.nodes()), sorted(addresses))
            self.assertTrue(all(n["healthy"] for n in cluster.nodes()))
            ns = cluster.open_namespace(tenant="test", model="cluster", tokens_per_block=4,
                                        block_bytes=BLOCK)
            # The same key chain as a single node's namespace of that spec.
            single = kvstrata.Client(addresses[0]).open_namespace(
                tenant="test", model="cluster", tokens_per_block=4, block_bytes=BLOCK)
            tokens = list(range(3000, 3048))
            keys = ns.keys(tokens)
            self.assertEqual(keys, single.keys(tokens))
            data = np.random.default_rng(1).integers(0, 255, len(keys) * BLOCK, dtype=np.uint8)
            buf = cluster.register(data)
            result = ns.publish([(k, keys[i - 1] if i else None, buf, i * BLOCK)
                                 for i, k in enumerate(keys)])
            self.assertEqual(result.count(kvstrata.Outcome.OK), len(keys))
            self.assertEqual(ns.lookup(keys), len(keys))
            # Placement spreads the blocks; the summed stats count each once.
            per_node = [cluster.stats(a)["published_blocks"] for a in addresses]
            self.assertEqual(sum(per_node), len(keys))
            self.assertGreaterEqual(sum(1 for n in per_node if n), 2, per_node)
            self.assertEqual(cluster.stats()["published_blocks"], len(keys))
            out = np.zeros_like(data)
            fetched = ns.fetch_async([(k, out, i * BLOCK) for i, k in enumerate(keys)]).wait()
            self.assertEqual(fetched.count(kvstrata.Outcome.OK), len(keys))
            self.assertTrue(np.array_equal(out, data))
            # Every block is where placement puts it: the repairer copied nothing.
            repairs = cluster.repairs()
            self.assertEqual(repairs["repaired_blocks"], 0, repairs)
            self.assertEqual(repairs["queued_on_read"], 0, repairs)
            self.assertEqual(repairs["pending_blocks"], 0, repairs)
            # A node down: its blocks are misses, never errors.
            lost = max(range(3), key=lambda i: per_node[i])
            nodes[lost].stop()
            cluster.refresh()
            self.assertLess(ns.lookup(keys), len(keys))
            cluster.ping()  # two still answer
            for n in nodes:
                n.stop()
            cluster.refresh()
            with self.assertRaises(kvstrata.Error) as e:
                cluster.ping()
            self.assertEqual(e.exception.code, kvstrata.UNAVAILABLE)
        finally:
            for n in nodes:
                n.stop()

    def test_bad_membership_is_a_clear_error(self):
        with self.assertRaisesRegex(kvstrata.Error, "static nodes or a DNS name"):
            kvstrata.Cluster()
        with self.assertRaisesRegex(kvstrata.Error, "replication"):
            kvstrata.Cluster(nodes=["127.0.0.1:1"], replication=0)


class AuthTest(unittest.TestCase):
    """A node with --auth_file: the binding's token (argument or KVSTRATA_TOKEN)."""

    def test_tokens_pick_tenants_and_close_frees_a_namespace_slot(self):
        import hashlib
        import os
        import tempfile

        def digest(token):
            return hashlib.sha256(token.encode()).hexdigest()

        with tempfile.TemporaryDirectory() as tmp:
            auth = os.path.join(tmp, "auth")
            with open(auth, "w") as out:
                out.write("token sha256:%s tenant acme\n" % digest("acme-token"))
                out.write("token sha256:%s admin *\n" % digest("admin-token"))
                out.write("quota acme namespaces=1\n")
            with NodeProcess(dram_bytes=64 << 20, extra_flags=["--auth_file=" + auth]) as node:
                with self.assertRaises(kvstrata.Error) as caught:
                    kvstrata.Client(node.address).open_namespace(
                        tenant="acme", model="m", tokens_per_block=4, block_bytes=BLOCK)
                self.assertEqual(caught.exception.code, kvstrata.UNAUTHENTICATED)
                acme = kvstrata.Client(node.address, token="acme-token")
                ns = acme.open_namespace(tenant="acme", model="m", tokens_per_block=4,
                                         block_bytes=BLOCK)
                keys = ns.keys(list(range(8)))
                result = ns.publish([(keys[0], None, bytearray(BLOCK), 0)])
                self.assertEqual(result.outcomes, [kvstrata.Outcome.OK])
                with self.assertRaises(kvstrata.Error) as caught:
                    acme.open_namespace(tenant="globex", model="m", tokens_per_block=4,
                                        block_bytes=BLOCK)
                self.assertEqual(caught.exception.code, kvstrata.PERMISSION_DENIED)
                with self.assertRaises(kvstrata.Error) as caught:  # its quota: one namespace
                    acme.open_namespace(tenant="acme", model="other", tokens_per_block=4,
                                        block_bytes=BLOCK)
                self.assertEqual(caught.exception.code, kvstrata.RESOURCE_EXHAUSTED)
                ns.close()
                acme.open_namespace(tenant="acme", model="other", tokens_per_block=4,
                                    block_bytes=BLOCK)
                with self.assertRaises(kvstrata.Error) as caught:
                    acme.stats()
                self.assertEqual(caught.exception.code, kvstrata.PERMISSION_DENIED)
                os.environ["KVSTRATA_TOKEN"] = "admin-token"
                try:
                    self.assertGreaterEqual(kvstrata.Client(node.address).stats()["published_blocks"], 1)
                finally:
                    del os.environ["KVSTRATA_TOKEN"]


class FakeCudaTensor:
    """What the binding sees of a CUDA torch tensor, without a GPU: a device
    that says CUDA and a data_ptr (here host memory, which a correct binding
    never reads or hands to UCX as host memory)."""

    def __init__(self, nbytes, dlpack=True, index=0):
        self.backing = np.zeros(nbytes, dtype=np.uint8)
        self._dlpack = dlpack
        self.is_cuda = True
        self.device = type("Device", (), {"type": "cuda", "index": index})()

    def __getattr__(self, name):
        if name == "__dlpack_device__" and self._dlpack:
            return lambda: (2, self.device.index)  # kDLCUDA
        raise AttributeError(name)

    def data_ptr(self):
        return self.backing.ctypes.data

    def element_size(self):
        return 1

    def numel(self):
        return self.backing.size

    def is_contiguous(self):
        return True


class CudaMemoryTest(NodeClientCase):
    """CUDA memory in the binding: detection and refusal run everywhere; the
    round trip through the client's staging needs a GPU (scripts/gpu-check.sh)."""

    def test_device_detection(self):
        self.assertEqual(kvstrata.device_of(np.zeros(4)), ("cpu", 0))
        self.assertEqual(kvstrata.device_of(torch.zeros(4)), ("cpu", 0))
        self.assertEqual(kvstrata.device_of(bytearray(4)), ("cpu", 0))
        self.assertEqual(kvstrata.device_of(FakeCudaTensor(16, index=1)), ("cuda", 1))
        # torch without __dlpack_device__ (older versions): is_cuda and device.index.
        self.assertEqual(kvstrata.device_of(FakeCudaTensor(16, dlpack=False, index=3)), ("cuda", 3))
        self.assertIsInstance(kvstrata.cuda_built, bool)
        self.assertFalse(self.client.allocate(BLOCK).device)

    @unittest.skipIf(torch.cuda.is_available(), "this machine has a GPU")
    def test_cuda_memory_without_a_gpu_is_refused_clearly(self):
        ns = self.client.open_namespace(tenant="test", model="cuda-refused", tokens_per_block=4,
                                        block_bytes=BLOCK)
        key = ns.keys([1, 2, 3, 4])[0]
        for dlpack in (True, False):
            fake = FakeCudaTensor(BLOCK, dlpack=dlpack)
            for attempt in (lambda: self.client.register(fake),
                            lambda: ns.publish([(key, None, fake, 0)]),
                            lambda: ns.fetch([(key, fake, 0)])):
                with self.assertRaises(kvstrata.Error) as caught:
                    attempt()
                if kvstrata.cuda_built:
                    self.assertEqual(caught.exception.code, kvstrata.FAILED_PRECONDITION)
                    self.assertIn("device buffers need a GPU", str(caught.exception))
                else:
                    self.assertEqual(caught.exception.code, kvstrata.UNIMPLEMENTED)
                    self.assertIn("CUDA tensors need a kvstrata built with CUDA",
                                  str(caught.exception))
        with self.assertRaises(kvstrata.Error):
            self.client.allocate(BLOCK, device=True)
        self.assertEqual(ns.lookup([key]), 0, "nothing was published from the refused tensor")

    @unittest.skipUnless(torch.cuda.is_available() and kvstrata.cuda_built, "needs a GPU")
    def test_cuda_tensors_round_trip_through_staging(self):
        ns = self.client.open_namespace(tenant="test", model="cuda-tensors", tokens_per_block=4,
                                        block_bytes=BLOCK)
        keys = ns.keys(list(range(8 * 4)))
        source = torch.randint(0, 255, (8 * BLOCK,), dtype=torch.uint8, device="cuda")
        result = ns.publish([(k, None, source, i * BLOCK) for i, k in enumerate(keys)])
        self.assertEqual(result.count(kvstrata.Outcome.OK), 8)
        destination = torch.zeros_like(source)
        mixed = np.zeros(8 * BLOCK, dtype=np.uint8)
        result = ns.fetch([(k, destination if i % 2 else mixed, i * BLOCK)
                           for i, k in enumerate(keys)])
        self.assertEqual(result.count(kvstrata.Outcome.OK), 8)
        expected = source.cpu().numpy()
        got = destination.cpu().numpy()
        for i in range(8):
            part = slice(i * BLOCK, (i + 1) * BLOCK)
            np.testing.assert_array_equal(got[part] if i % 2 else mixed[part], expected[part])
        allocated = self.client.allocate(BLOCK, device=True)
        self.assertTrue(allocated.device)
        with self.assertRaises(kvstrata.Error):
            memoryview(allocated)


if __name__ == "__main__":
    unittest.main()
