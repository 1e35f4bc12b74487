"""Kubernetes: every kustomization renders with `kubectl kustomize`, every rendered object validates
against the Kubernetes schemas (kubernetes-validate, strict), and the manifests keep their promises:
nothing referenced is missing, no admin token ships, the restricted Pod Security Standard is met,
the grace period covers preStop + drain, the HPA's custom metric exists, the GPU overlay asks for a GPU.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
import yaml

from service.metrics import FAMILIES
from service.settings import Settings
from tests.test_deploy_tools import ROOT, missing, require_tool, run_tool

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "dev")
PRODUCTION = ("cpu", "gpu")
KUSTOMIZATIONS = [f"overlays/{o}" for o in OVERLAYS] + ["jobs/build-model", "monitoring"]
# Kubernetes versions the manifests must be valid for: the oldest one supported here and the newest
# schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "latest")
# Time between the end of the drain and the process being gone (closing Redis, the capture writer,
# joining threads, interpreter exit) plus kubelet signalling slack.
SHUTDOWN_MARGIN_S = 10.0
# Objects the production overlays expect to exist in the namespace (README "Deployment" lists them).
PRODUCTION_INPUTS = {("PersistentVolumeClaim", "onerec-models"), ("Secret", "onerec-admin")}


@functools.cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    kubectl = require_tool("kubectl")
    result = run_tool([kubectl, "kustomize", str(K8S / path)], timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(path: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(path) if o["kind"] == kind]


def one(path: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects(path, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{path}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(path: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for obj in render(path):
        template = obj.get("spec", {}).get("template")
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job") and template:
            out.append((f"{obj['kind']}/{obj['metadata']['name']}", template["spec"]))
    return out


def server_container(path: str) -> dict[str, Any]:
    return one(path, "Deployment", "onerec")["spec"]["template"]["spec"]["containers"][0]


def config(path: str) -> dict[str, str]:
    container = server_container(path)
    (ref,) = [e["configMapRef"]["name"] for e in container["envFrom"]]
    return one(path, "ConfigMap", ref)["data"]


# ---- rendering and schema validation -------------------------------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_renders(path: str) -> None:
    assert render(path)


def _kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed: pip install -e '.[dev]'")
    return kubernetes_validate


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_rendered_objects_pass_kubernetes_validate(path: str, version: str) -> None:
    kv = _kubernetes_validate()
    version = kv.latest_version() if version == "latest" else version
    checked = 0
    for obj in render(path):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs of the Prometheus operator: no schema in kubernetes-validate; checked below
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc.message}")
        checked += 1
    assert checked or path == "monitoring"


def test_kubernetes_validate_can_fail() -> None:
    """Negative control: the same strict validation rejects a misspelt field of the Deployment."""
    kv = _kubernetes_validate()
    broken = yaml.safe_load(yaml.safe_dump(one("overlays/cpu", "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True  # wrong level
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.30.0", strict=True)


def test_base_layout() -> None:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    files = set(base["resources"])
    assert {"pdb.yaml", "networkpolicy.yaml", "serviceaccount.yaml", "hpa.yaml"} <= files
    kinds = {
        doc["kind"]: name
        for name in files
        for doc in yaml.safe_load_all((K8S / "base" / name).read_text())
        if doc
    }  # fmt: skip
    assert kinds["PodDisruptionBudget"] == "pdb.yaml", "the PDB has its own file"
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceAccount"} <= set(kinds)


# ---- references, inputs, secrets -------------------------------------------------------------------


def _references(spec: dict[str, Any]) -> set[tuple[str, str, bool]]:
    """(kind, name, optional) of what a pod spec needs from its namespace."""
    refs: set[tuple[str, str, bool]] = set()
    if spec.get("serviceAccountName"):
        refs.add(("ServiceAccount", spec["serviceAccountName"], False))
    for vol in spec.get("volumes", []):
        if "persistentVolumeClaim" in vol:
            refs.add(("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"], False))
        if "configMap" in vol:
            refs.add(("ConfigMap", vol["configMap"]["name"], vol["configMap"].get("optional", False)))
        if "secret" in vol:
            refs.add(("Secret", vol["secret"]["secretName"], vol["secret"].get("optional", False)))
    for container in spec.get("initContainers", []) + spec["containers"]:
        for src in container.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src:
                    refs.add((kind, src[key]["name"], src[key].get("optional", False)))
        for env in container.get("env", []):
            source = env.get("valueFrom", {})
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if key in source:
                    refs.add((kind, source[key]["name"], source[key].get("optional", False)))
    return refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_referenced_exists_or_is_a_documented_input(overlay: str) -> None:
    path = f"overlays/{overlay}"
    rendered = {(o["kind"], o["metadata"]["name"]) for o in render(path)}
    inputs = PRODUCTION_INPUTS if overlay in PRODUCTION else set()
    for where, spec in pod_specs(path):
        for kind, name, optional in _references(spec):
            if (kind, name) in rendered or optional:
                continue
            assert (kind, name) in inputs, f"{overlay}: {where} needs {kind} {name}, which nothing defines"
    readme = (ROOT / "README.md").read_text()
    for kind, name in inputs:
        assert name in readme, f"the README must tell the operator to create {kind} {name}"


def test_dev_overlay_is_self_contained() -> None:
    """The dev overlay brings its Redis and its model volume: the URL points at a Service it defines."""
    url = config("overlays/dev")["ONEREC_REDIS_URL"]
    host = re.match(r"redis://([^:/]+)", url)
    assert host, url
    service = one("overlays/dev", "Service", host.group(1))
    selector = service["spec"]["selector"]
    pods = [
        o
        for o in objects("overlays/dev", "Deployment")
        if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert pods, f"Service {host.group(1)} selects no pod"
    one("overlays/dev", "PersistentVolumeClaim", "onerec-models")


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_production_overlays_take_redis_and_the_model_volume_as_inputs(overlay: str) -> None:
    path = f"overlays/{overlay}"
    assert not objects(path, "PersistentVolumeClaim") and not objects(path, "StatefulSet")
    assert all("redis" not in o["metadata"]["name"] for o in render(path))
    assert config(path)["ONEREC_REDIS_URL"].startswith("redis")
    assert (K8S / "overlays" / overlay / "inputs.env").read_text().count("ONEREC_REDIS_URL=") == 1


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_no_secret_and_no_example_token_is_rendered(path: str) -> None:
    assert not objects(path, "Secret"), "the admin token Secret is created by the operator, never shipped"
    text = yaml.safe_dump_all(render(path))
    assert "change-me" not in text
    for _, spec in pod_specs(path):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if env["name"] == "ONEREC_ADMIN_TOKEN":
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"]


def test_the_example_secret_is_outside_every_kustomization() -> None:
    example = (K8S / "examples" / "admin-secret.example.yaml").resolve()
    assert example.is_file()
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        for resource in doc.get("resources", []) + doc.get("components", []):
            target = (kustomization.parent / resource).resolve()
            assert "examples" not in target.parts, f"{kustomization} includes {resource}"
            assert target != example


# ---- security --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_pods_meet_the_restricted_pod_security_standard(path: str) -> None:
    for where, spec in pod_specs(path):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert not sc.get("capabilities", {}).get("add"), f"{where}/{c['name']}"
            assert not sc.get("privileged"), f"{where}/{c['name']}"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{where}/{c['name']}"
            image = c["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest" and re.search(r"\d", tag), f"{where}: image {image} is not pinned"
            for vol in c.get("volumeMounts", []):
                if vol["name"] == "models" and where == "Deployment/onerec":
                    assert vol.get("readOnly") is True, "serving pods only read the model store"


def test_service_account_mounts_no_token() -> None:
    for overlay in OVERLAYS:
        account = one(f"overlays/{overlay}", "ServiceAccount", "onerec")
        assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_selects_the_pods_and_opens_only_their_ports(overlay: str) -> None:
    path = f"overlays/{overlay}"
    policy = one(path, "NetworkPolicy", "onerec")
    labels = one(path, "Deployment", "onerec")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    ports = {p["containerPort"] for p in server_container(path)["ports"]}
    assert opened == ports
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "ingress is limited to named peers, never open to all"


# ---- shutdown, probes, settings ---------------------------------------------------------------------


def _prestop_seconds(container: dict[str, Any]) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    if pre is None:
        return 0.0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return float(command[1])
    pytest.fail(f"cannot read the preStop duration of {pre}: use `sleep N` or lifecycle sleep")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_drain_and_margin(overlay: str) -> None:
    path = f"overlays/{overlay}"
    pod = one(path, "Deployment", "onerec")["spec"]["template"]["spec"]
    container = server_container(path)
    settings = dict(config(path))
    settings.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    assert "ONEREC_DRAIN_TIMEOUT_S" in settings, "set the drain budget explicitly"
    drain = float(settings["ONEREC_DRAIN_TIMEOUT_S"])
    assert drain > float(settings["ONEREC_REQUEST_TIMEOUT_MS"]) / 1000, "the drain outlasts a request's deadline"
    needed = _prestop_seconds(container) + drain + SHUTDOWN_MARGIN_S
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= needed, f"{overlay}: terminationGracePeriodSeconds {grace} < preStop + drain + margin = {needed}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_probes_and_ports_match_the_service(overlay: str) -> None:
    path = f"overlays/{overlay}"
    data = config(path)
    for key in data:
        assert key.startswith("ONEREC_") and key[7:].lower() in Settings.model_fields, key
    Settings(**{k[7:].lower(): v for k, v in data.items()})  # every value parses
    container = server_container(path)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(data["ONEREC_HTTP_PORT"]), "grpc": int(data["ONEREC_GRPC_PORT"])}
    deployment = one(path, "Deployment", "onerec")
    assert deployment["spec"]["template"]["spec"].get("enableServiceLinks") is False, (
        "service links inject ONEREC_* variables (the settings' prefix)"
    )
    for service in objects(path, "Service"):
        if service["metadata"]["name"].startswith("onerec") and "redis" not in service["metadata"]["name"]:
            sel = service["spec"]["selector"]
            assert sel.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


# ---- CPU and GPU ------------------------------------------------------------------------------------


def test_gpu_overlay_asks_for_a_gpu_on_gpu_nodes() -> None:
    path = "overlays/gpu"
    container = server_container(path)
    assert container["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)
    pod = one(path, "Deployment", "onerec")["spec"]["template"]["spec"]
    assert pod.get("nodeSelector") or pod.get("tolerations")
    assert config(path)["ONEREC_DEVICE"] == "cuda"
    assert container["image"].endswith("-cuda")


@pytest.mark.parametrize("overlay", ("cpu", "dev"))
def test_cpu_overlays_use_the_cpu_image_without_a_gpu(overlay: str) -> None:
    container = server_container(f"overlays/{overlay}")
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert config(f"overlays/{overlay}")["ONEREC_DEVICE"] == "cpu"
    assert container["image"].endswith("-cpu")


# ---- autoscaling ------------------------------------------------------------------------------------


def _adapter_metrics() -> set[str]:
    doc = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "config.yaml").read_text())
    names = set()
    for rule in doc["rules"]:
        series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
        assert series and series.group(1) in FAMILIES, rule["seriesQuery"]
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        names.add(rule["name"]["as"])
    return names


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_hpa_scales_on_a_custom_metric_that_the_adapter_serves(overlay: str) -> None:
    path = f"overlays/{overlay}"
    hpa = one(path, "HorizontalPodAutoscaler", "onerec")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "onerec"
    metrics = hpa["spec"]["metrics"]
    assert metrics[0]["type"] == "Pods", "the custom metric comes first; CPU only as the fallback"
    custom = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    assert custom and custom <= _adapter_metrics()
    cpu = [m for m in metrics if m["type"] == "Resource"]
    if overlay == "cpu":
        assert len(cpu) == 1 and cpu[0]["resource"]["name"] == "cpu"
        # the target is derived in base/hpa.yaml from a measured saturation point: keep the two together
        assert "overload_cpu_items_qw80_soak600.json" in (K8S / "base" / "hpa.yaml").read_text()
        assert 0 < cpu[0]["resource"]["target"]["averageUtilization"] < 50
    pdb = one(path, "PodDisruptionBudget", "onerec")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a lone replica would block node drains"


# ---- model publishing and monitoring -----------------------------------------------------------------


def test_build_job_writes_the_volume_the_pods_read() -> None:
    job = one("jobs/build-model", "Job")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    assert args[0] == "build" and "--out" in args
    out = args[args.index("--out") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == out)
    assert not mount.get("readOnly")
    claim = next(v for v in spec["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    serving = one("overlays/cpu", "Deployment", "onerec")["spec"]["template"]["spec"]
    claims = [v.get("persistentVolumeClaim") for v in serving["volumes"]]
    serving_claims = {c["claimName"] for c in claims if c}
    assert claim in serving_claims
    assert config("overlays/cpu")["ONEREC_MODEL_STORE"] == out
    assert args[args.index("--name") + 1] == config("overlays/cpu")["ONEREC_MODEL_NAME"]


def test_service_monitor_and_prometheus_rule() -> None:
    monitor = one("monitoring", "ServiceMonitor")
    service = one("overlays/cpu", "Service", "onerec")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    # the operator's job label is the Service name: the job the alerts and the dashboard select
    assert service["metadata"]["name"] == "onerec"
    rule = one("monitoring", "PrometheusRule")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "regenerate: python deploy/k8s/monitoring/gen_prometheusrule.py"


def test_plain_scrape_job_uses_the_alerts_job_name() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "prometheus" / "k8s-scrape.yml").read_text())
    (job,) = doc["scrape_configs"]
    assert job["job_name"] == "onerec"
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets, "prometheus-adapter maps series to pods by these labels"
    annotations = one("overlays/cpu", "Deployment", "onerec")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(server_container("overlays/cpu")["ports"][0]["containerPort"])
