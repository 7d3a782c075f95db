"""The ``accord`` command line."""

from accord.cli.app import app, main

__all__ = ["app", "main"]
