"""An organization's `silotune` commands: agent start/check, eval, generate.

Each module has `register(commands)`, which adds its subcommands to the
`silotune` parser (simulations/cli/main.py builds it from both sides).
"""
