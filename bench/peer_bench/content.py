"""Values that name their key, so every get is checked for the right bytes.

A value is its source slot's random bytes with the key id written over its
first and last 8 bytes. A fetched value is right when both stamps name the
key asked for and the bytes between them equal the slot it was put from.
Stamps are cleared in the destination before each get, so a get that writes
nothing cannot pass on what an earlier one left there.
"""
import os
import struct

from clients import same_bytes

_STAMP = struct.Struct("<Q")
_TAIL_MASK = 0xA5A5A5A5A5A5A5A5
_ZERO = bytes(8)


def fill_random(adapter, slots):
    adapter.view[:slots * adapter.value_bytes] = os.urandom(slots * adapter.value_bytes)


def stamp(adapter, slot, key_id):
    v = adapter.value_bytes
    _STAMP.pack_into(adapter.view, slot * v, key_id)
    _STAMP.pack_into(adapter.view, (slot + 1) * v - 8, key_id ^ _TAIL_MASK)


def clear_destination(adapter, count):
    v = adapter.value_bytes
    base = adapter.dst_address - adapter.src_address
    for slot in range(count):
        adapter.view[base + slot * v:base + slot * v + 8] = _ZERO
        adapter.view[base + (slot + 1) * v - 8:base + (slot + 1) * v] = _ZERO


def is_right(adapter, dst_slot, src_slot, key_id):
    v = adapter.value_bytes
    base = adapter.dst_address - adapter.src_address + dst_slot * v
    if _STAMP.unpack_from(adapter.view, base)[0] != key_id:
        return False
    if _STAMP.unpack_from(adapter.view, base + v - 8)[0] != key_id ^ _TAIL_MASK:
        return False
    return same_bytes(adapter.dst_address + dst_slot * v + 8,
                      adapter.src_address + src_slot * v + 8, v - 16)
