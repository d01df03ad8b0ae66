"""A btrfs filesystem in a sparse image on a loop device, for the demo and benchmarks.

Teardown unmounts only mounts at or below its own mount point and detaches
only the loop device that ``losetup --find --show`` returned for its image.
"""

import os
import subprocess
import tempfile


def mounts_below(directory):
    """Return the mount points at or below directory, deepest first."""
    directory = os.path.realpath(directory)
    points = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            field = line.split()[4]
            point = os.fsdecode(field.replace(b"\\040", b" ").replace(b"\\011", b"\t")
                                .replace(b"\\012", b"\n").replace(b"\\134", b"\\"))
            if point == directory or point.startswith(directory + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


class LoopbackBtrfs:
    """Make, mount and tear down one loopback btrfs below directory."""

    def __init__(self, directory, size=2 * 1024**3, mount_options=(), mkfs_options=()):
        self.directory = str(directory)
        self.image = os.path.join(self.directory, "btrfs.img")
        self.mountpoint = os.path.join(self.directory, "mnt")
        self.mount_options = tuple(mount_options)
        self.device = None
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.image, "wb") as image:
            image.truncate(size)
        subprocess.run(["mkfs.btrfs", "-q", "-f", *mkfs_options, self.image], check=True, capture_output=True)
        self.device = subprocess.run(
            ["losetup", "--find", "--show", self.image], check=True, capture_output=True, text=True,
        ).stdout.strip()
        try:
            self.mount()
        except BaseException:
            self.teardown()
            raise

    def mount(self, options=None):
        options = self.mount_options if options is None else tuple(options)
        command = ["mount", "-t", "btrfs"]
        if options:
            command += ["-o", ",".join(options)]
        subprocess.run(command + [self.device, self.mountpoint], check=True, capture_output=True)

    def remount(self, options=None):
        """Unmount everything below the mount point and mount the filesystem again."""
        self.unmount_all()
        self.mount(options)

    def unmount_all(self):
        for point in mounts_below(self.mountpoint):
            subprocess.run(["umount", point], check=False, capture_output=True)
        for point in mounts_below(self.mountpoint):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    def teardown(self):
        self.unmount_all()
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False, capture_output=True)
            self.device = None

    def btrfs(self, *args):
        """Run the btrfs CLI and return its standard output."""
        return subprocess.run(["btrfs", *args], check=True, capture_output=True, text=True).stdout

    def path(self, *parts):
        return os.path.join(self.mountpoint, *parts)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.teardown()


def temporary_loopback_btrfs(**options):
    """Return a LoopbackBtrfs in a new temporary directory; the caller tears it down."""
    return LoopbackBtrfs(tempfile.mkdtemp(prefix="btrfsdrv-"), **options)
