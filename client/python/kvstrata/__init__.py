"""kvstrata: a disaggregated KV-cache store, from Python.

    import kvstrata
    client = kvstrata.Client("127.0.0.1:50151")
    ns = client.open_namespace(model="m", tokens_per_block=256, block_bytes=1 << 20)
    keys = ns.keys(tokens)                      # one 16-byte key per full block
    buf = client.register(numpy_array)          # or a torch tensor, bytearray, memoryview
    ns.publish([(keys[0], None, buf, 0), (keys[1], keys[0], buf, ns.block_bytes)])
    n = ns.lookup(keys)                         # longest stored prefix, in blocks
    future = ns.fetch_async([(keys[0], buf, 0)]); result = future.wait()

    cluster = kvstrata.Cluster(nodes=["10.0.0.1:50151", "10.0.0.2:50151"])  # or dns="svc:port"
    client = kvstrata.Client(address, token="...")  # nodes run with --auth_file; or KVSTRATA_TOKEN
    ns = cluster.open_namespace(...)            # the same namespace API, over every node

Items may name a registered Buffer (register/allocate: registered once,
cheapest) or any buffer-protocol object or torch tensor (registered for that
call). Async calls keep every buffer they name alive until they finish.
Failures raise kvstrata.Error with .code (absl/gRPC status code) and
.code_name; a miss is not an error but Outcome.NOT_FOUND in the result.
"""
from ._kvstrata import (Buffer, Client, Cluster, ClusterNamespace, Error, Future, Namespace, Outcome,
                        TransferResult, cuda_built, device_of, keys)

# Status codes carried by Error.code (absl::StatusCode == gRPC codes).
OK = 0
CANCELLED = 1
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# NamespaceSpec.dtype values.
DTYPE_FP16 = 1
DTYPE_BF16 = 2
DTYPE_FP32 = 3

__all__ = ["Buffer", "Client", "Cluster", "ClusterNamespace", "Error", "Future", "Namespace", "Outcome", "TransferResult", "cuda_built", "device_of", "keys"]
