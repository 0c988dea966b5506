"""The fields of an export config that matter for a match, under every name and spelling exporters give them.

Names: `tp_degree` = `num_cores` = `tensor_parallel_size`. Values: `bf16` = `bfloat16` = `torch.bfloat16`,
`fp16` = `float16`, `fp32` = `float32`. Deriving a config from a call, filtering records (`lookup`, `fetch`),
explaining a miss and answering in optimum-neuron's names all compare through this module, so they agree.
"""

from __future__ import annotations

import math
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


#: A dtype's spellings -> its short name (the one export configs record).
DTYPES: dict[str, str] = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
                          "float32": "fp32", "fp32": "fp32", "float": "fp32", "float8_e4m3fn": "fp8_e4m3",
                          "fp8": "fp8"}


def normalize_dtype(value: Any) -> str:
    """torch.bfloat16, "bfloat16", "bf16" -> "bf16" (and fp16, fp32); anything else as its trimmed lower text."""
    text = str(value).strip().lower()
    if text.startswith("torch."):
        text = text[len("torch."):]
    return DTYPES.get(text, text)


def canonical(name: str) -> str:
    """The canonical key a config key carries (`tp_degree` -> `tensor_parallel_size`), or the key itself."""
    return next((field for field, names in ALIASES.items() if name in names), name)


def names_of(field: str) -> tuple[str, ...]:
    """The names that carry `field` (a canonical key), or the field itself for any other key."""
    return ALIASES.get(field, (field,))


def value_of(config: Mapping[str, Any], field: str) -> Any:
    """The value of `field` in `config` under the first of its names present, or None."""
    return next((config[name] for name in names_of(field) if name in config), None)


def same_value(value: Any, wanted: Any, field: str = "") -> bool:
    """Whether a config value matches a wanted one for `field` (any of its names): dtypes by meaning, else as
    numbers when both are (`4` matches 4 and 4.0, never 4.5), else as trimmed case-insensitive text (`BF16`
    matches `bf16`)."""
    if canonical(field) == "dtype":
        return normalize_dtype(value) == normalize_dtype(wanted)
    numbers = [_number(value), _number(wanted)]
    if None not in numbers:
        return numbers[0] == numbers[1]
    return str(value).strip().lower() == str(wanted).strip().lower()


def _number(value: Any) -> float | None:
    """`value` as a finite number (an int, a float or their text), or None (booleans are not numbers here)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
