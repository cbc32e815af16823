"""Latents to pixels: the decode planner, the exact chunked decode, the optional TensorRT tile decoder."""
