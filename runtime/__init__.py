"""What both the coordinator and the agent run on, outside the contract.

protos/ is what crosses an organization's boundary; this package is code that
both sides run but that never travels: resolving a base-model name to
weights (base_model), starting and stopping Flower's processes
(flower_processes), loading and checking the federation's keys and
certificates (keys), and the terminal both commands print to (console).
It imports protos/ only; server/, clients/ and simulations/ import it.
"""
