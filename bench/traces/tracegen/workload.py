"""A trace under construction: segments, requests, and the final encoding."""
from .blocks import BlockIndex, renumber


class Workload:
    """Collects requests (timestamp, prompt segments, output length, labels)
    from the session models and encodes them as a Mooncake trace."""

    def __init__(self, rng, end_s):
        self.rng = rng
        self.end_s = end_s
        self._uids = 0
        self._sessions = 0
        self._pending = []

    def segment(self, length):
        """A new piece of text of `length` tokens, equal to no other."""
        self._uids += 1
        return (self._uids, length)

    def session(self):
        self._sessions += 1
        return self._sessions

    def emit(self, t_s, segments, output_length, **labels):
        """One request; dropped when it falls after the trace's end (the trace
        is a window of a longer-running service, so late turns are cut)."""
        if t_s < self.end_s:
            self._pending.append((int(t_s * 1000), len(self._pending), tuple(segments),
                                  output_length, labels))

    def encode(self):
        """(requests in Mooncake format, labels per request), by arrival."""
        index = BlockIndex()
        requests, labels = [], []
        for ms, _, segments, output_length, label in sorted(self._pending, key=lambda p: p[:2]):
            requests.append({"timestamp": ms,
                             "input_length": sum(length for _, length in segments),
                             "output_length": output_length,
                             "hash_ids": index.hash_ids(segments)})
            labels.append(label)
        renumber(requests)
        return requests, labels
