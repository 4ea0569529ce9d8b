"""``--authors-semantics``: the authors' behaviour where this project deliberately differs, one
switch (off by default) so that the effect of each correction can be measured.

The parts, each named on the command line (``--authors-semantics deadzone,bcw``; the flag alone
turns on all of them):

- ``deadzone``: the round-based dead-zone quantizer with 2^b + 1 levels charged as b bits
  (:func:`rdoq.quantizers.quantize_deadzone`); a property of the weight curves, which the
  allocation then applies.
- ``search``: the step search's warm start and early stop (:class:`rdoq.search.SearchSettings`);
  a property of the curves.
- ``bcw``: ``-bcw`` as the per-channel affine map of the quantized weights
  (:func:`rdoq.quantizers.affine_bcw`) instead of the foldable bias correction, in the weight
  curves (when they are measured with ``-bcw``) and in the applied allocation.
- ``bca``: ``-bca`` as the oracle correction, each channel's mean quantization error of the
  **batch being evaluated** added back (:class:`rdoq.apply.ActQuantizer`); the curves never
  see it (the authors' curve scripts only renamed a directory with ``-bca``). Its accuracy is
  not achievable by a deployed model: rows carry ``authors_semantics`` so it is never mistaken.

``deadzone`` and ``search`` (:data:`CURVE_RULES`) need the paper's one step per group
(``--steps group``): they are rules of that quantizer and its search.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

PARTS = ("deadzone", "search", "bcw", "bca")
# The parts a curve set of each kind can carry.
CURVE_PARTS = {"weight": ("deadzone", "search", "bcw"), "act": ("search", "bca")}
# The rules of the paper's one step per group and its search: they need --steps group, they
# change the curves themselves, and the allocation's flag must name the same as its curves.
CURVE_RULES = ("deadzone", "search")
# Allocation entry keys of the parts that change how an allocation is applied.
ENTRY_KEYS = {
    "deadzone": ("weights", "deadzone_rule"),
    "bcw": ("weights", "bcw"),
    "bca": ("acts", "bca"),
}
ENTRY_VALUES = {"deadzone": "authors", "bcw": "affine", "bca": "oracle"}


def parse_parts(value: str) -> tuple[str, ...]:
    """``"deadzone,bcw"`` → ``("deadzone", "bcw")`` in :data:`PARTS` order; ``"all"`` → all;
    ``"none"`` → none. Unknown names raise ``argparse.ArgumentTypeError`` naming them."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return PARTS
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in PARTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--authors-semantics {value!r}: {bad or 'empty'} not among {', '.join(PARTS)} "
            f"(a comma list of them, 'all' or 'none'; the flag alone means all)"
        )
    return tuple(p for p in PARTS if p in names)


def add_flag(g: argparse._ArgumentGroup, where: str) -> None:
    """``--authors-semantics [PARTS]`` (default: none)."""
    g.add_argument(
        "--authors-semantics",
        dest="authors_semantics",
        nargs="?",
        type=parse_parts,
        const=PARTS,
        default=(),
        metavar="PARTS",
        help=f"the authors' behaviour where this project differs, to measure each "
        f"correction: a comma list of {', '.join(PARTS)}; the flag alone means all. "
        f"{where} (default: none)",
    )


def curve_parts(kind: str, parts: Iterable[str], bias_corr: bool) -> tuple[str, ...]:
    """The parts a curve set of ``kind`` carries: those of its kind, ``bcw``/``bca`` only with
    the correction flag (without it they change nothing)."""
    corr = {"bcw", "bca"}
    return tuple(p for p in parts if p in CURVE_PARTS[kind] and (p not in corr or bias_corr))


def curve_rules_of(meta: Mapping[str, Any]) -> list[str]:
    """The curve-borne rules (:data:`CURVE_RULES`) a curve set's ``meta.json`` carries."""
    return [p for p in meta.get("authors_semantics", []) if p in CURVE_RULES]


def check_curve_rules(meta: Mapping[str, Any], parts: Iterable[str], flag_hint: str) -> None:
    """The curve-borne rules (:data:`CURVE_RULES`) of a curve set equal those the allocation
    asks for; otherwise ``ValueError`` names both and the fix (the allocation must apply the
    quantizer the curves measured)."""
    kind = meta.get("kind", "weight")
    have = curve_rules_of(meta)
    want = [p for p in parts if p in CURVE_RULES and p in CURVE_PARTS[kind]]
    if have != want:
        raise ValueError(
            f"the {kind} curves were measured with the authors' rules {have or 'none'}, "
            f"{flag_hint} asks for {want or 'none'}: pass --authors-semantics "
            f"{','.join(have) or 'none'} here (plus bcw/bca if wanted) or measure curves with "
            f"--authors-semantics {','.join(want) or 'none'}"
        )


def act_curve_rules(parts: Iterable[str]) -> tuple[str, ...]:
    """The curve-borne rules an activation curve set must carry for ``parts``."""
    return tuple(p for p in parts if p in CURVE_RULES and p in CURVE_PARTS["act"])


def effective_parts(
    parts: Iterable[str], metas: Iterable[Mapping[str, Any]], bcw: bool, bca: bool
) -> tuple[str, ...]:
    """The parts in effect for an allocation: the curve-borne rules its curve sets carry
    (``metas``; :func:`check_curve_rules` has made them equal to ``parts``'), ``bcw`` / ``bca``
    only with the correction flag that they redefine."""
    parts = set(parts)
    have = {p for m in metas for p in curve_rules_of(m)}
    on = have | {p for p, flag in (("bcw", bcw), ("bca", bca)) if flag and p in parts}
    return tuple(p for p in PARTS if p in on)


def entry_rule(entry: Mapping[str, Any], part: str) -> bool:
    """Whether an allocation entry carries the authors' ``part``; an unknown value is refused
    (a file from a newer version must not be applied with the wrong rule)."""
    _, key = ENTRY_KEYS[part]
    value = entry.get(key)
    if value is None:
        return False
    if value != ENTRY_VALUES[part]:
        raise ValueError(
            f"allocation entry has {key}={value!r}, which this version does not know (only "
            f"{ENTRY_VALUES[part]!r}); re-make the allocation with this version"
        )
    return True
