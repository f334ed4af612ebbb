"""`edgeface data`: download datasets (`fetch`) and check an image folder (`inspect`)."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from edgeface.config import load_config
from edgeface.data.fetch import DATASETS, LFW, fetch_dataset
from edgeface.data.ingest import (
    ImageRecord,
    ValidationReport,
    check_bad_fraction,
    count_noun,
    resolve_images_root,
    scan_images,
    validate_images,
)
from edgeface.errors import ConfigError

# Unreadable files listed by name in the text summary. `--format json` lists all of them.
MAX_LISTED_BAD_FILES = 20


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="download and inspect face datasets",
        description="Download face datasets and check image folders before training.",
    )
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    _add_fetch_parser(commands)
    _add_inspect_parser(commands)


def _add_fetch_parser(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser(
        "fetch",
        help="download, verify and unpack a dataset",
        description=(
            "Download a dataset with its protocol files, verify checksums and unpack it. "
            "Files already present and verified are not downloaded again. To work offline, "
            f"place {LFW.archive} in the destination folder first."
        ),
    )
    fetch.add_argument("name", choices=sorted(DATASETS), help="dataset to fetch")
    fetch.add_argument(
        "--dest", type=Path, default=None,
        help="destination folder (default: ./data/NAME)",
    )
    fetch.add_argument(
        "--base-url", default=None,
        help=f"URL of the folder that serves the files (default: {LFW.url_env} or "
        f"{LFW.default_base_url})",
    )
    fetch.add_argument(
        "--sha256", dest="archive_sha256", default=None,
        help="expected sha256 of the image archive; without it the unpacked archive must "
        f"contain exactly {LFW.image_count:,} images in {LFW.identity_count:,} folders",
    )
    fetch.add_argument("--no-progress", action="store_true", help="hide progress bars")
    fetch.set_defaults(func=lambda args: run_fetch(args))


def _add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="count identities and images and decode every image",
        description=(
            "List identities and images under DATA_DIR and decode every image. Exits with an "
            "error when more than --max-bad-fraction of the images are unreadable."
        ),
    )
    inspect.add_argument(
        "data_dir", type=Path, metavar="DATA_DIR",
        help="dataset folder: an LFW folder containing lfw-deepfunneled/, or a folder of "
        "<identity>/<image> subfolders",
    )
    inspect.add_argument(
        "--format", choices=["text", "json"], default="text", help="output format (default text)"
    )
    # The same limit as `edgeface run` with the built-in config, so inspect passes exactly the
    # datasets that a run accepts.
    default_limit = load_config().data.max_bad_fraction
    inspect.add_argument(
        "--max-bad-fraction", type=float, default=default_limit,
        help=f"fraction of unreadable images (0 to 1) tolerated before failing (default "
             f"{default_limit:g}, as in `edgeface run`)",
    )
    inspect.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    inspect.set_defaults(func=lambda args: run_inspect(args))


def run_fetch(args: argparse.Namespace) -> int:
    dest = args.dest if args.dest is not None else Path("data") / args.name
    path = fetch_dataset(
        args.name,
        dest,
        base_url=args.base_url,
        progress=not args.no_progress,
        archive_sha256=args.archive_sha256,
    )
    print(f"{args.name} is ready in {path}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise ConfigError(f"invalid --max-bad-fraction {args.max_bad_fraction!r}: use a "
                          "fraction from 0 to 1, for example 0.01 for 1%")
    images_root = resolve_images_root(args.data_dir)
    listing = scan_images(images_root)
    records = listing.records
    report = validate_images(images_root, records, progress=not args.no_progress, desc="inspect")
    summary = summarize_dataset(args.data_dir, images_root, records, report,
                                skipped=listing.skipped)
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    check_bad_fraction(report, args.max_bad_fraction, str(images_root),
                       allow_more="allow more with `edgeface data inspect --max-bad-fraction`")
    return 0


def summarize_dataset(
    data_dir: Path,
    images_root: Path,
    records: Sequence[ImageRecord],
    report: ValidationReport,
    skipped: Sequence[str] = (),
) -> dict[str, Any]:
    """Collect identity and image counts and the validation outcome into a JSON-ready dict.

    `skipped` are the paths that the listing left out because they lack an image extension.
    """
    per_identity = sorted(Counter(record.identity for record in records).values())
    return {
        "data_dir": str(data_dir),
        "images_root": str(images_root),
        "identities": len(per_identity),
        "images": len(records),
        "images_per_identity": {
            "min": per_identity[0],
            "median": statistics.median(per_identity),
            "max": per_identity[-1],
        },
        "identities_with_2_or_more_images": sum(1 for count in per_identity if count >= 2),
        "skipped_non_images": list(skipped),
        "validation": report.to_dict(),
    }


def format_summary(summary: dict[str, Any]) -> str:
    per_identity = summary["images_per_identity"]
    validation = summary["validation"]
    lines = [
        f"images root: {summary['images_root']}",
        f"identities:  {summary['identities']:,} "
        f"({summary['identities_with_2_or_more_images']:,} with 2 or more images)",
        f"images:      {summary['images']:,} (per identity: min {per_identity['min']}, "
        f"median {per_identity['median']:g}, max {per_identity['max']})",
    ]
    skipped = summary.get("skipped_non_images", [])
    if skipped:
        lines.append(f"skipped:     {count_noun(len(skipped), 'file')} without an image "
                     f"extension: {_join_some(skipped, MAX_LISTED_BAD_FILES)}")
    lines.append(f"unreadable:  {validation['bad_count']:,} of {validation['checked']:,}")
    for entry in validation["bad"][:MAX_LISTED_BAD_FILES]:
        lines.append(f"  {entry['path']}: {entry['reason']}")
    if validation["bad_count"] > MAX_LISTED_BAD_FILES:
        lines.append(
            f"  and {validation['bad_count'] - MAX_LISTED_BAD_FILES:,} more "
            "(--format json lists all)"
        )
    return "\n".join(lines)


def _join_some(paths: Sequence[str], limit: int) -> str:
    listed = ", ".join(paths[:limit])
    if len(paths) <= limit:
        return listed
    return f"{listed} and {len(paths) - limit:,} more (--format json lists all)"
