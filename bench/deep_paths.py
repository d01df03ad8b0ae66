"""Time the layer operations that walk deeply nested directories and subvolumes.

Run as root from the repository root:

    python3 bench/deep_paths.py                      # this checkout, 3,000 levels
    python3 bench/deep_paths.py --module-dir OTHER   # the btrfsdrv.py of another checkout

The parent layer is a chain a/a/.../a of --depth directories. Its child, a
snapshot, gets a new file at every level, so every directory of the chain
differs and the fast path of changes compares each one. apply_diff applies
two gzip tars of the same depth into fresh layers: one goes down the chain
and back up, one alternates between two chains. Then a layer gets
--subvolumes subvolumes in the directory at the bottom of a chain of
--depth directories, and another layer a chain of --subvolumes subvolumes,
each inside the one before: apply_diff applies an empty tar to the first,
and remove deletes each (a new layer every round). Last, a layer gets a
chain a/a/.../a of --walk-depth directories, and read_write_disk_usage and
update_layer_id_map walk it (the remap moves the owners to another range
and back in turns). Each operation runs
--rounds times, and the median wall time is printed as one JSON object per
operation. The loopback btrfs is made in a new temporary directory and torn
down at the end.
"""

import argparse
import gzip
import io
import itertools
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPOSITORY, "tools"))

from loopback import LoopbackBtrfs, mounts_below  # noqa: E402


def make_chain(root, depth, file_name=None):
    """Nest depth directories named "a" below root, with file_name at every level when given."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            if file_name is not None:
                os.close(os.open(file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd))
            os.mkdir("a", dir_fd=fd)
            child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def add_to_chain(root, depth, file_name):
    """Add file_name at every level of the chain below root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.close(os.open(file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd))
            child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def tar_entry(name, directory):
    info = tarfile.TarInfo(name)
    info.mtime = 1_600_000_000
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


def gzip_tar(entries):
    """Return a gzip-compressed PAX tar of (name, is_directory) entries, all files empty."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, directory in entries:
            tar.addfile(tar_entry(name, directory))
    return gzip.compress(buffer.getvalue())


def down_and_up_entries(depth):
    """Return directories down the chain, then a file at every level from the bottom back up."""
    entries = [("a/" * level, True) for level in range(1, depth + 1)]
    entries += [("a/" * level + "f", False) for level in range(depth, 0, -1)]
    return entries


def alternating_entries(depth):
    """Return one level of chain x, then one of chain y, and so on, each with a file."""
    entries = []
    for level in range(depth):
        for top in ("x/", "y/"):
            entries.append((top + "a/" * level, True))
            entries.append((top + "a/" * level + "f", False))
    return entries


def make_deep_subvolumes(btrfsdrv, root, depth, count):
    """Create count subvolumes in the directory at the bottom of a chain of depth directories below root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        for index in range(count):
            btrfsdrv._subvolume_create_at(fd, b"s%d" % index, root)
    finally:
        os.close(fd)


def make_subvolume_chain(btrfsdrv, root, count):
    """Create count subvolumes below root, each inside the one before."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(count):
            btrfsdrv._subvolume_create_at(fd, b"s", root)
            child = os.open("s", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def median_seconds(function, rounds, setup=None):
    """Return the median and all wall times of rounds calls of function. setup runs untimed before each call."""
    samples = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def drain(stream):
    with stream:
        while stream.read(1 << 20):
            pass


def run(btrfsdrv, fs, depth, subvolumes, walk_depth, rounds):
    results = []

    def report(operation, function, detail="", setup=None, levels=depth):
        median, samples = median_seconds(function, rounds, setup)
        row = {"operation": operation, "depth": levels, "median_s": round(median, 4),
               "samples_s": [round(sample, 4) for sample in samples], "detail": detail}
        print(json.dumps(row), flush=True)
        results.append(row)

    with btrfsdrv.Driver(fs.path("home")) as driver:
        driver.create("parent")
        make_chain(driver.get("parent"), depth)
        driver.create("child", "parent")
        add_to_chain(driver.get("child"), depth, "new")
        os.sync()
        changes = driver.changes("child", "parent")
        detail = f"{len(changes):,} changes"
        report("changes (fast path)", lambda: driver.changes("child", "parent"), detail)
        report("diff_size (fast path)", lambda: driver.diff_size("child", "parent"), detail)
        report("diff (fast path)", lambda: drain(driver.diff("child", "parent")), detail)
        report("changes (full walk)",
               lambda: btrfsdrv.layer_changes(driver.get("child"), driver.get("parent")), detail)

        layers = iter(range(10**9))
        for label, entries in (("down and up", down_and_up_entries(depth)),
                               ("two alternating chains", alternating_entries(depth))):
            raw = gzip_tar(entries)

            def apply_layer(raw=raw):
                layer = f"applied-{next(layers)}"
                driver.create(layer)
                driver.apply_diff(layer, io.BytesIO(raw))

            report(f"apply_diff ({label})", apply_layer,
                   f"{len(entries):,} entries, {len(raw):,} bytes of gzip")

        run_nested_subvolumes(btrfsdrv, driver, depth, subvolumes, report)
        run_deep_walks(btrfsdrv, driver, walk_depth, report)
    return results


def run_nested_subvolumes(btrfsdrv, driver, depth, subvolumes, report):
    """Time apply_diff of an empty tar and remove on layers with many nested subvolumes."""
    deep = f"{subvolumes:,} subvolumes at depth {depth:,}"
    chain = f"chain of {subvolumes:,} subvolumes"
    driver.create("nested")
    make_deep_subvolumes(btrfsdrv, driver.get("nested"), depth, subvolumes)
    empty_tar = gzip_tar([])
    report("apply_diff (empty tar, nested subvolumes)",
           lambda: driver.apply_diff("nested", io.BytesIO(empty_tar)), deep)
    driver.remove("nested")

    layer_names = (f"nested-{index}" for index in itertools.count())
    pending = []  # the layer that the next timed remove deletes

    def make_layer(build):
        name = next(layer_names)
        driver.create(name)
        build(driver.get(name))
        pending.append(name)

    def remove_layer():
        driver.remove(pending.pop())

    report("remove (nested subvolumes)", remove_layer, deep,
           setup=lambda: make_layer(lambda root: make_deep_subvolumes(btrfsdrv, root, depth, subvolumes)))
    report("remove (chain of subvolumes)", remove_layer, chain,
           setup=lambda: make_layer(lambda root: make_subvolume_chain(btrfsdrv, root, subvolumes)))


def run_deep_walks(btrfsdrv, driver, walk_depth, report):
    """Time read_write_disk_usage and update_layer_id_map on a chain of walk_depth directories."""
    detail = f"chain of {walk_depth:,} directories"
    driver.create("walked")
    make_chain(driver.get("walked"), walk_depth)
    shifted = [btrfsdrv.IDMap(0, 100_000, 65_536)]
    remaps = itertools.cycle([(None, (shifted, shifted)), ((shifted, shifted), None)])

    def remap():
        to_container, to_host = next(remaps)
        driver.update_layer_id_map("walked", to_container, to_host)

    report("read_write_disk_usage (deep chain)", lambda: driver.read_write_disk_usage("walked"), detail,
           levels=walk_depth)
    report("update_layer_id_map (deep chain)", remap, detail, levels=walk_depth)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3000, help="levels of the chain (default 3000)")
    parser.add_argument("--subvolumes", type=int, default=1000,
                        help="nested subvolumes of the remove and apply_diff layers (default 1000)")
    parser.add_argument("--walk-depth", type=int, default=20000,
                        help="levels of the chain that read_write_disk_usage and update_layer_id_map walk "
                             "(default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each operation (default 3)")
    parser.add_argument("--module-dir", default=REPOSITORY,
                        help="directory whose btrfsdrv.py is measured (default: this checkout)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/deep_paths.py: run as root: it mounts a loopback btrfs", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.abspath(args.module_dir))
    import btrfsdrv

    print(json.dumps({"module": btrfsdrv.__file__, "kernel": os.uname().release,
                      "python": sys.version.split()[0]}), flush=True)
    work = tempfile.mkdtemp(prefix="btrfsdrv-deep-")
    fs = LoopbackBtrfs(work, size=4 * 1024**3)
    try:
        run(btrfsdrv, fs, args.depth, args.subvolumes, args.walk_depth, args.rounds)
    finally:
        # Unmounting drops the deep trees, which shutil.rmtree could not remove.
        fs.teardown()
        left = mounts_below(work)
        if left:
            print(f"bench/deep_paths.py: kept {work}: {left[0]} is still mounted", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
