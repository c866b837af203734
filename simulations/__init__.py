"""Scenarios, the simulation runner, experiments — and the `silotune` command.

The command lives here because this is the one package allowed to import both
the coordinator (server/) and the client agent (clients/).
"""
