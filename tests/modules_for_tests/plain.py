"""A module without OPTIONS, for configuration tests."""


def setup(module: object) -> None:
    """Nothing to do: only the configuration is under test."""
