"""Model- and data-specific code; everything else in rdoq is model-agnostic.

The interface is :class:`rdoq.adapters.base.Adapter`; :func:`adapter_registry` maps each
``--dataset`` name to its adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

from rdoq.adapters.base import Adapter, InputError


def adapter_registry() -> dict[str, Adapter]:
    """A fresh ``{--dataset name: adapter}`` of the built-in adapters, in the order of the
    ``--dataset`` choices. Callers may add their own adapters to the dict they get and pass it
    to the script entry points of ``rdoq.cli_curves``, ``rdoq.cli_alloc`` and ``rdoq.cli_eval``
    (their ``adapters`` argument)."""
    # Imported on call, so that importing the shared types (rdoq.adapters.base) does not load
    # every model family's code.
    from rdoq.adapters.digits import DigitsAdapter
    from rdoq.adapters.natural import NaturalAdapter
    from rdoq.adapters.timm_imagenet import ImageNetAdapter, SyntheticAdapter

    adapters = (ImageNetAdapter(), DigitsAdapter(), SyntheticAdapter(), NaturalAdapter())
    return {a.name: a for a in adapters}


def get_adapter(name: str, adapters: Mapping[str, Adapter] | None = None) -> Adapter:
    """The adapter of ``--dataset name`` in ``adapters`` (default: :func:`adapter_registry`);
    an unknown name is an InputError listing the known ones."""
    adapters = adapter_registry() if adapters is None else adapters
    if name not in adapters:
        raise InputError(f"--dataset {name!r} has no adapter; choose one of {', '.join(adapters)}")
    return adapters[name]
