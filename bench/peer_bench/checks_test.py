"""The benchmark's own checks, against the real systems: a figure counts only
bytes that were verified, so the verification must catch what goes wrong.

    run.sh checks_test.py --node_binary=build/cachenode/kvstrata-node

For each system: values round-trip and check as right; a value fetched under
the wrong key, a key never stored, and (Redis, which keeps no checksum) a
value changed in the server all check as wrong; lookups count the stored
prefix only.
"""
import argparse
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import content  # noqa: E402
import systems  # noqa: E402
from clients import connect, text_key  # noqa: E402

VALUE = 64 << 10
SLOTS = 4
ARGS = None


class Checks(unittest.TestCase):
    server = None

    @classmethod
    def setUpClass(cls):
        cls.servers = {
            "kvstrata": systems.start_kvstrata(ARGS.node_binary, 64 << 20),
            "mooncake": systems.start_mooncake(systems.find_mooncake_master(None), 64 << 20),
            "redis": systems.start_redis(systems.find_redis(None), 64 << 20),
        }

    @classmethod
    def tearDownClass(cls):
        for server in cls.servers.values():
            server.stop()

    def each_adapter(self):
        for name, server in self.servers.items():
            adapter = connect(server.spec, VALUE, SLOTS)
            content.fill_random(adapter, SLOTS)
            yield name, adapter
            adapter.close()

    def put(self, adapter, ids):
        for slot, key_id in enumerate(ids):
            content.stamp(adapter, slot, key_id)
        self.assertEqual(adapter.put(ids), len(ids))

    def test_round_trip_checks_right(self):
        for name, adapter in self.each_adapter():
            with self.subTest(system=name):
                ids = [101, 102, 103, 104]
                self.put(adapter, ids)
                content.clear_destination(adapter, SLOTS)
                self.assertEqual(adapter.get(ids), [True] * SLOTS)
                for slot, key_id in enumerate(ids):
                    self.assertTrue(content.is_right(adapter, slot, slot, key_id))
                self.assertEqual(adapter.exists_prefix(ids), 4)
                self.assertEqual(adapter.exists_prefix(ids[:2] + [999] + ids[3:]), 2)
                adapter.delete(ids)

    def test_value_of_another_key_checks_wrong(self):
        for name, adapter in self.each_adapter():
            with self.subTest(system=name):
                ids = [201, 202]
                self.put(adapter, ids)
                content.clear_destination(adapter, SLOTS)
                # 202 (put from slot 1) fetched into slot 0, checked as 201.
                self.assertEqual(adapter.get([202]), [True])
                self.assertFalse(content.is_right(adapter, 0, 0, 201))
                self.assertFalse(content.is_right(adapter, 0, 1, 201))
                self.assertTrue(content.is_right(adapter, 0, 1, 202))
                # Same stamps, other slot's bytes between them.
                self.assertFalse(content.is_right(adapter, 0, 0, 202))
                adapter.delete(ids)

    def test_missing_key_is_a_miss_and_leaves_nothing_that_checks(self):
        for name, adapter in self.each_adapter():
            with self.subTest(system=name):
                self.put(adapter, [301])
                self.assertEqual(adapter.get([301]), [True])
                content.clear_destination(adapter, SLOTS)
                self.assertEqual(adapter.get([399]), [False])
                self.assertFalse(content.is_right(adapter, 0, 0, 301))
                self.assertEqual(adapter.exists_prefix([399, 301]), 0)
                adapter.delete([301])

    def test_value_changed_in_redis_checks_wrong(self):
        import redis
        adapter = connect(self.servers["redis"].spec, VALUE, SLOTS)
        try:
            content.fill_random(adapter, SLOTS)
            self.put(adapter, [401])
            raw = redis.Redis(host="127.0.0.1", port=self.servers["redis"].spec["port"])
            middle = VALUE // 2
            old = raw.getrange(text_key(401), middle, middle)
            raw.setrange(text_key(401), middle, bytes([old[0] ^ 1]))
            content.clear_destination(adapter, SLOTS)
            self.assertEqual(adapter.get([401]), [True])
            self.assertFalse(content.is_right(adapter, 0, 0, 401))
            raw.close()
        finally:
            adapter.close()


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--node_binary", default=os.environ.get("KVSTRATA_NODE"))
    ARGS, rest = parser.parse_known_args()
    try:
        import kvstrata  # noqa: F401
        import mooncake.store  # noqa: F401
        import redis  # noqa: F401
    except ImportError as e:
        print("checks_test: skipped: %s" % e, file=sys.stderr)
        return 77
    if not systems.find_redis(None) or not systems.find_mooncake_master(None):
        print("checks_test: skipped: redis-server or mooncake_master missing", file=sys.stderr)
        return 77
    result = unittest.main(argv=[sys.argv[0]] + rest, exit=False).result
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
