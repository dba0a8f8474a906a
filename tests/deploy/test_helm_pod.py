"""The Helm chart's pod: serving and the sidecar in one pod, probes, non-root on a read-only
root, the repo's image and roles, a GPU for serving only, the Service, HPA, PDB and
NetworkPolicy, the registry's volume."""

from __future__ import annotations

import pytest

from tests.deploy._helm import (
    ALL_ON,
    CASES,
    GPU_VALUES,
    NAME,
    SCHEMA_CASES,
    containers,
    find,
    pod_spec,
    render,
    settings_env,
    workloads,
)


def test_serving_and_sidecar_share_one_pod_and_one_settings_configmap() -> None:
    deployment = find(render(), "Deployment")
    pods = containers(deployment)
    assert set(pods) == {"serving", "monitor"}
    assert pods["serving"]["args"] == ["serve"] and pods["monitor"]["args"] == ["monitor"]
    for container in pods.values():
        assert container["envFrom"] == [{"configMapRef": {"name": f"{NAME}-modelloop-settings"}}]
    # the sidecar watches the serving process: one process namespace, one run dir
    spec = pod_spec(deployment)
    assert spec["shareProcessNamespace"] is True
    for container in pods.values():
        assert {"name": "run", "mountPath": "/run/modelloop"} in container["volumeMounts"]


def test_probes() -> None:
    pods = containers(find(render(), "Deployment"))
    serving = pods["serving"]
    assert serving["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert serving["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert serving["startupProbe"]["failureThreshold"] * serving["startupProbe"]["periodSeconds"] >= 120
    # the sidecar's routes (monitoring/app.py)
    monitor = pods["monitor"]
    assert monitor["livenessProbe"]["httpGet"] == {"path": "/live", "port": "monitor"}
    assert monitor["startupProbe"]["httpGet"] == {"path": "/live", "port": "monitor"}
    assert monitor["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "monitor"}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_every_pod_runs_non_root_on_a_read_only_root(case: str) -> None:
    for doc in workloads(render(*SCHEMA_CASES[case])):
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"]
        for name, container in containers(doc).items():
            where = f"{doc['kind']}/{doc['metadata']['name']}/{name}"
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], where


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_the_repos_image_and_entrypoint_roles(case: str) -> None:
    roles = {"serve", "monitor", "retrain", "batch", "batch-shard", "bootstrap", "modelloop"}
    for doc in workloads(render(*CASES[case])):
        for container in containers(doc).values():
            assert container["image"] == "modelloop:0.1.0"
            assert container["args"][0] in roles


@pytest.mark.parametrize(
    ("sets", "serving_image"),
    [
        # default: one image, the full one, everywhere
        ((), "modelloop:0.1.0"),
        # the Dockerfile's serving target (no torch, no Evidently) for the serving container only
        (("serving.image.tag=0.1.0-serving",), "modelloop:0.1.0-serving"),
        (("serving.image.repository=registry.example.com/modelloop-serving",),
         "registry.example.com/modelloop-serving:0.1.0"),
    ],
)
def test_serving_may_run_the_serving_image_while_sidecar_and_jobs_keep_the_full_one(
    sets: tuple[str, ...], serving_image: str
) -> None:
    docs = render((), (*ALL_ON, *sets))
    for doc in workloads(docs):
        for name, container in containers(doc).items():
            expected = serving_image if (doc["kind"], name) == ("Deployment", "serving") else "modelloop:0.1.0"
            assert container["image"] == expected, (doc["kind"], name)
    # the retraining Jobs the sidecar starts train with torch: the full image
    assert settings_env(docs)["MODELLOOP_MONITOR_JOB_IMAGE"] == "modelloop:0.1.0"


def test_gpu_values_request_a_gpu_for_serving_only() -> None:
    gpu = containers(find(render((GPU_VALUES,)), "Deployment"))
    assert gpu["serving"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["serving"]["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in gpu["monitor"]["resources"].get("limits", {})
    assert settings_env(render((GPU_VALUES,)))["MODELLOOP_SERVING_PROVIDERS"] == "cuda"
    spec = pod_spec(find(render((GPU_VALUES,)), "Deployment"))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    default = containers(find(render(), "Deployment"))
    assert "nvidia.com/gpu" not in default["serving"]["resources"]["limits"]


def test_service_hpa_pdb_and_network_policy_select_the_serving_pods() -> None:
    docs = render()
    deployment = find(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for c in containers(deployment).values() for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == ports == {"http", "grpc", "monitor"}
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert find(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = find(docs, "NetworkPolicy", f"{NAME}-modelloop")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    monitor_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "monitor")
    assert monitor_rule["from"], "the sidecar's port is not open to everyone"


def test_registry_on_a_claim_or_any_volume() -> None:
    docs = render()
    claim = find(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod_spec(find(docs, "Deployment"))["volumes"]}
    assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert settings_env(docs)["MODELLOOP_MONITOR_K8S_REGISTRY_CLAIM"] == claim["metadata"]["name"]
    # object storage through a CSI driver instead of a claim
    csi = render((), ("registry.volume.csi.driver=s3.csi.aws.com",
                      "registry.volume.csi.volumeAttributes.bucketName=models"))
    assert not [d for d in csi if d["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in pod_spec(find(csi, "Deployment"))["volumes"]}
    assert volumes["registry"] == {"name": "registry", "csi": {
        "driver": "s3.csi.aws.com", "volumeAttributes": {"bucketName": "models"}}}
