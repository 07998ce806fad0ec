"""The conditioning vector of the thesis U-Net: age, sex and diagnosis from the datalist (spec ganunet.md §1.9).

BioFINDER-2 gave the thesis each subject's age at scan, sex and diagnosis, the latter binarised as healthy (normal,
subjective cognitive decline) against ill (mild cognitive impairment, dementia); they reach the network as the
cross-attention context. The thesis does not say how they were scaled (ambiguity A22); here, as the spec
suggests: age in years / 100, sex 0 = female, 1 = male, diagnosis 0 = healthy, 1 = ill. Datalist items may give
sex and diagnosis as these numbers or as the words below. The slice position is appended by the slab sampling of
the training configs and by :class:`synth7t.inferers.SlabInferer` at inference.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Transform

from synth7t.errors import InputError

__all__ = ["CONTEXT_FIELDS", "SubjectContextd", "encode_subject_context"]

CONTEXT_FIELDS = ("age", "sex", "diagnosis")
_SEX = {"f": 0.0, "female": 0.0, "m": 1.0, "male": 1.0}
_DIAGNOSIS = {
    "healthy": 0.0, "normal": 0.0, "cn": 0.0, "scd": 0.0, "subjective cognitive decline": 0.0,
    "ill": 1.0, "mci": 1.0, "mild cognitive impairment": 1.0, "dementia": 1.0, "demented": 1.0, "ad": 1.0,
}  # fmt: skip


def _binary(value: Any, words: Mapping[str, float], field: str) -> float:
    if isinstance(value, str):
        if value.strip().lower() in words:
            return words[value.strip().lower()]
        raise ValueError(f"{field} {value!r} is not one of {sorted(set(words))} or 0/1")
    if value in (0, 1):
        return float(value)
    raise ValueError(f"{field} {value!r} is not 0 or 1")


def encode_subject_context(item: Mapping[Hashable, Any], fields: Sequence[str] = CONTEXT_FIELDS) -> list[float]:
    """The numbers of ``fields`` (from age, sex, diagnosis) of one datalist item; :class:`InputError` naming the
    item's image and the field when one is missing or not understood."""
    where = item.get("image", item.get("subject", "datalist item"))
    encoded = []
    for field in fields:
        if field not in CONTEXT_FIELDS:
            raise ValueError(f"unknown conditioning field {field!r}; choose from {CONTEXT_FIELDS}.")
        value = item.get(field)
        if value is None:
            raise InputError(f"{where}: the conditioned network needs {field!r} in the datalist item.")
        try:
            if field == "age":
                age = float(value)
                if not 0 <= age <= 130:
                    raise ValueError(f"age {value!r} is not in years (0-130)")
                encoded.append(age / 100.0)
            else:
                encoded.append(_binary(value, _SEX if field == "sex" else _DIAGNOSIS, field))
        except (TypeError, ValueError) as error:
            raise InputError(f"{where}: {error}.") from None
    return encoded


class SubjectContextd(Transform):
    """Put the conditioning vector at ``output_key``: ``encode_subject_context(item, fields)``, then the value at
    ``slice_position_key`` when given, as a float32 tensor. With no fields and no position it is empty, which an
    unconditioned network ignores, so one config serves conditioned and unconditioned networks.

    Args:
        fields: the datalist fields to encode, in order (a subset of age, sex, diagnosis).
        output_key: where the vector goes (``"context"``, which the configs pass to the network).
        slice_position_key: a key holding the training slab's slice position (one number), or None.
    """

    def __init__(
        self, fields: Sequence[str] = CONTEXT_FIELDS, output_key: str = "context", slice_position_key: str | None = None
    ) -> None:
        self.fields = tuple(fields)
        self.output_key = output_key
        self.slice_position_key = slice_position_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        context = torch.tensor(encode_subject_context(d, self.fields), dtype=torch.float32)
        if self.slice_position_key is not None:
            position = torch.as_tensor(d[self.slice_position_key], dtype=torch.float32).reshape(1)
            context = torch.cat([context, position])
        d[self.output_key] = context
        return d
