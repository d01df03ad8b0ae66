"""Timed loops of libbtrfsutil's Python bindings, the C reference of bench/run.py.

Debian builds python3-btrfsutil for its own interpreter (/usr/bin/python3),
so bench/run.py starts this script there.  The script times the whole loop
itself and prints the elapsed seconds as JSON, so interpreter start-up is not
part of the measurement.

    /usr/bin/python3 bench/btrfsutil_peer.py snapshot-cycle SOURCE DIRECTORY COUNT
"""

import json
import os
import sys
import time

import btrfsutil


def snapshot_cycle(source: str, directory: str, count: int) -> float:
    """Snapshot source into directory and delete the snapshot, count times."""
    targets = [os.path.join(directory, f"btrfsutil-{index}") for index in range(count)]
    start = time.perf_counter()
    for target in targets:
        btrfsutil.create_snapshot(source, target)
        btrfsutil.delete_subvolume(target)
    return time.perf_counter() - start


def main() -> int:
    if len(sys.argv) != 5 or sys.argv[1] != "snapshot-cycle":
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    seconds = snapshot_cycle(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
