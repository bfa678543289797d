"""LongLive 2.0 (Wan2.2-TI2V-5B) as the `longlive2` backend: model presets, shot-aware cache, UniPC, VAE."""
