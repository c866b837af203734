"""The coordinator operator's `silotune` commands: coordinator, pki, export.

Each module has `register(commands)`, which adds its subcommands to the
`silotune` parser (simulations/cli/main.py builds it from both sides).
"""
