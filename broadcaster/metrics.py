"""Prometheus metrics (names fixed by product.md), on a registry per service instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Every metric the broadcaster exports; one instance per running service."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.frames_generated = Counter(
            "promptcast_frames_generated", "Frames the engine delivered into the ring", registry=r)
        self.frames_output = Counter(
            "promptcast_frames_output", "Frames the pacer sent to the encoder", registry=r)
        self.frames_repeated = Counter(
            "promptcast_frames_repeated", "Output frames repeated because the engine was late", registry=r)
        self.generation_fps = Gauge(
            "promptcast_generation_fps", "Engine frames per second over the last seconds", registry=r)
        self.output_connected = Gauge(
            "promptcast_output_connected", "1 while the output is writing", ["output"], registry=r)
        self.output_reconnects = Counter(
            "promptcast_output_reconnects", "Restarts of an output after a failure", ["output"], registry=r)
        self.output_watchdog_kills = Counter(
            "promptcast_output_watchdog_kills", "Muxers killed for making no progress", ["output"],
            registry=r)
        self.output_planned_reconnects = Counter(
            "promptcast_output_planned_reconnects",
            "Reconnects made on purpose at a keyframe before an ingest's session cap", ["output"], registry=r)
        self.output_dropped_packets = Counter(
            "promptcast_output_dropped_packets", "Packets an output could not take in time", ["output"],
            registry=r)
        self.encode_seconds = Histogram(
            "promptcast_encode_seconds", "Time to encode one output frame (video + audio)",
            buckets=(0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128), registry=r)
        self.prompt_switches = Counter(
            "promptcast_prompt_switches", "Prompt switches applied", registry=r)
        self.switch_latency = Histogram(
            "promptcast_switch_latency_seconds",
            "From the switch decision to the first frame of the new prompt leaving the encoder",
            buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10), registry=r)
        self.engine_restarts = Counter(
            "promptcast_engine_restarts", "Engine process restarts after a crash or hang", ["reason"],
            registry=r)
        self.recaches = Counter(
            "promptcast_recaches", "KV-recaches the engine ran to apply prompt switches", registry=r)
        self.reanchors = Counter(
            "promptcast_reanchors", "Soft re-anchors of the attention sink (requested, scheduled, drift)",
            registry=r)
        self.engine_drift = Gauge(
            "promptcast_engine_drift", "Engine drift score: latent spread against its anchor reference",
            registry=r)
        self.chat_messages = Counter(
            "promptcast_chat_messages", "Chat messages received", ["source"], registry=r)
        self.votes = Counter("promptcast_votes", "Votes counted", registry=r)
        self.prompts_rejected = Counter(
            "promptcast_prompts_rejected", "Suggestions and commands refused, by reason", ["reason"],
            registry=r)
        self.queue_depth = Gauge("promptcast_queue_depth", "Prompts waiting to be played", registry=r)
        self.engine_up = Gauge("promptcast_engine_up", "1 while the engine process delivers frames",
                               registry=r)
        self.engine_phase = Gauge(
            "promptcast_engine_phase",
            "1 for the engine's current phase (loading, warmup, compiling, running)",
            ["phase"], registry=r)
        self.engine_load_bytes = Gauge(
            "promptcast_engine_load_bytes", "Bytes of weight files the loading engine has read so far",
            registry=r)
        self.engine_crash_loop = Gauge(
            "promptcast_engine_crash_loop", "1 while the engine restarts in a crash loop", registry=r)

        self.autopilot_engaged = Gauge(
            "promptcast_autopilot_engaged", "1 while the autopilot plays the programme (chat quiet or off)",
            registry=r)
        self.chat_steering_enabled = Gauge(
            "promptcast_chat_steering_enabled", "1 while the programme lets chat steer", registry=r)

        self.task_failures = Counter(
            "promptcast_task_failures", "Failures of a part (output, source, sink, background task), "
            "each contained and retried", ["task"], registry=r)
        self.event_loop_lag = Gauge(
            "promptcast_event_loop_lag_seconds", "How late the event loop's last timer fired "
            "(a blocking call on the loop shows here)", registry=r)
        self.event_loop_lag_max = Gauge(
            "promptcast_event_loop_lag_max_seconds", "The largest event-loop lag since the start", registry=r)
        self.http_connections = Gauge(
            "promptcast_http_connections", "Open HTTP connections", registry=r)
        self.http_refused = Counter(
            "promptcast_http_refused", "HTTP connections or requests refused by a cap, by reason", ["reason"],
            registry=r)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
