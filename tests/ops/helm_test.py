#!/usr/bin/python3
"""Renders the Helm chart (Go text/template + sprig, as helm does) for the
default values, for a GPU + NVMe + TLS values file and without authentication, and checks what a
`helm install` would create: valid YAML, the expected kinds, consistent ports
and selectors, only flags the node accepts (asked of `kvstrata-node --help`),
and no unset values."""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import yaml

failures = []


def expect(condition, message):
    if not condition:
        failures.append(message)


def render(renderer, chart, values=None, notes=False):
    command = [renderer]
    if values:
        command += ["-f", values]
    if notes:
        command.append("--notes")
    return subprocess.run(command + [chart], check=True, capture_output=True, text=True).stdout


def parse_quantity(text):
    """Bytes of a Kubernetes quantity such as 100Gi or 500G."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(text))
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def check_manifests(text, node_flags, label, gpu, tls, nvme, monitor, auth=True):
    expect("<no value>" not in text, label + ": a template used an unset value")
    docs = [d for d in yaml.safe_load_all(text) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
        labels = doc["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "helm.sh/chart"):
            expect(key in labels, "%s: %s %s lacks label %s" % (label, doc["kind"], doc["metadata"]["name"], key))
    for kind, count in (("StatefulSet", 1), ("Service", 2), ("ConfigMap", 1), ("PodDisruptionBudget", 1)):
        expect(len(by_kind.get(kind, [])) == count, "%s: expected %d %s" % (label, count, kind))
    expect(("ServiceMonitor" in by_kind) == monitor, label + ": ServiceMonitor presence")
    if "StatefulSet" not in by_kind:
        return
    sts = by_kind["StatefulSet"][0]
    pod = sts["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expect(set(ports) == {"grpc", "metrics"}, label + ": container ports")
    for selector in [sts["spec"]["selector"]["matchLabels"]] + [s["spec"]["selector"] for s in by_kind["Service"]]:
        expect(all(pod_labels.get(k) == v for k, v in selector.items()), label + ": a selector misses the pods")
    headless = [s for s in by_kind["Service"] if s["spec"].get("clusterIP") == "None"]
    expect(len(headless) == 1 and sts["spec"]["serviceName"] == headless[0]["metadata"]["name"],
           label + ": StatefulSet serviceName is not the headless Service")
    for service in by_kind["Service"]:
        for port in service["spec"]["ports"]:
            expect(port["targetPort"] in ports, "%s: Service port %s targets no container port" % (label, port["name"]))
            expect(port["port"] == ports.get(port["targetPort"]), "%s: Service port %s differs from the container's" % (label, port["name"]))
    for probe in ("livenessProbe", "readinessProbe"):
        expect(container[probe]["grpc"]["port"] == ports["grpc"], label + ": %s port" % probe)
    expect("IPC_LOCK" in container["securityContext"]["capabilities"]["add"], label + ": no IPC_LOCK for UCX")
    expect(pod["spec"]["securityContext"].get("runAsNonRoot") is True, label + ": runs as root")
    # Flags: every one in the flag file must be one the node knows.
    flags = by_kind["ConfigMap"][0]["data"]["flags"]
    names = re.findall(r"^--([a-z_]+)=", flags, re.M)
    expect(names, label + ": empty flag file")
    for name in names:
        expect(name in node_flags, "%s: kvstrata-node has no flag --%s" % (label, name))
    expect("--listen=0.0.0.0:%d" % ports["grpc"] in flags, label + ": the node listens elsewhere than its port")
    expect("--metrics_listen=0.0.0.0:%d" % ports["metrics"] in flags, label + ": metrics port mismatch")
    limits = container["resources"].get("limits", {})
    expect(("nvidia.com/gpu" in limits) == gpu, label + ": GPU limits")
    expect(("--hbm_bytes=" in flags) == gpu and ("--gpu_device=" in flags) == gpu,
           label + ": the GPU values turn the HBM tier on, and only they")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    expect(("tls" in mounts) == tls and ("--tls_cert_file" in flags) == tls, label + ": TLS")
    if tls:
        volume = [v for v in pod["spec"]["volumes"] if v["name"] == "tls"][0]
        expect("secret" in volume, label + ": TLS volume is not a Secret")
    if auth:
        expect("--auth_file=%s/auth" % mounts.get("auth") in flags, label + ": auth file not mounted")
    else:
        expect("auth" not in mounts and "--allow_unauthenticated=true" in flags,
               label + ": a node without an auth file must say it serves unauthenticated")
    if auth:
        volume = [v for v in pod["spec"]["volumes"] if v["name"] == "auth"][0]
        expect("secret" in volume, label + ": the auth file is not a Secret")
    expect(("nvme" in mounts) == nvme, label + ": NVMe mount")
    expect(("--nvme_dirs=" + mounts.get("nvme", "") in flags) == nvme,
           label + ": the NVMe tier is not pointed at its volume")
    if nvme:
        claims = [c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])]
        expect("nvme" in claims, label + ": no NVMe volume claim")
        capacity = int(re.search(r"^--nvme_capacity_bytes=(\d+)$", flags, re.M).group(1))
        claim = [c for c in sts["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == "nvme"][0]
        size = claim["spec"]["resources"]["requests"]["storage"]
        expect(capacity < parse_quantity(size), label + ": NVMe data file larger than its volume")
    liveness = container["livenessProbe"]["grpc"]
    expect(liveness.get("service") == "kvstrata.liveness",
           label + ": liveness must not wait for NVMe recovery (readiness does)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--render", required=True)
    parser.add_argument("--chart", required=True)
    parser.add_argument("--node", required=True)
    args = parser.parse_args()
    help_text = subprocess.run([args.node, "--help"], capture_output=True, text=True).stdout
    node_flags = set(re.findall(r"--([a-z_]+) \(", help_text))
    expect("listen" in node_flags and "dram_bytes" in node_flags, "cannot read the node's flags from --help")
    chart = yaml.safe_load(open(args.chart + "/Chart.yaml"))
    expect(chart.get("apiVersion") == "v2", "Chart.yaml is not apiVersion v2")
    check_manifests(render(args.render, args.chart), node_flags, "defaults",
                    gpu=False, tls=False, nvme=False, monitor=False)
    extra = args.chart + "/ci/gpu-nvme-tls-values.yaml"
    check_manifests(render(args.render, args.chart, extra), node_flags, "gpu-nvme-tls",
                    gpu=True, tls=True, nvme=True, monitor=True)
    open_values = os.path.join(tempfile.mkdtemp(), "open.yaml")
    with open(open_values, "w") as out:
        out.write('auth:\n  secretName: ""\n  allowUnauthenticated: true\n')
    check_manifests(render(args.render, args.chart, open_values), node_flags, "unauthenticated",
                    gpu=False, tls=False, nvme=False, monitor=False, auth=False)
    with open(open_values, "w") as out:
        out.write('auth:\n  secretName: ""\n')
    refused = subprocess.run([args.render, "-f", open_values, args.chart], capture_output=True, text=True)
    expect(refused.returncode != 0 and "auth.secretName" in refused.stdout + refused.stderr,
           "a chart without auth and without allowUnauthenticated rendered")
    for values in (None, extra):
        notes = render(args.render, args.chart, values, notes=True)
        expect("<no value>" not in notes and "kvstrata stat" in notes, "NOTES.txt incomplete")
    for failure in failures:
        print("FAIL", failure)
    print("chart checked: %d problems" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
