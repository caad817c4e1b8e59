#!/usr/bin/env python3
"""Checks the Kubernetes manifests (deploy/k8s/) beyond their schema: the fields the trainer and
the servers rely on agree with each other. The schema check is `kubernetes-validate --strict`
(.ci/run installs it); this script needs PyYAML only.

    python3 tools/check_deploy.py deploy/k8s
"""

import glob
import os
import re
import sys

import yaml


def main(folder):
    docs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
        with open(path) as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d)
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    (sts,) = by_kind["StatefulSet"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    service = services.get(sts["spec"]["serviceName"])
    need(service is not None, f"no Service named {sts['spec']['serviceName']} (the StatefulSet's serviceName)")
    need(service and service["spec"].get("clusterIP") == "None",
         "the servers' Service must be headless (clusterIP: None): the trainer needs one DNS name per pod")
    (server,) = sts["spec"]["template"]["spec"]["containers"]
    args = server.get("args", [])
    listen = [a.split("=", 1)[1] for a in args if a.startswith("--listen=")]
    need(len(listen) == 1 and listen[0].startswith("0.0.0.0:"), "the server must listen on 0.0.0.0 (--listen=0.0.0.0:PORT)")
    port = int(listen[0].rsplit(":", 1)[1]) if listen else None
    need(server["readinessProbe"]["grpc"]["port"] == port, "readiness must be grpc.health.v1 on the gRPC port")
    grpc_ports = [p for p in (service or {"spec": {"ports": []}})["spec"]["ports"] if p["name"] == "grpc"]
    need(grpc_ports and grpc_ports[0]["port"] == port, "the Service's grpc port must be the server's")
    need(any(a.startswith("--data-dir=") for a in args), "each server needs its own --data-dir on its volume")
    need(server["resources"]["limits"].get("nvidia.com/gpu") == 1, "one GPU per server pod")
    token_of = lambda c: next((e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                               if e["name"] == "W2S_TOKEN"), None)
    need(token_of(server) is not None, "a server off loopback needs W2S_TOKEN")

    (job,) = by_kind["Job"]
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in trainer.get("env", [])}
    pool = env.get("W2S_SERVER", {}).get("value", "").split(",")
    expected = [f"http://{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:{port}"
                for i in range(sts["spec"]["replicas"])]
    need(pool == expected, f"W2S_SERVER must list every server pod: {expected}, not {pool}")
    need(token_of(trainer) == token_of(server), "trainer and servers must read the same token secret")
    out = [a for a in trainer.get("args", []) if not a.startswith("-")]
    mounts = [m["mountPath"] for m in trainer.get("volumeMounts", [])]
    out_dir = trainer["args"][trainer["args"].index("--out") + 1] if "--out" in trainer["args"] else ""
    need(any(out_dir.startswith(m + "/") or out_dir == m for m in mounts),
         f"the trainer's --out ({out_dir}) must be on a mounted volume ({mounts})")
    need(bool(re.match(r"^(experiment|run)$", out[0] if out else "")), "the trainer runs `experiment` or `run`")

    for p in problems:
        print(f"deploy check: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"deploy check: {len(docs)} resources in {folder} agree "
          f"({sts['spec']['replicas']} servers on port {port}, trainer pool {len(pool)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "deploy/k8s")
