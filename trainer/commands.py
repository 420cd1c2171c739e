"""Sub-commands of `evaclip` for training: run, train, launch, datasets; see evaclip/cli.py."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from evaclip.errors import UserError
    from evaclip.trainer.launch import run_local

    if not args.local:
        raise UserError(
            "evaclip run: only --local is supported; on a cluster, kubectl apply the manifest"
        )
    metrics = run_local(args.manifest, nproc=args.nproc, stages=args.stage,
                        copy_to=args.copy_to, workdir=args.workdir)
    if "top1" in metrics:
        print(f"Validation top-1: {metrics['top1']:.4f} "
              f"(top-{metrics.get('topK', 5)} {metrics.get('top5', float('nan')):.4f}) on "
              f"{metrics.get('validationImages', '?')} images.")
    if metrics.get("copiedTo"):
        print(f"Outputs: {metrics['copiedTo']}/")
    return 0


def _train(args: argparse.Namespace) -> int:
    from evaclip.trainer.main import main

    return main()


def _launch(args: argparse.Namespace) -> int:
    from evaclip.trainer.launch import launch_in_pod

    launch_in_pod()
    return 0  # not reached: the process is replaced by torchrun


def _datasets(args: argparse.Namespace) -> int:
    from evaclip.trainer.datasets import write_digits

    counts = write_digits(args.out_dir, args.validation_fraction, args.seed)
    print(f"Wrote {counts['train']} training and {counts['validation']} validation digits "
          f"images to {args.out_dir}/{{train,validation}}/<class>/.")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this area's sub-commands to the `evaclip` parser."""
    p = sub.add_parser(
        "run", help="run a manifest on this machine as a PyTorchJob pod would",
        description="Validate MANIFEST, then train it here with torchrun. Without "
        "storage.endpoint, s3:// URIs are served by an embedded S3 store on 127.0.0.1.",
    )
    p.add_argument("manifest", help="EvaClipFinetune manifest (YAML)")
    p.add_argument("--local", action="store_true", help="run on this machine (required)")
    p.add_argument("--nproc", type=int, default=None,
                   help="training processes (default: resources.gpusPerNode, or 1 on CPU)")
    p.add_argument("--stage", action="append", default=[], metavar="LOCAL_DIR=URI",
                   help="upload a local folder to a URI before the run (repeatable)")
    p.add_argument("--copy-to", default=None, metavar="DIR",
                   help="copy the published outputs to DIR/<job name>/ afterwards")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="node-local scratch (default .cache/evaclip/runs/<job name>)")
    p.set_defaults(func=_run)

    p = sub.add_parser("train", help="run one training process (what torchrun starts)")
    p.set_defaults(func=_train)

    p = sub.add_parser("launch", help="entrypoint of a training pod: start torchrun from "
                       "the PyTorchJob environment")
    p.set_defaults(func=_launch)

    p = sub.add_parser("datasets", help="write example datasets as image folders")
    dsub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    d = dsub.add_parser("digits", help="scikit-learn's 1,797 handwritten digits as PNG files")
    d.add_argument("out_dir", metavar="OUT_DIR")
    d.add_argument("--validation-fraction", type=float, default=0.2)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_datasets)
