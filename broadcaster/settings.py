"""The channel's YAML schema, composed from each package's settings, and its loader.

Errors are collected, never thrown one at a time: `load_settings` raises `ConfigError`
holding every problem with its location (`outputs[1].url: ...`) and, where the YAML
has it, the line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broadcaster.envref import expand_env as _expand_env
from broadcaster.schedule import ScheduleSettings
from chat.settings import ChatSettings, StoreSettings
from engine.settings import EngineSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


SIZE_PRESETS = {"720p": (1280, 720), "1080p": (1920, 1080)}


class EncoderSettings(_Strict):
    """The one shared encode: H.264 video with broadcast settings plus AAC audio."""

    fps: float | None = Field(None, gt=0, le=120, description="output fps; default the engine's")
    width: int | None = Field(None, ge=16, le=4096, description="output width; default the engine's")
    height: int | None = Field(None, ge=16, le=4096, description="output height; default the engine's")
    size: Literal["engine", "720p", "1080p"] = Field(
        "engine", description="output scaling preset: 720p = 1280x720, 1080p = 1920x1080 (scaled in the "
                              "encoder's swscale call; CPU per frame in docs/benchmarks.md); or width/height")
    video_bitrate_kbps: int = Field(3000, ge=100, le=50000)
    keyframe_seconds: float = Field(2.0, gt=0, le=10)
    codec: Literal["auto", "libx264", "h264_nvenc"] = "auto"
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "veryfast"
    profile: Literal["main", "baseline"] = "main"
    threads: int = Field(0, ge=0, le=64, description="x264 threads; 0 = automatic")
    audio: str = Field("silent", description="'silent' or the path of an audio file played in a loop")
    audio_bitrate_kbps: int = Field(128, ge=32, le=512)
    burn_in_prompt: bool = Field(
        False, description="draw the on-air prompt as a lower third into the video (RTMP-only channels)")

    @model_validator(mode="after")
    def _even_size(self) -> EncoderSettings:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value % 2:
                raise ValueError(f"{name} must be even (H.264 4:2:0), got {value}")
        if (self.width is None) != (self.height is None):
            raise ValueError("set both width and height, or neither")
        if self.width is not None and self.size != "engine":
            raise ValueError(f"size: '{self.size}' and width/height both set the output size; keep one")
        return self

    @property
    def preset_size(self) -> tuple[int, int] | None:
        """The output size `size` names, or None for the engine's."""
        return SIZE_PRESETS.get(self.size)


def _check_url(url: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        got = f"'{parts.scheme}'" if parts.scheme else "none"
        raise ValueError(f"URL scheme must be one of {', '.join(schemes)} (got {got})")
    if not parts.hostname:
        raise ValueError("URL has no host")
    return url


class _OutputBase(_Strict):
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,40}$", description="label in metrics and logs; default kind-N"
    )


class _NetworkOutput(_OutputBase):
    """An output to a server: watched for progress and reconnected with backoff."""

    watchdog_seconds: float = Field(
        10.0, gt=0, description="no progress (RTMP: writes; WHIP: RTCP reports) this long -> reconnect")
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)


class RtmpOutputSettings(_NetworkOutput):
    """Push to an RTMP(S) ingest (Twitch, YouTube, a local nginx-rtmp)."""

    kind: Literal["rtmp"]
    url: str
    planned_reconnect_hours: float = Field(
        47.5, ge=0, description="reconnect at a keyframe after this long connected, before an ingest's "
                                "session cap (Twitch ends a broadcast at 48 h); 0 = never")

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        return _check_url(url, ("rtmp", "rtmps"))


class HlsOutputSettings(_OutputBase):
    """HLS playlist + segments on disk (and served at /hls/ by the HTTP server)."""

    kind: Literal["hls"]
    dir: Path = Path("./out/hls")
    segment_seconds: float = Field(2.0, gt=0, le=60, description="rounded to whole keyframe intervals")
    list_size: int = Field(6, ge=2, le=100)


class RecordOutputSettings(_OutputBase):
    """A recording rotated by duration."""

    kind: Literal["record"]
    dir: Path = Path("./out/rec")
    segment_minutes: float = Field(60.0, gt=0, description="a new file starts at the first keyframe after")
    format: Literal["mp4", "mkv"] = "mp4"
    keep_hours: float = Field(
        0, ge=0, description="delete this channel's recordings (and their timelines) older than this, "
                             "checked at each new file; 0 = keep everything")


class WhipOutputSettings(_NetworkOutput):
    """Push the same H.264 (+ Opus) over WebRTC to a WHIP ingest (an SFU, a media server, OBS's peers)."""

    kind: Literal["whip"]
    url: str
    bearer_token: str | None = Field(None, description="sent as 'Authorization: Bearer ...' on POST/DELETE")
    connect_timeout_s: float = Field(10.0, gt=0, description="ICE + DTLS must connect within this")

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        return _check_url(url, ("http", "https"))


class VirtualCamOutputSettings(_OutputBase):
    """A v4l2loopback webcam (needs `pip install promptcast[virtualcam]` and the kernel module)."""

    kind: Literal["virtualcam"]
    device: str | None = Field(None, pattern=r"^/dev/video[0-9]+$", description="default: the first loopback")


OutputSettings = Annotated[
    RtmpOutputSettings | HlsOutputSettings | RecordOutputSettings | WhipOutputSettings
    | VirtualCamOutputSettings,
    Field(discriminator="kind"),
]


class IceServerSettings(_Strict):
    """A STUN or TURN server handed to every WebRTC peer connection (WHEP viewers, WHIP pushes)."""

    urls: str | list[str] = Field(description="stun:host:port, turn:host:port?transport=udp|tcp, turns:...")
    username: str | None = None
    credential: str | None = None

    @field_validator("urls")
    @classmethod
    def _ice_scheme(cls, urls: str | list[str]) -> str | list[str]:
        for url in [urls] if isinstance(urls, str) else urls:
            if url.split(":", 1)[0] not in ("stun", "stuns", "turn", "turns"):
                raise ValueError(f"'{url}' is not a stun:, stuns:, turn: or turns: URL")
        return urls


_ORIGIN = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::\d{1,5})?")


class ServerSettings(_Strict):
    """The HTTP server: health, metrics, control API and pages."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token_file: Path = Field(
        Path("./out/api-token"),
        description="where a generated control-API token is kept when PROMPTCAST_API_TOKEN is unset",
    )
    whep_max_viewers: int = Field(
        10, ge=0, le=1000, description="concurrent WHEP viewers; more get 503 (0 turns WHEP viewing off)")
    whep_pending_per_client: int = Field(
        5, ge=1, le=1000,
        description="WHEP offers not yet connected per client address; more get 429 (half the default "
                    "viewer slots: one machine may open several previews at once, not take them all)")
    max_connections: int = Field(
        256, ge=8, le=100_000,
        description="open HTTP connections at most (and at most half the open-file limit); more are "
                    "answered 503 and closed")
    idle_timeout_s: float = Field(
        10.0, gt=0, le=3600,
        description="a connection that has not sent complete request headers this long after connecting "
                    "or after its last answer (keep-alive) is closed")
    events_per_client: int = Field(
        10, ge=1, le=10_000, description="open /events streams per client address; more get 429")
    ice_servers: list[IceServerSettings] = Field(
        default_factory=list, description="STUN/TURN for WebRTC; none: host candidates only (LAN, localhost)")
    ice_loopback: bool = Field(
        False, description="also offer 127.0.0.1 as an ICE candidate (same-machine tests and demos only)")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="web origins (https://host[:port]) whose pages may call this server; '*' for any; "
                    "empty: none (CORS closed)",
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"'{origin}' is not an origin: scheme://host[:port], no path, or '*'")
        return origins


class Settings(_Strict):
    """One channel: the whole YAML file."""

    channel: str = Field("demo", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    outputs: list[OutputSettings] = Field(
        default_factory=lambda: [HlsOutputSettings(kind="hls"), RecordOutputSettings(kind="record")]
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)

    @model_validator(mode="after")
    def _unique_output_names(self) -> Settings:
        seen: set[str] = set()
        for index, output in enumerate(self.outputs):
            name = output_name(output, index)
            if name in seen:
                raise ValueError(f"outputs[{index}].name: duplicate output name '{name}'")
            seen.add(name)
        return self

    @property
    def output_fps(self) -> float:
        """The fps the encoder runs at."""
        return self.encoder.fps or self.engine.fps

    @property
    def output_size(self) -> tuple[int, int]:
        """The (width, height) the encoder runs at."""
        if self.encoder.width and self.encoder.height:
            return self.encoder.width, self.encoder.height
        return self.encoder.preset_size or (self.engine.width, self.engine.height)


def output_name(output: OutputSettings, index: int) -> str:
    """The output's label: its `name`, else `kind-index`."""
    return output.name or f"{output.kind}-{index}"


@dataclass(frozen=True)
class ConfigProblem:
    """One located error in a config file."""

    location: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.location or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """A config file that cannot be used; carries every problem found."""

    def __init__(self, source: str, problems: list[ConfigProblem]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))


MAX_CONFIG_CHARS = 1_000_000
MAX_CONFIG_NODES = 100_000  # values after alias expansion; the largest preset has a few hundred


def _format_loc(parts: tuple[Any, ...]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _line_index(root: yaml.Node | None) -> dict[tuple[Any, ...], int]:
    """Map each YAML path to its 1-based line, so errors can point into the file."""
    index: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    index[(*path, key.value)] = key.start_mark.line + 1
                    walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return index


def _pydantic_path(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop the union tags pydantic puts in locations (`outputs.1.rtmp.url` -> `outputs[1].url`)."""
    path: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part not in node and not last and isinstance(part, str):
            continue  # a discriminator tag, or a model-level validator marker
        path.append(part)
        node = node.get(part) if isinstance(node, dict) else (
            node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None
        )
    return tuple(path)


def _clean_message(error: dict) -> str:
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown kind {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if error["type"] == "missing":
        return "required field is missing"
    return message


def parse_settings(text: str, source: str = "<config>", env: dict[str, str] | None = None) -> Settings:
    """Validate YAML text into Settings, raising ConfigError with every located problem."""
    env = dict(os.environ) if env is None else env
    try:
        return _parse(text, source, env)
    except RecursionError:
        # A self-referencing alias (&a [*a]) or absurd nesting: refuse, never crash.
        raise ConfigError(source, [ConfigProblem("", "nested too deeply or refers to itself")]) from None


_LOCATED = re.compile(r"^(?P<loc>[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)*): (?P<msg>.+)$", re.S)


class _NodeBudget:
    """The size of a YAML node graph once its aliases are expanded, computed without expanding them."""

    def __init__(self, limit: int):
        self.limit = limit
        self._sizes: dict[int, int] = {}
        self._open: set[int] = set()

    def size(self, node: yaml.Node) -> int:
        """Nodes under `node` (itself included) after alias expansion, capped just above the limit."""
        key = id(node)
        if key in self._sizes:
            return self._sizes[key]
        if key in self._open:
            raise _AliasCycle(node)
        self._open.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        for child in children:
            total = min(self.limit + 1, total + self.size(child))
        self._open.discard(key)
        self._sizes[key] = total
        return total

    def culprit(self, root: yaml.Node) -> tuple[tuple[Any, ...], int]:
        """The deepest mapping key (path, line) whose value alone is over the limit."""
        path: tuple[Any, ...] = ()
        node, line = root, root.start_mark.line + 1
        while isinstance(node, yaml.MappingNode):
            over = next(((k, v) for k, v in node.value if self.size(v) > self.limit), None)
            if over is None or not isinstance(over[0], yaml.ScalarNode):
                break
            path, line, node = (*path, over[0].value), over[0].start_mark.line + 1, over[1]
        return path, line


class _AliasCycle(Exception):
    def __init__(self, node: yaml.Node):
        self.node = node


def _compose(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML into data within the size and alias budgets; the composed root for line numbers."""
    if len(text) > MAX_CONFIG_CHARS:
        raise ConfigError(source, [ConfigProblem("", f"the file has {len(text)} characters; at most "
                                                     f"{MAX_CONFIG_CHARS} are read")])
    loader: yaml.SafeLoader | None = None
    try:
        try:
            loader = yaml.SafeLoader(text)  # the reader already refuses unprintable characters
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark else None
            raise ConfigError(source, [ConfigProblem("", f"not valid YAML: {exc}", line)]) from None
        if root is None:
            return None, None
        budget = _NodeBudget(MAX_CONFIG_NODES)
        try:
            too_big = budget.size(root) > MAX_CONFIG_NODES
        except _AliasCycle as cycle:
            line = cycle.node.start_mark.line + 1
            raise ConfigError(source, [ConfigProblem("", "an alias refers to itself", line)]) from None
        if too_big:
            # Aliases share one parsed value, but everything after parsing walks the expanded tree:
            # a few hundred bytes of nested aliases would take minutes and gigabytes.
            path, line = budget.culprit(root)
            raise ConfigError(source, [ConfigProblem(
                _format_loc(path), f"expands to more than {MAX_CONFIG_NODES} values through YAML aliases "
                                   "(refused: an alias bomb?)", line)])
        try:
            return loader.construct_document(root), root
        except yaml.YAMLError as exc:  # e.g. a bare "=" (YAML's unsupported !!value tag)
            mark = getattr(exc, "problem_mark", None)
            raise ConfigError(source, [ConfigProblem("", f"not valid YAML: {exc}",
                                                     mark.line + 1 if mark else None)]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _parse(text: str, source: str, env: dict[str, str]) -> Settings:
    data, root = _compose(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigProblem("", "the top level must be a mapping of sections", 1)])
    lines = _line_index(root)
    env_problems: list[tuple[tuple[Any, ...], str]] = []
    data = _expand_env(data, (), env, env_problems)
    problems = [ConfigProblem(_format_loc(p), m, lines.get(p)) for p, m in env_problems]
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            path = _pydantic_path(tuple(error["loc"]), data)
            located = [p for p in env_problems if p[0] == path]
            if located:
                continue  # already reported as a missing variable
            line = lines.get(path) or lines.get(path[:-1])
            message = _clean_message(error)
            located = _LOCATED.match(message) if not path else None
            if located:  # a whole-file check that names its own location
                loc = located["loc"]
                path = tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]+", loc) if p)
                line = lines.get(path) or lines.get(path[:-1])
                problems.append(ConfigProblem(loc, located["msg"], line))
                continue
            problems.append(ConfigProblem(_format_loc(path), message, line))
        raise ConfigError(source, problems) from None
    if problems:
        raise ConfigError(source, problems)
    return settings


def load_settings(path: str | Path | None, env: dict[str, str] | None = None) -> Settings:
    """Load a channel file; `None` gives the embedded default (config/demo.yaml)."""
    if path is None:
        return Settings()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read file: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), [ConfigProblem("", "file is not UTF-8 text")]) from None
    return parse_settings(text, str(path), env)
