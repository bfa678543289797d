"""The multi-channel deployment files: channel configs, docker-compose.yml, the systemd template, the
Redis config and the Prometheus alerts. Each is parsed and cross-checked against the code; the real
tools (`docker compose config`, `systemd-analyze verify`, `promtool`, `redis-server`, `nginx -t`) run
when this machine has them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from broadcaster.metrics import Metrics
from broadcaster.settings import RtmpOutputSettings, load_settings

REPO = Path(__file__).resolve().parent.parent
MULTI = REPO / "config" / "multi-channel"
CHANNEL_FILES = sorted(MULTI.glob("*.yaml"))
COMPOSE = REPO / "docker-compose.yml"
SYSTEMD = REPO / "deploy" / "systemd"
UNIT = SYSTEMD / "promptcast@.service"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
REDIS_CONF = REPO / "deploy" / "redis" / "promptcast-redis.conf"
NGINX_DOCKERFILE = REPO / "docker" / "nginx-rtmp" / "Dockerfile"
ENV_DOC = (MULTI / "README.md").read_text()

# ${VAR} and ${VAR:-default}, as broadcaster/settings.py and Compose expand them.
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
# Harmless values for the variables the channel files require.
DUMMY_ENV = {
    "AMBIENT_FOREST_RTMP_URL": "rtmp://ingest.example.test/live2/forest-key",
    "TWITCH_RTMP_URL": "rtmps://ingest.example.test:443/app/live_0000_dummykey",
    "TWITCH_CHANNEL": "promptcast_test",
    "TWITCH_CLIENT_ID": "dummy-client-id",
    "TWITCH_CLIENT_SECRET": "dummy-client-secret",
    "TWITCH_USER_TOKEN": "dummy-user-token",
}


def env_refs(text: str) -> dict[str, str | None]:
    """Variable -> its default (None when it has none, i.e. required)."""
    refs: dict[str, str | None] = {}
    for name, default in ENV_REF.findall(text):
        has_default = f"${{{name}:-" in text or f"${{{name}-" in text
        refs[name] = default if has_default else refs.get(name)
    return refs


def required_vars(path: Path) -> set[str]:
    """The variables a channel file reads without a default."""
    return {n for n, d in env_refs(path.read_text()).items() if d is None}


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without any variable the deployment files read, plus `extra`."""
    read = set(DUMMY_ENV)
    for path in CHANNEL_FILES:
        read |= set(env_refs(path.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in read}
    env.update(extra or {})
    return env


def resolve(value: str, env: dict[str, str] | None = None) -> str:
    """Expand ${VAR:-default} with `env` (default: none set), as Compose would."""
    env = env or {}
    return ENV_REF.sub(lambda m: env.get(m.group(1), m.group(2) or ""), str(value))


def settings_of(path: Path, env: dict[str, str] | None = None):
    return load_settings(path, env={**DUMMY_ENV, **(env or {})})


# --- the channel files ---------------------------------------------------------------------------


def test_there_are_several_example_channels():
    assert len(CHANNEL_FILES) >= 2, CHANNEL_FILES


@pytest.mark.parametrize("path", CHANNEL_FILES, ids=[p.name for p in CHANNEL_FILES])
def test_each_channel_file_passes_check_config(path):
    result = subprocess.run([sys.executable, "-m", "broadcaster", "check-config", str(path)], cwd=REPO,
                            env=clean_env(DUMMY_ENV), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"channel {path.stem};" in result.stdout


@pytest.mark.parametrize("path", CHANNEL_FILES, ids=[p.name for p in CHANNEL_FILES])
def test_each_channel_shares_the_redis_by_url_and_is_named_after_its_file(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["channel"] == path.stem
    assert raw["store"] == {"kind": "redis", "url": "${REDIS_URL:-redis://127.0.0.1:6379/0}"}
    settings = settings_of(path)
    assert settings.store.kind == "redis"
    assert settings.store.url == "redis://127.0.0.1:6379/0"


def test_channels_differ_in_name_port_files_and_stream_keys():
    loaded = [settings_of(p, {"PROMPTCAST_OUT": "/srv/out"}) for p in CHANNEL_FILES]
    names = [s.channel for s in loaded]
    ports = [s.server.port for s in loaded]
    tokens = [s.server.token_file for s in loaded]
    dirs = [o.dir for s in loaded for o in s.outputs if hasattr(o, "dir")]
    assert len(set(names)) == len(names)
    assert len(set(ports)) == len(ports) and 0 not in ports
    assert len(set(tokens)) == len(tokens)
    assert len(set(dirs)) == len(dirs)
    for settings in loaded:  # every file of a channel is under out/<channel>/
        for path in [settings.server.token_file, *(o.dir for o in settings.outputs if hasattr(o, "dir"))]:
            assert Path(path).is_relative_to(Path("/srv/out") / settings.channel), path
    # Each stream key comes from its own variable (or, for the local relay, its own stream name).
    urls = [o.url for s in loaded for o in s.outputs if isinstance(o, RtmpOutputSettings)]
    assert len(set(urls)) == len(urls)
    raw_urls = [o["url"] for p in CHANNEL_FILES for o in yaml.safe_load(p.read_text())["outputs"]
                if o["kind"] == "rtmp"]
    assert all(ENV_REF.fullmatch(u) for u in raw_urls), raw_urls


# --- docker-compose.yml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def channel_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if "--config" in s.get("command", [])}


def config_of(service: dict) -> Path:
    command = service["command"]
    container_path = command[command.index("--config") + 1]
    assert container_path.startswith("/app/config/multi-channel/"), container_path
    return REPO / container_path.removeprefix("/app/")


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


def test_compose_runs_every_example_channel_from_its_file(compose):
    services = channel_services(compose)
    assert {config_of(s) for s in services.values()} == set(CHANNEL_FILES)
    for name, service in services.items():
        assert config_of(service).stem == name
        assert service["build"]["context"] == "." and (REPO / service["build"]["dockerfile"]).exists()


def test_compose_pins_each_channel_to_its_own_gpu(compose):
    gpus = []
    for name, service in channel_services(compose).items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "video" in devices[0]["capabilities"], f"{name}: NVENC needs the video capability"
        (gpu,) = [resolve(d) for d in devices[0]["device_ids"]]
        env = service["environment"]
        # The container sees only its GPU, as CUDA device 0; the runtime is told the host GPU.
        assert env["CUDA_VISIBLE_DEVICES"] == "0", name
        assert resolve(env["NVIDIA_VISIBLE_DEVICES"]) == gpu, name
        gpus.append(gpu)
    assert len(set(gpus)) == len(gpus), gpus


def test_compose_channel_services_restart_stop_gently_check_health_and_rotate_logs(compose):
    for name, service in channel_services(compose).items():
        settings = settings_of(config_of(service))
        port = settings.server.port
        assert service["restart"] == "unless-stopped", name
        assert service["stop_signal"] == "SIGTERM", name
        # Muxers get 5 s to take the end marker and 10 s to write their trailers; the engine 10 s.
        assert seconds(service["stop_grace_period"]) >= 20, name
        assert service["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/healthz", name
        assert f"127.0.0.1:{port}:{port}" in service["ports"], name
        assert service["environment"]["PROMPTCAST_HOST"] == "0.0.0.0", name
        assert service["logging"]["options"]["max-size"] and service["logging"]["options"]["max-file"]
        volumes = {resolve(v).split(":")[1]: resolve(v) for v in service["volumes"]}
        assert volumes["/app/weights"].endswith(":ro"), name
        assert "/app/out" in volumes, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_gives_each_channel_every_variable_its_file_requires(compose):
    for name, service in channel_services(compose).items():
        env = service["environment"]
        missing = required_vars(config_of(service)) - set(env)
        assert not missing, f"{name}: {missing}"
        assert env["REDIS_URL"] == "redis://redis:6379/0"


def test_compose_redis_persists_and_nginx_is_built_from_the_repo_config(compose):
    redis = compose["services"]["redis"]
    conf_mount = next(v for v in redis["volumes"] if "promptcast-redis.conf" in v)
    assert (REPO / conf_mount.split(":")[0]).resolve() == REDIS_CONF
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])
    assert redis["volumes"][1].split(":")[0] in compose["volumes"]  # a named volume, kept across ups
    assert "ports" not in redis  # only the compose network reaches it
    assert re.search(r"^appendonly yes$", REDIS_CONF.read_text(), re.M)
    nginx = compose["services"]["nginx-rtmp"]
    assert (REPO / nginx["build"]["dockerfile"]) == NGINX_DOCKERFILE
    dockerfile = NGINX_DOCKERFILE.read_text()
    assert "COPY config/nginx-rtmp.conf" in dockerfile
    # The Dockerfile rewrites this exact line (and fails its build if it is gone).
    assert re.search(r"^ *listen 127\.0\.0\.1:1935;", (REPO / "config" / "nginx-rtmp.conf").read_text(), re.M)


def test_every_variable_is_documented(compose):
    names: set[str] = set()
    for path in [*CHANNEL_FILES, COMPOSE]:
        names |= set(env_refs(path.read_text()))
    for service in compose["services"].values():
        env = service.get("environment") or {}
        names |= set(env)
    for path in SYSTEMD.glob("*.env.example"):
        names |= set(parse_env_file(path))
    undocumented = sorted(n for n in names if f"`{n}`" not in ENV_DOC)
    assert not undocumented, f"not in config/multi-channel/README.md: {undocumented}"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_config_accepts_the_file():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    result = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(REPO / "deploy/compose/env.example"),
                             "config"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["twitch-live"]["environment"]["TWITCH_CHANNEL"] == "your_channel"


# --- systemd -------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value)] in order (systemd allows repeated keys)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def parse_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_the_systemd_template_runs_one_channel_per_instance_and_stops_it_gently():
    unit = parse_unit(UNIT)
    service = dict(unit["Service"])
    assert service["ExecStart"].endswith(" run --config /etc/promptcast/%i.yaml")
    assert "/etc/promptcast/%i.env" in [v for k, v in unit["Service"] if k == "EnvironmentFile"]
    assert service["Restart"] == "always" and float(service["RestartSec"]) > 0
    assert "2" in service["RestartPreventExitStatus"].split()  # a config error: restarting cannot help
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= set(dict(unit["Unit"]))
    # Only the main process gets SIGTERM; its children ignore it and follow the parent's order.
    stop = (service["KillSignal"], service["KillMode"], service["TimeoutStopSec"])
    assert stop == ("SIGTERM", "mixed", "30")
    assert service["User"] == "promptcast" and service["WorkingDirectory"]
    assert int(service["LimitNOFILE"]) >= 4096
    # Hardening must leave /dev/nvidia*, /dev/shm (the frame ring, shared by one user) and JIT code alone.
    for key in ("PrivateDevices", "RemoveIPC", "MemoryDenyWriteExecute", "PrivateIPC", "DevicePolicy"):
        assert service.get(key, "no") == "no", key
    assert service["NoNewPrivileges"] == "yes"


def test_each_channel_has_an_env_file_example_with_its_gpu_and_required_variables():
    gpus = []
    for path in CHANNEL_FILES:
        example = SYSTEMD / f"{path.stem}.env.example"
        env = parse_env_file(example)
        assert not required_vars(path) - set(env), example.name
        gpus.append(env["CUDA_VISIBLE_DEVICES"])
    assert len(set(gpus)) == len(gpus), gpus


def test_systemd_analyze_verify_finds_nothing_to_complain_about(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at a binary this machine has.
    true = shutil.which("true")
    text = UNIT.read_text().replace("/opt/promptcast/.venv/bin/promptcast", true)
    (tmp_path / "promptcast@.service").write_text(text)
    for name in ("promptcast.target", "promptcast-nginx-rtmp.service"):
        shutil.copy(SYSTEMD / name, tmp_path / name)
    units = ["promptcast@ambient-forest.service", "promptcast.target", "promptcast-nginx-rtmp.service"]
    result = subprocess.run(["systemd-analyze", "verify", *units], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and "promptcast" not in output:
        pytest.skip(f"systemd-analyze cannot run here: {output[:200]}")
    assert result.returncode == 0 and output == "", output


# --- Redis and nginx-rtmp ------------------------------------------------------------------------


def test_the_redis_config_loads_with_aof_and_no_eviction(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from tests.redis_server import _command
    from tests.servers import free_port, wait_until

    port = free_port()
    process = subprocess.Popen(["redis-server", str(REDIS_CONF), "--port", str(port), "--dir", str(tmp_path),
                                "--daemonize", "no", "--logfile", str(tmp_path / "log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: process.poll() is not None or _ping(port), 10)
        assert process.poll() is None, (tmp_path / "log").read_text()
        for key, value in (("appendonly", b"yes"), ("appendfsync", b"everysec"),
                           ("maxmemory-policy", b"noeviction")):
            assert value in _command(port, "CONFIG", "GET", key), key
        assert b"127.0.0.1" in _command(port, "CONFIG", "GET", "bind")
    finally:
        process.terminate()
        process.wait(10)


def _ping(port: int) -> bool:
    from tests.redis_server import _command

    try:
        return _command(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


def test_the_relay_config_as_the_nginx_image_rewrites_it_passes_nginx_t(tmp_path):
    conf = (REPO / "config" / "nginx-rtmp.conf").read_text()
    module = re.search(r"^load_module\s+(\S+);", conf, re.M).group(1)
    if shutil.which("nginx") is None or not Path(module).exists():
        pytest.skip("nginx with Debian's RTMP module is not installed")
    rewritten = re.sub(r"^( *)listen 127\.0\.0\.1:1935;", r"\1listen 1935;", conf, flags=re.M)
    assert rewritten != conf
    path = tmp_path / "nginx-rtmp.conf"
    path.write_text(rewritten)
    result = subprocess.run(["nginx", "-t", "-e", "stderr", "-c", str(path)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


# --- Prometheus ----------------------------------------------------------------------------------


def exported_names() -> set[str]:
    """Every sample name /metrics can show (labelled metrics need one child to be rendered)."""
    metrics = Metrics()
    for collector in list(metrics.registry._collector_to_names):
        labels = getattr(collector, "_labelnames", ())
        if labels:
            collector.labels(*["x"] * len(labels))
    text = metrics.render().decode()
    return {re.split(r"[{ ]", line)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_alert_uses_metrics_the_service_exports():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    known = exported_names()
    used = set()
    for rule in rules:
        names = set(re.findall(r"\bpromptcast_[a-z_]+", rule["expr"]))
        assert names or "up{" in rule["expr"], rule["alert"]
        assert names <= known, (rule["alert"], names - known)
        used |= names
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    for name in ("promptcast_engine_up", "promptcast_engine_restarts_total", "promptcast_output_connected",
                 "promptcast_frames_repeated_total", "promptcast_frames_output_total",
                 "promptcast_queue_depth", "promptcast_output_watchdog_kills_total"):
        assert name in used, name
    # Labels the rules group or print by exist on those metrics.
    assert "output" in Metrics().output_connected._labelnames
    assert "reason" in Metrics().engine_restarts._labelnames


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    folder = ALERTS.parent
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run([promtool, *args], cwd=folder, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
