"""deploy/kubernetes/, deploy/ec2/ and deploy/Dockerfile, validated offline with real tools.

- every Kubernetes manifest with ``kubernetes-validate --strict`` (the schemas of the
  Kubernetes version it ships, 1.37 for kubernetes-validate 1.37.0);
- the custom resources (PodMonitor, ScaledObject) with ``check-jsonschema`` against their
  CRDs' own ``openAPIV3Schema`` (tests/fixtures/crds/), unknown fields rejected as the API
  server's strict field validation does;
- the CloudFormation template with ``cfn-lint``, and its user data with ``bash -n``;
- the numbers that must agree across files: the stop budget (grace period, shutdown delay,
  drain timeout, deregistration delay, lifecycle hook timeout), probes, selectors, and the
  fleet.toml each deployment runs, loaded by our own config loader.

Each tool is also shown a broken copy, so a validator that checks nothing fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.access import insecure_settings
from balancer.client_address import parse_networks, too_wide
from supervisor.config import DEFAULT_IMAGE, load_config

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
EC2 = ROOT / "deploy" / "ec2" / "neuron-fleet.yaml"
CRDS = ROOT / "tests" / "fixtures" / "crds"
BIN = Path(sys.executable).parent
CUSTOM_KINDS = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
                "ScaledObject": "keda.sh_scaledobjects.yaml"}  # fmt: skip


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} missing: install the test extras (pip install -e '.[test]')"
    return str(path)


def run(*argv: str) -> tuple[int, str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one resource of that kind in deploy/kubernetes (kustomization aside)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        (doc,) = list(yaml.safe_load_all(path.read_text()))
        assert doc["kind"] not in found, f"two {doc['kind']} resources"
        doc["__file__"] = path
        found[doc["kind"]] = doc
    return found


def fleet_toml_k8s() -> str:
    return manifests()["ConfigMap"]["data"]["fleet.toml"]


def load_fleet(text: str, tmp_path: Path) -> Any:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return load_config(str(path), env={}, check_host=False, inventory=None)


# -- Kubernetes ---------------------------------------------------------------------------


def test_core_manifests_pass_strict_kubernetes_validate(tmp_path: Path) -> None:
    core = [str(d["__file__"]) for d in manifests().values() if d["kind"] not in CUSTOM_KINDS]
    assert len(core) >= 8
    code, out = run(tool("kubernetes-validate"), "--strict", *core)
    assert code == 0, out
    assert out.count("passed") == len(core), out

    # A misspelt field must fail: the check is strict, not just "parses as YAML".
    broken = tmp_path / "deployment.yaml"
    text = (K8S / "deployment.yaml").read_text()
    broken.write_text(text.replace("readinessProbe:", "readynessProbe:", 1))
    code, out = run(tool("kubernetes-validate"), "--strict", str(broken))
    assert code != 0 and "readynessProbe" in out, out


def _crd_json_schema(crd_file: Path, version: str) -> dict[str, Any]:
    """The CRD's schema for ``version`` as JSON Schema, closed like the API server's strict
    field validation: objects with ``properties`` accept no other field unless the CRD says
    ``x-kubernetes-preserve-unknown-fields`` or gives ``additionalProperties``."""
    crd = yaml.safe_load(crd_file.read_text())
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = entry["schema"]["openAPIV3Schema"]

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    # metadata is the API server's business (ObjectMeta); the CRD only says "object".
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@pytest.mark.parametrize("kind", sorted(CUSTOM_KINDS))
def test_custom_resources_match_their_crd(kind: str, tmp_path: Path) -> None:
    doc = manifests()[kind]
    group_version = doc["apiVersion"]
    crd = yaml.safe_load((CRDS / CUSTOM_KINDS[kind]).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    assert group_version == f"{crd['spec']['group']}/{group_version.split('/')[1]}"
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(_crd_json_schema(CRDS / CUSTOM_KINDS[kind], group_version.split("/")[1]))
    )
    code, out = run(tool("check-jsonschema"), "--schemafile", str(schema), str(doc["__file__"]))
    assert code == 0, out

    broken = tmp_path / "broken.yaml"
    text = Path(doc["__file__"]).read_text().replace("spec:\n", "spec:\n  colour: blue\n", 1)
    broken.write_text(text)
    code, out = run(tool("check-jsonschema"), "--schemafile", str(schema), str(broken))
    assert code != 0 and "colour" in out, out


def test_kustomization_lists_every_manifest_but_the_export_job() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - {"export-job.yaml"}


def test_kubernetes_numbers_agree(tmp_path: Path) -> None:
    docs = manifests()
    config = load_fleet(fleet_toml_k8s(), tmp_path)
    assert config.fleet.launcher == "native"
    assert config.balancer.host == "0.0.0.0" and config.balancer.port == 8080
    # Public address, no keys: started only because the manifest opts out explicitly.
    assert insecure_settings(config.balancer, token_configured=False) == []
    assert config.balancer.trusted_proxies  # per-user quotas behind the ALB
    assert too_wide(parse_networks(config.balancer.trusted_proxies)) == []  # its subnets only
    delay, drain = config.balancer.shutdown_delay_s, config.fleet.drain_timeout_s
    assert delay >= 2 * 5 + 1  # > the ALB's unhealthy threshold x interval (ingress.yaml)

    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    budget = pre_stop + delay + drain + config.fleet.stop_grace_s
    assert pod["terminationGracePeriodSeconds"] >= budget + 10
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert container["resources"]["limits"]["aws.amazon.com/neuron"] == 12
    assert container["ports"][0]["containerPort"] == config.balancer.port
    assert container["args"][-1] == "/etc/neuron-fleet/fleet.toml"

    annotations = docs["Ingress"]["metadata"]["annotations"]
    prefix = "alb.ingress.kubernetes.io/"
    attributes = dict(
        item.split("=", 1) for item in annotations[prefix + "target-group-attributes"].split(",")
    )
    assert attributes["load_balancing.algorithm.type"] == "least_outstanding_requests"
    assert int(attributes["deregistration_delay.timeout_seconds"]) >= delay + drain
    assert annotations[prefix + "healthcheck-path"] == "/health"
    assert annotations[prefix + "target-type"] == "ip"
    unhealthy_after = int(annotations[prefix + "healthcheck-interval-seconds"]) * int(
        annotations[prefix + "unhealthy-threshold-count"]
    )
    assert delay > unhealthy_after

    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget", "PodMonitor"):
        selector = docs[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    query = docs["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]
    assert "neuron_fleet_queue_depth" in query
    assert (
        docs["ScaledObject"]["spec"]["scaleTargetRef"]["name"]
        == docs["Deployment"]["metadata"]["name"]
    )


def test_queue_depth_metric_exists() -> None:
    """The metric KEDA scales on is one the balancer really exports."""
    from balancer.metrics import BalancerMetrics
    from balancer.upstream import Registry

    metrics = BalancerMetrics(Registry(), lambda: 3)
    from prometheus_client import generate_latest

    assert b"\nneuron_fleet_queue_depth 3.0\n" in generate_latest(metrics.prometheus)


# -- EC2 / CloudFormation -------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, ...) read as {tag: value}."""


def _tag(loader: yaml.Loader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {suffix: value}


_CfnLoader.add_multi_constructor("!", _tag)


def template() -> dict[str, Any]:
    return yaml.load(EC2.read_text(), Loader=_CfnLoader)  # a SafeLoader: no arbitrary objects


def user_data() -> str:
    data = template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    script = data["UserData"]["Fn::Base64"]["Sub"]

    # Render ${Param} / ${AWS::Region} as CloudFormation would, with sample values.
    def sample(name: str) -> str:
        if name == "TrustedProxyCidr":
            return "10.0.0.0/23"  # the ALB's two subnets (the parameter allows /22 or narrower)
        return "10.0.0.0/16" if name.endswith("Cidr") else f"sample-{name.replace(':', '-')}"

    return re.sub(r"\$\{([A-Za-z0-9:]+)\}", lambda m: sample(m.group(1)), script)


def test_cfn_lint_passes_and_catches_mistakes(tmp_path: Path) -> None:
    code, out = run(tool("cfn-lint"), str(EC2))
    assert code == 0, out
    broken = tmp_path / "broken.yaml"
    broken.write_text(EC2.read_text().replace("HealthCheckPath:", "HealthCheckPat:", 1))
    code, out = run(tool("cfn-lint"), str(broken))
    assert code != 0 and "HealthCheckPat" in out, out


def test_user_data_is_valid_bash_with_a_loadable_fleet_toml(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    script = user_data()
    path = tmp_path / "user-data.sh"
    path.write_text(script)
    code, out = run(bash, "-n", str(path))
    assert code == 0, out
    heredocs = dict(re.findall(r"cat > (\S+) <<'EOF'\n(.*?)\nEOF\n", script, re.S))
    lifecycle = tmp_path / "lifecycle.sh"
    lifecycle.write_text(heredocs["/usr/local/sbin/neuron-fleet-lifecycle"])
    code, out = run(bash, "-n", str(lifecycle))
    assert code == 0, out
    assert "complete-lifecycle-action" in lifecycle.read_text()

    config = load_fleet(heredocs["/tmp/fleet.toml"], tmp_path)
    assert insecure_settings(config.balancer, token_configured=False) == []
    assert config.balancer.trusted_proxies == ("10.0.0.0/23",)  # the ALB's X-Forwarded-For
    assert too_wide(parse_networks(config.balancer.trusted_proxies)) == []
    props = template()["Resources"]
    tg = props["TargetGroup"]["Properties"]
    attributes = {a["Key"]: a["Value"] for a in tg["TargetGroupAttributes"]}
    delay, drain = config.balancer.shutdown_delay_s, config.fleet.drain_timeout_s
    assert attributes["load_balancing.algorithm.type"] == "least_outstanding_requests"
    assert int(attributes["deregistration_delay.timeout_seconds"]) >= delay + drain
    assert tg["HealthCheckPath"] == "/health" and tg["Port"] == config.balancer.port
    assert delay > tg["HealthCheckIntervalSeconds"] * tg["UnhealthyThresholdCount"]

    # The hook outlasts the unit's stop timeout, which outlasts the whole drain.
    unit = (ROOT / "deploy" / "neuron-fleet.service").read_text()
    stop_timeout = int(re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop_timeout >= delay + drain + config.fleet.stop_grace_s
    (hook,) = props["AutoScalingGroup"]["Properties"]["LifecycleHookSpecificationList"]
    assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["HeartbeatTimeout"] > stop_timeout
    asg = props["AutoScalingGroup"]["Properties"]
    assert asg["HealthCheckType"] == "ELB"
    assert asg["HealthCheckGracePeriod"] >= 1800  # longer than a model load


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_builds_on_the_tgi_neuron_image_without_the_neuron_extra() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG TGI_IMAGE={DEFAULT_IMAGE}\nFROM ${{TGI_IMAGE}}" in text
    pip = re.search(r"pip install --no-cache-dir (\S+)", text)
    assert pip and pip.group(1) == "/src/neuron-fleet"  # no [neuron] extra
    assert 'ENTRYPOINT ["/opt/neuron-fleet/venv/bin/neuron-fleet"]' in text
    assert "NEURON_FLEET_LOG_STREAM=stdout" in text
    copied = re.findall(r"^COPY (\S+)", text, re.M)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= set(copied)
