// kvstrata._kvstrata: the C++ client for Python (package `kvstrata` re-exports it).
//
// Lifetime: a Namespace and a Buffer keep their Client alive (shared_ptr);
// a Buffer keeps the Python object whose memory it registered alive; a
// Future keeps every Buffer its items name alive until the transfer is over,
// so a caller may drop its own references right after publish_async/fetch_async.
//
// The GIL is released around every call that can block (RPCs, waits,
// registration), so other Python threads run while bytes move.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/client/cluster.h"
#include "kvstrata/common/block_key.h"

namespace py = pybind11;

namespace kvstrata::python {
namespace {

// Precision budgets by the kernels' names ("" or "raw": none).
v1::StoredFormat ParseCoarsestFormat(const std::string& name) {
  if (name.empty() || name == "raw") return v1::FORMAT_RAW;
  if (name == "fp8_e4m3") return v1::FORMAT_FP8_E4M3;
  if (name == "int8") return v1::FORMAT_INT8;
  if (name == "int4_kivi") return v1::FORMAT_INT4_KIVI;
  if (name == "int2_kivi") return v1::FORMAT_INT2_KIVI;
  throw py::value_error("coarsest_format is one of raw, fp8_e4m3, int8, int4_kivi, int2_kivi; got " +
                        name);
}

std::string StoredFormatName(client::StoredFormat f) {
  switch (f) {
    case client::StoredFormat::kFp8E4m3: return "fp8_e4m3";
    case client::StoredFormat::kInt8: return "int8";
    case client::StoredFormat::kInt4Kivi: return "int4_kivi";
    case client::StoredFormat::kInt2Kivi: return "int2_kivi";
    default: return "raw";
  }
}

using client::BlockOutcome;

// A failed absl::Status on its way to Python as kvstrata.Error(code, message).
struct StatusError {
  absl::Status status;
};

template <typename T>
T Check(absl::StatusOr<T> value) {
  if (!value.ok()) throw StatusError{value.status()};
  return *std::move(value);
}
void Check(const absl::Status& status) {
  if (!status.ok()) throw StatusError{status};
}

std::optional<absl::Duration> Timeout(std::optional<double> seconds) {
  if (!seconds.has_value()) return std::nullopt;
  return absl::Seconds(*seconds);
}

BlockKey KeyFrom(const py::handle& object) {
  std::string bytes = py::cast<std::string>(py::bytes(py::reinterpret_borrow<py::object>(object)));
  if (bytes.size() != 16) {
    throw StatusError{absl::InvalidArgumentError("a block key is 16 bytes")};
  }
  BlockKey key;
  std::memcpy(key.bytes.data(), bytes.data(), 16);
  return key;
}

py::bytes KeyTo(const BlockKey& key) { return py::bytes(std::string(key.view())); }

std::vector<BlockKey> KeysFrom(const py::iterable& keys) {
  std::vector<BlockKey> list;
  for (py::handle k : keys) list.push_back(KeyFrom(k));
  return list;
}

py::list KeysTo(const std::vector<BlockKey>& keys) {
  py::list out;
  for (const BlockKey& k : keys) out.append(KeyTo(k));
  return out;
}

// Token ids from any sequence of ints, or a buffer of uint32/int32/int64.
std::vector<uint32_t> TokensFrom(const py::handle& tokens) {
  std::vector<uint32_t> out;
  if (PyObject_CheckBuffer(tokens.ptr()) && !py::isinstance<py::bytes>(tokens)) {
    py::buffer_info info = py::reinterpret_borrow<py::buffer>(tokens).request();
    if (info.ndim != 1) throw StatusError{absl::InvalidArgumentError("tokens must be 1-D")};
    out.resize(info.shape[0]);
    const char* base = static_cast<const char*>(info.ptr);
    for (py::ssize_t i = 0; i < info.shape[0]; ++i) {
      const char* at = base + i * info.strides[0];
      if (info.itemsize == 4) {
        uint32_t v;
        std::memcpy(&v, at, 4);
        out[i] = v;
      } else if (info.itemsize == 8) {
        int64_t v;
        std::memcpy(&v, at, 8);
        out[i] = static_cast<uint32_t>(v);
      } else {
        throw StatusError{absl::InvalidArgumentError("token buffer items must be 4 or 8 bytes")};
      }
    }
    return out;
  }
  if (py::hasattr(tokens, "tolist")) return py::cast<std::vector<uint32_t>>(tokens.attr("tolist")());
  return py::cast<std::vector<uint32_t>>(tokens);
}

// Namespace.keys and ClusterNamespace.keys: `ns`'s chained keys of `tokens`.
template <typename Ns>
py::list ChainedKeys(const Ns& ns, const py::handle& tokens, const std::optional<py::bytes>& parent) {
  std::vector<uint32_t> ids = TokensFrom(tokens);
  BlockKey start = parent.has_value() ? KeyFrom(*parent) : BlockKey{};
  std::vector<BlockKey> keys;
  {
    py::gil_scoped_release release;
    keys = ns.Keys(ids, start);
  }
  return KeysTo(keys);
}

// The client options Client and Cluster take alike.
client::ClientOptions ClientOptionsFrom(double timeout, const std::string& ucx_transports,
                                        bool verify_checksums, const std::string& token) {
  client::ClientOptions options;
  options.timeout = absl::Seconds(timeout);
  options.ucx_transports = ucx_transports;
  options.verify_checksums = verify_checksums;
  options.auth_token = token;
  return options;
}

// open_namespace's keyword arguments (Client and Cluster) as a NamespaceSpec.
v1::NamespaceSpec NamespaceSpecFrom(const std::string& tenant, const std::string& model, int dtype,
                                    uint32_t num_layers, uint32_t num_kv_heads, uint32_t head_dim,
                                    uint32_t tokens_per_block, uint32_t tp_rank, uint32_t tp_size,
                                    uint64_t block_bytes, const std::string& coarsest_format) {
  v1::NamespaceSpec spec;
  spec.set_coarsest_format(ParseCoarsestFormat(coarsest_format));
  spec.set_tenant(tenant);
  spec.set_model(model);
  spec.set_dtype(static_cast<v1::DType>(dtype));
  spec.set_num_layers(num_layers);
  spec.set_num_kv_heads(num_kv_heads);
  spec.set_head_dim(head_dim);
  spec.set_tokens_per_block(tokens_per_block);
  spec.set_tp_rank(tp_rank);
  spec.set_tp_size(tp_size);
  spec.set_block_bytes(block_bytes);
  return spec;
}

// Where an object's bytes are: the buffer protocol (numpy, bytearray,
// memoryview), a torch tensor's data_ptr, or __dlpack__ (contiguous; CUDA
// memory only in CUDA builds). MemoryOf may replace `object` with what must
// stay alive for the memory to.
struct Memory {
  void* data = nullptr;
  size_t size = 0;
  bool read_only = false;
  bool device = false;  // CUDA memory: registered as MemoryKind::kDevice, staged by the client
};

// DLPack's ABI (dlpack.h v0.x, which every producer speaks), declared here
// because Debian ships no dlpack header.
struct DLDevice {
  int32_t device_type;  // 1 CPU, 2 CUDA, 3 CUDA host (pinned)
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

// Memory of an object exporting __dlpack__. The capsule is left unconsumed
// and kept alive by the caller (it owns the producer's reference), so its
// destructor releases the tensor once the registration is gone.
Memory DlpackMemory(const py::object& capsule) {
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) throw py::error_already_set();
  const DLTensor& t = managed->dl_tensor;
  const bool cuda = t.device.device_type == 2;
#ifndef KVSTRATA_PYTHON_CUDA
  if (cuda) throw StatusError{absl::UnimplementedError("CUDA tensors need a kvstrata built with CUDA")};
#endif
  if (t.device.device_type != 1 && t.device.device_type != 3 && !cuda) {
    throw StatusError{absl::UnimplementedError("unsupported DLPack device")};
  }
  size_t elements = 1;
  int64_t expected = 1;
  bool compact = true;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.strides != nullptr && t.shape[i] > 1 && t.strides[i] != expected) compact = false;
    expected *= t.shape[i];
    elements *= static_cast<size_t>(t.shape[i]);
  }
  if (!compact) throw StatusError{absl::InvalidArgumentError("tensor must be contiguous")};
  Memory m;
  m.data = static_cast<uint8_t*>(t.data) + t.byte_offset;
  m.size = elements * ((t.dtype.bits * t.dtype.lanes + 7) / 8);
  m.device = cuda;
  return m;
}

// Where an object's memory is, without touching it: ("cuda", id) for CUDA
// device memory, ("cpu", 0) otherwise. DLPack's __dlpack_device__ first
// (torch, cupy, jax all have it; 2 is kDLCUDA, 13 kDLCUDAManaged), then
// torch's is_cuda/device.index.
std::pair<std::string, int> DeviceOf(const py::object& object) {
  if (py::hasattr(object, "__dlpack_device__")) {
    auto [type, id] = py::cast<std::pair<int, int>>(object.attr("__dlpack_device__")());
    if (type == 2 || type == 13) return {"cuda", id};
    return {"cpu", 0};
  }
  if (py::hasattr(object, "is_cuda") && py::cast<bool>(object.attr("is_cuda"))) {
    py::object device = object.attr("device");
    const int id = py::hasattr(device, "index") && !device.attr("index").is_none()
                       ? py::cast<int>(device.attr("index"))
                       : 0;
    return {"cuda", id};
  }
  return {"cpu", 0};
}

Memory MemoryOf(py::object& object) {
  if (!PyObject_CheckBuffer(object.ptr()) && !py::hasattr(object, "data_ptr") &&
      py::hasattr(object, "__dlpack__")) {
    py::object capsule = object.attr("__dlpack__")();
    Memory m = DlpackMemory(capsule);
    object = py::make_tuple(object, capsule);  // the registration's owner keeps both
    return m;
  }
  if (py::hasattr(object, "data_ptr") && py::hasattr(object, "element_size")) {
    if (!py::cast<bool>(object.attr("is_contiguous")())) {
      throw StatusError{absl::InvalidArgumentError("tensor must be contiguous")};
    }
    const bool cuda = DeviceOf(object).first == "cuda";
#ifndef KVSTRATA_PYTHON_CUDA
    if (cuda) {
      throw StatusError{absl::UnimplementedError("CUDA tensors need a kvstrata built with CUDA")};
    }
#endif
    Memory m;
    m.data = reinterpret_cast<void*>(py::cast<uintptr_t>(object.attr("data_ptr")()));
    m.size = py::cast<size_t>(object.attr("numel")()) * py::cast<size_t>(object.attr("element_size")());
    m.device = cuda;
    return m;
  }
  if (!PyObject_CheckBuffer(object.ptr())) {
    throw StatusError{absl::InvalidArgumentError(
        "expected an object with the buffer protocol or a torch tensor")};
  }
  Py_buffer view;
  if (PyObject_GetBuffer(object.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
    PyErr_Clear();  // numpy: "ndarray is not C-contiguous"
    throw StatusError{absl::InvalidArgumentError("buffer must be C-contiguous")};
  }
  Memory m{view.buf, static_cast<size_t>(view.len), view.readonly != 0};
  // The registration keeps `object` itself alive, which keeps the memory.
  PyBuffer_Release(&view);
  return m;
}

// A StatsResponse as {field name: value} (scalar fields).
py::dict StatsDict(const v1::StatsResponse& stats) {
    py::dict d;
    const google::protobuf::Reflection* reflection = stats.GetReflection();
    const google::protobuf::Descriptor* descriptor = stats.GetDescriptor();
    for (int i = 0; i < descriptor->field_count(); ++i) {
      const google::protobuf::FieldDescriptor* field = descriptor->field(i);
      if (field->is_repeated()) continue;
      switch (field->cpp_type()) {
        case google::protobuf::FieldDescriptor::CPPTYPE_UINT64:
          d[py::str(field->name())] = reflection->GetUInt64(stats, field);
          break;
        case google::protobuf::FieldDescriptor::CPPTYPE_UINT32:
          d[py::str(field->name())] = reflection->GetUInt32(stats, field);
          break;
        case google::protobuf::FieldDescriptor::CPPTYPE_INT64:
          d[py::str(field->name())] = reflection->GetInt64(stats, field);
          break;
        case google::protobuf::FieldDescriptor::CPPTYPE_STRING:
          d[py::str(field->name())] = reflection->GetString(stats, field);
          break;
        default:
          break;
      }
    }
    // Precision tiers: blocks and bytes per tier and stored format.
    py::list formats;
    for (const v1::FormatStats& f : stats.formats()) {
      py::dict entry;
      entry["tier"] = f.tier() == v1::TIER_NVME ? "nvme" : f.tier() == v1::TIER_HBM ? "hbm" : "dram";
      entry["format"] = StoredFormatName(static_cast<client::StoredFormat>(f.format()));
      entry["blocks"] = f.blocks();
      entry["stored_bytes"] = f.stored_bytes();
      formats.append(entry);
    }
    d["formats"] = formats;
    return d;
}

class PyClient;

// Registered memory: either ours (allocate) or a Python object's (register).
class PyBuffer {
 public:
  // `client` is the Client or Cluster the memory is registered with.
  PyBuffer(std::shared_ptr<void> client, std::unique_ptr<client::Buffer> buffer,
           py::object owner, bool read_only)
      : client_(std::move(client)), buffer_(std::move(buffer)), owner_(std::move(owner)),
        read_only_(read_only) {}
  ~PyBuffer() {
    buffer_.reset();  // deregisters before the client or the owner can go
  }
  bool device() const { return buffer_->kind() == client::MemoryKind::kDevice; }
  client::Buffer* get() const { return buffer_.get(); }
  size_t size() const { return buffer_->size(); }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(buffer_->data()); }
  bool read_only() const { return read_only_; }
  const py::object& owner() const { return owner_; }

 private:
  std::shared_ptr<void> client_;
  std::unique_ptr<client::Buffer> buffer_;
  py::object owner_;  // None for allocate()
  bool read_only_;
};

// The result of publish_async/fetch_async.
class PyFuture {
 public:
  PyFuture(std::future<absl::StatusOr<client::TransferResult>> future,
           std::vector<std::shared_ptr<PyBuffer>> keep)
      : future_(std::move(future)), keep_(std::move(keep)) {}
  ~PyFuture() {
    // The transfer uses the buffers: finish it before letting them go.
    if (future_.valid()) {
      py::gil_scoped_release release;
      future_.wait();
    }
  }
  bool done() const {
    if (!future_.valid()) return true;
    return future_.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
  }
  // The TransferResult; raises kvstrata.Error when the call failed. Repeatable.
  py::object wait(std::optional<double> timeout) {
    if (!result_.has_value()) {
      {
        py::gil_scoped_release release;
        if (timeout.has_value()) {
          if (future_.wait_for(std::chrono::duration<double>(*timeout)) !=
              std::future_status::ready) {
            py::gil_scoped_acquire acquire;
            throw StatusError{absl::DeadlineExceededError("transfer still running")};
          }
        }
        result_ = future_.get();
      }
      keep_.clear();
    }
    return py::cast(Check(*result_));
  }

 private:
  std::future<absl::StatusOr<client::TransferResult>> future_;
  std::vector<std::shared_ptr<PyBuffer>> keep_;
  std::optional<absl::StatusOr<client::TransferResult>> result_;
};

// publish/fetch: publish_async/fetch_async's future, waited for.
client::TransferResult WaitResult(std::unique_ptr<PyFuture> future) {
  return py::cast<client::TransferResult>(future->wait(std::nullopt));
}

// `object`'s memory registered with `owner` (a Client or a Cluster).
template <typename Owner>
std::shared_ptr<PyBuffer> RegisterWith(const std::shared_ptr<Owner>& owner, py::object object) {
  Memory m = MemoryOf(object);
  if (m.size == 0) throw StatusError{absl::InvalidArgumentError("cannot register 0 bytes")};
  absl::StatusOr<std::unique_ptr<client::Buffer>> buffer;
  if constexpr (std::is_same_v<Owner, client::Client>) {
    py::gil_scoped_release release;
    buffer = owner->Register(m.data, m.size,
                             m.device ? client::MemoryKind::kDevice : client::MemoryKind::kHost);
  } else {
    if (m.device) {
      throw StatusError{absl::UnimplementedError(
          "CUDA memory takes a kvstrata.Client (a Cluster stages only host memory yet)")};
    }
    py::gil_scoped_release release;
    buffer = owner->Register(m.data, m.size);
  }
  return std::make_shared<PyBuffer>(owner, Check(std::move(buffer)), object, m.read_only);
}

// `size` bytes allocated and registered by `owner`.
template <typename Owner>
std::shared_ptr<PyBuffer> AllocateWith(const std::shared_ptr<Owner>& owner, size_t size,
                                       bool device = false) {
  absl::StatusOr<std::unique_ptr<client::Buffer>> buffer;
  if constexpr (std::is_same_v<Owner, client::Client>) {
    py::gil_scoped_release release;
    buffer = owner->Allocate(size, device ? client::MemoryKind::kDevice : client::MemoryKind::kHost);
  } else {
    py::gil_scoped_release release;
    buffer = owner->Allocate(size);
  }
  return std::make_shared<PyBuffer>(owner, Check(std::move(buffer)), py::none(), false);
}

// The buffers an item list names: a registered Buffer as it is, any other
// object registered with `owner` (a Client or a Cluster) for this call only,
// once however many items name it. `kept` holds them for the call's future.
template <typename Owner>
class ItemBuffers {
 public:
  explicit ItemBuffers(std::shared_ptr<Owner> owner) : owner_(std::move(owner)) {}

  std::shared_ptr<PyBuffer> For(const py::handle& object) {
    std::shared_ptr<PyBuffer> buffer = Find(object);
    kept.push_back(buffer);
    return buffer;
  }

  std::vector<std::shared_ptr<PyBuffer>> kept;

 private:
  std::shared_ptr<PyBuffer> Find(const py::handle& object) {
    if (py::isinstance<PyBuffer>(object)) return py::cast<std::shared_ptr<PyBuffer>>(object);
    auto it = made_.find(object.ptr());
    if (it != made_.end()) return it->second;
    auto registered = RegisterWith(owner_, py::reinterpret_borrow<py::object>(object));
    made_.emplace(object.ptr(), registered);
    return registered;
  }

  std::shared_ptr<Owner> owner_;
  std::unordered_map<PyObject*, std::shared_ptr<PyBuffer>> made_;
};

// (key, parent or None, buffer, offset) tuples.
template <typename Owner>
std::vector<client::PublishItem> PublishItemsFrom(const py::iterable& items,
                                                  ItemBuffers<Owner>& buffers) {
  std::vector<client::PublishItem> list;
  for (py::handle handle : items) {
    py::tuple item = py::reinterpret_borrow<py::tuple>(handle);
    if (item.size() != 4) {
      throw StatusError{absl::InvalidArgumentError("publish items are (key, parent, buffer, offset)")};
    }
    client::PublishItem p;
    p.key = KeyFrom(item[0]);
    if (!item[1].is_none()) p.parent = KeyFrom(item[1]);
    p.buffer = buffers.For(item[2])->get();
    p.offset = py::cast<size_t>(item[3]);
    list.push_back(p);
  }
  return list;
}

// (key, buffer, offset) tuples; the buffers must be writable.
template <typename Owner>
std::vector<client::FetchItem> FetchItemsFrom(const py::iterable& items,
                                              ItemBuffers<Owner>& buffers) {
  std::vector<client::FetchItem> list;
  for (py::handle handle : items) {
    py::tuple item = py::reinterpret_borrow<py::tuple>(handle);
    if (item.size() != 3) {
      throw StatusError{absl::InvalidArgumentError("fetch items are (key, buffer, offset)")};
    }
    std::shared_ptr<PyBuffer> buffer = buffers.For(item[1]);
    if (buffer->read_only()) {
      throw StatusError{absl::InvalidArgumentError("fetch into a read-only buffer")};
    }
    client::FetchItem f;
    f.key = KeyFrom(item[0]);
    f.buffer = buffer->get();
    f.offset = py::cast<size_t>(item[2]);
    list.push_back(f);
  }
  return list;
}

class PyNamespace {
 public:
  PyNamespace(std::shared_ptr<client::Client> client, client::Namespace ns)
      : client_(std::move(client)), ns_(ns) {}

  uint64_t id() const { return ns_.id(); }
  uint64_t block_bytes() const { return ns_.block_bytes(); }
  uint32_t tokens_per_block() const { return ns_.tokens_per_block(); }

  py::list Keys(const py::handle& tokens, const std::optional<py::bytes>& parent) const {
    return ChainedKeys(ns_, tokens, parent);
  }

  size_t Lookup(const py::iterable& keys, std::optional<double> timeout) {
    return LookupResult(keys, timeout).prefix_length;
  }

  // The tier of each block of the cached prefix: "dram", "nvme" or "hbm".
  std::vector<std::string> LookupTiers(const py::iterable& keys, std::optional<double> timeout) {
    std::vector<std::string> tiers;
    for (client::Tier tier : LookupResult(keys, timeout).tiers) {
      tiers.push_back(tier == client::Tier::kNvme ? "nvme" : tier == client::Tier::kHbm ? "hbm" : "dram");
    }
    return tiers;
  }

  client::LookupResult LookupResult(const py::iterable& keys, std::optional<double> timeout) {
    std::vector<BlockKey> list = KeysFrom(keys);
    absl::StatusOr<client::LookupResult> result;
    {
      py::gil_scoped_release release;
      result = ns_.Lookup(list, Timeout(timeout));
    }
    return Check(std::move(result));
  }

  size_t Delete(const py::iterable& keys, std::optional<double> timeout) {
    std::vector<BlockKey> list = KeysFrom(keys);
    absl::StatusOr<size_t> result;
    {
      py::gil_scoped_release release;
      result = ns_.Delete(list, Timeout(timeout));
    }
    return Check(std::move(result));
  }

  bool RequestFinished(const py::handle& last_key, uint32_t output_tokens,
                       std::optional<double> timeout) {
    const BlockKey key = KeyFrom(last_key);
    absl::StatusOr<bool> known;
    {
      py::gil_scoped_release release;
      known = ns_.RequestFinished(key, output_tokens, Timeout(timeout));
    }
    return Check(std::move(known));
  }

  // Frees the namespace's slot on the node (tenant namespace quotas).
  void Close(std::optional<double> timeout) {
    absl::Status closed;
    {
      py::gil_scoped_release release;
      closed = ns_.Close(Timeout(timeout));
    }
    Check(closed);
  }

  // items: (key, parent or None, buffer, offset)
  std::unique_ptr<PyFuture> PublishAsync(const py::iterable& items, std::optional<double> timeout);
  // items: (key, buffer, offset)
  std::unique_ptr<PyFuture> FetchAsync(const py::iterable& items, std::optional<double> timeout);

  client::TransferResult Publish(const py::iterable& items, std::optional<double> timeout) {
    return WaitResult(PublishAsync(items, timeout));
  }
  client::TransferResult Fetch(const py::iterable& items, std::optional<double> timeout) {
    return WaitResult(FetchAsync(items, timeout));
  }

 private:
  std::shared_ptr<client::Client> client_;
  client::Namespace ns_;
};

class PyClient : public std::enable_shared_from_this<PyClient> {
 public:
  explicit PyClient(std::shared_ptr<client::Client> client) : client_(std::move(client)) {}

  static std::shared_ptr<PyClient> Connect(const std::string& address, double timeout,
                                           const std::string& ucx_transports,
                                           bool verify_checksums, const std::string& token) {
    client::ClientOptions options =
        ClientOptionsFrom(timeout, ucx_transports, verify_checksums, token);
    options.node_address = address;
    absl::StatusOr<std::unique_ptr<client::Client>> made;
    {
      py::gil_scoped_release release;
      made = client::Client::Connect(options);
    }
    return std::make_shared<PyClient>(std::shared_ptr<client::Client>(Check(std::move(made))));
  }

  PyNamespace OpenNamespace(const std::string& tenant, const std::string& model, int dtype,
                            uint32_t num_layers, uint32_t num_kv_heads, uint32_t head_dim,
                            uint32_t tokens_per_block, uint32_t tp_rank, uint32_t tp_size,
                            uint64_t block_bytes, const std::string& coarsest_format,
                            std::optional<double> timeout) {
    const v1::NamespaceSpec spec =
        NamespaceSpecFrom(tenant, model, dtype, num_layers, num_kv_heads, head_dim,
                          tokens_per_block, tp_rank, tp_size, block_bytes, coarsest_format);
    absl::StatusOr<client::Namespace> ns;
    {
      py::gil_scoped_release release;
      ns = client_->OpenNamespace(spec, Timeout(timeout));
    }
    return PyNamespace(client_, Check(std::move(ns)));
  }

  std::shared_ptr<PyBuffer> Register(py::object object) { return RegisterWith(client_, object); }
  std::shared_ptr<PyBuffer> Allocate(size_t size, bool device) {
    return AllocateWith(client_, size, device);
  }

  py::dict Stats(std::optional<double> timeout) {
    v1::StatsResponse stats;
    absl::Status status;
    {
      py::gil_scoped_release release;
      status = client_->Stats(&stats, Timeout(timeout));
    }
    Check(status);
    return StatsDict(stats);
  }

  void Ping(std::optional<double> timeout) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      status = client_->Ping(Timeout(timeout));
    }
    Check(status);
  }

 private:
  std::shared_ptr<client::Client> client_;
};

std::unique_ptr<PyFuture> PyNamespace::PublishAsync(const py::iterable& items,
                                                    std::optional<double> timeout) {
  ItemBuffers<client::Client> buffers(client_);
  std::vector<client::PublishItem> list = PublishItemsFrom(items, buffers);
  std::future<absl::StatusOr<client::TransferResult>> future;
  {
    py::gil_scoped_release release;
    future = ns_.PublishAsync(std::move(list), Timeout(timeout));
  }
  return std::make_unique<PyFuture>(std::move(future), std::move(buffers.kept));
}

std::unique_ptr<PyFuture> PyNamespace::FetchAsync(const py::iterable& items,
                                                  std::optional<double> timeout) {
  ItemBuffers<client::Client> buffers(client_);
  std::vector<client::FetchItem> list = FetchItemsFrom(items, buffers);
  std::future<absl::StatusOr<client::TransferResult>> future;
  {
    py::gil_scoped_release release;
    future = ns_.FetchAsync(std::move(list), Timeout(timeout));
  }
  return std::make_unique<PyFuture>(std::move(future), std::move(buffers.kept));
}


// kvstrata.Cluster: many nodes as one cache (client/include/kvstrata/client/cluster.h),
// with the namespace API of a single node's Client. Per-call timeouts are
// accepted for the same signatures; the cluster's own `timeout` bounds each
// node's RPC. Blocking calls release the GIL; *_async run the call on a
// thread of their own.
class PyClusterNamespace {
 public:
  PyClusterNamespace(std::shared_ptr<client::Cluster> cluster, client::ClusterNamespace ns,
                     uint32_t tokens_per_block)
      : cluster_(std::move(cluster)), ns_(ns), tokens_per_block_(tokens_per_block) {}

  uint64_t block_bytes() const { return ns_.block_bytes(); }
  uint32_t tokens_per_block() const { return tokens_per_block_; }

  py::list Keys(const py::handle& tokens, const std::optional<py::bytes>& parent) const {
    return ChainedKeys(ns_, tokens, parent);
  }

  size_t Lookup(const py::iterable& keys, std::optional<double> /*timeout*/) {
    std::vector<BlockKey> list = KeysFrom(keys);
    absl::StatusOr<client::LookupResult> result;
    {
      py::gil_scoped_release release;
      result = ns_.Lookup(list);
    }
    return Check(std::move(result)).prefix_length;
  }

  bool RequestFinished(const py::handle& last_key, uint32_t output_tokens,
                       std::optional<double> /*timeout*/) {
    const BlockKey key = KeyFrom(last_key);
    absl::StatusOr<bool> known;
    {
      py::gil_scoped_release release;
      known = ns_.RequestFinished(key, output_tokens);
    }
    return Check(std::move(known));
  }

  std::unique_ptr<PyFuture> PublishAsync(const py::iterable& items, std::optional<double>) {
    ItemBuffers<client::Cluster> buffers(cluster_);
    std::vector<client::PublishItem> list = PublishItemsFrom(items, buffers);
    auto run = [cluster = cluster_, ns = ns_, list = std::move(list)]() mutable {
      return ns.Publish(list);
    };
    py::gil_scoped_release release;
    return std::make_unique<PyFuture>(std::async(std::launch::async, std::move(run)), std::move(buffers.kept));
  }

  std::unique_ptr<PyFuture> FetchAsync(const py::iterable& items, std::optional<double>) {
    ItemBuffers<client::Cluster> buffers(cluster_);
    std::vector<client::FetchItem> list = FetchItemsFrom(items, buffers);
    auto run = [cluster = cluster_, ns = ns_, list = std::move(list)]() mutable {
      return ns.Fetch(list);
    };
    py::gil_scoped_release release;
    return std::make_unique<PyFuture>(std::async(std::launch::async, std::move(run)), std::move(buffers.kept));
  }

  client::TransferResult Publish(const py::iterable& items, std::optional<double> timeout) {
    return WaitResult(PublishAsync(items, timeout));
  }
  client::TransferResult Fetch(const py::iterable& items, std::optional<double> timeout) {
    return WaitResult(FetchAsync(items, timeout));
  }

 private:
  std::shared_ptr<client::Cluster> cluster_;
  client::ClusterNamespace ns_;
  uint32_t tokens_per_block_;
};

class PyCluster {
 public:
  explicit PyCluster(std::shared_ptr<client::Cluster> cluster) : cluster_(std::move(cluster)) {}

  static std::shared_ptr<PyCluster> Connect(const std::vector<std::string>& nodes,
                                            const std::string& dns, int replication,
                                            double timeout, const std::string& ucx_transports,
                                            bool verify_checksums, double refresh_interval,
                                            const std::string& token) {
    client::ClusterOptions options;
    options.client = ClientOptionsFrom(timeout, ucx_transports, verify_checksums, token);
    options.nodes = nodes;
    options.dns = dns;
    options.replication = replication;
    options.refresh_interval = absl::Seconds(refresh_interval);
    absl::StatusOr<std::unique_ptr<client::Cluster>> made;
    {
      py::gil_scoped_release release;
      made = client::Cluster::Connect(options);
    }
    return std::make_shared<PyCluster>(std::shared_ptr<client::Cluster>(Check(std::move(made))));
  }

  PyClusterNamespace OpenNamespace(const std::string& tenant, const std::string& model, int dtype,
                                   uint32_t num_layers, uint32_t num_kv_heads, uint32_t head_dim,
                                   uint32_t tokens_per_block, uint32_t tp_rank, uint32_t tp_size,
                                   uint64_t block_bytes, const std::string& coarsest_format,
                                   std::optional<double> /*timeout*/) {
    const v1::NamespaceSpec spec =
        NamespaceSpecFrom(tenant, model, dtype, num_layers, num_kv_heads, head_dim,
                          tokens_per_block, tp_rank, tp_size, block_bytes, coarsest_format);
    absl::StatusOr<client::ClusterNamespace> ns;
    {
      py::gil_scoped_release release;
      ns = cluster_->OpenNamespace(spec);
    }
    return PyClusterNamespace(cluster_, Check(std::move(ns)), tokens_per_block);
  }

  std::shared_ptr<PyBuffer> Register(py::object object) { return RegisterWith(cluster_, object); }
  std::shared_ptr<PyBuffer> Allocate(size_t size) { return AllocateWith(cluster_, size); }

  py::list Nodes() {
    std::vector<client::NodeStatus> nodes;
    {
      py::gil_scoped_release release;
      nodes = cluster_->Nodes();
    }
    py::list out;
    for (const client::NodeStatus& n : nodes) {
      py::dict d;
      d["address"] = n.address;
      d["healthy"] = n.healthy;
      d["draining"] = n.draining;
      out.append(d);
    }
    return out;
  }

  void Refresh() {
    py::gil_scoped_release release;
    cluster_->Refresh();
  }

  // The repairer's counters (cluster.h RepairStats); times in seconds.
  py::dict Repairs() {
    const client::RepairStats r = cluster_->Repairs();
    py::dict d;
    d["repaired_blocks"] = r.repaired_blocks;
    d["repaired_bytes"] = r.repaired_bytes;
    d["queued_on_read"] = r.queued_on_read;
    d["pending_blocks"] = r.pending_blocks;
    d["dropped_blocks"] = r.dropped_blocks;
    d["failed_blocks"] = r.failed_blocks;
    d["passes"] = r.passes;
    d["passes_requested"] = r.passes_requested;
    d["last_pass_end"] = r.passes == 0 ? py::object(py::none())
                                       : py::object(py::float_(absl::ToUnixMicros(r.last_pass_end) / 1e6));
    d["last_pass_seconds"] = absl::ToDoubleSeconds(r.last_pass_duration);
    return d;
  }

  void Drain(const std::string& address, bool draining) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      status = cluster_->Drain(address, draining);
    }
    Check(status);
  }

  // One node's Stats; without an address, the sum over the healthy nodes of
  // every counter (strings from the first).
  py::dict Stats(const std::optional<std::string>& address, std::optional<double> /*timeout*/) {
    std::vector<std::string> addresses;
    if (address.has_value()) {
      addresses.push_back(*address);
    } else {
      for (const client::NodeStatus& n : cluster_->Nodes()) {
        if (n.healthy) addresses.push_back(n.address);
      }
      if (addresses.empty()) throw StatusError{absl::UnavailableError("no cache node answers")};
    }
    py::dict total;
    for (const std::string& a : addresses) {
      v1::StatsResponse stats;
      absl::Status status;
      {
        py::gil_scoped_release release;
        status = cluster_->Stats(a, &stats);
      }
      Check(status);
      py::dict one = StatsDict(stats);
      for (auto item : one) {
        if (!total.contains(item.first)) {
          total[item.first] = item.second;
        } else if (!py::isinstance<py::str>(item.second)) {
          py::object sum = py::object(total[item.first]).attr("__add__")(item.second);
          total[item.first] = sum;
        }
      }
    }
    return total;
  }

  // Succeeds when at least one node answers a health check now.
  void Ping(std::optional<double> /*timeout*/) {
    bool any = false;
    {
      py::gil_scoped_release release;
      cluster_->Refresh();
      for (const client::NodeStatus& n : cluster_->Nodes()) any = any || n.healthy;
    }
    if (!any) throw StatusError{absl::UnavailableError("no cache node answers")};
  }

 private:
  std::shared_ptr<client::Cluster> cluster_;
};

// The calls Namespace and ClusterNamespace share, with the same signatures.
template <typename Ns>
void DefNamespaceCalls(py::class_<Ns>& ns) {
  ns.def_property_readonly("block_bytes", &Ns::block_bytes)
      .def_property_readonly("tokens_per_block", &Ns::tokens_per_block)
      .def("keys", &Ns::Keys, py::arg("tokens"), py::arg("parent") = py::none())
      .def("lookup", &Ns::Lookup, py::arg("keys"), py::arg("timeout") = py::none())
      .def("request_finished", &Ns::RequestFinished, py::arg("last_key"),
           py::arg("output_tokens"), py::arg("timeout") = py::none(),
           "Hints the node that the request whose prompt ended with block last_key finished, "
           "generating output_tokens tokens (for its eviction policies). True when the node "
           "holds the block.")
      .def("publish", &Ns::Publish, py::arg("items"), py::arg("timeout") = py::none())
      .def("fetch", &Ns::Fetch, py::arg("items"), py::arg("timeout") = py::none())
      .def("publish_async", &Ns::PublishAsync, py::arg("items"), py::arg("timeout") = py::none())
      .def("fetch_async", &Ns::FetchAsync, py::arg("items"), py::arg("timeout") = py::none());
}

// open_namespace (Client and Cluster): NamespaceSpecFrom's fields as keywords.
template <typename Owner>
void DefOpenNamespace(py::class_<Owner, std::shared_ptr<Owner>>& owner) {
  owner.def("open_namespace", &Owner::OpenNamespace, py::kw_only(), py::arg("tenant") = "",
            py::arg("model") = "", py::arg("dtype") = 0, py::arg("num_layers") = 0,
            py::arg("num_kv_heads") = 0, py::arg("head_dim") = 0,
            py::arg("tokens_per_block") = 256, py::arg("tp_rank") = 0, py::arg("tp_size") = 1,
            py::arg("block_bytes") = 0, py::arg("coarsest_format") = "",
            py::arg("timeout") = py::none());
}

}  // namespace

PYBIND11_MODULE(_kvstrata, m) {
  m.doc() = "kvstrata client (C++ binding); use the `kvstrata` package.";

  // kvstrata.Error(message) with .code (absl/gRPC status code) and .code_name.
  static py::exception<StatusError> error(m, "Error", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      py::object type = py::reinterpret_borrow<py::object>(error.ptr());
      py::object instance = type(py::str(std::string(e.status.message())));
      instance.attr("code") = static_cast<int>(e.status.code());
      instance.attr("code_name") = absl::StatusCodeToString(e.status.code());
      PyErr_SetObject(error.ptr(), instance.ptr());
    }
  });

  py::enum_<BlockOutcome>(m, "Outcome")
      .value("OK", BlockOutcome::kOk)
      .value("ALREADY_PRESENT", BlockOutcome::kAlreadyPresent)
      .value("NOT_FOUND", BlockOutcome::kNotFound)
      .value("CHECKSUM_MISMATCH", BlockOutcome::kChecksumMismatch)
      .value("NO_SPACE", BlockOutcome::kNoSpace)
      .value("TRANSFER_FAILED", BlockOutcome::kTransferFailed)
      .value("REJECTED", BlockOutcome::kRejected);

  py::class_<client::TransferResult>(m, "TransferResult")
      .def_readonly("outcomes", &client::TransferResult::outcomes)
      // Fetch: each block's stored format at the node ("raw", "fp8_e4m3",
      // "int8", "int4_kivi", "int2_kivi"). Blocks of a raw namespace that a
      // precision tier transcoded arrive decoded to its dtype; this says
      // how lossy they are.
      .def_property_readonly("formats", [](const client::TransferResult& r) {
        std::vector<std::string> names;
        for (client::StoredFormat f : r.formats) names.push_back(StoredFormatName(f));
        return names;
      })
      .def_readonly("bytes", &client::TransferResult::bytes)
      .def("count", &client::TransferResult::count)
      .def("__repr__", [](const client::TransferResult& r) {
        return "TransferResult(blocks=" + std::to_string(r.outcomes.size()) +
               ", ok=" + std::to_string(r.count(BlockOutcome::kOk)) +
               ", bytes=" + std::to_string(r.bytes) + ")";
      });

  py::class_<PyBuffer, std::shared_ptr<PyBuffer>>(m, "Buffer", py::buffer_protocol())
      .def_property_readonly("size", &PyBuffer::size)
      .def_property_readonly("address", &PyBuffer::address)
      .def_property_readonly("owner", &PyBuffer::owner)
      .def_property_readonly("device", &PyBuffer::device,
                             "True for CUDA memory (no buffer protocol: the host cannot read it)")
      .def("__len__", &PyBuffer::size)
      .def_buffer([](PyBuffer& b) {
        if (b.device()) {
          throw StatusError{absl::InvalidArgumentError(
              "a device buffer's memory is on the GPU: read it with torch, not memoryview")};
        }
        return py::buffer_info(b.get()->data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1}, b.read_only());
      });

  py::class_<PyFuture>(m, "Future")
      .def("done", &PyFuture::done)
      .def("wait", &PyFuture::wait, py::arg("timeout") = py::none());

  py::class_<PyNamespace> ns(m, "Namespace");
  DefNamespaceCalls(ns);
  ns.def_property_readonly("id", &PyNamespace::id)
      .def("lookup_tiers", &PyNamespace::LookupTiers, py::arg("keys"), py::arg("timeout") = py::none())
      .def("delete", &PyNamespace::Delete, py::arg("keys"), py::arg("timeout") = py::none())
      .def("close", &PyNamespace::Close, py::arg("timeout") = py::none());

  py::class_<PyClient, std::shared_ptr<PyClient>> client(m, "Client");
  DefOpenNamespace(client);
  client
      .def(py::init(&PyClient::Connect), py::arg("address") = "127.0.0.1:50151",
           py::arg("timeout") = 30.0, py::arg("ucx_transports") = "",
           py::arg("verify_checksums") = true, py::arg("token") = "")
      .def("register", &PyClient::Register, py::arg("memory"))
      .def("allocate", &PyClient::Allocate, py::arg("size"), py::kw_only(),
           py::arg("device") = false,
           "Registered memory of size bytes; device=True: on the client's GPU (CUDA builds)")
      .def("stats", &PyClient::Stats, py::arg("timeout") = py::none())
      .def("ping", &PyClient::Ping, py::arg("timeout") = py::none());


  py::class_<PyClusterNamespace> cluster_ns(m, "ClusterNamespace");
  DefNamespaceCalls(cluster_ns);

  py::class_<PyCluster, std::shared_ptr<PyCluster>> cluster(m, "Cluster");
  DefOpenNamespace(cluster);
  cluster
      .def(py::init(&PyCluster::Connect), py::kw_only(),
           py::arg("nodes") = std::vector<std::string>{}, py::arg("dns") = "",
           py::arg("replication") = 1, py::arg("timeout") = 30.0, py::arg("ucx_transports") = "",
           py::arg("verify_checksums") = true, py::arg("refresh_interval") = 2.0,
           py::arg("token") = "")
      .def("register", &PyCluster::Register, py::arg("memory"))
      .def("allocate", &PyCluster::Allocate, py::arg("size"))
      .def("nodes", &PyCluster::Nodes)
      .def("refresh", &PyCluster::Refresh)
      .def("repairs", &PyCluster::Repairs)
      .def("drain", &PyCluster::Drain, py::arg("address"), py::arg("draining") = true)
      .def("stats", &PyCluster::Stats, py::arg("address") = py::none(), py::arg("timeout") = py::none())
      .def("ping", &PyCluster::Ping, py::arg("timeout") = py::none());

  m.def(
      "device_of", [](const py::object& object) { return DeviceOf(object); }, py::arg("memory"),
      "Where memory is, without touching it: ('cuda', index) for CUDA memory (by "
      "__dlpack_device__, else torch's is_cuda), ('cpu', 0) otherwise. register() and the "
      "items of publish/fetch take CUDA memory as device buffers, staged by the client.");
#ifdef KVSTRATA_PYTHON_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif

  m.def(
      "keys",
      [](uint64_t namespace_id, const py::handle& tokens, uint32_t tokens_per_block,
         const std::optional<py::bytes>& parent) {
        std::vector<uint32_t> ids = TokensFrom(tokens);
        BlockKey start = parent.has_value() ? KeyFrom(*parent) : BlockKey{};
        if (tokens_per_block == 0) {
          throw StatusError{absl::InvalidArgumentError("tokens_per_block must be >= 1")};
        }
        std::vector<BlockKey> keys;
        {
          py::gil_scoped_release release;
          keys = ComputeBlockKeys(namespace_id, ids, tokens_per_block, start);
        }
        return KeysTo(keys);
      },
      py::arg("namespace_id"), py::arg("tokens"), py::arg("tokens_per_block"),
      py::arg("parent") = py::none(),
      "Chained block keys (DESIGN.md §3) of every full block of `tokens`.");
}

}  // namespace kvstrata::python
