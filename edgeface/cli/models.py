"""`edgeface models`, `edgeface promote` and `edgeface rollback`: the model registry.

Exit codes: 0 when the command did what was requested (including a promotion that changed
nothing because the alias already points to the version), 1 when a gate rejected a
promotion, 2 for invalid input or a registry error.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from edgeface.errors import RegistryError

DEFAULT_MODEL_NAME = "edgeface"
EXIT_REJECTED = 1

_TRACKING_URI_HELP = (
    "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db, the store "
    "that `edgeface run` writes in the current folder)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_models_parser(subparsers)
    _add_promote_parser(subparsers)
    _add_rollback_parser(subparsers)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help=_TRACKING_URI_HELP)
    parser.add_argument("--format", choices=["text", "json"], default="text",
                        help="output format (default text)")


def _add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list registered models and show versions",
        description="List registered face models and their versions, aliases, key metrics, "
                    "lineage and ONNX parity.",
    )
    commands = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    listing = commands.add_parser(
        "list", help="list registered models, or the versions of one",
        description="Without NAME, list the registered models. With NAME, list its versions.",
    )
    listing.add_argument("name", nargs="?", metavar="NAME", help="registered model name")
    _add_common(listing)
    listing.set_defaults(func=run_list)
    show = commands.add_parser(
        "show", help="show one model version in detail",
        description="Show one version: NAME (latest version), NAME@ALIAS or NAME/VERSION.",
    )
    show.add_argument("reference", metavar="NAME[@ALIAS|/VERSION]", help="version to show")
    _add_common(show)
    show.set_defaults(func=run_show)


def _add_promote_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote", help="move an alias (champion) to a version that passes the gates",
        description=(
            "Point the --to alias at the version named by --from when it passes every gate: "
            "finite metrics, passed ONNX parity, and a verification accuracy no lower than "
            "that of the version the --to alias points to now, minus --max-regression. "
            "Accuracies measured with another protocol or on another dataset fail the "
            "accuracy gate. The decision is recorded in version tags. Exits 1 when a gate "
            "rejects the version."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="registered model name")
    parser.add_argument("--from", dest="source", default="challenger",
                        help="alias or version number of the candidate (default challenger)")
    parser.add_argument("--to", dest="alias", default="champion",
                        help="alias to move (default champion)")
    parser.add_argument("--max-regression", type=float, default=0.0,
                        help="accepted drop in verification accuracy versus the version the "
                             "--to alias points to now, as a fraction (0.01 = one point; "
                             "default 0)")
    parser.add_argument("--skip-accuracy-gate", action="store_true",
                        help="pass the accuracy gate without comparing, for example when the "
                             "two versions were evaluated on different datasets or protocols")
    parser.add_argument("--dry-run", action="store_true",
                        help="evaluate the gates and print the decision without changing "
                             "anything")
    parser.add_argument("--lock-timeout", type=float, default=120.0,
                        help="seconds to wait for a concurrent promotion (default 120)")
    _add_common(parser)
    parser.set_defaults(func=run_promote)


def _add_rollback_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rollback", help="point an alias back at its previous version",
        description="Point the --to alias back at the version it held before its current "
                    "one, as recorded by `edgeface promote`.",
    )
    parser.add_argument("name", metavar="NAME", help="registered model name")
    parser.add_argument("--to", dest="alias", default="champion",
                        help="alias to move back (default champion)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the version it would return to without changing anything")
    parser.add_argument("--lock-timeout", type=float, default=120.0,
                        help="seconds to wait for a concurrent promotion (default 120)")
    _add_common(parser)
    parser.set_defaults(func=run_rollback)


# --- helpers ----------------------------------------------------------------------------------


def open_registry(tracking_uri: str | None) -> Any:
    """Return the registry at `--tracking-uri`; see `edgeface.registry.open_store`."""
    from edgeface.registry import open_store

    return open_store(tracking_uri)


def parse_reference(reference: str) -> tuple[str, str]:
    """Split `NAME`, `NAME@ALIAS` or `NAME/VERSION` into (name, alias or version or "latest")."""
    if "@" in reference:
        name, _, key = reference.partition("@")
    elif "/" in reference:
        name, _, key = reference.rpartition("/")
    else:
        name, key = reference, "latest"
    if not name or not key:
        raise RegistryError(
            f"invalid model reference {reference!r}: use NAME, NAME@ALIAS or NAME/VERSION"
        )
    return name, key


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _signed(value: Any, digits: int = 4) -> str:
    """Format a difference with its sign and fixed decimals (`+0.0053`, `-0.0020`)."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:+.{digits}f}"
    return str(value)


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


# --- models list / show -------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    from edgeface.registry import describe_version, is_lock_model

    registry = open_registry(args.tracking_uri)
    if args.name is None:
        models = [m for m in registry.list_models() if not is_lock_model(m.name)]
        if args.format == "json":
            _print_json([{"name": m.name, "aliases": m.aliases} for m in models])
        elif not models:
            print(f"no registered models at {registry.tracking_uri}")
        for model in models if args.format == "text" else []:
            aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items()))
            print(f"{model.name}  aliases: {aliases or 'none'}")
        return 0
    versions = [describe_version(info) for info in registry.list_versions(args.name)]
    if args.format == "json":
        _print_json(versions)
        return 0
    print(f"{'version':>7}  {'aliases':<22} {'accuracy':>8} {'auc':>6} {'threshold':>9} "
          f"{'parity':>6}  {'int8 delta':>10}  {'rounds':>6}  {'partition':<9}  parent run")
    for item in versions:
        metrics, lineage = item["metrics"], item["lineage"]
        parity = {True: "ok", False: "FAILED", None: "-"}[item["onnx"]["parity_ok"]]
        print(f"{item['version']:>7}  {','.join(item['aliases']) or '-':<22} "
              f"{_number(metrics.get('verification_accuracy_mean')):>8} "
              f"{_number(metrics.get('verification_auc'), 3):>6} "
              f"{_number(item['threshold']):>9} {parity:>6}  "
              f"{_signed(item['int8'].get('accuracy_delta'))[:10]:>10}  "
              f"{lineage['rounds'] or '-':>6}  {lineage['partition'] or '-':<9}  "
              f"{lineage['parent_run_id'] or '-'}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from edgeface.registry import describe_version

    registry = open_registry(args.tracking_uri)
    name, key = parse_reference(args.reference)
    description = describe_version(registry.get_version(name, key))
    if args.format == "json":
        _print_json(description)
        return 0
    print(format_version(description))
    return 0


def format_version(description: dict[str, Any]) -> str:
    """Render `describe_version` output as indented text."""
    lines = [
        f"{description['name']} version {description['version']} "
        f"(aliases: {', '.join(description['aliases']) or 'none'})",
        f"  uri:        {description['model_uri']}",
        f"  run:        {description['run_id']}",
        f"  threshold:  {_number(description['threshold'])}",
        "  metrics:",
        *(f"    {key}: {_number(value)}" for key, value in description["metrics"].items()),
        "  lineage:",
        *(f"    {key}: {value or '-'}" for key, value in description["lineage"].items()),
        "  onnx:",
        *(f"    {key}: {value if value is not None else '-'}"
          for key, value in description["onnx"].items()),
    ]
    for section in ("int8", "fp32", "promotion", "rollback"):
        if description[section]:
            lines.append(f"  {section}:")
            for key, value in description[section].items():
                text = _signed(value) if key == "accuracy_delta" else _number(value)
                lines.append(f"    {key}: {text}")
    return "\n".join(lines)


# --- promote / rollback -------------------------------------------------------------------


def run_promote(args: argparse.Namespace) -> int:
    from edgeface.registry import promote

    registry = open_registry(args.tracking_uri)
    decision = promote(
        registry, args.name, source=args.source, alias=args.alias,
        max_regression=args.max_regression, skip_accuracy_gate=args.skip_accuracy_gate,
        dry_run=args.dry_run, lock_timeout_s=args.lock_timeout,
    )
    if args.format == "json":
        _print_json(decision.to_dict())
    else:
        print(format_decision(decision))
    return 0 if decision.accepted else EXIT_REJECTED


def format_decision(decision: Any) -> str:
    """Describe a `PromotionDecision` in a few lines: outcome, then one line per gate."""
    target = f"{decision.model_name}@{decision.alias}"
    prefix = "dry run: " if decision.dry_run else ""
    if decision.outcome == "unchanged":
        head = f"{target} already points to version {decision.candidate_version}: nothing to do"
    elif decision.outcome == "promoted":
        verb = "would move" if decision.dry_run else "moved"
        head = (f"{verb} {target} from version {decision.previous_version or 'none'} to "
                f"version {decision.candidate_version}")
    else:
        verb = "would reject" if decision.dry_run else "rejected"
        head = (f"{verb} version {decision.candidate_version} for {target} (stays at "
                f"{decision.previous_version or 'none'}): "
                f"{', '.join(g.name for g in decision.failed_gates)} failed")
    gates = [f"  {'pass' if g.passed else 'FAIL'} {g.name}: {g.detail}" for g in decision.gates]
    return "\n".join([prefix + head, *gates])


def run_rollback(args: argparse.Namespace) -> int:
    from edgeface.registry import rollback

    registry = open_registry(args.tracking_uri)
    result = rollback(registry, args.name, alias=args.alias, dry_run=args.dry_run,
                      lock_timeout_s=args.lock_timeout)
    if args.format == "json":
        _print_json(result.to_dict())
        return 0
    verb = "would move" if result.dry_run else "moved"
    print(f"{verb} {result.model_name}@{result.alias} back from version {result.from_version} "
          f"to version {result.to_version}")
    return 0
