"""Tests for btrfsdrv and ioctl_structs, on real loopback btrfs filesystems.

Kernel tests need root, btrfs in the kernel, loop devices and mkfs.btrfs.
Without them they skip with the reason, except when CI=true: a CI run that
tests nothing real fails instead.

Set BTRFSDRV_PATH to a directory to import btrfsdrv from there (the vendored
single file in dist/ is tested that way).
"""

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import uuid

import pytest

_IMPORT_DIR = os.environ.get("BTRFSDRV_PATH")
if _IMPORT_DIR:
    sys.path.insert(0, os.path.abspath(_IMPORT_DIR))

import btrfsdrv  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"
IMAGE_SIZE = 2 * 1024**3


# -- Fixtures: loopback btrfs filesystems ------------------------------------


def _kernel_test_obstacle():
    """Return why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "kernel tests need root (loop devices and mount)"
    with open("/proc/filesystems") as filesystems:
        if not any(line.split()[-1] == "btrfs" for line in filesystems if line.strip()):
            return "btrfs is not in /proc/filesystems (modprobe btrfs)"
    for tool in ("mkfs.btrfs", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y btrfs-progs)"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing, so no loop device can be attached"
    return None


def require_kernel():
    """Skip the calling test when kernel tests cannot run; fail instead in CI."""
    obstacle = _kernel_test_obstacle()
    if obstacle is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but kernel tests cannot run: {obstacle}")
    pytest.skip(obstacle)


def _mounts_below(directory):
    """Return the mount points at or below directory, deepest first."""
    directory = os.path.realpath(directory)
    points = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            point = os.fsdecode(btrfsdrv._unescape_mountinfo(line.split()[4]))
            if point == directory or point.startswith(directory + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


class LoopbackBtrfs:
    """A btrfs filesystem in a sparse image, attached to a loop device and mounted.

    Teardown unmounts only mounts at or below its own mount point and detaches
    only the loop device that losetup returned for its image.
    """

    def __init__(self, directory, size=IMAGE_SIZE, mount_options=(), mkfs_options=()):
        self.directory = str(directory)
        self.image = os.path.join(self.directory, "btrfs.img")
        self.mountpoint = os.path.join(self.directory, "mnt")
        self.mount_options = tuple(mount_options)
        self.device = None
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.image, "wb") as image:
            image.truncate(size)
        subprocess.run(
            ["mkfs.btrfs", "-q", "-f", *mkfs_options, self.image],
            check=True, capture_output=True,
        )
        self.device = subprocess.run(
            ["losetup", "--find", "--show", self.image],
            check=True, capture_output=True, text=True,
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
        for point in _mounts_below(self.mountpoint):
            subprocess.run(["umount", point], check=False, capture_output=True)
        for point in _mounts_below(self.mountpoint):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    def teardown(self):
        self.unmount_all()
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False, capture_output=True)
            self.device = None

    def btrfs(self, *args):
        """Run the btrfs CLI and return its standard output."""
        return subprocess.run(
            ["btrfs", *args], check=True, capture_output=True, text=True,
        ).stdout

    def path(self, *parts):
        return os.path.join(self.mountpoint, *parts)


@contextlib.contextmanager
def loopback_btrfs(directory, **options):
    require_kernel()
    filesystem = LoopbackBtrfs(directory, **options)
    try:
        yield filesystem
    finally:
        filesystem.teardown()


@pytest.fixture
def fs(tmp_path):
    """A fresh loopback btrfs for one test."""
    with loopback_btrfs(tmp_path) as filesystem:
        yield filesystem


@pytest.fixture
def home(fs):
    """A driver home directory on a fresh btrfs; the test makes the Driver."""
    return fs.path("home")


@pytest.fixture
def driver(home):
    """A Driver on a fresh btrfs, cleaned up after the test."""
    with btrfsdrv.Driver(home) as layer_driver:
        yield layer_driver


def unique_id(prefix="layer"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- Kernel interface (ioctl_structs) -----------------------------------------


# -- Driver core ---------------------------------------------------------------


# -- Layer diffs ---------------------------------------------------------------


# -- Hardening -----------------------------------------------------------------


# -- Vendoring, packaging and interoperation ------------------------------------


# -- Performance fast paths ---------------------------------------------------

# Nested subvolumes below a top subvolume, at depths 1 to 4, two of them
# inside another nested subvolume.
NESTED_TREE = (b"n1", b"d1/n2", b"d1/d2/d3/n3", b"n1/e1/n4", b"n1/e1/n4/n5")


def make_nested_tree(top):
    """Create a subvolume at top with NESTED_TREE below it and a few plain files."""
    btrfsdrv.create_subvolume(top)
    for relative in NESTED_TREE:
        directory = os.path.join(os.fsencode(top), relative)
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        btrfsdrv.create_subvolume(directory)
        with open(os.path.join(os.path.dirname(directory), b"file"), "wb") as plain:
            plain.write(b"data")


def nested_paths(found):
    return sorted(subvolume.path for subvolume in found)


@contextlib.contextmanager
def open_top(top):
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd, btrfsdrv._subvolume_id_of_fd(fd, top)
    finally:
        os.close(fd)


def test_nested_search_methods_agree(fs):
    top = fs.path("top")
    make_nested_tree(top)

    with open_top(top) as (fd, top_id):
        privileged = btrfsdrv._find_nested_privileged(fd, top_id, top)
        unprivileged = btrfsdrv._find_nested_unprivileged(fd, top_id, top)
        walked = btrfsdrv._find_nested_by_walk(fd, top_id, top)
        walked_paths = btrfsdrv.find_nested_subvolumes_by_walk(fd)

    assert nested_paths(privileged) == sorted(NESTED_TREE)
    assert sorted(unprivileged) == sorted(privileged)
    assert sorted(walked) == sorted(privileged)
    assert sorted(walked_paths) == sorted(NESTED_TREE)


def test_nested_search_lists_parents_first(fs):
    top = fs.path("top")
    make_nested_tree(top)

    with open_top(top) as (fd, top_id):
        found = btrfsdrv.find_nested_subvolumes(fd, top_id, top)

    position = {subvolume.id: index for index, subvolume in enumerate(found)}
    for subvolume in found:
        if subvolume.parent_id != top_id:
            assert position[subvolume.parent_id] < position[subvolume.id]


def test_nested_search_as_unprivileged_user(fs):
    nobody = 65534
    top = fs.path("top")
    make_nested_tree(top)
    for directory, subdirectories, files in os.walk(top):
        for name in [directory] + [os.path.join(directory, entry) for entry in subdirectories + files]:
            os.lchown(name, nobody, nobody)

    with open_top(top) as (fd, top_id):
        expected = sorted(btrfsdrv._find_nested_privileged(fd, top_id, top))
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            status = 1
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(nobody)
                os.setuid(nobody)
                found = btrfsdrv.find_nested_subvolumes(fd, top_id, top)
                os.write(write_end, repr(sorted(tuple(subvolume) for subvolume in found)).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as output:
            reported = output.read().decode()
        _, status = os.waitpid(child, 0)

    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    assert reported == repr([tuple(subvolume) for subvolume in expected])


def test_nested_search_falls_back_to_walk(fs, monkeypatch):
    top = fs.path("top")
    make_nested_tree(top)

    def unprivileged(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    def unsupported(*args):
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    with open_top(top) as (fd, top_id):
        expected = sorted(btrfsdrv._find_nested_privileged(fd, top_id, top))
        monkeypatch.setattr(btrfsdrv, "_find_nested_privileged", unprivileged)
        monkeypatch.setattr(btrfsdrv, "_find_nested_unprivileged", unsupported)
        found = btrfsdrv.find_nested_subvolumes(fd, top_id, top)

    assert sorted(found) == expected


def test_remove_reads_no_layer_directory(driver, monkeypatch):
    driver.create("base")
    make_nested_tree(os.path.join(driver.get("base"), "top"))
    os.makedirs(os.path.join(driver.get("base"), "plain", "deeper"))

    def walk(*args):
        raise AssertionError("remove walked the layer's directories")

    monkeypatch.setattr(btrfsdrv, "_walk_directories", walk)
    driver.remove("base")

    assert not driver.exists("base")


def test_snapshot_of_layer_keeps_parent_mode(driver):
    driver.create("empty")
    driver.create("full", "empty")
    os.chmod(driver.get("full"), 0o755)
    with open(os.path.join(driver.get("full"), "file"), "wb"):
        pass
    driver.create("child", "full")

    assert stat_mode(driver.get("empty")) == 0o555
    assert stat_mode(driver.get("child")) == 0o755


def stat_mode(path):
    return os.stat(path).st_mode & 0o7777


def test_mount_table_follows_mounts(fs):
    target = fs.path("target")
    os.mkdir(target)
    before = btrfsdrv._read_mountinfo()

    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    try:
        mounted = btrfsdrv._read_mountinfo()
    finally:
        subprocess.run(["umount", target], check=True)
    after = btrfsdrv._read_mountinfo()

    point = os.fsencode(os.path.realpath(target))
    assert point not in [mount.mount_point for mount in before]
    assert point in [mount.mount_point for mount in mounted]
    assert point not in [mount.mount_point for mount in after]


def test_get_turns_quota_back_on(fs, driver):
    driver.create("limited", storage_opt={"size": "64M"})
    fs.btrfs("quota", "disable", fs.mountpoint)

    driver.get("limited")

    with open_top(driver.get("limited")) as (fd, subvolume):
        assert btrfsdrv.quota_enabled(fd)
        assert btrfsdrv._qgroup_limit(fd, subvolume, None) == 64 * 1024**2


def test_remove_with_quota_off_keeps_quota_off(driver):
    driver.create("plain")
    driver.remove("plain")

    with open_top(driver.home) as (fd, _):
        assert not btrfsdrv.quota_enabled(fd)


def test_simple_quota_mode_enables_squota(home):
    try:
        driver = btrfsdrv.Driver(home, ["btrfs.quota_mode=simple", "btrfs.size=1M"])
    except btrfsdrv.PrerequisiteError as error:
        pytest.skip(str(error))
    with driver:
        driver.create_read_write("container")
        path = driver.get("container")
        with open_top(path) as (fd, _):
            status = btrfsdrv._quota_status(fd, path)
            fsid = btrfsdrv._format_uuid(btrfsdrv._fs_info(fd, path).fsid)

        assert status.flags & btrfsdrv._structs.BTRFS_QGROUP_STATUS_FLAG_ON
        assert status.flags & btrfsdrv._structs.BTRFS_QGROUP_STATUS_FLAG_SIMPLE_MODE
        with open(f"/sys/fs/btrfs/{fsid}/qgroups/mode") as mode:
            assert mode.read().strip() == "squota"
        with pytest.raises(OSError) as raised:
            with open(os.path.join(path, "big"), "wb") as big:
                for _ in range(4):
                    big.write(b"x" * 1024**2)
                    big.flush()
                    os.fsync(big.fileno())
        assert raised.value.errno == errno.EDQUOT


def test_create_writes_quota_file(driver):
    driver.create("limited", storage_opt={"size": "64M"})

    with open(os.path.join(driver.home, "quotas", "limited"), "rb") as quota_file:
        assert quota_file.read() == str(64 * 1024**2).encode()
    assert [name for name in os.listdir(os.path.join(driver.home, "quotas")) if name.startswith(".")] == []


def test_create_drops_stale_quota_file(driver):
    os.makedirs(os.path.join(driver.home, "quotas"), exist_ok=True)
    stale = os.path.join(driver.home, "quotas", "plain")
    with open(stale, "wb") as quota_file:
        quota_file.write(b"1048576")

    driver.create("plain")

    assert not os.path.exists(stale)


def test_failed_create_leaves_no_quota_file(driver):
    with pytest.raises(FileNotFoundError):
        driver.create("orphan", "missing-parent", storage_opt={"size": "64M"})

    assert not os.path.exists(os.path.join(driver.home, "quotas", "orphan"))
