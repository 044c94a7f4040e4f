"""An SGLang HiCache L3 storage backend on kvstrata.

`KvstrataHiCacheStorage` implements SGLang's `HiCacheStorage`
(`sglang.srt.mem_cache.hicache_storage`, checked against sglang 0.5.23) and is
loaded by SGLang's dynamic backend factory:

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvstrata",
        "module_path": "kvstrata.sglang_backend",
        "class_name": "KvstrataHiCacheStorage",
        "node": "10.0.0.5:50151", "interface_v1": 1}'

What is stored. SGLang names every host page by its own chained page hash
(`get_hash_str`: SHA-256 over the page's tokens and the previous page's
hash), so a page key already stands for the whole prefix. A page is stored as
the contiguous pieces SGLang's host pool reports for it
(`get_page_buffer_meta`: K and V of all layers for page_first layouts, one
piece per layer and K/V for layer_first), one kvstrata block per piece, in one
opaque namespace per (model, host pool geometry and layout, shard). Both of
SGLang's data paths are served with the same stored bytes:
- zero copy (`interface_v1`: `batch_get_v1`/`batch_set_v1`): the host pool's
  buffer is registered once and blocks travel straight from/into its pages;
- generic (`get`/`set`/`batch_get`/`batch_set`): the flat page tensors SGLang
  builds (`get_data_page`, `get_dummy_flat_data_page`), each piece at its
  offset in the flat page (found from the host pool's own view of a page).

Hybrid models: side pools registered with `register_mem_host_pool_v2` (SWA,
indexer, draft) get a namespace each and are served by the v2 calls.

Failures. Nothing the cache does raises into SGLang once the backend is
attached: an unreachable or dead node makes `exists` report 0 pages, `get`
return None, `set` return False and the v1 calls return False per page,
exactly what the base class documents for a miss or a failed write; SGLang
then recomputes. A single-node client is dropped after an
UNAVAILABLE/DEADLINE_EXCEEDED error and rebuilt on a later call (at most once
per `reconnect_interval`); a cluster heals by its own health checks. Bad
configuration (wrong types, a layout whose pieces differ in size) raises at
construction or pool registration, where SGLang reports it at start-up.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Dict, List, Optional

import torch

from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)

import kvstrata

logger = logging.getLogger(__name__)

# Keys of extra_config that SGLang itself reads; not ours, not warned about.
_SGLANG_KEYS = {
    "backend_name", "module_path", "class_name", "interface_v1", "prefetch_threshold",
    "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
    "hicache_storage_pass_prefix_keys", "tp_lcm_size",
}
_OUR_KEYS = {
    "node", "nodes", "dns", "replication", "tenant", "model", "timeout", "connect_timeout",
    "reconnect_interval", "ucx_transports", "kv_cache_dtype",
}
_RECONNECT_CODES = {kvstrata.UNAVAILABLE, kvstrata.DEADLINE_EXCEEDED, kvstrata.CANCELLED}
_STORED = {kvstrata.Outcome.OK, kvstrata.Outcome.ALREADY_PRESENT}
_KEY_DOMAIN = b"kvstrata.sglang.hicache.v1\0"
_MAX_NAME_BYTES = 256  # the node's limit on a namespace's model name


def page_block_keys(page_key: str, pieces: int) -> List[bytes]:
    """The kvstrata keys (16 bytes) of the `pieces` blocks of one SGLang page.

    Derived from SGLang's page hash string alone, so every engine that computes
    the same page hash (same tokens, same prefix, same extra key / cache salt)
    finds the same blocks; the namespace keeps models and shards apart.
    """
    if not isinstance(page_key, str) or not page_key:
        raise ValueError("an SGLang page key is a non-empty str, got %r" % (page_key,))
    base = hashlib.sha256(_KEY_DOMAIN)
    base.update(page_key.encode())
    out = []
    for j in range(pieces):
        h = base.copy()
        h.update(b"\0" + j.to_bytes(4, "little"))
        out.append(h.digest()[:16])
    return out


def _flat_piece_offsets(host_pool, ptrs, sizes) -> Optional[List[int]]:
    """Byte offset of each piece of page 0 inside SGLang's flat data page.

    The flat page is the host pool's view of a page (`get_data_page(flat=False)`)
    flattened in C order; a piece is a contiguous run of the host buffer. The
    view's dims are coalesced, each row of the coalesced view gets its address,
    and a piece must start on a row and cover whole, consecutive rows. None if
    the layout does not fit that (then only the zero-copy path is served).
    """
    view = host_pool.get_data_page(0, flat=False)
    item = view.element_size()
    shape, stride = [], []
    for s, t in zip(view.shape, view.stride()):
        if s == 1:
            continue
        if shape and stride[-1] == t * s:
            shape[-1] *= s
            stride[-1] = t
        else:
            shape.append(s)
            stride.append(t)
    if not shape or stride[-1] != 1:
        return None
    row = shape[-1]
    rows = {}
    lead = shape[:-1]
    count = 1
    for s in lead:
        count *= s
    for r in range(count):
        rem, addr = r, 0
        for s, t in zip(reversed(lead), reversed(stride[:-1])):
            addr += (rem % s) * t
            rem //= s
        rows[addr] = r
    base = view.data_ptr()
    offsets, covered = [], 0
    for ptr, size in zip(ptrs, sizes):
        if (ptr - base) % item or size % (row * item):
            return None
        start = (ptr - base) // item
        r = rows.get(start)
        if r is None:
            return None
        for k in range(size // item // row):
            if rows.get(start + k * row) != r + k:
                return None
        offsets.append(r * row * item)
        covered += size
    if covered != view.numel() * item or len(set(offsets)) != len(offsets):
        return None
    return offsets


class _Pool:
    """One registered host pool: its piece geometry and its namespace."""

    def __init__(self, name, host_pool):
        self.name = name
        self.host_pool = host_pool
        self.page_size = int(host_pool.page_size)
        indices = torch.arange(self.page_size, dtype=torch.int64)
        ptrs, sizes = host_pool.get_page_buffer_meta(indices)
        if not ptrs or len(set(sizes)) != 1:
            raise ValueError(
                "kvstrata: host pool %r (%s, layout %r) has pieces of sizes %s per page; "
                "a kvstrata namespace holds one block size" %
                (name, type(host_pool).__name__, getattr(host_pool, "layout", None), sizes))
        buffer = getattr(host_pool, "kv_buffer", None)
        if not isinstance(buffer, torch.Tensor) or not all(
                0 <= p - buffer.data_ptr() <= buffer.numel() * buffer.element_size() - sizes[0]
                for p in ptrs):
            raise ValueError(
                "kvstrata: host pool %r (%s) keeps its pages outside one kv_buffer tensor; "
                "not supported" % (name, type(host_pool).__name__))
        self.pieces = len(ptrs)
        self.piece_bytes = int(sizes[0])
        self.page_bytes = self.pieces * self.piece_bytes
        self.flat_offsets = _flat_piece_offsets(host_pool, ptrs, sizes)
        self.identity = None  # the namespace's model string, set at registration
        self.ns = None
        self.ns_generation = -1
        self.buffer = None  # the registered host pool buffer (zero-copy path)
        self.buffer_generation = -1


class KvstrataHiCacheStorage(HiCacheStorage):
    """SGLang HiCache storage on a kvstrata node (or cluster).

    `storage_config` is SGLang's `HiCacheStorageConfig`; its `extra_config`
    (the `--hicache-storage-backend-extra-config` JSON) carries:
      node            "host:port" of a kvstrata-node (default 127.0.0.1:50151)
      nodes / dns     a cluster instead, when the binding has `kvstrata.Cluster`
      replication     passed to the cluster
      tenant          kvstrata tenant ("" by default); tenants never share blocks
      model           model identity in namespace names (default: SGLang's model_name,
                      which is its --model-path: set this where hosts' paths differ)
      timeout         seconds per RPC (default 5)
      connect_timeout seconds to connect (default 5)
      reconnect_interval  seconds between reconnect attempts (default 5)
      ucx_transports  UCX_TLS for the data plane (default: UCX's choice)
      kv_cache_dtype  the engine's --kv-cache-dtype; needed only for an fp8
                      cache (SGLang stores it as uint8) outside a launched engine
    `kwargs` is the dict SGLang's dynamic factory passes; `client=` (or
    kwargs["client"]) takes a ready object with `open_namespace` and
    `register` (a `kvstrata.Client`, or a `kvstrata.Cluster` where the binding
    has one) instead of connecting from the config.
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None,
                 *, client: Any = None):
        if not isinstance(storage_config, HiCacheStorageConfig):
            raise TypeError("kvstrata: storage_config must be SGLang's HiCacheStorageConfig, got %s"
                            % type(storage_config).__name__)
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        unknown = set(extra) - _SGLANG_KEYS - _OUR_KEYS
        if unknown:
            logger.warning("kvstrata: ignoring unknown extra_config keys %s", sorted(unknown))
        if client is None and kwargs:
            client = kwargs.get("client")
        self._given_client = client

        def get(name, kind, default):
            value = extra.get(name, default)
            if value is default:
                return value
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise ValueError("kvstrata: extra_config[%r] must be %s, got %r"
                                 % (name, kind.__name__, value))
            return value

        self.node = get("node", str, "127.0.0.1:50151")
        self.nodes = get("nodes", list, None)
        self.dns = get("dns", str, None)
        self.replication = get("replication", int, None)
        self.tenant = get("tenant", str, "")
        self.timeout = get("timeout", float, 5.0)
        self.connect_timeout = get("connect_timeout", float, 5.0)
        self.reconnect_interval = get("reconnect_interval", float, 5.0)
        self.ucx_transports = get("ucx_transports", str, "")
        self.kv_cache_dtype = get("kv_cache_dtype", str, None)
        for name in ("timeout", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError("kvstrata: extra_config[%r] must be > 0" % name)
        if self.reconnect_interval < 0:
            raise ValueError("kvstrata: extra_config['reconnect_interval'] must be >= 0")
        if self.nodes is not None and not all(isinstance(n, str) for n in self.nodes):
            raise ValueError("kvstrata: extra_config['nodes'] must be a list of \"host:port\"")
        if (self.nodes or self.dns) and client is None and not hasattr(kvstrata, "Cluster"):
            raise ValueError("kvstrata: extra_config names a cluster (nodes/dns) but this kvstrata "
                             "binding has no kvstrata.Cluster; give one node with \"node\"")
        model = get("model", str, None) or storage_config.model_name
        if not model:
            raise ValueError("kvstrata: no model identity: SGLang gave no model_name and "
                             "extra_config has no \"model\"")
        self.model = model
        if storage_config.should_split_heads:
            raise ValueError("kvstrata: heterogeneous-TP head splitting (tp_lcm_size) is not supported")
        if storage_config.dcp_size > 1:
            raise ValueError("kvstrata: decode context parallelism (dcp_size > 1) is not supported")

        self._lock = threading.Lock()
        self._client = None
        self._generation = 0
        self._next_connect = 0.0
        self._pools: Dict[str, _Pool] = {}
        self._failing = False
        self.stats = {"errors": 0, "reconnects": 0, "pages_read": 0, "pages_written": 0,
                      "pages_missed": 0, "write_failures": 0}
        # SGLang's L3 storage metrics (--enable-metrics; get_stats drains them).
        self._metrics_lock = threading.Lock()
        self._prefetch_pgs, self._prefetch_bw, self._backup_pgs, self._backup_bw = [], [], [], []

    # ---- pools ---------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host):
        super().register_mem_pool_host(mem_pool_host)
        pool = _Pool("kv", mem_pool_host)
        pool.identity = self._identity(pool)
        self._pools["kv"] = pool
        # Open the namespace now so a node that rejects it (a block above its
        # limit) fails start-up; an unreachable node only degrades.
        self._namespace(pool, at_start=True)

    def register_mem_host_pool_v2(self, host_pool, host_pool_name):
        # SGLang's HybridCacheController (every model in 0.5.x) registers its
        # pool group here after register_mem_pool_host: the KV anchor, and for
        # hybrid models side pools (SWA, indexer, draft) that the v2 calls
        # move alongside the KV pages, each in a namespace of its own.
        name = str(host_pool_name)
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        if name == "kv":
            if "kv" not in self._pools or self._pools["kv"].host_pool is not host_pool:
                self.register_mem_pool_host(host_pool)
            return
        try:
            pool = _Pool(name, host_pool)
        except ValueError:
            raise
        except Exception as e:  # a pool class without the page geometry we need
            raise ValueError("kvstrata: host pool %r (%s) is not supported: %s"
                             % (name, type(host_pool).__name__, e)) from e
        pool.identity = self._identity(pool)
        self._pools[name] = pool
        self._namespace(pool, at_start=True)

    def _identity(self, pool: _Pool) -> str:
        cfg, hp = self.storage_config, pool.host_pool
        shard = "mla" if cfg.is_mla_model else "tp%dof%d" % (cfg.tp_rank, cfg.tp_size)
        if cfg.pp_size > 1:
            shard += "-pp%dof%d" % (cfg.pp_rank, cfg.pp_size)
        if cfg.attn_cp_size > 1:
            shard += "-cp%dof%d" % (cfg.attn_cp_rank, cfg.attn_cp_size)
        geometry = ",".join("%s=%s" % (a, getattr(hp, a)) for a in (
            "layer_num", "head_num", "head_dim", "v_head_dim", "kv_cache_dim", "storage_format_tag")
            if getattr(hp, a, None) is not None)
        tail = "#sglang-hicache-v1|%s|%s|%s|%s|%s|page%d|%dx%d|%s" % (
            pool.name, type(hp).__name__, getattr(hp, "layout", "?"), self._stored_dtype(hp),
            geometry, pool.page_size, pool.pieces, pool.piece_bytes, shard)
        ident = self.model + tail
        if len(ident.encode()) > _MAX_NAME_BYTES:
            # Keep the model's readable head and a digest of all of it, so two
            # long paths that share a prefix stay apart.
            digest = "~" + hashlib.sha256(self.model.encode()).hexdigest()[:16]
            room = max(_MAX_NAME_BYTES - len(tail.encode()) - len(digest), 8)
            head = self.model.encode()[:room].decode(errors="ignore")
            ident = head + digest + tail
        if len(ident.encode()) > _MAX_NAME_BYTES:
            ident = (ident.encode()[:_MAX_NAME_BYTES - 25].decode(errors="ignore") + "~"
                     + hashlib.sha256(ident.encode()).hexdigest()[:24])
        return ident

    def _stored_dtype(self, hp) -> str:
        name = str(hp.dtype).replace("torch.", "")
        if hp.dtype != torch.uint8:
            return name
        # SGLang keeps fp8 caches (e4m3, e5m2) as uint8: the pool's dtype does
        # not say which, and bytes of one read as the other are garbage.
        fmt = self.kv_cache_dtype
        if fmt is None:
            try:
                from sglang.srt.runtime_context import get_server_args
                fmt = get_server_args().kv_cache_dtype
            except Exception:  # not inside a launched engine
                fmt = None
        if not fmt:
            raise ValueError("kvstrata: the host pool stores uint8 (an fp8 KV cache) and the "
                             "engine's --kv-cache-dtype is unknown here; set "
                             "extra_config[\"kv_cache_dtype\"]")
        return "%s:%s" % (name, fmt)

    # ---- connection ----------------------------------------------------------

    def _make_client(self):
        if self._given_client is not None:
            return self._given_client
        if self.nodes or self.dns:
            args = {k: v for k, v in (("nodes", self.nodes), ("dns", self.dns),
                                       ("replication", self.replication)) if v is not None}
            return kvstrata.Cluster(timeout=self.connect_timeout,
                                    ucx_transports=self.ucx_transports, **args)
        return kvstrata.Client(self.node, timeout=self.connect_timeout,
                               ucx_transports=self.ucx_transports)

    def _namespace(self, pool: _Pool, at_start=False):
        """The pool's namespace on a live client, or None while degraded.

        Raises only `at_start` (pool registration), for a namespace the node
        refuses; later the same answer (a node restarted with smaller slabs)
        is a failure like any other.
        """
        with self._lock:
            if self._client is None:
                now = time.monotonic()
                if now < self._next_connect:
                    return None
                self._next_connect = now + self.reconnect_interval
                try:
                    self._client = self._make_client()
                except Exception as e:  # unreachable node: degraded, retried later
                    self._note_failure("connect to %s" % (self.nodes or self.dns or self.node), e)
                    return None
                self._generation += 1
                if self._generation > 1:
                    self.stats["reconnects"] += 1
            if pool.ns_generation != self._generation:
                spec = dict(tenant=self.tenant, model=pool.identity,
                            tokens_per_block=pool.page_size, block_bytes=pool.piece_bytes)
                if not self.storage_config.is_mla_model:
                    spec.update(tp_rank=self.storage_config.tp_rank,
                                tp_size=self.storage_config.tp_size)
                try:
                    pool.ns = self._client.open_namespace(timeout=self.timeout, **spec)
                except kvstrata.Error as e:
                    if e.code == kvstrata.INVALID_ARGUMENT and at_start:
                        raise ValueError("kvstrata: the node rejected the namespace for host pool "
                                         "%r (%d-byte blocks): %s" % (pool.name, pool.piece_bytes, e))
                    self._drop_client_locked(e)
                    self._note_failure("open namespace", e)
                    return None
                except Exception as e:
                    self._note_failure("open namespace", e)
                    return None
                pool.ns_generation = self._generation
            return pool.ns

    def _registered_buffer(self, pool: _Pool):
        with self._lock:
            if self._client is None:
                raise RuntimeError("the client was dropped by a failure on another thread")
            if pool.buffer_generation != self._generation:
                pool.buffer = self._client.register(pool.host_pool.kv_buffer)
                pool.buffer_generation = self._generation
            return pool.buffer

    def _drop_client_locked(self, error):
        # Only a single-node Client is rebuilt: a Cluster takes failed nodes
        # out and back by its own health checks, and a client handed in by
        # the caller cannot be rebuilt here.
        if self._given_client is not None or self.nodes or self.dns:
            return
        if getattr(error, "code", None) in _RECONNECT_CODES:
            self._client = None
            self._next_connect = time.monotonic() + self.reconnect_interval

    def _failed(self, what, error):
        if isinstance(error, (ValueError, TypeError)):
            # The caller's mistake (wrong sizes, wrong types), not the node's.
            self.stats["errors"] += 1
            logger.error("kvstrata: %s: bad call: %s", what, error)
            return
        with self._lock:
            self._drop_client_locked(error)
        self._note_failure(what, error)

    def _note_failure(self, what, error):
        self.stats["errors"] += 1
        # One line per run of failures: a dead node must not flood the log.
        if not self._failing:
            self._failing = True
            logger.warning("kvstrata: %s failed (%s); HiCache L3 misses until the node answers",
                           what, error)

    def _ok(self):
        if self._failing:
            self._failing = False
            logger.info("kvstrata: the node answers again")

    # ---- key chains ----------------------------------------------------------

    def _chain(self, pool: _Pool, keys: List[str], extra_info):
        """(block keys, parents) of `keys` in order, chained from the prefix."""
        blocks = []
        for k in keys:
            blocks.extend(page_block_keys(k, pool.pieces))
        previous = None
        prefix = getattr(extra_info, "prefix_keys", None) if extra_info is not None else None
        if prefix:
            previous = page_block_keys(prefix[-1], pool.pieces)[-1]
        parents = [previous] + blocks[:-1]
        return blocks, parents

    def _page_results(self, pool: _Pool, outcomes, ok, pages):
        per_page = [all(o in ok for o in outcomes[i * pool.pieces:(i + 1) * pool.pieces])
                    for i in range(pages)]
        return per_page

    # ---- existence -----------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: List[str],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        pool = self._pools.get("kv")
        if pool is None or not keys:
            return 0
        ns = self._namespace(pool)
        if ns is None:
            return 0
        try:
            blocks, _ = self._chain(pool, keys, None)
            found = ns.lookup(blocks, timeout=self.timeout)
        except Exception as e:
            self._failed("lookup", e)
            return 0
        self._ok()
        # Pieces are evicted independently: a page counts only if all are there.
        return found // pool.pieces

    # ---- zero-copy path (interface_v1) ---------------------------------------

    def _zero_copy_items(self, pool: _Pool, keys, host_indices):
        if host_indices.numel() != len(keys) * pool.page_size:
            raise ValueError("%d host indices for %d pages of %d tokens"
                             % (host_indices.numel(), len(keys), pool.page_size))
        ptrs, sizes = pool.host_pool.get_page_buffer_meta(host_indices.cpu())
        if len(ptrs) != len(keys) * pool.pieces or any(s != pool.piece_bytes for s in sizes):
            raise ValueError("host pool reported %d pieces for %d pages" % (len(ptrs), len(keys)))
        base = pool.host_pool.kv_buffer.data_ptr()
        end = pool.host_pool.kv_buffer.numel() * pool.host_pool.kv_buffer.element_size()
        offsets = [p - base for p in ptrs]
        if any(o < 0 or o + pool.piece_bytes > end for o in offsets):
            raise ValueError("a page piece lies outside the host pool buffer")
        return offsets

    def _zero_copy_io(self, pool: Optional[_Pool], keys, host_indices, extra_info, write):
        if pool is None or not keys:
            return [False] * len(keys)
        ns = self._namespace(pool)
        if ns is None:
            return [False] * len(keys)
        try:
            offsets = self._zero_copy_items(pool, keys, host_indices)
            buffer = self._registered_buffer(pool)
            blocks, parents = self._chain(pool, keys, extra_info)
            start = time.perf_counter()
            if write:
                result = ns.publish([(b, p, buffer, o) for b, p, o in zip(blocks, parents, offsets)],
                                    timeout=self.timeout)
            else:
                result = ns.fetch([(b, buffer, o) for b, o in zip(blocks, offsets)],
                                  timeout=self.timeout)
            self._record(pool, write, result, time.perf_counter() - start)
        except Exception as e:
            self._failed("publish" if write else "fetch", e)
            return [False] * len(keys)
        self._ok()
        if write:
            return self._count_written(self._page_results(pool, result.outcomes, _STORED, len(keys)))
        return self._count_read(self._page_results(pool, result.outcomes, {kvstrata.Outcome.OK},
                                                   len(keys)))

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        return self._zero_copy_io(self._pools.get("kv"), keys, host_indices, extra_info, False)

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        return self._zero_copy_io(self._pools.get("kv"), keys, host_indices, extra_info, True)

    # ---- v2: the KV pool and side pools (hybrid models) ------------------------

    def _pages_present(self, pool: _Pool, keys) -> List[bool]:
        """Which of `keys` have every block stored in `pool`'s namespace."""
        ns = self._namespace(pool)
        if ns is None or not keys:
            return [False] * len(keys)
        blocks, _ = self._chain(pool, keys, None)
        prefix = ns.lookup(blocks, timeout=self.timeout) // pool.pieces
        present = [True] * prefix + [False] * (len(keys) - prefix)
        # Past the stored prefix, a page may still be there (a trailing
        # window is written without the pages before it): one lookup each.
        for i in range(prefix + 1, len(keys)):
            page = blocks[i * pool.pieces:(i + 1) * pool.pieces]
            present[i] = ns.lookup(page, timeout=self.timeout) == pool.pieces
        return present

    def batch_exists_v2(self, keys: List[str], pool_transfers: Optional[List[PoolTransfer]] = None,
                        extra_info: Optional[HiCacheStorageExtraInfo] = None) -> PoolTransferResult:
        # The semantics of SGLang's own HiCacheFile.batch_exists_v2: the KV
        # prefix, cut by each side pool's hit policy.
        kv_pages = self.batch_exists(keys, extra_info)
        hits = {PoolName.KV: kv_pages} if kv_pages else {}
        restorable = set(range(1, kv_pages + 1))
        try:
            for transfer in pool_transfers or []:
                if not restorable:
                    break
                pool = self._pools.get(str(transfer.name))
                if transfer.hit_policy == PoolHitPolicy.BLOCK_GROUPS:
                    continue  # reports its own verdict and never gates the KV hit: none here
                if pool is None:
                    restorable = set()  # a pool nothing was stored for
                    break
                present = self._pages_present(pool, keys[:kv_pages])
                if transfer.hit_policy == PoolHitPolicy.ALL_PAGES:
                    boundary = present.index(False) if False in present else kv_pages
                    pool_ok = set(range(1, boundary + 1))
                else:  # TRAILING_PAGES: only the window before the prefix's end
                    window = max(1, len(transfer.keys) if transfer.keys else 1)
                    pool_ok = {n for n in range(1, kv_pages + 1)
                               if all(present[max(0, n - window):n])}
                    boundary = max(pool_ok, default=0)
                if boundary:
                    hits[transfer.name] = boundary
                restorable &= pool_ok
        except Exception as e:
            self._failed("lookup", e)
            return PoolTransferResult.empty()
        ordered = sorted(restorable)
        return PoolTransferResult(ordered[-1] if ordered else 0, hits, ordered)

    def _batch_io_v2(self, transfers, extra_info, write):
        results = {}
        for transfer in transfers:
            keys = transfer.keys or []
            pool = self._pools.get(str(transfer.name))
            if pool is None or transfer.host_indices is None:
                logger.error("kvstrata: no host pool %r registered, or no host indices",
                             str(transfer.name))
                results[transfer.name] = [False] * len(keys)
                continue
            results[transfer.name] = self._zero_copy_io(pool, keys, transfer.host_indices,
                                                        extra_info, write)
        return results

    def batch_get_v2(self, transfers: List[PoolTransfer],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> Dict[str, List[bool]]:
        return self._batch_io_v2(transfers, extra_info, False)

    def batch_set_v2(self, transfers: List[PoolTransfer],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> Dict[str, List[bool]]:
        return self._batch_io_v2(transfers, extra_info, True)

    # ---- generic path (flat page tensors) -------------------------------------

    def _flat_pool(self):
        pool = self._pools.get("kv")
        if pool is None:
            logger.error("kvstrata: no host pool registered (register_mem_pool_host)")
            return None
        if pool.flat_offsets is None:
            logger.error("kvstrata: host layout %r has no flat-page mapping; "
                         "set \"interface_v1\": 1 for the zero-copy path",
                         getattr(pool.host_pool, "layout", None))
            return None
        return pool

    def _flat_tensor(self, pool: _Pool, tensor, what):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError("%s must be a torch.Tensor, got %s" % (what, type(tensor).__name__))
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != pool.page_bytes:
            raise ValueError("%s holds %d bytes; a page is %d" % (what, nbytes, pool.page_bytes))
        return tensor

    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        pool = self._flat_pool()
        if pool is None or not keys:
            return [None] * len(keys)
        ns = self._namespace(pool)
        if ns is None:
            return [None] * len(keys)
        try:
            if target_locations is None:
                targets = [pool.host_pool.get_dummy_flat_data_page() for _ in keys]
            else:
                if len(target_locations) != len(keys):
                    raise ValueError("%d target locations for %d keys"
                                     % (len(target_locations), len(keys)))
                targets = [self._flat_tensor(pool, t, "target_location") for t in target_locations]
                for t in targets:
                    if not t.is_contiguous() or t.device.type != "cpu":
                        raise ValueError("target_location must be a contiguous CPU tensor")
            blocks, _ = self._chain(pool, keys, None)
            items = [(blocks[i * pool.pieces + j], targets[i], pool.flat_offsets[j])
                     for i in range(len(keys)) for j in range(pool.pieces)]
            start = time.perf_counter()
            result = ns.fetch(items, timeout=self.timeout)
            self._record(pool, False, result, time.perf_counter() - start)
        except Exception as e:
            self._failed("fetch", e)
            return [None] * len(keys)
        self._ok()
        ok = self._count_read(self._page_results(pool, result.outcomes, {kvstrata.Outcome.OK},
                                                 len(keys)))
        return [t if good else None for t, good in zip(targets, ok)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        pool = self._flat_pool()
        if pool is None or not keys:
            return False
        ns = self._namespace(pool)
        if ns is None:
            return False
        try:
            if values is None or len(values) != len(keys):
                raise ValueError("batch_set needs one flat page tensor per key")
            sources = [self._flat_tensor(pool, v, "value").contiguous().cpu() for v in values]
            blocks, parents = self._chain(pool, keys, None)
            items = [(blocks[i * pool.pieces + j], parents[i * pool.pieces + j], sources[i],
                      pool.flat_offsets[j])
                     for i in range(len(keys)) for j in range(pool.pieces)]
            start = time.perf_counter()
            result = ns.publish(items, timeout=self.timeout)
            self._record(pool, True, result, time.perf_counter() - start)
        except Exception as e:
            self._failed("publish", e)
            return False
        self._ok()
        return all(self._count_written(self._page_results(pool, result.outcomes, _STORED,
                                                          len(keys))))

    # ---- bookkeeping ---------------------------------------------------------

    def _count_read(self, per_page):
        hits = sum(per_page)
        self.stats["pages_read"] += hits
        self.stats["pages_missed"] += len(per_page) - hits
        return per_page

    def _count_written(self, per_page):
        done = sum(per_page)
        self.stats["pages_written"] += done
        self.stats["write_failures"] += len(per_page) - done
        return per_page

    def _record(self, pool: _Pool, write, result, seconds):
        if not self.storage_config.enable_storage_metrics:
            return
        pages = len(result.outcomes) // pool.pieces
        gb = result.bytes / 1e9  # bytes that moved (a write of stored blocks moves none)
        with self._metrics_lock:
            (self._backup_pgs if write else self._prefetch_pgs).append(pages)
            (self._backup_bw if write else self._prefetch_bw).append(gb / max(seconds, 1e-9))

    def get_stats(self):
        """SGLang's StorageMetrics since the last call: pages per batch and GB/s."""
        if not self.storage_config.enable_storage_metrics:
            return None
        from sglang.srt.observability.metrics_collector import StorageMetrics
        metrics = StorageMetrics()
        with self._metrics_lock:
            metrics.prefetch_pgs.extend(self._prefetch_pgs)
            metrics.prefetch_bandwidth.extend(self._prefetch_bw)
            metrics.backup_pgs.extend(self._backup_pgs)
            metrics.backup_bandwidth.extend(self._backup_bw)
            for values in (self._prefetch_pgs, self._prefetch_bw, self._backup_pgs, self._backup_bw):
                values.clear()
        return metrics

    def clear(self) -> None:
        # Other engines share these blocks; a node is cleared by its operator
        # (or eviction), never by one engine's cache reset.
        logger.info("kvstrata: clear() leaves the shared cache as it is")

    def close(self):
        with self._lock:
            for pool in self._pools.values():
                pool.ns = pool.buffer = None
                pool.ns_generation = pool.buffer_generation = -1
            self._client = None
