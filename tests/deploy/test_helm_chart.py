"""deploy/helm: the chart lints clean, renders with the default and GPU/HPA/KEDA values, and every object
is valid: built-in kinds strictly with kubernetes-validate for a current Kubernetes, custom resources
against their CRD schemas (tests/deploy/crds). All offline: no cluster is contacted."""

from __future__ import annotations

import pytest
import yaml

from . import crd_schema
from .conftest import CHART

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (in the dev extra)")
kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in the dev extra)")

K8S_VERSION = "1.33.0"
CUSTOM = {"keda.sh", "monitoring.coreos.com", "serving.kserve.io"}
VALUES = {"default": None, **{p.stem: p for p in sorted((CHART / "ci").glob("*.yaml"))}}


def render(values: dict | None) -> list[dict]:
    manifests = helm.Chart.load(str(CHART)).render(values, name="demo", namespace="serving", is_install=True)
    objs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            objs += [d for d in yaml.safe_load_all(text) if d]
    return objs


def _values(key: str) -> dict | None:
    return yaml.safe_load(VALUES[key].read_text()) if VALUES[key] else None


def _by_kind(objs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def _config(objs: list[dict]) -> dict[str, str]:
    maps = _by_kind(objs)["ConfigMap"]
    (text,) = [c["data"]["config.properties"] for c in maps if "config.properties" in c["data"]]
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_helm_lint_clean():
    for key in VALUES:
        report = helm.lint(str(CHART), _values(key), strict=True, kube_version=f"v{K8S_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, (key, problems)


@pytest.mark.parametrize("key", list(VALUES))
def test_every_object_validates(key):
    objs = render(_values(key))
    assert objs
    for obj in objs:
        group = obj["apiVersion"].rpartition("/")[0]
        if group in CUSTOM:
            crd_schema.validate(obj)
        else:
            kv.validate(obj, K8S_VERSION, strict=True)


def test_validation_is_not_a_no_op():
    objs = _by_kind(render(_values("gpu-hpa-values")))
    bad = yaml.safe_load(yaml.safe_dump(objs["Deployment"][0]))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
    monitor = objs["ServiceMonitor"][0]
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(Exception, match="intervall"):
        crd_schema.validate(monitor)


def test_defaults_keep_token_auth_and_management_private():
    objs = render(None)
    config = _config(objs)
    assert "disable_token_authorization" not in config
    assert config["management_address"].startswith("http://127.0.0.1:")
    assert config["enable_model_api"] == "false"
    kinds = _by_kind(objs)
    assert [s["metadata"]["name"] for s in kinds["Service"]] == ["demo-torchserve-gpu-handlers"]
    ports = {p["name"] for p in kinds["Service"][0]["spec"]["ports"]}
    assert ports == {"inference", "metrics"}
    pod = kinds["Deployment"][0]["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "tcpSocket" in pod["spec"]["containers"][0]["livenessProbe"]  # /ping needs a key with token auth
    assert kinds["PodDisruptionBudget"]
    assert "HorizontalPodAutoscaler" not in kinds and "ScaledObject" not in kinds


def test_token_auth_off_needs_a_reason():
    with pytest.raises(helm.HelmError, match="disabledReason"):
        render({"security": {"tokenAuth": {"enabled": False}}})
    config = _config(render({"security": {"tokenAuth": {"enabled": False, "disabledReason": "mesh mTLS"}}}))
    assert config["disable_token_authorization"] == "true"


def test_gpu_hpa_values():
    objs = render(_values("gpu-hpa-values"))
    kinds = _by_kind(objs)
    deployment = kinds["Deployment"][0]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["exec"]["command"][-2:] == ["resnet50", "detector"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert deployment["spec"]["template"]["spec"]["initContainers"][0]["name"] == "fetch-model-store"
    hpa = kinds["HorizontalPodAutoscaler"][0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "tsgpu_queue_depth"
    assert {s["metadata"]["name"] for s in kinds["Service"]} == {"demo-torchserve-gpu-handlers",
                                                                 "demo-torchserve-gpu-handlers-management"}
    assert _config(objs)["load_models"] == "resnet50.mar,detector.mar"


def test_keda_scales_on_a_rate():
    kinds = _by_kind(render(_values("keda-values")))
    query = kinds["ScaledObject"][0]["spec"]["triggers"][0]["metadata"]["query"]
    assert query.startswith("sum(rate(ts_queue_latency_microseconds{") and 'model_name="resnet50"' in query


@pytest.mark.parametrize("values, message", [
    ({"modelStore": {"source": "s3"}}, "use pvc, image or objectStorage"),
    ({"autoscaling": {"keda": {"enabled": True}}}, "autoscaling.model"),
    ({"modelStore": {"source": "image"}}, "modelStore.image.repository"),
])
def test_bad_values_fail_with_the_key(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def _container(pod: dict, name: str) -> dict:
    (found,) = [c for c in pod["spec"]["containers"] if c["name"] == name]
    return found


def test_autoscaler_sidecar(tmp_path):
    from archiver_scripts.cli import build_parser
    from autoscaler.policy import load_policy

    kinds = _by_kind(render(_values("autoscaler-values")))
    pod = kinds["Deployment"][0]["spec"]["template"]
    torchserve, sidecar = _container(pod, "torchserve"), _container(pod, "autoscaler")
    # the command is one the real CLI accepts, pointed at this pod's loopback ports
    args = build_parser().parse_args(sidecar["command"][1:])
    config = _config(kinds["ConfigMap"])  # the TorchServe one, not the policy
    assert args.command == "autoscale"
    assert args.management == config["management_address"] == "http://127.0.0.1:8081"
    assert args.metrics == "http://127.0.0.1:8082" and config["metrics_address"].endswith(":8082")
    # the key file is where TorchServe writes it (its working directory), on a volume both mount
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert str(args.key_file.parent) == torchserve["workingDir"] == mounts["workdir"]
    assert {"name": "workdir", "mountPath": torchserve["workingDir"]} in torchserve["volumeMounts"]
    assert {"name": "workdir", "emptyDir": {}} in pod["spec"]["volumes"]
    # the policy ConfigMap is mounted where --policy points and is a policy the controller accepts
    (policy_cm,) = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-autoscaler")]
    assert str(args.policy.parent) == mounts["autoscaler-policy"]
    (tmp_path / "policy.yaml").write_text(policy_cm["data"]["policy.yaml"])
    policy = load_policy(tmp_path / "policy.yaml")
    assert policy.models["search-embed"].priority == 10 and "cuda:0" in policy.budgets
    assert "checksum/autoscaler" in pod["metadata"]["annotations"]


def test_autoscaler_sidecar_off_by_default_and_without_key_file_when_auth_is_off():
    pod = _by_kind(render(None))["Deployment"][0]["spec"]["template"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["torchserve"]
    values = _values("autoscaler-values")
    values["security"] = {"tokenAuth": {"enabled": False, "disabledReason": "mesh mTLS"}}
    pod = _by_kind(render(values))["Deployment"][0]["spec"]["template"]
    assert "--key-file" not in _container(pod, "autoscaler")["command"]
    with pytest.raises(helm.HelmError, match="autoscaler.policy"):
        render({"autoscaler": {"enabled": True}})
