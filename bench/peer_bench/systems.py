"""Starts the three systems on loopback, each with the same memory for values.

- kvstrata: a kvstrata-node with its DRAM tier of `capacity` bytes
  (`--dram_bytes`, `--prefault` as transfer_bench does), UCX over TCP.
- Mooncake Store: `mooncake_master` with its embedded HTTP metadata server,
  plus one Store client process that mounts a global segment of `capacity`
  bytes and holds nothing else; benchmark clients mount none (segment 0), so
  every byte they put or get crosses the TCP transport to that process, as
  kvstrata's clients' bytes cross to the node.
- Redis: `redis-server` without persistence, `--maxmemory capacity` and
  allkeys-lru (a cache, as the other two are).

Each `start_*` returns a Server: `.spec` (a picklable dict the client
adapters connect with) and `.stop()`.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, process, what, log_path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not start; its log:\n%s" % (what, read_tail(log_path)))


def read_tail(path, limit=4000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return ""


def stop_process(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Server:
    """A started system: `spec` for the client adapters, `version` for the report."""

    def __init__(self, name, spec, version, stop):
        self.name = name
        self.spec = spec
        self.version = version
        self.stop = stop


def stopper(processes, directory):
    def stop():
        # Last started first: Mooncake's segment holder before its master.
        for process in reversed(processes):
            stop_process(process)
        shutil.rmtree(directory, ignore_errors=True)
    return stop


def first_line(argv):
    out = subprocess.run(argv, capture_output=True, text=True)
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def start_kvstrata(node_binary, capacity):
    import kvstrata.testing  # the build tree's package (PYTHONPATH)
    node = kvstrata.testing.NodeProcess(
        binary=node_binary, dram_bytes=capacity,
        extra_flags=["--prefault", "--ucx_transports=tcp"])
    return Server("kvstrata", {"system": "kvstrata", "address": node.address},
                  "kvstrata-node " + kvstrata_revision(), node.stop)


def kvstrata_revision():
    """This checkout's revision (the node is taken to be built from it)."""
    source = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "-C", source, "log", "-1", "--format=%h %cs"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "(no git revision)"


def start_mooncake(master_binary, capacity):
    directory = tempfile.mkdtemp(prefix="peer-bench-mooncake.")
    rpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log_path = os.path.join(directory, "master.log")
    with open(log_path, "wb") as log:
        master = subprocess.Popen(
            [master_binary, "--enable_http_metadata_server=true",
             "--http_metadata_server_host=127.0.0.1",
             "--http_metadata_server_port=%d" % http_port,
             "--rpc_address=127.0.0.1", "--rpc_port=%d" % rpc_port,
             "--metrics_port=%d" % metrics_port],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    processes = [master]
    try:
        wait_for_port(rpc_port, master, "mooncake_master", log_path)
        wait_for_port(http_port, master, "mooncake_master's metadata server", log_path)
        spec = {"system": "mooncake",
                "metadata": "http://127.0.0.1:%d/metadata" % http_port,
                "master": "127.0.0.1:%d" % rpc_port}
        holder_log = os.path.join(directory, "segment.log")
        with open(holder_log, "wb") as log:
            holder = subprocess.Popen(
                [sys.executable, os.path.join(os.path.dirname(__file__), "mooncake_segment.py"),
                 spec["metadata"], spec["master"], str(capacity)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        processes.append(holder)
        line = holder.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("the Mooncake segment holder did not start; its log:\n" +
                               read_tail(holder_log))
    except BaseException:
        for process in reversed(processes):
            stop_process(process)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    stop_rest = stopper(processes, directory)

    def stop():
        # The holder unmounts its segment and exits when its stdin closes.
        try:
            holder.stdin.close()
            holder.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_rest()
    return Server("mooncake", spec, first_line([master_binary, "--version"]), stop)


def start_redis(redis_binary, capacity):
    directory = tempfile.mkdtemp(prefix="peer-bench-redis.")
    port = free_port()
    log_path = os.path.join(directory, "redis.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [redis_binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--maxmemory", str(capacity),
             "--maxmemory-policy", "allkeys-lru", "--dir", directory],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, "redis-server", log_path)
    except BaseException:
        stop_process(process)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return Server("redis", {"system": "redis", "port": port},
                  first_line([redis_binary, "--version"]), stopper([process], directory))


def find_redis(explicit):
    return explicit or shutil.which("redis-server")


def find_mooncake_master(explicit):
    if explicit:
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), "mooncake_master")
    return beside if os.access(beside, os.X_OK) else shutil.which("mooncake_master")
