#include "device_ipc.h"

#include <algorithm>

#include "client_impl.h"
#include "device_staging.h"
#include "kvstrata/common/limits.h"

namespace kvstrata::client {

DeviceIpcPath::Arena DeviceIpcPath::Get(v1::CacheNode::Stub& stub, DeviceStager& device,
                                        absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  if (asked_) return {mapping_.data(), mapping_.size()};
  absl::StatusOr<transfer::DeviceMemory*> memory = device.Device();
  if (!memory.ok()) return {};  // the staged path reports the error
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v1::OpenDeviceIpcRequest request;
  request.set_host_id(transfer::Engine::HostId());
  request.set_device((*memory)->description());
  v1::OpenDeviceIpcResponse response;
  const grpc::Status status = stub.OpenDeviceIpc(&context, request, &response);
  // A node that is down now is asked again next time; one that answered
  // (or is too old to know the call: UNIMPLEMENTED) is not.
  if (!status.ok() && status.error_code() != grpc::StatusCode::UNIMPLEMENTED) return {};
  asked_ = true;
  if (!status.ok() || response.path() != v1::DEVICE_PATH_CUDA_IPC) return {};
  absl::StatusOr<transfer::DeviceAllocation> mapped = (*memory)->ImportIpc(response.handle());
  if (!mapped.ok() || mapped->size() < response.arena_bytes()) return {};  // staged, for good
  mapping_ = *std::move(mapped);
  return {mapping_.data(), mapping_.size()};
}

void DeviceIpcPath::AddCounters(DeviceStagingCounters& counters) {
  {
    absl::MutexLock lock(&mu_);
    counters.cuda_ipc = mapping_.data() != nullptr;
  }
  counters.ipc_blocks = blocks_.load(std::memory_order_relaxed);
}

// One pass over the device items: HBM blocks are pinned by the node and
// copied device-to-device from the mapped arena, then released; every other
// item (host items, blocks outside HBM, transcoded blocks that need decoding
// on the host, blocks whose copy failed) goes through FetchThroughNode, and
// the two results merge in item order.
absl::StatusOr<TransferResult> Namespace::FetchWithDeviceIpc(
    absl::Span<const FetchItem> items, std::optional<absl::Duration> timeout) {
  Client::Impl& impl = client_->impl();
  const absl::Duration budget = impl.Timeout(timeout);
  const absl::Time deadline = absl::Now() + budget;
  const DeviceIpcPath::Arena arena = impl.ipc->Get(*impl.stub, *impl.device, budget);
  if (arena.data == nullptr) return FetchThroughNode(items, timeout);

  TransferResult result;
  result.outcomes.assign(items.size(), BlockOutcome::kTransferFailed);
  result.sizes.assign(items.size(), 0);
  result.formats.assign(items.size(), StoredFormat::kRaw);
  std::vector<bool> served(items.size(), false);
  std::vector<size_t> device_items;
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].buffer == nullptr) return absl::InvalidArgumentError("block without a buffer");
    if (items[i].offset > items[i].buffer->size() ||
        block_bytes_ > items[i].buffer->size() - items[i].offset) {
      return absl::OutOfRangeError("a block overruns its buffer");
    }
    if (items[i].buffer->kind() == MemoryKind::kDevice) device_items.push_back(i);
  }
  for (size_t start = 0; start < device_items.size(); start += limits::kMaxTransferBlocks) {
    const size_t count = std::min(limits::kMaxTransferBlocks, device_items.size() - start);
    v1::FetchDeviceIpcRequest request;
    request.set_namespace_id(id_);
    for (size_t j = 0; j < count; ++j) {
      request.add_keys(std::string(items[device_items[start + j]].key.view()));
    }
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(deadline));
    v1::FetchDeviceIpcResponse response;
    if (!impl.stub->FetchDeviceIpc(&context, request, &response).ok()) break;  // all staged
    const int n = static_cast<int>(count);
    if (response.status_size() != n || response.arena_offset_size() != n ||
        response.size_size() != n || response.format_size() != n) {
      break;  // a malformed answer: stage everything it named
    }
    std::vector<transfer::StagingPool::Copy> copies;
    std::vector<size_t> copied;
    for (int j = 0; j < n; ++j) {
      const size_t i = device_items[start + j];
      const uint64_t offset = response.arena_offset(j);
      const uint64_t size = response.size(j);
      const auto format = static_cast<StoredFormat>(response.format(j));
      if (response.status(j) != v1::BLOCK_OK || size == 0 || size > block_bytes_ ||
          offset > arena.bytes || size > arena.bytes - offset) {
        continue;
      }
      // A transcoded block of a raw namespace is decoded on the host: staged.
      if (decode_to_raw_ && format != StoredFormat::kRaw) continue;
      copies.push_back({items[i].buffer->data() + items[i].offset,
                        const_cast<uint8_t*>(arena.data) + offset, size});
      copied.push_back(i);
      result.sizes[i] = size;
      result.formats[i] = format;
    }
    absl::Status status = copies.empty() ? absl::OkStatus() : impl.device->CopyOnDevice(copies);
    if (response.lease() != 0) {
      // After the copies (done or failed): the node may reuse the chunks now.
      grpc::ClientContext release_context;
      release_context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
      v1::ReleaseDeviceIpcRequest release;
      release.set_lease(response.lease());
      v1::ReleaseDeviceIpcResponse released;
      impl.stub->ReleaseDeviceIpc(&release_context, release, &released).ok();  // else it expires
    }
    for (size_t i : copied) {
      if (status.ok()) {
        served[i] = true;
        result.outcomes[i] = BlockOutcome::kOk;
        result.bytes += result.sizes[i];
      } else {
        result.sizes[i] = 0;  // the staged fetch below tries it again
        result.formats[i] = StoredFormat::kRaw;
      }
    }
    if (status.ok()) impl.ipc->CountBlocks(copied.size());
  }

  std::vector<FetchItem> rest;
  std::vector<size_t> rest_index;
  for (size_t i = 0; i < items.size(); ++i) {
    if (served[i]) continue;
    rest.push_back(items[i]);
    rest_index.push_back(i);
  }
  if (rest.empty()) return result;
  const absl::Duration left = std::max(deadline - absl::Now(), absl::Milliseconds(1));
  absl::StatusOr<TransferResult> fetched = FetchThroughNode(rest, left);
  if (!fetched.ok()) {
    if (rest.size() == items.size()) return fetched.status();
    return result;  // the IPC blocks are in place; the rest failed (kTransferFailed)
  }
  for (size_t j = 0; j < rest.size(); ++j) {
    const size_t i = rest_index[j];
    result.outcomes[i] = fetched->outcomes[j];
    result.sizes[i] = fetched->sizes[j];
    result.formats[i] = fetched->formats[j];
  }
  result.bytes += fetched->bytes;
  return result;
}

}  // namespace kvstrata::client
