// Requests over UCX active messages: a control path beside gRPC for small
// operations, one UCX message each way on the endpoint a client already has
// to the node's worker.
//
// A client calls Peer::Call (engine.h): its header and data travel as one
// active message; the server's handler (ServeActiveMessages) runs on the
// server's UCX progress thread, and answers with AmRequest::Reply, one
// active message back on the endpoint the request came in on. Data goes
// eagerly when small and by rendezvous when not (UCX decides by size and
// transport); a rendezvous request's data moves only if the handler asks for
// it (AmRequest::ReceiveData), so a handler that needs none of it (every
// block already stored) moves no bytes.
//
// The transfer layer frames each message with a call id and nothing else:
// what the header means, and every check of it, is the caller's.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "kvstrata/transfer/engine.h"

namespace kvstrata::transfer {

// What Peer::Call returns: the handler's reply header and its data.
struct AmReply {
  std::string header;
  std::shared_ptr<uint8_t[]> data;  // null when the data went to reply_into
  size_t data_length = 0;
  bool data_in_place = false;  // the data is at AmCallSpec::reply_into
};

// One request of Peer::CallMany.
struct AmCallSpec {
  std::string header;
  std::vector<SendOp> data;
  // Where the reply's data goes when it is exactly `reply_capacity` bytes
  // (one copy less; AmReply::data_in_place), else into memory the reply
  // owns. Must stay valid until CallMany returns, which it never does while
  // data is being written there (a call given up at its deadline waits for
  // a receive already under way, at most 30 s, as tagged receives do).
  uint8_t* reply_into = nullptr;
  size_t reply_capacity = 0;
};

// One request, as its handler sees it. Header() and, for eager requests,
// EagerData() are valid until the handler returns; ReceiveData and Reply may
// be called later from any UCX callback of this engine (its progress thread)
// while the request object lives.
class AmRequest {
 public:
  virtual ~AmRequest() = default;
  virtual std::string_view header() const = 0;
  // Bytes of data the request carries.
  virtual size_t data_length() const = 0;
  // The data when it came with the header (eager), else null: then
  // ReceiveData fetches it, or dropping the request lets it go unmoved.
  virtual const uint8_t* eager_data() const = 0;
  // Receives the rendezvous data into `into` (data_length() bytes, kept
  // alive by the caller until it is over). Only once, and only when
  // eager_data() is null. When the receive is over at once (the data was
  // copied, or the client is already gone: common over shared memory) its
  // outcome is returned and `done` is never called; otherwise `done` runs
  // later on the progress thread. Why not call `done` at once: the handler
  // calling this usually holds locks that `done` takes too.
  virtual std::optional<absl::Status> ReceiveData(uint8_t* into,
                                                  std::function<void(absl::Status)> done) = 0;
  // Sends the reply (header, then `length` bytes at `data`). `keep_alive`
  // (holding `data`) is released when UCX is done with it. At most once.
  virtual void Reply(std::string header, const uint8_t* data, size_t length,
                     std::shared_ptr<void> keep_alive) = 0;
  // The UCX transport of the endpoint the request came in on ("tcp",
  // "cma", ...), as Peer::transport() says it; read once per endpoint.
  virtual std::string transport() const = 0;
};

// Runs `handler` for every request the engine's worker receives, on its
// progress thread: it must not block (it may hand the request on). Set it
// before clients may call; a null handler stops serving (requests are then
// dropped) and returns once no handler runs.
using AmHandler = std::function<void(std::shared_ptr<AmRequest>)>;
void ServeActiveMessages(Engine& engine, AmHandler handler);

}  // namespace kvstrata::transfer
