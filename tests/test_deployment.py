"""The container and cluster files: hadolint on the Dockerfile, Kubernetes schemas on every manifest (the GPU
overlay's patches applied first), and the settings the hardening relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
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
    assert '"keel-rlhf[serve,postgres]"' in serve_env and "torch" not in serve_env and "'data'" in serve_env
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignored  # only what the image needs is sent to the builder


def render(directory: Path, components: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """A layout as `kubectl kustomize` renders it; with components, an overlay of the directory that adds them
    (as a user's overlay would)."""
    if components:
        with tempfile.TemporaryDirectory(dir=ROOT / "k8s") as overlay:
            (Path(overlay) / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [os.path.relpath(directory, overlay)],
                "components": [os.path.relpath(c, overlay) for c in components]}))
            return render(Path(overlay))
    result = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def base_resources() -> list[dict[str, Any]]:
    return render(BASE)


K8S = ROOT / "k8s"
LAYOUTS = {
    "base": lambda: render(BASE),
    "gpu": lambda: render(K8S / "overlays" / "gpu"),
    "base+queue-autoscaling": lambda: render(BASE, (K8S / "components" / "queue-autoscaling",)),
    "base+feedback": lambda: render(BASE, (K8S / "components" / "feedback",)),
    "base+servicemonitor": lambda: render(BASE, (K8S / "components" / "servicemonitor",)),
    "base+model-store": lambda: render(BASE, (K8S / "components" / "model-store",)),
    "training": lambda: render(K8S / "training"),
    "training-gpu": lambda: render(K8S / "training" / "gpu"),
}
# The Dockerfile target each layout's pods need: the GPU service runs torch (the chat image), training the train
# image; the kustomization files say how each image is built (`docker build [--target T] ... -t IMAGE`).
TARGETS = {"base": ("serve", BASE), "gpu": ("chat", K8S / "overlays" / "gpu"),
           "training": ("train", K8S / "training" / "base"), "training-gpu": ("train", K8S / "training" / "gpu")}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_manifest_matches_the_kubernetes_schema(layout: str):
    import kubernetes_validate

    resources = LAYOUTS[layout]()
    assert resources
    for resource in resources:
        if resource["kind"] in NOT_IN_KUBERNETES_SCHEMAS:
            continue
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("layout", sorted(TARGETS))
def test_each_layout_runs_the_image_its_dockerfile_target_makes(layout: str):
    target, folder = TARGETS[layout]
    built = {}  # image -> target, from the `docker build` lines in the kustomization comments
    for kustomization in {folder / "kustomization.yaml", BASE / "kustomization.yaml"}:
        for line in kustomization.read_text().replace("\\\n", " ").splitlines():
            if "docker build" in line:
                named = re.search(r"--target (\S+)", line)
                built[re.search(r"-t (\S+)", line).group(1)] = named.group(1) if named else "serve"
    pods = [r["spec"]["template"]["spec"] for r in LAYOUTS[layout]() if r["kind"] in ("Deployment", "Job")]
    main = {c["image"] for pod in pods for c in pod["containers"]}
    assert len(main) == 1 and built.get(main.pop()) == target, (main, built)
    # The service's models come from the with-model image (an init container copies them into the pod).
    init = {c["image"] for pod in pods for c in pod.get("initContainers", [])}
    assert all(built.get(image) == "with-model" for image in init), (init, built)
    assert bool(init) == (target in ("serve", "chat"))
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"AS {target}\n" in dockerfile and "AS with-model\n" in dockerfile


@pytest.mark.parametrize("layout", ["base", "gpu", "base+queue-autoscaling", "base+feedback"])
def test_applying_the_service_starts_no_training_and_ships_no_secret(layout: str):
    resources = LAYOUTS[layout]()
    kinds = {r["kind"] for r in resources}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds
    assert "ServiceMonitor" not in kinds  # opt-in: without the operator's CRDs `kubectl apply` would fail
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
    monitor = next(r for r in LAYOUTS["base+servicemonitor"]() if r["kind"] == "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "keel"
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = next(r for r in base_resources() if r["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()  # selects it
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
    job = next(r for r in LAYOUTS["training"]() if r["metadata"]["name"] == "keel-train-reward")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["accelerate", "launch"] and "--resume" in command
    gpu_job = next(r for r in LAYOUTS["training-gpu"]() if r["metadata"]["name"] == "keel-train-reward")
    gpu_container = gpu_job["spec"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 4 and "--multi_gpu" in gpu_container["command"]


def test_the_models_reach_the_pod_without_a_hand_step():
    """The base copies the models from the with-model image (no volume to fill by hand, no ReadWriteMany); the
    model-store component serves the training Jobs' ReadWriteOnce volume instead."""
    def pod(layout: str) -> dict[str, Any]:
        deployment = next(r for r in LAYOUTS[layout]() if r["kind"] == "Deployment")
        return deployment["spec"]["template"]["spec"]

    base = pod("base")
    assert "PersistentVolumeClaim" not in {r["kind"] for r in LAYOUTS["base"]()}
    [init] = base["initContainers"]
    models = next(v for v in base["volumes"] if v["name"] == "models")
    assert "emptyDir" in models and any(m["name"] == "models" for m in init["volumeMounts"])
    config = next(r for r in LAYOUTS["base"]() if r["kind"] == "ConfigMap")["data"]
    assert config["KEEL_MODEL"] == "/models/reward" and "/models/. " in init["command"][-1]
    store = pod("base+model-store")
    assert "initContainers" not in store
    assert next(v for v in store["volumes"] if v["name"] == "models") == {
        "name": "models", "persistentVolumeClaim": {"claimName": "keel-models", "readOnly": True}}
    claim = next(r for r in LAYOUTS["training"]() if r["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
