"""vLLM's paged KV-cache layouts as one canonical view, and copies through it.

kvstrata stores a cache block of one layer as a contiguous
[kv, tokens, heads, head_size] array of the cache's own element type (kv = 2:
K then V; kv = 1 for MLA's single latent), whatever the engine's layout. So a
block published by one attention backend can be fetched into another one, and
the bytes of each (layer, token, head) are the same.

What vLLM hands a connector (register_kv_caches), by release:
  - vLLM >= 0.32 (RFC #42082): one 4-D view per layer, [B, H, N, C], of a flat
    buffer (possibly shared by several layers, strided by a KVCacheLayout
    such as LBHNC or BLNHC). B counts kernel blocks of N tokens (N may be
    smaller than cache_config.block_size: each scheduler block is then
    block_size / N consecutive kernel blocks). How a backend reads C differs:
      "content"  FlashAttention, FlashInfer, Triton: C = K ‖ V of one
                 (token, head) (flash_attn.py: kv_cache.transpose(1, 2)
                 .split(head_size, dim=-1)).
      "rows"     the CPU backend: a head's [N, C] block interior is read as
                 [2N, C/2], its first N rows K, the next N rows V
                 (cpu_attn.py: kv_cache.view(B, H, 2N, -1).chunk(2, dim=2)).
      "latent"   MLA: H = 1, C = the latent (kv_lora_rank + rope dims).
      "heads"    K and V as separate head slots (H = 2 * kv heads, C = head
                 size), as backends that set num_head_slots lay it out.
  - older vLLM (its backends' get_kv_cache_shape): FlashAttention
    (2, B, N, H, D) (NHD, or HND as a permuted view of the same logical shape),
    FlashInfer (B, 2, N, H, D), MLA (B, N, D).
fp8 caches (cache_dtype fp8_e4m3 / fp8_e5m2) are copied as their bytes,
never re-quantized.
"""
import dataclasses

import torch

PACKINGS = ("content", "rows", "latent", "heads")


@dataclasses.dataclass
class LayerLayout:
    """A layer's paged cache as a [kernel blocks, kv, N, heads, head_size] view."""
    view: torch.Tensor
    kv: int  # 2 (K and V) or 1 (MLA latent)
    kernel_block_tokens: int  # N
    ratio: int  # kernel blocks per scheduler block
    heads: int
    head_size: int

    @property
    def dtype(self):
        return self.view.dtype

    def block_bytes(self, tokens: int) -> int:
        """Bytes of one stored block of `tokens` tokens of this layer."""
        return self.kv * tokens * self.heads * self.head_size * self.view.element_size()


def packing_for(backend_name: str, is_mla: bool) -> str:
    """How vLLM 0.32's backend named `backend_name` reads its [B, H, N, C] pages."""
    if is_mla:
        return "latent"
    if backend_name.upper().startswith("CPU"):
        return "rows"
    return "content"


def canonical_view(tensor: torch.Tensor, *, packing: str, block_size: int, num_kv_heads: int,
                   head_size: int) -> LayerLayout:
    """The layer cache `tensor` seen as [kernel blocks, kv, N, heads, head_size].

    A view, never a copy: writes through it land in the engine's cache.
    Raises ValueError, naming what was expected, for a shape this layout
    cannot be.
    """
    if packing not in PACKINGS:
        raise ValueError("unknown KV packing %r (one of %s)" % (packing, ", ".join(PACKINGS)))
    shape = tuple(tensor.shape)
    h, d = num_kv_heads, head_size

    def fail(expected):
        raise ValueError("KV cache of shape %s (strides %s) is not %s with block_size %d, %d kv "
                         "heads of %d" % (shape, tuple(tensor.stride()), expected, block_size, h, d))

    if tensor.dim() == 4:
        b, heads, n, c = shape
        if packing == "latent":
            if heads != 1 or c != d:
                fail("vLLM's MLA [B, 1, N, latent]")
            view, kv, heads_out = tensor.unsqueeze(1), 1, 1  # [B, 1, 1, N, C]
            view = view.permute(0, 1, 3, 2, 4)
        elif packing == "heads":
            if heads != 2 * h or c != d:
                fail("[B, 2 * kv heads, N, head_size] (K and V head slots)")
            view, kv, heads_out = tensor.unflatten(1, (2, h)).permute(0, 1, 3, 2, 4), 2, h
        elif packing == "content":
            if heads != h or c != 2 * d:
                fail("[B, kv heads, N, 2 * head_size] (K and V in the content dim)")
            view, kv, heads_out = tensor.unflatten(3, (2, d)).permute(0, 3, 2, 1, 4), 2, h
        else:  # rows
            if heads != h or c != 2 * d:
                fail("the CPU backend's [B, kv heads, N, 2 * head_size]")
            if tensor.stride(3) != 1 or tensor.stride(2) != c:
                fail("the CPU backend's layout with contiguous [N, C] block interiors")
            sb, sh = tensor.stride(0), tensor.stride(1)
            rows = torch.as_strided(tensor, (b, h, 2, n, d), (sb, sh, n * d, d, 1),
                                    tensor.storage_offset())
            view, kv, heads_out = rows.permute(0, 2, 3, 1, 4), 2, h
    elif tensor.dim() == 5:  # older vLLM
        if shape[0] == 2 and shape[1] != 2 and shape[3:] == (h, d):  # FlashAttention
            view = tensor.permute(1, 0, 2, 3, 4)
        elif shape[1] == 2 and shape[3:] == (h, d):  # FlashInfer
            view = tensor
        else:
            fail("FlashAttention's (2, B, N, H, D) or FlashInfer's (B, 2, N, H, D)")
        n, kv, heads_out = view.shape[2], 2, h
    elif tensor.dim() == 3:  # older vLLM's MLA
        if shape[2] != d:
            fail("MLA's (B, N, latent)")
        view, n, kv, heads_out = tensor.unsqueeze(1).unsqueeze(3), shape[1], 1, 1
    else:
        fail("a vLLM paged KV cache")
    n = view.shape[2]
    if n <= 0 or block_size % n != 0:
        fail("paged in kernel blocks dividing the block size")
    return LayerLayout(view=view, kv=kv, kernel_block_tokens=n, ratio=block_size // n,
                       heads=heads_out, head_size=view.shape[4])


def _kernel_ids(layout: LayerLayout, block_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(list(block_ids), dtype=torch.long)
    if layout.ratio > 1:
        ids = (ids[:, None] * layout.ratio + torch.arange(layout.ratio)[None, :]).reshape(-1)
    return ids.to(device)


def gather(layout: LayerLayout, block_ids, out: torch.Tensor) -> None:
    """Copies scheduler blocks `block_ids` (whole cache blocks, in order) into
    `out`, a [cache blocks, kv, tokens, heads, head_size] tensor of the
    cache's dtype (on any device)."""
    n_cb, kv, tokens, heads, size = out.shape
    r, nk = layout.ratio, layout.kernel_block_tokens
    per = tokens // (r * nk)  # scheduler blocks per cache block
    rows = layout.view[_kernel_ids(layout, block_ids, layout.view.device)]  # [n_cb*per*r, kv, N, H, D]
    rows = rows.view(n_cb, per * r, kv, nk, heads, size).transpose(1, 2)
    out.view(n_cb, kv, per * r, nk, heads, size).copy_(rows, non_blocking=True)


def scatter(layout: LayerLayout, staged: torch.Tensor, picks, block_ids) -> None:
    """Writes staged cache blocks into the paged cache.

    `staged`: [cache blocks, kv, tokens, heads, head_size] (on the cache's
    device); `picks`: (staged cache block, scheduler block within it) for each
    destination; `block_ids`: the destination scheduler block of each pick.
    """
    if not picks:
        return
    n_cb, kv, tokens, heads, size = staged.shape
    r, nk = layout.ratio, layout.kernel_block_tokens
    per = tokens // (r * nk)
    src = staged.view(n_cb, kv, per, r, nk, heads, size).permute(0, 2, 3, 1, 4, 5, 6)
    slot = torch.as_tensor([p[0] for p in picks], dtype=torch.long, device=staged.device)
    within = torch.as_tensor([p[1] for p in picks], dtype=torch.long, device=staged.device)
    rows = src[slot, within].reshape(len(picks) * r, kv, nk, heads, size)
    layout.view[_kernel_ids(layout, block_ids, layout.view.device)] = rows
