"""Checksums of the arrays of a checkpoint (see :mod:`jdeq.train.checkpoint`).

``crc32``: the CRC-32 of an array's bytes (C order), for arrays this process can read whole
(fully addressable, or replicated over the processes). ``hash32``: for arrays split over
processes, a position-mixed 32-bit sum that XLA computes over the distributed array in one
all-reduce, so every process gets the same value without gathering the array. Both depend on
the values only, not on the layout, so a checkpoint verifies whatever layout it is restored to.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jdeq.train.sharding import host_value

__all__ = ["fingerprint", "mismatch"]


def _words(x: jax.Array) -> jax.Array:
    """The values of ``x`` as uint32 words (64-bit types: two words per entry)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = np.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_ or size == 1:
        return x.astype(jnp.uint8).astype(jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 4 bytes: same shape; 8: (..., 2)


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hash32(x: jax.Array) -> jax.Array:
    """A uint32 checksum of ``x``'s values and their positions, the same for any layout.

    Each word is mixed with its flat (C-order) position and summed modulo 2**32: integer
    addition is associative, so XLA may reduce the shards in any order and across processes
    (one all-reduce) and every process gets the same value.
    """
    w = _words(x)
    pos = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    return jnp.sum(_fmix(w ^ _fmix(pos * jnp.uint32(0x9E3779B9) + jnp.uint32(1))), dtype=jnp.uint32)


def _readable(x) -> bool:
    """Whether this process can read all of ``x`` without communication."""
    return not isinstance(x, jax.Array) or x.is_fully_addressable or x.sharding.is_fully_replicated


def _dtype_name(x) -> str:
    """``"float32"``, ``"bfloat16"``, ... and ``"key<fry>"`` for typed PRNG keys."""
    return str(x.dtype)


def _crc32(x) -> int:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    flat = np.reshape(host_value(x), -1)  # C order: a copy for any other memory layout
    return zlib.crc32(flat.view(np.uint8))


def _hash_all(xs: tuple) -> jax.Array:
    return jnp.stack([_hash32(x) for x in xs])


def _device_hashes(xs: list) -> list[int]:
    """:func:`_hash32` of each array, in one compiled call per mesh (read on every process)."""
    xs = [jnp.asarray(x) for x in xs]
    groups: dict = {}
    for i, x in enumerate(xs):
        mesh = x.sharding.mesh if isinstance(x.sharding, NamedSharding) else None
        groups.setdefault(mesh, []).append(i)
    out = [0] * len(xs)
    for mesh, idx in groups.items():
        # replicated on the mesh: every process reads the values (host_value) without a gather
        rep = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        h = jax.jit(_hash_all, out_shardings=rep)(tuple(xs[i] for i in idx))
        for i, v in zip(idx, host_value(h).tolist()):
            out[i] = int(v)
    return out


def fingerprint(leaves) -> list[dict]:
    """Shape, dtype and checksum (``crc32`` or, for arrays split over processes, ``hash32``)."""
    out = [{"shape": list(np.shape(x)), "dtype": _dtype_name(x)} for x in leaves]
    split = [i for i, x in enumerate(leaves) if not _readable(x)]
    for i, h in zip(split, _device_hashes([leaves[i] for i in split]) if split else []):
        out[i]["hash32"] = h
    for i, x in enumerate(leaves):
        if i not in split:
            out[i]["crc32"] = _crc32(x)
    return out


def mismatch(leaves, expected: list[dict]) -> int | None:
    """The index of the first array that does not match its saved entry (whatever its layout
    now), or None."""
    hashed = [i for i, e in enumerate(expected) if e.get("hash32") is not None]
    hashes = dict(zip(hashed, _device_hashes([leaves[i] for i in hashed]) if hashed else []))
    for i, (x, entry) in enumerate(zip(leaves, expected)):
        if (list(np.shape(x)), _dtype_name(x)) != (list(entry["shape"]), str(entry["dtype"])):
            return i
        if i in hashes:
            ok = hashes[i] == int(entry["hash32"])
        elif entry.get("crc32") is not None:
            if not _readable(x):  # saved whole, restored split: gather it (every process does)
                from jax.experimental import multihost_utils

                x = multihost_utils.process_allgather(x, tiled=True)
            ok = _crc32(x) == int(entry["crc32"])
        else:
            ok = True  # written by an older jdeq without a checksum for this array
        if not ok:
            return i
    return None
