"""The command line: `main` is the `knhk-stream` entry point."""

from knhk_stream.cli.main import main

__all__ = ["main"]
