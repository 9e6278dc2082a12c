#!/usr/bin/env python3
"""Checks what the Kubernetes schemas cannot: that deploy/kubernetes/tally.yaml runs tally the way
docs/runbook.md says (probes on the admin port, admin port in no public Service, non-root, the admin
token from a Secret file, the config from the ConfigMap, the data directory on the PVC).

    python3 deploy/kubernetes/check.py [deploy/kubernetes/tally.yaml] [--tally BIN]

With --tally, the ConfigMap's tally.toml is also run through `tally check-config`.
Needs PyYAML (a dependency of kubernetes-validate, which scripts/check-ops installs).
"""

import os
import subprocess
import sys
import tempfile
import tomllib

import yaml

ADMIN_PORT = 9090
PUBLIC_PORT = 8080
UID = 10001
MIN_MEMORY_MIB = 256  # SPEC 13: RSS <= 256 MiB with the default config


def mebibytes(quantity):
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    tally = argv[argv.index("--tally") + 1] if "--tally" in argv else None
    if tally:
        args.remove(tally)
    path = args[0] if args else os.path.join(os.path.dirname(__file__), "tally.yaml")
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    problems = []
    checked = []

    def check(ok, what):
        checked.append(what)
        if not ok:
            problems.append(what)

    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    check(len(by_kind.get("StatefulSet", [])) == 1, "exactly one StatefulSet")
    check(len(by_kind.get("ConfigMap", [])) == 1, "exactly one ConfigMap")
    check("Secret" not in by_kind, "no Secret in the manifest (the admin token is created out of git)")
    if problems:
        return report(path, checked, problems)

    sts = by_kind["StatefulSet"][0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "tally")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    services = by_kind.get("Service", [])

    check(spec.get("replicas") == 1, "one replica (a RocksDB directory belongs to one process)")
    governing = [s for s in services if s["metadata"]["name"] == spec.get("serviceName")]
    check(len(governing) == 1 and governing[0]["spec"].get("clusterIP") == "None",
          "serviceName names a headless Service of the manifest")

    check(ports.get("admin") == ADMIN_PORT and ports.get("http") == PUBLIC_PORT,
          f"container ports http={PUBLIC_PORT}, admin={ADMIN_PORT}")
    check(env.get("TALLY_ADMIN_ADDR", "").endswith(f":{ADMIN_PORT}"), "TALLY_ADMIN_ADDR binds the admin port")
    check(env.get("TALLY_PUBLIC_ADDR", "").endswith(f":{PUBLIC_PORT}"), "TALLY_PUBLIC_ADDR binds the public port")

    def probe(name, path_):
        p = c.get(name, {}).get("httpGet", {})
        port = ports.get(p.get("port"), p.get("port"))
        check(p.get("path") == path_ and port == ADMIN_PORT, f"{name} GET {path_} on the admin port")

    probe("livenessProbe", "/healthz")
    probe("readinessProbe", "/readyz")
    probe("startupProbe", "/healthz")

    psc = pod.get("securityContext", {})
    csc = c.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == UID and psc.get("fsGroup") == UID,
          f"pod runAsNonRoot, runAsUser {UID}, fsGroup {UID}")
    check(csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
          and csc.get("capabilities", {}).get("drop") == ["ALL"],
          "container: read-only root, no privilege escalation, all capabilities dropped")
    check(pod.get("enableServiceLinks") is False, "enableServiceLinks: false (no injected TALLY_* variables)")
    check(pod.get("automountServiceAccountToken") is False, "no service account token mounted")

    limit = c.get("resources", {}).get("limits", {}).get("memory")
    check(limit is not None and mebibytes(limit) >= MIN_MEMORY_MIB,
          f"a memory limit of at least {MIN_MEMORY_MIB} MiB (SPEC 13)")

    # Data directory on the PVC.
    claims = [t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])]
    data = mounts.get("data", {})
    check("data" in claims and data.get("mountPath") == "/var/lib/tally"
          and env.get("TALLY_DATA_DIR", "").startswith("/var/lib/tally/"),
          "TALLY_DATA_DIR on the PersistentVolumeClaim at /var/lib/tally")

    # Admin token: a file from a Secret volume, never a literal.
    check("TALLY_ADMIN_TOKEN" not in env, "no literal TALLY_ADMIN_TOKEN")
    token_file = env.get("TALLY_ADMIN_TOKEN_FILE") or ""
    secret_mounts = [m for n, m in mounts.items() if "secret" in volumes.get(n, {})]
    check(any(token_file.startswith(m["mountPath"].rstrip("/") + "/") and m.get("readOnly") for m in secret_mounts),
          "TALLY_ADMIN_TOKEN_FILE is in a read-only Secret volume")

    # Config from the ConfigMap.
    cm = by_kind["ConfigMap"][0]
    cfg_mounts = [m for n, m in mounts.items() if volumes.get(n, {}).get("configMap", {}).get("name") == cm["metadata"]["name"]]
    args = c.get("args", [])
    cfg_path = args[args.index("--config") + 1] if "--config" in args else ""
    check(any(cfg_path == m["mountPath"].rstrip("/") + "/tally.toml" for m in cfg_mounts) and "tally.toml" in cm["data"],
          "serve --config points at tally.toml of the ConfigMap")
    toml = tomllib.loads(cm["data"].get("tally.toml", ""))
    check("admin_token" not in toml, "no admin_token in the config file")

    # The admin port is in no Service that has a virtual IP or leaves the cluster.
    for s in services:
        sp = s["spec"]
        admin = [p for p in sp.get("ports", [])
                 if p.get("targetPort") in ("admin", ADMIN_PORT) or p.get("port") == ADMIN_PORT]
        name = s["metadata"]["name"]
        if admin:
            check(sp.get("clusterIP") == "None" and sp.get("type", "ClusterIP") == "ClusterIP",
                  f"Service {name}: the admin port only on a headless ClusterIP Service")
        else:
            check(all(p.get("targetPort") in ("http", PUBLIC_PORT) for p in sp.get("ports", [])),
                  f"Service {name}: only the public port")
    check(any(p.get("targetPort") in ("http", PUBLIC_PORT) for s in services for p in s["spec"].get("ports", [])),
          "a Service for the public port")

    if tally:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = os.path.join(tmp, "tally.toml")
            with open(cfg, "w") as f:
                f.write(cm["data"]["tally.toml"])
            run_env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
            run_env.update({k: v for k, v in env.items() if v is not None and k != "TALLY_ADMIN_TOKEN_FILE"})
            run_env["TALLY_DATA_DIR"] = os.path.join(tmp, "data")
            run_env["TALLY_ADMIN_TOKEN"] = "x" * 32
            r = subprocess.run([tally, "check-config", "--config", cfg], env=run_env, capture_output=True, text=True)
            check(r.returncode == 0, "tally check-config accepts the ConfigMap's tally.toml"
                  + ("" if r.returncode == 0 else f": {r.stderr.strip()}"))

    return report(path, checked, problems)


def report(path, checked, problems):
    for p in problems:
        print(f"FAIL {path}: {p}", file=sys.stderr)
    print(f"{path}: {len(checked) - len(problems)}/{len(checked)} properties hold")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
