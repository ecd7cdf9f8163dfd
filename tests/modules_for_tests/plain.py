"""A module without OPTIONS, for configuration tests."""


def register(server: object) -> None:
    """Nothing to do: only the configuration is under test."""
