"""`medimg card`: a registered version's model card, as markdown or JSON.

The card attached at registration (`card/model_card.json` beside the version's run) is shown
when it still matches the digest registered with the version; a changed one is refused (exit 1)
rather than shown as if it were the registered card. A version registered before cards existed
gets one built from its run's records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medimg import governance, tracking
from medimg.analysis.card import card_markdown
from medimg.config import Params
from medimg.errors import MedimgError
from medimg.tracking import model_card


def resolve(spec: str, default_name: str) -> tuple[str, str]:
    """(model name, version) from NAME@ALIAS, NAME/VERSION, ALIAS or VERSION."""
    if "@" in spec:
        name, ref = spec.split("@", 1)
    elif "/" in spec:
        name, ref = spec.rsplit("/", 1)
    else:
        name, ref = default_name, spec
    name = name or default_name
    if ref.isdigit():
        return name, ref
    found = tracking.version_by_alias(name, ref)
    if found is None:
        raise MedimgError(f"{name}: no alias {ref!r}")
    return name, found["version"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="champion",
        help="NAME@ALIAS, NAME/VERSION, an alias or a version of <dataset>-classifier "
        "(default: %(default)s)",
    )
    p.add_argument("-o", "--output", default=None, help="write the card to this file")
    p.add_argument("--json", action="store_true", help="JSON instead of markdown")


def run(params: Params, args: argparse.Namespace) -> int:
    tracking.configure(params.mlflow, params.dataset.name)
    name, version = resolve(args.model, params.register_cfg.registered_name(params.dataset.name))
    loaded = model_card.load_card(name, version)
    if loaded is None:
        info = model_card.version_info(name, version)
        card = governance.card_for(
            params, name, version, info["run_id"], version_tags=info["tags"],
            created=info["created"], registered_by=info["tags"].get("registered_by", ""),
        )  # fmt: skip
        print(f"{name} v{version}: no card attached; built from its run", file=sys.stderr)
    else:
        card, intact = loaded
        if not intact:
            raise MedimgError(
                f"{name} v{version}: the attached card does not match the digest registered "
                f"with the version ({model_card.DIGEST_TAG}): it was changed after registration"
            )
    text = json.dumps(card, indent=2, sort_keys=True) if args.json else card_markdown(card)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"{name} v{version}: card written to {args.output}")
    else:
        print(text)
    return 0
