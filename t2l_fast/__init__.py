"""t2l_fast: fast text-driven layered image and video editing (Text2LIVE)."""

__version__ = "0.1.0"
