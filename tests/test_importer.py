"""``neuron-fleet import``: the blog's compose + nginx + .env -> an equivalent fleet.toml."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from supervisor.cli import main
from supervisor.config import DEFAULT_IMAGE, ENV_VARS, load_config
from supervisor.importer import (
    SERVICE_ENV_FILE,
    ImportProblem,
    PortMapping,
    _Interpolator,
    analyse_nginx,
    import_deployment,
    parse_nginx,
    parse_ports,
    toml_string,
)
from supervisor.launchers import docker_spec

BLOG = Path(__file__).resolve().parent / "fixtures" / "blog"
TOKEN = "YOUR_TOKEN"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the importer nor load_config may see a developer's MODEL_ID or HF_TOKEN."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def blog(tmp_path: Path) -> Path:
    """The blog's three files in a folder of their own (that folder is compose's $PWD)."""
    folder = tmp_path / "blog"
    folder.mkdir()
    for name in ("docker-compose.yaml", "nginx.conf", ".env"):
        shutil.copy(BLOG / name, folder / name)
    return folder


BLOG_IMAGE = "ghcr.io/huggingface/text-generation-inference:latest-neuron"
"""The blog's docker-compose.yaml image."""


def run_import(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["import", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def blog_argv(folder: Path, output: Path) -> list[str]:
    return [
        "--compose",
        str(folder / "docker-compose.yaml"),
        "--nginx",
        str(folder / "nginx.conf"),
        "--env-file",
        str(folder / ".env"),
        "--output",
        str(output),
    ]


# -- the blog's deployment ------------------------------------------------------------------


def test_blog_fixtures_are_the_blog_files() -> None:
    compose = (BLOG / "docker-compose.yaml").read_text()
    assert "HF_TOKEN=YOUR_TOKEN" in compose
    assert compose.count("MAX_CONCURRENT_REQUESTS=512") == 3
    assert "constraints: [node.role == manager]" in compose
    assert (BLOG / ".env").read_text().splitlines() == [
        "MODEL_ID='/data/exportedmodel'",
        "MAX_BATCH_SIZE=8",
        "MAX_INPUT_TOKENS=16000",
        "MAX_TOTAL_TOKENS=16512",
    ]
    tree, notes = parse_nginx(str(BLOG / "nginx.conf"))
    assert [d.name for d in tree] == ["events", "http"] and notes == []


def test_blog_import_loads_and_plans_like_the_compose_file(
    blog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "fleet.toml"
    code, out, err = run_import(capsys, *blog_argv(blog, output))
    assert code == 0, err

    config = load_config(str(output), env={}, check_host=False)
    assert config.fleet.launcher == "docker"
    assert config.fleet.cores_per_replica == 8
    plan = config.plan.replicas
    assert [r.cores for r in plan] == ["0-7", "8-15", "16-23"]
    assert [r.port for r in plan] == [8081, 8082, 8083]
    assert [r.devices for r in plan] == [
        tuple(f"/dev/neuron{d}" for d in range(4 * k, 4 * k + 4)) for k in range(3)
    ]
    assert config.fleet.host == "127.0.0.1"
    model = config.model
    assert (model.batch_size, model.max_input_tokens, model.max_total_tokens) == (8, 16000, 16512)
    assert model.max_concurrent_requests == 512
    assert model.id == str(blog / "exportedmodel")  # /data/exportedmodel on the host
    assert model.hf_token is None
    # The compose file's image, kept (its optimum-neuron made the export), and named as
    # unpinned (the launcher's own default is a pinned tag).
    assert config.launcher.docker.image == BLOG_IMAGE != DEFAULT_IMAGE
    assert f"image {BLOG_IMAGE} is a moving tag" in out
    assert config.launcher.docker.data_dir == str(blog)
    assert config.launcher.docker.data_mount == "/data"
    assert config.launcher.docker.extra_args == ()
    assert config.balancer.port == 8080
    assert config.balancer.policy == "least-outstanding"
    assert config.balancer.max_inflight_per_replica == 8
    assert config.warnings == ()

    # What docker runs is what compose ran: same devices, port, mount and environment.
    spec = docker_spec(plan[1], config)
    argv = list(spec.argv)
    assert [a for a in argv if a.startswith("--device=")] == [
        f"--device=/dev/neuron{d}" for d in (4, 5, 6, 7)
    ]
    assert argv[argv.index("-v") + 1] == f"{blog}:/data"
    env = {
        argv[i + 1].split("=")[0]: argv[i + 1].split("=", 1)[1]
        for i, a in enumerate(argv)
        if a == "-e" and "=" in argv[i + 1]
    }
    assert env["PORT"] == "8082"
    assert env["MODEL_ID"] == "/data/exportedmodel"
    assert env["HF_NUM_CORES"] == "8"
    assert env["MAX_BATCH_SIZE"] == "8"
    assert env["MAX_INPUT_TOKENS"] == "16000"
    assert env["MAX_TOTAL_TOKENS"] == "16512"
    assert env["MAX_CONCURRENT_REQUESTS"] == "512"
    assert "127.0.0.1:8082:8082" in argv
    assert argv[-1] == BLOG_IMAGE

    # The summary names the compose services next to the replicas that replace them.
    assert "tgi-1            replica-0  0-7    neuron0-3   8081" in out
    assert "tgi-3            replica-2  16-23  neuron8-11  8083" in out


def test_blog_import_says_what_it_could_not_carry_over(
    blog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_import(capsys, *blog_argv(blog, tmp_path / "fleet.toml"))
    assert code == 0
    notes = out.split("Not carried over", 1)[1]
    # nginx: round-robin, buffering, HTTP/1.0 without keepalive, 60 s read timeout
    assert "round-robin" in notes and 'policy = "least-outstanding"' in notes
    assert "max_inflight_per_replica" in notes
    assert "proxy_buffering on, its default" in notes
    assert "X-Accel-Buffering: no" in notes
    assert "HTTP/1.0" in notes and "no upstream keepalive" in notes
    assert "proxy_read_timeout" in notes
    # compose: swarm placement, depends_on, published ports, PORT, $PWD
    assert "loadbalancer: deploy.placement (constraints: node.role == manager)" in notes
    assert "depends_on" in notes
    assert 'host = "127.0.0.1"' in notes
    assert "tgi-1, tgi-2 and tgi-3: PORT" in notes
    assert "$PWD is taken as the compose file's folder" in notes
    # the hard-coded token: named, never shown, and where it goes instead
    assert "HF_TOKEN is hard-coded in docker-compose.yaml" in notes
    assert SERVICE_ENV_FILE in notes
    assert "[model] source is not set" in notes


def test_token_value_never_reaches_the_file_or_the_terminal(
    blog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "fleet.toml"
    code, out, err = run_import(capsys, *blog_argv(blog, output))
    assert code == 0
    assert TOKEN not in output.read_text()
    assert TOKEN not in out
    assert TOKEN not in err
    assert "hf_token" not in tomllib.loads(output.read_text())["model"]
    # and to stdout
    code, out, err = run_import(capsys, *blog_argv(blog, Path("-")))
    assert code == 0
    assert TOKEN not in out + err


def test_output_to_stdout_keeps_notes_on_stderr(
    blog: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_import(capsys, *blog_argv(blog, Path("-")))
    assert code == 0
    document = tomllib.loads(out)
    assert document["fleet"]["replicas"] == 3
    assert document["balancer"]["listen"] == "0.0.0.0:8080"
    assert "round-robin" in err


def test_existing_output_needs_force(
    blog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "fleet.toml"
    output.write_text("# mine\n")
    code, _, err = run_import(capsys, *blog_argv(blog, output))
    assert code == 2
    assert "--force" in err
    assert output.read_text() == "# mine\n"
    code, _, _ = run_import(capsys, *blog_argv(blog, output), "--force")
    assert code == 0
    assert "[fleet]" in output.read_text()


def test_env_file_and_nginx_conf_are_found_like_compose_finds_them(
    blog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "fleet.toml"
    code, out, err = run_import(
        capsys, "--compose", str(blog / "docker-compose.yaml"), "--output", str(output)
    )
    assert code == 0, err
    assert f"read {blog / '.env'}" in out
    assert f"read {blog / 'nginx.conf'} (mounted into the nginx container)" in out
    assert "round-robin" in out
    config = load_config(str(output), env={}, check_host=False)
    assert config.model.batch_size == 8


def test_without_env_file_missing_variables_are_reported(
    blog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (blog / ".env").unlink()
    output = tmp_path / "fleet.toml"
    code, out, err = run_import(
        capsys, "--compose", str(blog / "docker-compose.yaml"), "--output", str(output)
    )
    assert code == 1  # written, but MODEL_ID is empty: serve would refuse it
    assert "${MODEL_ID} is not set" in out
    assert "[model] id is not set" in err
    assert output.exists()


# -- other compose shapes -------------------------------------------------------------------

OTHER_COMPOSE = """
services:
  second:
    image: ghcr.io/huggingface/text-generation-inference:latest-neuron
    ports: ["127.0.0.1:9001:80"]
    volumes: ["./models:/models:ro", "hf-cache:/cache"]
    shm_size: 1g
    tty: true
    stdin_open: true
    restart: unless-stopped
    environment:
      MODEL_ID: /models/llama
      HF_NUM_CORES: 8
      MAX_BATCH_SIZE: 4
      HF_TOKEN: ${HF_TOKEN}
      MY_API_KEY: s3cr3t-api-value
      NEURON_RT_LOG_LEVEL: INFO
    devices: ["/dev/neuron8:/dev/neuron8", "/dev/neuron9", "/dev/neuron10", "/dev/neuron11"]
  first:
    image: ghcr.io/huggingface/text-generation-inference:latest-neuron
    ports: ["127.0.0.1:9000:80"]
    volumes: ["./models:/models:ro", "hf-cache:/cache"]
    shm_size: 1g
    environment:
      MODEL_ID: /models/llama
      HF_NUM_CORES: 8
      MAX_BATCH_SIZE: 4
      HF_TOKEN: ${HF_TOKEN}
      MY_API_KEY: s3cr3t-api-value
      NEURON_RT_LOG_LEVEL: INFO
    devices: ["/dev/neuron0", "/dev/neuron1", "/dev/neuron2", "/dev/neuron3"]
  proxy:
    image: nginx:1.27
    ports: ["127.0.0.1:7000:8000"]
    volumes: ["./lb.conf:/etc/nginx/nginx.conf:ro"]
  metrics:
    image: prom/prometheus
volumes:
  hf-cache: {}
"""

OTHER_NGINX = """
events { worker_connections 1024; }
http {
    upstream tgi {
        least_conn;
        keepalive 16;
        server first:80 max_fails=2;
        server second:80;
    }
    server {
        listen 8000;  # inside the container
        location / {
            proxy_pass http://tgi;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
            client_max_body_size 20m;
        }
    }
}
"""


def test_other_compose_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "docker-compose.yml").write_text(OTHER_COMPOSE)
    (tmp_path / "lb.conf").write_text(OTHER_NGINX)
    (tmp_path / "secrets.env").write_text("HF_TOKEN=hf_real_token_value\n")
    output = tmp_path / "fleet.toml"
    code, out, err = run_import(
        capsys,
        "--compose",
        str(tmp_path / "docker-compose.yml"),
        "--env-file",
        str(tmp_path / "secrets.env"),
        "--output",
        str(output),
    )
    assert code == 0, err
    text = output.read_text()
    for secret in ("hf_real_token_value", "s3cr3t-api-value"):
        assert secret not in text + out + err

    config = load_config(str(output), env={}, check_host=False)
    # Ordered by published port; the devices are not the default layout, so they are kept.
    assert [r.cores for r in config.plan.replicas] == ["0-7", "16-23"]
    assert config.fleet.core_groups == ("0-7", "16-23")
    assert config.fleet.base_port == 9000
    assert config.model.id == str(tmp_path / "models" / "llama")
    assert config.model.batch_size == 4
    assert config.launcher.docker.data_dir == str(tmp_path / "models")
    assert config.launcher.docker.data_mount == "/models"
    assert config.launcher.docker.extra_args == (
        "-v",
        "hf-cache:/cache",
        "-e",
        "MY_API_KEY",
        "-e",
        "NEURON_RT_LOG_LEVEL=INFO",
        "--shm-size",
        "1g",
    )
    assert (config.balancer.host, config.balancer.port) == ("127.0.0.1", 7000)
    assert config.balancer.max_body_bytes == 20 * 1024 * 1024

    assert "second: tty (docker run -ti): dropped" in out
    assert "second: stdin_open (docker run -ti): dropped" in out
    assert "second: restart: the supervisor restarts" in out
    assert "metrics: not a TGI replica or a load balancer" in out
    assert "HF_TOKEN is taken from a variable" in out
    assert "MY_API_KEY looks like a secret" in out
    assert "HF_TOKEN is set in" in out
    assert "least_conn" in out
    assert "proxy_buffering" not in out  # it was off: nothing to say
    assert "HTTP/1.1" not in out.split("least_conn")[0]
    assert "proxy_read_timeout 600s not carried over" in out
    assert "server first:80 max_fails=2" in out
    assert "proxy_set_header" in out
    assert "named volume hf-cache" in out
    assert "0.0.0.0" not in text  # published on 127.0.0.1: kept there


def test_ports_not_contiguous_and_devices_from_hf_num_cores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    compose = """
services:
  a:
    image: ghcr.io/huggingface/text-generation-inference:latest-neuron
    ports: ["8081:80"]
    environment: ["MODEL_ID=org/model", "MAX_BATCH_SIZE=4", "MAX_TOTAL_TOKENS=4096"]
    devices: ["/dev/neuron0", "/dev/neuron1"]
  b:
    image: ghcr.io/huggingface/text-generation-inference:latest-neuron
    ports: ["8085:80"]
    environment: ["MODEL_ID=org/model", "MAX_BATCH_SIZE=4", "MAX_TOTAL_TOKENS=4096"]
    devices: ["/dev/neuron2", "/dev/neuron3"]
"""
    (tmp_path / "compose.yaml").write_text(compose)
    result = import_deployment(str(tmp_path / "compose.yaml"), environ={})
    notes = "\n".join(result.notes)
    assert "8081, 8085 are not contiguous" in notes
    assert "no load balancer service found" in notes
    path = tmp_path / "fleet.toml"
    path.write_text(result.toml)
    config = load_config(str(path), env={}, check_host=False)
    assert config.fleet.cores_per_replica == 4  # 2 devices x 2 cores, no HF_NUM_CORES
    assert [r.port for r in config.plan.replicas] == [8081, 8082]
    assert [r.cores for r in config.plan.replicas] == ["0-3", "4-7"]
    assert config.model.id == "org/model"
    assert (config.balancer.host, config.balancer.port) == ("127.0.0.1", 8080)


def test_problems_that_stop_the_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text("services:\n  web:\n    image: nginx\n")
    with pytest.raises(ImportProblem, match="no TGI replica service"):
        import_deployment(str(compose), environ={})
    # A YAML error shows where, never the line itself (it may hold a secret).
    compose.write_text("services:\n  tgi:\n    environment: [HF_TOKEN=hf_leaky: {\n")
    code, out, err = run_import(
        capsys, "--compose", str(compose), "--output", str(tmp_path / "x.toml")
    )
    assert code == 2
    assert "not valid YAML" in err and "line" in err
    assert "hf_leaky" not in out + err
    nginx = tmp_path / "bad.conf"
    nginx.write_text("http { server { listen 80 }\n")
    with pytest.raises(ValueError, match=r"bad\.conf:1: .*unexpected"):
        parse_nginx(str(nginx))


# -- the parts ------------------------------------------------------------------------------


def test_interpolation_like_compose() -> None:
    sub = _Interpolator({"A": "1", "EMPTY": ""}, "/srv/app", {"SHELL_ONLY": "s"})
    assert sub("$A ${A} $$A ${A}x") == "1 1 $A 1x"
    assert sub("${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${A:+set} ${UNSET:+set}") == "d  d set "
    assert sub("${UNSET:-${A}}") == "1"
    assert sub("$PWD:/data") == "/srv/app:/data"
    assert sub("${SHELL_ONLY}") == "s"
    assert sub.from_environ == {"SHELL_ONLY"}
    assert sub("${NOPE}") == ""
    assert "NOPE" in sub.missing
    sub("${NEEDED:?set it}")
    assert sub.errors == ["${NEEDED} is required: set it"]


def test_parse_ports() -> None:
    assert parse_ports(["8081:8081", "127.0.0.1:8080:80", 9000, "53:53/udp"]) == [
        PortMapping(None, 8081, 8081),
        PortMapping("127.0.0.1", 8080, 80),
        PortMapping(None, None, 9000),
    ]
    assert parse_ports(["8081-8082:8081-8082"]) == [
        PortMapping(None, 8081, 8081),
        PortMapping(None, 8082, 8082),
    ]
    assert parse_ports([{"target": 80, "published": "8080", "host_ip": "::1"}]) == [
        PortMapping("::1", 8080, 80)
    ]
    assert parse_ports(["[::1]:8080:80"]) == [PortMapping("::1", 8080, 80)]


def test_analyse_nginx(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(OTHER_NGINX.replace("listen 8000;", 'listen 127.0.0.1:8443 ssl; # "x"'))
    info = analyse_nginx(str(conf))
    assert info.upstream == "tgi"
    assert [(h, p) for h, p, _ in info.servers] == [("first", 80), ("second", 80)]
    assert info.method == "least_conn"
    assert info.keepalive and info.http_version == "1.1"
    assert info.buffering == ["off"]
    assert info.listen_ports == [8443] and info.tls
    assert info.read_timeout == "600s"
    assert info.unhandled == ["proxy_set_header"]
    blog = analyse_nginx(str(BLOG / "nginx.conf"))
    assert blog.method == "round-robin" and not blog.keepalive and blog.buffering == []
    assert [(h, p) for h, p, _ in blog.servers] == [
        ("tgi-1", 8081),
        ("tgi-2", 8082),
        ("tgi-3", 8083),
    ]
    assert blog.listen_ports == [80]


def test_toml_string_escapes() -> None:
    text = 'a "b" \\ c\n\t\x01'
    assert tomllib.loads(f"k = {toml_string(text)}")["k"] == text


def test_model_under_home_is_flagged_for_the_systemd_unit(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        "services:\n"
        "  tgi:\n"
        "    image: ghcr.io/huggingface/text-generation-inference:latest-neuron\n"
        '    ports: ["8081:80"]\n'
        '    volumes: ["/home/ubuntu:/data"]\n'
        '    environment: ["MODEL_ID=/data/exportedmodel", "HF_NUM_CORES=2"]\n'
        '    devices: ["/dev/neuron0"]\n'
    )
    result = import_deployment(str(compose), environ={})
    assert any("ProtectHome=yes" in note for note in result.notes)
    document = tomllib.loads(result.toml)
    assert document["model"]["id"] == "/home/ubuntu/exportedmodel"
    assert document["launcher"]["docker"]["data_dir"] == "/home/ubuntu"
    assert document["fleet"]["cores_per_replica"] == 2


def test_unreadable_ports_are_an_import_problem(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        "services:\n  tgi:\n    environment: [MODEL_ID=x]\n    ports: ['${UNSET}:80x']\n"
    )
    with pytest.raises(ImportProblem, match="ports entry"):
        import_deployment(str(compose), environ={})


def test_nginx_max_conns_becomes_the_slot_cap(tmp_path: Path) -> None:
    (tmp_path / "compose.yaml").write_text(
        "services:\n"
        "  a:\n"
        "    image: ghcr.io/huggingface/text-generation-inference:latest-neuron\n"
        '    ports: ["8081:80"]\n'
        '    environment: ["MODEL_ID=org/model", "HF_NUM_CORES=2"]\n'
        "  lb:\n"
        "    image: nginx\n"
        '    ports: ["8080:80"]\n'
    )
    (tmp_path / "nginx.conf").write_text(
        "events {}\nhttp { upstream u { server a:80 max_conns=4; }\n"
        "  server { listen 80; location / { proxy_pass http://u; } } }\n"
    )
    result = import_deployment(
        str(tmp_path / "compose.yaml"), str(tmp_path / "nginx.conf"), environ={}
    )
    assert tomllib.loads(result.toml)["balancer"]["max_inflight_per_replica"] == 4
    assert any("max_conns=4 -> [balancer] max_inflight_per_replica" in n for n in result.notes)
    assert any("no /dev/neuron devices" in n for n in result.notes)


def test_nginx_includes_are_read_and_missing_ones_named(tmp_path: Path) -> None:
    """A conf.d layout: the upstream lives in an included file (crossplane reads it); an
    include of a path that exists only inside the nginx container becomes a note."""
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "tgi.conf").write_text(
        "upstream tgi {\n    least_conn;\n    server tgi-1:8081;\n    server tgi-2:8082;\n}\n"
    )
    conf = tmp_path / "nginx.conf"
    inside_container = tmp_path / "only-in-the-container" / "mime.types"
    conf.write_text(
        f"events {{}}\nhttp {{\n    include {inside_container};\n    include conf.d/*.conf;\n"
        "    server { listen 8080; location / { proxy_pass http://tgi; } }\n}\n"
    )
    info = analyse_nginx(str(conf))
    assert info.upstream == "tgi" and info.method == "least_conn"
    assert [(h, p) for h, p, _ in info.servers] == [("tgi-1", 8081), ("tgi-2", 8082)]
    assert info.listen_ports == [8080]
    (note,) = info.notes
    assert note.startswith("nginx.conf:3: an include was not read") and "mime.types" in note
