"""The comparison every backend test uses (op_cases.assert_matches_reference) sees local errors that a
whole-tensor relative norm averages away: one wrong output row among 32,768, an lse row off by 1 nat."""

import math

import pytest
import torch

from op_cases import TOLERANCE, assert_matches_reference, rel_error, row_error


def _pair(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    expected = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return expected.to(torch.bfloat16).double(), expected  # bf16-rounded "kernel" output: passes


def test_one_wrong_output_row_in_32768_fails():
    actual, expected = _pair((2, 16, 1024, 64))  # 32,768 rows of 64
    assert_matches_reference({"out": actual}, {"out": expected}, torch.bfloat16)
    actual[1, 7, 300] = torch.randn(64, dtype=torch.float64)  # one row completely wrong
    assert rel_error(actual, expected) <= TOLERANCE[torch.bfloat16]  # the norm alone does not see it
    with pytest.raises(AssertionError, match=r"out: row \(1, 7, 300\)"):
        assert_matches_reference({"out": actual}, {"out": expected}, torch.bfloat16)


def test_lse_row_off_by_one_nat_fails():
    gen = torch.Generator().manual_seed(1)
    expected = 9.0 + torch.rand(4, 16, 512, generator=gen, dtype=torch.float64)  # lse ~ log N
    actual = expected.float().double()
    expected[0, 0, 0] = -math.inf  # a fully masked row matches exactly
    actual[0, 0, 0] = -math.inf
    assert_matches_reference({"lse": actual}, {"lse": expected}, torch.bfloat16)
    actual[3, 2, 100] += 1.0
    assert rel_error(actual, expected) <= TOLERANCE[torch.bfloat16]
    with pytest.raises(AssertionError, match=r"lse: row \(3, 2, 100\)"):
        assert_matches_reference({"lse": actual}, {"lse": expected}, torch.bfloat16)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_where_finite_expected_fails(bad):
    actual, expected = _pair((1, 1, 8, 4))
    actual[0, 0, 3, 1] = bad
    assert row_error(actual, expected, torch.bfloat16)[0] == math.inf
