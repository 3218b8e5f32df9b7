"""`fitscale config show RECIPE [--set ...]` and `fitscale config fields [SECTION]`."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add `fitscale config show` and `fitscale config fields` to `subparsers`."""
    from fitscale.clitools import add_set_option

    parser = subparsers.add_parser("config", help="show a resolved recipe or list every config field")
    commands = parser.add_subparsers(dest="config_command", metavar="show|fields", required=True)
    show = commands.add_parser(
        "show", help="print the resolved config of a recipe (with overrides), each field described"
    )
    show.add_argument("recipe", help="YAML recipe, e.g. recipes/demo.yaml")
    add_set_option(show, "recipe fields", "train.steps=100 optim.lr=2e-4")
    show.add_argument("--plain", action="store_true", help="YAML only, without the descriptions")
    show.set_defaults(func=run_show)
    fields = commands.add_parser("fields", help="list every config field: type, default, description")
    fields.add_argument("section", nargs="?", default=None, help="one section, e.g. train or optim.ema")
    fields.add_argument("--json", action="store_true", help="print the fields as JSON")
    fields.set_defaults(func=run_fields)


def run_show(args: argparse.Namespace) -> int:
    """`fitscale config show`: print the resolved recipe with overrides, each field described (or plain
    YAML); exit 0.
    """
    from fitscale.config import load_config, to_yaml
    from fitscale.config.fields import annotated_yaml

    config = load_config(args.recipe, args.overrides)
    print(to_yaml(config) if args.plain else annotated_yaml(config), end="")
    return 0


def run_fields(args: argparse.Namespace) -> int:
    """`fitscale config fields`: list every field of a section (or all) with type, default and
    description; exit 0.
    """
    from dataclasses import asdict

    from fitscale.config.fields import describe_run, format_fields

    fields = describe_run(args.section)
    if args.json:
        print(json.dumps([asdict(f) for f in fields], indent=1, default=str))
    else:
        print(format_fields(fields))
    return 0
