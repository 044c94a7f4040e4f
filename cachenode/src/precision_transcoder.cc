#include "precision_transcoder.h"

#include "absl/strings/str_cat.h"
#include "kvstrata/cachenode/stored_format.h"

namespace kvstrata::cachenode {

std::shared_ptr<const PrecisionTranscoder::Ladder> PrecisionTranscoder::LadderOf(
    uint64_t namespace_id) const {
  {
    absl::MutexLock lock(&mu_);
    if (auto it = cache_.find(namespace_id); it != cache_.end()) return it->second;
  }
  absl::StatusOr<NamespaceInfo> info = namespaces_.Get(namespace_id);
  if (!info.ok()) return nullptr;  // not open: not cached, so a reopen is seen
  std::shared_ptr<Ladder> ladder;
  if (info->spec.coarsest_format() != v1::FORMAT_RAW) {
    ladder = std::make_shared<Ladder>();
    ladder->spec = info->spec;
    for (size_t f = 0; f < kStoredFormats; ++f) {
      const auto format = static_cast<v1::StoredFormat>(f);
      ladder->bytes[f] = StoredBytes(info->spec, format, info->block_bytes);
      ladder->next[f] = NextCoarserFormat(info->spec, format);
    }
  }
  absl::MutexLock lock(&mu_);
  if (cache_.size() >= kMaxCached) cache_.clear();
  cache_[namespace_id] = ladder;
  return ladder;
}

std::optional<uint64_t> PrecisionTranscoder::CoarserSize(const BlockId& id,
                                                         const StoredBlock& block) const {
  std::shared_ptr<const Ladder> ladder = LadderOf(id.namespace_id);
  if (ladder == nullptr || block.format >= kStoredFormats) return std::nullopt;
  const std::optional<v1::StoredFormat> next = ladder->next[block.format];
  if (!next.has_value() || ladder->bytes[*next] == 0) return std::nullopt;
  return ladder->bytes[*next];
}

uint64_t PrecisionTranscoder::RawSize(const BlockId& id) const {
  std::shared_ptr<const Ladder> ladder = LadderOf(id.namespace_id);
  return ladder == nullptr ? 0 : ladder->bytes[v1::FORMAT_RAW];
}

absl::Status PrecisionTranscoder::Transcode(const BlockId& id, const StoredBlock& from,
                                            StoredBlock& to) const {
  std::shared_ptr<const Ladder> ladder = LadderOf(id.namespace_id);
  if (ladder == nullptr || from.format >= kStoredFormats || !ladder->next[from.format]) {
    return absl::FailedPreconditionError("the block's namespace allows no coarser format");
  }
  const v1::StoredFormat target = *ladder->next[from.format];
  if (to.size() != ladder->bytes[target]) {
    return absl::InvalidArgumentError(absl::StrCat("a ", v1::StoredFormat_Name(target), " block has ",
                                                   ladder->bytes[target], " bytes, not ", to.size()));
  }
  absl::Status s = cachenode::Transcode(ladder->spec, from.data(), from.size(),
                                        static_cast<v1::StoredFormat>(from.format), target, to.data(),
                                        to.size());
  if (!s.ok()) return s;
  to.format = static_cast<uint8_t>(target);
  return absl::OkStatus();
}

}  // namespace kvstrata::cachenode
