"""The coordinator: round loop, checkpoint and resume, export of the specialist, PKI and enrollment, control API."""
