"""A griffe extension for the API site: jdeq's docstrings head their doctests ``Example:`` (as
flax's do); griffe's Google parser reads only ``Examples:`` as a section of ``>>>`` code, so the
heading is renamed before parsing and the examples render as code blocks."""

from __future__ import annotations

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
