"""Bad input everywhere in the public API gets a clear ValueError/TypeError (or, for command lines,
argparse's usage error), never an XLA stack trace; and docs/errors.md is the table of those cases
with the messages actually raised.

The cases live in ``tests/bad_input_cases.py`` (one table). Regenerate the docs with
``python -m tests.bad_input_cases > docs/errors.md``, or run this file with
``JDEQ_WRITE_DOCS=1``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bad_input_cases import CASES, outcome, render, row

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"

# What an error that escaped from XLA / jaxlib internals looks like.
_INTERNAL = re.compile(
    r"XlaRuntimeError|JaxRuntimeError|jaxlib|INTERNAL:|Traceback \(most recent call last\)|site-packages"
    r"|\.cc:\d+|RET_CHECK|Check failed"
)
# The message names what is wrong: a `name`, an --option, or Python's own 'name' for keywords.
_NAMES_ARGUMENT = re.compile(r"`[^`]+`|--[a-z][\w-]*|argument '\w+'|'\w+'")

_OUTCOMES: dict[int, object] = {}


def _outcome(i: int):
    if i not in _OUTCOMES:
        _OUTCOMES[i] = outcome(CASES[i])
    return _OUTCOMES[i]


def test_table_is_large_and_ids_unique():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]
    assert len(CASES) >= 80
    assert {c.area for c in CASES} >= {
        "fixed_point", "solvers and gradients", "regularizers", "correction", "hypersolver",
        "jdeq.nnx", "jdeq.linen", "jdeq.models", "jdeq.data", "jdeq.train", "command lines",
    }


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c.id for c in CASES])
def test_bad_input(i):
    case, out = CASES[i], _outcome(i)
    if case.exc is None:
        assert out.exc is None, f"expected no exception, got {out.exc.__name__}: {out.message}"
    else:
        assert out.exc is not None, f"no exception; the call returned: {out.message[:300]}"
        assert issubclass(out.exc, case.exc), f"expected {case.exc.__name__}, got {out.exc.__name__}: {out.message}"
        if case.exc is SystemExit:
            assert out.exit_code == 2, out
        elif not case.runtime:  # run-time failures on request (throw=True) are RuntimeErrors
            assert issubclass(out.exc, (TypeError, ValueError)), out.exc
        if not case.runtime:
            assert _NAMES_ARGUMENT.search(out.message), f"message names no argument: {out.message}"
    assert re.search(case.match, out.message), f"/{case.match}/ not in: {out.message}"
    if out.details is not None:  # a jdeq.BadValue: its attributes say what its message says
        name, expected, value = out.details
        assert name and f"`{name}`" in out.message, (name, out.message)
        assert expected and expected in out.message, (expected, out.message)
        assert value is not None or "None" in out.message, ("value", out.message)
    if not case.runtime:
        assert not _INTERNAL.search(out.message), f"internal error reached the user: {out.message}"
    # the message in full (as far as its table cell shows it), as docs/errors.md records it: a
    # reworded message is a change to the docs too
    assert _unmutated(row(case, out)) in DOCS.read_text().splitlines(), (
        f"docs/errors.md has another message for this case; raised now: {out.message!r} "
        "(if the change is meant, regenerate: python -m tests.bad_input_cases > docs/errors.md)"
    )


def _unmutated(text: str) -> str:
    """Under mutation testing (.ci/mutation.py), Python names mutmut's copy of a function
    (``x_name__mutmut_orig``) or method (``xǁClassǁname__mutmut_orig``) in its own "unexpected
    keyword argument" errors: read it as the function's name."""
    return re.sub(r"(?:\bx_|xǁ[A-Za-z0-9_]+ǁ)(\w+?)__mutmut_orig\b", r"\1", text)


def test_docs_errors_md_is_current():
    text = _unmutated(render({i: _outcome(i) for i in range(len(CASES))}))
    if os.environ.get("JDEQ_WRITE_DOCS") == "1":
        DOCS.write_text(text)
    assert DOCS.is_file(), "docs/errors.md is missing: python -m tests.bad_input_cases > docs/errors.md"
    assert DOCS.read_text() == text, (
        "docs/errors.md is stale: regenerate it with `python -m tests.bad_input_cases > docs/errors.md` "
        "(or JDEQ_WRITE_DOCS=1 pytest tests/test_bad_input.py)"
    )
