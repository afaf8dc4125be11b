"""Data that jdeq generates itself (nothing is downloaded at run time).

- :mod:`jdeq.data.arithmetic`: random symbolic arithmetic expressions mod 10 with a controllable
  distribution of nesting depth (the depth study of issue 4).
"""

from jdeq.data import arithmetic

__all__ = ["arithmetic"]
