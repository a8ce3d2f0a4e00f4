"""The benchmark protocols, one file each, and their registry.

    domainbed  DomainBed leave-one-domain-out (tables 1, 6)      protocols/domainbed.py
    wild       CLIPood in the wild: held-out domain + new classes  protocols/wild.py
    base2new   CoOp base-to-new (tables 3, 5)                     protocols/base2new.py
    imagenet   ImageNet and its variants (table 2)                protocols/imagenet.py

Adding one: a file with a ``Protocol`` subclass, and its line in ``PROTOCOLS`` below (docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignclip.protocols.base import TEST_SPLITS, Protocol, View, paper_results
from alignclip.protocols.base2new import BaseToNew, harmonic_mean
from alignclip.protocols.domainbed import DomainBed
from alignclip.protocols.imagenet import ImageNetVariants
from alignclip.protocols.wild import InTheWild

if TYPE_CHECKING:  # annotations only: the CLI reads PROTOCOLS' names without loading pandas
    import pandas as pd

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (DomainBed(), InTheWild(), BaseToNew(), ImageNetVariants())}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def training_set(
    manifest: pd.DataFrame, meta: dict, test_domain: str | None, seed: int, shots: int | None = None
) -> tuple[pd.DataFrame, list[int]]:
    """Training rows and label space of the prepared dataset's protocol. ``shots`` (few-shot protocols, from a
    recipe): None the prepared few-shot subset of ``seed``; 0 every training image; a count must be the prepared one."""
    protocol = get_protocol(meta["protocol"])
    protocol.check_test_domain(meta, test_domain)
    return protocol.training_set(manifest, meta, test_domain, seed, shots)


# a held-out domain's evaluation splits, the first the default (the schema's data.test_split, alignclip/config.py)
TEST_SPLITS = ("holdout", "in", "full")


def evaluation_views(manifest: pd.DataFrame, meta: dict, test_domain: str | None, test_split: str = TEST_SPLITS[0]) -> list[View]:
    """The splits a trained model is scored on. ``test_split`` (protocols with a held-out domain's in/out
    splits) picks the held-out domain's images: ``holdout`` (default, CLIPood: its 20% "out" split), ``in`` (its
    80% "in" split, what DomainBed's model selection reports as ``env{i}_in_acc``) or ``full`` (the whole domain)."""
    protocol = get_protocol(meta["protocol"])
    if test_split not in TEST_SPLITS:
        raise ValueError(f"test_split={test_split!r}: expected one of {', '.join(repr(s) for s in TEST_SPLITS)}")
    protocol.check_test_domain(meta, test_domain)
    return protocol.evaluation_views(manifest, meta, test_domain, test_split)


__all__ = ["PROTOCOLS", "Protocol", "TEST_SPLITS", "View", "get_protocol", "training_set", "evaluation_views",
           "harmonic_mean", "paper_results"]
