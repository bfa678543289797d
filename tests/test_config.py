"""Channel files: the presets in config/ and how `promptcast check-config` refuses bad ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broadcaster.cli import build_parser
from broadcaster.settings import (
    ConfigError,
    HlsOutputSettings,
    RecordOutputSettings,
    RtmpOutputSettings,
    Settings,
    load_settings,
    parse_settings,
)
from chat.settings import TwitchSourceSettings

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"
PRESETS = sorted(CONFIG.glob("*.yaml"))

# Every variable a preset reads, set to a harmless dummy (the values must pass validation).
PRESET_ENV = {
    "TWITCH_RTMP_URL": "rtmps://ingest.example.test:443/app/live_0000_dummykey",
    "TWITCH_CHANNEL": "promptcast_test",
    "TWITCH_CLIENT_ID": "dummy-client-id",
    "TWITCH_CLIENT_SECRET": "dummy-client-secret",
    "TWITCH_USER_TOKEN": "dummy-user-token",
    "RTMP_URL": "rtmp://ingest.example.test/live2/dummy-key",
}
# Read by presets but optional: removed so the host's environment cannot change a result.
OPTIONAL_ENV = ("REDIS_URL",)
UNSET = "PROMPTCAST_TEST_SURELY_UNSET_VAR"


def _env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*PRESET_ENV, *OPTIONAL_ENV, UNSET, *drop)}
    env.update(extra or {})
    return env


def check_config(path: Path | str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "broadcaster", "check-config", str(path)],
        cwd=REPO, env=_env() if env is None else env, capture_output=True, text=True, timeout=60,
    )


def problems(result) -> list[str]:
    """The problem lines the CLI printed (indented under the `N problem(s)` header)."""
    return [line.strip() for line in result.stderr.splitlines() if re.match(r"^  \S", line)]


def write(tmp_path: Path, text: str | bytes, name: str = "channel.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """The same `check-config` command, run in this process (faster than a subprocess per case)."""

    def run(path: Path | str) -> Outcome:
        capsys.readouterr()
        args = build_parser().parse_args(["check-config", str(path)])
        code = args.func(args)
        out, err = capsys.readouterr()
        return Outcome(code, out, err)

    return run


@pytest.fixture
def refused(tmp_path, cli, monkeypatch):
    """Check a file that must be refused; returns its problem lines."""
    monkeypatch.delenv(UNSET, raising=False)

    def run(text: str | bytes) -> list[str]:
        result = cli(write(tmp_path, text))
        assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
        assert result.stdout == ""
        return problems(result)

    return run


# --- the presets ---------------------------------------------------------------------------------


def test_the_four_documented_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"demo.yaml", "twitch.yaml", "obs.yaml", "ambient.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_passes_check_config(preset):
    result = check_config(preset, _env(PRESET_ENV))

    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_demo_preset_loads_equal_to_the_embedded_default():
    assert load_settings(CONFIG / "demo.yaml", env={}) == Settings()
    assert load_settings(None) == Settings()


def test_demo_preset_spells_out_every_field_of_every_section():
    raw = yaml.safe_load((CONFIG / "demo.yaml").read_text())
    defaults = Settings()

    assert set(raw) == set(Settings.model_fields)
    for section in ("engine", "encoder", "server", "store", "chat", "schedule"):
        assert set(raw[section]) == set(type(getattr(defaults, section)).model_fields), section
    for entry, model in zip(raw["outputs"], defaults.outputs, strict=True):
        assert set(entry) == set(type(model).model_fields) - {"name"}, entry
    for entry, model in zip(raw["chat"]["sources"], defaults.chat.sources, strict=True):
        assert set(entry) == set(type(model).model_fields), entry


def test_demo_preset_has_a_comment_for_every_field():
    lines = (CONFIG / "demo.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^\s*(?:- )?([a-z_]+):", line)
        if not match:
            continue
        commented = "#" in line or lines[number - 1].lstrip().startswith("#")
        assert commented, f"demo.yaml line {number + 1} ({match.group(1)}) has no comment"


def test_twitch_preset_streams_to_the_ingest_from_the_environment_within_twitch_limits():
    settings = load_settings(CONFIG / "twitch.yaml", env=dict(PRESET_ENV))

    rtmp = [o for o in settings.outputs if isinstance(o, RtmpOutputSettings)]
    assert [o.url for o in rtmp] == [PRESET_ENV["TWITCH_RTMP_URL"]]
    assert {o.kind for o in settings.outputs} == {"rtmp", "hls", "record"}
    assert (settings.engine.width, settings.engine.height) == (832, 480)
    assert settings.output_size == (832, 480)
    assert 3000 <= settings.encoder.video_bitrate_kbps <= 4500
    assert settings.encoder.keyframe_seconds == 2


def test_twitch_preset_takes_chat_credentials_from_the_environment():
    settings = load_settings(CONFIG / "twitch.yaml", env=dict(PRESET_ENV))

    assert settings.chat.mode == "vote"
    kinds = [s.kind for s in settings.chat.sources]
    assert kinds == ["local", "twitch"]
    twitch = settings.chat.sources[1]
    assert isinstance(twitch, TwitchSourceSettings)
    assert (twitch.channel, twitch.client_id, twitch.client_secret, twitch.user_token) == (
        PRESET_ENV["TWITCH_CHANNEL"], PRESET_ENV["TWITCH_CLIENT_ID"],
        PRESET_ENV["TWITCH_CLIENT_SECRET"], PRESET_ENV["TWITCH_USER_TOKEN"],
    )


def test_twitch_preset_uses_redis_with_a_default_url_that_redis_url_overrides():
    default = load_settings(CONFIG / "twitch.yaml", env=dict(PRESET_ENV))
    custom = load_settings(CONFIG / "twitch.yaml", env={**PRESET_ENV, "REDIS_URL": "redis://cache:6380/2"})

    assert (default.store.kind, default.store.url) == ("redis", "redis://127.0.0.1:6379/0")
    assert custom.store.url == "redis://cache:6380/2"


def test_twitch_preset_without_its_secrets_names_every_missing_variable():
    result = check_config(CONFIG / "twitch.yaml", _env())

    assert result.returncode == 2
    missing = set(re.findall(r"environment variable (\w+) is not set", result.stderr))
    assert missing == {"TWITCH_RTMP_URL", "TWITCH_CHANNEL", "TWITCH_CLIENT_ID", "TWITCH_CLIENT_SECRET",
                       "TWITCH_USER_TOKEN"}
    assert "outputs[0].url: environment variable TWITCH_RTMP_URL is not set" in result.stderr


def test_obs_preset_feeds_hls_and_a_local_nginx_rtmp_with_low_latency_settings():
    settings = load_settings(CONFIG / "obs.yaml", env={})

    rtmp = [o for o in settings.outputs if isinstance(o, RtmpOutputSettings)]
    hls = [o for o in settings.outputs if isinstance(o, HlsOutputSettings)]
    assert [o.url for o in rtmp] == ["rtmp://127.0.0.1:1935/live/promptcast"]
    assert len(hls) == 1
    assert hls[0].segment_seconds < HlsOutputSettings(kind="hls").segment_seconds
    assert settings.encoder.keyframe_seconds < Settings().encoder.keyframe_seconds
    assert "Media Source" in (CONFIG / "obs.yaml").read_text()
    # It advertises the poll overlay, which only vote rounds fill; /overlay/now carries the prompt.
    assert settings.chat.mode == "vote"
    assert settings.engine.preview_caption is False


def test_size_presets_set_the_output_size_and_refuse_a_second_size(tmp_path):
    for size, expected in (("720p", (1280, 720)), ("1080p", (1920, 1080)), ("engine", (832, 480))):
        settings = load_settings(write(tmp_path, f"encoder: {{size: {size}}}\n"), env={})
        assert settings.output_size == expected
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, "encoder: {size: 720p, width: 640, height: 360}\n"), env={})
    assert "size: '720p' and width/height both set the output size" in str(error.value.problems)


def test_ambient_preset_records_hourly_streams_to_rtmp_url_and_plays_the_queue():
    settings = load_settings(CONFIG / "ambient.yaml", env=dict(PRESET_ENV))

    rtmp = [o for o in settings.outputs if isinstance(o, RtmpOutputSettings)]
    record = [o for o in settings.outputs if isinstance(o, RecordOutputSettings)]
    assert [o.url for o in rtmp] == [PRESET_ENV["RTMP_URL"]]
    assert [o.segment_minutes for o in record] == [60]
    assert settings.chat.mode == "queue"
    assert re.search(r"^\s*#\s*audio: \S+", (CONFIG / "ambient.yaml").read_text(), re.M)


# --- refusals, through the real CLI -------------------------------------------------------------


def test_unknown_key_in_a_section_is_refused_with_its_path_and_line(refused):
    assert refused("engine:\n  bogus: 1\n") == ["line 2: engine.bogus: unknown key"]


def test_unknown_top_level_key_is_refused(refused):
    assert refused("channel: demo\nbogus: 1\n") == ["line 2: bogus: unknown key"]


def test_wrong_type_is_refused_with_the_field_path(refused):
    [problem] = refused("engine:\n  width: wide\n")

    assert problem.startswith("line 2: engine.width: ")
    assert "integer" in problem


def test_missing_environment_variable_is_reported_once_at_the_field_that_uses_it(refused):
    text = f"outputs:\n  - kind: rtmp\n    url: ${{{UNSET}}}\n"

    assert refused(text) == [f"line 3: outputs[0].url: environment variable {UNSET} is not set"]


def test_rtmp_url_with_a_non_rtmp_scheme_is_refused(refused):
    text = "outputs:\n  - kind: hls\n  - kind: rtmp\n    url: https://live.example/app/key\n"

    [problem] = refused(text)

    assert problem.startswith("line 4: outputs[1].url: URL scheme must be one of rtmp, rtmps")


def test_rtmp_url_without_a_host_is_refused(refused):
    [problem] = refused("outputs:\n  - {kind: rtmp, url: 'rtmp:///app/key'}\n")

    assert problem == "line 2: outputs[0].url: URL has no host"


def test_unknown_output_kind_is_refused_with_the_kinds_there_are(refused):
    [problem] = refused("outputs:\n  - kind: hls\n  - kind: ftp\n")

    assert problem.startswith("line 3: outputs[1]: unknown kind 'ftp'")
    assert all(kind in problem for kind in ("rtmp", "hls", "record"))


def test_odd_width_is_refused(refused):
    [problem] = refused("engine:\n  width: 833\n")

    assert problem.startswith("line 2: engine: ")
    assert "width must be even" in problem and "833" in problem


def test_encoder_width_without_height_is_refused(refused):
    [problem] = refused("encoder:\n  width: 640\n")

    assert problem == "line 2: encoder: set both width and height, or neither"


def test_invalid_yaml_is_refused_with_the_line_of_the_syntax_error(tmp_path, cli):
    result = cli(write(tmp_path, "channel: demo\nengine:\n  width: 832\n   height: 480\n"))

    assert result.returncode == 2
    assert "line 4: (top level): not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_top_level_that_is_not_a_mapping_is_refused(refused):
    assert refused("- engine\n- outputs\n") == [
        "line 1: (top level): the top level must be a mapping of sections"
    ]


def test_top_level_scalar_is_refused(refused):
    assert refused("just some words\n") == [
        "line 1: (top level): the top level must be a mapping of sections"
    ]


def test_empty_file_means_the_defaults(tmp_path):
    path = write(tmp_path, "")
    result = check_config(path)

    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert load_settings(path) == Settings()


def test_file_of_only_comments_means_the_defaults(tmp_path):
    assert load_settings(write(tmp_path, "# nothing here yet\n\n# still nothing\n")) == Settings()


def test_missing_file_is_refused(tmp_path):
    result = check_config(tmp_path / "nope.yaml")

    assert result.returncode == 2
    assert "nope.yaml" in result.stderr
    assert "cannot read file" in result.stderr
    assert "Traceback" not in result.stderr


def test_directory_instead_of_a_file_is_refused(tmp_path, cli):
    result = cli(tmp_path)

    assert result.returncode == 2
    assert "cannot read file" in result.stderr


def test_file_that_is_not_utf8_is_refused(refused):
    assert refused(b"channel: d\xe9mo\nengine: {width: 832}\n") == ["(top level): file is not UTF-8 text"]


def test_duplicate_output_names_are_refused(refused):
    text = "outputs:\n  - {kind: hls, name: main}\n  - {kind: record, name: main}\n"

    [problem] = refused(text)

    assert "outputs[1].name: duplicate output name 'main'" in problem


def test_explicit_name_clashing_with_a_default_name_is_refused(refused):
    text = "outputs:\n  - {kind: hls}\n  - {kind: record, name: hls-0}\n"

    [problem] = refused(text)

    assert "outputs[1].name: duplicate output name 'hls-0'" in problem


def test_duplicate_output_name_points_at_the_line_of_the_second_entry(refused):
    text = "channel: demo\noutputs:\n  - {kind: hls, name: main}\n  - {kind: record, name: main}\n"

    [problem] = refused(text)

    assert problem.startswith("line 4: outputs[1]")


def test_every_problem_is_reported_at_once(tmp_path):
    text = (
        "channel: demo\n"
        "engine:\n"
        "  bogus: 1\n"
        "  width: wide\n"
        "outputs:\n"
        f"  - {{kind: rtmp, url: '${{{UNSET}}}'}}\n"
    )
    result = check_config(write(tmp_path, text))

    assert result.returncode == 2
    assert "3 problem(s)" in result.stderr
    assert sorted(problems(result)) == sorted([
        "line 3: engine.bogus: unknown key",
        "line 4: engine.width: Input should be a valid integer, unable to parse string as an integer",
        f"line 6: outputs[0].url: environment variable {UNSET} is not set",
    ])


def test_every_problem_line_names_its_line_number(tmp_path, cli):
    text = (
        "channel: Bad Name\n"
        "engine: {fps: -1, backend: cuda}\n"
        "server: {port: 70000}\n"
        "store: {kind: redis, url: 'http://cache'}\n"
        "chat: {mode: anarchy, sources: [{kind: twitch}]}\n"
    )
    result = cli(write(tmp_path, text))
    lines = problems(result)

    assert result.returncode == 2
    assert len(lines) >= 6
    for line in lines:
        assert re.match(r"^line \d+: \S", line), line
    located = {line.split(": ")[1]: int(line.split(":")[0].removeprefix("line ")) for line in lines}
    assert located["channel"] == 1
    assert located["engine.fps"] == 2
    assert located["server.port"] == 3
    assert located["store.url"] == 4
    assert located["chat.mode"] == 5


# --- environment expansion -----------------------------------------------------------------------


def test_env_default_is_used_when_the_variable_is_unset():
    text = "store: {kind: redis, url: '${PC_REDIS:-redis://cache:6379/1}'}\n"

    assert parse_settings(text, env={}).store.url == "redis://cache:6379/1"


def test_env_value_wins_over_the_default():
    text = "store: {kind: redis, url: '${PC_REDIS:-redis://cache:6379/1}'}\n"

    assert parse_settings(text, env={"PC_REDIS": "redis://other:6379/3"}).store.url == "redis://other:6379/3"


def test_env_empty_default_is_allowed():
    assert parse_settings("engine: {prompt: 'a${PC_NOTHING:-}b'}\n", env={}).engine.prompt == "ab"


def test_env_reference_inside_a_longer_string_is_expanded():
    text = "outputs: [{kind: rtmp, url: 'rtmp://${PC_HOST}/app/${PC_KEY}'}]\n"

    settings = parse_settings(text, env={"PC_HOST": "ingest.example", "PC_KEY": "k123"})

    assert settings.outputs[0].url == "rtmp://ingest.example/app/k123"


def test_env_value_containing_a_reference_is_not_expanded_again():
    text = "outputs: [{kind: rtmp, url: '${PC_URL}'}]\n"
    env = {"PC_URL": "rtmp://ingest.example/app/${PC_KEY}", "PC_KEY": "leaked"}

    assert parse_settings(text, env=env).outputs[0].url == "rtmp://ingest.example/app/${PC_KEY}"


def test_env_expansion_through_the_cli_uses_the_process_environment(tmp_path):
    path = write(tmp_path, "outputs: [{kind: rtmp, url: '${PC_TEST_URL}'}]\n")

    result = check_config(path, _env({"PC_TEST_URL": "rtmps://ingest.example/app/key"}))

    assert result.returncode == 0, result.stderr


def test_env_references_are_not_expanded_in_keys():
    with pytest.raises(ConfigError) as caught:
        parse_settings("engine: {'${PC_KEY}': 1}\n", env={"PC_KEY": "width"})

    assert [p.location for p in caught.value.problems] == ["engine.${PC_KEY}"]


# --- robustness ----------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["${PC_X}", "${PC_X:-1}", "rtmp://h/a/k", "hls", "rtmp", "record", "twitch", "local",
                     "vote", "832", "-1", "1e9"]),
)
_keys = st.one_of(
    st.sampled_from([*Settings.model_fields, "kind", "url", "width", "height", "fps", "dir", "name",
                     "sources", "mode", "port", "backend", "segment_minutes", "bogus"]),
    st.text(max_size=8), st.integers(-3, 3),
)
_trees = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _trees, max_size=6))
def test_random_nested_documents_give_settings_or_config_error(document):
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        result = parse_settings(text, env={"PC_X": "rtmp://h/a/k"})
    except ConfigError as exc:
        assert exc.problems
        assert all(str(p) for p in exc.problems)
    else:
        assert isinstance(result, Settings)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_text_gives_settings_or_config_error(text):
    try:
        parse_settings(text, env={})
    except ConfigError as exc:
        assert exc.problems


def test_self_referencing_alias_is_refused_not_crashed_on():
    with pytest.raises(ConfigError):
        parse_settings("schedule: &loop [*loop]\n", env={})


def test_absurdly_deep_nesting_is_refused_not_crashed_on():
    with pytest.raises(ConfigError):
        parse_settings("schedule: " + "[" * 1000 + "]" * 1000 + "\n", env={})


def test_a_yaml_value_no_constructor_knows_is_a_config_error():
    # Found by the fuzz test above: "=" is YAML's !!value tag, which the safe loader cannot build.
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_settings("=", env={})
