"""A module with options (the OPTIONS convention), for configuration tests."""

from __future__ import annotations

from dataclasses import dataclass

from mlink.config_schema import Int, option

# The longest greeting accepted: a test bound, not a protocol one.
MAX_GREETING = 200


@dataclass(frozen=True, slots=True)
class Options:
    greeting: str = option("hello", doc="What the module says.")
    repeat: int = option(1, kind=Int(1, 10), doc="How many times it says it.")
    loud: bool = False

    def __post_init__(self) -> None:
        if len(self.greeting) > MAX_GREETING:
            raise ValueError(f"greeting longer than {MAX_GREETING} characters")


OPTIONS = Options


def setup(module: object) -> None:
    """Nothing to do: only the configuration is under test."""
