"""Outputs: every place the one encode goes (RTMP, HLS, recordings)."""
