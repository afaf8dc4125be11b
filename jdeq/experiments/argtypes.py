"""Moved to :mod:`jdeq.argtypes` (the validators are not specific to the experiments); this
alias keeps old imports working."""

from jdeq.argtypes import *  # noqa: F401,F403
from jdeq.argtypes import __all__  # noqa: F401
