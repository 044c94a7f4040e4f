"""Start a real kvstrata-node for tests and benchmarks (like tests/support's NodeProcess)."""
import os
import shutil
import subprocess
import tempfile
import time


class NodeProcess:
    """kvstrata-node on 127.0.0.1 with an ephemeral port; a context manager.

    `binary` defaults to $KVSTRATA_NODE. The node's log goes to a file in a
    temporary directory (shown when start-up fails).
    """

    def __init__(self, binary=None, dram_bytes=256 << 20, extra_flags=(), start_timeout=30.0):
        self.binary = binary or os.environ.get("KVSTRATA_NODE")
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise RuntimeError("kvstrata-node not found: pass binary= or set KVSTRATA_NODE")
        self.dir = tempfile.mkdtemp(prefix="kvstrata-node.")
        port_file = os.path.join(self.dir, "port")
        self.log_path = os.path.join(self.dir, "log")
        argv = [self.binary, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                "--port_file=" + port_file, "--dram_bytes=%d" % dram_bytes] + list(extra_flags)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            try:
                with open(port_file) as f:
                    fields = f.read().split()
                if fields and int(fields[0]) > 0:
                    self.port = int(fields[0])
                    self.address = "127.0.0.1:%d" % self.port
                    return
            except (FileNotFoundError, ValueError):
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        log = self.log_tail()
        self.stop()
        raise RuntimeError("kvstrata-node did not start; its log:\n" + log)

    def log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
