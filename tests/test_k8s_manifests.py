"""k3d config generation (edgeface/cluster.py) and the Kubernetes manifests under k8s/.

k8s/base is rendered with `kubectl kustomize` when kubectl is installed, and otherwise with a
small Python renderer that understands only what k8s/base uses. When both are available, a
test checks that they agree. Objects are validated with kubernetes-validate against the
schemas of Kubernetes 1.35 (the minor version of k3d's default k3s). The KFP kustomizations
reference GitHub and cannot be rendered offline, so only their pinning is checked.
Set EDGEFACE_UPDATE_GOLDEN=1 to rewrite tests/golden/k8s_base.yaml.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from edgeface.cli.cluster import MLFLOW_IMAGE
from edgeface.cluster import K3S_IMAGE, read_image_list, render_k3d_config, render_volumes
from edgeface.errors import ConfigError
from edgeface.fleet import (
    DATASET_PVC,
    EDGE_ROLE_LABEL,
    EDGE_ROLE_VALUE,
    PIPELINE_NAMESPACE,
    RUNNER_SERVICE_ACCOUNT,
    TRAINING_POD_LABEL,
    TRAINING_POD_VALUE,
    Fleet,
    load_fleet,
    node_pvc_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "k8s"
GOLDEN = Path(__file__).resolve().parent / "golden" / "k8s_base.yaml"
KUBERNETES_VERSION = "1.35.0"
# Distinctive values for the gitignored env files, so a test can find where they end up.
POSTGRES_USER = "golden-user"
POSTGRES_PASSWORD = "s3cretValueForTests"
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def example_fleet() -> Fleet:
    return load_fleet(REPO_ROOT / "pipelines" / "fleet.example.yaml")


@pytest.fixture(scope="session")
def k3d_schema(shared_data_dir: Path) -> dict[str, Any]:
    path = shared_data_dir.parent / "schemas" / "k3d-simpleconfig-v1alpha5.schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def base_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """k8s/base copied to a temporary folder with test values in its secret env files."""
    folder = tmp_path_factory.mktemp("k8s") / "base"
    shutil.copytree(K8S / "base", folder,
                    ignore=shutil.ignore_patterns("*.env"))
    (folder / "secrets" / "postgres.env").write_text(
        f"POSTGRES_USER={POSTGRES_USER}\nPOSTGRES_PASSWORD={POSTGRES_PASSWORD}\n")
    shutil.copyfile(folder / "secrets" / "mlflow.env.example", folder / "secrets" / "mlflow.env")
    return folder


@pytest.fixture(scope="session")
def rendered(base_copy: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl"):
        return render_with_kubectl(base_copy)
    return render_with_python(base_copy)


def render_with_kubectl(folder: Path) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                            text=True, timeout=120, check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_with_python(folder: Path) -> list[dict[str, Any]]:
    """Render the subset of kustomize that k8s/base uses: resources, secretGenerator with
    envs and disableNameSuffixHash, and `labels` pairs added to metadata only."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "secretGenerator",
                                  "generatorOptions", "labels"}, "renderer needs updating"
    assert kustomization["generatorOptions"] == {"disableNameSuffixHash": True}
    objects = []
    for resource in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((folder / resource).read_text()) if doc]
    for generator in kustomization.get("secretGenerator", []):
        data = {}
        for env_file in generator["envs"]:
            for line in (folder / env_file).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, _, value = line.partition("=")
                    data[key.strip()] = base64.b64encode(value.encode()).decode()
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": data,
                        "metadata": {"name": generator["name"],
                                     "namespace": generator["namespace"]}})
    for label_set in kustomization.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"])
            for o in objects if o["kind"] in POD_KINDS]


# --------------------------------------------------------------------------- k3d config


def mixed_fleet(tmp_path: Path, taint: bool = True) -> Fleet:
    """Three nodes with different caps: 500m/1Gi, 2/3Gi, 1/1536Mi."""
    caps = [("500m", "1Gi"), ("2", "3Gi"), ("1", "1536Mi")]
    nodes = "".join(
        f"  - {{name: n{i}, label: site-{i}, host-data-path: data/n{i}, data-path: /srv/faces, "
        f"cpu: '{cpu}', memory: {memory}}}\n" for i, (cpu, memory) in enumerate(caps)
    )
    taint_line = "edge-taint: {key: example.com/edge, effect: NoExecute}\n" if taint else ""
    path = tmp_path / "fleet.yaml"
    path.write_text(f"name: mixed\nimage: edgeface:1.0\nnode-label-key: example.com/site\n"
                    f"{taint_line}nodes:\n{nodes}")
    return load_fleet(path)


def agent_entries(entries: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry.get("nodeFilters") == [f"agent:{index}"]]


def test_k3d_config_matches_schema(example_fleet: Fleet, k3d_schema: dict[str, Any],
                                   tmp_path: Path) -> None:
    validator = jsonschema.Draft7Validator(k3d_schema,
                                           format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    configs = [
        render_k3d_config(example_fleet, host_cpus=8),
        render_k3d_config(example_fleet),
        render_k3d_config(mixed_fleet(tmp_path), host_cpus=4),
        render_k3d_config(mixed_fleet(tmp_path, taint=False), host_cpus=2),
    ]
    for config in configs:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(config)]
        assert errors == []


def test_k3d_schema_rejects_bad_config(example_fleet: Fleet, k3d_schema: dict[str, Any]) -> None:
    # Guards the schema check above against passing everything.
    config = render_k3d_config(example_fleet, host_cpus=8)
    config["options"]["k3s"]["nodeLabels"][0]["nodeFilter"] = ["agent:0"]

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, k3d_schema)


def test_k3d_one_agent_per_node(example_fleet: Fleet) -> None:
    config = render_k3d_config(example_fleet, host_cpus=8)

    assert config["apiVersion"] == "k3d.io/v1alpha5"
    assert config["kind"] == "Simple"
    assert config["metadata"] == {"name": "edgeface-demo"}
    assert config["servers"] == 1
    assert config["agents"] == 4
    assert config["image"] == K3S_IMAGE


def test_k3d_agent_mounts_only_own_folder(tmp_path: Path) -> None:
    fleet = mixed_fleet(tmp_path)
    config = render_k3d_config(fleet, host_cpus=4)

    assert len(config["volumes"]) == len(fleet.nodes)
    for index, node in enumerate(fleet.nodes):
        mounts = agent_entries(config["volumes"], index)
        assert [m["volume"] for m in mounts] == [f"{node.host_data_path}:/srv/faces"]
        others = [v for v in config["volumes"] if str(node.host_data_path) in v["volume"]]
        assert others == mounts


def test_k3d_agent_labels(tmp_path: Path) -> None:
    fleet = mixed_fleet(tmp_path)
    labels = render_k3d_config(fleet, host_cpus=4)["options"]["k3s"]["nodeLabels"]

    for index in range(len(fleet.nodes)):
        assert sorted(e["label"] for e in agent_entries(labels, index)) == sorted(
            [f"example.com/site=site-{index}", f"{EDGE_ROLE_LABEL}={EDGE_ROLE_VALUE}"])
    assert all(len(entry["nodeFilters"]) == 1 for entry in labels)


def test_k3d_taint_on_every_agent(tmp_path: Path) -> None:
    args = render_k3d_config(mixed_fleet(tmp_path), host_cpus=4)["options"]["k3s"]["extraArgs"]

    for index in range(3):
        taints = [e["arg"] for e in agent_entries(args, index) if "--node-taint" in e["arg"]]
        assert taints == ["--node-taint=example.com/edge=:NoExecute"]
    server_args = [e["arg"] for e in args if e["nodeFilters"] == ["server:*"]]
    assert server_args == ["--disable=traefik"]


def test_k3d_no_taint_when_unset(tmp_path: Path) -> None:
    args = render_k3d_config(mixed_fleet(tmp_path, taint=False), host_cpus=4)

    assert not any("--node-taint" in e["arg"] for e in args["options"]["k3s"]["extraArgs"])


def test_k3d_caps_via_system_reserved(tmp_path: Path) -> None:
    config = render_k3d_config(mixed_fleet(tmp_path), host_cpus=4)
    args = config["options"]["k3s"]["extraArgs"]

    assert config["options"]["runtime"]["agentsMemory"] == "3072Mi"
    expected = {
        0: "--kubelet-arg=system-reserved=cpu=3500m,memory=2048Mi",
        1: "--kubelet-arg=system-reserved=cpu=2000m",
        2: "--kubelet-arg=system-reserved=cpu=3000m,memory=1536Mi",
    }
    for index, arg in expected.items():
        reserved = [e["arg"] for e in agent_entries(args, index) if "system-reserved" in e["arg"]]
        assert reserved == [arg]


def test_k3d_no_cpu_reservation_without_host(tmp_path: Path) -> None:
    args = render_k3d_config(mixed_fleet(tmp_path))["options"]["k3s"]["extraArgs"]
    reserved = [e["arg"] for e in args if "system-reserved" in e["arg"]]

    assert reserved == ["--kubelet-arg=system-reserved=memory=2048Mi",
                        "--kubelet-arg=system-reserved=memory=1536Mi"]


def test_k3d_node_larger_than_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'n1' asks for cpu 2, but the Docker host has only 1"):
        render_k3d_config(mixed_fleet(tmp_path), host_cpus=1)


# --------------------------------------------------------------------------- data volumes


def fleet_with_dataset(tmp_path: Path) -> Fleet:
    path = tmp_path / "fleet.yaml"
    nodes = "".join(f"  - {{name: n{i}, label: site-{i}, host-data-path: data/n{i}, "
                    f"data-path: /srv/faces, cpu: '1', memory: 1Gi}}\n" for i in range(3))
    path.write_text("name: ds\nimage: edgeface:1.0\nnode-label-key: example.com/site\n"
                    f"dataset-host-path: data/all\nnodes:\n{nodes}")
    return load_fleet(path)


def test_volumes_valid_for_k8s_135(example_fleet: Fleet, tmp_path: Path) -> None:
    for fleet in (example_fleet, fleet_with_dataset(tmp_path)):
        documents = render_volumes(fleet)
        assert documents
        for obj in documents:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_node_volume_pinned_to_node(tmp_path: Path) -> None:
    fleet = fleet_with_dataset(tmp_path)
    documents = render_volumes(fleet)
    volumes = {o["metadata"]["name"]: o for o in documents if o["kind"] == "PersistentVolume"}
    claims = {o["metadata"]["name"]: o for o in documents
              if o["kind"] == "PersistentVolumeClaim"}

    for node in fleet.nodes:
        name = node_pvc_name(node.name)
        volume, claim = volumes[name], claims[name]
        [term] = volume["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert term["matchExpressions"] == [
            {"key": "example.com/site", "operator": "In", "values": [node.label]}]
        assert volume["spec"]["hostPath"] == {"path": "/srv/faces", "type": "Directory"}
        assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
        assert volume["spec"]["claimRef"] == {"namespace": PIPELINE_NAMESPACE, "name": name}
        assert claim["metadata"]["namespace"] == PIPELINE_NAMESPACE
        assert claim["spec"]["volumeName"] == name
        # An empty class keeps k3s's local-path provisioner from creating another volume.
        assert claim["spec"]["storageClassName"] == ""


def test_dataset_volume_on_every_k3d_node(tmp_path: Path) -> None:
    fleet = fleet_with_dataset(tmp_path)
    documents = render_volumes(fleet)
    [dataset] = [o for o in documents
                 if o["kind"] == "PersistentVolume" and o["metadata"]["name"] == DATASET_PVC]
    assert "nodeAffinity" not in dataset["spec"]
    assert dataset["spec"]["accessModes"] == ["ReadOnlyMany"]
    mount = dataset["spec"]["hostPath"]["path"]
    [entry] = [v for v in render_k3d_config(fleet, host_cpus=8)["volumes"]
               if v["volume"].endswith(f":{mount}")]
    assert entry == {"volume": f"{tmp_path / 'data' / 'all'}:{mount}",
                     "nodeFilters": ["server:*", "agent:*"]}


def test_no_dataset_volume_without_host_path(tmp_path: Path) -> None:
    fleet = mixed_fleet(tmp_path)
    names = [o["metadata"]["name"] for o in render_volumes(fleet)]
    assert DATASET_PVC not in names
    assert len(names) == 2 * len(fleet.nodes)


def test_pipeline_mounts_rendered_claims(example_fleet: Fleet) -> None:
    from pipelines.federated import DEFAULT_DATASET_PVC
    from pipelines.federated import node_pvc_name as pipeline_pvc_name

    claims = {o["metadata"]["name"] for o in render_volumes(example_fleet)
              if o["kind"] == "PersistentVolumeClaim"}
    assert {pipeline_pvc_name(node) for node in example_fleet.nodes} | {DEFAULT_DATASET_PVC} == claims


# --------------------------------------------------------------------------- k8s/base


def test_base_objects_valid_for_k8s_135(rendered: list[dict[str, Any]]) -> None:
    assert len(rendered) >= 10
    for obj in rendered:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_schema_check_rejects_typo(rendered: list[dict[str, Any]]) -> None:
    deployment = json.loads(json.dumps(find(rendered, "Deployment", "mlflow")))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_python_renderer_matches_kubectl(base_copy: Path) -> None:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed; only the Python renderer is available")
    assert sort_objects(render_with_kubectl(base_copy)) == sort_objects(
        render_with_python(base_copy))


def test_every_container_non_root(rendered: list[dict[str, Any]]) -> None:
    templates = pod_templates(rendered)
    assert {name for name, _ in templates} == {"Deployment/mlflow", "StatefulSet/postgres"}
    for name, template in templates:
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        assert template["spec"].get("automountServiceAccountToken") is False, name
        containers = template["spec"]["containers"] + template["spec"].get("initContainers", [])
        for container in containers:
            context = container.get("securityContext", {})
            where = f"{name} container {container['name']}"
            assert context.get("runAsNonRoot") is True, where
            assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities") == {"drop": ["ALL"]}, where
            assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert context.get("privileged") in (None, False), where


def test_every_container_has_resources_and_probes(rendered: list[dict[str, Any]]) -> None:
    for name, template in pod_templates(rendered):
        for container in template["spec"]["containers"]:
            where = f"{name} container {container['name']}"
            resources = container.get("resources", {})
            for section in ("requests", "limits"):
                assert set(resources.get(section, {})) == {"cpu", "memory"}, where
            assert "readinessProbe" in container, where
            assert "livenessProbe" in container, where
            assert ":" in container["image"] and not container["image"].endswith(":latest"), where


def test_namespace_enforces_restricted_pods(rendered: list[dict[str, Any]],
                                            example_fleet: Fleet) -> None:
    namespace = find(rendered, "Namespace", example_fleet.namespace)

    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_no_secret_values_in_plain_manifests() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                assert doc.get("kind") != "Secret", f"{path} defines a Secret with values"
                if doc.get("kind") == "Kustomization":
                    for generator in doc.get("secretGenerator", []):
                        assert "literals" not in generator, f"{path}: literal secret values"
    for example in sorted((K8S / "base" / "secrets").glob("*.env.example")):
        values = [line.split("=", 1)[1] for line in example.read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
        assert all(value in ("", "mlflow", "change-me") for value in values), example


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_secret_env_files_gitignored() -> None:
    for name in ("postgres.env", "mlflow.env"):
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "check-ignore", "-q", f"k8s/base/secrets/{name}"],
            timeout=30)
        assert result.returncode == 0, f"k8s/base/secrets/{name} is not gitignored"
    result = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q",
                             "k8s/base/secrets/postgres.env.example"], timeout=30)
    assert result.returncode == 1


def test_secret_values_only_in_secrets(rendered: list[dict[str, Any]]) -> None:
    secret = find(rendered, "Secret", "edgeface-postgres")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}

    assert decoded == {"POSTGRES_USER": POSTGRES_USER, "POSTGRES_PASSWORD": POSTGRES_PASSWORD}
    for obj in rendered:
        if obj["kind"] != "Secret":
            assert POSTGRES_PASSWORD not in json.dumps(obj), obj["metadata"]["name"]


def test_component_settings_match_fleet(rendered: list[dict[str, Any]],
                                        example_fleet: Fleet) -> None:
    config_map = find(rendered, "ConfigMap", example_fleet.mlflow.config_map)
    secret = find(rendered, "Secret", example_fleet.mlflow.secret)
    service = find(rendered, "Service", "mlflow")

    assert config_map["metadata"]["namespace"] == PIPELINE_NAMESPACE
    assert secret["metadata"]["namespace"] == PIPELINE_NAMESPACE
    assert service["metadata"]["namespace"] == example_fleet.namespace
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]
    assert config_map["data"]["MLFLOW_TRACKING_URI"] == (
        f"http://mlflow.{example_fleet.namespace}.svc:5000")
    assert config_map["data"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert int(config_map["data"]["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3


def test_mlflow_server_flags(rendered: list[dict[str, Any]]) -> None:
    container = find(rendered, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    env = {item["name"]: item.get("value") for item in container["env"]}

    assert container["image"] == MLFLOW_IMAGE
    assert container["command"] == ["mlflow", "server"]
    assert "--workers=1" in args
    assert "--serve-artifacts" in args
    backend = next(a for a in args if a.startswith("--backend-store-uri="))
    assert backend.startswith("--backend-store-uri=postgresql+psycopg2://")
    assert "@postgres.edgeface.svc:5432/" in backend
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    for host in ("localhost:*", "127.0.0.1:*", "mlflow:*", "mlflow.edgeface.svc:*"):
        assert host in hosts
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    volumes = find(rendered, "Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "artifacts",
            "persistentVolumeClaim": {"claimName": "mlflow-artifacts"}} in volumes


def test_mlflow_image_recipe_pinned() -> None:
    dockerfile = (K8S / "mlflow" / "Dockerfile").read_text()

    assert "ARG MLFLOW_IMAGE=ghcr.io/mlflow/mlflow:v3.17.2" in dockerfile
    assert re.search(r"psycopg2-binary==\d+\.\d+\.\d+", dockerfile)
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.MULTILINE)
    assert MLFLOW_IMAGE.endswith(":3.17.2")


def test_services_select_their_pods(rendered: list[dict[str, Any]]) -> None:
    for name, workload_kind in (("mlflow", "Deployment"), ("postgres", "StatefulSet")):
        selector = find(rendered, "Service", name)["spec"]["selector"]
        labels = find(rendered, workload_kind, name)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name


def test_runner_rbac_least_privilege(rendered: list[dict[str, Any]]) -> None:
    role = find(rendered, "Role", RUNNER_SERVICE_ACCOUNT)
    binding = find(rendered, "RoleBinding", RUNNER_SERVICE_ACCOUNT)
    find(rendered, "ServiceAccount", RUNNER_SERVICE_ACCOUNT)

    assert role["metadata"]["namespace"] == PIPELINE_NAMESPACE
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert not {"create", "delete", "update"} & set(rule["verbs"]) or rule["resources"] == [
            "workflowtaskresults"], rule
        if rule["resources"] == ["secrets"]:
            assert rule.get("resourceNames"), "secret access must name the secrets"
    pod_rules = [r for r in role["rules"] if "pods" in r["resources"]]
    assert [r["verbs"] for r in pod_rules] == [["get"]]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": RUNNER_SERVICE_ACCOUNT}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RUNNER_SERVICE_ACCOUNT,
                                    "namespace": PIPELINE_NAMESPACE}]


def test_training_policy_selects_training_pods(rendered: list[dict[str, Any]]) -> None:
    policy = find(rendered, "NetworkPolicy", "edge-training-egress")

    assert policy["metadata"]["namespace"] == PIPELINE_NAMESPACE
    assert policy["spec"]["podSelector"] == {
        "matchLabels": {TRAINING_POD_LABEL: TRAINING_POD_VALUE}}
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"].get("ingress", []) == []


def test_training_egress_only_allowed_peers(rendered: list[dict[str, Any]],
                                            example_fleet: Fleet) -> None:
    egress = find(rendered, "NetworkPolicy", "edge-training-egress")["spec"]["egress"]
    allowed = set()
    for rule in egress:
        assert rule.get("ports"), f"egress rule without ports allows everything: {rule}"
        assert rule.get("to"), f"egress rule without peers allows every address: {rule}"
        for peer in rule["to"]:
            namespace = peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
                "kubernetes.io/metadata.name", PIPELINE_NAMESPACE if "ipBlock" not in peer else "*")
            pods = tuple(sorted(peer.get("podSelector", {}).get("matchLabels", {}).items()))
            if "ipBlock" in peer:
                pods = (("ipBlock", peer["ipBlock"]["cidr"]),)
            for port in rule["ports"]:
                allowed.add((namespace, pods, port["protocol"], port["port"]))

    mlflow_pods = find(rendered, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert allowed == {
        (example_fleet.namespace, (("app.kubernetes.io/name", "mlflow"),), "TCP", 5000),
        (PIPELINE_NAMESPACE, (("app", "seaweedfs"),), "TCP", 8333),
        (PIPELINE_NAMESPACE, (("app", "minio"),), "TCP", 9000),
        (PIPELINE_NAMESPACE, (("app", "ml-pipeline"),), "TCP", 8887),
        (PIPELINE_NAMESPACE, (("app", "ml-pipeline"),), "TCP", 8888),
        (PIPELINE_NAMESPACE, (("component", "metadata-grpc-server"),), "TCP", 8080),
        ("*", (("ipBlock", "0.0.0.0/0"),), "TCP", 6443),
        ("kube-system", (("k8s-app", "kube-dns"),), "UDP", 53),
        ("kube-system", (("k8s-app", "kube-dns"),), "TCP", 53),
    }
    assert mlflow_pods["app.kubernetes.io/name"] == "mlflow"


def test_postgres_reachable_only_from_mlflow(rendered: list[dict[str, Any]]) -> None:
    policy = find(rendered, "NetworkPolicy", "postgres-from-mlflow-only")

    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "postgres"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{
        "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}],
        "ports": [{"protocol": "TCP", "port": 5432}],
    }]


def sort_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(objects, key=lambda o: (o["kind"], o["metadata"].get("namespace", ""),
                                          o["metadata"]["name"]))


def normalized(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort objects and replace secret values, which come from the gitignored env files."""
    result = json.loads(json.dumps(objects))
    for obj in result:
        if obj["kind"] == "Secret":
            obj["data"] = {key: "<from secrets/*.env>" for key in obj.get("data") or {}}
    return sort_objects(result)


def test_rendered_base_matches_golden(rendered: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(normalized(rendered), sort_keys=True)
    if os.environ.get("EDGEFACE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("# Rendered k8s/base; regenerate with EDGEFACE_UPDATE_GOLDEN=1 "
                          "pytest tests/test_k8s_manifests.py\n" + text)
    assert GOLDEN.is_file(), "golden file missing: run with EDGEFACE_UPDATE_GOLDEN=1"
    expected = [doc for doc in yaml.safe_load_all(GOLDEN.read_text()) if doc]

    assert normalized(rendered) == expected


# --------------------------------------------------------------------------- k8s/kfp


KFP_REF = re.compile(
    r"^github\.com/kubeflow/pipelines/manifests/kustomize/(?P<path>[\w/-]+)\?ref=(?P<tag>[\w.]+)$")


def kfp_resource(folder: str) -> re.Match[str]:
    kustomization = yaml.safe_load((K8S / "kfp" / folder / "kustomization.yaml").read_text())
    assert len(kustomization["resources"]) == 1
    match = KFP_REF.match(kustomization["resources"][0])
    assert match, kustomization["resources"][0]
    return match


def test_kfp_references_pinned_to_release() -> None:
    cluster_scoped = kfp_resource("cluster-scoped")
    platform = kfp_resource("platform-agnostic")

    assert cluster_scoped["path"] == "cluster-scoped-resources"
    assert platform["path"] == "env/platform-agnostic"
    assert re.fullmatch(r"2\.17\.\d+", cluster_scoped["tag"])
    assert platform["tag"] == cluster_scoped["tag"]


def test_kfp_image_list_matches_release() -> None:
    tag = kfp_resource("platform-agnostic")["tag"]
    images = read_image_list(K8S / "kfp" / "images.txt")

    kfp_images = [image for image in images if image.startswith("ghcr.io/kubeflow/kfp-")]
    assert {image.rsplit(":", 1)[1] for image in kfp_images} == {tag}
    names = {image.rsplit(":", 1)[0].rsplit("/", 1)[1] for image in images}
    for needed in ("kfp-api-server", "kfp-driver", "kfp-launcher", "argoexec",
                   "workflow-controller", "mysql", "seaweedfs", "ml_metadata_store_server",
                   "busybox"):
        assert needed in names
    for image in images:
        assert re.fullmatch(r"[\w.\-/:]+:[\w.\-]+", image), image
    assert len(images) == len(set(images))
