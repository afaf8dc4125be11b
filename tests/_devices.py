"""The environment of a subprocess that simulates ``n`` CPU devices (XLA reads the flag before
JAX starts, so it cannot be set inside a running test). The parent's other XLA flags carry over
(the test command compiles at ``--xla_backend_optimization_level=0``: see the Makefile)."""

from __future__ import annotations

import os


def cpu_devices_env(n: int) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
