"""vlm-interp sites and families: what a model exposes, which classes are supported."""

from __future__ import annotations

import argparse

from .common import DEFAULT_MODEL


def _sites(args: argparse.Namespace) -> int:
    import vlm_interp as vi

    vlm = vi.load(args.model)
    print(vlm.adapter.describe())
    for tower in vlm.adapter.towers():
        for component in vlm.adapter.components(tower):
            sites = vlm.adapter.sites(tower, component)
            print(f"{tower}.{component}: {len(sites)} sites, e.g. {sites[0].name} .. {sites[-1].name}")
    return 0


def _families(args: argparse.Namespace) -> int:
    from vlm_interp.adapters import supported

    print("\n".join(supported()))
    return 0


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    sites = sub.add_parser("sites", help="list the towers, components and sites of a model")
    sites.add_argument("--model", default=DEFAULT_MODEL)
    sites.set_defaults(run=_sites)
    fams = sub.add_parser("families", help="list the supported model classes")
    fams.set_defaults(run=_families)
