#!/usr/bin/env python3
"""Summarize a `cargo build --timings` report: the crates that took longest, split into rustc's front end and
LLVM's code generation, and totals per crate family. .ci/run leaves one for every CI test build in
$CARGO_TARGET_DIR/cargo-timings (benches/RESULTS.md, "Build times").

    python3 benches/timings.py REPORT.html [TOP]            # the TOP longest units (default 30)
    python3 benches/timings.py OLD.html NEW.html [TOP]      # the units whose time moved most between two builds

Times are each unit's wall time as it ran beside others, so compare reports of builds on one machine.
"""

import collections
import json
import re
import sys


def units(path):
    """The report's units: (name, target) -> (seconds, front end seconds, codegen seconds)."""
    html = open(path, encoding="utf-8").read()
    found = re.search(r"const UNIT_DATA = (\[.*?\]);\n", html, re.S)
    if not found:
        sys.exit(f"{path}: no UNIT_DATA in it; expected an HTML report of `cargo build --timings`")
    table = {}
    for unit in json.loads(found.group(1)):
        sections = {name: span["end"] - span["start"] for name, span in unit.get("sections") or []}
        key = (unit["name"], unit.get("target", "").strip() or "lib")
        seconds, frontend, codegen = table.get(key, (0.0, 0.0, 0.0))
        table[key] = (
            seconds + unit["duration"],
            frontend + sections.get("frontend", 0.0),
            codegen + sections.get("codegen", 0.0),
        )
    return table


def summary(path, top):
    table = units(path)
    total = sum(seconds for seconds, _, _ in table.values())
    frontend = sum(f for _, f, _ in table.values())
    codegen = sum(c for _, _, c in table.values())
    print(f"{path}: {len(table)} units, {total:.0f} s of crate time;", end=" ")
    print(f"front end {frontend:.0f} s, codegen {codegen:.0f} s")
    print(f"{'seconds':>8} {'front':>7} {'codegen':>8}  unit")
    for (name, target), (seconds, f, c) in sorted(table.items(), key=lambda item: -item[1][0])[:top]:
        print(f"{seconds:8.1f} {f:7.1f} {c:8.1f}  {name} {target}")
    families = collections.Counter()
    for (name, _), (seconds, _, _) in table.items():
        families[name.split("-")[0]] += seconds
    print("by family: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in families.most_common(12)))


def compare(old_path, new_path, top):
    old, new = units(old_path), units(new_path)
    old_total = sum(s for s, _, _ in old.values())
    new_total = sum(s for s, _, _ in new.values())
    print(f"crate time {old_total:.0f} s -> {new_total:.0f} s")
    print(f"{'old':>8} {'new':>8} {'change':>8}  unit")
    keys = sorted(set(old) | set(new), key=lambda key: -abs(new.get(key, (0,))[0] - old.get(key, (0,))[0]))
    for key in keys[:top]:
        before, after = old.get(key, (0.0,))[0], new.get(key, (0.0,))[0]
        print(f"{before:8.1f} {after:8.1f} {after - before:+8.1f}  {key[0]} {key[1]}")


def main(args):
    reports = [arg for arg in args if arg.endswith(".html")]
    rest = [arg for arg in args if not arg.endswith(".html")]
    if len(reports) not in (1, 2) or len(rest) > 1 or (rest and not rest[0].isdigit()):
        sys.exit(__doc__)
    top = int(rest[0]) if rest else 30
    if len(reports) == 1:
        summary(reports[0], top)
    else:
        compare(reports[0], reports[1], top)


if __name__ == "__main__":
    main(sys.argv[1:])
