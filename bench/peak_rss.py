"""Run one btrfsdrv operation and print the process's peak resident set size.

bench/run.py starts this script once per measurement, so each figure is the
high-water mark (VmHWM in /proc/self/status) of a process that did nothing
else.  Output is one JSON object: the peak after importing btrfsdrv and
opening the driver ("baseline_kib") and after the operation ("peak_kib").

    peak_rss.py changes HOME LAYER PARENT
    peak_rss.py changes-walk HOME LAYER PARENT
    peak_rss.py apply HOME LAYER TARBALL
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import btrfsdrv  # noqa: E402


def _peak_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM is missing from /proc/self/status")


def main() -> int:
    if len(sys.argv) != 5 or sys.argv[1] not in ("changes", "changes-walk", "apply"):
        print("\n".join(line.strip() for line in __doc__.strip().splitlines()[-3:]), file=sys.stderr)
        return 2
    operation, home, layer, argument = sys.argv[1:]
    driver = btrfsdrv.Driver(home)
    try:
        baseline = _peak_kib()
        if operation == "changes":
            count = len(driver.changes(layer, argument))
        elif operation == "changes-walk":
            count = len(btrfsdrv.layer_changes(driver.get(layer), driver.get(argument)))
        else:
            with open(argument, "rb") as tarball:
                driver.apply_diff(layer, tarball)
            count = 0
        peak = _peak_kib()
    finally:
        driver.cleanup()
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "changes": count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
