// return-aware: see eviction_policy.h and cachenode/README.md ("return-aware")
// for the trace facts behind it.
#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <deque>
#include <utility>

#include "absl/container/node_hash_map.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "node_pool.h"

namespace kvstrata::cachenode {
namespace {

// Turn kinds: a conversation's first request, or a later one. They differ
// most (on the Mooncake trace 18% of first turns come back, 81% of later ones).
constexpr int kFirst = 0;
constexpr int kLater = 1;
// Output classes: log2 of the output length, 1024+ tokens together.
constexpr int kOutputClasses = 11;
// A turn whose hint has not arrived, and the statistics of all turns.
constexpr int kPending = kOutputClasses;
constexpr int kAnyOutput = kOutputClasses + 1;
constexpr int kGapBuckets = 64;  // half-octaves of a gap counted in turns
// Counts are halved when a kind has seen this many turns, so the estimates
// follow a workload that changes instead of averaging over its whole past.
constexpr double kHalvingTurns = 1 << 20;

int OutputClass(uint32_t tokens) {
  return std::min<int>(std::bit_width(std::max<uint32_t>(tokens, 1)) - 1, kOutputClasses - 1);
}

// floor(2 * log2(gap + 1)), clamped.
int GapBucket(uint64_t gap) {
  const uint64_t v = gap + 1;
  const int k = std::bit_width(v) - 1;  // 2^k <= v < 2^(k+1)
  if (k >= 31) return kGapBuckets - 1;
  const int upper = v * v >= (uint64_t{1} << (2 * k + 1)) ? 1 : 0;  // v >= 2^k * sqrt(2)
  return std::min(2 * k + upper, kGapBuckets - 1);
}

// What the policy has learned so far: per kind and output class, how many
// turns were seen and how many came back; per kind, the gaps (in turns)
// after which they came back.
class ReturnStats {
 public:
  void Turn(int kind, int output_class) {
    turns_[kind][output_class] += 1;
    if (output_class == kAnyOutput && turns_[kind][kAnyOutput] >= kHalvingTurns) Halve(kind);
  }
  void Returned(int kind, int output_class) { returns_[kind][output_class] += 1; }
  void Gap(int kind, uint64_t gap) {
    gaps_[kind][GapBucket(gap)] += 1;
    gap_count_[kind] += 1;
    survival_stale_[kind] = true;
  }

  // P(the turn comes back | its class, no return in the `silence` turns since
  // it): Bayes with the class's return rate as prior and the kind's survival
  // function of gaps as likelihood. The class's rate is shrunk toward its
  // kind's with two pseudo-turns, so a class seldom seen starts at the kind's
  // rate (empirical Bayes; the kind's own rate by Laplace's rule).
  double Alive(int kind, int output_class, uint64_t silence) {
    const double kind_rate = (returns_[kind][kAnyOutput] + 1) / (turns_[kind][kAnyOutput] + 2);
    const double p = (returns_[kind][output_class] + 2 * kind_rate) / (turns_[kind][output_class] + 2);
    const double x = p * Survival(kind, silence);
    return x / (x + (1 - p));
  }

 private:
  // P(gap > silence | it comes back), from the gap histogram; half of the
  // silence's own bucket counts as beyond it.
  double Survival(int kind, uint64_t silence) {
    if (gap_count_[kind] == 0) return 1;
    if (survival_stale_[kind]) {
      double beyond = 0;
      for (int b = kGapBuckets - 1; b >= 0; --b) {
        survival_[kind][b] = (beyond + gaps_[kind][b] / 2) / gap_count_[kind];
        beyond += gaps_[kind][b];
      }
      survival_stale_[kind] = false;
    }
    return survival_[kind][GapBucket(silence)];
  }
  void Halve(int kind) {
    for (double& t : turns_[kind]) t /= 2;
    for (double& r : returns_[kind]) r /= 2;
    for (double& g : gaps_[kind]) g /= 2;
    gap_count_[kind] /= 2;
    survival_stale_[kind] = true;
  }

  std::array<std::array<double, kAnyOutput + 1>, 2> turns_{}, returns_{};
  std::array<std::array<double, kGapBuckets>, 2> gaps_{}, survival_{};
  std::array<double, 2> gap_count_{};
  std::array<bool, 2> survival_stale_{true, true};
};

class ReturnAwarePolicy final : public EvictionPolicy {
 public:
  void OnInsert(const BlockId& id, const std::optional<BlockId>& parent) override {
    auto [it, inserted] = blocks_.try_emplace(id);
    Block& block = it->second;  // stable: blocks_ gains nothing else below
    if (!inserted) {
      Touch(id, block);
      return;
    }
    Chain* chain = nullptr;
    if (parent.has_value() && !(*parent == id)) {
      // Blocks of a request arrive in order: the parent is usually the
      // block touched just before.
      Block* parent_block = last_touched_ != nullptr && last_touched_->first == *parent
                                ? &last_touched_->second
                                : nullptr;
      if (parent_block == nullptr) {
        if (auto p = blocks_.find(*parent); p != blocks_.end()) parent_block = &p->second;
      }
      if (parent_block != nullptr) {
        if (Block* old = parent_block->newest_child; old != nullptr) {
          old->parent = nullptr;  // only the newest child keeps a link back
          // On a path of one conversation, a new child replaces the previous
          // request's partial tail: that block cannot extend a prefix any
          // more. So does a block's second child, even below an extended
          // first one: a conversation that edits an earlier message leaves
          // its old branch (on the shared trace this was worth 0.01-0.02 of
          // the gap with hints and 0.03-0.07 without). From the third child
          // on, the block is a shared prefix whose children are all alive.
          if ((!old->extended && parent_block->branches <= 1) || parent_block->children_seen == 1) {
            Kill(*old);
          } else if (parent_block->branches < UINT8_MAX) {
            ++parent_block->branches;
          }
        } else if (parent_block->branches == 0) {
          parent_block->branches = 1;
        }
        parent_block->newest_child = &block;
        parent_block->extended = true;
        if (parent_block->children_seen < UINT8_MAX) ++parent_block->children_seen;
        block.parent = parent_block;
        if (parent_block->branches >= 2) {
          // A conversation is the path below its divergence point: a new
          // branch starts a chain of its own (or a turn of one seen before),
          // and the chain holding the branch point is shared from now on.
          MakeShared(*parent_block->chain);
        } else {
          chain = parent_block->chain;
        }
      }
    }
    // A root starts a turn; so does a block whose parent is not here (the
    // tier above or below may hold it): it is treated as a chain of its own.
    if (chain == nullptr) chain = &StartTurn(id);
    block.chain = chain;
    block.touched = clock_;
    chain->live.push_back(id);
    if (chain->output_class == kPending) ++pending_blocks_;
    block.position = std::prev(chain->live.end());
    ++chain->resident;
    if (chain->live.size() == 1) List(*chain);
    high_water_ = std::max(high_water_, blocks_.size());
    last_touched_ = &*it;
  }

  void OnHit(const BlockId& id) override {
    if (auto it = blocks_.find(id); it != blocks_.end()) {
      Touch(id, it->second);
      last_touched_ = &*it;
    }
  }

  // A kept victim goes to the far end of the list it was named from, so the
  // chain's next block is named next: the whole chain is kept (compressed)
  // once before any of it is named again, in the same order. Not a touch: a
  // kept root starts no turn (as a hit counted, it did, and return-aware,
  // its victim unmoved, transcoded one block down to its budget at once:
  // 0.58x the raw hit rate with precision tiers at 5% of the shared trace).
  void OnKept(const BlockId& id) override {
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return;
    Block& block = it->second;
    if (block.dead) {
      dead_.splice(dead_.begin(), dead_, block.position);
    } else {
      Chain& chain = *block.chain;
      chain.live.splice(chain.live.begin(), chain.live, block.position);
      if (chain.live.size() == 1) {
        // Its only block: the chain goes behind the others of its list.
        PooledList<Chain*>& chains = ListOf(chain);
        chains.splice(chains.begin(), chains, chain.class_position);
        victim_ = nullptr;
      }
    }
  }

  void OnErase(const BlockId& id) override {
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return;
    Block& block = it->second;
    Chain& chain = *block.chain;
    if (block.dead) {
      dead_.erase(block.position);
    } else {
      chain.live.erase(block.position);
      if (chain.output_class == kPending) --pending_blocks_;
      if (chain.live.empty()) Unlist(chain);
    }
    if (block.parent != nullptr) block.parent->newest_child = nullptr;
    Block* child = block.newest_child;
    if (last_touched_ == &*it) last_touched_ = nullptr;
    blocks_.erase(it);
    if (--chain.resident == 0) Remember(chain);
    // Its newest child can no longer extend a cached prefix.
    if (child != nullptr) {
      child->parent = nullptr;
      Kill(*child);
    }
  }

  std::optional<BlockId> Victim() override {
    if (!dead_.empty()) return dead_.back();
    // A full tier asks again and again while one request is stored; the
    // choice stands until a turn starts, a hint lands or a chain changes list.
    if (victim_ != nullptr) return victim_->live.back();
    Chain* victim = nullptr;
    double lowest = 0;
    for (int kind : {kFirst, kLater}) {
      for (int cls = 0; cls <= kPending; ++cls) {
        const PooledList<Chain*>& chains = classes_[kind][cls];
        if (chains.empty()) continue;
        Chain* oldest = chains.back();
        const double value = Value(*oldest);
        if (victim == nullptr || value < lowest ||
            (value == lowest && oldest->last_turn < victim->last_turn)) {
          victim = oldest;
          lowest = value;
        }
      }
    }
    if (!shared_.empty()) {
      Chain* oldest = shared_.back();
      const double value = Value(*oldest);
      if (victim == nullptr || value < lowest) victim = oldest;
    }
    if (victim == nullptr) return std::nullopt;
    victim_ = victim;
    return victim->live.back();  // deepest first: the prefix stays whole
  }

  void OnRequestFinished(const BlockId& last_block, uint32_t output_tokens) override {
    auto it = blocks_.find(last_block);
    if (it == blocks_.end()) return;
    const Block& block = it->second;
    Chain& chain = *block.chain;
    if (chain.shared) return;
    const int kind = block.touched == chain.first_turn ? kFirst : kLater;
    const int cls = OutputClass(output_tokens);
    victim_ = nullptr;  // what is learned or the chain's class changes
    if (block.touched != chain.last_turn) {
      // The hint of an earlier turn, arriving after the chain came back.
      stats_.Turn(kind, cls);
      stats_.Returned(kind, cls);
      return;
    }
    if (chain.output_class != kPending) return;  // a repeated hint
    stats_.Turn(kind, cls);
    const uint64_t delay = clock_ - chain.last_turn;
    hint_delay_ = std::max<double>(delay, hint_delay_ * (1 - 1.0 / 1024));
    hints_seen_ = true;
    const bool listed = !chain.live.empty();
    if (listed) Unlist(chain);
    pending_blocks_ -= chain.live.size();
    chain.output_class = cls;
    if (listed) List(chain);
  }

  size_t size() const override { return blocks_.size(); }

 private:
  struct Chain {
    BlockId root;
    uint64_t first_turn = 0;
    uint64_t last_turn = 0;
    int kind = kFirst;           // of its latest turn
    int output_class = kPending;  // of its latest turn, once hinted
    // Holds a branch point: a prefix of many conversations (a system prompt,
    // a document), whose turns teach nothing about conversations returning.
    bool shared = false;
    explicit Chain(NodePool* pool) : live(PoolAllocator<BlockId>(pool)) {}
    PooledList<BlockId> live;     // blocks that can extend a prefix, in insertion order
    size_t resident = 0;          // live and dead blocks
    PooledList<Chain*>::iterator class_position;  // valid while `live` is not empty
  };
  struct Block {
    Chain* chain = nullptr;
    PooledList<BlockId>::iterator position;  // in chain->live, or in dead_
    // The newest child inserted under it, and that child's link back (only
    // the newest child keeps one: older children are dead).
    Block* newest_child = nullptr;
    Block* parent = nullptr;
    bool dead = false;
    bool extended = false;  // has had a child
    uint8_t branches = 0;   // children that did not replace a partial tail
    uint8_t children_seen = 0;  // (saturating)
    uint64_t touched = 0;  // the turn that last inserted or hit it
  };

  // The value of keeping a chain one more turn: the chance it comes back.
  // A turn waiting for its hint is kept (its hint may show it is worth
  // keeping: deciding before it arrives would throw that away) while turns
  // waiting hold at most a tenth of the blocks (S3-FIFO's small queue) and
  // its hint is not overdue (twice the longest recent delay); past that it
  // is valued by its kind alone.
  double Value(const Chain& chain) {
    // No engine sends hints: chain-protect's order (new chains, oldest first,
    // before reused ones), which does better here than the kinds' estimates.
    const uint64_t silence = clock_ - chain.last_turn;
    // A shared prefix is worth what a reused conversation is after the same
    // silence: it stays while requests keep using it. (Without hints it
    // once went with the new chains, first: a shared system prompt went
    // before every conversation below it, 0.16-0.30 below LRU.)
    if (chain.shared) return hints_seen_ ? stats_.Alive(kLater, kAnyOutput, silence) : 1;
    if (!hints_seen_) return chain.kind == kFirst ? 0 : 1;
    if (chain.output_class == kPending) {
      const bool waiting = pending_blocks_ * 10 <= blocks_.size() && !Overdue(chain);
      return waiting ? 2 : stats_.Alive(chain.kind, kAnyOutput, silence);
    }
    return stats_.Alive(chain.kind, chain.output_class, silence);
  }

  bool Overdue(const Chain& chain) const {
    return clock_ - chain.last_turn > 2 * hint_delay_ + 1;
  }
  bool InProgress(const Chain& chain) const {
    return hints_seen_ && chain.output_class == kPending && !Overdue(chain);
  }

  // Starts a turn of the chain rooted at `root`, creating the chain for a
  // root never seen (or forgotten).
  Chain& StartTurn(const BlockId& root) {
    ++clock_;
    victim_ = nullptr;
    auto [it, created] = chains_.try_emplace(root, &pool_);
    Chain& chain = it->second;
    // Out of its class list before its class changes; back at the front after.
    const bool listed = !chain.live.empty();
    if (listed) Unlist(chain);
    if (chain.shared) {
      chain.last_turn = clock_;
      if (listed) List(chain);
      return chain;
    }
    if (created) {
      chain.root = root;
      chain.first_turn = clock_;
      chain.kind = kFirst;
    } else {
      stats_.Gap(chain.kind, clock_ - chain.last_turn);
      stats_.Returned(chain.kind, kAnyOutput);
      if (chain.output_class != kPending) stats_.Returned(chain.kind, chain.output_class);
      chain.kind = kLater;
    }
    stats_.Turn(chain.kind, kAnyOutput);
    if (chain.output_class != kPending) pending_blocks_ += chain.live.size();
    chain.output_class = kPending;
    chain.last_turn = clock_;
    if (listed) List(chain);
    if (created) Remember(chain);
    return chain;
  }

  void Touch(const BlockId& id, Block& block) {
    Chain& chain = *block.chain;
    if (block.dead) {  // asked for again after all
      chain.live.splice(chain.live.end(), dead_, block.position);
      if (chain.output_class == kPending) ++pending_blocks_;
      block.dead = false;
      if (chain.live.size() == 1) List(chain);
    }
    // A root hit starts a turn, unless it is the same request's: hit again
    // in this turn, or (with hints flowing) while its turn still waits for
    // its finished-hint, as a Fetch after the request's Lookup does when
    // other requests came in between. A conversation's next request comes
    // after the previous one finished.
    if (chain.root == id && chain.last_turn != clock_ && !InProgress(chain)) StartTurn(id);
    block.touched = clock_;
  }

  void Kill(Block& block) {
    if (block.dead) return;
    Chain& chain = *block.chain;
    dead_.splice(dead_.begin(), chain.live, block.position);
    if (chain.output_class == kPending) --pending_blocks_;
    block.dead = true;
    if (chain.live.empty()) Unlist(chain);
  }

  // Class lists hold exactly the chains with live blocks, newest turn first:
  // a chain is listed when its first live block arrives and unlisted when
  // its last one goes. It changes list at a new turn (to the front) or at its
  // hint (usually near the front: hints come within a few requests; the walk
  // is bounded).
  void List(Chain& chain) {
    PooledList<Chain*>& chains = ListOf(chain);
    auto at = chains.begin();
    for (int steps = 0; at != chains.end() && (*at)->last_turn > chain.last_turn && steps < 64;
         ++steps) {
      ++at;
    }
    chain.class_position = chains.insert(at, &chain);
    victim_ = nullptr;
  }
  void Unlist(Chain& chain) {
    ListOf(chain).erase(chain.class_position);
    victim_ = nullptr;
  }
  PooledList<Chain*>& ListOf(Chain& chain) {
    return chain.shared ? shared_ : classes_[chain.kind][chain.output_class];
  }
  void MakeShared(Chain& chain) {
    if (chain.shared) return;
    const bool listed = !chain.live.empty();
    if (listed) Unlist(chain);
    if (chain.output_class == kPending) pending_blocks_ -= chain.live.size();
    chain.output_class = kAnyOutput;  // never pending again
    chain.shared = true;
    if (listed) List(chain);
  }

  // Chains are remembered after their blocks are gone, so a conversation
  // that returns after eviction still teaches the policy its gap; at most as
  // many as the blocks the policy ever held (the tier's size, without the
  // policy knowing it), forgetting the longest idle first.
  void Remember(const Chain& chain) {
    forget_order_.push_back({chain.root, chain.last_turn});
    const size_t limit = std::max<size_t>(high_water_, 64);
    // (Chains with blocks have no entry to forget them by: when they are
    // all that is over the limit, the entries run out first. A cluster node
    // whose blocks all have parents elsewhere holds one chain per block.)
    while ((chains_.size() > limit || forget_order_.size() > 2 * limit + 16) &&
           !forget_order_.empty()) {
      const auto [root, stamp] = forget_order_.front();
      forget_order_.pop_front();
      auto it = chains_.find(root);
      // (Never the chain whose turn is starting: its first block is not in yet.)
      if (it != chains_.end() && it->second.resident == 0 && it->second.last_turn == stamp &&
          stamp != clock_) {
        chains_.erase(it);
      }
    }
  }

  uint64_t clock_ = 0;  // turns started
  // Every node of the maps and lists below (before them: it outlives them).
  NodePool pool_;
  template <typename V>
  using Map = absl::node_hash_map<BlockId, V, absl::Hash<BlockId>, std::equal_to<BlockId>,
                                  PoolAllocator<std::pair<const BlockId, V>>>;
  template <typename T>
  PooledList<T> NewList() {
    return PooledList<T>(PoolAllocator<T>(&pool_));
  }
  Map<Block> blocks_{PoolAllocator<std::pair<const BlockId, Block>>(&pool_)};  // stable addresses: blocks link each other
  std::pair<const BlockId, Block>* last_touched_ = nullptr;  // inserted or hit last
  Map<Chain> chains_{PoolAllocator<std::pair<const BlockId, Chain>>(&pool_)};  // by root; stable addresses
  template <typename T, size_t... I>
  std::array<PooledList<T>, sizeof...(I)> NewLists(std::index_sequence<I...>) {
    return {((void)I, NewList<T>())...};
  }
  using Classes = std::array<PooledList<Chain*>, kPending + 1>;
  std::array<Classes, 2> classes_ = {NewLists<Chain*>(std::make_index_sequence<kPending + 1>()),
                                     NewLists<Chain*>(std::make_index_sequence<kPending + 1>())};
  PooledList<Chain*> shared_ = NewList<Chain*>();  // shared chains with live blocks, newest turn first
  PooledList<BlockId> dead_ = NewList<BlockId>();  // newest first
  std::deque<std::pair<BlockId, uint64_t>> forget_order_;
  ReturnStats stats_;
  double hint_delay_ = 0;  // longest recent hint delay, in turns (decays)
  bool hints_seen_ = false;
  size_t pending_blocks_ = 0;  // live blocks of chains whose turn waits for its hint
  size_t high_water_ = 0;
  Chain* victim_ = nullptr;  // Victim's last choice, until something changes it
};

}  // namespace

std::unique_ptr<EvictionPolicy> MakeReturnAwarePolicy() {
  return std::make_unique<ReturnAwarePolicy>();
}

}  // namespace kvstrata::cachenode
