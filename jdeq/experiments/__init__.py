"""Reproducible studies built on jdeq, each a module runnable as ``python -m jdeq.experiments.NAME``.

- :mod:`jdeq.experiments.arithmetic`: the depth study on symbolic arithmetic expressions (DEQ vs
  weight-tied unrolled depths vs an untied transformer and an LSTM; depth extrapolation;
  test-time compute; convergence vs accuracy). Results go under ``results/arithmetic/``.
"""

__all__ = ["arithmetic"]
