"""The security settings of infra/, read from what `kubectl kustomize` renders for each overlay (the manifests a
cluster would receive), plus a schema check: non-root, read-only root filesystems, limits and deadlines on every
container, no secret on any command line, MLflow behind its basic-auth app, and NetworkPolicies whose meaning
(evaluated here with the Kubernetes rules written out) lets only pipeline pods reach MLflow and the store."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.kfp_package import package_docs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OVERLAYS = ["dev", "prod"]
PIPELINE_POD = {"alignclip.io/pipeline-task": "true"}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
    built = subprocess.run([kubectl, "kustomize", str(ROOT / "infra" / "overlays" / overlay)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def pod_templates(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield doc, doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]


def containers(template):
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


def test_rendered_manifests_pass_the_schema_check(rendered):
    import kubernetes_validate

    _, docs = rendered
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)


def test_every_container_is_non_root_read_only_and_limited(rendered):
    overlay, docs = rendered
    templates = list(pod_templates(docs))
    assert len(templates) == (5 if overlay == "dev" else 3)  # mlflow, users job, postgres (+ seaweedfs, buckets job)
    for owner, template in templates:
        where = f"{overlay}: {owner['kind']}/{owner['metadata']['name']}"
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where  # none of them talks to the Kubernetes API
        for container in containers(template):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits), where
            # a read-only root needs somewhere to write temporary files: an emptyDir with a size limit
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, where
            volume = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])
            assert volume["emptyDir"]["sizeLimit"], where
        if owner["kind"] == "Job":
            assert owner["spec"]["activeDeadlineSeconds"] > 0, where


def secret_env_names(container) -> set[str]:
    names = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    if any("secretRef" in source for source in container.get("envFrom", [])):
        names.add("*")  # every variable of that Secret: no $(VAR) of unknown origin may appear either
    return names


def command_lines(container) -> list[str]:
    lines = list(container.get("command", [])) + list(container.get("args", []))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        lines += container.get(probe, {}).get("exec", {}).get("command", [])
    return lines


def test_no_secret_reaches_a_command_line(rendered):
    overlay, docs = rendered
    for owner, template in pod_templates(docs):
        for container in containers(template):
            secret_vars = secret_env_names(container)
            plain_vars = {e["name"] for e in container.get("env", []) if "value" in e}
            for line in command_lines(container):
                where = f"{overlay}: {owner['metadata']['name']}/{container['name']}: {line[:80]!r}"
                # Kubernetes expands $(VAR) into the process arguments (visible in ps, /proc/*/cmdline)
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", line):
                    assert var in plain_vars and var not in secret_vars, where
                assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", line), where  # user:password@ in a URI
                assert not re.search(r"(?i)(^|\s)--?[\w-]*(password|secret|token)[\w-]*[= ]", line), where  # --password=...
            # nor in a plain env value (kept in the pod spec, readable with `kubectl get -o yaml`)
            for env in container.get("env", []):
                if "value" in env:
                    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", env["value"]), where
                    assert "$(" not in env["value"], f"{overlay}: {env['name']}"
    # Secrets are referenced by name, never defined with values
    assert "Secret" not in {d["kind"] for d in docs}


def test_mlflow_requires_authentication_with_credentials_from_secrets(rendered):
    overlay, docs = rendered
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in container["args"]
    # artifacts through the server (no store credentials in clients), requests only for the service's own host names
    assert {a.split("=")[0] for a in container["args"]} >= {"--serve-artifacts", "--allowed-hosts"}
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGUSER", "PGPASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    # the backend store URI names host and database only; libpq takes user and password from PGUSER/PGPASSWORD
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql+psycopg2://postgres:5432/mlflow"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth")
    auth = config["data"]["basic_auth.ini"]
    assert "admin_password" not in auth and "@" not in auth
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"]).parent) in mounted
    # the pipelines' user (alignclip-mlflow) is created by a Job signed in as the admin
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "mlflow-users")
    job_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if "valueFrom" in e}
    assert job_env == {"MLFLOW_TRACKING_USERNAME": "alignclip-mlflow-admin", "MLFLOW_TRACKING_PASSWORD": "alignclip-mlflow-admin",
                       "PIPELINE_USERNAME": "alignclip-mlflow", "PIPELINE_PASSWORD": "alignclip-mlflow"}


# NetworkPolicy semantics (networking.k8s.io/v1), written out: a pod that no policy selects for Ingress accepts
# everything; a selected pod accepts a connection if some ingress rule of some selecting policy admits both the
# peer and the port. A peer with podSelector alone means the policy's namespace; namespaceSelector + podSelector
# in one peer means both must match.
def matches(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return True
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression.get("values", []):
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def allowed(policies, target_namespace, target_labels, source_namespace, source_labels, port) -> bool:
    selecting = [p for p in policies if p["metadata"]["namespace"] == target_namespace
                 and matches(p["spec"]["podSelector"], target_labels) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    source_namespace_labels = {"kubernetes.io/metadata.name": source_namespace}
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and not any(p.get("port") == port for p in rule["ports"]):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if "namespaceSelector" in peer:
                    same = matches(peer["namespaceSelector"], source_namespace_labels)
                else:
                    same = source_namespace == target_namespace
                if same and matches(peer.get("podSelector"), source_labels):
                    return True
    return False


def test_network_policies_admit_only_pipeline_pods_to_mlflow_and_the_store(rendered):
    overlay, docs = rendered
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    ns = next(d for d in docs if d["kind"] == "Deployment")["metadata"]["namespace"]
    labels = {d["metadata"]["name"]: {**d["spec"]["template"]["metadata"]["labels"]} for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    job_labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Job"}

    def reach(target, port, source_ns, source_labels):
        return allowed(policies, ns, labels[target], source_ns, source_labels, port)

    # MLflow: pipeline task pods of KFP's namespace and the users Job; nobody else
    assert reach("mlflow", 5000, "kubeflow", PIPELINE_POD)
    assert reach("mlflow", 5000, ns, job_labels["mlflow-users"])
    assert not reach("mlflow", 5000, "kubeflow", {"app": "ml-pipeline-ui"})
    assert not reach("mlflow", 5000, "default", PIPELINE_POD)  # the label alone, from another namespace
    assert not reach("mlflow", 5000, ns, {"app": "anything"})
    assert not reach("mlflow", 22, "kubeflow", PIPELINE_POD)
    # PostgreSQL: MLflow only
    assert reach("postgres", 5432, ns, labels["mlflow"])
    assert not reach("postgres", 5432, "kubeflow", PIPELINE_POD)
    assert not reach("postgres", 5432, ns, job_labels["mlflow-users"])
    if overlay == "dev":  # the in-cluster S3 store: pipelines, MLflow (artifacts) and the bucket Job
        assert reach("seaweedfs", 8333, "kubeflow", PIPELINE_POD)
        assert reach("seaweedfs", 8333, ns, labels["mlflow"])
        assert reach("seaweedfs", 8333, ns, job_labels["s3-buckets"])
        assert not reach("seaweedfs", 8333, "kubeflow", {"app": "ml-pipeline"})
        assert not reach("seaweedfs", 8333, ns, labels["postgres"])
    else:  # prod's store is external: no policy may name the removed in-cluster store
        assert "seaweedfs" not in labels and all(p["metadata"]["name"] != "s3-from-pipelines" for p in policies)


def test_every_pipeline_task_carries_the_admitted_label_limits_a_deadline_and_a_non_root_user(tmp_path):
    """The compiled KFP package: every task pod has the label the NetworkPolicies admit, CPU/memory limits, an
    activeDeadlineSeconds and the image's non-root user."""
    from alignclip_kfp.client import compile_pipeline

    spec, platform = package_docs(compile_pipeline("demo", tmp_path / "demo.yaml"))
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every task has Kubernetes settings
    policies = [d for d in render("dev") if d["kind"] == "NetworkPolicy"]
    admitted = [peer["podSelector"]["matchLabels"] for p in policies if p["metadata"]["name"] == "mlflow-from-pipelines"
                for rule in p["spec"]["ingress"] for peer in rule["from"] if "namespaceSelector" in peer]
    for name, kubernetes in executors.items():
        labels = kubernetes["podMetadata"]["labels"]
        assert admitted and all(matches({"matchLabels": selector}, labels) for selector in admitted), name
        assert kubernetes["securityContext"]["runAsNonRoot"] is True and int(kubernetes["securityContext"]["runAsUser"]) == 1000
        resources = spec["deploymentSpec"]["executors"][name]["container"]["resources"]
        assert resources["resourceCpuLimit"] and resources["resourceMemoryLimit"], name
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], name
        gpu = "accelerator" in resources
        assert int(kubernetes["activeDeadlineSeconds"]) == (48 if gpu else 6) * 3600, name
        if gpu:  # limits equal to requests: Guaranteed QoS on the GPU node
            assert resources["resourceCpuLimit"] == resources["resourceCpuRequest"]
            assert resources["resourceMemoryLimit"] == resources["resourceMemoryRequest"]
