"""Turns token streams into Mooncake block hash ids with prefix semantics.

A prompt is a list of segments (content id, length in tokens); a segment id
names one piece of text (a system prompt, a document, a user message), so
two prompts hold equal tokens exactly where they hold the same pieces of the
same segments. A block's id is interned from (its parent's id, the pieces it
covers): equal ids then imply equal prefixes, as in Mooncake's traces, and a
partial last block that a later turn extends gets a new id, as the real chat
templates do.
"""

BLOCK_TOKENS = 512  # Mooncake's block size (FAST'25 paper, section 3).


class BlockIndex:
    def __init__(self):
        self._ids = {}

    def _intern(self, parent, pieces):
        key = (parent, pieces)
        found = self._ids.get(key)
        if found is None:
            found = len(self._ids)
            self._ids[key] = found
        return found

    def hash_ids(self, segments):
        ids, pieces, fill, parent = [], [], 0, -1
        for uid, length in segments:
            offset = 0
            while offset < length:
                take = min(length - offset, BLOCK_TOKENS - fill)
                pieces.append((uid, offset, offset + take))
                fill += take
                offset += take
                if fill == BLOCK_TOKENS:
                    parent = self._intern(parent, tuple(pieces))
                    ids.append(parent)
                    pieces, fill = [], 0
        if pieces:
            ids.append(self._intern(parent, tuple(pieces)))
        return ids


def renumber(requests):
    """Ids in order of first appearance (as Mooncake's traces number them)."""
    remap = {}
    for request in requests:
        request["hash_ids"] = [remap.setdefault(h, len(remap)) for h in request["hash_ids"]]
