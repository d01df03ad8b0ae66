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

# These tests also run against the vendored single file (make test-vendored),
# which runs pytest from dist/ with BTRFSDRV_VENDORED=1. Repository files are
# found next to this file, never through sys.path.

import importlib.util  # noqa: E402
import json  # noqa: E402
import textwrap  # noqa: E402

REPOSITORY = os.path.dirname(os.path.abspath(__file__))
VENDORED = os.environ.get("BTRFSDRV_VENDORED") == "1"
MODULE_DIR = os.path.dirname(os.path.abspath(btrfsdrv.__file__))


def _vendor_to(path):
    """Run tools/vendor.py and return the bytes of the file it wrote."""
    subprocess.run(
        [sys.executable, os.path.join(REPOSITORY, "tools", "vendor.py"), "--output", str(path)],
        check=True, capture_output=True, text=True,
    )
    with open(path, "rb") as vendored:
        return vendored.read()


@pytest.fixture
def vendored_dir(tmp_path):
    """A directory that holds a fresh dist/btrfsdrv.py and nothing else."""
    directory = tmp_path / "vendored"
    directory.mkdir()
    _vendor_to(directory / "btrfsdrv.py")
    return str(directory)


def _run_python(code, import_dir, *args, check=True):
    """Run code in an isolated interpreter that imports modules from import_dir only.

    -I leaves the current directory, PYTHONPATH and user site-packages off
    sys.path, so the test's own imports cannot leak in.
    """
    prelude = f"import sys\nsys.path.insert(0, {import_dir!r})\n"
    return subprocess.run(
        [sys.executable, "-I", "-c", prelude + textwrap.dedent(code), *args],
        check=check, capture_output=True, text=True,
    )


def test_vendored_run_tests_the_right_module():
    if VENDORED:
        assert btrfsdrv.__file__ == os.path.join(os.path.abspath(os.environ["BTRFSDRV_PATH"]), "btrfsdrv.py")
        assert importlib.util.find_spec("ioctl_structs") is None
        assert btrfsdrv._structs is btrfsdrv
    else:
        assert btrfsdrv.__file__ == os.path.join(REPOSITORY, "btrfsdrv.py")
        assert btrfsdrv._structs.__name__ == "ioctl_structs"


def test_vendor_output_is_reproducible(tmp_path):
    first = _vendor_to(tmp_path / "first.py")
    second = _vendor_to(tmp_path / "second.py")
    assert first == second
    if VENDORED:
        with open(btrfsdrv.__file__, "rb") as tested:
            assert tested.read() == first, "dist/btrfsdrv.py is stale: run make vendor"


def test_vendored_file_layout(vendored_dir):
    with open(os.path.join(vendored_dir, "btrfsdrv.py"), encoding="utf-8") as vendored:
        text = vendored.read()
    with open(os.path.join(REPOSITORY, "btrfsdrv.py"), encoding="utf-8") as source:
        source_text = source.read()
    header = text[:text.index('"""')]
    assert f"btrfsdrv {btrfsdrv.__version__}," in header
    assert f"Linux {btrfsdrv._structs.PORTED_HEADERS_VERSION} UAPI headers" in " ".join(header.replace("#", " ").split())
    assert "linux/btrfs.h" in header

    docstring_end = text.index('"""', text.index('"""') + 3) + 3
    assert text[docstring_end:].startswith("\nfrom __future__ import annotations\n")
    assert text.count("from __future__ import") == 1
    assert "import ioctl_structs" not in text
    assert "from ioctl_structs import" not in text
    assert text.count("\n__all__ = ") == 1
    assert "\n_structs = sys.modules[__name__]\n" in text
    # Outside the inlined block, the lines are btrfsdrv.py's own.
    assert text[text.index("# -- End of ioctl_structs.py"):].split("\n", 1)[1] in source_text


@pytest.mark.parametrize("variant", ["source", "vendored"])
def test_module_imports_on_unknown_machine(variant, vendored_dir):
    import_dir = REPOSITORY if variant == "source" else vendored_dir
    result = _run_python(
        """
        import platform
        platform.machine = lambda: "vax"
        import btrfsdrv
        print(btrfsdrv.__file__)
        try:
            btrfsdrv._structs.BTRFS_IOC_SYNC
        except ValueError as error:
            print(type(error).__name__, error)
        """,
        import_dir,
    )
    imported_from, error_line = result.stdout.splitlines()
    assert imported_from == os.path.join(import_dir, "btrfsdrv.py")
    assert error_line.startswith("UnknownMachineError unknown machine 'vax'")


def test_vendored_module_keeps_every_name(vendored_dir):
    code = """
        import json, btrfsdrv
        names = {"dir": sorted(dir(btrfsdrv)), "all": btrfsdrv.__all__}
        try:
            import ioctl_structs
        except ImportError:
            pass
        else:
            names["structs"] = sorted(set(dir(ioctl_structs)) - {"__all__"})
            names["structs_all"] = ioctl_structs.__all__
        print(json.dumps(names))
    """
    source = json.loads(_run_python(code, REPOSITORY).stdout)
    vendored = json.loads(_run_python(code, vendored_dir).stdout)
    assert "structs" not in vendored
    assert vendored["all"] == source["all"]
    missing_driver_names = set(source["dir"]) - set(vendored["dir"]) - {"_structs"}
    assert not missing_driver_names
    missing_structs_names = set(source["structs"]) - set(vendored["dir"]) - {"__builtins__", "__cached__"}
    assert not missing_structs_names
    assert not set(source["structs_all"]) - set(vendored["dir"])
