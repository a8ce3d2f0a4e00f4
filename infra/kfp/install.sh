#!/usr/bin/env bash
# Install Kubeflow Pipelines standalone from its pinned upstream manifests (the backend that matches the
# kfp / kfp-server-api 2.17.3 of requirements.lock). Needs kubectl with a cluster context.
set -euo pipefail
PIPELINE_VERSION="${PIPELINE_VERSION:-2.17.3}"
kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=${PIPELINE_VERSION}"
kubectl wait --for condition=established --timeout=60s crd/applications.app.k8s.io
kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=${PIPELINE_VERSION}"
kubectl -n kubeflow wait --for=condition=Available --timeout=600s deployment/ml-pipeline
echo "KFP ${PIPELINE_VERSION} ready: kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80"
