#!/usr/bin/env python
"""Run the exponent-codec benchmark (same as ``zipmoe bench codec``); options as for that command.

Example: ``python scripts/bench_codec.py --elements 33554432 --runs 5 --out bench-out/codec.json``
"""
import sys
from pathlib import Path

try:
    from zipmoe.bench.cli import app
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from zipmoe.bench.cli import app

if __name__ == "__main__":
    sys.exit(app(["codec", *sys.argv[1:]]))
