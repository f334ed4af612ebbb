"""Recording fake of an external command (docker, k3d, kubectl) for the cluster CLI tests.

The wrappers beside this file run `python3 fake_tool.py TOOL ARGS...`. Each call appends
{"tool": TOOL, "args": [...]} as one JSON line to $EDGEFACE_FAKE_STATE/calls.jsonl (with
"stdin": TEXT added when ARGS end in `-f -`, as in `kubectl apply -f -`), then
prints the output that $EDGEFACE_FAKE_STATE/rules.json specifies, a list of rules

    {"tool": "kubectl", "match": ["get", "pods"], "responses": [RESPONSE, ...]}

where `match` tokens must appear in ARGS in that order. The first matching rule responds with
its next response, and the last response repeats once the others are used up. A response has
optional keys "stdout", "stderr", "exit" (default 0) and "sleep" (seconds to wait before printing).
A call that matches no rule prints nothing and exits 0.
"""

import json
import os
import sys
import time
from pathlib import Path


def _matches(pattern: list[str], args: list[str]) -> bool:
    position = 0
    for token in pattern:
        try:
            position = args.index(token, position) + 1
        except ValueError:
            return False
    return True


def main() -> int:
    tool, args = sys.argv[1], sys.argv[2:]
    state = Path(os.environ["EDGEFACE_FAKE_STATE"])
    entry = {"tool": tool, "args": args}
    if args[-2:] == ["-f", "-"]:
        entry["stdin"] = sys.stdin.read()
    with open(state / "calls.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")
    rules_path = state / "rules.json"
    rules = json.loads(rules_path.read_text()) if rules_path.exists() else []
    counts_path = state / "counts.json"
    counts = json.loads(counts_path.read_text()) if counts_path.exists() else {}
    for index, rule in enumerate(rules):
        if rule["tool"] != tool or not _matches(rule.get("match", []), args):
            continue
        used = counts.get(str(index), 0)
        counts[str(index)] = used + 1
        counts_path.write_text(json.dumps(counts))
        response = rule["responses"][min(used, len(rule["responses"]) - 1)]
        time.sleep(response.get("sleep", 0))
        sys.stdout.write(response.get("stdout", ""))
        sys.stderr.write(response.get("stderr", ""))
        return int(response.get("exit", 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
