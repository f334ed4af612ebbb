"""Ingest rate: validation and preprocessing of LFW images, first run and cached run.

The first run decodes, validates, crops and resizes every image into an empty cache folder
(`edgeface.data.cache.build_cache`). The cached run repeats the call: it hashes every file to
find the cache key and memory-maps the stored array, decoding nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, utc_now, write_json


def run(data: Path, out: Path, *, quick: bool) -> dict[str, Any]:
    from edgeface.data.cache import PreprocessSpec, build_cache, load_cache
    from edgeface.data.ingest import list_images, resolve_images_root

    out.mkdir(parents=True, exist_ok=True)
    root = resolve_images_root(data)
    records = list_images(root)
    if quick:
        records = records[:2000]
    cache_dir = out / "ingest-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    spec = PreprocessSpec(image_size=64)
    runs = {}
    for label in ("first", "cached"):
        started = time.perf_counter()
        result = build_cache(root, records, spec, cache_dir, progress=False, desc="ingest")
        array, _ = load_cache(result.path)
        checksum = int(array[:, 0, 0, 0].sum())  # touch one pixel per image of the memory map
        seconds = time.perf_counter() - started
        runs[label] = {"seconds": round(seconds, 3), "cache_hit": result.hit,
                       "images_per_second": round(len(records) / seconds, 1),
                       "bad_images": len(result.report.bad), "checksum": checksum}
    shutil.rmtree(cache_dir, ignore_errors=True)
    record = {"benchmark": "ingest", "date": utc_now(), "machine": machine(),
              "images": len(records), "image_size": 64, "runs": runs,
              "cached_speedup": round(runs["first"]["seconds"] / runs["cached"]["seconds"], 1)}
    write_json(record, out / "ingest.json")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="LFW folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="2,000 images instead of all")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.data, args.out, quick=args.quick)["runs"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
