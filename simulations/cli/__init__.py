"""The `silotune` command."""
