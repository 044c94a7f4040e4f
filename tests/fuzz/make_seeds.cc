// Writes the seed corpus of every harness (tests/fuzz/corpus/<harness>/):
// valid and nearly valid inputs, so the fuzzers start past the first checks.
//   make_fuzz_seeds tests/fuzz/corpus
// Rerun after changing a harness's input format; the files are checked in.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "kvstrata.pb.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/common/fast_path_wire.h"
#include "kvstrata/common/namespace_spec.h"
#include "nvme/index_record.h"

namespace v1 = kvstrata::v1;
namespace fs = std::filesystem;

namespace {

fs::path root;

void Write(const std::string& harness, const std::string& name, const std::string& bytes) {
  fs::create_directories(root / harness);
  std::ofstream(root / harness / name, std::ios::binary) << bytes;
}

// The node_rpc harness's input: RPC number, flags, request bytes.
void Rpc(const std::string& name, uint8_t rpc, uint8_t flags,
         const google::protobuf::Message& request) {
  Write("node_rpc", name, std::string{static_cast<char>(rpc), static_cast<char>(flags)} +
                              request.SerializeAsString());
}

v1::NamespaceSpec Opaque() {  // node_rpc_fuzzer.cc's namespace 1
  v1::NamespaceSpec spec;
  spec.set_tenant("fuzz");
  spec.set_model("opaque");
  spec.set_tokens_per_block(16);
  spec.set_block_bytes(4096);
  return spec;
}

// The four keys node_rpc_fuzzer.cc preloads.
std::vector<kvstrata::BlockKey> StoredKeys() {
  std::vector<uint32_t> tokens(64);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i);
  return kvstrata::ComputeBlockKeys(kvstrata::NamespaceId(Opaque()), tokens, 16);
}

v1::TransferEndpoint Endpoint(bool rkey) {
  v1::TransferEndpoint endpoint;
  endpoint.set_worker_address(std::string(64, '\x01'));
  endpoint.set_host_id("host");
  v1::MemoryRegion* region = endpoint.add_regions();
  region->set_base_address(0x10000);
  region->set_length(1 << 20);
  if (rkey) region->set_packed_rkey(std::string(32, '\x02'));
  return endpoint;
}

void NodeRpcSeeds() {
  const auto keys = StoredKeys();
  v1::OpenNamespaceRequest open;
  *open.mutable_spec() = Opaque();
  Rpc("open_opaque", 0, 0, open);
  v1::NamespaceSpec layout = Opaque();
  layout.set_block_bytes(0);
  layout.set_dtype(v1::DTYPE_BF16);
  layout.set_num_layers(2);
  layout.set_num_kv_heads(2);
  layout.set_head_dim(64);
  layout.set_format(v1::FORMAT_INT4_KIVI);
  *open.mutable_spec() = layout;
  Rpc("open_kivi", 0, 0, open);

  v1::LookupRequest lookup;
  lookup.set_namespace_id(1);
  for (const auto& k : keys) lookup.add_keys(std::string(k.view()));
  lookup.add_keys(std::string(32, 'h'));
  Rpc("lookup_chain", 1, 0, lookup);

  v1::PublishRequest publish;
  publish.set_namespace_id(1);
  publish.set_tag_base(uint64_t{7} << 32);
  *publish.mutable_source() = Endpoint(false);
  for (size_t i = 0; i < 3; ++i) {
    v1::PublishBlock* b = publish.add_blocks();
    b->set_key(std::string(i < 2 ? keys[i].view() : std::string(16, 'n')));
    if (i > 0) b->set_parent(std::string(keys[i - 1].view()));
    b->set_size(4096);
    b->set_offset(i * 4096);
    b->set_checksum(i);
  }
  Rpc("publish_tagged", 2, 0, publish);
  publish.set_tag_base(0);
  *publish.mutable_source() = Endpoint(true);
  Rpc("publish_rma", 2, 1, publish);
  // Enough new blocks to fill the harness's DRAM tier (evicts before failing).
  publish.set_tag_base(uint64_t{7} << 32);
  *publish.mutable_source() = Endpoint(false);
  publish.clear_blocks();
  for (int i = 0; i < 20; ++i) {
    v1::PublishBlock* b = publish.add_blocks();
    b->set_key(std::string(15, 'p') + static_cast<char>(i));
    b->set_size(4096);
    b->set_offset(i * 4096);
  }
  Rpc("publish_many", 2, 0, publish);

  v1::FetchRequest fetch;
  fetch.set_namespace_id(1);
  fetch.set_tag_base(uint64_t{9} << 32);
  *fetch.mutable_destination() = Endpoint(false);
  for (size_t i = 0; i < keys.size(); ++i) {
    v1::FetchBlock* b = fetch.add_blocks();
    b->set_key(std::string(keys[i].view()));
    b->set_offset(i * 4096);
    b->set_capacity(4096);
  }
  Rpc("fetch_chain", 3, 0, fetch);
  fetch.set_tag_base(0);
  *fetch.mutable_destination() = Endpoint(true);
  Rpc("fetch_rma", 3, 1, fetch);

  v1::DeleteRequest del;
  del.set_namespace_id(1);
  del.add_keys(std::string(keys[1].view()));
  Rpc("delete_one", 4, 0, del);
  Rpc("stats", 5, 0, v1::StatsRequest());
  Rpc("health", 6, 0, v1::HealthRequest());
  v1::DrainRequest drain;
  drain.set_draining(true);
  Rpc("drain", 7, 0, drain);
  v1::RequestFinishedRequest finished;
  finished.set_namespace_id(1);
  finished.set_last_key(std::string(keys[3].view()));
  finished.set_output_tokens(100);
  Rpc("request_finished", 8, 0, finished);
  v1::CloseNamespaceRequest close;
  close.set_namespace_id(2);
  Rpc("close_namespace", 9, 0, close);
  v1::ListBlocksRequest list;
  list.set_namespace_id(1);
  list.set_limit(2);
  Rpc("list_blocks_page", 10, 0, list);
  list.set_after(std::string(keys[1].view()));
  Rpc("list_blocks_after", 10, 0, list);
  list.clear_after();
  list.add_keys(std::string(keys[2].view()));
  list.add_keys(std::string(16, '\x07'));  // not stored
  Rpc("list_blocks_keys", 10, 0, list);

  // The CUDA IPC RPCs, on a node with HBM (flag 2) and without.
  v1::OpenDeviceIpcRequest open_ipc;
  open_ipc.set_host_id("self");  // the harness puts in this host's id
  open_ipc.set_device("fuzz");
  Rpc("open_device_ipc_hbm", 11, 2, open_ipc);
  Rpc("open_device_ipc", 11, 0, open_ipc);
  open_ipc.set_host_id("another-host");
  Rpc("open_device_ipc_other_host", 11, 2, open_ipc);
  v1::FetchDeviceIpcRequest fetch_ipc;
  fetch_ipc.set_namespace_id(1);
  for (const auto& k : keys) fetch_ipc.add_keys(std::string(k.view()));
  fetch_ipc.add_keys(std::string(16, 'm'));  // not stored
  Rpc("fetch_device_ipc_hbm", 12, 2, fetch_ipc);
  Rpc("fetch_device_ipc", 12, 0, fetch_ipc);
  fetch_ipc.add_keys(std::string(5, 'x'));  // not a key
  Rpc("fetch_device_ipc_bad_key", 12, 2, fetch_ipc);
  v1::ReleaseDeviceIpcRequest release;
  release.set_lease(0x0123456789abcdefull);
  Rpc("release_device_ipc", 13, 2, release);
}

// The fast_path_wire harness: a mode byte (0: request, 1: reply), then the header.
void FastPathWireSeeds() {
  const auto keys = StoredKeys();
  namespace fastpath = kvstrata::fastpath;
  fastpath::Request request{.op = fastpath::Op::kFetch, .namespace_id = 1, .block_bytes = 4096};
  for (const auto& k : keys) request.blocks.push_back({.key = k});
  Write("fast_path_wire", "fetch", std::string(1, '\0') + fastpath::EncodeRequest(request));
  request.op = fastpath::Op::kLookup;
  Write("fast_path_wire", "lookup", std::string(1, '\0') + fastpath::EncodeRequest(request));
  request.op = fastpath::Op::kPublish;
  for (size_t i = 1; i < request.blocks.size(); ++i) {
    request.blocks[i].has_parent = true;
    request.blocks[i].parent = keys[i - 1];
    request.blocks[i].checksum = i;
  }
  Write("fast_path_wire", "publish", std::string(1, '\0') + fastpath::EncodeRequest(request));
  fastpath::Reply reply{.code = 0, .bytes_transferred = 8192};
  reply.blocks = {{.status = v1::BLOCK_OK, .size = 4096, .checksum = 1},
                  {.status = v1::BLOCK_NOT_FOUND},
                  {.status = fastpath::kNotInMemory}};
  Write("fast_path_wire", "reply", std::string(1, '\1') + fastpath::EncodeReply(reply));
  Write("fast_path_wire", "error_reply",
        std::string(1, '\1') + fastpath::ErrorReply(absl::ResourceExhaustedError("full")));
}

// The fast_path harness: flags, the header's length (2 bytes), header, data.
// A zero capability and namespace id 1 stand for the harness's grant.
void FastPathSeeds() {
  const auto keys = StoredKeys();
  namespace fastpath = kvstrata::fastpath;
  auto message = [](const std::string& name, uint8_t flags, const std::string& header,
                    const std::string& data) {
    const char length[2] = {static_cast<char>(header.size() & 0xff),
                            static_cast<char>(header.size() >> 8)};
    Write("fast_path", name, std::string(1, static_cast<char>(flags)) + std::string(length, 2) +
                                 header + data);
  };
  fastpath::Request request{.op = fastpath::Op::kFetch, .namespace_id = 1, .block_bytes = 4096};
  for (const auto& k : keys) request.blocks.push_back({.key = k});
  request.blocks.push_back({.key = kvstrata::BlockKey{}});  // not stored
  message("fetch_chain", 0, fastpath::EncodeRequest(request), "");
  request.op = fastpath::Op::kLookup;
  message("lookup_chain", 0, fastpath::EncodeRequest(request), "");
  // A publish of two new blocks: the first checksum right, the second wrong.
  std::string data(2 * 4096, '\x5a');
  data[4096] = 'b';
  fastpath::Request publish{.op = fastpath::Op::kPublish, .namespace_id = 1, .block_bytes = 4096};
  kvstrata::BlockKey a, b;
  a.bytes.fill(0xa1);
  b.bytes.fill(0xb2);
  publish.blocks.push_back({.key = a, .checksum = kvstrata::BlockChecksum(data.data(), 4096)});
  publish.blocks.push_back({.key = b, .has_parent = true, .parent = a, .checksum = 7});
  message("publish_eager", 1, fastpath::EncodeRequest(publish), data);
  message("publish_rendezvous", 0, fastpath::EncodeRequest(publish), data);
  message("publish_rendezvous_fails", 2, fastpath::EncodeRequest(publish), data);
  message("publish_short_data", 1, fastpath::EncodeRequest(publish), data.substr(0, 4096));
  message("publish_other_namespace", 5, fastpath::EncodeRequest(publish), data);
  publish.blocks[1].key = a;  // twice
  message("publish_twice", 1, fastpath::EncodeRequest(publish), data);
}

void NamespaceSpecSeeds() {
  Write("namespace_spec", "opaque", Opaque().SerializeAsString());
  v1::NamespaceSpec spec = Opaque();
  spec.set_block_bytes(0);
  spec.set_dtype(v1::DTYPE_FP16);
  spec.set_num_layers(32);
  spec.set_num_kv_heads(8);
  spec.set_head_dim(128);
  spec.set_tp_rank(1);
  spec.set_tp_size(2);
  Write("namespace_spec", "layout_fp16", spec.SerializeAsString());
  spec.set_format(v1::FORMAT_FP8_E4M3);
  Write("namespace_spec", "layout_fp8", spec.SerializeAsString());
  spec.set_format(v1::FORMAT_INT2_KIVI);
  spec.set_head_dim(72);
  Write("namespace_spec", "layout_int2_kivi", spec.SerializeAsString());
  spec.set_block_bytes(123);
  Write("namespace_spec", "layout_wrong_size", spec.SerializeAsString());
}

void BlockKeySeeds() {
  const auto keys = StoredKeys();
  Write("block_key", "key16", std::string(keys[0].view()));
  Write("block_key", "hash32", std::string(32, '\xab'));
  Write("block_key", "hex32", keys[1].Hex());
  Write("block_key", "hex64", std::string(64, 'F'));
  Write("block_key", "short", "abc");
}

void IndexRecordSeeds() {
  namespace nvme = kvstrata::cachenode::nvme;
  nvme::IndexRecord record;
  record.id.namespace_id = 42;
  record.id.key = StoredKeys()[0];
  record.file = 0;
  record.offset = 8192;
  record.size = 4096;
  record.checksum = 7;
  record.parent = StoredKeys()[1];
  record.last_use_ms = 1700000000000;
  // Mode 0: key and value as stored.
  std::string two = std::string(1, '\0') + nvme::EncodeRecordValue(record) +
                    nvme::EncodeRecordKey(record.id);
  record.offset = 8192 + 4096 * 2;  // a second, adjacent extent; then one overlapping it
  two += std::string(1, '\0') + nvme::EncodeRecordValue(record) + nvme::EncodeRecordKey(record.id);
  record.size = 10000;
  record.offset -= 4096;
  two += std::string(1, '\x07') + nvme::EncodeRecordValue(record);
  Write("index_record", "records", two);
  record.parent.reset();
  Write("index_record", "fixed_up", std::string(1, '\x07') + nvme::EncodeRecordValue(record));
}

void StoredFormatSeeds() {
  // Mode 1: ingest. format, dtype, layers, tokens, heads, head_dim/4, bytes.
  // FuzzedDataProvider takes integers from the end of the input.
  for (uint8_t format = 1; format <= 4; ++format) {
    std::string input(1, '\x01');
    for (int i = 0; i < 64; ++i) input.push_back(static_cast<char>(i * 37));
    // Read back to front: head_dim/4-1, heads-1, tokens-1, layers, dtype, format.
    input += std::string{'\x07', '\x01', '\x0f', '\x02', '\x01', static_cast<char>(format)};
    Write("stored_format", "ingest_" + std::to_string(format), input);
  }
  // Mode 0: an encoded block's header alone (truncated), with the checksum fixed up.
  std::string header(64, '\0');
  const uint32_t magic = 0x4251564b;
  std::memcpy(header.data(), &magic, 4);
  header[4] = 1;
  header[6] = 2;
  header[7] = 1;
  const uint32_t dims[4] = {1, 16, 1, 8};
  std::memcpy(header.data() + 8, dims, 16);
  header[28] = 64;
  Write("stored_format", "header_int8", std::string(1, '\x02') + header + std::string(512, '\x11'));
}

void TraceSeeds() {
  Write("trace", "mooncake",
        "{\"timestamp\": 0, \"input_length\": 1024, \"output_length\": 12, \"hash_ids\": [0, 1]}\n"
        "{\"timestamp\": 27.5, \"input_length\": 1536, \"output_length\": 3, \"hash_ids\": [0, 1, 2]}\n"
        "{\"timestamp\": 30, \"input_length\": 700, \"hash_ids\": [5, 1]}\n"
        "{\"timestamp\": 31, \"input_length\": 512, \"output_length\": 1, \"hash_ids\": []}\n");
  Write("trace", "bad_lines", "{\"timestamp\": x}\n{\"hash_ids\": [1,,2]\n\n{\"timestamp\":");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  root = argv[1];
  NodeRpcSeeds();
  FastPathWireSeeds();
  FastPathSeeds();
  NamespaceSpecSeeds();
  BlockKeySeeds();
  IndexRecordSeeds();
  StoredFormatSeeds();
  TraceSeeds();
  return 0;
}
