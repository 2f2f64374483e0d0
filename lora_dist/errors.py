"""One error family. Every error lora_dist raises on bad input is a `LoraDistError`, so a job can
catch it once and print its message (which names the offending flag, key, field or module) instead
of a traceback.

    LoraDistError
    ├── ConfigError            an AdapterConfig / init_options / training-flag value
    │   ├── DeepSpeedConfigError   a ds_config file or key
    │   └── MemoryConfigError      an input to the memory accounting
    ├── DataError              a dataset file, field or template
    └── DistributedError       the launch environment or a collective
"""
from __future__ import annotations


class LoraDistError(Exception):
    """Base of every error lora_dist raises for a bad input or environment."""


class ConfigError(LoraDistError, ValueError):
    """A bad configuration value; the message names the field and the valid choices."""


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed config that cannot work for this job; the message names the file and the key."""


class MemoryConfigError(ConfigError):
    """A bad input to the memory accounting (unknown preset, impossible cluster, negative size...)."""


class DataError(LoraDistError, ValueError):
    """A dataset that cannot be used: missing file, empty, unknown field, no template fits."""


class DistributedError(LoraDistError, RuntimeError):
    """The launch environment is incomplete (e.g. mpirun without mpi4py), or a rank failed."""
