"""KvstrataConnector: a KV connector with vLLM v1's KVConnectorBase_V1 interface.

Enable it in vLLM (see client/python/README.md):

    --kv-transfer-config '{"kv_connector": "KvstrataConnector",
                           "kv_connector_module_path": "kvstrata.vllm_connector",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"node": "10.0.0.5:50151",
                                                         "cache_block_tokens": 256}}'

Layout. vLLM keeps one paged tensor per attention layer,
[2, num_blocks, block_size, num_kv_heads, head_size] (K and V, engine blocks
of `block_size` tokens, 16 by default). A kvstrata block ("cache block") is
`cache_block_tokens` tokens (a multiple of block_size, 256 by default) of ONE
layer: [2, cache_block_tokens / block_size, block_size, num_kv_heads,
head_size], i.e. the K and V of its engine blocks, gathered. Every layer has
its own kvstrata namespace (model name "<model>#layer<i>", the layer's KV
layout in the spec), so:
  - a layer's blocks travel as one batched Fetch, and the fetch of layer i+1
    runs while layer i computes (wait_for_layer_load waits for one layer);
  - saving is layer-wise too: save_kv_layer publishes a layer's finished
    cache blocks right after its attention wrote them;
  - blocks of different layers never mix, and the node needs no notion of
    sub-blocks. The price: a lookup per layer on the scheduler side (a
    prefix counts only when every layer has it; layers can be evicted
    independently).
Only full cache blocks of the prompt are published (a partial block has no
key); loads may end inside a cache block (only the engine blocks asked for
are written). The last prompt token is never loaded: the engine must compute
at least one token to produce logits.

Loads and saves go through staging buffers registered once with the client
(a gather/scatter copy on the engine's side), because a cache block's engine
blocks are scattered over the paged tensor.

When a request finishes, the scheduler side tells the node (RequestFinished)
which block ended its published prompt and how many tokens it generated, for
every layer's namespace: a hint the node's eviction policy may use to guess
which conversations come back. Hints go out on a thread of their own, so the
scheduler never waits for the node, and a failed hint is only logged.
"""
import atexit
import dataclasses
import logging
import queue
import re
import threading
import time
import weakref
from typing import Any, Optional

import torch

import kvstrata

logger = logging.getLogger(__name__)

try:  # vLLM present: be a real connector.
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)
    HAVE_VLLM = True
except ImportError:  # vLLM absent: the same interface, defined here.
    import enum
    HAVE_VLLM = False

    class KVConnectorRole(enum.Enum):
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata:
        pass

    class KVConnectorBase_V1:
        """The parts of vLLM's KVConnectorBase_V1 a connector relies on."""

        def __init__(self, vllm_config, role, kv_cache_config=None):
            self._connector_metadata = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self):
            return self._role

        def bind_connector_metadata(self, connector_metadata):
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self):
            self._connector_metadata = None

        def _get_connector_metadata(self):
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self):
            return self._connector_metadata is not None

        def get_block_ids_with_load_errors(self):
            return set()

        def shutdown(self):
            return None


_DTYPES = {torch.float16: kvstrata.DTYPE_FP16, torch.bfloat16: kvstrata.DTYPE_BF16,
           torch.float32: kvstrata.DTYPE_FP32, torch.int8: 5}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES[torch.float8_e4m3fn] = 4


def _output_tokens(request) -> int:
    """Tokens the request generated: vLLM's Request.num_output_tokens, else
    len(output_token_ids), else 0 (unknown)."""
    count = getattr(request, "num_output_tokens", None)
    if count is None:
        ids = getattr(request, "output_token_ids", None)
        count = len(ids) if ids is not None else 0
    return max(0, min(int(count), 2**32 - 1))


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


@dataclasses.dataclass
class TransferSpec:
    """Tokens [start, end) of one request to load into, or save from, its engine blocks."""
    req_id: str
    token_ids: list  # the prompt up to at least `end` (keys are chained over it)
    block_ids: list  # the request's engine blocks, from its first token
    start: int
    end: int


class KvstrataConnectorMetadata(KVConnectorMetadata):
    """What the worker loads and saves in one step."""

    def __init__(self, loads=None, saves=None):
        self.loads = list(loads or [])
        self.saves = list(saves or [])


@dataclasses.dataclass
class _Layout:
    model: str
    tenant: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: Any  # torch dtype
    block_size: int  # engine block, tokens
    cache_block_tokens: int
    tp_rank: int
    tp_size: int


def _layout_from(vllm_config) -> _Layout:
    """Reads the KV layout from a vLLM VllmConfig (or an object shaped like it).

    kv_connector_extra_config may override anything: node, cache_block_tokens,
    tenant, model, num_layers, num_kv_heads, head_size, dtype ("float16", ...).
    """
    extra = dict(getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {})
    model_config = vllm_config.model_config
    parallel_config = getattr(vllm_config, "parallel_config", None)

    def from_model(method, *args):
        fn = getattr(model_config, method, None)
        return fn(*args) if fn is not None else None

    dtype = extra.get("dtype", getattr(model_config, "dtype", torch.float16))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tp_size = getattr(parallel_config, "tensor_parallel_size", 1) if parallel_config else 1
    layout = _Layout(
        model=str(extra.get("model", getattr(model_config, "model", "model"))),
        tenant=str(extra.get("tenant", "")),
        num_layers=int(extra.get("num_layers") or from_model("get_num_layers", parallel_config)),
        num_kv_heads=int(extra.get("num_kv_heads") or from_model("get_num_kv_heads", parallel_config)),
        head_size=int(extra.get("head_size") or from_model("get_head_size")),
        dtype=dtype,
        block_size=int(vllm_config.cache_config.block_size),
        cache_block_tokens=int(extra.get("cache_block_tokens", 256)),
        tp_rank=int(extra.get("tp_rank", 0)),
        tp_size=int(tp_size),
    )
    if layout.cache_block_tokens % layout.block_size != 0:
        raise ValueError("cache_block_tokens (%d) must be a multiple of the engine block size (%d)"
                         % (layout.cache_block_tokens, layout.block_size))
    if layout.dtype not in _DTYPES:
        raise ValueError("KV dtype %s has no kvstrata dtype" % layout.dtype)
    return layout


def _layer_index(name: str, position: int) -> int:
    """vLLM names layers like "model.layers.7.self_attn.attn": the last number is the index."""
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else position


def _block_ids_of(blocks) -> list:
    """Block ids from vLLM's KVCacheBlocks (one group), a tuple of groups or a list."""
    if hasattr(blocks, "get_block_ids"):
        blocks = blocks.get_block_ids()
    if isinstance(blocks, tuple):
        blocks = blocks[0] if blocks else []
    return list(blocks)


class KvstrataConnector(KVConnectorBase_V1):
    """Loads cached prompt prefixes from kvstrata and publishes computed ones."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {})
        self._layout = _layout_from(vllm_config)
        if HAVE_VLLM and role == KVConnectorRole.WORKER and "tp_rank" not in extra:
            try:  # each tensor-parallel rank stores its own heads, in its own namespaces
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
                self._layout.tp_rank = get_tensor_model_parallel_rank()
            except Exception:  # not initialised (tests): rank 0
                pass
        self._client = kvstrata.Client(str(extra.get("node", "127.0.0.1:50151")),
                                       timeout=float(extra.get("timeout", 30.0)),
                                       ucx_transports=str(extra.get("ucx_transports", "")))
        # How many layer fetches may be in flight ahead of the layer being computed.
        self._load_window = max(1, int(extra.get("load_window", 2)))
        # False: load every layer before the forward pass starts (no overlap;
        # what bench/ttft_bench.py compares the layer-wise load against).
        self._layerwise = str(extra.get("layerwise_load", True)).lower() not in ("false", "0")
        # Request-finished hints to the node (scheduler side), each RPC bounded by hint_timeout.
        self._send_hints = str(extra.get("request_hints", True)).lower() not in ("false", "0")
        self._hint_timeout = float(extra.get("hint_timeout", 2.0))
        self._hints = _HintSender(self._send_request_finished,
                                  exit_wait=2 * self._hint_timeout + 1.0)
        self._hints_failing = False  # log a failing node once, not once per request
        self._namespaces = {}  # layer index -> kvstrata.Namespace
        # Scheduler side.
        self._matched = {}  # req_id -> (num_computed_tokens, tokens stored in every layer)
        self._pending_loads = []  # TransferSpec, for the next build_connector_meta
        self._requests = {}  # req_id -> {"tokens", "block_ids", "saved"}
        # Worker side.
        self._kv_caches = {}  # layer name -> paged tensor
        self._layer_order = []  # layer names in forward order
        self._layer_of = {}  # layer name -> layer index
        self._staging = {}  # (layer name, "load"|"save") -> (tensor, kvstrata.Buffer, slots)
        self._loads = {}  # layer name -> in-flight load state of this step
        self._load_queue = []  # layer names whose fetch is not issued yet
        self._saves = []  # (layer name, Future)
        self._load_errors = set()
        # load_wait_s: time the step spent in start_load_kv and wait_for_layer_load
        # (issuing fetches, waiting for bytes, scattering): what overlap did not hide.
        # request_hints: hints the node answered (one per layer per request);
        # hint_errors: requests whose hints failed.
        self.stats = {"loaded_tokens": 0, "saved_blocks": 0, "fetched_bytes": 0,
                      "published_bytes": 0, "load_wait_s": 0.0, "request_hints": 0,
                      "hint_errors": 0}

    # ------------------------------------------------------------------ helpers

    def _namespace(self, layer: int, timeout=None):
        # Also called from the hint thread: a race opens a namespace twice,
        # which is harmless (OpenNamespace is idempotent; dict updates are atomic).
        ns = self._namespaces.get(layer)
        if ns is None:
            lay = self._layout
            ns = self._client.open_namespace(
                tenant=lay.tenant, model="%s#layer%d" % (lay.model, layer),
                dtype=_DTYPES[lay.dtype], num_layers=1, num_kv_heads=lay.num_kv_heads,
                head_dim=lay.head_size, tokens_per_block=lay.cache_block_tokens,
                tp_rank=lay.tp_rank, tp_size=lay.tp_size, timeout=timeout)
            self._namespaces[layer] = ns
        return ns

    def _cached_tokens(self, token_ids) -> int:
        """Tokens of `token_ids` (whole cache blocks) stored in every layer."""
        blocks = None
        # The last layer first: it is saved last, so it is the likeliest to be short.
        for layer in reversed(range(self._layout.num_layers)):
            ns = self._namespace(layer)
            keys = ns.keys(token_ids)
            if blocks is not None:
                keys = keys[:blocks]
            if not keys:
                return 0
            blocks = ns.lookup(keys)
            if blocks == 0:
                return 0
        return (blocks or 0) * self._layout.cache_block_tokens

    # ------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        tokens = list(request.prompt_token_ids)
        lay = self._layout
        # At least the last prompt token is computed locally (it yields the logits).
        limit = (len(tokens) - 1) // lay.block_size * lay.block_size
        if limit <= num_computed_tokens:
            return 0, False
        try:
            stored = self._cached_tokens(tokens[:limit + lay.cache_block_tokens])
        except kvstrata.Error as e:  # the cache is an optimisation: a failure is a miss
            logger.warning("kvstrata lookup failed (%s): computing locally", e)
            return 0, False
        self._matched[request.request_id] = (num_computed_tokens, stored)
        return max(0, min(stored, limit) - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        req_id = request.request_id
        computed, stored = self._matched.pop(req_id, (0, 0))
        state = self._requests.setdefault(
            req_id, {"tokens": list(request.prompt_token_ids), "block_ids": [], "saved": 0})
        # Whole cache blocks the node already has need no publish.
        state["saved"] = max(state["saved"], stored // self._layout.cache_block_tokens
                             * self._layout.cache_block_tokens)
        # The scheduler allocates for its last get_num_new_matched_tokens answer;
        # never load past what that lookup found.
        num_external_tokens = min(num_external_tokens, max(0, stored - computed))
        if num_external_tokens > 0:
            block_ids = _block_ids_of(blocks)
            state["block_ids"] = list(block_ids)
            self._pending_loads.append(TransferSpec(
                req_id, state["tokens"][:computed + num_external_tokens +
                                        self._layout.cache_block_tokens],
                list(block_ids), computed, computed + num_external_tokens))

    def build_connector_meta(self, scheduler_output):
        meta = KvstrataConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        scheduled = getattr(scheduler_output, "num_scheduled_tokens", {}) or {}
        for new in getattr(scheduler_output, "scheduled_new_reqs", []) or []:
            state = self._requests.setdefault(
                new.req_id, {"tokens": list(new.prompt_token_ids), "block_ids": [], "saved": 0})
            state["block_ids"] = _block_ids_of(new.block_ids)
            state["computed"] = new.num_computed_tokens
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            for i, req_id in enumerate(cached.req_ids):
                state = self._requests.get(req_id)
                if state is None:
                    continue
                new_ids = cached.new_block_ids[i] if cached.new_block_ids else None
                resumed = getattr(cached, "resumed_from_preemption", None)
                if (resumed and resumed[i]) or req_id in (getattr(cached, "resumed_req_ids", None) or ()):
                    state["block_ids"] = []  # a resumed request's blocks are all new
                if new_ids:
                    state["block_ids"].extend(_block_ids_of(new_ids))
                state["computed"] = cached.num_computed_tokens[i]
        c = self._layout.cache_block_tokens
        for req_id, n in scheduled.items():
            state = self._requests.get(req_id)
            if state is None or "computed" not in state:
                continue
            done = min(state["computed"] + n, len(state["tokens"]))
            end = done // c * c  # partial cache blocks are never published
            if end > state["saved"]:
                meta.saves.append(TransferSpec(req_id, state["tokens"][:end],
                                               list(state["block_ids"]), state["saved"], end))
                state["saved"] = end
        return meta

    def request_finished(self, request, block_ids):
        # Saves finish inside the step that computed them (wait_for_save):
        # the blocks can be freed now.
        state = self._requests.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        try:
            saved = state["saved"] if state else 0  # whole cache blocks, published or present
            if self._send_hints and saved >= self._layout.cache_block_tokens:
                self._hints.submit(state["tokens"][:saved], _output_tokens(request))
        except Exception:  # a hint must never fail the engine
            logger.exception("kvstrata: could not queue the request-finished hint")
        return False, None

    def _send_request_finished(self, tokens, output_tokens):
        """On the hint thread: the last published block of every layer's namespace."""
        try:
            for layer in range(self._layout.num_layers):
                if self._hints.closed:
                    return
                ns = self._namespace(layer, timeout=self._hint_timeout)
                last = ns.keys(tokens)[-1]
                ns.request_finished(last, output_tokens, timeout=self._hint_timeout)
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
        base = getattr(super(), "shutdown", None)  # older vLLM bases have none
        return base() if base is not None else None

    # ---------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches):
        lay = self._layout
        for position, (name, tensor) in enumerate(kv_caches.items()):
            expected = (2, tensor.shape[1], lay.block_size, lay.num_kv_heads, lay.head_size)
            if tuple(tensor.shape) != expected or tensor.dtype != lay.dtype:
                raise ValueError("layer %s: KV cache %s %s, expected [2, num_blocks, %d, %d, %d] %s"
                                 % (name, tuple(tensor.shape), tensor.dtype, lay.block_size,
                                    lay.num_kv_heads, lay.head_size, lay.dtype))
            self._kv_caches[name] = tensor
            self._layer_order.append(name)
            self._layer_of[name] = _layer_index(name, position)
            self._namespace(self._layer_of[name])

    def _staging_view(self, name: str, kind: str, slots: int):
        """A registered [slots, 2, E, block_size, heads, head_size] staging tensor."""
        entry = self._staging.get((name, kind))
        if entry is None or entry[2] < slots:
            lay = self._layout
            per_block = lay.cache_block_tokens // lay.block_size
            shape = (max(slots, 1), 2, per_block, lay.block_size, lay.num_kv_heads, lay.head_size)
            tensor = torch.empty(shape, dtype=lay.dtype, device=self._kv_caches[name].device)
            entry = (tensor, self._client.register(tensor), shape[0])
            self._staging[(name, kind)] = entry
        return entry

    def _block_bytes(self, name):
        return self._namespace(self._layer_of[name]).block_bytes

    def start_load_kv(self, forward_context, **kwargs):
        began = time.perf_counter()
        try:
            self._start_load()
        finally:
            self.stats["load_wait_s"] += time.perf_counter() - began

    def _start_load(self):
        meta = self._get_connector_metadata()
        self._loads = {}
        self._load_queue = []
        if not meta.loads:
            return
        c = self._layout.cache_block_tokens
        for name in self._layer_order:
            ns = self._namespace(self._layer_of[name])
            plan = []  # (spec, first cache block, cache blocks, staging slot of the first)
            slots = 0
            for spec in meta.loads:
                first, last = spec.start // c, (spec.end + c - 1) // c
                plan.append((spec, ns.keys(spec.token_ids[:last * c]), first, last, slots))
                slots += last - first
            self._loads[name] = {"plan": plan, "slots": slots, "future": None}
            self._load_queue.append(name)
        if not self._layerwise:
            while self._load_queue:
                self._issue_next_load()
            for name in list(self._layer_order):
                self._finish_layer_load(name, self._loads.pop(name))
            return
        for _ in range(self._load_window):
            self._issue_next_load()

    def _issue_next_load(self):
        if not self._load_queue:
            return
        name = self._load_queue.pop(0)
        state = self._loads[name]
        tensor, buffer, _ = self._staging_view(name, "load", state["slots"])
        block_bytes = self._block_bytes(name)
        items = []
        for spec, keys, first, last, slot in state["plan"]:
            for j in range(first, last):
                items.append((keys[j], buffer, (slot + j - first) * block_bytes))
        state["future"] = self._namespace(self._layer_of[name]).fetch_async(items)

    def wait_for_layer_load(self, layer_name: str):
        state = self._loads.pop(layer_name, None)
        if state is None:
            return
        began = time.perf_counter()
        try:
            self._finish_layer_load(layer_name, state)
        finally:
            self.stats["load_wait_s"] += time.perf_counter() - began

    def _finish_layer_load(self, layer_name, state):
        if state["future"] is None:  # still queued (called out of order): issue it now
            self._load_queue.remove(layer_name)
            self._load_queue.insert(0, layer_name)
            self._issue_next_load()
        result = state["future"].wait()
        self._issue_next_load()  # the next layer's fetch runs while this one computes
        self.stats["fetched_bytes"] += result.bytes
        tensor, _, _ = self._staging[(layer_name, "load")]
        kv = self._kv_caches[layer_name]
        lay = self._layout
        per_block = lay.cache_block_tokens // lay.block_size
        outcomes = result.outcomes
        # Staging as [2, engine blocks, ...]: source rows for the scatter.
        flat = tensor[:state["slots"]].transpose(0, 1).reshape(
            2, state["slots"] * per_block, lay.block_size, lay.num_kv_heads, lay.head_size)
        index = 0
        for spec, keys, first, last, slot in state["plan"]:
            ok = all(o == kvstrata.Outcome.OK for o in outcomes[index:index + last - first])
            index += last - first
            engine = range(spec.start // lay.block_size, spec.end // lay.block_size)
            dst = [spec.block_ids[e] for e in engine]
            if not ok:  # evicted since the lookup: the engine must recompute these
                self._load_errors.update(dst)
                continue
            src = torch.tensor([(slot + e // per_block - first) * per_block + e % per_block
                                for e in engine], dtype=torch.long)
            kv[:, torch.tensor(dst, dtype=torch.long)] = flat[:, src]
            if layer_name == self._layer_order[-1]:
                self.stats["loaded_tokens"] += spec.end - spec.start

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs):
        meta = self._get_connector_metadata()
        if not meta.saves:
            return
        lay = self._layout
        c = lay.cache_block_tokens
        per_block = c // lay.block_size
        slots = sum((s.end - s.start) // c for s in meta.saves)
        tensor, buffer, _ = self._staging_view(layer_name, "save", slots)
        ns = self._namespace(self._layer_of[layer_name])
        block_bytes = ns.block_bytes
        items = []
        slot = 0
        for spec in meta.saves:
            keys = ns.keys(spec.token_ids[:spec.end])
            first, last = spec.start // c, spec.end // c
            ids = torch.tensor(spec.block_ids[first * per_block:last * per_block], dtype=torch.long)
            gathered = kv_layer[:, ids].reshape(2, last - first, per_block, lay.block_size,
                                                lay.num_kv_heads, lay.head_size)
            tensor[slot:slot + last - first].copy_(gathered.transpose(0, 1))
            for j in range(first, last):
                items.append((keys[j], keys[j - 1] if j > 0 else None, buffer,
                              (slot + j - first) * block_bytes))
            slot += last - first
        self._saves.append((layer_name, ns.publish_async(items)))

    def wait_for_save(self):
        saves, self._saves = self._saves, []
        for name, future in saves:
            try:
                result = future.wait()
            except kvstrata.Error as e:  # best effort: a lost save is a future miss
                logger.warning("kvstrata publish of %s failed: %s", name, e)
                continue
            self.stats["published_bytes"] += result.bytes
            if name == self._layer_order[-1]:
                self.stats["saved_blocks"] += len(result.outcomes)

    def get_finished(self, finished_req_ids):
        return None, None  # loads and saves complete within their step

    def get_block_ids_with_load_errors(self):
        errors, self._load_errors = self._load_errors, set()
        return errors
