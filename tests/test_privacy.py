"""Raw images never leave their edge node: only weights, counts and scalars travel."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeface.workers import _check_reply_payload

NODE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    images_root, manifest, cache_dir, state_dir, out = map(Path, sys.argv[1:6])
    opened = []

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)
    import torch
    from edgeface import steps
    from edgeface.config import load_config

    config = load_config(overrides={"image-size": 32, "batch-size": 16, "rounds": 1,
                                    "spreadout": True})
    shard = steps.load_node_shard(manifest)
    data = steps.prepare_node(images_root, shard, config, cache_dir)
    torch.save(steps.initial_state(config), state_dir / "global.pt")
    steps.train_node(data, state_dir / "global.pt", state_dir, state_dir / "update.pt", config, 0)
    root = str(images_root.resolve())
    touched = sorted({p for p in opened if p.startswith(root)})
    json.dump(touched, open(out, "w"))
""")


def test_node_reads_only_its_manifest(orl_dir: Path, tmp_path: Path) -> None:
    from edgeface.data.ingest import list_images
    from edgeface.data.partition import partition

    records = list_images(orl_dir)
    shards = partition(records, 3, "identity", seed=0)
    manifests = shards.write_manifests(tmp_path / "manifests")
    node = shards.nodes[1]
    out = tmp_path / "opened.json"
    (tmp_path / "state").mkdir()
    subprocess.run(
        [sys.executable, "-c", NODE_SCRIPT, str(orl_dir.resolve()), str(manifests[1]),
         str(tmp_path / "cache"), str(tmp_path / "state"), str(out)],
        check=True, timeout=300,
    )
    opened = {str(Path(p).relative_to(orl_dir.resolve())) for p in json.loads(out.read_text())}
    own = {r.path for r in node.records}
    assert opened, "the node opened no image at all"
    assert opened <= own, f"node-1 opened files of other nodes: {sorted(opened - own)[:5]}"
    update = torch.load(tmp_path / "state" / "update.pt", weights_only=True)
    assert not any(key.startswith("head") for key in update)
    # Only the backbone travels: no tensor in the update has the shape of an image batch.
    assert not any(t.ndim == 4 and t.shape[-1] == 3 and t.dtype == torch.uint8
                   for t in update.values())
    # With spreadout on, the node also sends the rows of its head: one per own person.
    centres = torch.load(tmp_path / "state" / "update.centres.pt", weights_only=True)
    assert centres.is_floating_point()
    assert centres.shape == (len({r.identity for r in node.records}), 128)


@pytest.mark.parametrize("payload", [
    np.zeros((2, 32, 32, 3), dtype=np.uint8),
    torch.zeros(3),
    b"\xff\xd8 raw jpeg bytes",
    {"metrics": {"images": np.zeros(4)}},
    [1, 2, {"nested": torch.ones(1)}],
])
def test_node_reply_rejects_arrays(payload) -> None:
    with pytest.raises(TypeError):
        _check_reply_payload(payload)


def test_node_reply_accepts_scalars() -> None:
    _check_reply_payload({"ok": True, "num_samples": 12, "metrics": {"loss": 1.5},
                          "bad": [["a/b.jpg", "truncated"]], "update_path": "/x/node-0.pt"})
