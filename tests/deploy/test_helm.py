"""The Helm chart, checked by the tools: helm lint, helm template with the default and GPU
values, every rendered manifest against the Kubernetes schemas (kubernetes-validate, offline),
and bad values refused with a clear message. The bits that matter are checked one by one in
test_helm_pod.py, test_helm_keys.py, test_helm_jobs.py, test_helm_settings.py and
test_helm_observability.py."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from tests.deploy._helm import (
    GPU_VALUES,
    KUBE_VERSIONS,
    NAME,
    OPERATOR_KINDS,
    SCHEMA_CASES,
    find,
    render,
)
from tests.deploy._support import (
    CHART,
    run,
    tool,
)


@pytest.mark.parametrize("values", [(), (GPU_VALUES,)], ids=["default", "gpu"])
def test_helm_lint(values: tuple) -> None:
    args = [tool("helm"), "lint", "--strict", str(CHART)]
    for path in values:
        args += ["-f", str(path)]
    result = run(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(case: str, version: str) -> None:
    errors = []
    for doc in render(*SCHEMA_CASES[case]):
        if doc["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_schema_validation_catches_a_typo() -> None:
    deployment = json.loads(json.dumps(find(render(), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError, match="'periodSecond' was unexpected"):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        # the model to serve is required
        (("model=",), "values: `model` (the registered model to serve) is required"),
        # a typo in a key is caught by values.schema.json, not silently ignored
        (("serving.setings.workers=2",), "at '/serving': additional properties 'setings' not allowed"),
        # a store the sidecar cannot use
        (("monitor.store.url=mysql://db/events",), "at '/monitor/store/url': 'mysql://db/events' does not match pattern"),
        # zero GPUs asked for while GPUs are enabled
        (("serving.gpu.enabled=true", "serving.gpu.count=0"), "at '/serving/gpu/count': minimum"),
        # a settings key that is no identifier
        (("serving.settings.Max-Rows=3",), "invalid propertyName 'Max-Rows'"),
        # keys given as settings would land in the ConfigMap: refused, each where it was given
        (("monitor.settings.api_key=0123456789abcdef",),
         "values: monitor.settings.api_key would put a key into the settings ConfigMap"),
        (("monitor.settings.feedback_key=0123456789abcdef",),
         "values: monitor.settings.feedback_key would put a key into the settings ConfigMap"),
        (("serving.settings.sidecar_key=0123456789abcdef",),
         "values: serving.settings.sidecar_key would put a key into the settings ConfigMap"),
        (("jobs.trainingSettings.sidecar_key=0123456789abcdef",),
         "values: jobs.trainingSettings.sidecar_key would put a key into the settings ConfigMap"),
        # a typo in the keys' Secret is not silently a generated one
        (("monitor.keys.existingsecret=my-keys",),
         "at '/monitor/keys': additional properties 'existingsecret' not allowed"),
    ],
)
def test_bad_values_fail_with_a_clear_message(sets: tuple, message: str) -> None:
    args = [tool("helm"), "template", NAME, str(CHART)]
    for item in sets:
        args += ["--set", item]
    result = run(args)
    assert result.returncode != 0
    assert message in result.stderr
