"""Every switch of the runtime, in one place (like vLLM's `envs.py`).

Each is read once from the environment, when this module is first imported; code reads the
attribute of `options` (a plain attribute read, so switches cost nothing on hot paths). Tests and
benchmarks flip them for a block with `override(...)` instead of setting environment variables:

    with options.override(pdl=False):
        ...

The switches, their variables and defaults are documented in one table: README.md, "Switches".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class Switch:
    attribute: str
    variable: str
    default: bool


SWITCHES = (
    Switch("reference", "GPT_OSS_REFERENCE", False),
    Switch("kernels_on_cpu", "GPT_OSS_TRITON", False),
    Switch("interpret", "TRITON_INTERPRET", False),
    Switch("pdl", "GPT_OSS_PDL", True),
    Switch("moe_tensor_core_gemv", "GPT_OSS_MOE_MMA_GEMV", True),
    Switch("moe_tensor_core_rows", "GPT_OSS_MOE_MMA_ROWS", True),
    Switch("gemv_unroll", "GPT_OSS_GEMV_UNROLL", True),
    Switch("compile_ahead", "GPT_OSS_COMPILE_AHEAD", True),
    Switch("peer_all_reduce", "GPT_OSS_PEER_ALL_REDUCE", False),
)
_BY_VARIABLE = {s.variable: s for s in SWITCHES}


def _from_environment(switch: Switch) -> bool:
    """A default-off switch turns on at "1", a default-on one turns off at "0"."""
    value = os.environ.get(switch.variable)
    if switch.default:
        return value != "0"
    return value == "1"


class Options:
    """The switches' current values, as attributes named in SWITCHES."""

    reference: bool
    kernels_on_cpu: bool
    interpret: bool
    pdl: bool
    moe_tensor_core_gemv: bool
    moe_tensor_core_rows: bool
    gemv_unroll: bool
    compile_ahead: bool
    peer_all_reduce: bool

    def __init__(self):
        for switch in SWITCHES:
            setattr(self, switch.attribute, _from_environment(switch))

    @contextlib.contextmanager
    def override(self, **values: bool) -> Iterator["Options"]:
        """Set some switches for the duration of a block (attributes of SWITCHES; not `interpret`,
        which Triton reads only when a kernel is defined)."""
        known = {s.attribute for s in SWITCHES} - {"interpret"}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown switch(es) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(known))}")
        saved = {name: getattr(self, name) for name in values}
        try:
            for name, value in values.items():
                setattr(self, name, bool(value))
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def __repr__(self) -> str:
        return "Options(" + ", ".join(f"{s.attribute}={getattr(self, s.attribute)}" for s in SWITCHES) + ")"


def attribute_of(variable: str) -> str:
    """The attribute a switch's environment variable sets (for command lines that name the variable)."""
    if variable not in _BY_VARIABLE:
        raise ValueError(f"{variable} is not a switch; known: {', '.join(_BY_VARIABLE)}")
    return _BY_VARIABLE[variable].attribute


options = Options()
