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
    # /metrics on the pod's own port, scraped directly; the ALB's path has none.
    (endpoint,) = docs["PodMonitor"]["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert config.balancer.metrics_listen == f"0.0.0.0:{ports['metrics']}"
    assert ports["http"] == config.balancer.port != ports["metrics"]
    assert [p["targetPort"] for p in docs["Service"]["spec"]["ports"]] == ["http"]
    (rule,) = docs["Ingress"]["spec"]["rules"]
    assert {p["backend"]["service"]["port"]["name"] for p in rule["http"]["paths"]} == {"http"}
    # The balancer's keep-alive outlives the ALB's idle timeout (else: 502s on reuse).
    lb_attributes = dict(
        item.split("=", 1) for item in annotations[prefix + "load-balancer-attributes"].split(",")
    )
    assert config.balancer.client_timeout_s > int(lb_attributes["idle_timeout.timeout_seconds"])
    # KEDA owns the count; Prometheus (kube-prometheus-stack) selects the PodMonitor.
    assert "replicas" not in docs["Deployment"]["spec"]
    assert "release" in docs["PodMonitor"]["metadata"]["labels"]
    trigger = docs["ScaledObject"]["spec"]["triggers"][0]["metadata"]
    assert trigger["ignoreNullValues"] == "false"  # an empty query is an error, not "idle"
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


ALB_SUBNETS = ["10.0.1.0/24", "10.0.2.0/24"]
"""Sample TrustedProxyCidrs: the CIDRs of the ALB's two subnets."""


def render_sub(sub: Any, values: dict[str, Any]) -> str:
    """CloudFormation's Fn::Sub, both forms (string; [string, {name: value}]), over the
    given parameter values (lists for CommaDelimitedList), resolving the variable map's
    !Ref and !Join as CloudFormation would."""
    script, variables = (sub, {}) if isinstance(sub, str) else sub

    def resolve(value: Any) -> str:
        if isinstance(value, dict) and "Ref" in value:
            return values[value["Ref"]]
        if isinstance(value, dict) and "Join" in value:
            sep, items = value["Join"]
            return sep.join(resolve(items) if isinstance(items, dict) else items)
        return value

    names = {**values, **{k: resolve(v) for k, v in variables.items()}}
    return re.sub(r"\$\{([A-Za-z0-9:]+)\}", lambda m: str(names[m.group(1)]), script)


def user_data() -> str:
    data = template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    values: dict[str, Any] = {"TrustedProxyCidrs": ALB_SUBNETS}
    for name, spec in template()["Parameters"].items():
        if name not in values:
            values[name] = str(spec.get("Default", f"sample-{name}"))
    for name in ("AWS::Region", "AWS::StackName"):
        values[name] = f"sample-{name.replace(':', '-')}"
    return render_sub(data["UserData"]["Fn::Base64"]["Sub"], values)


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
    # The ALB's subnets (each CIDR of the list parameter), whose X-Forwarded-For is read.
    assert config.balancer.trusted_proxies == tuple(ALB_SUBNETS)
    props = template()["Resources"]
    # Keep-alive above the ALB's idle timeout; metrics on a port the ALB does not forward.
    lb = props["LoadBalancer"]["Properties"]["LoadBalancerAttributes"]
    idle = {a["Key"]: a["Value"] for a in lb}["idle_timeout.timeout_seconds"]
    assert config.balancer.client_timeout_s > int(idle)
    metrics_port = int(str(config.balancer.metrics_listen).rsplit(":", 1)[1])
    ingress = props["HostSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    by_port = {rule["FromPort"]: rule for rule in ingress}
    assert "SourceSecurityGroupId" in by_port[config.balancer.port]  # the ALB's
    assert metrics_port != config.balancer.port and "CidrIp" in by_port[metrics_port]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    (hosts,) = [job for job in scrape if job["job_name"] == "neuron-fleet-ec2"]
    assert hosts["ec2_sd_configs"][0]["port"] == metrics_port
    assert props["Listener"]["Properties"]["Port"] == 80
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


TGI_IMAGE_PIN = "ghcr.io/huggingface/text-generation-inference:3.3.5-neuron"
"""The TGI Neuron image every deploy path runs: the tag TGI's own docs pin
(text-generation-inference v3.3.7, docs/source/backends/neuron.md)."""


def test_every_deploy_path_pins_the_tgi_image() -> None:
    """No `latest`: the image's optimum-neuron must be the export's (runtime_versions.py)."""
    # The launcher's own default (one host, no fleet.toml image) is the same pin.
    assert DEFAULT_IMAGE == TGI_IMAGE_PIN
    texts = {
        "Dockerfile": (ROOT / "deploy" / "Dockerfile").read_text(),
        "fleet.toml": (ROOT / "deploy" / "fleet.toml").read_text(),
        "ec2": EC2.read_text(),
        **{p.name: p.read_text() for p in K8S.glob("*.yaml")},
    }
    for name, text in texts.items():
        assert "text-generation-inference:latest" not in text, name
    assert template()["Parameters"]["TgiImage"]["Default"] == TGI_IMAGE_PIN
    assert f'image = "{TGI_IMAGE_PIN}"' in texts["fleet.toml"]
    # The EC2 parameter refuses an unpinned tag (cfn-lint checks the default against it).
    pattern = template()["Parameters"]["TgiImage"]["AllowedPattern"]
    assert re.fullmatch(pattern, TGI_IMAGE_PIN)
    assert re.fullmatch(pattern, DEFAULT_IMAGE)
    assert not re.fullmatch(pattern, "ghcr.io/huggingface/text-generation-inference:latest-neuron")
    assert not re.fullmatch(pattern, "ghcr.io/huggingface/text-generation-inference:latest")


def test_ec2_ami_is_the_neuron_dlamis_ssm_parameter() -> None:
    image = template()["Parameters"]["ImageId"]
    assert image["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    # aws-neuron-sdk dlami/index.rst, "SSM Parameter Prefix": Deep Learning Base Neuron AMI.
    assert image["Default"] == "/aws/service/neuron/dlami/base/ubuntu-22.04/latest/image_id"


def test_dockerfile_builds_on_the_tgi_neuron_image_without_the_neuron_extra() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG TGI_IMAGE={TGI_IMAGE_PIN}\nFROM ${{TGI_IMAGE}}" in text
    # The base image's HUGGINGFACE_HUB_CACHE=/tmp is overridden by both names.
    hub = re.findall(r"^\s*(HF_HUB_CACHE|HUGGINGFACE_HUB_CACHE)=(\S+)", text, re.M)
    assert dict(hub) == {
        "HF_HUB_CACHE": "/var/cache/neuron-fleet/huggingface/hub",
        "HUGGINGFACE_HUB_CACHE": "/var/cache/neuron-fleet/huggingface/hub",
    }
    pip = re.search(r"pip install --no-cache-dir (\S+)", text)
    assert pip and pip.group(1) == "/src/neuron-fleet"  # no [neuron] extra
    assert 'ENTRYPOINT ["/opt/neuron-fleet/venv/bin/neuron-fleet"]' in text
    assert "NEURON_FLEET_LOG_STREAM=stdout" in text
    copied = re.findall(r"^COPY (\S+)", text, re.M)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= set(copied)


# -- X-Forwarded-For: only the ALB's subnets are trusted ------------------------------------


def test_a_vpc_client_behind_the_alb_cannot_name_itself(tmp_path: Path) -> None:
    """A VPC laid out as the shipped placeholders assume (10.0.0.0/16; the ALB in
    10.0.1.0/24 and 10.0.2.0/24): a pod or host at 10.0.7.7 sends `X-Forwarded-For: 6.6.6.6`
    through the ALB, which appends its address. Both deploy paths must key it as 10.0.7.7,
    not as the name it wrote (a fresh per-client share per request). With the VPC's CIDR
    trusted (the manifests' old placeholder) it was 6.6.6.6."""
    from balancer.client_address import client_address, parse_networks

    alb_node, vpc_client = "10.0.1.10", "10.0.7.7"
    headers = [f"6.6.6.6, {vpc_client}"]
    configs = {
        "kubernetes": load_fleet(fleet_toml_k8s(), tmp_path),
        "ec2": load_fleet(
            dict(re.findall(r"cat > (\S+) <<'EOF'\n(.*?)\nEOF\n", user_data(), re.S))[
                "/tmp/fleet.toml"
            ],
            tmp_path,
        ),
    }
    for name, config in configs.items():
        trusted = parse_networks(list(config.balancer.trusted_proxies))
        assert client_address(alb_node, headers, trusted) == vpc_client, name
        # The ALB's own hop is still believed: a client outside the VPC keeps its address.
        assert client_address(alb_node, ["203.0.113.7"], trusted) == "203.0.113.7", name
    # The EC2 stack asks for the ALB subnets' CIDRs (a list: the ALB spans two AZs).
    parameter = template()["Parameters"]["TrustedProxyCidrs"]
    assert parameter["Type"] == "CommaDelimitedList" and "Default" not in parameter
    assert "not the VPC's CIDR" in parameter["Description"]
