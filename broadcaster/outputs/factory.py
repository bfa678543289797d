"""Turn output settings into muxer targets."""

from __future__ import annotations

from broadcaster.backoff import Backoff
from broadcaster.encoder import StreamEncoder
from broadcaster.metrics import Metrics
from broadcaster.outputs.muxer_output import MuxerOutput
from broadcaster.outputs.muxer_process import MuxTarget
from broadcaster.outputs.virtualcam import VirtualCamOutput
from broadcaster.outputs.whip import WhipOutput
from broadcaster.settings import (
    HlsOutputSettings,
    OutputSettings,
    RecordOutputSettings,
    RtmpOutputSettings,
    Settings,
    VirtualCamOutputSettings,
    WhipOutputSettings,
    output_name,
)

HLS_PLAYLIST = "index.m3u8"


def mux_target(output: OutputSettings, name: str, channel: str, keyframe_seconds: float) -> MuxTarget:
    """The muxer target for one output entry."""
    if isinstance(output, RtmpOutputSettings):
        # A planned reconnect is a rotation: the muxer reopens the connection at a keyframe.
        return MuxTarget(name=name, kind="rtmp", format="flv", destination=output.url,
                         rotate_seconds=output.planned_reconnect_hours * 3600 or None)
    if isinstance(output, HlsOutputSettings):
        output.dir.mkdir(parents=True, exist_ok=True)
        # Segments can only cut at keyframes: round the segment length to whole GOPs.
        gops = max(1, round(output.segment_seconds / keyframe_seconds))
        return MuxTarget(
            name=name,
            kind="hls",
            format="hls",
            destination=str(output.dir / HLS_PLAYLIST),
            options={
                "hls_time": f"{gops * keyframe_seconds:g}",
                "hls_list_size": str(output.list_size),
                "hls_flags": "delete_segments+independent_segments+program_date_time",
                "hls_start_number_source": "epoch",
                "hls_segment_filename": str(output.dir / f"{channel}-%d.ts"),
            },
        )
    if isinstance(output, RecordOutputSettings):
        options = {}
        if output.format == "mp4":
            # Fragmented MP4: every fragment is playable, even if the process is killed.
            options["movflags"] = "+frag_keyframe+empty_moov+default_base_moof"
        return MuxTarget(
            name=name,
            kind="record",
            format="matroska" if output.format == "mkv" else "mp4",
            destination=str(output.dir),
            options=options,
            rotate_seconds=output.segment_minutes * 60,
            file_prefix=channel,
            keep_hours=output.keep_hours,
        )
    raise TypeError(f"no muxer for output kind {output.kind!r}")


def build_outputs(settings: Settings, encoder: StreamEncoder,
                  metrics: Metrics) -> list[MuxerOutput | WhipOutput | VirtualCamOutput]:
    """One supervised muxer per configured output; a WebRTC session for `kind: whip`."""
    outputs: list[MuxerOutput | WhipOutput | VirtualCamOutput] = []
    for index, output in enumerate(settings.outputs):
        name = output_name(output, index)
        if isinstance(output, WhipOutputSettings):
            outputs.append(WhipOutput(name, output, encoder, metrics, settings.server.ice_servers))
            continue
        if isinstance(output, VirtualCamOutputSettings):
            engine = settings.engine
            outputs.append(VirtualCamOutput(name, output.device, engine.width, engine.height, engine.fps,
                                            metrics))
            continue
        target = mux_target(output, name, settings.channel, settings.encoder.keyframe_seconds)
        if isinstance(output, RtmpOutputSettings):
            watchdog = output.watchdog_seconds
            backoff = Backoff(output.reconnect_min_s, output.reconnect_max_s)
        else:
            watchdog, backoff = 10.0, Backoff(1.0, 30.0)
        time_bases = (encoder.video_time_base, encoder.audio_time_base)
        outputs.append(MuxerOutput(target, encoder.template, time_bases, metrics, watchdog, backoff))
    return outputs
