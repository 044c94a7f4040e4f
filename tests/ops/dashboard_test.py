#!/usr/bin/python3
"""The Grafana dashboard parses, and every metric its expressions name is one
a live node exports (checked against a real /metrics scrape after traffic)."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request


def scrape_names(node_binary, cli_binary):
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port")
        node = subprocess.Popen([node_binary, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                                 "--port_file=" + port_file, "--dram_bytes=268435456",
                                 # The NVMe tier too: its families are on the dashboard.
                                 "--nvme_dirs=" + os.path.join(tmp, "nvme"),
                                 "--nvme_capacity_bytes=67108864"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                if os.path.exists(port_file):
                    break
                time.sleep(0.1)
            grpc_port, metrics_port = open(port_file).read().split()[:2]
            # Traffic, so families that appear on first use are there.
            subprocess.run([cli_binary, "demo", "--node=127.0.0.1:" + grpc_port, "--prompts=1",
                            "--prompt_tokens=1024"], check=True, stdout=subprocess.DEVNULL)
            text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % metrics_port).read().decode()
        finally:
            node.terminate()
            node.wait()
    names = set()
    for line in text.splitlines():
        match = re.match(r"# TYPE (\S+) (\S+)", line)
        if match:
            names.add(match.group(1))
            if match.group(2) == "histogram":
                names.update(match.group(1) + s for s in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, 1)[0])
    return names


def expressions(dashboard):
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if isinstance(variable.get("query"), str) and "kvstrata_" in variable["query"]:
            yield "variable " + variable["name"], variable["query"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", required=True)
    parser.add_argument("--cli", required=True)
    parser.add_argument("--dashboard", required=True)
    args = parser.parse_args()
    dashboard = json.load(open(args.dashboard))
    exported = scrape_names(args.node, args.cli)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    failures = []
    for wanted in ("throughput", "hit rate", "latency", "tier", "evictions", "transcode"):
        if wanted not in titles:
            failures.append("no panel about " + wanted)
    count = 0
    for where, expr in expressions(dashboard):
        for name in set(re.findall(r"\bkvstrata_[a-z0-9_]+\b", expr)):
            count += 1
            if name not in exported:
                failures.append("%s: %s is not exported by the node" % (where, name))
    if count == 0:
        failures.append("the dashboard names no kvstrata metric")
    for failure in failures:
        print("FAIL", failure)
    print("%d metric references checked against %d exported names" % (count, len(exported)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
