"""A tiny decoder-only transformer served the way vLLM v1 serves models, on torch CPU.

It exists to exercise KvstrataConnector end to end without a model server:
a paged KV cache in older vLLM's FlashAttention layout (per layer
[2, num_blocks, 16, num_kv_heads, head_size]), chunked
prefill, and a scheduler/worker loop that calls the connector's methods where
vLLM's scheduler and model runner do. The weights are RANDOM (torch.Generator
seeded with TinyConfig.seed, 1234 by default): the logits mean nothing, but
two processes built with the same seed compute bit-identical ones.

Exactness: a forward pass over the same tokens with the same shapes gives
the same bits. Prefill runs in chunks aligned to multiples of `chunk` tokens
(like vLLM's max_num_batched_tokens), so when a loaded prefix ends on a chunk
boundary (cache blocks of 256 tokens, chunks of 256, a prompt that is not a
multiple of 256) the decode worker computes the rest with exactly the shapes
a local prefill uses, and its logits equal the local ones (torch.equal).

The connector needs vLLM importable, so run it in the engine tests'
virtualenv (tests/engine/run_in_venv.sh -m kvstrata.examples.tiny_llm ...).
Two-process use (what tests/python/handoff_test.py runs):
    python3 -m kvstrata.examples.tiny_llm --role=prefill --node=HOST:PORT --prompt_tokens=1000
    python3 -m kvstrata.examples.tiny_llm --role=decode  --node=HOST:PORT --prompt_tokens=1000 --out=r.pt
"""
import argparse
import dataclasses
import json
import math
import time
import types

import torch

from kvstrata.vllm_connector import KVConnectorRole, KvstrataConnector


@dataclasses.dataclass
class TinyConfig:
    vocab_size: int = 4096
    num_layers: int = 4
    hidden: int = 256
    num_heads: int = 8
    num_kv_heads: int = 4
    head_size: int = 32
    mlp_hidden: int = 768
    block_size: int = 16  # engine (vLLM) block, tokens
    seed: int = 1234


def layer_name(layer):
    return "model.layers.%d.self_attn.attn" % layer


_MKLDNN = torch.backends.mkldnn.is_available()


def _weight(w):
    """A [in, out] weight in the form _linear takes (oneDNN's, [out, in], when there)."""
    w = w.t().contiguous()
    return w.to_mkldnn() if _MKLDNN else w


def _linear(x, w):
    """x [m, in] times a _weight. oneDNN's GEMM: Debian's torch uses reference BLAS
    for torch.matmul, about 20x slower on CPU."""
    if _MKLDNN:
        if not w.is_mkldnn:
            w = w.contiguous().to_mkldnn()
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), w, None).to_dense()
    return x @ w.t()


class TinyLM:
    """Weights and the forward pass over a paged KV cache."""

    def __init__(self, cfg: TinyConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)

        def weight(rows, cols):
            return _weight(torch.randn(rows, cols, generator=g) / math.sqrt(rows))

        self.embed = torch.randn(cfg.vocab_size, cfg.hidden, generator=g)
        self.lm_head = self.embed.contiguous().to_mkldnn() if _MKLDNN else self.embed
        self.layers = []
        for _ in range(cfg.num_layers):
            self.layers.append({
                "wq": weight(cfg.hidden, cfg.num_heads * cfg.head_size),
                "wk": weight(cfg.hidden, cfg.num_kv_heads * cfg.head_size),
                "wv": weight(cfg.hidden, cfg.num_kv_heads * cfg.head_size),
                "wo": weight(cfg.num_heads * cfg.head_size, cfg.hidden),
                "w1": weight(cfg.hidden, cfg.mlp_hidden),
                "w2": weight(cfg.mlp_hidden, cfg.hidden),
            })
        inv = 1.0 / (10000 ** (torch.arange(0, cfg.head_size, 2, dtype=torch.float32) / cfg.head_size))
        self.inv_freq = inv

    @staticmethod
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def _rope(self, x, positions):
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    @torch.no_grad()
    def forward(self, tokens, start, block_ids, kv_caches, connector=None):
        """Computes tokens at positions [start, start + len(tokens)); returns the last logits."""
        cfg = self.cfg
        n = len(tokens)
        end = start + n
        positions = torch.arange(start, end)
        ids = torch.tensor(block_ids, dtype=torch.long)
        slot_block, slot_offset = ids[positions // cfg.block_size], positions % cfg.block_size
        context_blocks = (end + cfg.block_size - 1) // cfg.block_size
        group = cfg.num_heads // cfg.num_kv_heads
        mask = positions[:, None] >= positions[None, :]  # causal, within the chunk
        x = self.embed[torch.tensor(tokens, dtype=torch.long)]
        for index, w in enumerate(self.layers):
            name = layer_name(index)
            if connector is not None:
                connector.wait_for_layer_load(name)
            kv = kv_caches[name]
            h = self._norm(x)
            q = self._rope(_linear(h, w["wq"]).view(n, cfg.num_heads, cfg.head_size), positions)
            q = q * (1.0 / math.sqrt(cfg.head_size))
            k = self._rope(_linear(h, w["wk"]).view(n, cfg.num_kv_heads, cfg.head_size), positions)
            v = _linear(h, w["wv"]).view(n, cfg.num_kv_heads, cfg.head_size)
            kv[0, slot_block, slot_offset] = k.to(kv.dtype)
            kv[1, slot_block, slot_offset] = v.to(kv.dtype)
            # A bf16/fp16 cache (TinyEngine kv_dtype) is read back into fp32 for
            # the math; .float() of an fp32 cache is the tensor itself.
            keys = kv[0, ids[:context_blocks]].reshape(-1, cfg.num_kv_heads, cfg.head_size)[:end].float()
            values = kv[1, ids[:context_blocks]].reshape(-1, cfg.num_kv_heads, cfg.head_size)[:end].float()
            heads = []
            for head in range(cfg.num_heads):
                kv_head = head // group
                scores = _linear(q[:, head], keys[:, kv_head])  # [n, end], q pre-scaled
                # Keys before `start` are visible to every query: mask only the chunk's own.
                scores[:, start:].masked_fill_(~mask, float("-inf"))
                heads.append(_linear(torch.softmax(scores, dim=-1), values[:, kv_head].t()))
            attn = torch.cat(heads, dim=1)  # [n, H * D]
            if connector is not None:
                connector.save_kv_layer(name, kv, None)
            x = x + _linear(attn, w["wo"])
            x = x + _linear(torch.nn.functional.gelu(_linear(self._norm(x), w["w1"])), w["w2"])
        return _linear(self._norm(x[-1:]), self.lm_head)[0]


def connector_config(node, cfg: TinyConfig, cache_block_tokens=256, model="tiny-llm", **extra):
    """A VllmConfig-shaped object for KvstrataConnector (vLLM builds the real one)."""
    extra_config = {"node": node, "cache_block_tokens": cache_block_tokens,
                    "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                    "head_size": cfg.head_size, "dtype": "float32"}
    extra_config.update(extra)
    return types.SimpleNamespace(
        kv_transfer_config=types.SimpleNamespace(kv_connector_extra_config=extra_config),
        model_config=types.SimpleNamespace(model="%s-seed%d" % (model, cfg.seed), dtype=torch.float32),
        cache_config=types.SimpleNamespace(block_size=cfg.block_size),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1))


class Request:
    def __init__(self, request_id, prompt_token_ids):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0


class TinyEngine:
    """One request at a time, vLLM v1's call sequence around the connector.

    kv_dtype: the paged cache's dtype (fp32 by default; torch.bfloat16 or
    float16 for a cache a precision budget can transcode: pass the same
    dtype name as connector_config's dtype=). The math stays fp32."""

    def __init__(self, model: TinyLM, num_blocks, connector_config=None, chunk=256,
                 kv_dtype=torch.float32):
        cfg = model.cfg
        self.model = model
        self.chunk = chunk
        self.kv_caches = {layer_name(i): torch.zeros(2, num_blocks, cfg.block_size,
                                                     cfg.num_kv_heads, cfg.head_size,
                                                     dtype=kv_dtype)
                          for i in range(cfg.num_layers)}
        self.free_blocks = list(range(num_blocks))
        self.scheduler_connector = self.worker_connector = None
        if connector_config is not None:
            self.scheduler_connector = KvstrataConnector(connector_config, KVConnectorRole.SCHEDULER)
            self.worker_connector = KvstrataConnector(connector_config, KVConnectorRole.WORKER)
            self.worker_connector.register_kv_caches(self.kv_caches)
        self._next_id = 0

    def _step(self, request, block_ids, new_block_ids, tokens, first_step):
        """One engine step computing `tokens` of `request`; returns the last logits."""
        start = request.num_computed_tokens
        conn = self.worker_connector
        if conn is not None:
            if first_step:
                new = [types.SimpleNamespace(req_id=request.request_id,
                                             prompt_token_ids=request.prompt_token_ids,
                                             block_ids=(list(block_ids),),
                                             num_computed_tokens=start)]
                cached = types.SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[])
            else:
                new = []
                cached = types.SimpleNamespace(req_ids=[request.request_id],
                                               new_block_ids=[(new_block_ids,) if new_block_ids else None],
                                               num_computed_tokens=[start])
            output = types.SimpleNamespace(scheduled_new_reqs=new, scheduled_cached_reqs=cached,
                                           num_scheduled_tokens={request.request_id: len(tokens)})
            conn.bind_connector_metadata(self.scheduler_connector.build_connector_meta(output))
            conn.start_load_kv(None)
        logits = self.model.forward(tokens, start, block_ids, self.kv_caches, conn)
        if conn is not None:
            conn.wait_for_save()
            conn.clear_connector_metadata()
            errors = conn.get_block_ids_with_load_errors()
            if errors:  # this engine does not recompute lost blocks
                raise RuntimeError("blocks %s failed to load" % sorted(errors))
        request.num_computed_tokens = start + len(tokens)
        return logits

    def generate(self, prompt, max_new_tokens=1):
        """Greedy generation. Returns the logits of each generated token, TTFT and counters."""
        began = time.perf_counter()
        cfg = self.model.cfg
        request = Request("req-%d" % self._next_id, prompt)
        self._next_id += 1
        external = 0
        if self.scheduler_connector is not None:
            external, _ = self.scheduler_connector.get_num_new_matched_tokens(request, 0)
        needed = (len(prompt) + cfg.block_size - 1) // cfg.block_size
        if needed > len(self.free_blocks):
            raise RuntimeError("KV cache full")
        block_ids = [self.free_blocks.pop() for _ in range(needed)]
        if self.scheduler_connector is not None:
            self.scheduler_connector.update_state_after_alloc(request, (list(block_ids),), external)
        request.num_computed_tokens = external
        all_logits = []
        first = True
        loaded = external
        while request.num_computed_tokens < len(prompt):
            start = request.num_computed_tokens
            stop = min(len(prompt), (start // self.chunk + 1) * self.chunk)
            logits = self._step(request, block_ids, None, prompt[start:stop], first)
            first = False
        all_logits.append(logits)
        ttft = time.perf_counter() - began
        generated = [int(torch.argmax(logits))]
        while len(generated) < max_new_tokens:
            position = request.num_computed_tokens
            new_ids = None
            if position // cfg.block_size >= len(block_ids):
                new_ids = [self.free_blocks.pop()]
                block_ids.extend(new_ids)
            logits = self._step(request, block_ids, new_ids, [generated[-1]], False)
            all_logits.append(logits)
            generated.append(int(torch.argmax(logits)))
        if self.scheduler_connector is not None:
            self.scheduler_connector.request_finished(request, block_ids)
        self.free_blocks.extend(block_ids)
        return {"logits": all_logits, "tokens": generated, "ttft": ttft, "loaded_tokens": loaded}


def make_prompt(cfg: TinyConfig, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (tokens,), generator=g).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["prefill", "decode"], required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--prompt_tokens", type=int, default=1000)
    parser.add_argument("--prompt_seed", type=int, default=7)
    parser.add_argument("--new_tokens", type=int, default=8)
    parser.add_argument("--cache_block_tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ucx_transports", default="")
    parser.add_argument("--out", help="decode: torch.save the logits of both runs here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TinyConfig()
    model = TinyLM(cfg)
    prompt = make_prompt(cfg, args.prompt_tokens, args.prompt_seed)
    blocks = (args.prompt_tokens + args.new_tokens) // cfg.block_size + 2
    config = connector_config(args.node, cfg, args.cache_block_tokens,
                              ucx_transports=args.ucx_transports)
    report = {"role": args.role, "prompt_tokens": args.prompt_tokens}
    if args.role == "prefill":
        engine = TinyEngine(model, blocks, config)
        result = engine.generate(prompt, 1)
        report.update(ttft=result["ttft"], saved_blocks=engine.worker_connector.stats["saved_blocks"],
                      published_bytes=engine.worker_connector.stats["published_bytes"])
        if args.out:
            torch.save({"logits": result["logits"]}, args.out)
    else:
        cached = TinyEngine(model, blocks, config).generate(prompt, args.new_tokens)
        local = TinyEngine(model, blocks).generate(prompt, args.new_tokens)
        report.update(ttft_cached=cached["ttft"], ttft_local=local["ttft"],
                      loaded_tokens=cached["loaded_tokens"],
                      identical=all(torch.equal(a, b) for a, b in zip(cached["logits"], local["logits"])))
        if args.out:
            torch.save({"cached": cached["logits"], "local": local["logits"],
                        "loaded_tokens": cached["loaded_tokens"]}, args.out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
