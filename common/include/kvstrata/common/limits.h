// Protocol limits, checked by the node before it allocates anything and by the
// client before it sends. proto/kvstrata.proto documents the same numbers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvstrata::limits {

inline constexpr size_t kMaxLookupKeys = 4096;
inline constexpr size_t kMaxDeleteKeys = 4096;
// Blocks per ListBlocks page: like a Lookup's keys, about 200 KiB of reply.
inline constexpr size_t kMaxListBlocks = 4096;
inline constexpr size_t kMaxTransferBlocks = 1024;
inline constexpr size_t kMaxRegions = 64;
inline constexpr size_t kMaxWorkerAddressBytes = 8192;
inline constexpr size_t kMaxPackedRkeyBytes = 4096;
inline constexpr size_t kMaxNameBytes = 256;
inline constexpr uint32_t kMaxLayers = 1024;
inline constexpr uint32_t kMaxKvHeads = 1024;
inline constexpr uint32_t kMaxHeadDim = 4096;
inline constexpr uint32_t kMaxTokensPerBlock = 65536;
inline constexpr size_t kMaxNamespaces = 1024;
// Largest coalesced tagged transfer (a request's blocks back to back in a few
// UCX messages): the staging memory it costs the receiver per call. 4 MiB
// holds 256 blocks of 16 KiB (the largest the client coalesces), eight
// messages of 512 KiB; larger batches are split into calls of that size.
inline constexpr uint64_t kMaxCoalescedBytes = 4 << 20;
// gRPC message cap; the largest legal request (4096 keys of 32 bytes, or 1024
// blocks plus 64 rkeys) stays far below it.
inline constexpr int kMaxGrpcMessageBytes = 16 << 20;

}  // namespace kvstrata::limits
