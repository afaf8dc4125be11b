"""jdeq's benchmarks: each runs as ``python -m benchmarks.NAME`` (see ``benchmarks/README.md``).

They print a header naming the machine, a table last, and write JSON (+ a PNG plot) under
``results/``.
"""
