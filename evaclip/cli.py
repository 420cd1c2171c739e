"""The `evaclip` command line.

Sub-commands live next to what they drive (see COMMAND_MODULES). Each of those modules
has `register(subparsers)` and keeps heavy imports inside its handlers, so
`evaclip --help` stays fast.

A `UserError` anywhere, or a `StorageError` (object storage unreachable or failing after
every retry), becomes one line on stderr and exit code 1; nothing the user can fix ends
in a traceback. Any other exception is a bug and keeps its traceback. Ctrl-C (or SIGTERM
to `evaclip run`) prints `interrupted`, with where the run can resume from when a
checkpoint exists, and exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from evaclip import __version__
from evaclip.errors import UserError
from evaclip.storage import StorageError

COMMAND_MODULES = (
    "evaclip.models.commands",  # model list / info, features
    "evaclip.plan",  # plan
    "evaclip.trainer.commands",  # run, train, datasets
    "evaclip.operator.commands",  # operator
    "evaclip.reference",  # docs
)


def _crd(args: argparse.Namespace) -> int:
    from evaclip.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _validate(args: argparse.Namespace) -> int:
    from evaclip.manifest import load_manifest

    resource = load_manifest(args.manifest)
    print(f"{args.manifest}: valid EvaClipFinetune {resource.namespace}/{resource.name}")
    return 0


def _render(args: argparse.Namespace) -> int:
    from evaclip.manifest import load_manifest
    from evaclip.render import trainer_config_json

    sys.stdout.write(trainer_config_json(load_manifest(args.manifest)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaclip",
        description="Fine-tune EVA-CLIP vision towers locally or on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"evaclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("crd", help="print the EvaClipFinetune CustomResourceDefinition")
    p.set_defaults(func=_crd)
    p = sub.add_parser("validate", help="check a manifest without running it")
    p.add_argument("manifest")
    p.set_defaults(func=_validate)
    p = sub.add_parser("render", help="print the trainer config a manifest becomes")
    p.add_argument("manifest")
    p.set_defaults(func=_render)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        hint = str(err)
        print(f"interrupted; {hint}" if hint else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
