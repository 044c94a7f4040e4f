"""kvstrata/vllm_layout.py against the KV-cache layouts vLLM 0.32 really builds.

Every cache here is made by vLLM's own code: the spec classes
(FullAttentionSpec, MLAAttentionSpec), compute_layout_strides and
create_kv_cache_views over one flat buffer for every KVCacheLayout member,
with and without kernel blocks smaller than the block size, fp32/bf16/fp16/
fp8. K and V are read back the way each backend reads them (the functions
below quote vLLM 0.32's backends), so "the same bytes per (layer, token, head)"
is checked in the backends' own terms, not in ours. Older vLLM's 5-D/3-D
shapes (get_kv_cache_shape of FlashAttention, FlashInfer, MLA) are covered too.
"""
import itertools
import unittest

import torch
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheTensor, MLAAttentionSpec,
                                        compute_layout_strides, create_kv_cache_views)
from vllm.v1.kv_cache_layout import KVCacheLayout

from kvstrata import vllm_layout

BLOCKS, HEADS, HEAD = 6, 2, 32
LAYERS = ["model.layers.%d.self_attn.attn" % i for i in range(3)]


def vllm_caches(layout, block_size, kernel_block_size=None, dtype=torch.float32, mla=False,
                latent=HEAD):
    """Per-layer caches exactly as vLLM 0.32's model runner views its buffer."""
    if mla:
        spec = MLAAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=latent,
                                dtype=dtype)
    else:
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=HEAD,
                                 dtype=dtype)
    layer_stride, block_stride, _, _, _ = compute_layout_strides(spec, BLOCKS, len(LAYERS), layout)
    size = spec.page_size_bytes * BLOCKS * len(LAYERS)
    raw = torch.zeros(size, dtype=torch.int8)
    tensor = KVCacheTensor(size=size, layers=LAYERS, layer_stride=layer_stride,
                           block_stride=block_stride)
    views = create_kv_cache_views(raw, spec, BLOCKS, layout, tensor, kernel_block_size)
    return raw, dict(zip(LAYERS, views))


# K and V of kernel block b, as each backend reads its page (vLLM 0.32):
def read_content(cache, b):  # flash_attn.py: kv_cache.transpose(1, 2).split(head_size, dim=-1)
    k, v = cache.transpose(1, 2).split(HEAD, dim=-1)
    return k[b], v[b]  # [N, H, D]


def read_rows(cache, b):  # cpu_attn.py: kv_cache.view(B, H, 2N, -1).chunk(2, dim=2)
    n_blocks, heads, n, _ = cache.size()
    k, v = cache.view(n_blocks, heads, n * 2, -1).chunk(2, dim=2)
    return k[b].transpose(0, 1), v[b].transpose(0, 1)


def read_latent(cache, b):  # MLA: [B, 1, N, latent]
    return cache[b, 0], None


READERS = {"content": read_content, "rows": read_rows, "latent": read_latent}


def read_block(packing, cache, block, ratio):
    """K and V ([block_size, H, D]) of scheduler block `block`: its `ratio`
    kernel blocks' tokens, in order."""
    parts = [READERS[packing](cache, block * ratio + r) for r in range(ratio)]
    k = torch.cat([p[0] for p in parts])
    v = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return k, v


def as_bytes(t):
    return t.contiguous().view(torch.uint8) if t is not None else None


class LayoutTest(unittest.TestCase):
    def fill(self, raw, seed):
        g = torch.Generator().manual_seed(seed)
        raw.copy_(torch.randint(-128, 128, raw.shape, generator=g, dtype=torch.int8))

    def roundtrip(self, src, src_packing, dst, dst_packing, block_size, ids_src, ids_dst,
                  tokens):
        """Gathers blocks ids_src of every layer of `src` into canonical staging,
        scatters it into ids_dst of `dst`; checks every (layer, token, head)."""
        per = tokens // block_size
        for name in LAYERS:
            a = vllm_layout.canonical_view(src[name], packing=src_packing, block_size=block_size,
                                           num_kv_heads=HEADS, head_size=HEAD)
            b = vllm_layout.canonical_view(dst[name], packing=dst_packing, block_size=block_size,
                                           num_kv_heads=HEADS, head_size=HEAD)
            n_cb = len(ids_src) // per
            staged = torch.empty(n_cb, a.kv, tokens, a.heads, a.head_size, dtype=a.dtype)
            vllm_layout.gather(a, ids_src, staged)
            picks = [(i // per, i % per) for i in range(len(ids_dst))]
            vllm_layout.scatter(b, staged, picks, ids_dst)
            for e, (s, d) in enumerate(zip(ids_src, ids_dst)):
                ks, vs = read_block(src_packing, src[name], s, a.ratio)
                kd, vd = read_block(dst_packing, dst[name], d, b.ratio)
                self.assertTrue(torch.equal(as_bytes(ks), as_bytes(kd)), (name, e))
                if vs is not None:
                    self.assertTrue(torch.equal(as_bytes(vs), as_bytes(vd)), (name, e))
            # The canonical bytes are [kv, token, head, dim]: token t of the
            # first cache block's K is the first block's token t, whatever the layout.
            k0, _ = READERS[src_packing](src[name], ids_src[0] * a.ratio)
            self.assertTrue(torch.equal(as_bytes(staged[0, 0, :k0.shape[0]]), as_bytes(k0)))

    def test_every_vllm_layout_to_every_other(self):
        layouts = list(KVCacheLayout)
        for src_layout, dst_layout in itertools.product(layouts, layouts):
            with self.subTest(src=src_layout.name, dst=dst_layout.name):
                raw_a, a = vllm_caches(src_layout, 32)
                raw_b, b = vllm_caches(dst_layout, 32)
                self.fill(raw_a, 1)
                self.roundtrip(a, "content", b, "content", 32, [4, 1, 5, 0], [2, 3, 0, 5], 64)

    def test_cpu_backend_to_flash_attention_and_back(self):
        raw_cpu, cpu = vllm_caches(KVCacheLayout.LBHNC, 32)  # the CPU backend's only layout
        raw_fa, fa = vllm_caches(KVCacheLayout.LBNHC, 32)
        self.fill(raw_cpu, 2)
        self.roundtrip(cpu, "rows", fa, "content", 32, [3, 0], [1, 4], 64)
        raw_back, back = vllm_caches(KVCacheLayout.LBHNC, 32)
        self.roundtrip(fa, "content", back, "rows", 32, [1, 4], [0, 2], 64)

    def test_kernel_blocks_smaller_than_the_block_size(self):
        # block_size 32 in kernel blocks of 16 (or 8): each scheduler block is
        # `ratio` consecutive kernel blocks of the view.
        for kernel in (16, 8):
            with self.subTest(kernel=kernel):
                raw_a, a = vllm_caches(KVCacheLayout.LBNHC, 32, kernel_block_size=kernel)
                raw_b, b = vllm_caches(KVCacheLayout.LBHNC, 32)
                self.assertEqual(a[LAYERS[0]].shape[0], BLOCKS * 32 // kernel)
                self.fill(raw_a, 3)
                self.assertEqual(vllm_layout.canonical_view(
                    a[LAYERS[0]], packing="content", block_size=32, num_kv_heads=HEADS,
                    head_size=HEAD).ratio, 32 // kernel)
                self.roundtrip(a, "content", b, "rows", 32, [5, 2], [1, 0], 64)

    def test_fp8_and_half_caches_are_copied_as_their_bytes(self):
        for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.bfloat16,
                      torch.float16):
            with self.subTest(dtype=dtype):
                raw_a, a = vllm_caches(KVCacheLayout.BLNHC, 32, dtype=dtype)
                raw_b, b = vllm_caches(KVCacheLayout.LBHNC, 32, dtype=dtype)
                self.fill(raw_a, 4)  # every bit pattern, NaNs included: bytes, not values
                self.roundtrip(a, "content", b, "content", 32, [0, 1], [4, 5], 64)

    def test_mla_latent_round_trip(self):
        raw_a, a = vllm_caches(KVCacheLayout.LBHNC, 32, mla=True, latent=576, dtype=torch.bfloat16)
        raw_b, b = vllm_caches(KVCacheLayout.BLHNC, 32, mla=True, latent=576, dtype=torch.bfloat16)
        self.fill(raw_a, 5)
        for name in LAYERS:
            la = vllm_layout.canonical_view(a[name], packing="latent", block_size=32,
                                            num_kv_heads=1, head_size=576)
            lb = vllm_layout.canonical_view(b[name], packing="latent", block_size=32,
                                            num_kv_heads=1, head_size=576)
            self.assertEqual((la.kv, la.heads, la.block_bytes(64)), (1, 1, 64 * 576 * 2))
            staged = torch.empty(1, 1, 64, 1, 576, dtype=torch.bfloat16)
            vllm_layout.gather(la, [3, 1], staged)
            vllm_layout.scatter(lb, staged, [(0, 0), (0, 1)], [0, 2])
            self.assertTrue(torch.equal(as_bytes(a[name][3]), as_bytes(b[name][0])))
            self.assertTrue(torch.equal(as_bytes(a[name][1]), as_bytes(b[name][2])))

    def test_older_vllm_shapes(self):
        # vLLM <= 0.11's get_kv_cache_shape: FlashAttention (2, B, N, H, D) (HND:
        # the same logical shape over a (2, B, H, N, D) allocation), FlashInfer
        # (B, 2, N, H, D), MLA (B, N, D).
        g = torch.Generator().manual_seed(6)
        nhd = torch.randn(2, BLOCKS, 16, HEADS, HEAD, generator=g)
        hnd = torch.zeros(2, BLOCKS, HEADS, 16, HEAD).permute(0, 1, 3, 2, 4)
        flashinfer = torch.zeros(BLOCKS, 2, 16, HEADS, HEAD)
        views = [vllm_layout.canonical_view(t, packing="content", block_size=16,
                                            num_kv_heads=HEADS, head_size=HEAD)
                 for t in (nhd, hnd, flashinfer)]
        staged = torch.empty(1, 2, 32, HEADS, HEAD)
        vllm_layout.gather(views[0], [4, 2], staged)
        for v in views[1:]:
            vllm_layout.scatter(v, staged, [(0, 0), (0, 1)], [1, 3])
        self.assertTrue(torch.equal(hnd[:, 1], nhd[:, 4]))
        self.assertTrue(torch.equal(hnd[:, 3], nhd[:, 2]))
        self.assertTrue(torch.equal(flashinfer[1], nhd[:, 4]))
        mla = torch.randn(BLOCKS, 16, 576, generator=g)
        view = vllm_layout.canonical_view(mla, packing="latent", block_size=16, num_kv_heads=1,
                                          head_size=576)
        self.assertEqual((view.kv, view.heads, view.head_size), (1, 1, 576))

    def test_bad_shapes_are_clear_errors(self):
        raw, caches = vllm_caches(KVCacheLayout.LBHNC, 32)
        with self.assertRaisesRegex(ValueError, "kv heads"):
            vllm_layout.canonical_view(caches[LAYERS[0]], packing="content", block_size=32,
                                       num_kv_heads=4, head_size=HEAD)
        with self.assertRaisesRegex(ValueError, "kernel blocks dividing"):
            vllm_layout.canonical_view(caches[LAYERS[0]], packing="content", block_size=48,
                                       num_kv_heads=HEADS, head_size=HEAD)
        with self.assertRaisesRegex(ValueError, "unknown KV packing"):
            vllm_layout.canonical_view(caches[LAYERS[0]], packing="nhd", block_size=32,
                                       num_kv_heads=HEADS, head_size=HEAD)
        # The CPU backend's reading needs contiguous block interiors.
        raw, cross = vllm_caches(KVCacheLayout.LBNHC, 32)
        with self.assertRaisesRegex(ValueError, "contiguous"):
            vllm_layout.canonical_view(cross[LAYERS[0]], packing="rows", block_size=32,
                                       num_kv_heads=HEADS, head_size=HEAD)


if __name__ == "__main__":
    unittest.main()
