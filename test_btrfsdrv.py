"""Tests for btrfsdrv and ioctl_structs, on real loopback btrfs filesystems.

Kernel tests need root, btrfs in the kernel, loop devices and mkfs.btrfs.
Without them they skip with the reason, except when CI=true: a CI run that
tests nothing real fails instead.

Set BTRFSDRV_PATH to a directory to import btrfsdrv from there (the vendored
single file in dist/ is tested that way).
"""

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import platform
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

try:
    import ioctl_structs
except ImportError:  # vendored build: the definitions are inlined in btrfsdrv
    ioctl_structs = btrfsdrv

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

TOOLS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools")
STRUCT_TABLE = os.path.join(TOOLS_DIR, "struct_table.json")
U64_MAX = (1 << 64) - 1

# platform.machine() names that share a struct_table.json entry.
_TABLE_MACHINE_ALIASES = {"amd64": "x86_64", "i386": "i686", "i486": "i686", "i586": "i686"}


def _structprobe():
    if TOOLS_DIR not in sys.path:
        sys.path.insert(0, TOOLS_DIR)
    import structprobe

    return structprobe


def _host_compiler():
    """Return the host C compiler, or None when it or the btrfs headers are missing."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not os.path.exists("/usr/include/linux/btrfs_tree.h"):
        return None
    return compiler


def _reference_layout():
    """Return (table, description) to compare the module with: a host probe or the checked-in table."""
    structprobe = _structprobe()
    compiler = _host_compiler()
    if compiler is not None:
        table = structprobe.probe_host(compiler)
        return table, f"host probe ({table['compiler']}, headers {table['headers']})"
    with open(STRUCT_TABLE) as table_file:
        tables = json.load(table_file)
    machine = platform.machine()
    machine = _TABLE_MACHINE_ALIASES.get(machine, machine)
    if machine in tables:
        table = tables[machine]
        return table, f"tools/struct_table.json [{machine}] (no C compiler or headers here)"
    # Only the values that do not depend on the ABI can be compared.
    table = dict(tables["x86_64"])
    table["values"] = {
        key: value for key, value in table["values"].items()
        if key.startswith("const:") and not key.startswith(("const:BTRFS_IOC_", "const:FS_IOC_"))
        or key.startswith(("sizeof:btrfs_", "offsetof:btrfs_")) and _is_on_disk(key)
    }
    return table, f"tools/struct_table.json, ABI-independent values only ({machine} has no entry)"


def _is_on_disk(key):
    """Tell whether a probe key names a packed on-disk structure, whose layout has no ABI."""
    name = key.split(":", 1)[1].split(".", 1)[0]
    cls = getattr(ioctl_structs, name, None)
    # LittleEndianStructure is Structure itself on little-endian hosts, so
    # the check relies on the _pack_ = 1 that every on-disk item sets.
    return isinstance(cls, type) and getattr(cls, "_pack_", 0) == 1


def _ioctl(path, request, argument, flags=os.O_RDONLY):
    """Open path, run one ioctl with a mutable ctypes argument, and close it."""
    fd = os.open(path, flags)
    try:
        return fcntl.ioctl(fd, request, argument)
    finally:
        os.close(fd)


def _tree_search(path, tree_id, objectid, item_type, min_offset=0, max_offset=U64_MAX):
    """Return [(search header, item bytes)] for one key range, with BTRFS_IOC_TREE_SEARCH."""
    args = ioctl_structs.btrfs_ioctl_search_args()
    key = args.key
    key.tree_id = tree_id
    key.min_objectid = key.max_objectid = objectid
    key.min_type = key.max_type = item_type
    key.min_offset = min_offset
    key.max_offset = max_offset
    key.max_transid = U64_MAX
    key.nr_items = 4096
    _ioctl(path, ioctl_structs.BTRFS_IOC_TREE_SEARCH, args)
    return _split_search_buffer(bytes(args.buf), args.key.nr_items)


def _tree_search_v2(path, tree_id, objectid, item_type, min_offset=0, max_offset=U64_MAX):
    """Return [(search header, item bytes)] for one key range, with BTRFS_IOC_TREE_SEARCH_V2."""
    buffer_size = 64 * 1024
    args = ioctl_structs.btrfs_ioctl_search_args_v2_with(buffer_size)()
    args.buf_size = buffer_size
    key = args.key
    key.tree_id = tree_id
    key.min_objectid = key.max_objectid = objectid
    key.min_type = key.max_type = item_type
    key.min_offset = min_offset
    key.max_offset = max_offset
    key.max_transid = U64_MAX
    key.nr_items = U64_MAX >> 32
    _ioctl(path, ioctl_structs.BTRFS_IOC_TREE_SEARCH_V2, args)
    return _split_search_buffer(bytes(args.buf), args.key.nr_items)


def _split_search_buffer(buffer, count):
    header_size = ctypes.sizeof(ioctl_structs.btrfs_ioctl_search_header)
    items = []
    position = 0
    for _ in range(count):
        header = ioctl_structs.btrfs_ioctl_search_header.from_buffer_copy(buffer, position)
        position += header_size
        items.append((header, buffer[position:position + header.len]))
        position += header.len
    return items


def _decode_item(cls, data):
    """Decode an on-disk item, zero-padding one shorter than the structure (an older format)."""
    return cls.from_buffer_copy(data.ljust(ctypes.sizeof(cls), b"\0"))


def _cli_fields(output):
    """Parse 'Key: value' lines of btrfs CLI output into a dict."""
    fields = {}
    for line in output.splitlines():
        key, separator, value = line.strip().partition(":")
        if separator:
            fields[key.strip()] = value.strip()
    return fields


def _uuid_text(raw):
    return "-" if not any(raw) else str(uuid.UUID(bytes=bytes(raw)))


def _create_subvolume(parent_dir, name):
    """Create a subvolume with BTRFS_IOC_SUBVOL_CREATE_V2 and return its path."""
    args = ioctl_structs.btrfs_ioctl_vol_args_v2()
    args.name = os.fsencode(name)
    _ioctl(parent_dir, ioctl_structs.BTRFS_IOC_SUBVOL_CREATE_V2, args)
    return os.path.join(parent_dir, name)


def _snapshot(source, parent_dir, name, flags=0):
    """Snapshot source into parent_dir/name with BTRFS_IOC_SNAP_CREATE_V2 and return its path."""
    source_fd = os.open(source, os.O_RDONLY)
    try:
        args = ioctl_structs.btrfs_ioctl_vol_args_v2()
        args.fd = source_fd
        args.flags = flags
        args.name = os.fsencode(name)
        _ioctl(parent_dir, ioctl_structs.BTRFS_IOC_SNAP_CREATE_V2, args)
    finally:
        os.close(source_fd)
    return os.path.join(parent_dir, name)


def _subvolume_id(path):
    """Look up the id of the subvolume containing path with BTRFS_IOC_INO_LOOKUP."""
    args = ioctl_structs.btrfs_ioctl_ino_lookup_args()
    args.treeid = 0
    args.objectid = ioctl_structs.BTRFS_FIRST_FREE_OBJECTID
    _ioctl(path, ioctl_structs.BTRFS_IOC_INO_LOOKUP, args)
    return args.treeid


def _subvolume_flags(path):
    flags = ctypes.c_uint64()
    _ioctl(path, ioctl_structs.BTRFS_IOC_SUBVOL_GETFLAGS, flags)
    return flags.value


def _run_python(code, *, env=None):
    """Run code in a fresh interpreter that can import the module under test."""
    module_dir = os.path.dirname(os.path.abspath(ioctl_structs.__file__))
    prelude = f"import sys; sys.path.insert(0, {module_dir!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        check=False, capture_output=True, text=True, env=env,
    )


def test_ioctl_structs_imports_only_stdlib():
    code = f"""
import json, sys, sysconfig, os
before = set(sys.modules)
import {ioctl_structs.__name__}
added = sorted(set(sys.modules) - before - {{{ioctl_structs.__name__!r}}})
stdlib_names = getattr(sys, "stdlib_module_names", None)
stdlib_dirs = {{os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}}
def in_stdlib(name):
    top = name.split(".")[0]
    if stdlib_names is not None:
        return top in stdlib_names
    module = sys.modules[name]
    path = getattr(module, "__file__", None)
    return path is None or any(os.path.realpath(path).startswith(d) for d in stdlib_dirs)
print(json.dumps([name for name in added if not in_stdlib(name)]))
"""
    # An empty PATH hides every C compiler from the import.
    result = _run_python(code, env={"PATH": ""})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_ioctl_unknown_machine_raises_lazily():
    code = f"""
import platform
platform.machine = lambda: "vax"
import {ioctl_structs.__name__} as module
print("imported", module.BTRFS_SUBVOL_RDONLY)
try:
    module.BTRFS_IOC_SNAP_CREATE_V2
except module.UnknownMachineError as error:
    print("error:", error)
"""
    result = _run_python(code)

    assert result.returncode == 0, result.stderr
    assert "imported 2" in result.stdout
    assert "error: unknown machine 'vax'" in result.stdout


def test_ioctl_machine_families():
    families = {
        "x86_64": "generic", "i686": "generic", "aarch64": "generic", "armv7l": "generic",
        "riscv64": "generic", "s390x": "generic", "loongarch64": "generic", "ia64": "generic",
        "m68k": "generic", "ppc": "powerpc", "ppc64": "powerpc", "ppc64le": "powerpc",
        "powerpc": "powerpc", "mips": "mips", "mips64": "mips", "mipsel": "mips",
        "sparc": "sparc", "sparc64": "sparc", "alpha": "alpha", "parisc": "parisc",
        "parisc64": "parisc", "hppa": "parisc",
    }
    for machine, family in families.items():
        assert ioctl_structs.ioc_encoding(machine).family == family, machine

    with pytest.raises(ioctl_structs.UnknownMachineError, match="'vax'"):
        ioctl_structs.ioc_encoding("vax")
    with pytest.raises(ioctl_structs.UnknownMachineError, match="'vax'"):
        ioctl_structs.request_numbers("vax")


def test_ioctl_encoding_known_values():
    # Values worked out by hand from the _IOC macros of each architecture.
    vol_args_v2 = ioctl_structs.btrfs_ioctl_vol_args_v2
    cases = [
        ("x86_64", ioctl_structs._IOW(0x94, 23, vol_args_v2, machine="x86_64"), 0x50009417),
        ("ppc64le", ioctl_structs._IOW(0x94, 23, vol_args_v2, machine="ppc64le"), 0x90009417),
        ("parisc", ioctl_structs._IOW(0x94, 23, 4096, machine="parisc"), 0x90009417),
        ("x86_64", ioctl_structs._IO(0x94, 8, machine="x86_64"), 0x9408),
        ("mips64", ioctl_structs._IO(0x94, 8, machine="mips64"), 0x20009408),
        ("sparc64", ioctl_structs._IO(0x94, 8, machine="sparc64"), 0x20009408),
        ("x86_64", ioctl_structs._IOR(0x94, 25, ctypes.c_uint64, machine="x86_64"), 0x80089419),
        ("alpha", ioctl_structs._IOR(0x94, 25, 8, machine="alpha"), 0x40089419),
        ("parisc", ioctl_structs._IOR(0x94, 25, 8, machine="parisc"), 0x40089419),
        ("i686", ioctl_structs._IOR("f", 1, 4, machine="i686"), 0x80046601),
        ("aarch64", ioctl_structs._IOWR(0x94, 17, 4096, machine="aarch64"), 0xD0009411),
    ]
    for machine, actual, expected in cases:
        assert actual == expected, f"{machine}: {actual:#x} != {expected:#x}"


def test_ioctl_encoding_size_limits():
    assert ioctl_structs._IOW(0x94, 1, 8191, machine="ppc64le") == 0x9FFF9401
    with pytest.raises(ValueError, match="13-bit"):
        ioctl_structs._IOW(0x94, 1, 8192, machine="ppc64le")
    assert ioctl_structs._IOW(0x94, 1, 16383, machine="x86_64") == 0x7FFF9401
    with pytest.raises(ValueError, match="14-bit"):
        ioctl_structs._IOW(0x94, 1, 16384, machine="x86_64")
    with pytest.raises(ValueError, match="ioctl number 256"):
        ioctl_structs._IO(0x94, 256)

    # Every argument structure fits the smaller 13-bit size field.
    for machine in ("x86_64", "ppc64le", "mips64", "sparc64", "alpha", "parisc"):
        assert len(ioctl_structs.request_numbers(machine)) == len(ioctl_structs._REQUESTS)


def test_ioctl_request_numbers_lazy_and_star():
    namespace = {}
    exec(f"from {ioctl_structs.__name__} import *", namespace)  # noqa: S102

    for name, value in ioctl_structs.request_numbers().items():
        assert namespace[name] == value, name
        assert getattr(ioctl_structs, name) == value, name
        assert ioctl_structs.request_number(name) == value, name
    assert "BTRFS_IOC_SNAP_CREATE_V2" in dir(ioctl_structs)
    with pytest.raises(AttributeError):
        _ = ioctl_structs.BTRFS_IOC_NO_SUCH_REQUEST
    with pytest.raises(ValueError, match="missing the argument types"):
        ioctl_structs.request_numbers("x86_64", {"__u64": 8})


def test_struct_factories_flexible_arrays():
    inherit = ioctl_structs.btrfs_qgroup_inherit_with(3)()
    inherit.num_qgroups = 3
    inherit.qgroups[2] = 257

    assert ctypes.sizeof(inherit) == ctypes.sizeof(ioctl_structs.btrfs_qgroup_inherit) + 3 * 8
    assert isinstance(inherit, ioctl_structs.btrfs_qgroup_inherit)
    assert type(inherit).qgroups.offset == ctypes.sizeof(ioctl_structs.btrfs_qgroup_inherit)
    assert ioctl_structs.btrfs_qgroup_inherit_with(3) is type(inherit)

    search = ioctl_structs.btrfs_ioctl_search_args_v2_with(65536)
    assert ctypes.sizeof(search) == ctypes.sizeof(ioctl_structs.btrfs_ioctl_search_args_v2) + 65536
    spaces = ioctl_structs.btrfs_ioctl_space_args_with(4)
    assert ctypes.sizeof(spaces) == 16 + 4 * ctypes.sizeof(ioctl_structs.btrfs_ioctl_space_info)
    with pytest.raises(ValueError):
        ioctl_structs.btrfs_qgroup_inherit_with(-1)


def test_struct_vol_args_v2_unions():
    args = ioctl_structs.btrfs_ioctl_vol_args_v2()
    args.subvolid = 258

    assert args.devid == 258
    assert args.name == (258).to_bytes(8, sys.byteorder).rstrip(b"\0")
    args.size = 80
    assert args.unused[0] == 80
    assert ioctl_structs.btrfs_ioctl_vol_args_v2.name.offset == 56


def test_struct_on_disk_items_little_endian():
    import struct

    data = struct.pack("<QQH", 256, 3, 4) + b"name"
    ref = ioctl_structs.btrfs_root_ref.from_buffer_copy(data)

    assert (ref.dirid, ref.sequence, ref.name_len) == (256, 3, 4)
    assert data[ctypes.sizeof(ref):ctypes.sizeof(ref) + ref.name_len] == b"name"
    assert ctypes.sizeof(ioctl_structs.btrfs_root_item) == 439
    assert ioctl_structs.btrfs_legacy_root_item_size() == 239

    legacy = bytes(range(256))[:239]
    item = _decode_item(ioctl_structs.btrfs_root_item, legacy)
    assert item.generation_v2 == 0
    assert item.generation == int.from_bytes(legacy[160:168], "little")
    assert ioctl_structs.btrfs_qgroup_level((1 << 48) | 100) == 1


def test_struct_layout_matches_headers(record_property):
    table, source = _reference_layout()
    record_property("struct_layout_source", source)
    print(f"comparing ioctl_structs with {source}")
    module_values = _structprobe().module_values(ioctl_structs)
    added = ioctl_structs.ADDED_AFTER_PORTED_HEADERS

    for key in table["absent"]:
        name = key.split(":", 1)[1]
        assert name in added, f"{key} is missing from the headers of {source}"
        print(f"not in the headers of {source}, so not compared: {name} (Linux {added[name]})")

    # Fields newer than the headers are appended, so the struct grows by them.
    appended = {}
    for key in table["absent"]:
        if key.startswith("offsetof:"):
            struct_name, field = key[len("offsetof:"):].split(".")
            cls = getattr(ioctl_structs, struct_name)
            appended[struct_name] = appended.get(struct_name, 0) + ctypes.sizeof(
                dict(cls._fields_)[field]
            )
            assert getattr(cls, field).offset == table["values"][f"sizeof:{struct_name}"], key

    mismatches = []
    for key, expected in table["values"].items():
        if key == "const:LINUX_VERSION_CODE":
            continue
        if key.startswith("sizeof:") and key[len("sizeof:"):] in appended:
            expected += appended[key[len("sizeof:"):]]
        if module_values.get(key) != expected:
            mismatches.append(f"{key}: module {module_values.get(key)}, {source} {expected}")
    assert mismatches == [], f"ioctl_structs differs from {source}"
    assert set(module_values) - set(table["values"]) <= {f"const:{n}" for n in added} | {
        f"offsetof:{n}" for n in added
    }


def test_struct_table_matches_probe():
    compiler = _host_compiler()
    if compiler is None:
        pytest.skip("no C compiler or btrfs headers, so the table cannot be checked")
    with open(STRUCT_TABLE) as table_file:
        tables = json.load(table_file)
    machine = _TABLE_MACHINE_ALIASES.get(platform.machine(), platform.machine())
    if machine not in tables:
        pytest.skip(f"tools/struct_table.json has no entry for {machine}")

    probe = _structprobe().probe_host(compiler)
    table = tables[machine]
    assert probe["absent"] == table["absent"], "run make struct-table"
    for key, value in probe["values"].items():
        if key != "const:LINUX_VERSION_CODE":
            assert table["values"].get(key) == value, f"{key}: run make struct-table"


_CROSS_REQUIRED = [target.machine for target in _structprobe().CROSS_TARGETS if target.required]


@pytest.mark.parametrize(
    "target", _structprobe().CROSS_TARGETS, ids=lambda target: target.machine,
)
def test_ioctl_crosscheck_architectures(target, record_property):
    """Check request numbers against a cross compiler's headers; the probe is never run."""
    structprobe = _structprobe()
    if shutil.which(target.compiler) is None:
        reason = f"{target.compiler} is not installed (make crosscheck installs {target.package})"
        if IN_CI and os.environ.get("BTRFSDRV_CROSSCHECK") and target.required:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)

    table = structprobe.probe_object(target.compiler)
    record_property("cross_compiler", table["compiler"])
    record_property("cross_headers", table["headers"])
    print(f"{target.machine}: {table['compiler']}, headers {table['headers']}")
    numbers = ioctl_structs.request_numbers(target.machine, structprobe.argument_sizes(table))

    for name, value in numbers.items():
        expected = table["values"][f"const:{name}"]
        assert value == expected, f"{target.machine} {name}: {value:#x} != {expected:#x}"

    # Constants and on-disk items do not depend on the architecture. A struct
    # with fields newer than the headers is larger in the module.
    module_values = structprobe.module_values(ioctl_structs)
    grown = {
        f"sizeof:{name.split('.')[0]}" for name in ioctl_structs.ADDED_AFTER_PORTED_HEADERS
        if "." in name
    }
    for key, expected in table["values"].items():
        independent = (
            key.startswith("const:BTRFS_") and not key.startswith("const:BTRFS_IOC_")
            or key.startswith(("sizeof:", "offsetof:")) and _is_on_disk(key)
        )
        if independent and key not in grown:
            assert module_values[key] == expected, f"{target.machine} {key}"


def test_ioctl_crosscheck_elf_reader_matches_run():
    compiler = _host_compiler()
    if compiler is None:
        pytest.skip("no host C compiler or btrfs headers")
    structprobe = _structprobe()

    run = structprobe.probe_host(compiler)
    read = structprobe.probe_object(compiler)

    assert read["values"] == run["values"]
    assert read["absent"] == run["absent"]


def test_kernel_subvolume_snapshot_ioctls(fs):
    mountpoint = fs.path()
    subvolume = _create_subvolume(mountpoint, "sub")
    with open(os.path.join(subvolume, "file"), "wb") as data:
        data.write(b"x" * 4096)
    snapshot = _snapshot(subvolume, mountpoint, "snap", ioctl_structs.BTRFS_SUBVOL_RDONLY)

    assert os.stat(subvolume).st_ino == ioctl_structs.BTRFS_FIRST_FREE_OBJECTID
    assert _subvolume_flags(subvolume) == 0
    assert _subvolume_flags(snapshot) == ioctl_structs.BTRFS_SUBVOL_RDONLY
    with pytest.raises(OSError) as raised, open(os.path.join(snapshot, "new"), "wb"):
        pass
    assert raised.value.errno == errno.EROFS

    subvolume_id = _subvolume_id(subvolume)
    snapshot_id = _subvolume_id(snapshot)
    shown = _cli_fields(fs.btrfs("subvolume", "show", snapshot))
    shown_parent = _cli_fields(fs.btrfs("subvolume", "show", subvolume))
    assert snapshot_id == int(shown["Subvolume ID"])
    assert subvolume_id == int(shown_parent["Subvolume ID"])

    info = ioctl_structs.btrfs_ioctl_get_subvol_info_args()
    _ioctl(snapshot, ioctl_structs.BTRFS_IOC_GET_SUBVOL_INFO, info)
    assert info.treeid == snapshot_id
    assert info.name == b"snap"
    assert info.parent_id == ioctl_structs.BTRFS_FS_TREE_OBJECTID
    assert info.parent_id == int(shown["Parent ID"])
    assert info.dirid == os.stat(mountpoint).st_ino
    assert info.flags == ioctl_structs.BTRFS_ROOT_SUBVOL_RDONLY
    assert shown["Flags"] == "readonly"
    assert _uuid_text(info.uuid) == shown["UUID"]
    assert _uuid_text(info.parent_uuid) == shown["Parent UUID"]
    assert _uuid_text(info.parent_uuid) == shown_parent["UUID"]
    assert _uuid_text(info.received_uuid) == "-"
    assert info.generation == int(shown["Generation"])
    assert info.otransid == int(shown["Gen at creation"])
    assert abs(info.otime.sec - os.stat(snapshot).st_ctime) < 5

    flags = ctypes.c_uint64(0)
    _ioctl(snapshot, ioctl_structs.BTRFS_IOC_SUBVOL_SETFLAGS, flags)
    assert _subvolume_flags(snapshot) == 0
    assert "ro=false" in fs.btrfs("property", "get", "-ts", snapshot, "ro")

    destroy = ioctl_structs.btrfs_ioctl_vol_args_v2()
    destroy.flags = ioctl_structs.BTRFS_SUBVOL_SPEC_BY_ID
    destroy.subvolid = snapshot_id
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_SNAP_DESTROY_V2, destroy)
    assert not os.path.exists(snapshot)

    legacy = _snapshot(subvolume, mountpoint, "legacy")
    destroy_by_name = ioctl_structs.btrfs_ioctl_vol_args()
    destroy_by_name.name = b"legacy"
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_SNAP_DESTROY, destroy_by_name)
    assert not os.path.exists(legacy)
    listed = fs.btrfs("subvolume", "list", mountpoint)
    assert listed.split() == ["ID", str(subvolume_id), *listed.split()[2:]]
    assert "snap" not in listed


def test_kernel_snapshot_v1_and_subvol_create(fs):
    mountpoint = fs.path()
    create = ioctl_structs.btrfs_ioctl_vol_args()
    create.name = b"plain"
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_SUBVOL_CREATE, create)

    source_fd = os.open(fs.path("plain"), os.O_RDONLY)
    try:
        snapshot = ioctl_structs.btrfs_ioctl_vol_args()
        snapshot.fd = source_fd
        snapshot.name = b"copy"
        _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_SNAP_CREATE, snapshot)
    finally:
        os.close(source_fd)

    assert os.stat(fs.path("plain")).st_ino == ioctl_structs.BTRFS_FIRST_FREE_OBJECTID
    assert os.stat(fs.path("copy")).st_ino == ioctl_structs.BTRFS_FIRST_FREE_OBJECTID
    shown = _cli_fields(fs.btrfs("subvolume", "show", fs.path("copy")))
    assert shown["Parent UUID"] == _cli_fields(fs.btrfs("subvolume", "show", fs.path("plain")))["UUID"]


def test_kernel_tree_search_root_items(fs):
    mountpoint = fs.path()
    subvolume = _create_subvolume(mountpoint, "sub")
    snapshot = _snapshot(subvolume, mountpoint, "snap", ioctl_structs.BTRFS_SUBVOL_RDONLY)
    snapshot_id = _subvolume_id(snapshot)
    subvolume_id = _subvolume_id(subvolume)
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_SYNC, 0)

    # Lines read "ID 257 gen 7 top level 5 parent_uuid <uuid> uuid <uuid> path snap".
    listed = {}
    for line in fs.btrfs("subvolume", "list", "-u", "-q", mountpoint).splitlines():
        words = line.replace("top level", "top_level").split()
        listed[int(words[1])] = dict(zip(words[::2], words[1::2]))
    shown = _cli_fields(fs.btrfs("subvolume", "show", snapshot))

    for search in (_tree_search, _tree_search_v2):
        refs = search(
            mountpoint, ioctl_structs.BTRFS_ROOT_TREE_OBJECTID,
            ioctl_structs.BTRFS_FS_TREE_OBJECTID, ioctl_structs.BTRFS_ROOT_REF_KEY,
        )
        names = {}
        for header, data in refs:
            ref = ioctl_structs.btrfs_root_ref.from_buffer_copy(data)
            start = ctypes.sizeof(ref)
            names[header.offset] = data[start:start + ref.name_len]
            assert ref.dirid == os.stat(mountpoint).st_ino, search.__name__
        assert names == {subvolume_id: b"sub", snapshot_id: b"snap"}, search.__name__

        items = search(
            mountpoint, ioctl_structs.BTRFS_ROOT_TREE_OBJECTID,
            snapshot_id, ioctl_structs.BTRFS_ROOT_ITEM_KEY,
        )
        assert len(items) == 1, search.__name__
        header, data = items[0]
        assert header.len == ctypes.sizeof(ioctl_structs.btrfs_root_item), search.__name__
        root = _decode_item(ioctl_structs.btrfs_root_item, data)
        assert root.flags & ioctl_structs.BTRFS_ROOT_SUBVOL_RDONLY
        assert root.generation_v2 == root.generation
        assert root.root_dirid == ioctl_structs.BTRFS_FIRST_FREE_OBJECTID
        assert root.generation == int(listed[snapshot_id]["gen"])
        assert root.generation == int(shown["Generation"])
        assert root.otransid == int(shown["Gen at creation"])
        assert _uuid_text(root.uuid) == listed[snapshot_id]["uuid"]
        assert _uuid_text(root.parent_uuid) == listed[snapshot_id]["parent_uuid"]
        assert _uuid_text(root.parent_uuid) == listed[subvolume_id]["uuid"]
        assert root.inode.mode & 0o170000 == 0o040000


def test_kernel_quota_qgroup_items(fs):
    mountpoint = fs.path()
    subvolume = _create_subvolume(mountpoint, "sub")
    subvolume_id = _subvolume_id(subvolume)
    with open(os.path.join(subvolume, "data"), "wb") as data:
        data.write(os.urandom(1024 * 1024))

    quota = ioctl_structs.btrfs_ioctl_quota_ctl_args()
    quota.cmd = ioctl_structs.BTRFS_QUOTA_CTL_ENABLE
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_QUOTA_CTL, quota)
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_QUOTA_RESCAN_WAIT, 0)

    limit = ioctl_structs.btrfs_ioctl_qgroup_limit_args()
    limit.qgroupid = subvolume_id
    limit.lim.flags = ioctl_structs.BTRFS_QGROUP_LIMIT_MAX_RFER
    limit.lim.max_rfer = 10 * 1024 * 1024
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_QGROUP_LIMIT, limit)

    parent_qgroup = (1 << ioctl_structs.BTRFS_QGROUP_LEVEL_SHIFT) | 100
    create = ioctl_structs.btrfs_ioctl_qgroup_create_args()
    create.create = 1
    create.qgroupid = parent_qgroup
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_QGROUP_CREATE, create)
    assign = ioctl_structs.btrfs_ioctl_qgroup_assign_args()
    assign.assign = 1
    assign.src = subvolume_id
    assign.dst = parent_qgroup
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_QGROUP_ASSIGN, assign)

    rescan = ioctl_structs.btrfs_ioctl_quota_rescan_args()
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_QUOTA_RESCAN, rescan)
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_QUOTA_RESCAN_WAIT, 0)
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_SYNC, 0)
    status = ioctl_structs.btrfs_ioctl_quota_rescan_args()
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_QUOTA_RESCAN_STATUS, status)
    assert status.flags == 0

    quota_tree = ioctl_structs.BTRFS_QUOTA_TREE_OBJECTID
    (status_header, status_data), = _tree_search(
        mountpoint, quota_tree, 0, ioctl_structs.BTRFS_QGROUP_STATUS_KEY
    )
    status_item = _decode_item(ioctl_structs.btrfs_qgroup_status_item, status_data)
    print(f"qgroup status item length: {status_header.len} bytes")
    assert status_header.len in (32, 40)
    assert status_item.version == ioctl_structs.BTRFS_QGROUP_STATUS_VERSION
    assert status_item.flags & ioctl_structs.BTRFS_QGROUP_STATUS_FLAG_ON
    assert not status_item.flags & ioctl_structs.BTRFS_QGROUP_STATUS_FLAG_SIMPLE_MODE
    assert not status_item.flags & ioctl_structs.BTRFS_QGROUP_STATUS_FLAG_RESCAN

    shown = {}
    for line in fs.btrfs("qgroup", "show", "--raw", "-r", "-e", mountpoint).splitlines():
        words = line.split()
        if words and "/" in words[0] and words[0][0].isdigit():
            shown[words[0]] = words[1:5]
    qgroup_name = f"0/{subvolume_id}"
    info = _tree_search(
        mountpoint, quota_tree, 0, ioctl_structs.BTRFS_QGROUP_INFO_KEY, subvolume_id, subvolume_id
    )
    info_item = _decode_item(ioctl_structs.btrfs_qgroup_info_item, info[0][1])
    assert info_item.rfer == int(shown[qgroup_name][0])
    assert info_item.excl == int(shown[qgroup_name][1])
    assert info_item.rfer >= 1024 * 1024

    (_, limit_data), = _tree_search(
        mountpoint, quota_tree, 0, ioctl_structs.BTRFS_QGROUP_LIMIT_KEY, subvolume_id, subvolume_id
    )
    limit_item = _decode_item(ioctl_structs.btrfs_qgroup_limit_item, limit_data)
    assert limit_item.flags == ioctl_structs.BTRFS_QGROUP_LIMIT_MAX_RFER
    assert limit_item.max_rfer == 10 * 1024 * 1024
    assert int(shown[qgroup_name][2]) == limit_item.max_rfer
    assert shown[qgroup_name][3] == "none"

    relations = _tree_search(
        mountpoint, quota_tree, subvolume_id, ioctl_structs.BTRFS_QGROUP_RELATION_KEY
    )
    assert [header.offset for header, _ in relations] == [parent_qgroup]
    assert "1/100" in shown
    assert ioctl_structs.btrfs_qgroup_level(parent_qgroup) == 1


def test_kernel_rootref_lookup_user_fs_info(fs):
    mountpoint = fs.path()
    directory = fs.path("dir")
    os.mkdir(directory)
    inner = _create_subvolume(directory, "inner")
    inner_id = _subvolume_id(inner)

    rootref = ioctl_structs.btrfs_ioctl_get_subvol_rootref_args()
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_GET_SUBVOL_ROOTREF, rootref)
    refs = [(rootref.rootref[i].treeid, rootref.rootref[i].dirid) for i in range(rootref.num_items)]
    assert refs == [(inner_id, os.stat(directory).st_ino)]

    lookup = ioctl_structs.btrfs_ioctl_ino_lookup_user_args()
    lookup.dirid = os.stat(directory).st_ino
    lookup.treeid = inner_id
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_INO_LOOKUP_USER, lookup)
    assert lookup.name == b"inner"
    assert lookup.path == b"dir/"

    fs_info = ioctl_structs.btrfs_ioctl_fs_info_args()
    fs_info.flags = (
        ioctl_structs.BTRFS_FS_INFO_FLAG_CSUM_INFO | ioctl_structs.BTRFS_FS_INFO_FLAG_GENERATION
    )
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_FS_INFO, fs_info)
    shown = fs.btrfs("filesystem", "show", mountpoint)
    assert f"uuid: {uuid.UUID(bytes=bytes(fs_info.fsid))}" in shown
    assert fs_info.num_devices == 1
    assert fs_info.max_id == 1
    assert fs_info.sectorsize == os.statvfs(mountpoint).f_bsize
    assert fs_info.nodesize == 16384  # the mkfs.btrfs default (16 KiB)
    assert (fs_info.csum_type, fs_info.csum_size) == (0, 4)  # crc32c, the mkfs default
    assert fs_info.flags & ioctl_structs.BTRFS_FS_INFO_FLAG_GENERATION

    transid = ctypes.c_uint64()
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_START_SYNC, transid)
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_WAIT_SYNC, transid)
    assert transid.value >= fs_info.generation

    default = ctypes.c_uint64(inner_id)
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_DEFAULT_SUBVOL, default)
    assert fs.btrfs("subvolume", "get-default", mountpoint).split()[1] == str(inner_id)
    default = ctypes.c_uint64(ioctl_structs.BTRFS_FS_TREE_OBJECTID)
    _ioctl(mountpoint, ioctl_structs.BTRFS_IOC_DEFAULT_SUBVOL, default)
    assert fs.btrfs("subvolume", "get-default", mountpoint).split()[1] == "5"


def test_kernel_fs_ioc_flags_immutable(fs):
    path = fs.path("file")
    with open(path, "wb") as data:
        data.write(b"x")
    # linux/fs.h declares the argument as long, but the kernel copies an int.
    flags = ctypes.c_int()
    _ioctl(path, ioctl_structs.FS_IOC_GETFLAGS, flags)
    assert not flags.value & ioctl_structs.FS_IMMUTABLE_FL

    for flag, letter in ((ioctl_structs.FS_IMMUTABLE_FL, "i"), (ioctl_structs.FS_APPEND_FL, "a")):
        flags = ctypes.c_int(flag)
        _ioctl(path, ioctl_structs.FS_IOC_SETFLAGS, flags)
        attributes = subprocess.run(
            ["lsattr", path], check=True, capture_output=True, text=True
        ).stdout.split()[0]
        assert letter in attributes
        with pytest.raises(PermissionError), open(path, "wb"):
            pass

        _ioctl(path, ioctl_structs.FS_IOC_SETFLAGS, ctypes.c_int(0))
        read_back = ctypes.c_int()
        _ioctl(path, ioctl_structs.FS_IOC_GETFLAGS, read_back)
        assert not read_back.value & (ioctl_structs.FS_IMMUTABLE_FL | ioctl_structs.FS_APPEND_FL)
    os.unlink(path)



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
        # Kernels since 6.x refuse (EBUSY) to destroy the qgroup of a live
        # subvolume; older ones destroy it, and get must then re-create it.
        subprocess.run(["btrfs", "qgroup", "destroy", f"0/{layer}", fs.mountpoint], capture_output=True)
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


# -- Untrusted input at the edges (seeded property tests) ---------------------

PROPERTY_SEED = int(os.environ.get("BTRFSDRV_SEED", "20261204"))
PROPERTY_CASES = 5000


def run_cases(check, seed=PROPERTY_SEED, cases=PROPERTY_CASES):
    """Run check(rng) for many cases; a failure names the seed that replays it."""
    import random
    for case in range(cases):
        case_seed = seed * 1_000_003 + case
        try:
            check(random.Random(case_seed))
        except Exception as error:
            raise AssertionError(
                f"case {case} failed; replay with random.Random({case_seed}): {error!r}"
            ) from error


_SIZE_ALPHABET = "0123456789.kKmMgGtTpPbBiI -+xe_\t\u0661\u00b2"
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def _random_unit(rng):
    unit = rng.choice(list(_SIZE_UNITS))
    suffix = rng.choice(["", "b", "ib"]) if unit not in ("", "b") else ""
    text = unit + suffix
    return "".join(c.upper() if rng.random() < 0.5 else c for c in text), _SIZE_UNITS[unit]


def test_parse_size_random_strings_raise_only_value_error():
    def check(rng):
        text = "".join(rng.choice(_SIZE_ALPHABET) for _ in range(rng.randint(0, 12)))
        try:
            size = btrfsdrv.parse_size(text)
        except ValueError as error:
            assert repr(text) in str(error)
            return
        assert isinstance(size, int)
        assert 0 <= size < 2**63

    run_cases(check)


def test_parse_size_matches_exact_arithmetic():
    def check(rng):
        whole = str(rng.randint(0, 10**rng.randint(0, 6)))
        fraction = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 4)))
        number = rng.choice([whole, f"{whole}.{fraction}", f".{fraction or '5'}"])
        unit, multiplier = _random_unit(rng)
        text = number + rng.choice(["", " "]) + unit if unit else number
        integer, _, decimals = number.partition(".")
        numerator = int((integer or "0") + decimals) * multiplier
        expected = numerator // 10**len(decimals)
        if expected >= 2**63:
            with pytest.raises(ValueError):
                btrfsdrv.parse_size(text)
        else:
            assert btrfsdrv.parse_size(text) == expected, text

    run_cases(check)


def test_parse_size_round_trips_integers():
    def check(rng):
        value = rng.randrange(0, 2**63)
        assert btrfsdrv.parse_size(str(value)) == value
        unit, multiplier = _random_unit(rng)
        scaled = value // multiplier
        assert btrfsdrv.parse_size(f"{scaled}{unit}") == scaled * multiplier

    run_cases(check)


_OPTION_KEYS = ["btrfs.min_space", "btrfs.size", "btrfs.quota_mode", "btrfs.mountopt", "BTRFS.SIZE",
                " btrfs.min_space ", "size", "", "btrfs.", "overlay.mountopt"]
_OPTION_VALUES = ["0", "1m", "10G", "full", "simple", "SIMPLE", "", " 5k ", "-1", "abc", "=", "1p", "8192p"]


def test_parse_options_random_lists():
    def check(rng):
        options = []
        for _ in range(rng.randint(0, 4)):
            key = rng.choice(_OPTION_KEYS)
            separator = rng.choice(["=", "=", "=", "", "=="])
            options.append(key + separator + rng.choice(_OPTION_VALUES))
        try:
            parsed = btrfsdrv.parse_options(options)
        except ValueError:
            return
        rebuilt = [f"btrfs.min_space={parsed.min_space}", f"btrfs.quota_mode={parsed.quota_mode}"]
        if parsed.default_size is not None:
            rebuilt.append(f"btrfs.size={parsed.default_size}")
        again = btrfsdrv.parse_options(rebuilt)
        assert (again.min_space, again.default_size, again.quota_mode) == (
            parsed.min_space, parsed.default_size, parsed.quota_mode)
        assert parsed.quota_required == any(
            option.split("=", 1)[0].strip().lower() in ("btrfs.min_space", "btrfs.size") for option in options)

    run_cases(check)


def test_layer_id_random_bytes():
    alphabet = b"ab./\0\xff\xc3\xa9-_: "

    def check(rng):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 2, 5, 40, 254, 255, 256, 300])))
        candidate = raw if rng.random() < 0.5 else os.fsdecode(raw)
        try:
            encoded = btrfsdrv.validate_layer_id(candidate)
        except ValueError as error:
            assert "invalid layer id" in str(error)
            assert not raw or b"/" in raw or b"\0" in raw or raw in (b".", b"..") or len(raw) > 255
            return
        assert encoded == raw
        assert 0 < len(encoded) <= 255
        assert b"/" not in encoded
        assert b"\0" not in encoded
        assert encoded not in (b".", b"..")
        assert os.fsencode(os.fsdecode(encoded)) == encoded

    run_cases(check)


def test_quota_file_reader_random_contents(tmp_path):
    path = str(tmp_path / "quota")
    alphabet = b"0123456789 \n\t-+x.\xff\x00"

    def check(rng):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        if rng.random() < 0.3:
            data = str(rng.randrange(0, 2**63)).encode()
        with open(path, "wb") as quota:
            quota.write(data)
        value = btrfsdrv._read_quota_file(path)
        stripped = data.strip()
        if stripped and all(48 <= byte <= 57 for byte in stripped) and int(stripped) < 2**63:
            assert value == int(stripped)
        else:
            assert value is None

    run_cases(check, cases=2000)
    os.unlink(path)
    assert btrfsdrv._read_quota_file(path) is None


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

    monkeypatch.setattr(btrfsdrv, "walk_tree", walk)
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
