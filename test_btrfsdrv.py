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
import stat
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


def qgroup_limits(filesystem):
    """Return {subvolume id: max referenced bytes or None} from `btrfs qgroup show`."""
    output = filesystem.btrfs("qgroup", "show", "--raw", "-re", filesystem.mountpoint)
    limits = {}
    for line in output.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("0/"):
            continue
        limits[int(fields[0][2:])] = None if fields[3] == "none" else int(fields[3])
    return limits


def quota_is_enabled(filesystem):
    result = subprocess.run(
        ["btrfs", "qgroup", "show", filesystem.mountpoint], capture_output=True, text=True,
    )
    return result.returncode == 0


def write_until_error(path, chunk=1024 * 1024, maximum=256 * 1024 * 1024):
    """Write zeros to path until the kernel refuses; return the errno (None if it never did)."""
    data = b"\0" * chunk
    written = 0
    try:
        with open(path, "wb") as output:
            while written < maximum:
                output.write(data)
                output.flush()
                os.fsync(output.fileno())
                written += chunk
    except OSError as error:
        return error.errno
    return None


@pytest.mark.parametrize("text, expected", [
    ("32", 32), ("32b", 32), ("32 B", 32), ("32k", 32768), ("32kb", 32768), ("32KiB", 32768),
    ("32 mb", 33554432), ("1.5k", 1536), (".5k", 512), ("5.k", 5120), ("50MiB", 52428800),
    ("1g", 1024**3), ("1T", 1024**4), ("1p", 2**50), ("0", 0), ("1.9", 1), ("7.99p", 799 * 2**50 // 100), ("9007199254740993", 2**53 + 1),
])
def test_parse_size_accepts(text, expected):
    assert btrfsdrv.parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", " ", "-1", "1x", "32Ki", "0x10", "8192p", "8193p", "1e3", "inf", "nan", "1  k", " 1k", "1k ",
    "1.2.3", "k", "1kk", "1ib", "\u0661", "+1", "1_000",
])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        btrfsdrv.parse_size(text)


@pytest.mark.parametrize("layer_id", [
    "", ".", "..", "a/b", "/a", "a\0b", "x" * 256, b"", b"a/b", "\u00e9" * 128, None, 7,
])
def test_layer_id_rejects(layer_id):
    with pytest.raises(ValueError, match="invalid layer id"):
        btrfsdrv.validate_layer_id(layer_id)


@pytest.mark.parametrize("layer_id", ["a", "x" * 255, "sha256:abc", b"\xff\xfe", "with space", "..."])
def test_layer_id_accepts(layer_id):
    assert btrfsdrv.validate_layer_id(layer_id) == os.fsencode(layer_id)


@pytest.mark.parametrize("options, message", [
    (["btrfs.mountopt=nodatacow"], "no mount options"),
    (["btrfs.unknown=1"], "unknown driver option"),
    (["btrfs.min_space"], "expected KEY=VALUE"),
    (["btrfs.min_space=1x"], "invalid size"),
    (["btrfs.size=0"], "greater than 0"),
    (["btrfs.min_space=10m", "btrfs.size=5m"], "at least btrfs.min_space"),
    (["btrfs.quota_mode=partial"], "quota_mode"),
    ("btrfs.size=1g", "list of KEY=VALUE"),
])
def test_parse_options_rejects(options, message):
    with pytest.raises(ValueError, match=message):
        btrfsdrv.parse_options(options)


def test_parse_options_trims_and_ignores_key_case():
    options = btrfsdrv.parse_options([" BTRFS.Min_Space = 1m ", "btrfs.SIZE=2m"])
    assert options.min_space == 1024**2
    assert options.default_size == 2 * 1024**2
    assert options.quota_required


def test_min_space_zero_still_requires_quota():
    assert btrfsdrv.parse_options(["btrfs.min_space=0"]).quota_required


def test_init_rejects_home_not_on_btrfs(tmp_path):
    with pytest.raises(btrfsdrv.PrerequisiteError, match="not on a btrfs filesystem"):
        btrfsdrv.Driver(tmp_path / "home")
    assert not (tmp_path / "home").exists()


def test_init_rejects_invalid_option_before_touching_home(fs):
    home = fs.path("home")
    with pytest.raises(ValueError):
        btrfsdrv.Driver(home, ["btrfs.mountopt=compress"])
    assert not os.path.exists(home)


def test_init_creates_home_private_mount(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        assert driver.name == "btrfs"
        assert str(driver) == "btrfs"
        assert driver.home == home
        assert stat.S_IMODE(os.stat(os.path.join(home, "subvolumes")).st_mode) == 0o700
        assert home in _mounts_below(home)
        with open("/proc/self/mountinfo") as mountinfo:
            line = next(line for line in mountinfo if line.split()[4] == home)
        assert "shared:" not in line
    assert home not in _mounts_below(home)


def test_init_accepts_bytes_and_pathlike_home(fs):
    import pathlib
    for home in (os.fsencode(fs.path("bytes-home")), pathlib.Path(fs.path("path-home"))):
        with btrfsdrv.Driver(home) as driver:
            driver.create("layer")
            assert os.path.isdir(driver.get("layer"))
            assert isinstance(driver.get("layer"), str)


def test_init_function_returns_driver(home):
    with btrfsdrv.init(home) as driver:
        assert isinstance(driver, btrfsdrv.Driver)


def test_create_empty_layer(driver):
    driver.create("empty")
    path = driver.get("empty")
    st = os.lstat(path)
    assert driver.exists("empty")
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o555
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.listdir(path) == []
    assert btrfsdrv.is_subvolume(path)


def make_base_layer(driver, layer_id="base"):
    """Create the graph-driver suite's base layer: 'a subdir' and 'a file'."""
    driver.create(layer_id)
    root = driver.get(layer_id)
    subdir = os.path.join(root, "a subdir")
    os.mkdir(subdir)
    os.chmod(subdir, 0o705 | stat.S_ISVTX)
    os.chown(subdir, 1, 2)
    file_path = os.path.join(root, "a file")
    with open(file_path, "w") as output:
        output.write("Some data")
    os.chmod(file_path, 0o222 | stat.S_ISUID)
    return root


def verify_base_layer(root):
    subdir = os.lstat(os.path.join(root, "a subdir"))
    assert stat.S_ISDIR(subdir.st_mode)
    assert stat.S_IMODE(subdir.st_mode) == 0o705 | stat.S_ISVTX
    assert (subdir.st_uid, subdir.st_gid) == (1, 2)
    file_st = os.lstat(os.path.join(root, "a file"))
    assert stat.S_ISREG(file_st.st_mode)
    assert stat.S_IMODE(file_st.st_mode) == 0o222 | stat.S_ISUID
    with open(os.path.join(root, "a file")) as data:
        assert data.read() == "Some data"


def test_create_base_layer(driver):
    verify_base_layer(make_base_layer(driver))


def test_create_snapshot_sees_base(driver):
    make_base_layer(driver)
    driver.create("snap", "base")
    root = driver.get("snap")
    verify_base_layer(root)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o555
    assert btrfsdrv.is_subvolume(root)


def test_snapshot_keeps_parent_root_mode(driver):
    make_base_layer(driver)
    driver.create("snap", "base")
    os.chmod(driver.get("snap"), 0o711)
    driver.create("snap2", "snap")
    assert stat.S_IMODE(os.stat(driver.get("snap2")).st_mode) == 0o711


def test_deep_layer_chain(driver):
    parent = None
    for depth in range(40):
        layer_id = f"layer{depth}"
        driver.create(layer_id, parent)
        root = driver.get(layer_id)
        os.chmod(root, 0o755)
        with open(os.path.join(root, f"file{depth}"), "w") as output:
            output.write(str(depth))
        parent = layer_id
    top = driver.get(parent)
    for depth in range(40):
        with open(os.path.join(top, f"file{depth}")) as data:
            assert data.read() == str(depth)


def test_create_from_template_copies_contents(driver):
    make_base_layer(driver)
    driver.create_from_template("copy", "base")
    verify_base_layer(driver.get("copy"))


def test_create_rejects_existing_id(driver):
    driver.create("one")
    with pytest.raises(FileExistsError):
        driver.create("one")
    with pytest.raises(FileExistsError):
        driver.create_read_write("one")


def test_create_rejects_unknown_parent(driver):
    with pytest.raises(FileNotFoundError, match="parent layer 'missing' not found"):
        driver.create("child", "missing")
    assert not driver.exists("child")


@pytest.mark.parametrize("layer_id", ["", "..", "a/b", "x" * 256])
def test_create_rejects_invalid_id(driver, layer_id):
    with pytest.raises(ValueError, match="invalid layer id"):
        driver.create(layer_id)
    assert driver.list_layers() == []


@pytest.mark.parametrize("storage_opt, message", [
    ({"size": "0"}, "greater than 0"),
    ({"size": "-5m"}, "invalid size"),
    ({"size": "10x"}, "invalid size"),
    ({"inodes": "10"}, "unknown storage option"),
])
def test_create_rejects_invalid_storage_opt(driver, fs, storage_opt, message):
    with pytest.raises(ValueError, match=message):
        driver.create("sized", storage_opt=storage_opt)
    assert not driver.exists("sized")
    assert not os.path.exists(os.path.join(driver.home, "quotas", "sized"))
    assert not quota_is_enabled(fs)


def test_create_rejects_size_below_min_space(fs):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=10m"]) as driver:
        with pytest.raises(ValueError, match="btrfs.min_space"):
            driver.create("small", storage_opt={"size": "5m"})
        assert not driver.exists("small")


def test_failed_create_leaves_nothing(driver, fs):
    quotas = os.path.join(driver.home, "quotas")
    with open(quotas, "w") as blocker:  # a file where the quotas directory must go
        blocker.write("")
    with pytest.raises(OSError):
        driver.create("doomed", storage_opt={"size": "10m"})
    assert not driver.exists("doomed")
    assert driver.list_layers() == []
    fs.btrfs("subvolume", "sync", fs.mountpoint)
    assert "doomed" not in fs.btrfs("subvolume", "list", fs.mountpoint)


def test_list_layers(driver):
    for layer_id in ("c", "a", "b"):
        driver.create(layer_id)
    assert driver.list_layers() == ["a", "b", "c"]
    driver.remove("b")
    assert driver.list_layers() == ["a", "c"]


def test_exists(driver):
    driver.create("here")
    assert driver.exists("here")
    assert not driver.exists("missing")
    assert not driver.exists("../here")
    assert not driver.exists("")


def test_remove_layer(driver, fs):
    driver.create("gone")
    driver.remove("gone")
    assert not driver.exists("gone")
    fs.btrfs("subvolume", "sync", fs.mountpoint)
    assert "gone" not in fs.btrfs("subvolume", "list", fs.mountpoint)


def test_remove_unknown_layer_removes_leftover_quota_file(driver):
    quotas = os.path.join(driver.home, "quotas")
    os.makedirs(quotas)
    with open(os.path.join(quotas, "ghost"), "w") as quota:
        quota.write("1048576")
    with pytest.raises(FileNotFoundError, match="layer 'ghost' not found"):
        driver.remove("ghost")
    assert not os.path.exists(os.path.join(quotas, "ghost"))


def test_remove_deletes_nested_subvolumes(driver, fs):
    driver.create("outer")
    root = driver.get("outer")
    os.chmod(root, 0o755)
    btrfsdrv.create_subvolume(os.path.join(root, "direct"))
    os.makedirs(os.path.join(root, "a", "b", "c"))
    btrfsdrv.create_subvolume(os.path.join(root, "a", "b", "c", "deep"))
    btrfsdrv.create_subvolume(os.path.join(root, "a", "b", "c", "deep", "deeper"))
    btrfsdrv.create_snapshot(os.path.join(root, "direct"), os.path.join(root, "a", "ro"), read_only=True)
    driver.remove("outer")
    assert not driver.exists("outer")
    driver.put("outer")
    fs.btrfs("subvolume", "sync", fs.mountpoint)
    assert fs.btrfs("subvolume", "list", fs.mountpoint).strip() == ""


def test_remove_deletes_plain_directory_layer(driver):
    layer = os.path.join(driver.home, "subvolumes", "plain")
    os.makedirs(os.path.join(layer, "x", "y"))
    with open(os.path.join(layer, "x", "file"), "w") as output:
        output.write("data")
    os.symlink("/", os.path.join(layer, "x", "root-link"))
    assert driver.exists("plain")
    driver.remove("plain")
    assert not os.path.lexists(layer)
    assert os.path.isdir("/proc")


def test_remove_refuses_layer_with_mount_inside(driver, tmp_path):
    driver.create("busy")
    root = driver.get("busy")
    os.chmod(root, 0o755)
    target = os.path.join(root, "mnt")
    os.mkdir(target)
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "precious").write_text("keep")
    subprocess.run(["mount", "--bind", str(host_dir), target], check=True)
    try:
        with pytest.raises(OSError) as raised:
            driver.remove("busy")
        assert raised.value.errno == errno.EBUSY
        assert "unmount it first" in str(raised.value)
        assert os.path.isdir(target)
    finally:
        subprocess.run(["umount", target], check=True)
    assert (host_dir / "precious").read_text() == "keep"
    driver.remove("busy")
    assert not driver.exists("busy")


def test_remove_destroys_qgroups(fs):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create("limited", storage_opt={"size": "20m"})
        layer = btrfsdrv.subvolume_id(driver.get("limited"))
        btrfsdrv.create_subvolume(os.path.join(driver.get("limited"), "nested"))
        nested = btrfsdrv.subvolume_id(os.path.join(driver.get("limited"), "nested"))
        assert qgroup_limits(fs)[layer] == 20 * 1024**2
        driver.remove("limited")
        assert not os.path.exists(os.path.join(driver.home, "quotas", "limited"))
        fs.btrfs("subvolume", "sync", fs.mountpoint)
        limits = qgroup_limits(fs)
        assert layer not in limits
        assert nested not in limits
        assert quota_is_enabled(fs)


def test_size_limit_enforced(fs):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create("base")
        driver.create_read_write("box", "base", storage_opt={"size": "16m"})
        root = driver.get("box")
        os.chmod(root, 0o755)
        with open(os.path.join(driver.home, "quotas", "box"), "rb") as quota:
            assert quota.read() == str(16 * 1024**2).encode()
        assert write_until_error(os.path.join(root, "fill")) == errno.EDQUOT
        assert os.path.getsize(os.path.join(root, "fill")) <= 16 * 1024**2


def test_default_size_applies_to_read_write_layers(fs):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.size=8m"]) as driver:
        driver.create("image")
        driver.create_read_write("container", "image")
        assert not os.path.exists(os.path.join(driver.home, "quotas", "image"))
        with open(os.path.join(driver.home, "quotas", "container")) as quota:
            assert quota.read() == str(8 * 1024**2)
        assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("container"))] == 8 * 1024**2


def test_min_space_enables_quota_at_init(fs):
    assert not quota_is_enabled(fs)
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=0"]):
        assert quota_is_enabled(fs)


def test_get_reapplies_lifted_limit(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("box", storage_opt={"size": "12m"})
        layer = btrfsdrv.subvolume_id(driver.get("box"))
    fs.btrfs("qgroup", "limit", "none", os.path.join(home, "subvolumes", "box"))
    assert qgroup_limits(fs)[layer] is None
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.get("box")
    assert qgroup_limits(fs)[layer] == 12 * 1024**2


def test_get_reenables_quota_disabled_from_outside(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("box", storage_opt={"size": "12m"})
        layer = btrfsdrv.subvolume_id(driver.get("box"))
        fs.btrfs("quota", "disable", fs.mountpoint)
        assert not quota_is_enabled(fs)
        driver.get("box")
        assert quota_is_enabled(fs)
        assert qgroup_limits(fs)[layer] == 12 * 1024**2


def test_get_recreates_destroyed_qgroup(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("box", storage_opt={"size": "12m"})
        layer = btrfsdrv.subvolume_id(driver.get("box"))
        result = subprocess.run(["btrfs", "qgroup", "destroy", f"0/{layer}", fs.mountpoint],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"this kernel keeps the qgroup of a live subvolume: {result.stderr.strip()}")
        driver.get("box")
        assert qgroup_limits(fs)[layer] == 12 * 1024**2


def test_get_warns_about_unparsable_quota_file(driver, caplog):
    driver.create("layer")
    quotas = os.path.join(driver.home, "quotas")
    os.makedirs(quotas)
    with open(os.path.join(quotas, "layer"), "w") as quota:
        quota.write("lots")
    with caplog.at_level("WARNING", logger="btrfsdrv"):
        assert driver.get("layer") == os.path.join(driver.home, "subvolumes", "layer")
    assert "quota file" in caplog.text
    assert os.path.join(quotas, "layer") in caplog.text


def test_get_accepts_whitespace_in_quota_file(fs):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create("layer")
        with open(os.path.join(driver.home, "quotas", "layer") if os.path.isdir(
                os.path.join(driver.home, "quotas")) else _make_quota_dir(driver, "layer"), "w") as quota:
            quota.write(" 9437184\n")
        driver.get("layer")
        assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("layer"))] == 9 * 1024**2


def _make_quota_dir(driver, layer_id):
    os.makedirs(os.path.join(driver.home, "quotas"), exist_ok=True)
    return os.path.join(driver.home, "quotas", layer_id)


def test_get_options(driver):
    driver.create("layer")
    assert driver.get("layer", ["ro", "ro"]) == os.path.join(driver.home, "subvolumes", "layer")
    with pytest.raises(ValueError, match="invalid mount option 'rw'"):
        driver.get("layer", ["rw"])
    with pytest.raises(FileNotFoundError):
        driver.get("missing")


def test_status_reports_filesystem_and_quota(driver, fs):
    status = dict(driver.status())
    assert status["Filesystem UUID"] in fs.btrfs("filesystem", "show", fs.mountpoint)
    assert status["Kernel Version"] == os.uname().release
    assert status["Quota Enabled"] == "false"
    assert status["Min Space"] == "0"


def test_metadata(driver, fs):
    driver.create("base")
    driver.create("child", "base", storage_opt={"size": "10m"})
    metadata = driver.metadata("child")
    assert metadata["Path"] == driver.get("child")
    assert int(metadata["SubvolumeID"]) == btrfsdrv.subvolume_id(driver.get("child"))
    assert metadata["SizeLimit"] == str(10 * 1024**2)
    assert metadata["ParentUUID"] == driver.metadata("base")["UUID"]
    show = fs.btrfs("subvolume", "show", driver.get("child"))
    assert metadata["UUID"] in show
    with pytest.raises(FileNotFoundError):
        driver.metadata("missing")


def test_read_write_disk_usage_counts_inodes_once(driver):
    driver.create("layer")
    root = driver.get("layer")
    os.chmod(root, 0o755)
    os.mkdir(os.path.join(root, "dir"))
    with open(os.path.join(root, "dir", "data"), "wb") as output:
        output.write(b"x" * 1000)
    os.link(os.path.join(root, "dir", "data"), os.path.join(root, "hardlink"))
    os.symlink("dir/data", os.path.join(root, "symlink"))
    usage = driver.read_write_disk_usage("layer")
    assert usage.size == 1000 + len("dir/data")
    assert usage.inode_count == 4  # root, dir, data (twice linked), symlink


def test_additional_image_stores_empty(driver):
    assert driver.additional_image_stores() == []


def test_cleanup_keeps_quota_and_foreign_mounts(fs):
    home = fs.path("home")
    os.makedirs(home)
    subprocess.run(["mount", "--bind", home, home], check=True)
    try:
        driver = btrfsdrv.Driver(home, ["btrfs.min_space=1m"])
        driver.cleanup()
        driver.cleanup()
        assert home in _mounts_below(home)
        assert quota_is_enabled(fs)
    finally:
        subprocess.run(["umount", home], check=True)


def test_cleanup_unmounts_own_bind_mount_once(fs):
    home = fs.path("home")
    before = _mounts_below(fs.mountpoint)
    for _ in range(20):
        with btrfsdrv.Driver(home):
            pass
    assert _mounts_below(fs.mountpoint) == before


def test_id_maps_own_home_and_layers(fs):
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    with btrfsdrv.Driver(fs.path("home"), uid_maps=maps, gid_maps=[(0, 200000, 65536)]) as driver:
        for path in (driver.home, os.path.join(driver.home, "subvolumes")):
            st = os.stat(path)
            assert (st.st_uid, st.st_gid) == (100000, 200000)
        driver.create("layer")
        st = os.stat(driver.get("layer"))
        assert (st.st_uid, st.st_gid) == (100000, 200000)


def test_id_maps_must_map_root(fs):
    with pytest.raises(ValueError, match="does not map container id 0"):
        btrfsdrv.Driver(fs.path("home"), uid_maps=[(1, 100000, 10)])
    with pytest.raises(ValueError, match="invalid uid_maps entry"):
        btrfsdrv.Driver(fs.path("home"), uid_maps=[(0, 1)])


def test_subvolume_helpers_accept_path_types(fs):
    import pathlib
    for kind in (str, os.fsencode, pathlib.Path):
        base = fs.path(f"base-{kind.__name__}")
        btrfsdrv.create_subvolume(kind(base))
        assert btrfsdrv.is_subvolume(kind(base))
        assert btrfsdrv.subvolume_id(kind(base)) > 255
        snapshot = base + "-snap"
        btrfsdrv.create_snapshot(kind(base), kind(snapshot), read_only=True)
        assert "readonly" in fs.btrfs("subvolume", "show", snapshot).lower()
        btrfsdrv.create_subvolume(kind(os.path.join(base, "inner")))
        with pytest.raises(OSError):
            btrfsdrv.delete_subvolume(kind(base))
        btrfsdrv.delete_subvolume(kind(base), recursive=True)
        btrfsdrv.delete_subvolume(kind(snapshot))
        assert not os.path.exists(base)
        assert not btrfsdrv.is_subvolume(fs.mountpoint + "/..")


def test_is_subvolume_false_for_plain_directory(fs):
    os.mkdir(fs.path("plain"))
    assert not btrfsdrv.is_subvolume(fs.path("plain"))
    assert btrfsdrv.is_subvolume(fs.mountpoint)
    assert btrfsdrv.subvolume_id(fs.mountpoint) == 5


def run_cli(home, *arguments):
    return subprocess.run(
        [sys.executable, btrfsdrv.__file__, "--home", home, *arguments],
        capture_output=True, text=True,
    )


def test_cli_create_list_remove(fs):
    home = fs.path("home")
    assert run_cli(home, "create", "base").returncode == 0
    assert run_cli(home, "create", "child", "--parent", "base", "--size", "8m").returncode == 0
    assert run_cli(home, "list").stdout.split() == ["base", "child"]
    assert run_cli(home, "exists", "child").returncode == 0
    assert run_cli(home, "exists", "nothing").returncode == 1
    assert run_cli(home, "get", "child").stdout.strip() == os.path.join(home, "subvolumes", "child")
    assert "SizeLimit: 8388608" in run_cli(home, "metadata", "child").stdout
    assert run_cli(home, "remove", "child").returncode == 0
    assert run_cli(home, "list").stdout.split() == ["base"]
    assert _mounts_below(home) == []


@pytest.mark.parametrize("arguments, status, message", [
    (("create", "bad/id"), 2, "invalid layer id"),
    (("create", "x", "--size", "12q"), 2, "invalid size"),
    (("remove", "missing"), 3, "not found"),
    (("get", "missing"), 3, "not found"),
    (("frobnicate",), 2, "invalid choice"),
])
def test_cli_errors_are_one_line(fs, arguments, status, message):
    result = run_cli(fs.path("home"), *arguments)
    assert result.returncode == status
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_documents_exit_status():
    result = subprocess.run([sys.executable, btrfsdrv.__file__, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "exit status" in result.stdout


# -- Layer diffs ---------------------------------------------------------------


# -- Hardening -----------------------------------------------------------------


# -- Vendoring, packaging and interoperation ------------------------------------
