"""Mooncake Store's memory: one Store client that mounts the global segment.

    mooncake_segment.py METADATA_URL MASTER_ADDRESS SEGMENT_BYTES

Mounts SEGMENT_BYTES with the master (Mooncake 0.3.13's
`MooncakeDistributedStore.setup(local_hostname, metadata_server,
global_segment_size, local_buffer_size, protocol, rdma_devices,
master_server_addr)`, TCP transport), prints "ready", and holds it until its
stdin closes, like a storage node. It puts and gets nothing itself.
"""
import sys

from mooncake.store import MooncakeDistributedStore

# Its own local buffer only backs non-zero-copy calls of this process, which
# makes none: the smallest size Mooncake's docs use.
LOCAL_BUFFER_BYTES = 16 << 20


def main():
    metadata, master, segment = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", metadata, segment, LOCAL_BUFFER_BYTES, "tcp", "", master)
    if rc != 0:
        print("mooncake_segment: setup failed with %d" % rc, file=sys.stderr)
        return 1
    print("ready", flush=True)
    sys.stdin.read()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
