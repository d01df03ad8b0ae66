"""Time layer diff operations against GNU tar on a loopback btrfs.

Run as root from the repository root: python3 bench/diffs.py [DEB]...
Each DEB's data tarball is applied with Driver.apply_diff and extracted with
"tar -x --xattrs", both onto the same btrfs, and then diffed and applied
again. Then changes() is timed on a large layer with few changes, and the peak
Python memory of apply_diff, diff and changes on layers of growing size
is traced. Results are printed and written to bench/results.json.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import btrfsdrv  # noqa: E402

from test_btrfsdrv import LoopbackBtrfs  # noqa: E402


def timed(function, repeat=3):
    """Return the best wall time of repeat calls, in seconds, and the last result."""
    best = None
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def bench_package(driver, fs, deb, work):
    name = os.path.basename(deb).split("_")[0]
    layer_tar = os.path.join(work, name + ".tar")
    with open(layer_tar, "wb") as out:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], stdout=out, check=True)
    count = int(subprocess.run(f"tar -tf {layer_tar} | wc -l", shell=True, stdout=subprocess.PIPE,
                               check=True).stdout)
    runs = {"n": 0}

    def apply_layer():
        runs["n"] += 1
        layer_id = f"{name}-{runs['n']}"
        driver.create(layer_id)
        with open(layer_tar, "rb") as stream:
            driver.apply_diff(layer_id, stream)
        os.sync()
        return layer_id

    def gnu_tar():
        runs["n"] += 1
        target = fs.path(f"tar-{name}-{runs['n']}")
        os.mkdir(target)
        subprocess.run(["tar", "-x", "--xattrs", "-f", layer_tar, "-C", target], check=True)
        os.sync()

    apply_seconds, layer_id = timed(apply_layer)
    tar_seconds, _ = timed(gnu_tar)
    diff_seconds, _ = timed(lambda: _drain(driver.diff(layer_id)))
    changes_seconds, changes = timed(lambda: driver.changes(layer_id))
    return {"package": name, "entries": count, "tar_bytes": os.path.getsize(layer_tar),
            "apply_diff_s": round(apply_seconds, 4), "gnu_tar_x_s": round(tar_seconds, 4),
            "diff_s": round(diff_seconds, 4), "changes_full_s": round(changes_seconds, 4),
            "changes": len(changes)}


def _drain(stream):
    with stream:
        while stream.read(1 << 20):
            pass


def bench_few_changes(driver, files, changed):
    driver.create("big")
    root = driver.get("big")
    for index in range(files):
        directory = os.path.join(root, f"d{index // 1000:03d}")
        if index % 1000 == 0:
            os.mkdir(directory)
        with open(os.path.join(directory, f"f{index}"), "wb") as out:
            out.write(b"x")
    driver.create("big-upper", "big")
    upper = driver.get("big-upper")
    for index in range(changed):
        with open(os.path.join(upper, f"d{index:03d}", f"f{index * 1000}"), "ab") as out:
            out.write(b"changed")
    os.sync()
    walk_seconds, walk = timed(lambda: btrfsdrv.layer_changes(upper, root))
    seconds, result = timed(lambda: driver.changes("big-upper", "big"))
    assert result == walk, "fast path and full walk differ"
    return {"files": files, "changed": changed, "changes": len(result),
            "full_walk_s": round(walk_seconds, 4), "driver_changes_s": round(seconds, 4),
            "speedup": round(walk_seconds / seconds, 1)}


def bench_memory(driver, work, counts=(10000, 100000)):
    """Return the peak Python memory of apply_diff, diff and changes for growing layers."""
    import io
    import tarfile
    import tracemalloc

    rows = []
    for count in counts:
        path = os.path.join(work, f"flat-{count}.tar")
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for index in range(count):
                if index % 100 == 0:
                    directory = tarfile.TarInfo(f"d{index // 100}")
                    directory.type = tarfile.DIRTYPE
                    directory.mode = 0o755
                    tar.addfile(directory)
                info = tarfile.TarInfo(f"d{index // 100}/f{index}")
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
        layer, upper = f"flat-{count}", f"flat-upper-{count}"
        driver.create(layer)
        row = {"entries": count}
        tracemalloc.start()
        with open(path, "rb") as stream:
            driver.apply_diff(layer, stream)
        row["apply_diff_peak_kib"] = tracemalloc.get_traced_memory()[1] // 1024
        tracemalloc.stop()
        tracemalloc.start()
        _drain(driver.diff(layer))
        row["diff_peak_kib"] = tracemalloc.get_traced_memory()[1] // 1024
        tracemalloc.stop()
        driver.create(upper, layer)
        with open(os.path.join(driver.get(upper), "d3", "new"), "wb"):
            pass
        tracemalloc.start()
        btrfsdrv.layer_changes(driver.get(upper), driver.get(layer))
        row["changes_full_walk_peak_kib"] = tracemalloc.get_traced_memory()[1] // 1024
        tracemalloc.stop()
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("debs", nargs="*", help="Debian packages (default: .cache/debs/*.deb)")
    parser.add_argument("--files", type=int, default=100000, help="files in the large layer")
    parser.add_argument("--changed", type=int, default=10, help="files changed in its child")
    args = parser.parse_args()
    debs = args.debs or sorted(glob.glob(".cache/debs/*.deb"))
    work = tempfile.mkdtemp(prefix="btrfsdrv-bench-")
    fs = LoopbackBtrfs(work, size=8 * 1024**3)
    results = {"kernel": os.uname().release, "python": sys.version.split()[0], "cpus": os.cpu_count(),
               "packages": [], "few_changes": None}
    try:
        with btrfsdrv.Driver(fs.path("home")) as driver:
            for deb in debs:
                results["packages"].append(bench_package(driver, fs, deb, work))
                print(json.dumps(results["packages"][-1]))
            results["few_changes"] = bench_few_changes(driver, args.files, args.changed)
            print(json.dumps(results["few_changes"]))
            results["memory"] = bench_memory(driver, work)
            for row in results["memory"]:
                print(json.dumps(row))
    finally:
        fs.teardown()
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"), "w") as out:
        json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
