"""The terminal that `silotune`'s commands print to, on either side."""

from __future__ import annotations

from rich.console import Console

# Not a terminal (CI, `make demo | tee`): rich would wrap tables at 80 columns.
console = Console(highlight=False, width=None if Console().is_terminal else 120)

# Printed by both `silotune coordinator --insecure` and `silotune agent start --insecure`.
INSECURE_WARNING = ("[yellow]warning: --insecure: no TLS, no node authentication; anyone who can "
                    "reach the port can read the traffic and join (local experiments only)[/yellow]")
