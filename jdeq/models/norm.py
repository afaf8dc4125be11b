"""Weight normalization and spectral normalization of a DEQ cell's weights (nnx and linen).

Flax already has both: ``nnx.SpectralNorm`` / ``nnx.WeightNorm`` and ``linen.SpectralNorm`` /
``linen.WeightNorm``. This module adds only what a DEQ needs on top of them:

* **The power-iteration update happens once per forward, outside the solve.** Spectral norm keeps
  a vector ``u`` (and ``sigma``) in the ``batch_stats`` collection. Inside the solver loop the cell
  must be a fixed function of its arguments, so the cell calls Flax's SpectralNorm with
  ``update_stats=False`` (it normalizes with the stored ``u``), and :func:`update_norm` refines
  ``u`` and ``sigma`` by power iteration on the current weights, once per training step, before
  the forward solve. With an nnx model it updates the module in place; with linen it maps a
  ``variables`` dict to a new one.
* **A target spectral norm.** Flax normalizes to ``||W||_2 = 1``; a DEQ usually wants a target
  ``c < 1`` so that, with a 1-Lipschitz activation, the cell is a contraction in ``z``
  (``W -> c W / sigma(W)``). :class:`SpectralNorm` scales the layer's input by ``c``, which for an
  affine layer (Linear, Conv, Einsum) is exactly the weight ``c W / sigma``. In a linen cell write
  ``nn.SpectralNorm(layer)(c * z, update_stats=False)``.
* **No in-place rewrite of the raw weights.** ``nnx.SpectralNorm`` and ``nnx.WeightNorm`` write the
  normalized kernel back into the wrapped layer's parameter when called. Inside
  :class:`jdeq.nnx.DEQ` that only touches a throw-away copy, but an eager call of the cell (a
  diagnostic, a head) would replace the trained weight ``V`` by its normalized version. The
  wrappers here restore the raw parameters after every call, so a call is side-effect free.
* :func:`apply_norm` wraps the named layers of an existing cell in place (like TorchDEQ's
  ``apply_norm``), e.g. only the recurrent weight ``w`` of :class:`jdeq.models.MLPCell`.

References: Miyato et al., "Spectral Normalization for Generative Adversarial Networks", ICLR
2018; Salimans & Kingma, "Weight Normalization", NeurIPS 2016 (used on every layer of the
original DEQ, Bai et al. 2019).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdeq import _validate as V

__all__ = ["SpectralNorm", "WeightNorm", "apply_norm", "update_norm"]

_NORMABLE = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)


def _l2n(x, eps):
    return x / (jnp.linalg.norm(x) + eps)


def _power_iteration(w, u, n_steps: int, eps: float):
    """Flax's convention: ``w`` as ``(-1, out)``, ``u`` ``(1, out)``; returns ``(u, sigma)``."""
    w = jax.lax.stop_gradient(jnp.reshape(w, (-1, w.shape[-1])))
    u = u.astype(w.dtype)
    v = None
    for _ in range(n_steps):
        v = _l2n(u @ w.T, eps)
        u = _l2n(v @ w, eps)
    sigma = (v @ w @ u.T)[0, 0]
    return u, sigma


def _param_vars(module: nnx.Module):
    return jax.tree_util.tree_leaves(
        nnx.state(module, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


class _Restoring(nnx.Module):
    """Calls Flax's wrapper on a throw-away copy, so its in-place writes never reach ``self``."""

    def _call_restoring(self, inner: nnx.Module, *args, **kwargs):
        # Flax's SpectralNorm/WeightNorm write the normalized kernel into the wrapped layer's
        # Param. On the module itself that would (a) replace the raw weight and (b) fail inside
        # the solver's while_loop (a Param of an outer trace cannot be mutated there). A copy
        # with fresh variables at the current trace level takes the writes instead.
        graphdef, state = nnx.split(inner)
        state = jax.tree_util.tree_map(lambda a: a, state)
        return nnx.merge(graphdef, state)(*args, **kwargs)


class SpectralNorm(_Restoring):
    """Spectral normalization of a layer for DEQ cells: ``W -> target * W / sigma(W)`` (nnx).

    A thin wrapper over ``flax.nnx.SpectralNorm`` that (1) never updates the power-iteration
    state during a call (``update_stats=False``: the cell stays a fixed function inside the
    solver loop; refine ``u``/``sigma`` with :func:`update_norm` once per forward, outside the
    solve), (2) rescales to ``target`` instead of 1, and (3) leaves the layer's raw weights
    untouched by the call. ``model.train()`` / ``model.eval()`` flip the inner Flax module's
    ``use_running_average`` flag (a static attribute: one recompilation per mode) but change
    nothing here: the call never updates the statistics either way.

    Args:
      layer: an affine nnx layer (``nnx.Linear``, ``nnx.Conv``, ...): the scaling to ``target``
        is applied to its input, which equals scaling its weight only for an affine layer.
      target: the spectral norm of the effective weight (``> 0``; ``< 1`` makes a cell
        ``act(W z + ...)`` with a 1-Lipschitz ``act`` a contraction in ``z``).
      n_steps: power iterations run from the stored ``u`` inside each call (Flax's ``n_steps``;
        ``>= 1``) and, by default, by :func:`update_norm`.
      epsilon: for the l2-normalizations.
      rngs: ``nnx.Rngs`` (for the initial ``u``).

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> lin = jdeq.models.SpectralNorm(nnx.Linear(8, 8, use_bias=False, rngs=nnx.Rngs(0)),
      ...                                target=0.9, rngs=nnx.Rngs(1))
      >>> for _ in range(20):
      ...     jdeq.models.update_norm(lin)
      >>> w = lin(jnp.eye(8))  # the effective weight
      >>> round(float(jnp.linalg.norm(w, 2)), 3)
      0.9
    """

    def __init__(
        self,
        layer: nnx.Module,
        *,
        target: float = 1.0,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        rngs: nnx.Rngs,
    ):
        V.instance(layer, "layer", nnx.Module, "an nnx.Module")
        V.positive_number(target, "target")
        V.positive_int(n_steps, "n_steps")
        dtype = jnp.result_type(*[p[...] for p in _param_vars(layer)])
        self.sn = nnx.SpectralNorm(
            layer, n_steps=n_steps, epsilon=epsilon, param_dtype=dtype, update_stats=False, rngs=rngs
        )
        self.target = float(target)

    @property
    def layer(self) -> nnx.Module:
        return self.sn.layer_instance

    def __call__(self, x):
        x = x if self.target == 1.0 else self.target * x
        return self._call_restoring(self.sn, x, update_stats=False)


class WeightNorm(_Restoring):
    """Weight normalization ``W = g * V / ||V||`` for DEQ cells (nnx).

    ``flax.nnx.WeightNorm`` with one change: the call leaves the layer's raw parameter ``V``
    untouched (Flax writes ``g V / ||V||`` back into it). Weight norm has no running state, so
    nothing happens outside the solve.

    Args:
      layer: the nnx layer to wrap.
      feature_axes, use_scale, epsilon, variable_filter: as in ``flax.nnx.WeightNorm`` (by
        default the ``kernel`` is normalized per output feature, with a learned scale ``g``).
      rngs: ``nnx.Rngs``.

    Example:
      >>> import jax.numpy as jnp, jdeq
      >>> from flax import nnx
      >>> lin = jdeq.models.WeightNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
      >>> y = lin(jnp.ones((2, 4)))
    """

    def __init__(
        self,
        layer: nnx.Module,
        *,
        feature_axes=-1,
        use_scale: bool = True,
        epsilon: float = 1e-12,
        variable_filter=nnx.PathContains("kernel"),
        rngs: nnx.Rngs,
    ):
        V.instance(layer, "layer", nnx.Module, "an nnx.Module")
        dtype = jnp.result_type(*[p[...] for p in _param_vars(layer)])
        self.wn = nnx.WeightNorm(
            layer,
            feature_axes=feature_axes,
            use_scale=use_scale,
            epsilon=epsilon,
            param_dtype=dtype,
            variable_filter=variable_filter,
            rngs=rngs,
        )

    @property
    def layer(self) -> nnx.Module:
        return self.wn.layer_instance

    def __call__(self, x, *args, **kwargs):
        return self._call_restoring(self.wn, x, *args, **kwargs)


def _wrapped_layers(module: nnx.Module):
    inside = set()
    for _, m in nnx.iter_modules(module):
        if isinstance(m, (nnx.SpectralNorm, nnx.WeightNorm)):
            inside.add(id(m.layer_instance))
    return inside


def apply_norm(
    module: nnx.Module,
    kind: str = "weight",
    *,
    names: Sequence[str] | None = None,
    target: float = 1.0,
    n_steps: int = 1,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Wraps layers of an nnx module in :class:`SpectralNorm` or :class:`WeightNorm`, in place.

    Args:
      module: e.g. a DEQ cell.
      kind: ``"spectral"`` or ``"weight"``.
      names: attribute names of the layers to wrap (e.g. ``("w",)`` for the recurrent weight of
        :class:`jdeq.models.MLPCell`); ``None`` wraps every ``nnx.Linear``, ``nnx.Conv``,
        ``nnx.LinearGeneral`` and ``nnx.Einsum`` not yet normalized.
      target, n_steps: for ``"spectral"`` (see :class:`SpectralNorm`).
      rngs: ``nnx.Rngs`` for the new variables.

    Returns:
      ``module`` itself (modified).

    Example:
      >>> import jdeq
      >>> from flax import nnx
      >>> cell = jdeq.models.MLPCell(3, 16, rngs=nnx.Rngs(0))
      >>> cell = jdeq.models.apply_norm(cell, "spectral", names=("w",), target=0.9,
      ...                               rngs=nnx.Rngs(1))
      >>> type(cell.w).__name__
      'SpectralNorm'
    """
    V.one_of(kind, "kind", ("spectral", "weight"))
    V.instance(module, "module", nnx.Module, "an nnx.Module")
    already = _wrapped_layers(module)
    found = []
    for path, sub in nnx.iter_modules(module):
        if not path or not isinstance(sub, _NORMABLE) or id(sub) in already:
            continue
        if names is not None and path[-1] not in names:
            continue
        found.append((path, sub))
    if names is not None:
        missing = set(names) - {p[-1] for p, _ in found}
        if missing:
            raise ValueError(
                f"`names`: no un-normalized Linear/Conv/LinearGeneral/Einsum layer named "
                f"{sorted(missing)} in {type(module).__name__}."
            )
    for path, sub in found:
        parent = module
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if kind == "spectral":
            new = SpectralNorm(sub, target=target, n_steps=n_steps, rngs=rngs)
        else:
            new = WeightNorm(sub, rngs=rngs)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return module


def _update_nnx(module: nnx.Module, n_steps):
    for _, m in nnx.iter_modules(module):
        if not isinstance(m, nnx.SpectralNorm):
            continue
        steps = m.n_steps if n_steps is None else n_steps
        for path, param in nnx.to_flat_state(nnx.state(m.layer_instance, nnx.Param)):
            if param[...].ndim < 2 or path + ("u",) not in m.batch_stats:
                continue
            u_var, s_var = m.batch_stats[path + ("u",)], m.batch_stats[path + ("sigma",)]
            u, sigma = _power_iteration(param[...], u_var[...], steps, m.epsilon)
            u_var.set_value(u.astype(u_var[...].dtype))
            s_var.set_value(sigma.astype(s_var[...].dtype))


def _get(tree, keys):
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _update_linen(variables: Mapping, n_steps, collection: str, eps: float):
    stats = variables.get(collection)
    params = variables.get("params")
    if stats is None or params is None:
        raise ValueError(
            f"`variables` must hold 'params' and '{collection}' collections (linen "
            "SpectralNorm keeps u/sigma in 'batch_stats'); got "
            f"{sorted(variables)}."
        )
    steps = 1 if n_steps is None else n_steps
    updates = {}

    def visit(tree, prefix):
        for name, sub in tree.items():
            if isinstance(sub, Mapping):
                visit(sub, prefix + (name,))
            elif isinstance(name, str) and name.endswith("/u"):
                parts = tuple(name[: -len("/u")].split("/"))
                # The wrapped layer lives beside the SpectralNorm module (defined in the same
                # compact scope) or inside it.
                w = _get(params, prefix[:-1] + parts)
                if w is None:
                    w = _get(params, prefix + parts)
                if w is None:
                    raise ValueError(
                        f"update_norm: found spectral-norm state {'/'.join(prefix + (name,))} "
                        "but no matching parameter in variables['params']."
                    )
                u, sigma = _power_iteration(w, sub, steps, eps)
                updates[prefix + (name,)] = u.astype(sub.dtype)
                sig_name = name[: -len("/u")] + "/sigma"
                if sig_name in tree:
                    updates[prefix + (sig_name,)] = sigma.astype(tree[sig_name].dtype)

    visit(stats, ())

    def rebuild(tree, prefix):
        return {
            k: rebuild(v, prefix + (k,)) if isinstance(v, Mapping) else updates.get(prefix + (k,), v)
            for k, v in tree.items()
        }

    return {**variables, collection: rebuild(stats, ())}


def update_norm(model_or_variables, *, n_steps: int | None = None, collection: str = "batch_stats",
                epsilon: float = 1e-12):
    """One spectral-norm power-iteration update on the current weights, outside the solve.

    Call it once per training step, before the forward solve (inside the jitted step is fine).
    Only ``u`` and ``sigma`` change; the weights do not. Weight norm needs no update.

    Args:
      model_or_variables: an nnx module (updated in place: every ``flax.nnx.SpectralNorm``
        inside it, including those of :class:`SpectralNorm`) or a linen ``variables`` dict
        (a new dict is returned: every ``flax.linen.SpectralNorm`` state in ``collection``).
      n_steps: power iterations per update (default: the module's ``n_steps``; 1 for linen).
      collection: the linen collection holding ``u``/``sigma``.
      epsilon: for the l2-normalizations (linen; nnx uses each module's own).

    Returns:
      ``None`` for an nnx module; the updated ``variables`` for linen.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jdeq
      >>> class Cell(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, z, x):
      ...         wz = nn.SpectralNorm(nn.Dense(8, use_bias=False))(0.9 * z, update_stats=False)
      ...         return jnp.tanh(wz + nn.Dense(8)(x))
      ...     def init_z(self, x):
      ...         return jnp.zeros((x.shape[0], 8))
      >>> deq = jdeq.linen.DEQ(cell=Cell())
      >>> variables = deq.init(jax.random.PRNGKey(0), jnp.ones((2, 3)))
      >>> variables = jdeq.models.update_norm(variables)  # each step, before the forward
      >>> z, stats = deq.apply(variables, jnp.ones((2, 3)))
    """
    V.positive_int(n_steps, "n_steps", none=True)
    if isinstance(model_or_variables, nnx.Module):
        _update_nnx(model_or_variables, n_steps)
        return None
    if isinstance(model_or_variables, Mapping):
        return _update_linen(model_or_variables, n_steps, collection, epsilon)
    raise TypeError(
        "`model_or_variables` must be an nnx.Module or a linen variables dict, got "
        f"{type(model_or_variables).__name__}."
    )

