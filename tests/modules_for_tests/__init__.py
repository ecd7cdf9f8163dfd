"""Modules that exist only for tests: configuration and reload tests load
them by dotted path, as an operator would load a third-party module."""
