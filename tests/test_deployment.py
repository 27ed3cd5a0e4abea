"""The container and cluster files: hadolint on the Dockerfile, Kubernetes schemas on every manifest (the GPU
overlay's patches applied first), and the settings the hardening relies on."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "k8s" / "base"
NOT_IN_KUBERNETES_SCHEMAS = {"ServiceMonitor"}  # a Prometheus Operator CRD: checked by hand below


def tool(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: install the dev extra (pip install -e '.[dev]')")
    return path


@pytest.mark.subprocess
def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_exec_entrypoint_and_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("AS runtime", 1)[1].split("\nFROM ", 1)[0]
    assert "USER 10001" in runtime and 'ENTRYPOINT ["keel", "serve"]' in runtime and "HEALTHCHECK" in runtime
    stages = text.split("\nFROM ")
    assert stages[-1].startswith("runtime AS serve")  # the default target: the serving image, on that runtime
    assert all(s.startswith("runtime AS ") for s in stages if " AS chat\n" in s or " AS train\n" in s)
    # The serving image installs the serve extra and the PostgreSQL driver only (no torch) and drops the bundled
    # training data.
    serve_env = text.split("AS serve-env", 1)[1].split("\nFROM ", 1)[0]
    assert '"keel[serve,postgres]"' in serve_env and "torch" not in serve_env and "'data'" in serve_env
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignored  # only what the image needs is sent to the builder


def render(directory: Path, components: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """A kustomization as kustomize renders these files: resources (files or kustomizations), components, then
    strategic-merge patches matched by kind and name."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += render(path) if path.is_dir() else [yaml.safe_load(path.read_text())]
    for component in [*(directory / c for c in kustomization.get("components", [])), *components]:
        resources = patched(resources, component, yaml.safe_load((component / "kustomization.yaml").read_text()))
    return patched(resources, directory, kustomization)


def patched(resources: list[dict[str, Any]], directory: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    resources = list(resources)
    for entry in kustomization.get("patches", []):
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        index = next(i for i, r in enumerate(resources)
                     if r["kind"] == patch["kind"] and r["metadata"]["name"] == patch["metadata"]["name"])
        resources[index] = merge(resources[index], patch)
    return resources


def base_resources() -> list[dict[str, Any]]:
    return render(BASE)


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize applies it to these patches: maps merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                    for i in base + patch):
        by_name = {item["name"]: copy.deepcopy(item) for item in base}
        for item in patch:
            by_name[item["name"]] = merge(by_name[item["name"]], item) if item["name"] in by_name else item
        return list(by_name.values())
    return patch


K8S = ROOT / "k8s"
LAYOUTS = {
    "base": lambda: render(BASE),
    "gpu": lambda: render(K8S / "overlays" / "gpu"),
    "base+queue-autoscaling": lambda: render(BASE, (K8S / "components" / "queue-autoscaling",)),
    "base+feedback": lambda: render(BASE, (K8S / "components" / "feedback",)),
    "training": lambda: render(K8S / "training"),
    "training-gpu": lambda: render(K8S / "training" / "gpu"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_manifest_matches_the_kubernetes_schema(layout: str):
    import kubernetes_validate

    resources = LAYOUTS[layout]()
    assert resources
    for resource in resources:
        if resource["kind"] in NOT_IN_KUBERNETES_SCHEMAS:
            continue
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("layout", ["base", "gpu", "base+queue-autoscaling"])
def test_applying_the_service_starts_no_training_and_ships_no_secret(layout: str):
    resources = LAYOUTS[layout]()
    kinds = {r["kind"] for r in resources}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "ServiceMonitor"} <= kinds
    assert "Job" not in kinds
    assert not [r for r in resources if r["kind"] == "Secret" and (r.get("data") or r.get("stringData"))]
    for path in K8S.rglob("*.yaml"):  # no key anywhere, rendered or not
        for document in yaml.safe_load_all(path.read_text()):
            assert not (document or {}).get("stringData") and not (document or {}).get("data", {}).get(
                "KEEL_API_KEYS"), path


def test_api_keys_come_from_a_mounted_secret_file():
    deployment = next(r for r in base_resources() if r["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = next(r for r in base_resources() if r["kind"] == "ConfigMap")["data"]
    volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "keel-api-keys")
    assert volume["secret"].get("optional") is not True  # no Secret: the pod waits instead of serving keyless
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert config["KEEL_API_KEYS_FILE"].startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    assert "env" not in container or all("KEY" not in e["name"] for e in container["env"])


def test_base_autoscaler_uses_cpu_alone_and_the_component_adds_queue_depth():
    base = next(r for r in base_resources() if r["kind"] == "HorizontalPodAutoscaler")
    assert [m["type"] for m in base["spec"]["metrics"]] == ["Resource"]
    opted = next(r for r in LAYOUTS["base+queue-autoscaling"]() if r["kind"] == "HorizontalPodAutoscaler")
    assert [m["type"] for m in opted["spec"]["metrics"]] == ["Resource", "Pods"]
    assert opted["spec"]["metrics"][1]["pods"]["metric"]["name"] == "keel_queue_texts"


def test_servicemonitor_scrapes_the_metrics_port():
    monitor = next(r for r in base_resources() if r["kind"] == "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = next(r for r in base_resources() if r["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}


def test_deployment_is_hardened_and_drains():
    deployment = next(r for r in base_resources() if r["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    config = next(r for r in base_resources() if r["kind"] == "ConfigMap")["data"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    from keel.service.settings import Settings

    settings = Settings(**{key[5:].lower(): value for key, value in config.items()})
    # The service's graceful window is the longest request + 1 s (keel.service.server.serve).
    needed = pre_stop + settings.drain_seconds + settings.longest_request_s() + 1
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert {key[5:].lower() for key in config} <= set(Settings.model_fields)  # every KEEL_* is a real setting


def test_training_job_uses_accelerate_and_resumes():
    job = next(r for r in LAYOUTS["training"]() if r["kind"] == "Job")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["accelerate", "launch"] and "--resume" in command
    gpu_job = next(r for r in LAYOUTS["training-gpu"]() if r["kind"] == "Job")
    gpu_container = gpu_job["spec"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 4 and "--multi_gpu" in gpu_container["command"]
