"""An image as an implicit-representation task: pixel coordinates in ``[-1, 1]^2`` -> RGB.

The image is one of the sample images shipped inside scikit-learn
(``sklearn.datasets.load_sample_image``: ``"china.jpg"`` or ``"flower.jpg"``, 427 x 640; nothing
is downloaded), center-cropped to a square and downsampled by area averaging (exact box means,
no interpolation library) to ``size x size``. Each pixel is one example, with its index, so
that a DEQ can warm-start each pixel's solve from its fixed point at the previous epoch
(``jdeq.nnx.FixedPointCache``).

Example:
  >>> from jdeq.data import image
  >>> d = image.load(16)
  >>> d["coords"].shape, d["pixels"].shape, d["index"][:3].tolist()
  ((256, 2), (256, 3), [0, 1, 2])
  >>> float(d["coords"].min()), float(d["coords"].max())
  (-1.0, 1.0)
"""

from __future__ import annotations

import numpy as np

from jdeq import _validate as V

__all__ = ["NAMES", "downsample", "load", "psnr"]

NAMES = ("china.jpg", "flower.jpg")


def downsample(img: np.ndarray, size: int) -> np.ndarray:
    """The central square of ``img`` (``(H, W, C)``), averaged over ``size x size`` boxes.

    Box ``(i, j)`` covers source rows ``[floor(i s), floor((i+1) s))`` (``s`` = side / size), and
    likewise for columns: every source pixel of the square counts once.

    Args:
      img: ``(H, W, C)`` array.
      size: output side, ``1 <= size <= min(H, W)``.

    Returns:
      ``(size, size, C)`` float64 array.
    """
    V.positive_int(size, "size")
    img = np.asarray(img, np.float64)
    if img.ndim != 3:
        raise ValueError(f"`img` must be (H, W, C), got shape {img.shape}.")
    side = min(img.shape[:2])
    if size > side:
        raise ValueError(f"`size`={size} exceeds the image's shorter side ({side}).")
    top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    square = img[top : top + side, left : left + side]
    edges = (np.arange(size) * side) // size
    rows = np.add.reduceat(square, edges, axis=0)
    boxes = np.add.reduceat(rows, edges, axis=1)
    counts = np.diff(np.append(edges, side))
    return boxes / (counts[:, None, None] * counts[None, :, None])


def load(size: int = 32, *, name: str = "china.jpg", dtype=np.float32) -> dict[str, np.ndarray]:
    """The image as a dataset of pixels, in row-major order.

    Args:
      size: side of the downsampled square image (e.g. 32 or 48 on a CPU).
      name: one of :data:`NAMES` (scikit-learn's sample images).
      dtype: float dtype of the coordinates and colors.

    Returns:
      ``{"coords": (size*size, 2) in [-1, 1] (row, column), "pixels": (size*size, 3) RGB in
      [0, 1], "index": (size*size,) int32 arange}``.
    """
    V.one_of(name, "name", NAMES)  # scikit-learn's sample images
    from sklearn.datasets import load_sample_image

    img = downsample(load_sample_image(name), size) / 255.0
    axis = np.linspace(-1.0, 1.0, size)
    rr, cc = np.meshgrid(axis, axis, indexing="ij")
    coords = np.stack([rr.ravel(), cc.ravel()], axis=1)
    return {
        "coords": coords.astype(dtype),
        "pixels": img.reshape(-1, img.shape[-1]).astype(dtype),
        "index": np.arange(size * size, dtype=np.int32),
    }


def psnr(pred, target, *, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(peak^2 / mean((pred - target)^2))``.

    Example:
      >>> round(psnr(np.full(4, 0.5), np.full(4, 0.6)), 2)
      20.0
    """
    mse = float(np.mean((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak**2 / mse))
