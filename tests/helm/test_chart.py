"""The Helm chart in helm/nstudent: it renders and lints offline, every object it renders is valid for
Kubernetes (built-in kinds) or KubeRay (the RayCluster), and the control plane gets exactly the environment
that service/settings.py reads.
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import functools
import tomllib
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from service import settings as app_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "nstudent"
KUBERAY_CRDS = ROOT.parent / "shared" / "kuberay-crds"
# The Kubernetes version the objects are validated against (kubernetes-validate ships its schemas).
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "nst", "ml"
VALUES = {
    "default": None,
    "gpu-autoscaling": CHART / "ci" / "gpu-autoscaling-values.yaml",
}


def _values(name: str) -> dict | None:
    path = VALUES[name]
    return None if path is None else yaml.safe_load(path.read_text())


def render(values: dict | None = None, *, name: str = RELEASE) -> list[dict]:
    """The chart's objects, as the API server would receive them (NOTES and empty documents dropped)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name=name, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def control_plane(objects: list[dict]) -> dict:
    deployment = one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def ray_containers(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def resolve_env(container: dict, objects: list[dict]) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps, then env values and references, resolved
    against the rendered ConfigMaps and Secrets (a missing optional reference leaves the variable unset)."""

    def secret_value(ref: dict) -> str | None:
        secret = one(objects, "Secret", ref["name"])
        if ref["key"] not in secret.get("data", {}):
            assert ref.get("optional"), f"Secret {ref['name']} has no key {ref['key']}"
            return None
        return base64.b64decode(secret["data"][ref["key"]]).decode()

    def config_value(ref: dict) -> str | None:
        data = one(objects, "ConfigMap", ref["name"]).get("data", {})
        assert ref["key"] in data or ref.get("optional"), f"ConfigMap {ref['name']} has no key {ref['key']}"
        return data.get(ref["key"])

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        else:
            secret = one(objects, "Secret", source["secretRef"]["name"])
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    for var in container.get("env", []):
        if "value" in var:
            value = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            value = secret_value(var["valueFrom"]["secretKeyRef"])
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            value = config_value(var["valueFrom"]["configMapKeyRef"])
        else:
            raise AssertionError(f"{var['name']}: a source the test does not resolve: {var}")
        if value is not None:
            env[var["name"]] = value
    return env


@pytest.fixture(scope="module", params=list(VALUES))
def values_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def objects(values_name: str) -> list[dict]:
    return render(_values(values_name))


# --- rendering and lint ---------------------------------------------------------------------------


def test_default_values_render_a_control_plane_and_a_raycluster():
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "RayCluster",
        "Secret",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # the SQLite volume is ReadWriteOnce
    container = control_plane(objects)
    assert container["command"] == ["nstudent", "serve"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert (
        volumes["data"]["persistentVolumeClaim"]["claimName"]
        == one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    )
    cluster = one(objects, "RayCluster")
    assert [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]] == ["cpu"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is False


def test_gpu_autoscaling_values_render_gpu_workers_that_scale_from_zero():
    objects = render(_values("gpu-autoscaling"))
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objects}  # PostgreSQL instead of SQLite
    assert one(objects, "Deployment")["spec"]["replicas"] == 2
    ingress = one(objects, "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "nstudent.ml.example.com"
    spec = one(objects, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 120
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert (groups["cpu"]["minReplicas"], groups["cpu"]["maxReplicas"]) == (1, 8)
    gpu = groups["gpu"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (0, 0, 6)
    pod = gpu["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith(":0.1.0-cuda")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # The head schedules no tasks: the autoscaler adds workers for them.
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_lint_is_clean(values_name: str):
    report = helm.lint(CHART, _values(values_name), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); 2 and 3 are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_values_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(helm.HelmValuesError, match="replicaz"):
        render({"controlPlane": {"replicaz": 2}})
    with pytest.raises(helm.HelmValuesError, match="gpus"):
        render({"ray": {"gpuWorkers": {"gpus": "one"}}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"controlPlane": {"replicas": 2}}, "needs PostgreSQL"),
        ({"ray": {"cpuWorkers": {"minReplicas": 3, "maxReplicas": 2}}}, "minReplicas <= replicas <= maxReplicas"),
        ({"ray": {"enabled": False, "auth": {"enabled": False}}}, "ray.existingAddress is required"),
        ({"storage": {"accessKeyId": "only-half"}}, "go together"),
    ],
)
def test_impossible_values_fail_with_a_clear_message(values: dict, message: str):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


# --- Kubernetes and KubeRay schemas ---------------------------------------------------------------


def test_builtin_objects_validate_against_kubernetes(objects: list[dict]):
    builtin = [o for o in objects if not o["apiVersion"].startswith("ray.io/")]
    assert builtin
    for obj in builtin:
        # strict: unknown fields are errors, as with server-side field validation.
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused, as the API server's strict field validation does
    (kubectl's default), except where the schema keeps unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _crd_schema(filename: str, version: str) -> dict:
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"the KubeRay CRDs are not at {KUBERAY_CRDS}: RayCluster validation needs them")
    return _load_crd_schema(filename, version)


@functools.lru_cache
def _load_crd_schema(filename: str, version: str) -> dict:
    # The CRDs are large (17,000 lines): parse each once, with libyaml where PyYAML has it.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((KUBERAY_CRDS / filename).read_text(), Loader=loader)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"], f"KubeRay no longer serves {version}"
    return _strict(entry["schema"]["openAPIV3Schema"])


def test_raycluster_validates_against_the_kuberay_crd(objects: list[dict]):
    cluster = one(objects, "RayCluster")
    group, version = cluster["apiVersion"].split("/")
    assert group == "ray.io"
    schema = _crd_schema("ray.io_rayclusters.yaml", version)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cluster), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_crd_check_catches_a_misspelt_field(objects: list[dict]):
    """The strict schema is not a rubber stamp: an unknown field in a worker group is reported."""
    cluster = copy.deepcopy(one(objects, "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    schema = _crd_schema("ray.io_rayclusters.yaml", cluster["apiVersion"].split("/")[1])
    assert not jsonschema.Draft7Validator(schema).is_valid(cluster)


# --- the control plane's environment against the app's settings -------------------------------------


def test_control_plane_env_is_exactly_what_the_app_reads(objects: list[dict], monkeypatch):
    container = control_plane(objects)
    env = resolve_env(container, objects)
    ignored = set(env) - app_settings.env_names()
    assert not ignored, f"the chart sets variables the app never reads: {sorted(ignored)}"

    # Build the settings from the rendered environment alone, in production.
    for name in app_settings.env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert env["NSTUDENT_ENVIRONMENT"] == "production"
    settings = app_settings.Settings()

    assert settings.environment == "production"
    assert settings.write_tokens and all(t.get_secret_value() for t in settings.write_tokens)
    assert settings.ray_address == env["RAY_ADDRESS"]
    assert settings.ray_auth_token and settings.ray_auth_token.get_secret_value()
    assert settings.storage_root.startswith("s3://")
    assert settings.host == "0.0.0.0"
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert settings.port == port
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.data_dir) in mounts

    # The production checks are live: without the Ray address or the write tokens the app refuses to start.
    # (An admin token is a write token too.)
    for required in (["RAY_ADDRESS"], ["NSTUDENT_WRITE_TOKENS", "NSTUDENT_ADMIN_TOKENS"]):
        for name in required:
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(ValidationError):
            app_settings.Settings()
        for name in required:
            if name in env:
                monkeypatch.setenv(name, env[name])


def test_gpu_values_reach_the_settings(monkeypatch):
    objects = render(_values("gpu-autoscaling"))
    env = resolve_env(control_plane(objects), objects)
    for name in app_settings.env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = app_settings.Settings()
    assert settings.database.startswith("postgresql+psycopg://")
    assert [t.get_secret_value() for t in settings.write_tokens] == [
        "pipelines:write-token-for-pipelines",
        "vision-team:write-token-for-vision",
    ]
    assert [t.get_secret_value() for t in settings.read_tokens] == ["dashboards:read-token-for-dashboards"]
    assert [t.get_secret_value() for t in settings.admin_tokens] == ["ops:admin-token-for-ops"]
    assert settings.principal_roots == {"vision-team": ["s3://vision-team-images"]}
    assert settings.source_roots == ["s3://raw-images", "s3://ml-artifacts/teachers"]
    assert settings.job_env() == {"MLFLOW_TRACKING_URI": "http://mlflow.ml.svc:5000"}
    from service.principals import Role, api_principals

    principals, _ = api_principals(settings)
    vision = principals.find("write-token-for-vision")
    assert (vision.name, vision.role, vision.roots) == ("vision-team", Role.WRITE, ("s3://vision-team-images",))
    assert principals.find("admin-token-for-ops").role == Role.ADMIN
    assert (settings.poll_seconds, settings.max_page_size) == (5.0, 200)
    assert (settings.max_running_jobs, settings.job_attempts) == (8, 5)
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
    assert env["AWS_ACCESS_KEY_ID"] == "nstudent"


def test_ray_address_is_the_head_service_that_kuberay_creates():
    for name in (RELEASE, "a-release-name-long-enough-to-be-cut-by-kuberay-x"):
        objects = render(name=name)
        cluster = one(objects, "RayCluster")["metadata"]["name"]
        service = f"{cluster}-head-svc"
        # KubeRay shortens names over 50 characters; this one must come out as written.
        assert len(service) <= 50
        env = resolve_env(control_plane(objects), objects)
        assert env["RAY_ADDRESS"] == f"http://{service}.{NAMESPACE}.svc:8265"


def test_existing_ray_cluster_instead_of_a_raycluster():
    values = {"ray": {"enabled": False, "existingAddress": "http://ray-head.ray.svc:8265", "auth": {"token": "t0ken"}}}
    objects = render(values)
    assert "RayCluster" not in {o["kind"] for o in objects}
    env = resolve_env(control_plane(objects), objects)
    assert env["RAY_ADDRESS"] == "http://ray-head.ray.svc:8265"
    assert env["RAY_AUTH_TOKEN"] == "t0ken"


def test_ray_pods_share_the_token_and_the_storage_secret_with_the_control_plane(objects: list[dict]):
    cluster = one(objects, "RayCluster")
    plane = {v["name"]: v for v in control_plane(objects)["env"]}
    storage = {n: v for n, v in plane.items() if n.startswith("AWS_")}
    containers = ray_containers(cluster)
    autoscaler = cluster["spec"].get("autoscalerOptions")
    for container in containers + ([autoscaler] if autoscaler else []):
        env = {v["name"]: v for v in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"] == plane["RAY_AUTH_TOKEN"]
    for container in containers:
        env = {v["name"]: v for v in container["env"]}
        assert {n: v for n, v in env.items() if n.startswith("AWS_")} == storage
    token = resolve_env(control_plane(objects), objects)["RAY_AUTH_TOKEN"]
    assert len(token) >= 32


# --- the image ------------------------------------------------------------------------------------


def test_docker_build_context_holds_the_package():
    """Every package folder that pyproject.toml installs, and the files it names, reach the image."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.name for p in ROOT.iterdir() if p.is_dir() and any(fnmatch.fnmatch(p.name, i) for i in includes)]
    assert packages
    for path in packages + ["pyproject.toml", project["project"]["readme"]]:
        assert not any(fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns), (
            f"{path} is left out of the image"
        )
