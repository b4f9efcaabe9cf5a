"""docker/: the worker image, the compose stack and make-keys.sh, checked without a Docker engine.

What can be checked here is checked against the real things: every knhk-stream
command and environment variable in compose.yaml against the CLI itself, the
image's lock file against pyproject.toml and the installed packages, the image
tags against a list of tags known to exist, make-keys.sh by running it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from knhk_stream.cli.main import main

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read docker/compose.yaml (test extra)")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
LOCK = DOCKER / "requirements.lock"
LOCAL_IMAGE = "knhk-stream:local"  # built from docker/Dockerfile, on no registry
IMAGE_USER = "10001:10001"  # the Dockerfile's USER; make-keys.sh gives root's keys to it

# Every image the Dockerfile or compose.yaml pulls, with why we know the tag exists
# on Docker Hub. A new or bumped image must be added here, deliberately, after
# checking the tag (or by running the registry test below with network access).
VERIFIED_IMAGES = {
    "python:3.11.11-slim-bookworm": "Docker official image python, Python 3.11.11 on Debian 12 slim",
    "apache/kafka:3.9.1": "the Apache Kafka 3.9 documentation's Docker page pulls apache/kafka:3.9.1",
    "redis:7.4-alpine": "Docker official image redis, 7.4 line on Alpine",
    "jaegertracing/all-in-one:1.62.0": "Jaeger v1 all-in-one 1.62.0 (OTLP on 4317/4318, UI on 16686)",
    "otel/opentelemetry-collector:0.120.0": "OpenTelemetry Collector core distribution release 0.120.0",
}


# -- reading the files --------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text("utf-8"))


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _is_knhk(service: dict[str, Any]) -> bool:
    return service.get("image") == LOCAL_IMAGE or "build" in service


def _knhk_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _services().items() if _is_knhk(s)}


def _peers() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _services().items() if name.startswith("peer-")}


def _argv(service: dict[str, Any]) -> list[str]:
    """The knhk-stream arguments a service runs (the image's ENTRYPOINT is knhk-stream)."""
    assert "entrypoint" not in service, "the image's entrypoint is knhk-stream; pass arguments in command"
    command = service.get("command", ["--help"])
    assert isinstance(command, list), f"use the exec form (a list) for command, not {command!r}"
    return [str(a) for a in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _interpolation_default(value: str) -> str:
    """compose.yaml's `${VAR:-default}` as it is with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text("utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _dockerfile():
        if ins[0] == "FROM":
            stages.append([])
        assert stages, f"{ins[0]} before the first FROM"
        stages[-1].append(ins)
    return stages


def _from_image(from_args: str) -> str:
    return from_args.split()[0]


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for n, raw in enumerate(LOCK.read_text("utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"requirements.lock line {n}: {line!r} is not name==version"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"requirements.lock pins {name} twice"
        Version(m.group(2))  # a valid version
        pins[name] = m.group(2)
    return pins


def _click_command(path: list[str]) -> click.Command:
    cmd: click.Command = main
    ctx = click.Context(main)
    for word in path:
        assert isinstance(cmd, click.Group), f"{' '.join(path)}: {cmd.name} has no subcommands"
        sub = cmd.get_command(ctx, word)
        assert sub is not None, f"knhk-stream has no command {' '.join(path)!r}"
        cmd = sub
    return cmd


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(command path, option names) of a knhk-stream argv."""
    path: list[str] = []
    for word in argv:
        if word.startswith("-"):
            break
        path.append(word)
    options = [a.split("=", 1)[0] for a in argv[len(path) :] if a.startswith("-")]
    return path, options


def _envvars(cmd: click.Command) -> dict[str, click.Parameter]:
    out: dict[str, click.Parameter] = {}
    for p in cmd.params:
        names = p.envvar if isinstance(p.envvar, list | tuple) else [p.envvar] if p.envvar else []
        for name in names:
            out[name] = p
    return out


# -- compose.yaml -------------------------------------------------------------------------


def test_compose_parses_with_the_expected_services():
    services = _services()
    for name in ("kafka", "redis", "topics", "jaeger", "otel-collector", "peer-a", "peer-b", "peer-c", "peer-d"):
        assert name in services, f"compose.yaml has no service {name!r}"
    # the x-peer anchor is merged into every peer (no repeated blocks)
    assert "x-peer" in _compose()
    assert "<<: *peer" in COMPOSE.read_text("utf-8")
    for name, s in _peers().items():
        assert _argv(s) == ["worker"], name
        assert s.get("restart") == "unless-stopped", name


def test_every_pulled_image_is_a_verified_tag():
    named = {_from_image(args) for stage in _stages() for _, args in stage[:1]}
    for name, s in _services().items():
        if _is_knhk(s):
            assert s.get("image") == LOCAL_IMAGE, f"{name}: builds the image, so it should be tagged {LOCAL_IMAGE}"
            continue
        assert "image" in s, f"{name}: no image"
        named.add(s["image"])
    for image in named:
        _, _, tag = image.rpartition(":")
        assert ":" in image and tag and tag != "latest", f"{image}: pin a tag"
        assert image in VERIFIED_IMAGES, f"{image} is not in VERIFIED_IMAGES: check that the tag exists, then add it"


def test_the_local_image_is_built_once_and_never_pulled():
    builders = [name for name, s in _services().items() if "build" in s]
    assert builders == ["topics"], f"one service builds {LOCAL_IMAGE}, found {builders}"
    build = _services()["topics"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    for name, s in _knhk_services().items():
        if "build" not in s:
            assert s.get("pull_policy") == "never", f"{name}: {LOCAL_IMAGE} is on no registry; pull_policy: never"


@pytest.mark.skipif(
    os.environ.get("KNHK_CHECK_IMAGE_TAGS") != "1",
    reason="set KNHK_CHECK_IMAGE_TAGS=1 to ask Docker Hub whether VERIFIED_IMAGES' tags exist (needs network)",
)
def test_verified_images_exist_on_docker_hub():
    for image in VERIFIED_IMAGES:
        repo, _, tag = image.rpartition(":")
        namespace, _, name = repo.rpartition("/")
        url = f"https://hub.docker.com/v2/namespaces/{namespace or 'library'}/repositories/{name}/tags/{tag}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200, f"{image}: HTTP {resp.status}"
                assert json.load(resp).get("name") == tag
        except urllib.error.HTTPError as e:
            if e.code == 404:
                pytest.fail(f"{image}: Docker Hub has no such tag")
            pytest.skip(f"Docker Hub answered HTTP {e.code} for {image}")
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            pytest.skip(f"Docker Hub is not reachable from here: {e}")


def test_knhk_commands_in_compose_match_the_cli():
    runner = CliRunner()
    checked = 0
    for name, s in _knhk_services().items():
        path, options = _split(_argv(s))
        assert path, f"{name}: no knhk-stream command"
        cmd = _click_command(path)
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, f"{name}: knhk-stream {' '.join(path)} --help failed:\n{result.output}"
        declared = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for opt in options:
            assert opt in declared, f"{name}: knhk-stream {' '.join(path)} has no option {opt}"
            assert opt in result.output, f"{name}: {opt} is missing from knhk-stream {' '.join(path)} --help"
        checked += 1
    assert checked >= 6  # topics, four peers, cli


def test_topics_service_runs_topics_apply_against_the_compose_broker():
    argv = _argv(_services()["topics"])
    assert argv[:2] == ["topics", "apply"]
    assert argv[argv.index("--bootstrap") + 1] == "kafka:9092"


def test_knhk_env_vars_in_compose_are_read_by_the_cli():
    for name, s in _knhk_services().items():
        path, options = _split(_argv(s))
        cmd = _click_command(path)
        read = _envvars(cmd)
        env = _environment(s)
        for var in env:
            if var.startswith("KNHK_"):
                assert var in read, f"{name}: knhk-stream {' '.join(path)} does not read {var}; it reads {sorted(read)}"
        for p in cmd.params:  # every required option is given, on the command line or by its variable
            if p.required:
                given = any(o in options for o in p.opts) or any(v in env for v, q in read.items() if q is p)
                assert given, f"{name}: knhk-stream {' '.join(path)} needs {p.opts[0]}"


def test_peers_are_four_distinct_peers_with_their_own_key():
    peers = _peers()
    assert sorted(peers) == ["peer-a", "peer-b", "peer-c", "peer-d"]
    ids = set()
    for name, s in peers.items():
        env = _environment(s)
        assert env["KNHK_PEER_ID"] == name
        ids.add(env["KNHK_PEER_ID"])
        assert env["KNHK_BOOTSTRAP"] == "kafka:9092"
        assert env["KNHK_REDIS"].startswith("redis://redis:6379")
        mounts = {m["target"]: m for m in s["volumes"]}
        assert set(mounts) == {env["KNHK_SETTINGS"], env["KNHK_KEY"]}, f"{name}: mounts only chain.toml and its key"
        assert mounts[env["KNHK_SETTINGS"]]["source"] == "./peers/chain.toml"
        assert mounts[env["KNHK_KEY"]]["source"] == f"./peers/{name}.pem", f"{name} must not get another's key"
        for m in mounts.values():
            assert m["type"] == "bind" and m["read_only"] is True
            assert "bind" not in m or m["bind"].get("create_host_path") is not True  # a missing key must fail
        # scaling a peer (`--scale peer-a=3`) needs no fixed name and no host port
        assert "container_name" not in s and "ports" not in s, name
        assert _interpolation_default(s["user"]) == IMAGE_USER
    assert len(ids) == 4


def test_peers_start_after_topics_redis_and_a_healthy_kafka():
    services = _services()
    for name, s in _peers().items():
        deps = s["depends_on"]
        assert deps["topics"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "healthcheck" in services["kafka"] and "healthcheck" in services["redis"]


def test_kafka_is_single_node_kraft_with_a_listener_for_the_network_and_one_for_the_host():
    kafka = _services()["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = {k: _interpolation_default(str(v)) for k, v in _environment(kafka).items()}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["PLAINTEXT"] == "kafka:9092"  # what topics and the peers use
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocols) == {*advertised, env["KAFKA_CONTROLLER_LISTENER_NAMES"]}
    host_name = next(n for n in advertised if n != "PLAINTEXT")
    host_port = advertised[host_name].rsplit(":", 1)[1]
    container_port = listeners[host_name].rsplit(":", 1)[1]
    published = [_interpolation_default(p) for p in kafka["ports"]]
    assert f"127.0.0.1:{host_port}:{container_port}" in published
    # replication factor 1 on one broker; topics only from `topics apply`
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert any(v.endswith(":" + env["KAFKA_LOG_DIRS"]) for v in kafka["volumes"])


def test_redis_persists_with_append_only_file():
    redis = _services()["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-data" in _compose()["volumes"]


def test_telemetry_goes_to_the_collector_and_spans_on_to_jaeger():
    services = _services()
    collector_cfg = yaml.safe_load((DOCKER / "otel-collector.yaml").read_text("utf-8"))
    mounts = [v.split(":") for v in services["otel-collector"]["volumes"]]
    assert ["./otel-collector.yaml", "/etc/otelcol/config.yaml", "ro"] in mounts
    http = collector_cfg["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http == "0.0.0.0:4318"  # not localhost: the peers are other containers
    for name, s in _peers().items():
        assert _environment(s)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
    pipelines = collector_cfg["service"]["pipelines"]
    for exporter in pipelines["traces"]["exporters"]:
        endpoint = collector_cfg["exporters"][exporter]["endpoint"]
        assert endpoint.split(":")[0] in services, f"{exporter} sends to {endpoint}, not a compose service"
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    assert "127.0.0.1:16686:16686" in services["jaeger"]["ports"]
    # the worker exports OTLP only with the exporter package installed
    assert "opentelemetry-exporter-otlp-proto-http" in _lock()


def test_files_compose_mounts_exist_and_keys_are_not_committed():
    for name, s in _services().items():
        for v in s.get("volumes", []):
            source = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if not source.startswith("."):
                continue  # a named volume
            if source.startswith("./peers/"):
                continue  # made by make-keys.sh, ignored by git
            assert (DOCKER / source).is_file(), f"{name} mounts {source}, which does not exist"
    ignored = (DOCKER / ".gitignore").read_text("utf-8").split()
    assert "peers/" in ignored and ".env" in ignored
    if shutil.which("git") and (ROOT / ".git").exists():
        for path in ("docker/peers/peer-a.pem", "docker/peers/chain.toml", "docker/.env"):
            assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0, path


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_is_two_stages_on_one_slim_base():
    stages = _stages()
    assert len(stages) == 2, "a builder stage and a runtime stage"
    builder, runtime = stages
    base = {_from_image(builder[0][1]), _from_image(runtime[0][1])}
    assert len(base) == 1, "both stages on the same image: the venv's python points into it"
    assert "-slim" in base.pop()
    assert " AS builder" in builder[0][1]
    builder_runs = " ".join(args for ins, args in builder if ins == "RUN")
    runtime_runs = " ".join(args for ins, args in runtime if ins == "RUN")
    assert "build-essential" in builder_runs and "build-essential" not in runtime_runs
    assert "pip install --no-deps -r /tmp/requirements.lock" in builder_runs
    assert "pip check" in builder_runs
    assert "pip install" not in runtime_runs and "apt-get install" not in runtime_runs
    assert ("COPY", "--from=builder /opt/knhk /opt/knhk") in runtime


def test_dockerfile_runs_knhk_stream_as_an_unprivileged_user():
    runtime = _stages()[-1]
    users = [args for ins, args in runtime if ins == "USER"]
    assert users == [IMAGE_USER]
    assert not users[0].startswith(("0", "root"))
    entrypoint = [json.loads(args) for ins, args in runtime if ins == "ENTRYPOINT"]
    assert entrypoint == [["knhk-stream"]]
    health = [args for ins, args in runtime if ins == "HEALTHCHECK"]
    assert len(health) == 1
    probe = json.loads(health[0].split(" CMD ", 1)[1])
    assert probe[0] == "knhk-stream"
    result = CliRunner().invoke(main, probe[1:])
    assert result.exit_code == 0, result.output


def test_dockerfile_copies_only_what_the_context_sends():
    text = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text("utf-8")
    ignore = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert ignore[0] == "*", "the ignore file starts from nothing and re-includes what the image needs"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = 0
    for ins, args in _dockerfile():
        if ins != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
            assert source.rstrip("/") in included, f"COPY {source}: excluded by Dockerfile.dockerignore"
            copied += 1
    assert copied >= 4
    assert "!docker/peers" not in ignore  # private keys never go into an image


# -- requirements.lock --------------------------------------------------------------------


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    extras = project["optional-dependencies"]
    reqs = [Requirement(r) for r in (*project["dependencies"], *extras["kafka"], *extras["otel"])]
    return [r for r in reqs if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def test_lock_pins_every_runtime_dependency_of_pyproject():
    pins = _lock()
    reqs = _runtime_requirements()
    assert {canonicalize_name(r.name) for r in reqs} >= {"confluent-kafka", "blake3", "opentelemetry-sdk"}
    for r in reqs:
        name = canonicalize_name(r.name)
        assert name in pins, f"requirements.lock does not pin {r.name} (pyproject.toml: {r})"
        assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {r}"


def test_lock_is_closed_under_dependencies():
    """Each locked package installed here at the locked version: its own requirements are locked too."""
    pins = _lock()
    checked = 0
    for name, version in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != Version(version):
            continue
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name}=={version} requires {raw}, which requirements.lock does not pin"
            assert req.specifier.contains(pins[dep], prereleases=True), f"{name} requires {raw}, lock has {pins[dep]}"
        checked += 1
    assert checked >= 5, "too few locked packages are installed here to check the lock"


def test_lock_keeps_opentelemetry_packages_in_step():
    pins = _lock()
    core = {n: v for n, v in pins.items() if n in {"opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto"}}
    core["opentelemetry-exporter-otlp-proto-http"] = pins["opentelemetry-exporter-otlp-proto-http"]
    assert len(set(core.values())) == 1, f"OpenTelemetry packages of one release: {core}"


# -- make-keys.sh -------------------------------------------------------------------------


def _knhk_stream_executable() -> Path:
    exe = Path(sys.executable).with_name("knhk-stream")
    if not exe.exists():
        pytest.skip(f"no knhk-stream script beside {sys.executable} (install the package first)")
    return exe


@pytest.mark.skipif(shutil.which("bash") is None, reason="make-keys.sh needs bash")
def test_make_keys_writes_four_keys_and_chain_settings_that_load(tmp_path: Path):
    from knhk_stream.protocol.quorum import load_private_key, public_key_bytes
    from knhk_stream.protocol.settings import ChainSettings

    out, env_file = tmp_path / "peers", tmp_path / ".env"
    env_file.write_text("KAFKA_HOST_PORT=19092\nPEER_UID=1\n")
    env = {**os.environ, "KNHK_STREAM": str(_knhk_stream_executable()), "KNHK_ENV_FILE": str(env_file)}
    script = str(DOCKER / "make-keys.sh")
    done = subprocess.run(["bash", script, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    settings = ChainSettings.from_toml(out / "chain.toml")
    assert [p.id for p in settings.peers] == ["peer-a", "peer-b", "peer-c", "peer-d"]
    assert settings.threshold == 3
    uid, gid = (10001, 10001) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    for peer in settings.peers:
        key_file = out / f"{peer.id}.pem"
        assert public_key_bytes(load_private_key(key_file)) == peer.public_key
        st = key_file.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (uid, gid)
    # the containers run as the keys' owner; other settings in .env stay
    assert env_file.read_text().splitlines() == ["KAFKA_HOST_PORT=19092", f"PEER_UID={uid}", f"PEER_GID={gid}"]
    for service in _peers().values():  # compose.yaml's peers read the same files
        assert {m["source"] for m in service["volumes"]} <= {"./peers/chain.toml"} | {
            f"./peers/{p.id}.pem" for p in settings.peers
        }

    before = (out / "chain.toml").read_bytes()
    again = subprocess.run(["bash", script, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr, "existing keys are kept without --force"
    assert (out / "chain.toml").read_bytes() == before
