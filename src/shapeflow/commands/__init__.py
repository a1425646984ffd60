"""One module per ``shapeflow`` subcommand; each exposes ``register(subparsers)``.

A command module only parses arguments and calls library functions, so every stage is importable
and testable without the CLI.
"""
