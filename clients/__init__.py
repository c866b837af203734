"""Client side of silotune: per-organization data, training and the Flower client app."""
