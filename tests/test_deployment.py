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


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_exec_entrypoint_and_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("AS runtime", 1)[1]
    assert "USER 10001" in runtime and 'ENTRYPOINT ["keel", "serve"]' in runtime and "HEALTHCHECK" in runtime
    assert text.count("FROM ") >= 2  # multi-stage: build tools stay out of the runtime image
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignored  # only what the image needs is sent to the builder


def base_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [yaml.safe_load((BASE / name).read_text()) for name in kustomization["resources"]]


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


def gpu_resources() -> list[dict[str, Any]]:
    overlay = ROOT / "k8s" / "overlays" / "gpu"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    resources = base_resources()
    for entry in kustomization["patches"]:
        patch = yaml.safe_load((overlay / entry["path"]).read_text())
        index = next(i for i, r in enumerate(resources)
                     if r["kind"] == patch["kind"] and r["metadata"]["name"] == patch["metadata"]["name"])
        resources[index] = merge(resources[index], patch)
    return resources


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_every_manifest_matches_the_kubernetes_schema(overlay: str):
    import kubernetes_validate

    resources = base_resources() if overlay == "base" else gpu_resources()
    kinds = {r["kind"] for r in resources}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ServiceMonitor", "Job"} <= kinds
    for resource in resources:
        if resource["kind"] in NOT_IN_KUBERNETES_SCHEMAS:
            continue
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


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
    needed = pre_stop + float(config["KEEL_DRAIN_SECONDS"]) + float(config["KEEL_REQUEST_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= needed
    # Every KEEL_* variable is a real service setting.
    from service.settings import Settings

    assert {key[5:].lower() for key in config} <= set(Settings.model_fields)


def test_training_job_uses_accelerate_and_resumes():
    job = next(r for r in base_resources() if r["kind"] == "Job")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["accelerate", "launch"] and "--resume" in command
    gpu_job = next(r for r in gpu_resources() if r["kind"] == "Job")
    gpu_container = gpu_job["spec"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 4 and "--multi_gpu" in gpu_container["command"]
