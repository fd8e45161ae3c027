"""Benchmarks (``zipmoe bench ...``): peers side by side, medians, a rich table or JSON.

``zipmoe.bench.codec`` measures the exponent codec and the parallel decoder; ``zipmoe.bench.cli``
holds the typer app the umbrella CLI mounts. Importing this package imports nothing heavy.
"""
