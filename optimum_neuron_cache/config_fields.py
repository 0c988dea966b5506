"""The fields of an export config that matter for a match, under every name exporters give them: one table.

Exporters and trainers name the same thing differently (`tp_degree`, `num_cores`, `tensor_parallel_size`).
Deriving a config from a call (integrations/export.py), filtering records (`lookup`, `explain`) and answering
in optimum-neuron's names (integrations/optimum_neuron.py) all read this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Canonical key -> the names that carry it, the canonical one first.
ALIASES: dict[str, tuple[str, ...]] = {
    "batch_size": ("batch_size", "static_batch_size", "max_batch_size"),
    "sequence_length": ("sequence_length", "static_sequence_length", "seq_len", "max_seq_len", "max_length",
                        "max_context_length", "n_positions"),
    "tensor_parallel_size": ("tensor_parallel_size", "tp_degree", "tp_size", "num_cores"),
    "dtype": ("dtype", "auto_cast_type", "torch_dtype", "float_dtype"),
    "target": ("target", "instance_type"),
}


def names_of(field: str) -> tuple[str, ...]:
    """The names that carry `field` (a canonical key), or the field itself for any other key."""
    return ALIASES.get(field, (field,))


def value_of(config: Mapping[str, Any], field: str) -> Any:
    """The value of `field` in `config` under the first of its names present, or None."""
    return next((config[name] for name in names_of(field) if name in config), None)


def same_value(value: Any, wanted: Any) -> bool:
    """Whether a config value matches a wanted one: as integers when both are numbers, else as trimmed
    case-insensitive text (`BF16` matches `bf16`, `4` matches 4)."""
    try:
        return int(value) == int(wanted)
    except (TypeError, ValueError):
        return str(value).strip().lower() == str(wanted).strip().lower()
