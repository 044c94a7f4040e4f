/* kvstrata C API: the client library's operations for C callers and FFI.
 *
 * Every function returning int returns 0 on success or a gRPC/absl status code
 * (1..16: e.g. 3 INVALID_ARGUMENT, 5 NOT_FOUND, 14 UNAVAILABLE); the message of
 * the calling thread's last failure is kvs_last_error(). Handles are safe to
 * share between threads; each must be destroyed exactly once, buffers before
 * the client that registered them.
 */
#ifndef KVSTRATA_KVSTRATA_H_
#define KVSTRATA_KVSTRATA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_client kvs_client;
typedef struct kvs_namespace kvs_namespace;
typedef struct kvs_buffer kvs_buffer;

typedef struct {
  uint8_t bytes[16];
} kvs_key;

enum kvs_dtype { KVS_DTYPE_FP16 = 1, KVS_DTYPE_BF16 = 2, KVS_DTYPE_FP32 = 3 };

typedef struct {
  const char* tenant;  /* may be NULL */
  const char* model;   /* may be NULL */
  int dtype;           /* enum kvs_dtype; 0 for opaque namespaces */
  uint32_t num_layers; /* 0: opaque namespace, block_bytes gives the size */
  uint32_t num_kv_heads;
  uint32_t head_dim;
  uint32_t tokens_per_block;
  uint32_t tp_rank;
  uint32_t tp_size;
  uint64_t block_bytes;
} kvs_namespace_spec;

/* Stored formats (kvstrata.v1.StoredFormat): a precision budget, and how a
 * fetched block was stored. */
enum kvs_stored_format {
  KVS_FORMAT_RAW = 0,
  KVS_FORMAT_FP8_E4M3 = 1,
  KVS_FORMAT_INT8 = 2,
  KVS_FORMAT_INT4_KIVI = 3,
  KVS_FORMAT_INT2_KIVI = 4
};

/* Per-block outcomes, as in kvstrata::client::BlockOutcome. */
enum kvs_block_outcome {
  KVS_BLOCK_OK = 0,
  KVS_BLOCK_ALREADY_PRESENT = 1,
  KVS_BLOCK_NOT_FOUND = 2,
  KVS_BLOCK_CHECKSUM_MISMATCH = 3,
  KVS_BLOCK_NO_SPACE = 4,
  KVS_BLOCK_TRANSFER_FAILED = 5,
  KVS_BLOCK_REJECTED = 6
};

typedef struct {
  kvs_key key;
  kvs_key parent;
  int has_parent; /* 0 for the first block of a prompt */
  size_t offset;  /* the block is buffer[offset, offset + block_bytes) */
} kvs_publish_item;

const char* kvs_last_error(void);

/* timeout_ms <= 0 means the library default (30 s). */
int kvs_connect(const char* node_address, int timeout_ms, kvs_client** out);
void kvs_client_destroy(kvs_client* client);

int kvs_open_namespace(kvs_client* client, const kvs_namespace_spec* spec, kvs_namespace** out);
/* The same with a precision budget (enum kvs_stored_format; KVS_FORMAT_RAW:
 * none): the node may keep cold blocks transcoded down to it instead of
 * evicting them. Needs a KV layout in fp16 or bf16. */
int kvs_open_namespace_with_budget(kvs_client* client, const kvs_namespace_spec* spec,
                                   int coarsest_format, kvs_namespace** out);
void kvs_namespace_destroy(kvs_namespace* ns);
/* Closes the namespace on the node (it counts against its tenant's namespace
 * quota); its blocks stay until evicted. Destroy the handle afterwards. The
 * bearer token of nodes run with --auth_file comes from KVSTRATA_TOKEN. */
int kvs_namespace_close(kvs_namespace* ns);
uint64_t kvs_namespace_id(const kvs_namespace* ns);
uint64_t kvs_block_bytes(const kvs_namespace* ns);

/* Registers caller memory, or allocates registered memory (kvs_buffer_data). */
int kvs_register(kvs_client* client, void* data, size_t size, kvs_buffer** out);
int kvs_allocate(kvs_client* client, size_t size, kvs_buffer** out);
/* The same for memory of the client's GPU (CUDA device 0; a cudaMalloc'd
 * pointer or a framework tensor's): publish and fetch stage its blocks
 * through pinned host memory. A pointer that is not device memory is
 * INVALID_ARGUMENT; a build without CUDA or a machine without the GPU fails
 * with a message saying so. kvs_buffer_data then returns a device address. */
int kvs_register_device(kvs_client* client, void* data, size_t size, kvs_buffer** out);
int kvs_allocate_device(kvs_client* client, size_t size, kvs_buffer** out);
void* kvs_buffer_data(const kvs_buffer* buffer);
void kvs_buffer_destroy(kvs_buffer* buffer);

/* Writes the keys of the full blocks of tokens[0..num_tokens) (at most
 * max_keys) and returns how many there are. parent may be NULL. */
size_t kvs_compute_keys(const kvs_namespace* ns, const uint32_t* tokens, size_t num_tokens,
                        const kvs_key* parent, kvs_key* keys, size_t max_keys);

int kvs_lookup(kvs_namespace* ns, const kvs_key* keys, size_t num_keys, size_t* prefix_length);
/* outcomes (may be NULL) receives one enum kvs_block_outcome per block. */
int kvs_publish(kvs_namespace* ns, const kvs_buffer* buffer, const kvs_publish_item* items,
                size_t count, int* outcomes);
int kvs_fetch(kvs_namespace* ns, kvs_buffer* buffer, const kvs_key* keys, const size_t* offsets,
              size_t count, int* outcomes);
/* kvs_fetch, and formats (may be NULL) receives each block's stored format at
 * the node (enum kvs_stored_format). A block of a namespace with a budget
 * that the node transcoded arrives decoded to the namespace's dtype; its
 * format says how lossy it is. */
int kvs_fetch_with_formats(kvs_namespace* ns, kvs_buffer* buffer, const kvs_key* keys,
                           const size_t* offsets, size_t count, int* outcomes, int* formats);
int kvs_delete(kvs_namespace* ns, const kvs_key* keys, size_t count, size_t* deleted);
/* A hint for the node's eviction policies: the request whose prompt ended
 * with block last_key finished, generating output_tokens tokens. known (may
 * be NULL) is set to 1 when the node holds that block, else 0. A failed hint
 * changes nothing: log it and go on. */
int kvs_request_finished(kvs_namespace* ns, const kvs_key* last_key, uint32_t output_tokens,
                         int* known);

#ifdef __cplusplus
}
#endif

#endif /* KVSTRATA_KVSTRATA_H_ */
