"""infra/ and the README agree: the namespaces and service names the README uses are the rendered ones, pipeline pods
get their S3 endpoint from the ConfigMap the pipelines name, and infra/README.md documents every Secret and ConfigMap
that a manifest or a compiled pipeline refers to."""

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


def render(overlay):
    kubectl = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
    built = subprocess.run([kubectl, "kustomize", str(ROOT / "infra" / "overlays" / overlay)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def referenced_names(node, found):
    """Secret and ConfigMap names that a manifest refers to (env, envFrom, volumes)."""
    if isinstance(node, dict):
        for key in ("secretKeyRef", "secretRef", "configMapRef", "configMapKeyRef"):
            if key in node:
                found.add(node[key]["name"])
        if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
            found.add(node["secret"]["secretName"])
        for value in node.values():
            referenced_names(value, found)
    elif isinstance(node, list):
        for value in node:
            referenced_names(value, found)
    return found


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rendered_names_are_the_readmes(overlay):
    from alignclip_kfp.pipelines.alignclip_pipeline import ClusterSettings

    docs = render(overlay)
    services = {d["metadata"]["name"]: d["metadata"].get("namespace") for d in docs if d["kind"] == "Service"}
    assert services["mlflow"] == "alignclip"
    readme = (ROOT / "README.md").read_text() + (ROOT / "infra" / "README.md").read_text()
    assert set(re.findall(r"kubectl -n ([a-z0-9-]+)", readme)) <= {"alignclip", "kubeflow"}
    assert "mlflow.alignclip:5000" in readme
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    assert "mlflow.alignclip:5000" in " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    (env,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ClusterSettings().env_config_map]
    assert env["metadata"]["namespace"] == "kubeflow"
    endpoint = env["data"]["AWS_ENDPOINT_URL_S3"]
    # resume checkpoints of retried train tasks go to a bucket the bucket Job creates
    assert env["data"]["ALIGNCLIP_CHECKPOINT_ROOT"].startswith("s3://alignclip-data/")
    if overlay == "dev":  # the in-cluster store: the s3 Service of namespace alignclip, on its port
        port = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "s3")["spec"]["ports"][0]["port"]
        assert endpoint == f"http://s3.alignclip.svc.cluster.local:{port}"
    else:
        assert endpoint.startswith("https://")


def test_infra_readme_documents_every_secret_and_config_map(tmp_path):
    from alignclip_kfp.client import cluster_settings, compile_pipeline

    names = set()
    for overlay in ("dev", "prod"):
        for doc in render(overlay):
            referenced_names(doc, names)
            if doc["kind"] == "ConfigMap":
                names.add(doc["metadata"]["name"])
    spec, platform = package_docs(compile_pipeline("demo", tmp_path / "p.yaml", cluster_settings(image="r/a:1")))
    for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        names |= {s["secretName"] for s in executor.get("secretAsEnv", [])}
        names |= {c["configMapName"] for c in executor.get("configMapAsEnv", [])}
    assert {"alignclip-s3", "alignclip-mlflow", "alignclip-pipeline-env", "alignclip-postgres"} <= names
    table = (ROOT / "infra" / "README.md").read_text()
    for name in names:
        assert re.search(rf"^\| `{re.escape(name)}` \|", table, re.M), f"{name} is not documented in infra/README.md"
    assert '"identities"' in table and '"accessKey"' in table  # the SeaweedFS s3.json format
