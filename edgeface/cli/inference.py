"""`edgeface embed`, `edgeface verify` and `edgeface identify`: inference with onnxruntime.

These commands never import torch, so they run on devices that have only onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INFERENCE_COMMANDS = ("embed", "verify", "identify")
CROP_EXAMPLE = "0.33,0.31,0.67,0.70"

MODEL_HELP = (
    "registered model (models:/NAME@ALIAS or models:/NAME/VERSION) or a path to an .onnx file "
    "(default models:/edgeface@champion)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_embed_parser(subparsers)
    _add_verify_parser(subparsers)
    _add_identify_parser(subparsers)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models:/edgeface@champion", help=MODEL_HELP)
    parser.add_argument("--variant", choices=["fp32", "int8"], default="fp32",
                        help="fp32 model, or the int8 file logged beside it (default fp32)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI for models:/ (default: $MLFLOW_TRACKING_URI, "
                             "else sqlite:///./mlflow.db)")
    parser.add_argument("--crop", type=crop_box, metavar="LEFT,TOP,RIGHT,BOTTOM",
                        help="face box as fractions of the image width and height, such as "
                             f"{CROP_EXAMPLE}, as `edgeface run --crop` takes it; four values "
                             "separated by spaces are also accepted (default: the model's)")
    parser.add_argument("--cache-dir", type=Path,
                        help="folder for downloaded models and gallery embeddings (default "
                             "$EDGEFACE_CACHE_DIR or ~/.cache/edgeface)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime threads; 0 lets onnxruntime choose (default 0)")
    parser.add_argument("--format", choices=["text", "json"], default="text",
                        help="output format (default text)")


def _add_embed_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed", help="compute face embeddings of images",
        description="Print the unit-norm embedding of each image, or save them with --output.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--output", type=Path,
                        help="also write the embeddings as a float32 (N, D) .npy file")
    _add_model_options(parser)
    parser.set_defaults(func=run_embed)


def _add_verify_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify", help="decide whether two face images show the same person",
        description="Print the cosine similarity of two faces, the decision threshold and the "
                    "decision: same person when the similarity is greater than the threshold.",
    )
    parser.add_argument("image_a", type=Path, metavar="IMAGE_A")
    parser.add_argument("image_b", type=Path, metavar="IMAGE_B")
    parser.add_argument("--threshold", type=cosine_threshold,
                        help="cosine-similarity threshold, from -1 to 1 (default: the one "
                             "stored with the model)")
    _add_model_options(parser)
    parser.set_defaults(func=run_verify)


def _add_identify_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "identify", help="find the nearest identity of a face in a gallery",
        description="Rank the identities of a gallery folder (one subfolder of images per "
                    "identity) by cosine similarity to the face. Gallery embeddings are cached.",
    )
    parser.add_argument("image", type=Path, metavar="IMAGE")
    parser.add_argument("--gallery", type=Path, required=True, metavar="DIR",
                        help="gallery folder: DIR/<identity>/<image>")
    parser.add_argument("--top-k", type=int, default=5,
                        help="identities to list (default 5)")
    parser.add_argument("--threshold", type=cosine_threshold,
                        help="cosine-similarity threshold reported with the match, from -1 to "
                             "1 (default: the one stored with the model)")
    parser.add_argument("--no-cache", action="store_true",
                        help="embed the gallery again instead of reading the cache")
    _add_model_options(parser)
    parser.set_defaults(func=run_identify)


def cosine_threshold(text: str) -> float:
    """Parse a --threshold value, which must be a cosine similarity in [-1, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid threshold {text!r}: expected a number "
                                         "from -1 to 1, such as 0.3") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"invalid threshold {text}: a cosine similarity lies in [-1, 1], so use a value "
            "from -1 to 1, such as 0.3")
    return value


def crop_box(text: str) -> tuple[float, float, float, float]:
    """Parse a --crop value: four comma-separated fractions LEFT,TOP,RIGHT,BOTTOM.

    The order of the box (left < right, top < bottom, inside 0..1) is checked later, by
    `PreprocessSpec`, with the model's other preprocessing settings.
    """
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(
            f"invalid crop {text!r}: expected 4 numbers LEFT,TOP,RIGHT,BOTTOM as fractions of "
            f"the image, such as {CROP_EXAMPLE}"
        )
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def join_crop_values(argv: Sequence[str]) -> list[str]:
    """Rewrite `--crop L T R B` as `--crop L,T,R,B` in the arguments of an inference command.

    The inference commands took the crop as four separate values before they took the
    comma-separated form of `edgeface run`. argparse cannot give one option either one or four
    values: `nargs="+"` would also consume the image paths in `verify --crop 0 0 1 1 A B`. So
    the old form is joined before parsing. Arguments of other commands are returned unchanged.
    """
    result = list(argv)
    command_seen = False
    index = 0
    while index < len(result):
        token = result[index]
        if token == "--":
            break
        command_seen = command_seen or token in INFERENCE_COMMANDS
        values = result[index + 1:index + 5]
        if (command_seen and token == "--crop" and len(values) == 4
                and all(_is_number(value) for value in values)):
            result[index + 1:index + 5] = [",".join(values)]
        index += 1
    return result


def _embedder(args: argparse.Namespace) -> Any:
    from edgeface.inference import Embedder, resolve_model

    # MLflow draws a progress bar on stderr for every download.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    source = resolve_model(
        args.model, tracking_uri=args.tracking_uri, cache_dir=args.cache_dir,
        variant=args.variant, crop=args.crop, threshold=getattr(args, "threshold", None),
    )
    return Embedder(source, threads=args.threads)


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2))


def run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    embedder = _embedder(args)
    embeddings = embedder.embed_files(args.images)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.output, embeddings.astype(np.float32))
    if args.format == "json":
        _print_json({**embedder.source.to_dict(), "embeddings": [
            {"image": str(path), "embedding": row.tolist()}
            for path, row in zip(args.images, embeddings)
        ]})
        return 0
    for path, row in zip(args.images, embeddings):
        preview = ", ".join(f"{value:+.4f}" for value in row[:4])
        print(f"{path}: {len(row)} values [{preview}, ...]")
    if args.output is not None:
        print(f"wrote {len(embeddings)} embeddings to {args.output}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from edgeface.inference import require_threshold, verify_files

    embedder = _embedder(args)
    threshold = require_threshold(embedder.source)
    outcome = verify_files(embedder, args.image_a, args.image_b, threshold)
    if args.format == "json":
        _print_json({**embedder.source.to_dict(), **outcome.to_dict()})
        return 0
    decision = "same person" if outcome.same else "different people"
    print(f"similarity {outcome.similarity:.4f}, threshold {outcome.threshold:.4f}: {decision} "
          f"({embedder.source.description}, {embedder.source.variant})")
    return 0


def run_identify(args: argparse.Namespace) -> int:
    from edgeface.inference import identify_file, load_gallery

    embedder = _embedder(args)
    gallery = load_gallery(embedder, args.gallery, cache_dir=args.cache_dir,
                           use_cache=not args.no_cache)
    outcome = identify_file(embedder, gallery, args.image, top_k=args.top_k,
                            threshold=embedder.source.threshold)
    if args.format == "json":
        _print_json({**embedder.source.to_dict(), **outcome.to_dict(),
                     "gallery": {"path": str(args.gallery), "identities": len(gallery.identities),
                                 "images": len(gallery.paths), "cache_hit": gallery.cache_hit}})
        return 0
    note = ""
    if outcome.above_threshold is not None:
        relation = "above" if outcome.above_threshold else "not above"
        note = f", {relation} threshold {outcome.threshold:.4f}"
    print(f"{outcome.identity} (score {outcome.score:.4f}{note})")
    for identity, score in outcome.candidates[1:]:
        print(f"  {identity}: {score:.4f}")
    return 0
