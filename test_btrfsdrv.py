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

import hashlib  # noqa: E402
import io  # noqa: E402
import random  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402

from btrfsdrv import Change, ChangeKind  # noqa: E402

ADD, MODIFY, DELETE = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE

# A version 2 security.capability value granting CAP_NET_BIND_SERVICE (10),
# effective, as struct vfs_cap_data in linux/capability.h lays it out.
CAPABILITY = struct.pack("<IIIII", 0x02000000 | 0x1, 1 << 10, 0, 0, 0)


# Helpers --------------------------------------------------------------------


def write(path, data=b"data", mode=0o644, mtime=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as out:
        out.write(data)
    os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def copy_tree(source, target):
    """Copy a tree like a snapshot would: same names, modes, owners, times, xattrs."""
    subprocess.run(["cp", "-a", "--", source, target], check=True)


def tree_digest(root):
    """Digest names, types, modes, owners, sizes, contents, link targets and mtimes below root."""
    digest = hashlib.sha256()
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            digest.update(os.fsencode(os.path.relpath(path, root)))
            digest.update(b"%o %d %d %d %d" % (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                                st.st_size if not stat.S_ISDIR(st.st_mode) else 0))
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as data:
                    digest.update(data.read())
    return digest.hexdigest()


def make_tar(entries, end=True):
    """Build an uncompressed tar from (TarInfo, data) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    raw = buffer.getvalue()
    if not end:
        raw = raw.rstrip(b"\0")
        raw += b"\0" * (-len(raw) % 512)
    return raw


def entry(name, kind=tarfile.REGTYPE, data=None, linkname="", mode=0o644, mtime=1_600_000_000):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.mtime = mtime
    if data is None and kind == tarfile.REGTYPE:
        data = b""
    return info, data


def apply(layer, raw, **options):
    return btrfsdrv.apply_layer_diff(str(layer), io.BytesIO(raw), **options)


@pytest.fixture
def trees(tmp_path):
    """A layer directory, a sentinel tree beside it, and the sentinel's digest."""
    layer = tmp_path / "layer"
    sentinel = tmp_path / "sentinel"
    layer.mkdir()
    write(str(sentinel / "secret"), b"host data")
    write(str(sentinel / "dir" / "file"), b"more host data")
    return layer, sentinel, tree_digest(str(sentinel))


# Changes on directories -----------------------------------------------------


def test_changes_without_parent_lists_everything(tmp_path):
    write(str(tmp_path / "l" / "a" / "b"))
    write(str(tmp_path / "l" / "c"))
    assert btrfsdrv.layer_changes(str(tmp_path / "l")) == [
        Change("/a", ADD), Change("/a/b", ADD), Change("/c", ADD)]


def test_changes_reports_add_modify_delete(tmp_path):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    write(parent + "/dir/keep", mtime=1000)
    write(parent + "/dir/modify", mtime=1000)
    write(parent + "/dir/gone/deep/file", mtime=1000)
    write(parent + "/top", mtime=1000)
    copy_tree(parent, layer)
    write(layer + "/dir/modify", b"other", mtime=2000)
    shutil.rmtree(layer + "/dir/gone")
    write(layer + "/dir/new/sub/file")
    assert btrfsdrv.layer_changes(layer, parent) == [
        Change("/dir", MODIFY),
        Change("/dir/gone", DELETE),
        Change("/dir/modify", MODIFY),
        Change("/dir/new", ADD),
        Change("/dir/new/sub", ADD),
        Change("/dir/new/sub/file", ADD),
    ]


def test_changes_reports_containing_directory_once(tmp_path):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    write(parent + "/a/b/c/file", mtime=1000)
    copy_tree(parent, layer)
    os.chmod(layer + "/a/b/c/file", 0o600)
    assert btrfsdrv.layer_changes(layer, parent) == [
        Change("/a", MODIFY), Change("/a/b", MODIFY), Change("/a/b/c", MODIFY),
        Change("/a/b/c/file", MODIFY)]


def test_changes_sorts_by_whole_path(tmp_path):
    layer = str(tmp_path / "l")
    write(layer + "/a/b")
    write(layer + "/a-c")
    assert [change.path for change in btrfsdrv.layer_changes(layer)] == ["/a", "/a-c", "/a/b"]


@pytest.mark.parametrize("edit", ["mode", "owner", "mtime", "size", "target", "user_xattr", "capability"])
def test_changes_detects_attribute(tmp_path, edit):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    write(parent + "/file", b"1234", mtime=1000)
    os.symlink("abc", parent + "/link")
    copy_tree(parent, layer)
    name = "/link" if edit == "target" else "/file"
    if edit == "mode":
        os.chmod(layer + name, 0o4755)
    elif edit == "owner":
        os.chown(layer + name, 1, 2)
    elif edit == "mtime":
        os.utime(layer + name, (1001, 1001))
    elif edit == "size":
        os.truncate(layer + name, 5)
        os.utime(layer + name, (1000, 1000))
    elif edit == "target":
        mtime = os.lstat(layer + name).st_mtime_ns
        os.unlink(layer + name)
        os.symlink("xyz", layer + name)
        os.utime(layer + name, ns=(mtime, mtime), follow_symlinks=False)
    elif edit == "user_xattr":
        os.setxattr(layer + name, "user.test", b"1")
    elif edit == "capability":
        os.setxattr(layer + name, "security.capability", CAPABILITY)
    assert btrfsdrv.layer_changes(layer, parent) == [Change(name, MODIFY)]


def test_changes_ignores_ctime_and_whole_second_mtime(tmp_path):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    write(parent + "/file", mtime=1000.5)
    copy_tree(parent, layer)
    os.chmod(layer + "/file", 0o644)  # ctime only
    os.utime(layer + "/file", ns=(1000 * 10**9, 1000 * 10**9))  # as a tar would restore it
    assert btrfsdrv.layer_changes(layer, parent) == []


def test_changes_file_replacing_directory_hides_children(tmp_path):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    write(parent + "/x/child")
    write(parent + "/y")
    copy_tree(parent, layer)
    shutil.rmtree(layer + "/x")
    write(layer + "/x")
    os.unlink(layer + "/y")
    write(layer + "/y/child")
    assert btrfsdrv.layer_changes(layer, parent) == [
        Change("/x", MODIFY), Change("/y", MODIFY), Change("/y/child", ADD)]


def test_changes_copes_with_non_utf8_names(tmp_path):
    layer = os.fsencode(str(tmp_path / "l"))
    os.makedirs(layer + b"/d\xff")
    with open(layer + b"/d\xff/f\xfe", "wb"):
        pass
    paths = [os.fsencode(change.path) for change in btrfsdrv.layer_changes(layer)]
    assert paths == [b"/d\xff", b"/d\xff/f\xfe"]


def deep_tree(root):
    """Make a directory chain whose path is longer than PATH_MAX; return its components."""
    parts = ["d" * 200] * 25
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            os.mkdir(part, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    return parts


def test_changes_walks_paths_longer_than_path_max(tmp_path):
    layer = str(tmp_path / "l")
    os.mkdir(layer)
    parts = deep_tree(layer)
    changes = btrfsdrv.layer_changes(layer)
    assert len(changes) == len(parts) + 1
    assert changes[-1].path == "/" + "/".join(parts) + "/file"
    assert len(changes[-1].path) > os.pathconf(layer, "PC_PATH_MAX")


# Diff and apply on directories ----------------------------------------------


def read_diff(layer, parent=None, **options):
    with btrfsdrv.layer_diff(layer, parent, **options) as stream:
        return stream.read()


def members(raw):
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {member.name: member for member in tar}


def test_diff_writes_whiteouts_and_changed_entries(tmp_path):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    write(parent + "/d/old")
    write(parent + "/d/keep")
    copy_tree(parent, layer)
    os.unlink(layer + "/d/old")
    write(layer + "/d/new", b"new")
    found = members(read_diff(layer, parent))
    assert sorted(found) == ["d", "d/.wh.old", "d/new"]
    assert found["d"].isdir()
    assert found["d/new"].size == 3


def test_diff_keeps_hard_links_devices_and_xattrs(tmp_path):
    layer = str(tmp_path / "l")
    write(layer + "/a", b"shared")
    os.link(layer + "/a", layer + "/b")
    os.mknod(layer + "/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(layer + "/fifo")
    os.setxattr(layer + "/a", "security.capability", CAPABILITY)
    os.setxattr(layer + "/a", "user.note", b"\xff\x00x")
    found = members(read_diff(layer))
    assert found["b"].islnk()
    assert found["b"].linkname == "a"
    assert found["null"].ischr()
    assert (found["null"].devmajor, found["null"].devminor) == (1, 3)
    assert found["fifo"].isfifo()
    assert found["a"].pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == CAPABILITY
    assert found["a"].pax_headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape") == b"\xff\x00x"


def test_diff_maps_owners_to_container_ids(tmp_path):
    layer = str(tmp_path / "l")
    write(layer + "/f")
    os.chown(layer + "/f", 100005, 100007)
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    found = members(read_diff(layer, uid_maps=maps, gid_maps=maps))
    assert (found["f"].uid, found["f"].gid) == (5, 7)


def test_diff_close_early_releases(tmp_path):
    layer = str(tmp_path / "l")
    for index in range(200):
        write(layer + "/f%d" % index, os.urandom(64 * 1024))
    released = []
    stream = btrfsdrv.layer_diff(layer, release=lambda: released.append(True))
    stream.read(1000)
    stream.close()
    assert released == [True]


def test_diff_apply_round_trip(tmp_path):
    parent, layer, target = str(tmp_path / "p"), str(tmp_path / "l"), str(tmp_path / "t")
    write(parent + "/etc/passwd", b"root", mtime=1000)
    write(parent + "/etc/gone", mtime=1000)
    write(parent + "/var/lib/x/y", mtime=1000)
    copy_tree(parent, layer)
    copy_tree(parent, target)
    write(layer + "/etc/passwd", b"root\nuser", mode=0o4755)
    os.unlink(layer + "/etc/gone")
    shutil.rmtree(layer + "/var/lib")
    os.symlink("/etc/passwd", layer + "/link")
    write(layer + "/new/dir/file", b"x" * 10000)
    os.link(layer + "/new/dir/file", layer + "/hard")
    os.chown(layer + "/new", 3, 4)
    os.setxattr(layer + "/new/dir/file", "security.capability", CAPABILITY)
    size = apply(target, read_diff(layer, parent))
    assert size == 4 + 5 + 10000
    assert btrfsdrv.layer_changes(target, layer) == []
    assert os.getxattr(target + "/new/dir/file", "security.capability") == CAPABILITY
    assert os.stat(target + "/hard").st_ino == os.stat(target + "/new/dir/file").st_ino


def test_diff_size_counts_hard_links_once(tmp_path):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    os.mkdir(parent)
    copy_tree(parent, layer)
    write(layer + "/a", b"x" * 100)
    os.link(layer + "/a", layer + "/b")
    os.symlink("abc", layer + "/s")
    os.mkdir(layer + "/d")
    assert btrfsdrv.layer_diff_size(layer, parent) == 103


@pytest.mark.parametrize("compress", ["gzip", "bzip2", "xz", "zstd"])
def test_apply_accepts_compressed_streams(tmp_path, compress):
    if shutil.which(compress) is None:
        pytest.skip(f"{compress} is not installed")
    layer = tmp_path / "l"
    layer.mkdir()
    raw = make_tar([entry("dir", tarfile.DIRTYPE, mode=0o755), entry("dir/file", data=b"hello")])
    packed = subprocess.run([compress, "-c"], input=raw, stdout=subprocess.PIPE, check=True).stdout
    assert apply(layer, packed) == 5
    assert (layer / "dir" / "file").read_bytes() == b"hello"


def test_apply_without_libzstd_names_it(tmp_path, monkeypatch):
    import ctypes

    def missing(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    with pytest.raises(OSError, match="libzstd.so.1"):
        apply(tmp_path, b"\x28\xb5\x2f\xfd" + b"\0" * 20)


def test_apply_sets_directory_times_last(tmp_path):
    layer = tmp_path / "l"
    layer.mkdir()
    raw = make_tar([entry("d", tarfile.DIRTYPE, mode=0o755, mtime=1000), entry("d/f", mtime=2000)])
    apply(layer, raw)
    assert os.stat(layer / "d").st_mtime == 1000
    assert os.stat(layer / "d" / "f").st_mtime == 2000


def test_apply_merges_directories_and_replaces_others(tmp_path):
    layer = str(tmp_path / "l")
    write(layer + "/d/keep")
    write(layer + "/f")
    os.mkdir(layer + "/x")
    write(layer + "/x/child")
    raw = make_tar([entry("d", tarfile.DIRTYPE, mode=0o700), entry("f", tarfile.DIRTYPE, mode=0o755),
                    entry("x", tarfile.SYMTYPE, linkname="f")])
    apply(layer, raw)
    assert os.path.exists(layer + "/d/keep")
    assert stat.S_IMODE(os.stat(layer + "/d").st_mode) == 0o700
    assert os.path.isdir(layer + "/f")
    assert os.readlink(layer + "/x") == "f"


def test_apply_whiteouts_remove_entries(tmp_path):
    layer = str(tmp_path / "l")
    write(layer + "/d/gone/deep")
    write(layer + "/d/file")
    raw = make_tar([entry("d/.wh.gone"), entry("d/.wh.file"), entry("d/.wh.missing")])
    apply(layer, raw)
    assert os.listdir(layer + "/d") == []


def test_apply_opaque_directory_keeps_own_entries(tmp_path):
    layer = str(tmp_path / "l")
    write(layer + "/d/old/deep")
    write(layer + "/d/older")
    os.utime(layer + "/d", (1, 1))
    time.sleep(0.01)
    raw = make_tar([entry("d", tarfile.DIRTYPE, mode=0o755), entry("d/new", data=b"n"),
                    entry("d/.wh..wh..opq"), entry("d/later", data=b"l")])
    apply(layer, raw)
    assert sorted(os.listdir(layer + "/d")) == ["later", "new"]


def test_apply_reports_progress(tmp_path):
    layer = tmp_path / "l"
    layer.mkdir()
    calls = []
    raw = make_tar([entry("f%d" % index, data=b"x") for index in range(10)])
    apply(layer, raw, progress=lambda read, applied: calls.append((read, applied)))
    assert calls[-1] == (len(raw), 10)


def test_apply_maps_owners_to_host(tmp_path):
    layer = tmp_path / "l"
    layer.mkdir()
    info, data = entry("f", data=b"x")
    info.uid, info.gid = 5, 7
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    apply(layer, make_tar([(info, data)]), uid_maps=maps, gid_maps=maps)
    st = os.stat(layer / "f")
    assert (st.st_uid, st.st_gid) == (100005, 100007)


def test_apply_unmappable_owner(tmp_path):
    layer = tmp_path / "l"
    layer.mkdir()
    info, data = entry("f", data=b"x")
    info.uid = info.gid = 70000
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    raw = make_tar([(info, data)])
    with pytest.raises(ValueError, match="70000"):
        apply(layer, raw, uid_maps=maps, gid_maps=maps)
    apply(layer, raw, uid_maps=maps, gid_maps=maps, ignore_chown_errors=True)
    assert os.stat(layer / "f").st_uid == 100000


def test_apply_empty_stream_is_empty_layer(tmp_path):
    assert apply(tmp_path, b"") == 0


# Hostile tar streams --------------------------------------------------------


def assert_sentinel_intact(sentinel, digest):
    assert tree_digest(str(sentinel)) == digest


def no_temporaries(layer):
    return not [name for name in os.listdir(layer) if name.startswith(".btrfsdrv-")]


def test_hostile_dotdot_component(trees):
    layer, sentinel, digest = trees
    with pytest.raises(ValueError, match=r"'\.\.'"):
        apply(layer, make_tar([entry("../sentinel/secret", data=b"owned")]))
    assert_sentinel_intact(sentinel, digest)


def test_hostile_absolute_name_stays_inside(trees):
    layer, sentinel, digest = trees
    apply(layer, make_tar([entry(str(sentinel / "secret"), data=b"owned")]))
    assert (layer / str(sentinel / "secret").lstrip("/")).read_bytes() == b"owned"
    assert_sentinel_intact(sentinel, digest)


def test_hostile_write_through_symlink(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("link", tarfile.SYMTYPE, linkname=str(sentinel)),
                    entry("link/secret", data=b"owned")])
    with pytest.raises(ValueError, match="not a directory"):
        apply(layer, raw)
    assert_sentinel_intact(sentinel, digest)


def test_hostile_file_over_symlink_replaces_link(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("link", tarfile.SYMTYPE, linkname=str(sentinel / "secret")),
                    entry("link", data=b"owned")])
    apply(layer, raw)
    assert (layer / "link").read_bytes() == b"owned"
    assert_sentinel_intact(sentinel, digest)


def test_hostile_hard_link_outside(trees):
    layer, sentinel, digest = trees
    with pytest.raises(ValueError, match=r"'\.\.'"):
        apply(layer, make_tar([entry("h", tarfile.LNKTYPE, linkname="../sentinel/secret")]))
    with pytest.raises(ValueError, match="does not exist"):
        apply(layer, make_tar([entry("h", tarfile.LNKTYPE, linkname=str(sentinel / "secret"))]))
    assert_sentinel_intact(sentinel, digest)


def test_hostile_hard_link_creates_nothing_on_failure(trees):
    layer, sentinel, digest = trees
    with pytest.raises(ValueError, match="does not exist"):
        apply(layer, make_tar([entry("new/dir/h", tarfile.LNKTYPE, linkname="missing")]))
    assert not (layer / "new").exists()
    assert_sentinel_intact(sentinel, digest)


def test_hostile_hard_link_to_symlink(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("s", tarfile.SYMTYPE, linkname=str(sentinel / "secret")),
                    entry("h", tarfile.LNKTYPE, linkname="s"), entry("h", data=b"owned")])
    with pytest.raises(ValueError, match="symlink"):
        apply(layer, raw)
    assert_sentinel_intact(sentinel, digest)


def test_hostile_hard_link_through_symlinked_dir(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("s", tarfile.SYMTYPE, linkname=str(sentinel)),
                    entry("h", tarfile.LNKTYPE, linkname="s/secret")])
    with pytest.raises(ValueError, match="not a directory"):
        apply(layer, raw)
    assert_sentinel_intact(sentinel, digest)


@pytest.mark.parametrize("name", ["d/.wh...", "d/.wh..", "d/.wh."])
def test_hostile_whiteout_names_no_entry(trees, name):
    layer, sentinel, digest = trees
    (layer / "d").mkdir()
    with pytest.raises(ValueError, match="whiteout"):
        apply(layer, make_tar([entry(name)]))
    assert (layer / "d").is_dir()
    assert_sentinel_intact(sentinel, digest)


def test_hostile_whiteout_through_symlink(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("s", tarfile.SYMTYPE, linkname=str(sentinel)), entry("s/.wh.secret")])
    with pytest.raises(ValueError, match="not a directory"):
        apply(layer, raw)
    with pytest.raises(ValueError, match=r"'\.\.'"):
        apply(layer, make_tar([entry("../sentinel/.wh.secret")]))
    apply(layer, make_tar([entry(str(sentinel / ".wh.secret"))]))
    assert_sentinel_intact(sentinel, digest)


def test_hostile_directory_replaced_by_symlink(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("d", tarfile.DIRTYPE, mode=0o755), entry("d/a", data=b"a"),
                    entry("d", tarfile.SYMTYPE, linkname=str(sentinel)),
                    entry("d/secret", data=b"owned")])
    with pytest.raises(ValueError, match="not a directory"):
        apply(layer, raw)
    assert_sentinel_intact(sentinel, digest)


def test_hostile_relative_symlink_escape(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("up", tarfile.SYMTYPE, linkname="../sentinel"),
                    entry("up/dir/file", data=b"owned"), ])
    with pytest.raises(ValueError, match="not a directory"):
        apply(layer, raw)
    assert_sentinel_intact(sentinel, digest)


def test_hostile_device_node_is_replaced_not_written(trees):
    layer, sentinel, digest = trees
    info, _ = entry("null", tarfile.CHRTYPE, mode=0o666)
    info.devmajor, info.devminor = 1, 3
    apply(layer, make_tar([(info, None), entry("null", data=b"data")]))
    assert stat.S_ISREG(os.lstat(layer / "null").st_mode)
    fifo, _ = entry("fifo", tarfile.FIFOTYPE)
    apply(layer, make_tar([(fifo, None), entry("fifo", data=b"data")]))  # must not block on open
    assert (layer / "fifo").read_bytes() == b"data"
    assert_sentinel_intact(sentinel, digest)


def test_hostile_truncated_data_keeps_layer(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("first", data=b"1"), entry("new/dir/second", data=b"x" * 5000)])
    cut = raw[:2048 + 1024]
    with pytest.raises(ValueError, match=r"new/dir/second.*offset"):
        apply(layer, cut)
    assert (layer / "first").read_bytes() == b"1"
    assert not (layer / "new").exists()
    assert no_temporaries(layer)
    assert_sentinel_intact(sentinel, digest)


def test_hostile_truncated_at_header_boundary(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("first", data=b"1"), entry("second", data=b"2")], end=False)
    with pytest.raises(ValueError, match="end-of-archive"):
        apply(layer, raw)


def test_hostile_corrupt_header(trees):
    layer, sentinel, digest = trees
    raw = bytearray(make_tar([entry("first", data=b"1"), entry("second", data=b"2")]))
    second = raw.index(b"second")
    raw[second + 148:second + 150] = b"99"  # spoil the header checksum
    with pytest.raises(ValueError, match="offset"):
        apply(layer, bytes(raw))


def test_hostile_corrupt_gzip(trees):
    layer, sentinel, digest = trees
    packed = subprocess.run(["gzip", "-c"], input=make_tar([entry("f", data=os.urandom(50000))]),
                            stdout=subprocess.PIPE, check=True).stdout
    with pytest.raises(ValueError):
        apply(layer, packed[:len(packed) // 2])
    assert no_temporaries(layer)


# ID-map updates -------------------------------------------------------------


def test_remap_keeps_setuid_capability_and_links(tmp_path):
    layer = str(tmp_path / "l")
    write(layer + "/bin/ping", b"elf", mode=0o4755)
    os.setxattr(layer + "/bin/ping", "security.capability", CAPABILITY)
    os.link(layer + "/bin/ping", layer + "/bin/ping2")
    write(layer + "/sgid")
    os.chown(layer + "/sgid", 0, 5)
    os.chmod(layer + "/sgid", 0o2755)
    os.symlink("bin/ping", layer + "/link")
    old = ([], [])
    new = ([btrfsdrv.IDMap(0, 100000, 65536)], [btrfsdrv.IDMap(0, 200000, 65536)])
    btrfsdrv.remap_layer_owners(layer, old, new)
    st = os.stat(layer + "/bin/ping")
    assert (st.st_uid, st.st_gid) == (100000, 200000)
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert os.getxattr(layer + "/bin/ping", "security.capability") == CAPABILITY
    assert os.stat(layer + "/bin/ping2").st_ino == st.st_ino
    assert os.stat(layer + "/sgid").st_gid == 200005
    assert stat.S_IMODE(os.stat(layer + "/sgid").st_mode) == 0o2755
    assert os.lstat(layer + "/link").st_uid == 100000
    assert os.stat(layer).st_uid == 0
    btrfsdrv.remap_layer_owners(layer, new, old)
    assert os.stat(layer + "/bin/ping").st_uid == 0


# Graph-driver scenarios on btrfs ---------------------------------------------


def random_content(size, seed):
    return random.Random(seed).getrandbits(size * 8).to_bytes(size, "little")


def create_base(driver, layer_id):
    """Create the base layer of the containers/storage graph tests."""
    driver.create_read_write(layer_id)
    root = driver.get(layer_id)
    os.mkdir(os.path.join(root, "a subdir"))
    os.chown(os.path.join(root, "a subdir"), 1, 2)
    os.chmod(os.path.join(root, "a subdir"), 0o705 | stat.S_ISVTX)
    write(os.path.join(root, "a file"), b"Some data", mode=0o222 | stat.S_ISUID)
    return root


def add_many_files(root, count, seed):
    for index in range(count):
        directory = os.path.join(root, "directory-%d" % (index - index % 100))
        os.makedirs(directory, exist_ok=True)
        write(os.path.join(directory, "file-%d" % index), random_content(64, seed + index), mode=0o755)


def change_many_files(root, count, seed):
    """Modify, add and delete a third of the files each; return the expected changes."""
    expected = []
    for index in range(count):
        directory = "/directory-%d" % (index - index % 100)
        if index % 100 == 0:
            expected.append(Change(directory, MODIFY))
        if index % 3 == 0:
            path = directory + "/file-%d" % index
            before = os.stat(root + path).st_mtime_ns
            while os.stat(root + path).st_mtime_ns == before:
                write(root + path, random_content(64, seed + index), mode=0o755)
            expected.append(Change(path, MODIFY))
        elif index % 3 == 1:
            path = directory + "/file-%d-%d" % (seed, index)
            write(root + path, random_content(64, seed + index), mode=0o755)
            expected.append(Change(path, ADD))
        else:
            path = directory + "/file-%d" % index
            os.unlink(root + path)
            expected.append(Change(path, DELETE))
    return sorted(expected, key=lambda change: change.path)


def test_driver_create_from_template_changes(driver):
    create_base(driver, "base")
    driver.create("snap", "base")
    write(os.path.join(driver.get("snap"), "testfile.txt"), b"test content", mode=0o755)
    driver.create_from_template("from-template", "snap", parent="base", read_write=True)
    driver.create_from_template("ro-from-template", "snap", parent="base")
    assert driver.changes("from-template", "snap") == []
    assert driver.changes("ro-from-template", "snap") == []
    for layer in ("snap", "from-template", "ro-from-template"):
        assert driver.changes(layer, "base") == [Change("/testfile.txt", ADD)]


def test_driver_diff_apply(driver):
    driver.create("base")
    base_root = driver.get("base")
    add_many_files(base_root, 100, 3)
    write(base_root + "/file-remove.txt", b"This file should get removed in upper!", mode=0o755)
    os.makedirs(base_root + "/var/lib")
    driver.create("upper", "base")
    upper_root = driver.get("upper")
    add_many_files(upper_root, 100, 6)
    os.unlink(upper_root + "/file-remove.txt")
    shutil.rmtree(upper_root + "/var/lib")
    diff_size = driver.diff_size("upper")

    driver.create("diff", "base")
    with driver.diff("upper", "base") as stream:
        raw = stream.read()
    applied_size = driver.apply_diff("diff", io.BytesIO(raw), parent="base")

    diff_root = driver.get("diff")
    assert applied_size == diff_size
    for index in range(100):
        with open(diff_root + "/directory-0/file-%d" % index, "rb") as data:
            assert data.read() == random_content(64, 6 + index)
    assert not os.path.lexists(diff_root + "/file-remove.txt")
    assert not os.path.lexists(diff_root + "/var/lib")
    assert driver.changes("diff", "upper") == []


def test_driver_changes_of_many_files(driver):
    driver.create("base")
    add_many_files(driver.get("base"), 20, 3)
    driver.create("upper", "base")
    expected = change_many_files(driver.get("upper"), 20, 6)
    assert len(expected) == 21
    assert driver.changes("upper", "base") == expected


@pytest.mark.parametrize("depth", range(10))
def test_driver_echo(driver, depth):
    components = 10
    root = create_base(driver, "base")
    expected = [Change("/a file", ADD), Change("/a subdir", ADD)]
    paths = []
    path = ""
    for index in range(components - 1):
        path += "/subdir%d" % (index + 1)
        paths.append(path)
        os.mkdir(root + path, 0o700)
        expected.append(Change(path, ADD))
    paths.append(path + "/file")
    write(root + paths[-1], random_content(128, depth), mode=0o600)
    expected.append(Change(paths[-1], ADD))
    assert driver.changes("base") == sorted(expected, key=lambda change: change.path)

    driver.create("second", "base")
    second = driver.get("second")
    shutil.rmtree(second + paths[depth]) if depth < components - 1 else os.unlink(second + paths[depth])
    expected = [Change(paths[index], MODIFY) for index in range(depth)] + [Change(paths[depth], DELETE)]
    assert driver.changes("second", "base") == expected

    driver.create("third", "second")
    third = driver.get("third")
    expected = [Change(paths[index], MODIFY) for index in range(depth)]
    for index in range(depth, components - 1):
        os.mkdir(third + paths[index], 0o700)
        expected.append(Change(paths[index], ADD))
    write(third + paths[-1], random_content(128, depth), mode=0o600)
    expected.append(Change(paths[-1], ADD))
    assert driver.changes("third", "second") == expected


def test_driver_update_layer_id_map(driver):
    driver.create("layer")
    root = driver.get("layer")
    write(root + "/usr/bin/ping", b"elf", mode=0o4755)
    os.setxattr(root + "/usr/bin/ping", "security.capability", CAPABILITY)
    os.link(root + "/usr/bin/ping", root + "/usr/bin/ping6")
    new = ([(0, 100000, 65536)], [(0, 100000, 65536)])
    driver.update_layer_id_map("layer", None, new)
    st = os.stat(root + "/usr/bin/ping")
    assert (st.st_uid, st.st_gid) == (100000, 100000)
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert os.getxattr(root + "/usr/bin/ping", "security.capability") == CAPABILITY
    assert os.stat(root + "/usr/bin/ping6").st_ino == st.st_ino
    assert driver.supports_shifting() is False


def test_driver_diff_of_missing_layer(driver):
    with pytest.raises(FileNotFoundError, match="not found"):
        driver.diff("missing")


def test_cli_diff_and_apply(driver, tmp_path):
    driver.create("base")
    write(driver.get("base") + "/etc/hostname", b"box")
    command = [sys.executable, btrfsdrv.__file__, "--home", driver.home]
    layer_tar = tmp_path / "layer.tar"
    with open(layer_tar, "wb") as out:
        subprocess.run(command + ["diff", "base"], stdout=out, check=True)
    packed = subprocess.run(["gzip", "-c", str(layer_tar)], stdout=subprocess.PIPE, check=True).stdout
    driver.create("copy")
    applied = subprocess.run(command + ["apply", "copy"], input=packed, stdout=subprocess.PIPE, check=True)
    assert b"size: 3" in applied.stdout
    changes = subprocess.run(command + ["changes", "copy"], stdout=subprocess.PIPE, check=True).stdout
    assert changes == b"A /etc\nA /etc/hostname\n"
    size = subprocess.run(command + ["diff-size", "copy"], stdout=subprocess.PIPE, check=True).stdout
    assert size == b"3\n"


# Round trips of Debian packages -----------------------------------------------

DEBS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "debs")
ROUND_TRIP_PACKAGES = ("busybox-static", "tzdata", "python3-minimal")


def package_tar(name, directory):
    """Extract the data tarball of a cached Debian package; skip when it is not cached."""
    import glob

    debs = sorted(glob.glob(os.path.join(DEBS_DIR, name + "_*.deb")))
    if not debs:
        reason = f"{name} is not in {DEBS_DIR}; run 'make packages'"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    target = os.path.join(str(directory), name + ".tar")
    with open(target, "wb") as out:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", debs[-1]], stdout=out, check=True)
    return target


def describe_tree(root):
    """Describe the entries below root: type, mode, owner, size, digest, target, mtime, links."""
    entries = {}
    inodes = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            st = os.lstat(path)
            # GNU tar creates symlinks that contain '..' last, which changes
            # their directory's mtime, so directory mtimes are checked apart.
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns // 10**9
            detail = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                      mtime, st.st_rdev]
            if stat.S_ISLNK(st.st_mode):
                detail.append(os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                detail.append(st.st_size)
                with open(path, "rb") as data:
                    detail.append(hashlib.sha256(data.read()).hexdigest())
                inodes.setdefault(st.st_ino, []).append(relative)
            entries[relative] = tuple(detail)
    links = sorted(sorted(names) for names in inodes.values() if len(names) > 1)
    return entries, links


def assert_same_tree(actual_root, expected_root):
    actual, actual_links = describe_tree(actual_root)
    expected, expected_links = describe_tree(expected_root)
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name] == expected[name], name
    assert actual_links == expected_links


@pytest.mark.parametrize("package", ROUND_TRIP_PACKAGES)
def test_package_round_trip(driver, tmp_path, package):
    layer_tar = package_tar(package, tmp_path)
    reference = tmp_path / "reference"
    reference.mkdir()
    subprocess.run(["tar", "-x", "--xattrs", "-f", layer_tar, "-C", str(reference)], check=True)

    driver.create("base")
    with open(layer_tar, "rb") as stream:
        size = driver.apply_diff("base", stream)
    base = driver.get("base")
    assert_same_tree(base, str(reference))
    with tarfile.open(layer_tar) as tar:
        members = tar.getmembers()
    assert size == sum(member.size for member in members if member.isreg())
    for member in members:
        if member.isdir():
            assert os.stat(os.path.join(base, member.name)).st_mtime == member.mtime, member.name

    driver.create("upper", "base")
    upper = driver.get("upper")
    edit_package_tree(upper)
    driver.create("copy", "base")
    with driver.diff("upper", "base") as stream:
        driver.apply_diff("copy", stream)
    copy = driver.get("copy")
    assert_same_tree(copy, upper)
    assert driver.changes("copy", "upper") == []
    assert driver.changes("copy", "base") == driver.changes("upper", "base")


def edit_package_tree(root):
    """Change a tree the ways a container does: edits, deletions, new links and type changes."""
    files = []
    directories = []
    for directory, dirnames, filenames in os.walk(root):
        directories.extend(os.path.join(directory, name) for name in dirnames)
        files.extend(os.path.join(directory, name) for name in filenames
                     if stat.S_ISREG(os.lstat(os.path.join(directory, name)).st_mode))
    files.sort()
    directories.sort()
    rng = random.Random(7)
    for path in rng.sample(files, min(5, len(files))):
        with open(path, "ab") as out:
            out.write(b"appended")
    victim = rng.choice(files)
    os.unlink(victim)
    os.mkdir(victim)
    write(os.path.join(victim, "inside"), b"new")
    deepest = max(directories, key=lambda path: path.count("/"))
    shutil.rmtree(deepest)
    # A new link to an unchanged file would be archived as a copy (so does
    # containers/storage), so the link group is new as a whole.
    write(os.path.join(root, "new-file"), b"linked")
    os.link(os.path.join(root, "new-file"), os.path.join(root, "new-hard-link"))
    os.symlink("/etc/passwd", os.path.join(root, "new-symlink"))
    os.mkfifo(os.path.join(root, "new-fifo"))
    os.chmod(rng.choice(files[:-1]) if files[-1] == victim else files[-1], 0o4711)


# Tree-search fast path against the full walk ---------------------------------


def build_random_tree(rng, root, entries=60):
    directories = [root]
    files = []
    for index in range(entries):
        parent = rng.choice(directories)
        name = "%s%d" % (rng.choice(["d", "f", "x"]), index)
        path = os.path.join(parent, name)
        if rng.random() < 0.25 and path.count("/") - root.count("/") < 5:
            os.mkdir(path)
            directories.append(path)
        else:
            write(path, random_content(rng.randrange(0, 300), index))
            files.append(path)
    for _ in range(5):
        source = rng.choice(files)
        link = os.path.join(rng.choice(directories), "link%d" % rng.randrange(10**6))
        if not os.path.lexists(link):
            os.link(source, link)
    os.symlink("f0", os.path.join(root, "symlink"))


def random_edit(rng, root):
    """Apply one random edit below root and return a description of it."""
    everything = []
    for directory, dirnames, filenames in os.walk(root):
        everything.extend(os.path.join(directory, name) for name in dirnames + filenames)
    if not everything:
        return "empty"
    path = rng.choice(everything)
    is_dir = os.path.isdir(path) and not os.path.islink(path)
    is_file = os.path.isfile(path) and not os.path.islink(path)
    directory = path if is_dir else os.path.dirname(path)

    edit = rng.choice(["append", "same", "chmod", "same_mode", "chown", "delete", "add", "mkdir",
                       "rename", "retype", "hard_link", "xattr", "symlink", "fifo", "touch"])
    new_name = os.path.join(directory, "new%d" % rng.randrange(10**6))

    if edit == "append" and is_file:
        with open(path, "ab") as out:
            out.write(b"more")
    elif edit == "same" and is_file:
        # New data, same size and mtime: the inode changes, no compared attribute does.
        st = os.stat(path)
        with open(path, "r+b") as out:
            out.write(bytes(st.st_size))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif edit == "chmod" and not os.path.islink(path):
        os.chmod(path, 0o4750)
    elif edit == "same_mode" and not os.path.islink(path):
        os.chmod(path, stat.S_IMODE(os.stat(path).st_mode))
    elif edit == "chown":
        os.chown(path, rng.randrange(5), rng.randrange(5), follow_symlinks=False)
    elif edit == "delete" and is_dir:
        shutil.rmtree(path)
    elif edit == "delete":
        os.unlink(path)
    elif edit == "add":
        write(new_name, b"added")
    elif edit == "mkdir":
        os.makedirs(os.path.join(new_name, "sub"))
        write(os.path.join(new_name, "sub", "file"), b"x")
    elif edit == "rename":
        target = rng.choice([root, os.path.dirname(path)])
        os.rename(path, os.path.join(target, "moved%d" % rng.randrange(10**6)))
    elif edit == "retype":
        if is_dir:
            shutil.rmtree(path)
            write(path, b"now a file")
        else:
            os.unlink(path)
            os.mkdir(path)
    elif edit == "hard_link" and is_file:
        os.link(path, new_name)
    elif edit == "xattr" and (is_file or is_dir):
        os.setxattr(path, "user.edit", b"%d" % rng.randrange(100))
    elif edit == "symlink":
        os.symlink(rng.choice(["f1", "/etc/passwd", "../up"]), new_name)
    elif edit == "fifo":
        os.mkfifo(new_name)
    elif edit == "touch":
        os.utime(path, (rng.randrange(10**9), rng.randrange(10**9)), follow_symlinks=False)
    return "%s %s" % (edit, os.path.relpath(path, root))


@pytest.mark.parametrize("seed", range(12))
def test_fast_path_matches_full_walk(driver, seed):
    seed = int(os.environ.get("BTRFSDRV_SEED", seed))
    rng = random.Random(seed)
    driver.create("base")
    build_random_tree(rng, driver.get("base"))
    driver.create("upper", "base")
    upper = driver.get("upper")
    edits = [random_edit(rng, upper) for _ in range(rng.randrange(1, 12))]
    if seed % 3 == 0:
        edits += ["parent: " + random_edit(rng, driver.get("base")) for _ in range(2)]
    fast = btrfsdrv._snapshot_changes(upper, driver.get("base"))
    full = btrfsdrv.layer_changes(upper, driver.get("base"))
    assert fast is not None, f"seed {seed}: the fast path did not apply"
    assert fast == full, f"seed {seed}, edits {edits}"


def test_fast_path_declines_unrelated_layers(driver):
    driver.create("one")
    driver.create("two")
    assert btrfsdrv._snapshot_changes(driver.get("two"), driver.get("one")) is None
    driver.create("child", "one")
    assert btrfsdrv._snapshot_changes(driver.get("child"), driver.get("two")) is None


# -- Hardening -----------------------------------------------------------------


# -- Vendoring, packaging and interoperation ------------------------------------
