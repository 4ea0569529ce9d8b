"""The flags the classification and detection scripts share are declared once (rdoq.cli): the
same defaults and help everywhere, and one check of them against a curve set's meta.json."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rdoq.adapters.base import InputError
from rdoq.cli import check_curve_use, max_bits_of
from rdoq.cli_alloc import add_alloc_flags
from rdoq.detection import add_alloc_flags as add_detection_alloc_flags
from rdoq.detection import add_detector_flags

SHARED = (
    "--nchannelbatch",
    "--maxrates",
    "--maxdeadzones",
    "--closedeadzone",
    "--minrate",
    "--maxbits",
    "--bit_list",
    "--layerwise",
    "--no-fill",
    "--shrink",
    "--target_rates",
    "--act-target-rates",
    "--gpuid",
    "--device",
    "--quiet",
)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    out = {}
    for method in ("dp", "lg"):
        p = argparse.ArgumentParser()
        add_alloc_flags(p, method)
        out[method] = p
    det = argparse.ArgumentParser()
    add_detector_flags(det, evaluation=True)
    add_detection_alloc_flags(det)
    out["detection"] = det
    return out


def _action(p: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return p._option_string_actions[flag]


@pytest.mark.parametrize("flag", SHARED)
def test_shared_allocation_flags_mean_the_same_in_every_script(flag):
    parsers = _parsers()
    ref = _action(parsers["dp"], flag)
    for name, p in parsers.items():
        got = _action(p, flag)
        assert (got.default, got.help, got.nargs, got.choices) == (
            ref.default,
            ref.help,
            ref.nargs,
            ref.choices,
        ), (name, flag)


META = {"kind": "weight", "group_size": 8, "ndz": 4, "bits": list(range(6))}


def _args(**given) -> argparse.Namespace:
    base = {"nchannelbatch": None, "maxdeadzones": None, "maxrates": None, "maxbits": None}
    return argparse.Namespace(**{**base, **given})


@pytest.mark.parametrize(
    "given,expect",
    [
        ({"nchannelbatch": 16}, "--nchannelbatch 16 contradicts cs/meta.json (group_size 8)"),
        ({"maxdeadzones": 10}, "--maxdeadzones 10 contradicts cs/meta.json (ndz 4)"),
        ({"maxrates": 7}, "--maxrates 7 is outside 2..6"),
        ({"maxrates": 1}, "--maxrates 1 is outside 2..6"),
    ],
)
def test_curve_use_flags_are_checked_against_the_curve_set(given, expect):
    with pytest.raises(InputError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        check_curve_use(_args(**given), META, Path("cs"))


def test_matching_flags_pass_and_activation_sets_have_no_dead_zone_to_check():
    check_curve_use(_args(nchannelbatch=8, maxdeadzones=4, maxrates=6), META, Path("cs"))
    act = {**META, "kind": "act", "ndz": 1}
    check_curve_use(_args(maxdeadzones=10), act, Path("cs"))  # the weight set's ratios
    check_curve_use(argparse.Namespace(), META, Path("cs"))  # a script without the flags


@pytest.mark.parametrize(
    "maxbits,maxrates,expect",
    [(None, None, None), (6, None, 6), (None, 5, 4), (6, 5, 4), (3, 9, 3)],
)
def test_the_widest_width_is_the_smaller_of_maxbits_and_maxrates_minus_one(
    maxbits, maxrates, expect
):
    assert max_bits_of(_args(maxbits=maxbits, maxrates=maxrates)) == expect
