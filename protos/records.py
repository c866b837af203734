"""Names of the Flower records that make up silotune's messages, defined once.

An instruction (coordinator → organization) holds the header and tensors of
the global adapter (protos/codec.py), the round config and, in simulation
only, the simulation settings (protos/round_config.py). A train reply holds
the header and tensors of the update and the organization's name; an evaluate
reply its metrics and its name. Secure aggregation's records are named in
protos/secagg/wire.py.
"""

HEADER_RECORD = "silotune.header"          # ConfigRecord {"bytes": UpdateHeader, "packed": tensors up to 4 MiB}
TENSORS_RECORD = "silotune.tensors"        # ArrayRecord: one packed uint8 Array, tensors above 4 MiB
CONFIG_RECORD = "silotune.config"          # ConfigRecord: RoundConfig
SIMULATION_RECORD = "silotune.simulation"  # ConfigRecord: SimulationSettings (virtual organizations only)
METRICS_RECORD = "metrics"                 # MetricRecord of an evaluate reply
ORG_RECORD = "organization"                # ConfigRecord {"name": the organization's name}

#: an evaluate reply's metrics of the organization's local-only adapter (run-config local-baseline)
#: carry this prefix: local_accuracy next to accuracy
LOCAL_METRIC_PREFIX = "local_"
