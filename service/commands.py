"""Subcommands beyond `arithmetic`; each registers itself with `service.cli.command`."""
