"""The `edgecascade` command: one console script whose subcommands are thin layers over the packages."""

__version__ = "0.1.0"
