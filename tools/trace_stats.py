#!/usr/bin/python3
"""Why Belady beats LRU on a Mooncake trace (cachenode/README.md).

Prints: request kinds, P(another turn | turns so far), inter-arrival of a
chain's turns, P(another turn | output length), and which reuses Belady and
LRU catch by turn and gap.
Usage: /usr/bin/python3 tools/trace_stats.py TRACE [capacity_fraction]
"""
import collections, heapq, json, sys
from collections import OrderedDict

T = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
frac = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
D = len({x for r in T for x in r["hash_ids"]})
cap = int(frac * D)

seen = set(); kinds = collections.Counter(); first_turn_blocks = 0
for r in T:
    h = r["hash_ids"]; k = 0
    while k < len(h) and h[k] in seen: k += 1
    kinds["new chain" if k == 0 else "full repeat" if k == len(h) else "repeat + %d new" % min(len(h) - k, 3)] += 1
    if k == 0: first_turn_blocks += len(h)
    seen.update(h)
print("requests %d, distinct blocks %d, accesses %d; blocks of first-turn requests %d" %
      (len(T), D, sum(len(r["hash_ids"]) for r in T), first_turn_blocks))
print("kinds:", dict(kinds.most_common()))

turn = []; cnt = collections.Counter(); last = {}; gap = []
byroot = collections.defaultdict(list)
for i, r in enumerate(T):
    c = r["hash_ids"][0]; cnt[c] += 1; turn.append(cnt[c])
    gap.append(i - last[c] if c in last else -1); last[c] = i; byroot[c].append(i)
rem = collections.defaultdict(list)
for v in byroot.values():
    for t in range(1, len(v) + 1): rem[min(t, 6)].append(len(v) - t)
print("P(another turn | turn t):", {t: round(sum(1 for x in L if x) / len(L), 2) for t, L in sorted(rem.items())})
ia = collections.defaultdict(list)
for i in range(len(T)):
    if gap[i] >= 0: ia[min(turn[i], 5)].append(gap[i])
for t, L in sorted(ia.items()):
    L.sort(); print("turn %d gap in requests: p25 %d p50 %d p75 %d p90 %d" %
                    (t, L[len(L) // 4], L[len(L) // 2], L[3 * len(L) // 4], L[9 * len(L) // 10]))

# What a request's output length says about its chain coming back (known to
# the engine when the request finishes: return-aware's hint).
ret = collections.defaultdict(lambda: [0, 0])
for v in byroot.values():
    for t, i in enumerate(v):
        if i >= len(T) - 500: continue  # too recent to have come back
        k = ("first" if t == 0 else "later", min(T[i]["output_length"].bit_length() - 1, 10))
        ret[k][0] += 1; ret[k][1] += t + 1 < len(v)
for kind in ("first", "later"):
    print("P(another turn | %s turn, output 2^k tokens):" % kind,
          {k: "%.2f (%d)" % (b / a, a) for (kd, k), (a, b) in sorted(ret.items()) if kd == kind})

def prefix_hits(belady):
    seq = [x for r in T for x in r["hash_ids"]]; nxt = [0] * len(seq); nx = {}
    for k in range(len(seq) - 1, -1, -1): nxt[k] = nx.get(seq[k], 1 << 60); nx[seq[k]] = k
    cached = {}; lru = OrderedDict(); heap = []; k = 0; out = []
    for r in T:
        h = r["hash_ids"]; j = 0
        while j < len(h) and h[j] in cached: j += 1
        out.append(j)
        for x in h:
            n = nxt[k]; k += 1
            if x in cached:
                cached[x] = n; heapq.heappush(heap, (-n, x)); lru.move_to_end(x); continue
            if len(cached) >= cap:
                if belady:
                    while cached.get(heap[0][1]) != -heap[0][0]: heapq.heappop(heap)
                    if -heap[0][0] <= n: continue
                    del cached[heapq.heappop(heap)[1]]
                else:
                    v, _ = lru.popitem(last=False); del cached[v]
            cached[x] = n; lru[x] = 1; heapq.heappush(heap, (-n, x))
    return out

B = prefix_hits(True); L = prefix_hits(False)
def bucket(g): return "new" if g < 0 else next(b for b in (50, 200, 500, 1000, 1 << 60) if g < b)
tab = collections.defaultdict(lambda: [0, 0, 0, 0])
for i, r in enumerate(T):
    t = tab[(min(turn[i], 5), bucket(gap[i]))]; t[0] += 1; t[1] += len(r["hash_ids"]); t[2] += B[i]; t[3] += L[i]
print("capacity %d blocks (%.0f%%): prefix-hit blocks by turn and gap since the chain's last turn" % (cap, 100 * frac))
print("turn  gap<      requests blocks belady lru")
for (t, g), v in sorted(tab.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
    print("%4d  %-9s %8d %6d %6d %5d" % (t, "inf" if g == 1 << 60 else g, *v))

# Clairvoyant bounds for recency-ordered policies: LRU that never caches a
# chain with no second turn (perfect admission), and that also evicts first
# the blocks of a chain whose last turn has passed (perfect end-of-chain
# knowledge). Neither knows when a chain's next turn comes; Belady does.
byroot_last = {c: v[-1] for c, v in byroot.items()}
def oracle_lru(know_end):
    cached = OrderedDict(); dead = OrderedDict(); hit = tot = 0
    for i, r in enumerate(T):
        h = r["hash_ids"]; j = 0
        while j < len(h) and h[j] in cached: j += 1
        hit += min(j * 512, r["input_length"]); tot += r["input_length"]
        ended = byroot_last[h[0]] == i
        if ended and len(byroot[h[0]]) == 1: continue  # never returns: not cached
        for x in h:
            if x not in cached:
                while len(cached) >= cap:
                    if dead: v, _ = dead.popitem(last=False); cached.pop(v, None)
                    else: v, _ = cached.popitem(last=False); dead.pop(v, None)
                cached[x] = 1
            cached.move_to_end(x)
            if ended and know_end: dead[x] = 1
    return hit / tot
print("clairvoyant LRU token hit rate: perfect admission %.3f; + knows each chain's last turn %.3f" %
      (oracle_lru(False), oracle_lru(True)))
