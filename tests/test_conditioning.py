"""SubjectContextd: age, sex and diagnosis from the datalist as the U-Net's context (spec ganunet.md §1.9, A22)."""

from __future__ import annotations

import pytest
import torch

from synth7t.errors import InputError
from synth7t.transforms import SubjectContextd, encode_subject_context


@pytest.mark.parametrize(
    "item, expected",
    [
        ({"age": 71, "sex": "F", "diagnosis": "MCI"}, [0.71, 0.0, 1.0]),
        ({"age": "64.5", "sex": "male", "diagnosis": "SCD"}, [0.645, 1.0, 0.0]),
        ({"age": 30, "sex": 1, "diagnosis": 0}, [0.30, 1.0, 0.0]),
        ({"age": 80, "sex": "Female", "diagnosis": "Dementia"}, [0.80, 0.0, 1.0]),
        ({"age": 55, "sex": "M", "diagnosis": "normal"}, [0.55, 1.0, 0.0]),
    ],
)
def test_encoding(item, expected):
    assert encode_subject_context(item) == pytest.approx(expected)


def test_fields_choose_and_order_the_entries():
    assert encode_subject_context({"age": 40, "sex": "F"}, fields=("sex", "age")) == pytest.approx([0.0, 0.4])


@pytest.mark.parametrize(
    "item, message",
    [
        ({"image": "/d/sub-01_3T.nii.gz", "age": 70, "sex": "F"}, r"/d/sub-01_3T.nii.gz: .* needs 'diagnosis'"),
        ({"image": "a.nii", "age": 70, "sex": "X", "diagnosis": 0}, r"a.nii: sex 'X' is not one of"),
        ({"image": "a.nii", "age": 70, "sex": 2, "diagnosis": 0}, r"a.nii: sex 2 is not 0 or 1"),
        ({"image": "a.nii", "age": "old", "sex": 0, "diagnosis": 0}, r"a.nii: could not convert"),
        ({"image": "a.nii", "age": 7100, "sex": 0, "diagnosis": 0}, r"a.nii: age 7100 is not in years"),
        ({"image": "a.nii", "age": 70, "sex": 0, "diagnosis": "flu"}, r"a.nii: diagnosis 'flu' is not one of"),
    ],
)
def test_bad_values_name_the_item_and_the_field(item, message):
    with pytest.raises(InputError, match=message):
        encode_subject_context(item)


def test_unknown_field_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown conditioning field 'height'"):
        encode_subject_context({"height": 1.8}, fields=("height",))


def test_dictionary_transform_adds_a_float_vector():
    out = SubjectContextd()({"image": torch.zeros(1, 2, 2), "age": 50, "sex": "M", "diagnosis": "CN"})
    assert out["context"].dtype == torch.float32
    torch.testing.assert_close(out["context"], torch.tensor([0.5, 1.0, 0.0]))
    assert out["age"] == 50  # the datalist fields stay


def test_slice_position_is_appended_and_an_empty_context_is_allowed():
    item = {"age": 50, "sex": 0, "diagnosis": 1, "slice_position": torch.tensor([[-0.25]])}
    out = SubjectContextd(slice_position_key="slice_position")(item)
    torch.testing.assert_close(out["context"], torch.tensor([0.5, 0.0, 1.0, -0.25]))
    only_position = SubjectContextd(fields=(), slice_position_key="slice_position")(item)
    torch.testing.assert_close(only_position["context"], torch.tensor([-0.25]))
    assert SubjectContextd(fields=())({"image": 0})["context"].shape == (0,)
