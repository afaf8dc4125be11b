"""Cells and ready models for jdeq (Flax NNX first; Linen twins in ``jdeq.models.linen``)."""

from jdeq.models import linen
from jdeq.models._conv import conv_general_dilated, conv_same, flip_transpose
from jdeq.models.dropout import VariationalDropout, dropout_mask, reset_dropout
from jdeq.models.hypersolver import HyperSolver
from jdeq.models.inr import DEQINR, SIREN, FourierFeatures, FourierMLP, SineCell
from jdeq.models.mdeq import MDEQCell, MDEQClassifier
from jdeq.models.mlp import MLPCell
from jdeq.models.mondeq import MonDEQ, MonDEQClassifier, MonotoneConvCell, MonotoneDenseCell
from jdeq.models.precision import MixedPrecision
from jdeq.models.norm import SpectralNorm, WeightNorm, apply_norm, update_norm
from jdeq.models.transformer import (
    LSTMClassifier,
    TiedTransformerClassifier,
    TransformerBlock,
    TransformerCell,
    TransformerClassifier,
)

__all__ = [
    "DEQINR",
    "FourierFeatures",
    "FourierMLP",
    "HyperSolver",
    "LSTMClassifier",
    "MDEQCell",
    "MDEQClassifier",
    "MLPCell",
    "MixedPrecision",
    "MonDEQ",
    "MonDEQClassifier",
    "MonotoneConvCell",
    "MonotoneDenseCell",
    "SIREN",
    "SineCell",
    "SpectralNorm",
    "TiedTransformerClassifier",
    "TransformerBlock",
    "TransformerCell",
    "TransformerClassifier",
    "VariationalDropout",
    "WeightNorm",
    "apply_norm",
    "conv_general_dilated",
    "conv_same",
    "dropout_mask",
    "flip_transpose",
    "linen",
    "reset_dropout",
    "update_norm",
]
