#!/usr/bin/python3
"""How far can a policy that only knows a chain's class get? (cachenode/README.md)

Replays a Mooncake trace at chain granularity (a chain = the requests sharing
a root block; evict the deepest block of the least valuable chain, blocks a
newer turn superseded first) with scorings that know more than any online
policy can, to bound what return-aware-style policies could reach:

  fitted     P(chain comes back | turn kind, output class, silence) by Bayes,
             with return rates and gap distributions measured on the WHOLE
             trace (the future's statistics, not its order): return-aware's
             model with perfect estimates.
  end-oracle like fitted for first turns, but a later turn's chain is known
             to be dead or alive (whether another turn follows), ranked by
             its observed turn rate: what knowing when a conversation ends
             is worth.

Also prints the blocks Belady and `fitted` hold on average for first-turn and
later-turn chains: if the mix is the same, what Belady adds is *which*
chains of a class it keeps, i.e. when they return.

Usage: /usr/bin/python3 tools/policy_bounds.py TRACE [fractions, default 0.05,0.1,0.2] [--json=OUT]
--json writes the fitted bounds ({"trace": name, "fitted": {fraction: token hit rate}}) for
bench/policy_bench --suite --bounds=OUT, which prints the gap closed toward them.
Pure Python: a few minutes per capacity.
"""
import bisect, collections, heapq, json, math, sys
from collections import OrderedDict

JSON_OUT = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--json=")), None)
ARGS = [a for a in sys.argv[1:] if not a.startswith("--json=")]
T = [json.loads(l) for l in open(ARGS[0]) if l.strip()]
FRACTIONS = [float(x) for x in (ARGS[1] if len(ARGS) > 1 else "0.05,0.1,0.2").split(",")]
DISTINCT = len({x for r in T for x in r["hash_ids"]})
TOTAL = sum(r["input_length"] for r in T)
CHAINS = collections.defaultdict(list)  # root -> request indexes
for i, r in enumerate(T):
    CHAINS[r["hash_ids"][0]].append(i)
ROOT_OF = {}
for r in T:
    for h in r["hash_ids"]:
        ROOT_OF.setdefault(h, r["hash_ids"][0])


def out_class(tokens):
    return min(int(math.log2(max(1, tokens))), 10)


# Whole-trace statistics: return rate per (kind, output class), gaps per kind.
turns, returns = collections.Counter(), collections.Counter()
gaps = {"first": [], "later": []}
for v in CHAINS.values():
    for t, i in enumerate(v):
        key = ("first" if t == 0 else "later", out_class(T[i]["output_length"]))
        turns[key] += 1
        if t + 1 < len(v):
            returns[key] += 1
            gaps[key[0]].append(v[t + 1] - i)
RATE = {k: (returns[k] + 1) / (turns[k] + 2) for k in turns}
for g in gaps.values():
    g.sort()


def prefix_tokens(r, cached):
    p = 0
    while p < len(r["hash_ids"]) and r["hash_ids"][p] in cached:
        p += 1
    return min(p * 512, r["input_length"])


def alive(kind, output, silence):
    p = RATE[(kind, out_class(output))]
    g = gaps[kind]
    x = p * (1 - bisect.bisect_right(g, silence) / len(g))
    return x / (x + 1 - p) if x > 0 else 0.0


def fitted(c, now):
    return alive("first" if c["turns"] == 1 else "later", c["out"], now - c["last"])


def end_oracle(c, now):
    rate = (c["turns"] + 0.5) / (now - c["first"] + 200)
    if c["turns"] == 1:
        return RATE[("first", out_class(c["out"]))] * rate
    return rate if CHAINS[c["root"]][-1] > now else 0.0


def replay_chains(capacity, score, census=None):
    cached = {}  # block -> root
    live = {}  # root -> its cached blocks that extend its latest request, shallow to deep
    dead = OrderedDict()  # cached blocks a newer turn superseded, oldest first
    info = {}
    hits = 0
    for i, r in enumerate(T):
        hs = r["hash_ids"]
        root = hs[0]
        hits += prefix_tokens(r, cached)
        c = info.setdefault(root, {"first": i, "turns": 0, "root": root})
        c["turns"] += 1
        c["last"] = i
        c["out"] = r["output_length"]
        wanted = set(hs)
        for h in live.get(root, []):
            if h not in wanted:
                dead[h] = 1
        live[root] = [h for h in hs if h in cached]
        for h in live[root]:
            dead.pop(h, None)
        for h in hs:
            if h in cached:
                continue
            while len(cached) >= capacity:
                if dead:
                    v, _ = dead.popitem(last=False)
                    rt = cached.pop(v)
                    continue
                worst = min((rt for rt, b in live.items() if b), key=lambda rt: score(info[rt], i))
                del cached[live[worst].pop()]
            cached[h] = root
            live[root].append(h)
        if census is not None and i % 50 == 0:
            for h, rt in cached.items():
                census["first" if info[rt]["turns"] == 1 else "later"] += 1
            census["samples"] += 1
    return hits / TOTAL


def lru(capacity):
    c = OrderedDict()
    hits = 0
    for r in T:
        hits += prefix_tokens(r, c)
        for h in r["hash_ids"]:
            if h in c:
                c.move_to_end(h)
                continue
            while len(c) >= capacity:
                c.popitem(last=False)
            c[h] = 1
    return hits / TOTAL


def belady(capacity, census=None):
    seq = [h for r in T for h in r["hash_ids"]]
    nxt = [0] * len(seq)
    last = {}
    for k in range(len(seq) - 1, -1, -1):
        nxt[k] = last.get(seq[k], 1 << 60)
        last[seq[k]] = k
    c, heap, hits, k = {}, [], 0, 0
    seen = collections.Counter()
    for i, r in enumerate(T):
        hits += prefix_tokens(r, c)
        seen[r["hash_ids"][0]] += 1
        for h in r["hash_ids"]:
            nu = nxt[k]
            k += 1
            if h in c:
                c[h] = nu
                heapq.heappush(heap, (-nu, h))
                continue
            if len(c) >= capacity:
                while c.get(heap[0][1]) != -heap[0][0]:
                    heapq.heappop(heap)
                if -heap[0][0] <= nu:
                    continue
                del c[heapq.heappop(heap)[1]]
            c[h] = nu
            heapq.heappush(heap, (-nu, h))
        if census is not None and i % 50 == 0:
            for h in c:
                census["first" if seen[ROOT_OF[h]] == 1 else "later"] += 1
            census["samples"] += 1
    return hits / TOTAL


BOUNDS = {}
for f in FRACTIONS:
    cap = int(f * DISTINCT)
    census_b, census_f = collections.Counter(), collections.Counter()
    l, b = lru(cap), belady(cap, census_b)
    row = ["capacity %.0f%% (%d blocks): LRU %.3f Belady %.3f" % (100 * f, cap, l, b)]
    for name, score in (("fitted", fitted), ("end-oracle", end_oracle)):
        x = replay_chains(cap, score, census_f if name == "fitted" else None)
        row.append("%s %.3f (gap %.2f)" % (name, x, (x - l) / (b - l)))
        if name == "fitted":
            BOUNDS["%g" % f] = round(x, 4)
    print("; ".join(row), flush=True)
    for name, census in (("Belady", census_b), ("fitted", census_f)):
        n = census.pop("samples")
        print("  %s holds on average %d blocks of first-turn chains, %d of later-turn chains" %
              (name, census["first"] / n, census["later"] / n), flush=True)
if JSON_OUT:
    import os
    with open(JSON_OUT, "w") as out:
        json.dump({"trace": os.path.basename(ARGS[0]), "fitted": BOUNDS}, out, indent=1)
        out.write("\n")
