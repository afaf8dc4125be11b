"""The environment of a subprocess that simulates ``n`` CPU devices (XLA reads the flag before
JAX starts, so it cannot be set inside a running test). The parent's other XLA flags carry over
(the test command's cheap-compilation flags: see the Makefile), and the
tree these tests belong to comes first on ``PYTHONPATH``: a worker script imports that tree's
jdeq, not whichever one is installed (mutation testing runs the tests in a mutated copy)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_devices_env(n: int) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
