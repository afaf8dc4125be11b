"""Data that jdeq generates itself (nothing is downloaded at run time).

- :mod:`jdeq.data.arithmetic`: random symbolic ``+``/``-`` expressions whose nesting depth is the
  only thing that varies (same digits and operators at every depth), labelled with their exact
  value in [0, 9] (the data of the depth study, :mod:`jdeq.experiments.arithmetic`).
- :mod:`jdeq.data.digits`: scikit-learn's 8x8 handwritten digits, fixed stratified split.
- :mod:`jdeq.data.image`: a scikit-learn sample image (``china.jpg``) downsampled, as pixel
  coordinates -> RGB for implicit representations.
- :mod:`jdeq.data.mnist1d`: MNIST-1D generated offline from the ``mnist1d`` package's templates.
"""

from jdeq.data import arithmetic, digits, image, mnist1d

__all__ = ["arithmetic", "digits", "image", "mnist1d"]
