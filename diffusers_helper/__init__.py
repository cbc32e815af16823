"""FramePack engine: loading, conditioning, sampling, caches, decoding and video output."""

__version__ = "0.1.0"
