"""Cells and ready models for jdeq (Flax NNX first; Linen twins in ``jdeq.models.linen``)."""

from jdeq.models import linen
from jdeq.models.mlp import MLPCell

__all__ = ["MLPCell", "linen"]
