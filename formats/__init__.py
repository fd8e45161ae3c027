"""The `.zmoe` archive format: spec'd in specs/zmoe.md, free of torch, shared by packer and runtime."""
from formats.errors import ZmoeError

FORMAT_VERSION = 1

__all__ = ["ZmoeError", "FORMAT_VERSION"]
