// A free list for the nodes of a policy's std::lists, so that inserting a
// block reuses the node of one evicted before instead of calling malloc (a
// policy at capacity frees one node for each it takes). Every list of one
// policy shares the policy's pool, so their allocators compare equal and
// nodes splice between them as with std::allocator.
//
//   NodePool pool;
//   PooledList<BlockId> lru{PoolAllocator<BlockId>(&pool)};
//
// The pool keeps the most nodes it ever lent (the policy's high-water mark)
// until it is destroyed; it must outlive its lists (declare it first).
// Single objects of up to four sizes (a policy's list and map node types);
// arrays and other sizes go to operator new. Not thread-safe, like the
// policies.
#pragma once

#include <algorithm>
#include <cstddef>
#include <list>
#include <memory>
#include <new>
#include <vector>

namespace kvstrata::cachenode {

class NodePool {
 public:
  NodePool() = default;
  NodePool(const NodePool&) = delete;
  NodePool& operator=(const NodePool&) = delete;

  void* Allocate(size_t bytes) {
    Class* c = ClassOf(bytes);
    if (c == nullptr) return ::operator new(bytes);
    if (c->free != nullptr) {
      Free* node = c->free;
      c->free = node->next;
      return node;
    }
    if (c->used == kChunkNodes || c->chunks.empty()) {
      c->chunks.push_back(std::make_unique<std::byte[]>(kChunkNodes * c->stride));
      c->used = 0;
    }
    return c->chunks.back().get() + c->stride * c->used++;
  }
  void Deallocate(void* p, size_t bytes) {
    Class* c = ClassOf(bytes);
    if (c == nullptr) {
      ::operator delete(p);
      return;
    }
    c->free = new (p) Free{c->free};
  }

 private:
  struct Free {
    Free* next;
  };
  struct Class {
    size_t bytes = 0;  // 0: unused
    size_t stride = 0;
    Free* free = nullptr;
    std::vector<std::unique_ptr<std::byte[]>> chunks;
    size_t used = 0;  // nodes handed out of the last chunk
  };
  static constexpr size_t kChunkNodes = 1024;
  // A policy's node types: a few list and map node sizes. More go to
  // operator new.
  static constexpr size_t kClasses = 4;

  Class* ClassOf(size_t bytes) {
    for (Class& c : classes_) {
      if (c.bytes == bytes) return &c;
      if (c.bytes == 0) {
        const size_t align = alignof(std::max_align_t);
        c.bytes = bytes;
        c.stride = (std::max(bytes, sizeof(Free)) + align - 1) / align * align;
        return &c;
      }
    }
    return nullptr;
  }

  Class classes_[kClasses];
};

template <typename T>
class PoolAllocator {
 public:
  using value_type = T;
  explicit PoolAllocator(NodePool* pool) : pool_(pool) {}
  template <typename U>
  PoolAllocator(const PoolAllocator<U>& other) : pool_(other.pool()) {}  // NOLINT: rebinding

  // Single nodes come from the pool; arrays (a hash map's slots) do not.
  T* allocate(size_t n) {
    return static_cast<T*>(n == 1 ? pool_->Allocate(sizeof(T)) : ::operator new(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) {
    if (n == 1) {
      pool_->Deallocate(p, sizeof(T));
    } else {
      ::operator delete(p);
    }
  }
  NodePool* pool() const { return pool_; }

  template <typename U>
  bool operator==(const PoolAllocator<U>& other) const {
    return pool_ == other.pool();
  }

 private:
  NodePool* pool_;
};

template <typename T>
using PooledList = std::list<T, PoolAllocator<T>>;

}  // namespace kvstrata::cachenode
