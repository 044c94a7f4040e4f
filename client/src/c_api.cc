#include <cstring>
#include <string>

#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/kvstrata.h"

struct kvs_client {
  std::unique_ptr<kvstrata::client::Client> client;
};
struct kvs_namespace {
  kvstrata::client::Namespace ns;
};
struct kvs_buffer {
  std::unique_ptr<kvstrata::client::Buffer> buffer;
};

namespace {

thread_local std::string last_error;

int Fail(const absl::Status& status) {
  last_error = status.ToString();
  return static_cast<int>(status.code());
}

int Fail(absl::StatusCode code, const char* message) { return Fail(absl::Status(code, message)); }

kvstrata::BlockKey ToKey(const kvs_key& key) {
  kvstrata::BlockKey out;
  std::memcpy(out.bytes.data(), key.bytes, 16);
  return out;
}

void StoreOutcomes(const kvstrata::client::TransferResult& result, int* outcomes) {
  if (outcomes == nullptr) return;
  for (size_t i = 0; i < result.outcomes.size(); ++i)
    outcomes[i] = static_cast<int>(result.outcomes[i]);
}

}  // namespace

extern "C" {

const char* kvs_last_error(void) { return last_error.c_str(); }

int kvs_connect(const char* node_address, int timeout_ms, kvs_client** out) {
  if (node_address == nullptr || out == nullptr) {
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  }
  kvstrata::client::ClientOptions options;
  options.node_address = node_address;
  if (timeout_ms > 0) options.timeout = absl::Milliseconds(timeout_ms);
  auto client = kvstrata::client::Client::Connect(options);
  if (!client.ok()) return Fail(client.status());
  *out = new kvs_client{*std::move(client)};
  return 0;
}

void kvs_client_destroy(kvs_client* client) { delete client; }

int kvs_open_namespace(kvs_client* client, const kvs_namespace_spec* spec, kvs_namespace** out) {
  return kvs_open_namespace_with_budget(client, spec, KVS_FORMAT_RAW, out);
}

int kvs_open_namespace_with_budget(kvs_client* client, const kvs_namespace_spec* spec,
                                   int coarsest_format, kvs_namespace** out) {
  if (client == nullptr || spec == nullptr || out == nullptr) {
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  }
  if (!kvstrata::v1::StoredFormat_IsValid(coarsest_format)) {
    return Fail(absl::StatusCode::kInvalidArgument, "unknown coarsest_format");
  }
  kvstrata::v1::NamespaceSpec proto;
  if (spec->tenant != nullptr) proto.set_tenant(spec->tenant);
  if (spec->model != nullptr) proto.set_model(spec->model);
  proto.set_dtype(static_cast<kvstrata::v1::DType>(spec->dtype));
  proto.set_num_layers(spec->num_layers);
  proto.set_num_kv_heads(spec->num_kv_heads);
  proto.set_head_dim(spec->head_dim);
  proto.set_tokens_per_block(spec->tokens_per_block);
  proto.set_tp_rank(spec->tp_rank);
  proto.set_tp_size(spec->tp_size);
  proto.set_block_bytes(spec->block_bytes);
  proto.set_coarsest_format(static_cast<kvstrata::v1::StoredFormat>(coarsest_format));
  auto ns = client->client->OpenNamespace(proto);
  if (!ns.ok()) return Fail(ns.status());
  *out = new kvs_namespace{*std::move(ns)};
  return 0;
}

void kvs_namespace_destroy(kvs_namespace* ns) { delete ns; }

int kvs_namespace_close(kvs_namespace* ns) {
  if (ns == nullptr) return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  absl::Status status = ns->ns.Close();
  return status.ok() ? 0 : Fail(status);
}
uint64_t kvs_namespace_id(const kvs_namespace* ns) { return ns->ns.id(); }
uint64_t kvs_block_bytes(const kvs_namespace* ns) { return ns->ns.block_bytes(); }

int kvs_register(kvs_client* client, void* data, size_t size, kvs_buffer** out) {
  if (client == nullptr || out == nullptr)
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  auto buffer = client->client->Register(data, size);
  if (!buffer.ok()) return Fail(buffer.status());
  *out = new kvs_buffer{*std::move(buffer)};
  return 0;
}

int kvs_allocate(kvs_client* client, size_t size, kvs_buffer** out) {
  if (client == nullptr || out == nullptr)
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  auto buffer = client->client->Allocate(size);
  if (!buffer.ok()) return Fail(buffer.status());
  *out = new kvs_buffer{*std::move(buffer)};
  return 0;
}

int kvs_register_device(kvs_client* client, void* data, size_t size, kvs_buffer** out) {
  if (client == nullptr || out == nullptr)
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  auto buffer = client->client->Register(data, size, kvstrata::client::MemoryKind::kDevice);
  if (!buffer.ok()) return Fail(buffer.status());
  *out = new kvs_buffer{*std::move(buffer)};
  return 0;
}

int kvs_allocate_device(kvs_client* client, size_t size, kvs_buffer** out) {
  if (client == nullptr || out == nullptr)
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  auto buffer = client->client->Allocate(size, kvstrata::client::MemoryKind::kDevice);
  if (!buffer.ok()) return Fail(buffer.status());
  *out = new kvs_buffer{*std::move(buffer)};
  return 0;
}

void* kvs_buffer_data(const kvs_buffer* buffer) { return buffer->buffer->data(); }
void kvs_buffer_destroy(kvs_buffer* buffer) { delete buffer; }

size_t kvs_compute_keys(const kvs_namespace* ns, const uint32_t* tokens, size_t num_tokens,
                        const kvs_key* parent, kvs_key* keys, size_t max_keys) {
  if (ns == nullptr || (tokens == nullptr && num_tokens > 0)) return 0;
  const kvstrata::BlockKey start = parent ? ToKey(*parent) : kvstrata::BlockKey{};
  const auto computed = ns->ns.Keys(absl::MakeConstSpan(tokens, num_tokens), start);
  for (size_t i = 0; i < computed.size() && i < max_keys && keys != nullptr; ++i) {
    std::memcpy(keys[i].bytes, computed[i].bytes.data(), 16);
  }
  return computed.size();
}

int kvs_lookup(kvs_namespace* ns, const kvs_key* keys, size_t num_keys, size_t* prefix_length) {
  if (ns == nullptr || prefix_length == nullptr || (keys == nullptr && num_keys > 0)) {
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  }
  std::vector<kvstrata::BlockKey> converted;
  converted.reserve(num_keys);
  for (size_t i = 0; i < num_keys; ++i) converted.push_back(ToKey(keys[i]));
  auto result = ns->ns.Lookup(converted);
  if (!result.ok()) return Fail(result.status());
  *prefix_length = result->prefix_length;
  return 0;
}

int kvs_publish(kvs_namespace* ns, const kvs_buffer* buffer, const kvs_publish_item* items,
                size_t count, int* outcomes) {
  if (ns == nullptr || buffer == nullptr || (items == nullptr && count > 0)) {
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  }
  std::vector<kvstrata::client::PublishItem> converted;
  converted.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    kvstrata::client::PublishItem item;
    item.key = ToKey(items[i].key);
    if (items[i].has_parent) item.parent = ToKey(items[i].parent);
    item.buffer = buffer->buffer.get();
    item.offset = items[i].offset;
    converted.push_back(item);
  }
  auto result = ns->ns.Publish(converted);
  if (!result.ok()) return Fail(result.status());
  StoreOutcomes(*result, outcomes);
  return 0;
}

int kvs_fetch(kvs_namespace* ns, kvs_buffer* buffer, const kvs_key* keys, const size_t* offsets,
              size_t count, int* outcomes) {
  return kvs_fetch_with_formats(ns, buffer, keys, offsets, count, outcomes, nullptr);
}

int kvs_fetch_with_formats(kvs_namespace* ns, kvs_buffer* buffer, const kvs_key* keys,
                           const size_t* offsets, size_t count, int* outcomes, int* formats) {
  if (ns == nullptr || buffer == nullptr ||
      ((keys == nullptr || offsets == nullptr) && count > 0)) {
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  }
  std::vector<kvstrata::client::FetchItem> converted;
  converted.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    converted.push_back({ToKey(keys[i]), buffer->buffer.get(), offsets[i]});
  }
  auto result = ns->ns.Fetch(converted);
  if (!result.ok()) return Fail(result.status());
  StoreOutcomes(*result, outcomes);
  if (formats != nullptr) {
    for (size_t i = 0; i < count; ++i) {
      formats[i] = i < result->formats.size() ? static_cast<int>(result->formats[i]) : KVS_FORMAT_RAW;
    }
  }
  return 0;
}

int kvs_delete(kvs_namespace* ns, const kvs_key* keys, size_t count, size_t* deleted) {
  if (ns == nullptr || (keys == nullptr && count > 0)) {
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  }
  std::vector<kvstrata::BlockKey> converted;
  for (size_t i = 0; i < count; ++i) converted.push_back(ToKey(keys[i]));
  auto result = ns->ns.Delete(converted);
  if (!result.ok()) return Fail(result.status());
  if (deleted != nullptr) *deleted = *result;
  return 0;
}

int kvs_request_finished(kvs_namespace* ns, const kvs_key* last_key, uint32_t output_tokens,
                         int* known) {
  if (ns == nullptr || last_key == nullptr) {
    return Fail(absl::StatusCode::kInvalidArgument, "null argument");
  }
  auto result = ns->ns.RequestFinished(ToKey(*last_key), output_tokens);
  if (!result.ok()) return Fail(result.status());
  if (known != nullptr) *known = *result ? 1 : 0;
  return 0;
}

}  // extern "C"
