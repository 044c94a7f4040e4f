#!/usr/bin/python3
"""Prefill and decode in separate processes through a real node: the decode
worker loads the prompt's KV through KvstrataConnector and its logits equal,
bit for bit, those of a decode worker that prefilled locally."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch

from kvstrata.testing import NodeProcess


def run_worker(role, node, out, prompt_tokens, prompt_seed=7):
    command = [sys.executable, "-m", "kvstrata.examples.tiny_llm", "--role=" + role,
               "--node=" + node.address, "--prompt_tokens=%d" % prompt_tokens,
               "--prompt_seed=%d" % prompt_seed, "--new_tokens=8", "--threads=1", "--out=" + out]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError("%s worker failed:\n%s\nnode log:\n%s"
                             % (role, done.stderr[-4000:], node.log_tail()))
    return json.loads(done.stdout.strip().splitlines()[-1])


class HandoffTest(unittest.TestCase):
    def test_decode_after_fetch_equals_decode_after_local_prefill(self):
        with NodeProcess(dram_bytes=256 << 20) as node, tempfile.TemporaryDirectory() as tmp:
            prefill_out, decode_out = os.path.join(tmp, "prefill.pt"), os.path.join(tmp, "decode.pt")
            # 1000 tokens: 3 cache blocks of 256 are published, 232 tokens are not.
            prefill = run_worker("prefill", node, prefill_out, 1000)
            self.assertEqual(prefill["saved_blocks"], 3)
            decode = run_worker("decode", node, decode_out, 1000)
            print(json.dumps(prefill), json.dumps(decode))
            self.assertEqual(decode["loaded_tokens"], 768)
            result = torch.load(decode_out)
            self.assertEqual(len(result["cached"]), 8)
            for step, (cached, local) in enumerate(zip(result["cached"], result["local"])):
                self.assertTrue(torch.equal(cached, local), "logits differ at step %d" % step)
            # The prefill worker's first-token logits are the same ones too.
            self.assertTrue(torch.equal(torch.load(prefill_out)["logits"][0], result["cached"][0]))
            # A different prompt finds nothing and gives different logits (the check can fail).
            other = run_worker("decode", node, decode_out, 1000, prompt_seed=8)
            self.assertEqual(other["loaded_tokens"], 0)
            self.assertFalse(torch.equal(torch.load(decode_out)["cached"][0], result["cached"][0]))


if __name__ == "__main__":
    unittest.main()
