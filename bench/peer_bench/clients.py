"""One client adapter per system, each through its fastest documented path.

Every adapter owns `slots` source slots and `slots` destination slots of
`value_bytes` each, in memory registered with its system where the system
registers memory:
- kvstrata: `Client.allocate` (memory registered with UCX), `publish` and
  `fetch` of (key, buffer, offset) items, `lookup` for the prefix;
- Mooncake Store 0.3.13: an mmap registered with `register_buffer`,
  `batch_put_from` / `batch_get_into` with the slots' addresses,
  `batch_is_exist` for the prefix;
- Redis: redis-py (hiredis parser) pipelines of SET from the source
  memoryview, GET copied into the destination slot (as a kvstrata fetch
  lands in the caller's buffer), EXISTS for the prefix.

Keys are integers (never 0) that each adapter maps to its own key type.
`put(ids, parents, first_slot)` stores source slot first_slot + i under ids[i]
(parents: the previous block of a chain, used by kvstrata's index) and returns how many are
stored; `get(ids)` fetches ids[i] into destination slot i and returns, per
item, whether a whole value arrived.
"""
import ctypes
import mmap
import struct

_LIBC = ctypes.CDLL(None)
_LIBC.memcmp.restype = ctypes.c_int
_LIBC.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def address_of(writable):
    return ctypes.addressof(ctypes.c_char.from_buffer(writable))


def same_bytes(address_a, address_b, size):
    """memcmp: a Python comparison of two 1 MiB views costs ~40x longer."""
    return _LIBC.memcmp(address_a, address_b, size) == 0


def text_key(key_id):
    return "%016x" % key_id


class KvstrataAdapter:
    name = "kvstrata"

    def __init__(self, spec, value_bytes, slots):
        import kvstrata
        self._kvstrata = kvstrata
        self.value_bytes = value_bytes
        # Transports fixed to TCP on both sides: the comparison is over the
        # transport Mooncake uses here, not kvstrata's shared-memory path.
        self._client = kvstrata.Client(spec["address"], timeout=30.0, ucx_transports="tcp")
        self._ns = self._client.open_namespace(model="peer-bench", block_bytes=value_bytes)
        self._buffer = self._client.allocate(2 * slots * value_bytes)
        self.view = memoryview(self._buffer)
        self.src_address = self._buffer.address
        self.dst_address = self._buffer.address + slots * value_bytes
        self._dst_offset = slots * value_bytes

    @staticmethod
    def _key(key_id):
        return struct.pack("<QQ", key_id, 0x6b7673747261)

    def put(self, ids, parents=None, first_slot=0):
        v = self.value_bytes
        items = [(self._key(k), None if parents is None or parents[i] is None
                  else self._key(parents[i]), self._buffer, (first_slot + i) * v)
                 for i, k in enumerate(ids)]
        result = self._ns.publish(items)
        ok = self._kvstrata.Outcome.OK
        present = self._kvstrata.Outcome.ALREADY_PRESENT
        return sum(1 for o in result.outcomes if o == ok or o == present)

    def get(self, ids):
        v = self.value_bytes
        items = [(self._key(k), self._buffer, self._dst_offset + i * v) for i, k in enumerate(ids)]
        result = self._ns.fetch(items)
        ok = self._kvstrata.Outcome.OK
        return [o == ok for o in result.outcomes]

    def exists_prefix(self, ids):
        return self._ns.lookup([self._key(k) for k in ids])

    def delete(self, ids):
        if ids:
            self._ns.delete([self._key(k) for k in ids])

    def clear(self):
        pass  # every client deleted its own keys, which kvstrata always allows

    def close(self):
        # Not ns.close(): the namespace (one per spec) is shared with the
        # point's other clients, and closing it fails their calls.
        self.view.release()


class MooncakeAdapter:
    name = "mooncake"
    # Backs only Mooncake's non-zero-copy calls, which the benchmark never
    # makes (the smallest size its docs' zero-copy example uses).
    LOCAL_BUFFER_BYTES = 16 << 20

    def __init__(self, spec, value_bytes, slots):
        from mooncake.store import MooncakeDistributedStore
        self.value_bytes = value_bytes
        self._store = MooncakeDistributedStore()
        # Global segment 0: this client lends no memory, the segment holder
        # (mooncake_segment.py) holds all of it.
        rc = self._store.setup("127.0.0.1", spec["metadata"], 0, self.LOCAL_BUFFER_BYTES,
                               "tcp", "", spec["master"])
        if rc != 0:
            raise RuntimeError("Mooncake setup failed: %d" % rc)
        self._memory = mmap.mmap(-1, 2 * slots * value_bytes)
        self.view = memoryview(self._memory)
        self.src_address = address_of(self._memory)
        self.dst_address = self.src_address + slots * value_bytes
        rc = self._store.register_buffer(self.src_address, 2 * slots * value_bytes)
        if rc != 0:
            raise RuntimeError("Mooncake register_buffer failed: %d" % rc)

    def put(self, ids, parents=None, first_slot=0):
        v = self.value_bytes
        codes = self._store.batch_put_from([text_key(k) for k in ids],
                                           [self.src_address + (first_slot + i) * v
                                            for i in range(len(ids))],
                                           [v] * len(ids))
        return sum(1 for c in codes if c == 0)

    def get(self, ids):
        v = self.value_bytes
        got = self._store.batch_get_into([text_key(k) for k in ids],
                                         [self.dst_address + i * v for i in range(len(ids))],
                                         [v] * len(ids))
        return [n == v for n in got]

    def exists_prefix(self, ids):
        prefix = 0
        for found in self._store.batch_is_exist([text_key(k) for k in ids]):
            if found != 1:
                break
            prefix += 1
        return prefix

    def delete(self, ids):
        if ids:
            self._store.batch_remove([text_key(k) for k in ids])

    def clear(self):
        # Objects read in the last lease period (10 s by default) refuse a
        # plain remove; force is safe once no client reads any more.
        self._store.remove_all(True)

    def close(self):
        self._store.unregister_buffer(self.src_address)
        self._store.close()


class RedisAdapter:
    name = "redis"

    def __init__(self, spec, value_bytes, slots):
        import redis
        self.value_bytes = value_bytes
        self._redis = redis.Redis(host="127.0.0.1", port=spec["port"])
        self._memory = bytearray(2 * slots * value_bytes)
        self.view = memoryview(self._memory)
        self.src_address = address_of(self._memory)
        self.dst_address = self.src_address + slots * value_bytes
        self._dst_offset = slots * value_bytes

    def put(self, ids, parents=None, first_slot=0):
        v = self.value_bytes
        pipe = self._redis.pipeline(transaction=False)
        for i, k in enumerate(ids):
            pipe.set(text_key(k), self.view[(first_slot + i) * v:(first_slot + i + 1) * v])
        return sum(1 for r in pipe.execute() if r)

    def get(self, ids):
        v = self.value_bytes
        pipe = self._redis.pipeline(transaction=False)
        for k in ids:
            pipe.get(text_key(k))
        found = []
        for i, value in enumerate(pipe.execute()):
            whole = value is not None and len(value) == v
            if whole:
                start = self._dst_offset + i * v
                self.view[start:start + v] = value
            found.append(whole)
        return found

    def exists_prefix(self, ids):
        pipe = self._redis.pipeline(transaction=False)
        for k in ids:
            pipe.exists(text_key(k))
        prefix = 0
        for found in pipe.execute():
            if not found:
                break
            prefix += 1
        return prefix

    def delete(self, ids):
        for start in range(0, len(ids), 1024):
            self._redis.delete(*[text_key(k) for k in ids[start:start + 1024]])

    def clear(self):
        self._redis.flushall()

    def close(self):
        self.view.release()
        self._redis.close()


ADAPTERS = {a.name: a for a in (KvstrataAdapter, MooncakeAdapter, RedisAdapter)}


def connect(spec, value_bytes, slots):
    return ADAPTERS[spec["system"]](spec, value_bytes, slots)


def close_quietly(adapter):
    """Closes a worker's adapter (None: none was made) in its `finally`: a
    failing close must not replace the outcome the worker reports."""
    if adapter is None:
        return
    try:
        adapter.close()
    except Exception:
        pass
