#!/usr/bin/python3
"""The eviction trace suite (bench/traces/generate.py): determinism, the
Mooncake format with prefix semantics, and the property each shape claims."""
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "traces")
sys.dont_write_bytecode = True  # nothing written into the source tree
sys.path.insert(0, TRACES)
from tracegen.shapes import SHAPES  # noqa: E402

GENERATE = os.path.join(TRACES, "generate.py")
SCALE = "0.1"
SEED = "15"


def generate(out, seed=SEED, labels=None, extra=()):
    cmd = [sys.executable, "-B", GENERATE, "--out", out, "--scale", SCALE, "--seed", seed, *extra]
    if labels:
        cmd += ["--labels", labels]
    return subprocess.run(cmd, capture_output=True, text=True)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def full_blocks(request):
    ids = request["hash_ids"]
    return ids if request["input_length"] % 512 == 0 else ids[:-1]


class TraceSuiteTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = cls.tmp.name
        cls.dirs = {k: os.path.join(root, k) for k in ("a", "b", "other", "labels")}
        for key, seed, labels in (("a", SEED, cls.dirs["labels"]), ("b", SEED, None),
                                  ("other", "16", None)):
            done = generate(cls.dirs[key], seed, labels)
            assert done.returncode == 0, done.stderr
        cls.traces = {s: read(os.path.join(cls.dirs["a"], s + ".jsonl")) for s in SHAPES}
        cls.labels = {s: read(os.path.join(cls.dirs["labels"], s + ".labels.jsonl")) for s in SHAPES}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def bytes_of(self, key, shape):
        with open(os.path.join(self.dirs[key], shape + ".jsonl"), "rb") as f:
            return f.read()

    def test_same_seed_same_bytes_other_seed_other_bytes(self):
        self.assertEqual(sorted(os.listdir(self.dirs["a"])), sorted(s + ".jsonl" for s in SHAPES))
        for shape in SHAPES:
            self.assertEqual(self.bytes_of("a", shape), self.bytes_of("b", shape), shape)
            self.assertNotEqual(self.bytes_of("a", shape), self.bytes_of("other", shape), shape)

    def test_mooncake_format(self):
        for shape, trace in self.traces.items():
            self.assertEqual(len(trace), len(self.labels[shape]), shape)
            self.assertTrue(100 <= len(trace) <= 2000, (shape, len(trace)))
            last = 0
            for r in trace:
                self.assertEqual(set(r), {"timestamp", "input_length", "output_length", "hash_ids"})
                self.assertTrue(all(type(v) is int for k, v in r.items() if k != "hash_ids"))
                self.assertTrue(all(type(h) is int and h >= 0 for h in r["hash_ids"]))
                self.assertGreaterEqual(r["output_length"], 1)
                self.assertEqual(len(r["hash_ids"]), math.ceil(r["input_length"] / 512), shape)
                self.assertGreaterEqual(r["timestamp"], last, shape)
                last = r["timestamp"]

    def test_equal_ids_imply_equal_prefixes(self):
        for shape, trace in self.traces.items():
            where = {}
            for r in trace:
                ids = r["hash_ids"]
                for i, h in enumerate(ids):
                    place = (i, ids[i - 1] if i else None)
                    self.assertEqual(where.setdefault(h, place), place, (shape, h))

    def first_blocks(self, shape, keep=lambda label: True):
        return collections.Counter(r["hash_ids"][0] for r, l in
                                   zip(self.traces[shape], self.labels[shape]) if keep(l))

    def test_shared_system_prompt(self):
        trace = self.traces["shared-system-prompt"]
        self.assertEqual(len({tuple(r["hash_ids"][:2]) for r in trace}), 1)
        # Chats on top: some turn reuses more than the system prompt.
        seen, deeper = set(), 0
        for r in trace:
            deeper += len(r["hash_ids"]) > 3 and r["hash_ids"][3] in seen
            seen.update(r["hash_ids"])
        self.assertGreater(deeper, 5)

    def test_multi_tenant_first_blocks_are_few_and_skewed(self):
        counts = self.first_blocks("multi-tenant")
        self.assertEqual(len(counts), 4)
        ordered = sorted(counts.values())
        self.assertGreaterEqual(ordered[-1], 2 * ordered[0])
        by_tenant = collections.defaultdict(set)
        for r, l in zip(self.traces["multi-tenant"], self.labels["multi-tenant"]):
            by_tenant[l["tenant"]].add(r["hash_ids"][0])
        self.assertEqual(sorted(len(v) for v in by_tenant.values()), [1, 1, 1, 1])

    def test_scan_documents_never_repeat(self):
        trace, labels = self.traces["scan"], self.labels["scan"]
        uses = collections.Counter(h for r in trace for h in set(r["hash_ids"]))
        scans = [r for r, l in zip(trace, labels) if l["kind"] == "scan"]
        self.assertGreater(len(scans), 50)
        self.assertTrue(all(uses[h] == 1 for r in scans for h in r["hash_ids"]))
        hot = self.first_blocks("scan", lambda l: l["kind"] == "hot")
        self.assertGreater(max(hot.values()), 3 * sum(hot.values()) / len(hot))  # a skewed hot set

    def test_drift_halves_differ(self):
        trace, labels = self.traces["drift"], self.labels["drift"]
        phases = [[r for r, l in zip(trace, labels) if l["phase"] == p] for p in (0, 1)]
        self.assertLess(max(r["timestamp"] for r in phases[0]), min(r["timestamp"] for r in phases[1]))
        firsts = [{r["hash_ids"][0] for r in phase} for phase in phases]
        self.assertEqual(firsts[0] & firsts[1], set())
        # The documented statistics: the share of requests that reuse no
        # prefix, and the median gap between a session's requests.
        seen, fresh, last, gaps = set(), [0, 0], {}, ([], [])
        for r, l in zip(trace, labels):
            fresh[l["phase"]] += r["hash_ids"][0] not in seen
            seen.update(r["hash_ids"])
            if l["session"] in last:
                gaps[l["phase"]].append(r["timestamp"] - last[l["session"]])
            last[l["session"]] = r["timestamp"]
        self.assertEqual(fresh[0], 1)  # only the very first request
        self.assertGreater(fresh[1] / len(phases[1]), 0.05)
        median = [sorted(g)[len(g) // 2] for g in gaps]
        self.assertGreater(median[0], 4 * median[1])  # 180 s halves cut long gaps

    def test_agent_branches_and_short_gaps(self):
        sessions = collections.defaultdict(list)
        for r, l in zip(self.traces["agent"], self.labels["agent"]):
            sessions[l["session"]].append(r)
        branched, gaps = 0, []
        for requests in sessions.values():
            lines = [full_blocks(r) for r in requests]
            branched += any(a[:len(b)] != b and b[:len(a)] != a for i, a in enumerate(lines)
                            for b in lines[i + 1:])
            gaps += [b["timestamp"] - a["timestamp"] for a, b in zip(requests, requests[1:])]
        self.assertGreater(branched, 3)
        self.assertLess(sorted(gaps)[len(gaps) // 2], 30_000)

    def test_rag_document_popularity_is_skewed(self):
        first_turns = [(r, l) for r, l in zip(self.traces["rag"], self.labels["rag"]) if l["turn"] == 0]
        # The instruction fills block 0; block 1 starts the top-ranked document.
        doc_of_block = {}
        for r, l in first_turns:
            self.assertEqual(doc_of_block.setdefault(r["hash_ids"][1], l["doc"]), l["doc"])
        self.assertEqual(len(set(doc_of_block.values())), len(doc_of_block))
        counts = sorted(collections.Counter(r["hash_ids"][1] for r, _ in first_turns).values())
        self.assertGreater(len(counts), 20)
        self.assertGreater(counts[-1], 5 * len(first_turns) / len(counts))

    def test_api_templates_single_turn(self):
        self.assertTrue(all(l["turn"] == 0 for l in self.labels["api-templates"]))
        self.assertLessEqual(len(self.first_blocks("api-templates")), 30)  # 300 templates x 0.1

    def test_full_size_traces_stay_in_scale(self):
        # Each full trace is about the shared trace's size: big enough to
        # judge a policy, small enough to replay every policy in seconds.
        out = os.path.join(self.tmp.name, "full")
        done = subprocess.run([sys.executable, "-B", GENERATE, "--out", out],
                              capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        for shape in SHAPES:
            trace = read(os.path.join(out, shape + ".jsonl"))
            distinct = len({h for r in trace for h in r["hash_ids"]})
            self.assertTrue(3000 <= len(trace) <= 20000, (shape, len(trace)))
            self.assertTrue(20000 <= distinct <= 120000, (shape, distinct))

    def test_bad_arguments_write_nothing(self):
        out = os.path.join(self.tmp.name, "bad")
        done = generate(out, extra=("--shapes", "rag,nonsense"))
        self.assertEqual(done.returncode, 2)
        self.assertIn("nonsense", done.stderr)
        self.assertFalse(os.path.exists(out))

    def test_suite_stats_prints_a_row_per_trace(self):
        done = subprocess.run([sys.executable, "-B", os.path.join(TRACES, "suite_stats.py"), self.dirs["a"]],
                              capture_output=True, text=True, check=True)
        rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
        self.assertEqual(len(rows), 1 + len(SHAPES))


if __name__ == "__main__":
    unittest.main()
