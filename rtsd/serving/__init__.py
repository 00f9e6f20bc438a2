"""Serving: the HTTP APIs clients speak (protocol), request batching, Ray Serve (ray_app) and Triton (triton/).

Only ray_app imports a serving engine; everything else runs without Ray or Triton installed.
"""
