"""The key chain the vLLM connector stores blocks under.

key_j = DESIGN.md §3's chained hash over a model-level id, cache block j's
tokens and a parent: key_{j-1} folded with block j's extra keys exactly as
vLLM's own prefix cache derives them (LoRA name and path, the hashes of the
multimodal inputs overlapping the block, cache_salt on the first block), so
the same tokens with another adapter, image or salt never share a block.
Pure functions (hashlib and kvstrata.keys): equal inputs give equal keys on
every host; tests/engine/connector_test.py has hashlib-only test vectors.
"""
import hashlib
import struct
from typing import Optional

import kvstrata

def _encode_extra(value, out: bytearray) -> None:
    """A canonical, type-tagged byte encoding of vLLM's extra keys (tuples of
    str, int, bytes, None and nested tuples): equal values, equal bytes, on
    any host and in any language."""
    if value is None:
        out += b"n"
    elif isinstance(value, bool):
        out += b"T" if value else b"F"
    elif isinstance(value, int):
        out += b"i" + struct.pack("<q", value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out += b"s" + struct.pack("<I", len(data)) + data
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out += b"b" + struct.pack("<I", len(data)) + data
    elif isinstance(value, (tuple, list)):
        out += b"t" + struct.pack("<I", len(value))
        for item in value:
            _encode_extra(item, out)
    else:  # floats and objects: their repr (stable for the types vLLM puts here)
        data = repr(value).encode("utf-8")
        out += b"r" + struct.pack("<I", len(data)) + data


def fold_extra_keys(parent: bytes, extra) -> bytes:
    """The parent key a block with extra keys `extra` chains from:
    trunc128(SHA-256("kvstrata-extra\\0" ‖ parent ‖ encode(extra))); `parent`
    itself when there are none."""
    if not extra:
        return parent
    data = bytearray(b"kvstrata-extra\0")
    data += parent
    _encode_extra(tuple(extra), data)
    return hashlib.sha256(bytes(data)).digest()[:16]


def chain_id(model_id: str, tenant: str, cache_block_tokens: int) -> int:
    """The 64-bit id the key chain hashes with: the model identity, not a layout
    (layouts, layers and ranks are separated by their namespaces)."""
    data = ("kvstrata-vllm\0%s\0%s\0%d" % (tenant, model_id, cache_block_tokens)).encode("utf-8")
    return struct.unpack("<Q", hashlib.sha256(data).digest()[:8])[0]


def chain_keys(cid: int, tokens, cache_block_tokens: int, extras=None) -> list:
    """Keys of every full cache block of `tokens`; extras[j] (or None) are
    block j's extra keys, folded into the parent it chains from."""
    if not extras or not any(extras):
        return kvstrata.keys(cid, tokens, cache_block_tokens)
    keys, parent = [], bytes(16)
    c = cache_block_tokens
    for j in range(len(tokens) // c):
        extra = extras[j] if j < len(extras) else None
        parent = kvstrata.keys(cid, tokens[j * c:(j + 1) * c], c,
                               parent=fold_extra_keys(parent, extra))[0]
        keys.append(parent)
    return keys


def _block_extras(request, num_blocks: int, c: int) -> Optional[list]:
    """vLLM's own prefix-cache extra keys of each cache block of `request`
    (vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys over the
    block's token range), or None when the request has none."""
    if not (getattr(request, "lora_request", None) or getattr(request, "cache_salt", None)
            or getattr(request, "mm_features", None)):
        return None
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
    extras, mm_index = [], 0
    for j in range(num_blocks):
        extra, mm_index = generate_block_hash_extra_keys(request, j * c, (j + 1) * c, mm_index)
        extras.append(extra)
    return extras
