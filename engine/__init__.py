"""The generator: LongLive and preview backends, the frame ring and the engine process."""
