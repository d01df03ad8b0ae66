"""The btrfsdrv main job on real data: a layer store on a loopback btrfs.

Run as root: ``sudo make demo``.  The demo makes a btrfs in a sparse file
under a temporary directory and fills a base layer with the running Python's
standard library.  It stacks size-limited snapshot layers on it and writes
into one until its qgroup limit stops the write with EDQUOT.  Then it prints
status, usage and timings, removes every layer and tears the filesystem down.  It leaves no
mount and no loop device behind, also when interrupted with Ctrl-C or SIGTERM.
"""

import errno
import os
import shutil
import signal
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import btrfsdrv  # noqa: E402
from loopback import temporary_loopback_btrfs  # noqa: E402

# Each layer may grow this much past what its snapshot shares with the base:
# a qgroup limit counts referenced bytes, shared extents included.
LAYER_HEADROOM = 64 * 1024**2


class Timer:
    """Print how long each step of the demo took."""

    def __init__(self):
        self.steps = []

    def step(self, title, function, *args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        elapsed = time.perf_counter() - start
        self.steps.append((title, elapsed))
        print(f"  {elapsed * 1000:9.1f} ms  {title}")
        return result


def copy_standard_library(destination):
    """Copy the running Python's standard library (no site-packages) into destination."""
    source = sysconfig.get_paths()["stdlib"]
    ignore = shutil.ignore_patterns("site-packages", "dist-packages")
    shutil.copytree(source, os.path.join(destination, "usr", "lib", "python3"), symlinks=True, ignore=ignore)


def fill_until_quota(directory, maximum):
    """Write 1 MiB chunks until the kernel refuses; return (bytes written, errno)."""
    chunk = b"\xa5" * 1024**2
    written = 0
    with open(os.path.join(directory, "fill.bin"), "wb") as output:
        try:
            while written < maximum:
                output.write(chunk)
                output.flush()
                os.fsync(output.fileno())
                written += len(chunk)
        except OSError as error:
            return written, error.errno
    return written, None


def run_demo(filesystem):
    timer = Timer()
    home = filesystem.path("store")
    print(f"loopback btrfs on {filesystem.device}, mounted at {filesystem.mountpoint}")

    with btrfsdrv.Driver(home, ["btrfs.min_space=16m"]) as driver:
        timer.step("create base layer", driver.create, "base")
        base = driver.get("base")
        os.chmod(base, 0o755)
        timer.step("fill base layer with the Python standard library", copy_standard_library, base)

        base_usage = timer.step("measure the base layer", driver.read_write_disk_usage, "base")
        print(f"             {base_usage.size / 1024**2:.1f} MiB in {base_usage.inode_count} inodes")
        limit = base_usage.size + LAYER_HEADROOM
        parent = "base"
        for index in range(1, 4):
            layer = f"app{index}"
            timer.step(f"snapshot {parent} into {layer} with a {limit / 1024**2:.0f} MiB limit",
                       driver.create, layer, parent, storage_opt={"size": str(limit)})
            with open(os.path.join(driver.get(layer), f"layer{index}.txt"), "w") as marker:
                marker.write(f"written in {layer}\n")
            parent = layer
        timer.step("create container layer on app3", driver.create_read_write, "container", "app3",
                   storage_opt={"size": str(limit)})

        container = driver.get("container")
        written, error = timer.step("write into the container layer until its limit",
                                    fill_until_quota, container, 4 * limit)
        outcome = errno.errorcode.get(error, "no error") if error else "no error"
        print(f"             wrote {written // 1024**2} MiB, then the kernel returned {outcome}")
        print("             (the limit counts referenced bytes: data shared with the base, the new")
        print("             file and the metadata that describes them)")
        if error != errno.EDQUOT:
            raise SystemExit(f"demo failed: expected EDQUOT from the size limit, got {outcome}")

        print("\nstatus:")
        for key, value in driver.status():
            print(f"  {key:16} {value}")

        print("\nper-layer usage:")
        for layer in driver.list_layers():
            usage = timer.step(f"usage of {layer}", driver.read_write_disk_usage, layer)
            size_limit = driver.metadata(layer).get("SizeLimit")
            limit_text = f"{int(size_limit) / 1024**2:.1f} MiB" if size_limit else "none"
            print(f"             {usage.size / 1024**2:8.1f} MiB in {usage.inode_count} inodes, "
                  f"limit {limit_text}")

        print("\nremoving layers, children first:")
        for layer in ["container", "app3", "app2", "app1", "base"]:
            timer.step(f"remove {layer}", driver.remove, layer)
        print(f"\nlayers left: {driver.list_layers()}")

    total = sum(elapsed for _, elapsed in timer.steps)
    print(f"total time in steps: {total:.2f} s")


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    if os.geteuid() != 0:
        raise SystemExit("the demo needs root for loop devices and mounts: run sudo make demo")
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    signal.signal(signal.SIGHUP, raise_keyboard_interrupt)
    filesystem = temporary_loopback_btrfs()
    try:
        run_demo(filesystem)
    except KeyboardInterrupt:
        print("\ninterrupted; tearing down the loopback filesystem", file=sys.stderr)
        return 130
    finally:
        filesystem.teardown()
        shutil.rmtree(filesystem.directory, ignore_errors=True)
        print(f"torn down {filesystem.mountpoint} and its loop device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
