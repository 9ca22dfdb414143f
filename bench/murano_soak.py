"""Soak run of the Murano flow: `murano-zmq demo` at size, deployments per
second and the relay's peak RSS.  Not for CI.

    python bench/murano_soak.py                 # 200 environments x 5 units
    python bench/murano_soak.py --envs 50 --json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=200)
    parser.add_argument("--units", type=int, default=5)
    parser.add_argument("--chaos", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "murano_zmq", "demo", "--envs", str(args.envs), "--units", str(args.units),
           "--step-seconds", "0.05"] + (["--chaos"] if args.chaos else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600).stdout
    row = {"envs": args.envs, "units": args.units, "chaos": args.chaos, "succeeded": "demo succeeded" in out}
    if m := re.search(r"deployments: (\d+)/(\d+) completed, (exactly once|NOT exactly once)", out):
        row.update(completed=int(m[1]), exactly_once=m[3] == "exactly once")
    if m := re.search(r"time: ([\d.]+)s for all; per deployment p50 ([\d.]+)s, max ([\d.]+)s; ([\d.]+) deployments/s", out):
        row.update(seconds=float(m[1]), p50_s=float(m[2]), max_s=float(m[3]), deployments_per_s=float(m[4]))
    if m := re.search(r"relay peak RSS: ([\d.]+) MB", out):
        row["relay_peak_rss_mb"] = float(m[1])
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        for k, v in row.items():
            print(f"{k:<20} {v}")
    return 0 if row["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
