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
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
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


# The demo, the benchmarks and these tests share one loopback helper: it
# unmounts only below its own mount point and detaches only its own device.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
from loopback import LoopbackBtrfs  # noqa: E402
from loopback import mounts_below as _mounts_below  # noqa: E402


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


def sync_subvolumes(filesystem):
    """Wait until deleted subvolumes are cleaned.

    Each commit wakes the cleaner, which otherwise waits for the 30-second
    commit interval.  The short polls spare `subvolume sync` its 1-second
    sleeps, and it then waits only for whatever is left.
    """
    mountpoint = filesystem.mountpoint
    for _ in range(100):
        filesystem.btrfs("filesystem", "sync", mountpoint)
        if not filesystem.btrfs("subvolume", "list", "-d", mountpoint).strip():
            break
        time.sleep(0.01)
    # A descriptor left open in a deleted subvolume keeps it forever, so a
    # leak fails the test here instead of hanging it.
    subprocess.run(["btrfs", "subvolume", "sync", mountpoint], check=True, capture_output=True, timeout=300)


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
    # Inlined into the vendored btrfsdrv, the module's star export is btrfsdrv's own.
    star_exports_requests = ioctl_structs is not btrfsdrv

    for name, value in ioctl_structs.request_numbers().items():
        if star_exports_requests:
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
    ("1g", 1024**3), ("1T", 1024**4), ("1p", 2**50), ("0", 0), ("1.9", 1), ("7.99p", 799 * 2**50 // 100),
    ("9007199254740993", 2**53 + 1),
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
        # Other mount points may be any bytes, so the table is read as bytes.
        with open("/proc/self/mountinfo", "rb") as mountinfo:
            line = next(line for line in mountinfo if line.split()[4] == os.fsencode(home))
        assert b"shared:" not in line
    assert home not in _mounts_below(home)


def test_init_accepts_bytes_and_pathlike_home(fs):
    import pathlib
    for home in (os.fsencode(fs.path("bytes-home")), pathlib.Path(fs.path("path-home"))):
        with btrfsdrv.Driver(home) as driver:
            driver.create("layer")
            assert os.path.isdir(driver.get("layer"))
            assert isinstance(driver.get("layer"), str)


# Both tests run in tmp_path, so that a regression could only touch that directory.
@pytest.mark.parametrize("home", ["", b""])
def test_init_rejects_empty_home(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="invalid home '': it is empty"):
        btrfsdrv.Driver(home)


def test_cli_rejects_empty_home(tmp_path):
    result = subprocess.run([sys.executable, btrfsdrv.__file__, "--home", "", "list"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid home" in result.stderr


def test_init_rejects_home_that_is_a_file(fs):
    home = fs.path("home")
    with open(home, "w") as regular_file:
        regular_file.write("not a directory")
    with pytest.raises(NotADirectoryError, match="home is not a directory; move the file away") as raised:
        btrfsdrv.Driver(home)
    assert raised.value.filename == home


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
    sync_subvolumes(fs)
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
    sync_subvolumes(fs)
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
    root = create_open_layer(driver, "outer")
    btrfsdrv.create_subvolume(os.path.join(root, "direct"))
    os.makedirs(os.path.join(root, "a", "b", "c"))
    btrfsdrv.create_subvolume(os.path.join(root, "a", "b", "c", "deep"))
    btrfsdrv.create_subvolume(os.path.join(root, "a", "b", "c", "deep", "deeper"))
    btrfsdrv.create_snapshot(os.path.join(root, "direct"), os.path.join(root, "a", "ro"), read_only=True)
    driver.remove("outer")
    assert not driver.exists("outer")
    driver.put("outer")
    sync_subvolumes(fs)
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
    root = create_open_layer(driver, "busy")
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
        sync_subvolumes(fs)
        limits = qgroup_limits(fs)
        assert layer not in limits
        assert nested not in limits
        assert quota_is_enabled(fs)


@pytest.mark.parametrize("moment", ["get after limit cleared", "limit applied before delete",
                                    "limit applied after remove"])
def test_remove_with_concurrent_get_leaves_no_limit(fs, monkeypatch, moment):
    home = fs.path("home")
    size = 30 * 1024**2
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver, \
            btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as other:
        driver.create("sized", storage_opt={"size": "30m"})
        path = driver.get("sized")
        layer = btrfsdrv.subvolume_id(path)
        gets = []

        if moment == "get after limit cleared":
            original = btrfsdrv.Driver._clear_limit

            def clear_then_get(self, *arguments):
                quota_on = original(self, *arguments)
                if not gets:
                    gets.append(other.get("sized"))
                return quota_on

            monkeypatch.setattr(btrfsdrv.Driver, "_clear_limit", clear_then_get)
        elif moment == "limit applied after remove":
            # A get that opened the layer before the remove sets the limit after it.
            original = btrfsdrv.Driver._apply_limit

            def remove_then_apply(self, *arguments):
                driver.remove("sized")
                gets.append(path)
                return original(self, *arguments)

            monkeypatch.setattr(btrfsdrv.Driver, "_apply_limit", remove_then_apply)
            with pytest.raises(FileNotFoundError, match="another process removed it"):
                other._apply_quota_state("sized", path, size, True)
        else:
            # A get that read the quota file before the remove set it aside
            # applies the size it read.
            original = btrfsdrv.Driver._destroy_layer_subvolume

            def apply_then_destroy(self, *arguments):
                other._apply_quota_state("sized", path, size, True)
                gets.append(path)
                return original(self, *arguments)

            monkeypatch.setattr(btrfsdrv.Driver, "_destroy_layer_subvolume", apply_then_destroy)

        if moment != "limit applied after remove":
            driver.remove("sized")

        assert gets == [path]
        assert qgroup_limits(fs).get(layer) is None
        sync_subvolumes(fs)
        assert qgroup_limits(fs).get(layer) is None
        assert not os.path.exists(os.path.join(home, "quotas", "sized"))


def test_remove_full_layer_with_nested_subvolume_during_get(fs, monkeypatch):
    # A get between the limit's clear and the nested deletion must not set it again.
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver, \
            btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as other:
        driver.create("box", storage_opt={"size": "16m"})
        root = driver.get("box")
        btrfsdrv.create_subvolume(os.path.join(root, "nested"))
        with pytest.raises(OSError):
            with open(os.path.join(root, "fill"), "wb") as fill:
                while True:
                    fill.write(b"\1" * (1 << 20))
        original = btrfsdrv.Driver._clear_limit
        gets = []

        def clear_then_get(self, *arguments):
            quota_on = original(self, *arguments)
            if not gets:
                gets.append(other.get("box"))
            return quota_on

        monkeypatch.setattr(btrfsdrv.Driver, "_clear_limit", clear_then_get)
        driver.remove("box")

        assert gets == [root]
        assert not driver.exists("box")


@pytest.mark.parametrize("step", ["clear read-only flag", "destroy layer"])
def test_failed_remove_keeps_limit(fs, monkeypatch, step):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create("sized", storage_opt={"size": "30m"})
        root = driver.get("sized")
        btrfsdrv.create_subvolume(os.path.join(root, "nested"))
        layer = btrfsdrv.subvolume_id(root)

        def fail(*args, **kwargs):
            raise OSError(errno.EPERM, "injected: operation not permitted")

        if step == "clear read-only flag":
            monkeypatch.setattr(btrfsdrv, "_clear_read_only", fail)
        else:
            monkeypatch.setattr(btrfsdrv.Driver, "_destroy_layer_subvolume", fail)
        with pytest.raises(OSError, match="injected"):
            driver.remove("sized")
        monkeypatch.undo()

        assert driver.exists("sized")
        assert qgroup_limits(fs)[layer] == 30 * 1024**2
        assert driver.metadata("sized")["SizeLimit"] == str(30 * 1024**2)


def test_remove_full_sized_layer_with_nested_subvolume(fs):
    # The kernel charges deleting the nested subvolume's entry to the full layer.
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create_read_write("box", storage_opt={"size": "16m"})
        root = driver.get("box")
        btrfsdrv.create_subvolume(os.path.join(root, "nested"))
        with pytest.raises(OSError) as raised:
            with open(os.path.join(root, "fill"), "wb") as fill:
                while True:
                    fill.write(b"\1" * (1 << 20))
        assert raised.value.errno == errno.EDQUOT

        driver.remove("box")

        assert not driver.exists("box")
    assert_no_subvolumes(fs)


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


def test_status_reports_filesystem_quota_mode(home, caplog):
    with btrfsdrv.Driver(home, ["btrfs.min_space=0"]):
        pass
    with btrfsdrv.Driver(home, ["btrfs.quota_mode=simple"]) as driver:
        with caplog.at_level("WARNING", logger="btrfsdrv"):
            status = dict(driver.status())
        assert status["Quota Enabled"] == "true"
        assert status["Quota Mode"] == "full"
        assert "btrfs.quota_mode is simple" in caplog.text

        # Without CAP_SYS_ADMIN the mode comes from sysfs.
        with open_top(driver.home) as (fd, _):
            assert btrfsdrv._quota_mode_from_sysfs(fd, driver.home) == "full"


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
    root = create_open_layer(driver, "layer")
    os.mkdir(os.path.join(root, "dir"))
    with open(os.path.join(root, "dir", "data"), "wb") as output:
        output.write(b"x" * 1000)
    os.link(os.path.join(root, "dir", "data"), os.path.join(root, "hardlink"))
    os.symlink("dir/data", os.path.join(root, "symlink"))
    usage = driver.read_write_disk_usage("layer")
    assert usage.size == 1000 + len("dir/data")
    assert usage.inode_count == 4  # root, dir, data (twice linked), symlink


# Levels of the chain that the walk memory tests build. Full paths kept for
# every level take about 25 MB at this depth. The records that the walks keep
# per level took 870 to 1,200 bytes each under tracemalloc (Python 3.11).
WALK_TEST_DEPTH = 5000


def make_directory_chain(root, depth, name="d"):
    """Nest depth directories called name below root, without paths longer than PATH_MAX."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def peak_traced_bytes(function):
    """Return the peak of the memory that tracemalloc sees while function runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check_contents_removable(driver, layer_id):
    with btrfsdrv._Fd(os.open(driver.get(layer_id), os.O_RDONLY | os.O_DIRECTORY)) as fd:
        btrfsdrv._check_contents_removable(fd, driver.get(layer_id))


@pytest.mark.parametrize("operation", {
    "read_write_disk_usage": lambda driver: driver.read_write_disk_usage("layer"),
    "update_layer_id_map": lambda driver: driver.update_layer_id_map(
        "layer", None, ([btrfsdrv.IDMap(0, 100000, 65536)], [btrfsdrv.IDMap(0, 100000, 65536)])),
    "removal check": lambda driver: check_contents_removable(driver, "layer"),
}.items(), ids=lambda item: item[0])
def test_deep_chain_walk_memory_linear(driver, operation):
    name, run = operation
    driver.create("layer")
    make_directory_chain(driver.get("layer"), WALK_TEST_DEPTH)
    peak = peak_traced_bytes(lambda: run(driver))
    bound = WALK_TEST_DEPTH * 2048
    assert peak < bound, f"{name} peaked at {peak:,} bytes for {WALK_TEST_DEPTH:,} levels"


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


def test_delete_subvolume_refuses_mounts(fs):
    top, other = fs.path("top"), fs.path("other")
    btrfsdrv.create_subvolume(top)
    btrfsdrv.create_subvolume(top + "/nested")
    btrfsdrv.create_subvolume(other)
    btrfsdrv.create_subvolume(other + "/inner")
    before = fs.btrfs("subvolume", "list", fs.mountpoint)

    subprocess.run(["mount", "--bind", other, top + "/nested"], check=True)
    try:
        with pytest.raises(OSError, match="is mounted inside it") as error:
            btrfsdrv.delete_subvolume(top, recursive=True)
        assert error.value.errno == errno.EBUSY
    finally:
        subprocess.run(["umount", top + "/nested"], check=True)

    # The kernel would destroy the subvolume under the mount point, while
    # the checks and the nested subvolumes would be those of the mounted one.
    subprocess.run(["mount", "--bind", other, top], check=True)
    try:
        for recursive in (False, True):
            with pytest.raises(OSError, match="mount point") as error:
                btrfsdrv.delete_subvolume(top, recursive=recursive)
            assert error.value.errno == errno.EBUSY
    finally:
        subprocess.run(["umount", top], check=True)
    assert fs.btrfs("subvolume", "list", fs.mountpoint) == before


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


def test_cli_prints_path_bytes_in_any_encoding(driver):
    name = b"made-by-hand-\xff"
    os.mkdir(os.path.join(os.fsencode(driver.home), b"subvolumes", name))
    result = subprocess.run(
        [sys.executable, btrfsdrv.__file__, "--home", driver.home, "get", os.fsdecode(name)],
        capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii:strict"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == os.path.join(os.fsencode(driver.home), b"subvolumes", name) + b"\n"


def test_cli_output_to_closed_pipe(driver):
    driver.create("base")
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        result = subprocess.run([sys.executable, btrfsdrv.__file__, "--home", driver.home, "list"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert result.returncode == btrfsdrv.EXIT_FAILURE
    assert "Traceback" not in result.stderr


def test_cli_escapes_newline_in_id(fs):
    home = fs.path("home")
    created = run_cli(home, "create", "two\nlines")
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines()[0] == "id: two\\nlines"
    assert run_cli(home, "list").stdout.splitlines() == ["two\\nlines"]
    removed = run_cli(home, "remove", "two\nlines")
    assert removed.stdout.splitlines() == ["id: two\\nlines", "removed: True"]


def test_cli_create_list_remove(fs):
    home = fs.path("home")
    assert run_cli(home, "create", "base").returncode == 0
    assert run_cli(home, "create", "child", "--parent", "base", "--size", "8m").returncode == 0
    assert run_cli(home, "list").stdout.split() == ["base", "child"]
    assert run_cli(home, "exists", "child").returncode == 0
    assert run_cli(home, "exists", "nothing").returncode == 1
    invalid = run_cli(home, "exists", "../child")
    assert invalid.returncode == btrfsdrv.EXIT_USAGE
    assert "invalid layer id '../child'" in invalid.stderr
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


@pytest.mark.parametrize("layer_id", [b"\xff", os.fsdecode(b"caf\xe9")])
def test_create_rejects_id_that_is_not_utf8(driver, layer_id):
    with pytest.raises(ValueError, match="not valid UTF-8"):
        driver.create(layer_id)
    assert driver.list_layers() == []


def test_create_rejects_id_shaped_like_temporary_file(driver):
    with pytest.raises(ValueError, match="temporary files"):
        driver.create(".layer.0123456789ab.tmp", storage_opt={"size": "16m"})
    assert driver.list_layers() == []
    driver.create(".layer.tmp", storage_opt={"size": "16m"})
    btrfsdrv.Driver(driver.home).cleanup()  # init deletes stale temporary files
    assert driver.metadata(".layer.tmp")["SizeLimit"] == str(16 * 1024**2)


def test_cli_list_escapes_ids(driver):
    driver.create("two\nlines")
    driver.create("back\\slash")
    os.mkdir(os.path.join(os.fsencode(driver.home), b"subvolumes", b"made-by-hand-\xff"))

    plain = run_cli(driver.home, "list")
    as_json = run_cli(driver.home, "--json", "list")

    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == ["back\\\\slash", "made-by-hand-\\xff", "two\\nlines"]
    assert json.loads(as_json.stdout) == ["back\\slash", "made-by-hand-\\xff", "two\nlines"]


def test_cli_help_documents_exit_status():
    result = subprocess.run([sys.executable, btrfsdrv.__file__, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "exit status" in result.stdout



def make_traversable(path):
    """Add search permission for others to path and its ancestors below the temporary directory."""
    import tempfile
    top = os.path.realpath(tempfile.gettempdir())
    path = os.path.realpath(path)
    while path.startswith(top + "/"):
        os.chmod(path, os.stat(path).st_mode | 0o001)
        path = os.path.dirname(path)


def run_as_user(function, uid=65534, gid=65534):
    """Run function() in a forked child with the given uid and gid; re-raise its error."""
    import pickle
    import traceback
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        status = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            result = ("ok", function())
        except BaseException as error:  # reported to the parent
            result = ("error", (repr(error), getattr(error, "errno", None), traceback.format_exc()))
            status = 1
        with os.fdopen(write_end, "wb") as output:
            pickle.dump(result, output)
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"as uid {uid}: {value[0]} (errno {value[1]})\n{value[2]}")
    return value


def test_symlinked_quotas_directory_rejected(fs, tmp_path):
    home = fs.path("home")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep")
    os.makedirs(home)
    os.symlink(str(outside), os.path.join(home, "quotas"))
    with pytest.raises(btrfsdrv.DriverError, match="quotas is not a directory"):
        btrfsdrv.Driver(home)
    assert (outside / "victim").read_text() == "keep"


def test_quotas_swapped_for_symlink_after_init(driver, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep")
    os.symlink(str(outside), os.path.join(driver.home, "quotas"))
    with pytest.raises(OSError, match="not a symlink"):
        driver.create("sized", storage_opt={"size": "8m"})
    assert not driver.exists("sized")
    with pytest.raises(FileNotFoundError):
        driver.remove("victim")
    assert (outside / "victim").read_text() == "keep"
    assert sorted(os.listdir(outside)) == ["victim"]


def test_subvolumes_swapped_for_symlink_after_init(driver, tmp_path):
    outside = tmp_path / "outside"
    (outside / "layer").mkdir(parents=True)
    (outside / "layer" / "victim").write_text("keep")
    driver.create("layer")
    subvolumes = os.path.join(driver.home, "subvolumes")
    os.rename(subvolumes, subvolumes + ".real")
    os.symlink(str(outside), subvolumes)
    tar = make_tar([entry("new", data=b"written"), entry(".wh.victim")])
    attempts = {
        "apply_diff": lambda: driver.apply_diff("layer", io.BytesIO(tar)),
        "get": lambda: driver.get("layer"),
        "exists": lambda: driver.exists("layer"),
        "list_layers": driver.list_layers,
        "changes": lambda: driver.changes("layer"),
        "usage": lambda: driver.read_write_disk_usage("layer"),
        "metadata": lambda: driver.metadata("layer"),
        "update_layer_id_map": lambda: driver.update_layer_id_map("layer", None, None),
        "create": lambda: driver.create("other"),
        "remove": lambda: driver.remove("layer"),
    }
    for attempt in attempts.values():
        with pytest.raises(btrfsdrv.DriverError, match="subvolumes is not a directory"):
            attempt()
    assert sorted(os.listdir(outside / "layer")) == ["victim"]


def test_home_through_symlink(fs):
    real = fs.path("real-home")
    os.makedirs(real)
    link = fs.path("home-link")
    os.symlink(real, link)
    with btrfsdrv.Driver(link, ["btrfs.size=8m"]) as driver:
        assert driver.home == real
        driver.create("base")
        driver.create_read_write("box", "base")
        assert driver.metadata("box")["SizeLimit"] == str(8 * 1024**2)
    assert _mounts_below(real) == []


def test_remove_nested_subvolume_beyond_ino_lookup_limit(driver, fs):
    root = create_open_layer(driver, "deep")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(25):  # 25 * 201 bytes: beyond the 4080 bytes INO_LOOKUP returns
            os.mkdir(b"e" * 200, dir_fd=fd)
            child = os.open(b"e" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        btrfsdrv.create_subvolume(f"/proc/self/fd/{fd}/nested")
    finally:
        os.close(fd)
    driver.remove("deep")
    assert not driver.exists("deep")
    sync_subvolumes(fs)
    assert fs.btrfs("subvolume", "list", fs.mountpoint).strip() == ""


def test_remove_plain_layer_with_read_only_nested_subvolume(driver):
    layer = os.path.join(driver.home, "subvolumes", "plainro")
    os.mkdir(layer)
    btrfsdrv.create_subvolume(os.path.join(layer, "inner"))
    with open(os.path.join(layer, "inner", "file"), "w") as output:
        output.write("x")
    btrfsdrv.create_snapshot(os.path.join(layer, "inner"), os.path.join(layer, "ro"), read_only=True)
    driver.remove("plainro")
    assert not os.path.lexists(layer)


def nobody_home(fs):
    """Return a driver home on fs that uid 65534 owns and can reach."""
    home = fs.path("home")
    os.makedirs(home)
    os.chown(home, 65534, 65534)
    make_traversable(home)
    return home


def create_open_layer(driver, layer_id):
    """Create an empty layer, give its root mode 0755 so that its owner can fill it, and return the root."""
    driver.create(layer_id)
    root = driver.get(layer_id)
    os.chmod(root, 0o755)
    return root


def test_unprivileged_remove_of_read_only_directories(fs):
    home = nobody_home(fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "base")
        os.makedirs(os.path.join(root, "usr", "lib"))
        with open(os.path.join(root, "usr", "lib", "file"), "w") as output:
            output.write("x")
        os.chmod(os.path.join(root, "usr", "lib"), 0o555)
        os.makedirs(os.path.join(root, "secret"))
        os.chmod(os.path.join(root, "secret"), 0)
        os.chmod(root, 0o555)
        driver.remove("base")
        return driver.list_layers()

    assert run_as_user(scenario) == []


def test_unprivileged_remove_fails_before_deleting(fs):
    home = nobody_home(fs)
    run_as_user(lambda: btrfsdrv.Driver(home).create("mixed"))
    root = os.path.join(home, "subvolumes", "mixed")
    os.chmod(root, 0o755)
    os.makedirs(os.path.join(root, "a-root-directory"))
    write(os.path.join(root, "a-root-directory", "file"), b"root's")
    for index in range(3):
        write(os.path.join(root, f"user-{index}", "file"), b"user's")
        os.chown(os.path.join(root, f"user-{index}"), 65534, 65534)
        os.chown(os.path.join(root, f"user-{index}", "file"), 65534, 65534)
    os.chown(root, 65534, 65534)
    btrfsdrv.create_subvolume(os.path.join(root, "nested"))
    write(os.path.join(root, "nested", "data"), b"nested")
    os.chown(os.path.join(root, "nested"), 65534, 65534)
    os.chown(os.path.join(root, "nested", "data"), 65534, 65534)
    before = tree_digest(root)

    def scenario():
        with pytest.raises(PermissionError) as raised:
            btrfsdrv.Driver(home).remove("mixed")
        return raised.value.errno, str(raised.value)

    error, message = run_as_user(scenario)
    assert error == errno.EACCES
    assert "a-root-directory" in message
    assert tree_digest(root) == before


def subvolume_paths(filesystem):
    """Return the (id, path) pairs that `btrfs subvolume list` prints, without generations."""
    listed = filesystem.btrfs("subvolume", "list", filesystem.mountpoint)
    return [(line.split()[1], line.split()[-1]) for line in listed.splitlines() if line]


def test_unprivileged_remove_of_unwritable_top(tmp_path):
    # With user_subvol_rm_allowed, the kernel lets a caller without
    # CAP_SYS_ADMIN delete a subvolume only when it may write into the
    # subvolume's top directory. Here root owns the layer's top directory, so
    # the remove must fail before deleting the nested subvolumes, which this
    # caller could delete.
    with loopback_btrfs(tmp_path, mount_options=("user_subvol_rm_allowed",)) as fs:
        home = nobody_home(fs)
        with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
            driver.create("guarded", storage_opt={"size": "64m"})
        quota_file = os.path.join(home, "quotas", "guarded")
        for path in (os.path.join(home, "subvolumes"), os.path.join(home, "quotas"), quota_file):
            os.chown(path, 65534, 65534)
        root = os.path.join(home, "subvolumes", "guarded")
        sub = os.path.join(root, "sub")
        os.mkdir(sub)
        btrfsdrv.create_subvolume(os.path.join(sub, "nested"))
        write(os.path.join(sub, "nested", "file"), b"nested")
        btrfsdrv.create_subvolume(os.path.join(sub, "nested", "deeper"))
        write(os.path.join(sub, "nested", "deeper", "file"), b"deeper")
        for path in (sub, os.path.join(sub, "nested"), os.path.join(sub, "nested", "file"),
                     os.path.join(sub, "nested", "deeper"), os.path.join(sub, "nested", "deeper", "file")):
            os.chown(path, 65534, 65534)
        btrfsdrv.create_snapshot(os.path.join(sub, "nested"), os.path.join(sub, "read-only"), read_only=True)
        assert os.stat(root).st_uid == 0
        assert not os.stat(root).st_mode & 0o002

        digest = tree_digest(root)
        subvolumes = subvolume_paths(fs)
        flags = {name: _subvolume_flags(os.path.join(root, name))
                 for name in (".", "sub/nested", "sub/nested/deeper", "sub/read-only")}
        with open(quota_file, "rb") as quota:
            quota_content = quota.read()
        limits = qgroup_limits(fs)
        assert flags["sub/read-only"] & ioctl_structs.BTRFS_SUBVOL_RDONLY

        error, message = remove_as_user_fails(home, "guarded")

        assert error == errno.EACCES
        assert root in message
        assert "user_subvol_rm_allowed mount option and write access to its top directory" in message
        assert subvolume_paths(fs) == subvolumes
        assert tree_digest(root) == digest
        for name, value in flags.items():
            assert _subvolume_flags(os.path.join(root, name)) == value, name
        with open(quota_file, "rb") as quota:
            assert quota.read() == quota_content
        assert qgroup_limits(fs) == limits


def remove_as_user_fails(home, layer_id):
    """Remove layer_id as the unprivileged user of run_as_user, expect PermissionError, return its errno and text."""

    def scenario():
        with pytest.raises(PermissionError) as raised:
            btrfsdrv.Driver(home).remove(layer_id)
        return raised.value.errno, str(raised.value)

    return run_as_user(scenario)


@pytest.mark.parametrize("closed", ["d", ""], ids=["directory", "top"])
def test_unprivileged_remove_of_unsearchable_directory(open_fs, closed):
    # The owner's mode-0 directory hides the nested subvolume from
    # INO_LOOKUP_USER, which needs read and search permission on the path. A
    # container whose root is mapped to the layer's owner can chmod 0 its
    # root directory, the layer's top.
    home = nobody_home(open_fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "locked")
        os.makedirs(os.path.join(root, "d", "e"))
        btrfsdrv.create_subvolume(os.path.join(root, "d", "e", "nested"))
        os.chmod(os.path.join(root, closed), 0)
        driver.remove("locked")
        return driver.list_layers()

    assert run_as_user(scenario) == []


def test_unprivileged_remove_names_read_only_unopenable_top(open_fs):
    home = nobody_home(open_fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        driver.create("frozen")
        root = driver.get("frozen")
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.chmod(root, 0)
            btrfsdrv._set_subvolume_flags(fd, btrfsdrv.BTRFS_SUBVOL_RDONLY, root)
        finally:
            os.close(fd)
        with pytest.raises(OSError) as raised:
            driver.remove("frozen")
        # The flag cannot be cleared either: the ioctl needs an open
        # descriptor of the directory, which mode 0 denies its owner.
        with pytest.raises(PermissionError):
            os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        return raised.value.errno, str(raised.value)

    error, message = run_as_user(scenario)

    assert error == errno.EROFS
    assert os.path.join(home, "subvolumes", "frozen") in message
    assert "remove the layer as root" in message
    assert "/proc/self/fd" not in message
    assert _subvolume_flags(os.path.join(home, "subvolumes", "frozen")) & ioctl_structs.BTRFS_SUBVOL_RDONLY


def make_read_only(*paths):
    """Set the read-only flag of the subvolumes at paths, which this process must be able to open."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            btrfsdrv._set_subvolume_flags(fd, btrfsdrv.BTRFS_SUBVOL_RDONLY, path)
        finally:
            os.close(fd)


@pytest.mark.parametrize("mode", [0, 0o100, 0o300, 0o500])
def test_unprivileged_remove_of_read_only_layer_with_closed_directories(open_fs, mode):
    # The owner gives its directories owner rwx before deleting them, which
    # fails with EROFS in a read-only subvolume. The owner may clear a
    # subvolume's read-only flag, and the remove does so.
    home = nobody_home(open_fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "frozen")
        outer = os.path.join(root, "x", "y", "sv1")
        inner = os.path.join(outer, "sv2")
        os.makedirs(os.path.dirname(outer))
        btrfsdrv.create_subvolume(outer)
        btrfsdrv.create_subvolume(inner)
        write(os.path.join(inner, "q", "r", "file"))
        write(os.path.join(root, "d", "e", "file"))
        os.chmod(os.path.join(inner, "q"), mode)
        make_read_only(inner, outer)
        os.chmod(os.path.join(root, "d"), mode)
        os.chmod(os.path.join(root, "x", "y"), mode)
        make_read_only(root)
        driver.remove("frozen")
        return driver.list_layers(), os.listdir(os.path.join(home, "subvolumes"))

    assert run_as_user(scenario) == ([], [])
    sync_subvolumes(open_fs)
    assert subvolume_paths(open_fs) == []


@pytest.mark.parametrize("mode", [0o500, 0o100])
def test_unprivileged_remove_of_closed_read_only_nested_top(open_fs, mode):
    # The read-only flag of a subvolume can only be cleared through a
    # descriptor of its top directory, which opening for reading gives.
    home = nobody_home(open_fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "frozen")
        nested = os.path.join(root, "d", "nested")
        os.mkdir(os.path.dirname(nested))
        btrfsdrv.create_subvolume(nested)
        write(os.path.join(nested, "e", "file"))
        fd = os.open(nested, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.chmod(nested, mode)
            btrfsdrv._set_subvolume_flags(fd, btrfsdrv.BTRFS_SUBVOL_RDONLY, nested)
        finally:
            os.close(fd)
        try:
            driver.remove("frozen")
        except OSError as error:
            return error.errno, str(error)
        return driver.list_layers()

    result = run_as_user(scenario)

    if mode & 0o400:
        assert result == []
    else:
        error, message = result
        nested = os.path.join(home, "subvolumes", "frozen", "d", "nested")
        assert error == errno.EROFS
        assert nested in message
        assert "remove the layer as root" in message
        assert _subvolume_flags(nested) & ioctl_structs.BTRFS_SUBVOL_RDONLY


def make_layer_with_zone(home, fill):
    """Create layer "mixed" as uid 65534 with its nested subvolume "zone" holding a file, then fill(root).

    Children are deleted in reverse path order, so "zone" goes first.
    Return the layer's path.
    """

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "mixed")
        btrfsdrv.create_subvolume(os.path.join(root, "zone"))
        write(os.path.join(root, "zone", "precious"))
        fill(root)

    run_as_user(scenario)
    return os.path.join(home, "subvolumes", "mixed")


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_unprivileged_remove_refuses_foreign_nested_subvolume(tmp_path, read_only):
    # With user_subvol_rm_allowed the owner deletes its own nested subvolumes
    # with SNAP_DESTROY, but not root's, so the remove must refuse before it
    # deletes the owner's.
    with loopback_btrfs(tmp_path, mount_options=("user_subvol_rm_allowed",)) as fs:
        home = nobody_home(fs)

        def shared_directory(root):
            os.mkdir(os.path.join(root, "shared"))
            os.chmod(os.path.join(root, "shared"), 0o777)

        root = make_layer_with_zone(home, shared_directory)
        foreign = os.path.join(root, "shared", "root's")
        btrfsdrv.create_subvolume(foreign)
        write(os.path.join(foreign, "file"))
        if read_only:
            make_read_only(foreign, root)
        subvolumes = subvolume_paths(fs)
        digest = tree_digest(root)

        error, message = remove_as_user_fails(home, "mixed")

        assert error == errno.EACCES
        assert foreign in message
        assert subvolume_paths(fs) == subvolumes
        assert tree_digest(root) == digest
        assert bool(_subvolume_flags(root) & ioctl_structs.BTRFS_SUBVOL_RDONLY) == read_only


def test_unprivileged_refused_remove_keeps_modes(open_fs):
    # The owner's closed directories get owner rwx while the remove checks
    # the layer and lists its nested subvolumes. The refusal at root's
    # subvolume sets their modes back.
    home = nobody_home(open_fs)
    run_as_user(lambda: btrfsdrv.Driver(home).create("mixed"))
    root = os.path.join(home, "subvolumes", "mixed")
    os.chmod(root, 0o755)
    os.makedirs(os.path.join(root, "a", "deeper"))
    btrfsdrv.create_subvolume(os.path.join(root, "a", "deeper", "own"))
    write(os.path.join(root, "b", "file"))
    os.mkdir(os.path.join(root, "c"))
    for directory, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            os.chown(os.path.join(directory, name), 65534, 65534)
    btrfsdrv.create_subvolume(os.path.join(root, "c", "root's"))
    for name, mode in (("a/deeper", 0o100), ("a", 0), ("b", 0o300)):
        os.chmod(os.path.join(root, name), mode)
    subvolumes = subvolume_paths(open_fs)
    digest = tree_digest(root)

    error, message = remove_as_user_fails(home, "mixed")

    assert error == errno.EACCES
    assert os.path.join(root, "c", "root's") in message
    assert subvolume_paths(open_fs) == subvolumes
    assert tree_digest(root) == digest


@pytest.mark.parametrize("closed", ["a", "a/own"])
def test_unprivileged_remove_repairs_unwritable_nested_top(tmp_path, closed):
    # SNAP_DESTROY needs write access to the subvolume's top and to the
    # directory holding it. The owner gives both owner rwx, and the kernel
    # then deletes the subvolume with root's directory in it, as it deletes
    # the layer's own subvolume with root's directory beside it.
    with loopback_btrfs(tmp_path, mount_options=("user_subvol_rm_allowed",)) as fs:
        home = nobody_home(fs)

        def own_subvolume(root):
            os.mkdir(os.path.join(root, "a"))
            btrfsdrv.create_subvolume(os.path.join(root, "a", "own"))

        root = make_layer_with_zone(home, own_subvolume)
        write(os.path.join(root, "a", "own", "root's", "file"))
        write(os.path.join(root, "root's", "file"))
        os.chmod(os.path.join(root, closed), 0o500)

        assert run_as_user(lambda: btrfsdrv.Driver(home).remove("mixed")) is None

        assert not os.path.lexists(root)
        sync_subvolumes(fs)
        assert subvolume_paths(fs) == []


def test_unprivileged_remove_names_open_file_limit(fs):
    # Each read-only subvolume that the remove makes writable keeps a
    # descriptor open until the remove ends.
    import resource

    home = nobody_home(fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "many")
        for index in range(80):
            nested = os.path.join(root, f"s{index}")
            btrfsdrv.create_subvolume(nested)
            os.mkdir(os.path.join(nested, "d"))
            fd = os.open(nested, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.chmod(nested, 0o500)
                btrfsdrv._set_subvolume_flags(fd, btrfsdrv.BTRFS_SUBVOL_RDONLY, nested)
            finally:
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        with pytest.raises(OSError) as raised:
            driver.remove("many")
        return raised.value.errno, str(raised.value)

    error, message = run_as_user(scenario)

    assert error == errno.EMFILE
    assert "open-file limit" in message


def test_unprivileged_remove_of_full_layer_names_limit(open_fs):
    # Without CAP_SYS_ADMIN the remove cannot clear the limit, and the kernel
    # charges deleting a nested subvolume's entry to the full layer.
    home = open_fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"], uid_maps=[(0, NOBODY, 1)],
                         gid_maps=[(0, NOBODY, 1)]) as driver:
        driver.create("limited", storage_opt={"size": "8m"})
    for path in (home, os.path.join(home, "quotas"), os.path.join(home, "quotas", "limited")):
        os.chown(path, NOBODY, NOBODY)
    make_traversable(home)

    def scenario():
        root = btrfsdrv.Driver(home).get("limited")
        os.chmod(root, 0o755)
        for index in range(3):
            btrfsdrv.create_subvolume(os.path.join(root, f"n{index}"))
        return write_until_error(os.path.join(root, "fill"))

    assert run_as_user(scenario) == errno.EDQUOT

    def remove():
        with pytest.raises(OSError) as raised:
            btrfsdrv.Driver(home).remove("limited")
        return raised.value.errno, str(raised.value)

    error, message = run_as_user(remove)

    assert error == errno.EDQUOT
    assert "qgroup size limit" in message
    assert "delete some files from the layer" in message


def test_unprivileged_refused_remove_warns_of_lost_setgid(fs):
    # chmod drops the setgid bit of a directory outside the caller's groups,
    # so the refusal cannot set that mode back, and says so.
    home = nobody_home(fs)
    run_as_user(lambda: btrfsdrv.Driver(home).create("mixed"))
    root = os.path.join(home, "subvolumes", "mixed")
    os.chmod(root, 0o755)
    os.makedirs(os.path.join(root, "g", "root's"))
    os.chown(os.path.join(root, "g"), NOBODY, 100)
    os.chmod(os.path.join(root, "g"), 0o2000)

    def scenario():
        error, warnings = failed_remove_warnings(home, "mixed")
        assert error in (errno.EACCES, errno.EPERM)
        return warnings

    warnings = run_as_user(scenario)

    assert any(os.path.join(root, "g") in warning and "setgid" in warning for warning in warnings), warnings


def test_unprivileged_refused_remove_of_closed_top_warns_nothing(fs):
    # The refusal sets the top's mode 0 back only after it has set the
    # layer's limit again, which opens the layer.
    home = nobody_home(fs)
    run_as_user(lambda: btrfsdrv.Driver(home).create("mixed"))
    root = os.path.join(home, "subvolumes", "mixed")
    btrfsdrv.create_subvolume(os.path.join(root, "root's"))
    os.chmod(root, 0)

    def scenario():
        error, warnings = failed_remove_warnings(home, "mixed")
        assert error in (errno.EACCES, errno.EPERM)
        return warnings

    assert run_as_user(scenario) == []
    assert stat.S_IMODE(os.stat(root).st_mode) == 0


def failed_remove_warnings(home, layer_id):
    """Remove layer_id, expect OSError, and return its errno and the driver's warnings (run as another user)."""
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("btrfsdrv").addHandler(handler)
    with pytest.raises(OSError) as raised:
        btrfsdrv.Driver(home).remove(layer_id)
    return raised.value.errno, warnings


def test_unprivileged_busy_remove_keeps_top_mode(open_fs):
    # The remove gives the mode-0 top owner rwx to open it, then waits for
    # the lock in vain; the mode goes back.
    home = nobody_home(open_fs)
    run_as_user(lambda: btrfsdrv.Driver(home).create("busy"))
    root = os.path.join(home, "subvolumes", "busy")
    os.chmod(root, 0)

    locked = btrfsdrv._open_layer_for_writing(root)
    try:
        error, warnings = run_as_user(lambda: failed_remove_warnings(home, "busy"))
    finally:
        btrfsdrv._unlock_and_close_layer(locked)

    assert error == errno.EBUSY
    assert warnings == []
    assert stat.S_IMODE(os.stat(root).st_mode) == 0


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o444])
def test_unprivileged_remove_of_unsearchable_top(open_fs, mode):
    home = nobody_home(open_fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "closed")
        write(os.path.join(root, "a", "b", "file"))
        os.chmod(root, mode)
        driver.remove("closed")
        return driver.list_layers()

    assert run_as_user(scenario) == []


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o444])
@pytest.mark.parametrize("closed", ["d", "nest"])
def test_unprivileged_remove_of_unsearchable_inner_directory(open_fs, mode, closed):
    # The owner may open such a directory but not search or write it.
    home = nobody_home(open_fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "closed")
        btrfsdrv.create_subvolume(os.path.join(root, "nest"))
        for directory in ("d", "nest"):
            write(os.path.join(root, directory, "sub", "file"))
            write(os.path.join(root, directory, "file"))
        os.chmod(os.path.join(root, closed), mode)
        driver.remove("closed")
        return driver.list_layers()

    assert run_as_user(scenario) == []


def test_unprivileged_changes_name_closed_directory_and_parent(fs):
    home = nobody_home(fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        driver.create("p")
        os.chmod(driver.get("p"), 0o755)
        write(os.path.join(driver.get("p"), "a", "b", "f"))
        driver.create("c", "p")
        os.chmod(os.path.join(driver.get("c"), "a", "b"), 0)
        with pytest.raises(PermissionError) as closed_directory:
            driver.changes("c", "p")
        os.chmod(os.path.join(driver.get("c"), "a", "b"), 0o755)
        os.chmod(driver.get("p"), 0)
        with pytest.raises(PermissionError) as closed_parent:
            driver.changes("c", "p")
        with pytest.raises(PermissionError) as closed_create:
            driver.create("c2", "p")
        return [(error.value.filename, str(error.value)) for error in (closed_directory, closed_parent, closed_create)]

    (directory, message), (parent, parent_message), (created, create_message) = run_as_user(scenario)

    assert directory == os.path.join(home, "subvolumes", "c", "a", "b")
    assert "read or search permission" in message
    assert parent == os.path.join(home, "subvolumes", "p")
    assert "run chmod u+rwx on it as its owner" in parent_message
    assert created == os.path.join(home, "subvolumes", "p")
    assert "chmod u+rwx" in create_message


def test_unprivileged_changes_name_unsearchable_directory(fs):
    home = nobody_home(fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        root = create_open_layer(driver, "layer")
        write(os.path.join(root, "a", "b"))
        os.chmod(os.path.join(root, "a"), 0o600)
        with pytest.raises(PermissionError) as raised:
            driver.changes("layer")
        return raised.value.filename, str(raised.value)

    filename, message = run_as_user(scenario)

    assert filename == os.path.join(home, "subvolumes", "layer", "a", "b")
    assert "search permission" in message


def test_unprivileged_get_names_closed_top(fs):
    home = nobody_home(fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        driver.create("layer")
        os.chmod(driver.get("layer"), 0)
        with pytest.raises(PermissionError) as raised:
            driver.get("layer")
        return raised.value.filename, str(raised.value)

    filename, message = run_as_user(scenario)

    assert filename == os.path.join(home, "subvolumes", "layer")
    assert "run chmod u+rwx on it as its owner" in message


def test_unprivileged_remove_names_immutable_file(fs):
    # Without user_subvol_rm_allowed the owner empties the layer file by
    # file, which an immutable file stops.
    home = nobody_home(fs)
    run_as_user(lambda: btrfsdrv.Driver(home).create("frozen"))
    root = os.path.join(home, "subvolumes", "frozen")
    os.chmod(root, 0o755)
    write(os.path.join(root, "d", "file"))
    for path in (os.path.join(root, "d"), os.path.join(root, "d", "file")):
        os.chown(path, 65534, 65534)
    chattr("+i", os.path.join(root, "d", "file"))
    try:
        def scenario():
            with pytest.raises(PermissionError) as raised:
                btrfsdrv.Driver(home).remove("frozen")
            return type(raised.value).__name__, raised.value.errno, str(raised.value)

        kind, error, message = run_as_user(scenario)
    finally:
        chattr("-i", os.path.join(root, "d", "file"))

    assert kind == "_InodeFlagError"
    assert error == errno.EPERM
    assert message.count("failed") == 1, message
    assert f"chattr -i {os.path.join(root, 'd', 'file')}" in message
    assert "CAP_SYS_ADMIN" not in message


def test_unprivileged_refused_remove_keeps_read_only_flags(fs):
    # Without user_subvol_rm_allowed the owner empties the layer file by
    # file. Its mode-0 directories in read-only subvolumes need the flag
    # cleared before the check finds root's directory in the way; the
    # refused remove sets the flag again.
    home = nobody_home(fs)
    run_as_user(lambda: btrfsdrv.Driver(home).create("frozen"))
    root = os.path.join(home, "subvolumes", "frozen")
    nested = os.path.join(root, "own", "nested")
    os.makedirs(os.path.dirname(nested))
    btrfsdrv.create_subvolume(nested)
    os.makedirs(os.path.join(nested, "q", "root's"))
    for path in (root, os.path.join(root, "own"), nested, os.path.join(nested, "q")):
        os.chown(path, 65534, 65534)
    for path in (os.path.join(root, "own"), os.path.join(nested, "q")):
        os.chmod(path, 0)
    make_read_only(nested, root)
    subvolumes = subvolume_paths(fs)

    error, message = remove_as_user_fails(home, "frozen")

    assert error == errno.EACCES
    assert os.path.join(nested, "q", "root's") in message
    assert subvolume_paths(fs) == subvolumes
    for path in (root, nested):
        assert _subvolume_flags(path) & ioctl_structs.BTRFS_SUBVOL_RDONLY, path
    for path in (os.path.join(root, "own"), os.path.join(nested, "q")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0, path


def test_unprivileged_remove_names_foreign_unsearchable_directory(tmp_path):
    with loopback_btrfs(tmp_path, mount_options=("user_subvol_rm_allowed",)) as fs:
        home = nobody_home(fs)
        run_as_user(lambda: btrfsdrv.Driver(home).create("guarded"))
        root = os.path.join(home, "subvolumes", "guarded")
        os.chmod(root, 0o755)
        os.mkdir(os.path.join(root, "etc"))
        foreign = os.path.join(root, "etc", "foreign")
        os.mkdir(foreign, 0o700)
        btrfsdrv.create_subvolume(os.path.join(foreign, "nested"))
        subvolumes = subvolume_paths(fs)
        digest = tree_digest(root)

        error, message = remove_as_user_fails(home, "guarded")

        assert error == errno.EACCES
        assert foreign in message
        assert "chmod" in message
        assert subvolume_paths(fs) == subvolumes
        assert tree_digest(root) == digest


def test_get_without_cap_sys_admin_keeps_limit(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("sized", storage_opt={"size": "16m"})
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import btrfsdrv; "
              "print(btrfsdrv.Driver(sys.argv[2], ['btrfs.min_space=1m']).get('sized'))")
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    result = subprocess.run(["unshare", "-Ur", sys.executable, "-c", script, module_dir, home],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == os.path.join(home, "subvolumes", "sized")


def test_get_clears_limit_without_quota_file(driver, fs):
    # A snapshot's qgroup starts with its source's limit; a create killed
    # before clearing it leaves the child limited with no quota file.
    driver.create("base", storage_opt={"size": "16m"})
    driver.create("child", "base")
    child_id = btrfsdrv.subvolume_id(driver.get("child"))
    fs.btrfs("qgroup", "limit", str(16 * 1024**2), f"0/{child_id}", fs.mountpoint)
    driver.get("child")
    assert qgroup_limits(fs).get(child_id) is None
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("base"))] == 16 * 1024**2


@pytest.mark.parametrize("content", [b"32M", b"", b"-5"])
def test_get_keeps_limit_with_invalid_quota_file(driver, fs, content):
    driver.create("box", storage_opt={"size": "32m"})
    with open(os.path.join(driver.home, "quotas", "box"), "wb") as quota:
        quota.write(content)
    driver.get("box")
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("box"))] == 32 * 1024**2


def test_create_removed_before_it_finishes(driver, monkeypatch):
    original = btrfsdrv.Driver._finish_layer

    def remove_then_finish(self, *args, **kwargs):
        # Another process removes the new layer before create finishes it.
        monkeypatch.setattr(btrfsdrv.Driver, "_finish_layer", original)
        driver.remove("layer")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(btrfsdrv.Driver, "_finish_layer", remove_then_finish)
    with pytest.raises(OSError, match="removed the layer during the create") as raised:
        driver.create("layer")
    assert raised.value.errno == errno.ESTALE
    assert not driver.exists("layer")


@pytest.mark.parametrize("arguments, content", [
    pytest.param(["list"], "output of list", id="list"),
    pytest.param(["--json", "changes", "base"], "output of changes", id="changes-json"),
    pytest.param(["changes", "base"], "changes", id="changes"),
    pytest.param(["diff", "base"], "diff", id="diff"),
])
def test_cli_output_to_full_disk(driver, arguments, content):
    driver.create("base")
    write(os.path.join(driver.get("base"), "file"), b"x" * 100_000)
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, btrfsdrv.__file__, "--home", driver.home, *arguments],
                                stdout=full, stderr=subprocess.PIPE, text=True)
    assert result.returncode == btrfsdrv.EXIT_FAILURE
    assert f"writing the {content} to standard output failed: No space left on device" in result.stderr
    assert "free space" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


_DIFF_WITH_FULL_LAYER_FILESYSTEM = """
import errno, io, sys
import btrfsdrv

class FailingStream(io.RawIOBase):
    def __init__(self, path):
        self.path = path

    def readable(self):
        return True

    def readinto(self, buffer):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)

def diff(self, layer_id, parent=None):
    return io.BufferedReader(FailingStream(self.get(layer_id)))

btrfsdrv.Driver.diff = diff
sys.exit(btrfsdrv.main(["--home", sys.argv[1], "diff", "base"]))
"""


def test_cli_layer_enospc_names_layer(driver):
    # The diff stream fails with ENOSPC naming the layer, as when the layer's
    # filesystem is full. Standard output is full too, but nothing reached it.
    driver.create("base")
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {module_dir!r})\n"
                                 + _DIFF_WITH_FULL_LAYER_FILESYSTEM, driver.home],
                                stdout=full, stderr=subprocess.PIPE, text=True)
    assert result.returncode == btrfsdrv.EXIT_FAILURE
    assert result.stderr == f"btrfsdrv: {driver.get('base')}: No space left on device\n"


def test_get_refuses_mount_on_layer(driver, fs):
    driver.create("sized", storage_opt={"size": "16m"})
    layer = driver.get("sized")
    other = fs.path("other")
    btrfsdrv.create_subvolume(other)
    _bind_mount(other, layer)
    try:
        with pytest.raises(OSError, match="mount point") as raised:
            driver.get("sized")
        assert raised.value.errno == errno.EBUSY
    finally:
        subprocess.run(["umount", layer], check=True)
    assert qgroup_limits(fs).get(btrfsdrv.subvolume_id(other)) is None


@pytest.mark.parametrize("arguments, status", [
    (["exists", "base"], btrfsdrv.EXIT_SUCCESS),
    (["remove", "base"], btrfsdrv.EXIT_SUCCESS),
    (["diff", "base"], btrfsdrv.EXIT_USAGE),
])
def test_cli_with_stdout_closed(driver, arguments, status):
    driver.create("base")
    command = " ".join([shlex.quote(sys.executable), shlex.quote(btrfsdrv.__file__), "--home",
                        shlex.quote(driver.home)] + arguments)
    result = subprocess.run(["sh", "-c", command + " >&-"], capture_output=True, text=True)
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr


def test_unprivileged_create_owns_layer(fs):
    home = nobody_home(fs)

    def scenario():
        driver = btrfsdrv.Driver(home)
        driver.create("base")
        st = os.stat(driver.get("base"))
        with pytest.raises(OSError) as raised:
            driver.create("sized", storage_opt={"size": "8m"})
        return st.st_uid, st.st_gid, str(raised.value), driver.list_layers()

    uid, gid, message, layers = run_as_user(scenario)
    assert (uid, gid) == (65534, 65534)
    assert "CAP_SYS_ADMIN" in message
    assert layers == ["base"]


def test_unreadable_quotas_directory_names_permission(fs):
    home = fs.path("home")
    os.makedirs(os.path.join(home, "quotas"), mode=0o700)
    os.makedirs(os.path.join(home, "subvolumes"))
    os.chmod(home, 0o755)
    os.chmod(os.path.join(home, "subvolumes"), 0o755)
    make_traversable(home)

    def scenario():
        with pytest.raises(PermissionError) as raised:
            btrfsdrv.Driver(home)
        return str(raised.value)

    message = run_as_user(scenario)
    assert "open quotas directory failed: Permission denied; run as root or as the owner" in message
    assert "symlink" not in message


def test_concurrent_inits_on_one_home(fs):
    home = fs.path("home")
    os.makedirs(home)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import btrfsdrv\n"
        "for _ in range(20):\n"
        "    with btrfsdrv.Driver(sys.argv[2]) as driver:\n"
        "        driver.exists('x')\n"
    )
    module_dir = os.path.dirname(btrfsdrv.__file__)
    processes = [subprocess.Popen([sys.executable, "-c", script, module_dir, home], stderr=subprocess.PIPE)
                 for _ in range(16)]
    results = [(process.wait(), process.stderr.read().decode()) for process in processes]
    for status, stderr in results:
        assert status == 0, stderr
    assert _mounts_below(home) == []


def test_huge_quota_file_is_ignored(fs, caplog):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=0"]) as driver:
        driver.create("layer")
        os.makedirs(os.path.join(driver.home, "quotas"), exist_ok=True)
        with open(os.path.join(driver.home, "quotas", "layer"), "w") as quota:
            quota.write(str(2**64 + 1024))
        with caplog.at_level("WARNING", logger="btrfsdrv"):
            driver.get("layer")
        assert "below 2**63" in caplog.text
        assert qgroup_limits(fs).get(btrfsdrv.subvolume_id(driver.get("layer"))) is None


def test_fifo_quota_file_does_not_block_get(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        driver.create("layer")
        os.makedirs(os.path.join(home, "quotas"))
        os.mkfifo(os.path.join(home, "quotas", "layer"))
    result = run_cli(home, "get", "layer")  # would block forever on open(2) of the FIFO
    assert result.returncode == 0
    assert "not a regular file" in result.stderr


def test_usage_skips_mounts_inside_layer(driver, tmp_path):
    root = create_open_layer(driver, "layer")
    os.mkdir(os.path.join(root, "mnt"))
    host = tmp_path / "host"
    host.mkdir()
    (host / "data").write_bytes(b"x" * 4096)
    subprocess.run(["mount", "--bind", str(host), os.path.join(root, "mnt")], check=True)
    try:
        assert driver.read_write_disk_usage("layer") == btrfsdrv.DiskUsage(0, 1)  # the root only
    finally:
        subprocess.run(["umount", os.path.join(root, "mnt")], check=True)


@pytest.mark.parametrize("storage_opt", [[("size", "1m")], "size=1m", {"size": "9" * 5000}])
def test_create_rejects_malformed_storage_opt(driver, storage_opt):
    with pytest.raises(ValueError, match="invalid"):
        driver.create("layer", storage_opt=storage_opt)
    assert not driver.exists("layer")


def tar_bytes(*members):
    """Return a PAX tar of (TarInfo, data or None) pairs."""
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def test_remap_refuses_entry_swapped_for_symlink(driver, tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("host file")
    os.chmod(outside, 0o600)
    root = create_open_layer(driver, "layer")
    setuid_file = os.path.join(root, "tool")
    with open(setuid_file, "w") as output:
        output.write("binary")
    os.chmod(setuid_file, 0o4755)
    st = os.lstat(setuid_file)
    os.unlink(setuid_file)
    os.symlink(str(outside), setuid_file)  # what a running container can do mid-remap
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as raised:
            btrfsdrv._chown_entry(root_fd, "tool", st, 1000, 1000, ((), ()), setuid_file)
    finally:
        os.close(root_fd)
    assert raised.value.errno == errno.ESTALE
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o600
    assert os.stat(outside).st_uid == 0


@pytest.mark.parametrize("field, value", [
    ("mtime", "1e30"), ("mtime", "inf"), ("mtime", "-1e19"), ("uid", "4294967296"), ("gid", "-2"),
])
def test_apply_rejects_out_of_range_header_values(driver, field, value):
    import io
    import tarfile
    driver.create("base")
    base = driver.get("base")
    os.chmod(base, 0o755)
    with open(os.path.join(base, "a"), "w") as output:
        output.write("keep me")
    driver.create("layer", "base")
    entry = tarfile.TarInfo("a")
    entry.type = tarfile.DIRTYPE
    entry.pax_headers = {field: value}
    with pytest.raises(ValueError, match="entry 'a' at offset 0"):
        driver.apply_diff("layer", io.BytesIO(tar_bytes((entry, None))))
    with open(os.path.join(driver.get("layer"), "a")) as data:
        assert data.read() == "keep me"


def test_failed_directory_entry_keeps_existing_file(driver):
    import io
    import tarfile
    driver.create("base")
    base = driver.get("base")
    os.chmod(base, 0o755)
    with open(os.path.join(base, "a"), "w") as output:
        output.write("keep me")
    driver.create("layer", "base")
    entry = tarfile.TarInfo("a")
    entry.type = tarfile.DIRTYPE
    entry.uid = entry.gid = 70000
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    with pytest.raises(ValueError, match="has no host id"):
        driver.apply_diff("layer", io.BytesIO(tar_bytes((entry, None))), uid_maps=maps, gid_maps=maps)
    with open(os.path.join(driver.get("layer"), "a")) as data:
        assert data.read() == "keep me"
    big = tarfile.TarInfo("a")
    big.type = tarfile.DIRTYPE
    big.pax_headers = {"SCHILY.xattr.user.big": "x" * 70000}
    with pytest.raises(ValueError, match="more than 65536"):
        driver.apply_diff("layer", io.BytesIO(tar_bytes((big, None))))
    assert os.path.isfile(os.path.join(driver.get("layer"), "a"))
    capability = tarfile.TarInfo("a")
    capability.type = tarfile.DIRTYPE
    capability.pax_headers = {"SCHILY.xattr.security.capability": "abc"}
    with pytest.raises(ValueError, match="invalid security.capability"):
        driver.apply_diff("layer", io.BytesIO(tar_bytes((capability, None))))
    assert os.path.isfile(os.path.join(driver.get("layer"), "a"))


def test_apply_removes_leftover_temporaries(driver):
    import io
    import tarfile
    root = create_open_layer(driver, "layer")
    leftover = os.path.join(root, ".btrfsdrv-apply-0123456789abcdef")
    with open(leftover, "w") as output:
        output.write("from a killed apply")
    image_file = os.path.join(root, ".btrfsdrv-image-file")
    with open(image_file, "w") as output:
        output.write("image content")
    link = tarfile.TarInfo("d/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    driver.apply_diff("layer", io.BytesIO(tar_bytes((link, None), (tarfile.TarInfo("d/f"), b"data"))))
    assert not os.path.lexists(leftover)
    assert os.path.exists(image_file)
    assert sorted(os.listdir(os.path.join(root, "d"))) == ["f", "link"]


@pytest.mark.parametrize("search", ["privileged", "unprivileged"])
def test_apply_removes_leftovers_in_nested_subvolumes(driver, monkeypatch, caplog, search):
    import io
    import tarfile
    root = create_open_layer(driver, "layer")
    btrfsdrv.create_subvolume(os.path.join(root, "sv"))
    os.mkdir(os.path.join(root, "sv", "d"))
    btrfsdrv.create_subvolume(os.path.join(root, "sv", "d", "inner"))
    file_leftover = os.path.join(root, "sv", ".btrfsdrv-apply-0123456789abcdef")
    write(file_leftover, b"from a killed apply")
    directory_leftover = os.path.join(root, "sv", "d", "inner", ".btrfsdrv-apply-fedcba9876543210")
    write(os.path.join(directory_leftover, "file"), b"moved aside by a killed apply")
    image_file = os.path.join(root, "sv", ".btrfsdrv-image-file")
    write(image_file, b"image content")
    btrfsdrv.create_snapshot(os.path.join(root, "sv"), os.path.join(root, "ro"), read_only=True)
    if search == "unprivileged":
        def without_privilege(*args):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(btrfsdrv, "_find_nested_privileged", without_privilege)

    driver.apply_diff("layer", io.BytesIO(tar_bytes((tarfile.TarInfo("f"), b"data"))))

    assert not os.path.lexists(file_leftover)
    assert not os.path.lexists(directory_leftover)
    assert os.path.exists(image_file)
    # The read-only snapshot keeps its copy of the leftover, with a warning.
    assert os.path.exists(os.path.join(root, "ro", ".btrfsdrv-apply-0123456789abcdef"))
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    read_only_warnings = [message for message in warnings if os.path.join(root, "ro") + ":" in message]
    assert len(read_only_warnings) == 1, warnings
    assert "Read-only file system" in read_only_warnings[0]


def rejected_entry(kind):
    """Return an entry below the new directories n1/n2 that the apply rejects."""
    if kind == "long-symlink":
        return entry("n1/n2/link", tarfile.SYMTYPE, linkname="x" * 5000)
    if kind == "cross-subvolume-link":
        return entry("n1/n2/link", tarfile.LNKTYPE, linkname="sv/f")
    info, data = {
        "fifo-user-xattr": entry("n1/n2/fifo", tarfile.FIFOTYPE),
        "device-user-xattr": entry("n1/n2/null", tarfile.CHRTYPE),
        "directory-invalid-capability": entry("n1/n2/d", tarfile.DIRTYPE, mode=0o755),
    }[kind]
    if kind == "device-user-xattr":
        info.devmajor, info.devminor = 1, 3
    if kind == "directory-invalid-capability":
        info.pax_headers = {"SCHILY.xattr.security.capability": "junk"}
    else:
        info.pax_headers = {"SCHILY.xattr.user.a": "v"}
    return info, data


@pytest.mark.parametrize("kind, error, message", [
    pytest.param(kind, error, message, id=kind) for kind, error, message in [
        ("long-symlink", ValueError, "symlink target is 5000 bytes"),
        ("fifo-user-xattr", ValueError, "'user.a' is not allowed on a FIFO"),
        ("device-user-xattr", ValueError, "'user.a' is not allowed on a character device"),
        ("directory-invalid-capability", ValueError, "invalid security.capability"),
        ("cross-subvolume-link", OSError, "Invalid cross-device link"),
    ]
])
def test_failed_entry_removes_parents_it_made(driver, kind, error, message):
    driver.create("layer")
    root = driver.get("layer")
    btrfsdrv.create_subvolume(root + "/sv")
    write(root + "/sv/f", b"in a nested subvolume")
    with pytest.raises(error, match=message):
        driver.apply_diff("layer", io.BytesIO(make_tar([rejected_entry(kind)])))
    assert sorted(os.listdir(root)) == ["sv"]


def test_failed_entry_keeps_existing_parents(driver):
    driver.create("layer")
    root = driver.get("layer")
    btrfsdrv.create_subvolume(root + "/sv")
    write(root + "/sv/f", b"in a nested subvolume")
    os.mkdir(root + "/old")
    raw = make_tar([entry("old/new/link", tarfile.LNKTYPE, linkname="sv/f")])
    with pytest.raises(OSError) as raised:
        driver.apply_diff("layer", io.BytesIO(raw))
    assert raised.value.errno == errno.EXDEV
    assert os.listdir(root + "/old") == []
    assert sorted(os.listdir(root)) == ["old", "sv"]


def test_apply_diff_rejects_a_path(driver):
    driver.create("layer")
    with pytest.raises(TypeError, match="readable binary file object"):
        driver.apply_diff("layer", "/tmp/layer.tar")


def gzip_with_name(raw, name=b"", comment=b""):
    """Compress raw as one gzip member whose header carries a file name and a comment."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = compressor.compress(raw) + compressor.flush()
    flags = (0x08 if name else 0) | (0x10 if comment else 0)
    header = b"\x1f\x8b\x08" + bytes([flags]) + b"\0\0\0\0\0\xff"
    for field in (name, comment):
        if field:
            header += field + b"\0"
    return header + body + struct.pack("<II", zlib.crc32(raw), len(raw))


@pytest.mark.parametrize("field", ["name", "comment"])
def test_apply_rejects_long_gzip_header_strings(tmp_path, field):
    # Go's compress/gzip takes 511 bytes of name or comment and rejects more.
    raw = make_tar([entry("file", data=b"data")])
    assert apply(tmp_path, gzip_with_name(raw, **{field: b"n" * 511})) == 4
    with pytest.raises(ValueError, match=f"the {'file name' if field == 'name' else 'comment'} in its header"):
        apply(tmp_path, gzip_with_name(raw, **{field: b"n" * 512}))


def gzip_with_header_crc(raw, crc=None, name=b""):
    """Compress raw as one gzip member with a header CRC (FHCRC), by default the right one."""
    header = b"\x1f\x8b\x08" + bytes([0x02 | (0x08 if name else 0)]) + b"\0\0\0\0\0\x03"
    if name:
        header += name + b"\0"
    if crc is None:
        crc = zlib.crc32(header) & 0xFFFF
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = compressor.compress(raw) + compressor.flush()
    return header + struct.pack("<H", crc) + body + struct.pack("<II", zlib.crc32(raw), len(raw))


def test_apply_checks_gzip_header_crc(tmp_path):
    raw = make_tar([entry("file", data=b"data")])
    assert apply(tmp_path, gzip_with_header_crc(raw, name=b"layer.tar")) == 4
    with pytest.raises(ValueError, match="the CRC of its header does not match"):
        apply(tmp_path, gzip_with_header_crc(raw, crc=0x1234))


def test_apply_names_xattr_too_large_for_btrfs(driver):
    driver.create("layer")
    info, data = entry("file", data=b"x")
    info.pax_headers = {"SCHILY.xattr.user.big": "v" * 16300}
    with pytest.raises(OSError, match=r"set extended attribute user\.big \(16300 bytes\) failed") as raised:
        driver.apply_diff("layer", io.BytesIO(make_tar([(info, data)])))
    assert raised.value.errno == errno.ENOSPC
    assert "metadata node" in str(raised.value)
    assert not os.path.lexists(os.path.join(driver.get("layer"), "file"))


@pytest.mark.parametrize("name", ["x/y/file", "x/y/.wh.gone", "x/y/.wh..wh..opq"])
def test_apply_makes_parents_owned_by_container_root(fs, name):
    # containers/storage makes missing parents owned by the host ids of
    # container root, so a diff of the layer maps them back to 0:0.
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    with btrfsdrv.Driver(fs.path("home"), uid_maps=maps, gid_maps=maps) as driver:
        driver.create("layer")
        driver.apply_diff("layer", io.BytesIO(make_tar([entry(name, data=b"data")])))
        root = driver.get("layer")
        for directory in ("x", "x/y"):
            st = os.stat(os.path.join(root, directory))
            assert (st.st_uid, st.st_gid) == (100000, 100000), directory
            assert stat.S_IMODE(st.st_mode) == 0o755
        exported = members(read_diff(root, uid_maps=maps, gid_maps=maps))
        assert (exported["x"].uid, exported["x"].gid) == (0, 0)


def test_apply_over_limit_names_it(fs):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create("small", storage_opt={"size": "8m"})
        raw = make_tar([entry(f"f{index}", data=b"\1" * (1 << 20)) for index in range(16)])
        with pytest.raises(OSError, match="the layer reached its size limit") as raised:
            driver.apply_diff("small", io.BytesIO(raw))
        assert raised.value.errno == errno.EDQUOT
        assert raised.value.filename == driver.get("small")


@pytest.mark.parametrize("mapped", [False, True], ids=["no-maps", "maps"])
def test_apply_parents_inherit_setgid(fs, mapped):
    # mkdir in a setgid directory passes on the bit and the group, as it
    # does for containers/storage.
    maps = [btrfsdrv.IDMap(0, 100000, 65536)] if mapped else None
    with btrfsdrv.Driver(fs.path("home"), uid_maps=maps, gid_maps=maps) as driver:
        driver.create("layer")
        info, _ = entry("s", tarfile.DIRTYPE, mode=0o2755)
        info.gid = 100
        driver.apply_diff("layer", io.BytesIO(make_tar([(info, None), entry("s/new/f", data=b"x")])))
        root = driver.get("layer")
        parent = os.stat(os.path.join(root, "s"))
        created = os.stat(os.path.join(root, "s", "new"))
        assert stat.S_IMODE(created.st_mode) == 0o2755
        assert created.st_gid == parent.st_gid
        assert created.st_uid == (100000 if mapped else 0)


def test_apply_deep_parents_under_maps_climb_nothing(fs, monkeypatch):
    # Owning each parent as it is made keeps a deep entry linear in depth.
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    climbs = []
    open_directory = btrfsdrv._open_directory

    def counting(path, dir_fd=None):
        if path in ("..", b".."):
            climbs.append(path)
        return open_directory(path, dir_fd)

    with btrfsdrv.Driver(fs.path("home"), uid_maps=maps, gid_maps=maps) as driver:
        driver.create("layer")
        monkeypatch.setattr(btrfsdrv, "_open_directory", counting)
        driver.apply_diff("layer", io.BytesIO(make_tar([entry("a/" * 200 + "f", data=b"x")])))
        monkeypatch.undo()
        assert os.stat(os.path.join(driver.get("layer"), *(["a"] * 200))).st_uid == 100000
    assert len(climbs) < 10


def test_apply_diff_rejects_a_text_stream(driver):
    driver.create("layer")
    with pytest.raises(TypeError, match=r"open the tar with open\(path, 'rb'\)"):
        driver.apply_diff("layer", io.StringIO("hello"))


@pytest.mark.parametrize("xattr, value", [("user.big", "A" * 20000)])
def test_directory_entry_failing_in_kernel_keeps_file(driver, xattr, value):
    import io
    import tarfile
    root = create_open_layer(driver, "layer")
    with open(os.path.join(root, "victim"), "w") as output:
        output.write("important data")
    entry = tarfile.TarInfo("victim")
    entry.type = tarfile.DIRTYPE
    entry.mode = 0o755
    entry.pax_headers = {f"SCHILY.xattr.{xattr}": value}
    with pytest.raises(OSError, match="entry 'victim' at offset 0"):
        driver.apply_diff("layer", io.BytesIO(tar_bytes((entry, None))))
    with open(os.path.join(root, "victim")) as data:
        assert data.read() == "important data"
    assert [name for name in os.listdir(root) if name.startswith(".btrfsdrv-")] == []


@pytest.mark.parametrize("mapping", [(0, 2**32, 1), (0, 2**32 - 1, 1), (2**32 - 1, 0, 1)])
def test_id_maps_reject_ids_beyond_32_bits(fs, mapping):
    with pytest.raises(ValueError, match="ids must stay at or below"):
        btrfsdrv.Driver(fs.path("home"), uid_maps=[mapping], gid_maps=[(0, 0, 1)])


def test_apply_inside_nested_subvolume(driver):
    import io
    import tarfile
    root = create_open_layer(driver, "layer")
    btrfsdrv.create_subvolume(os.path.join(root, "sv"))
    for name in ("old", "f2", "f3"):
        with open(os.path.join(root, "sv", name), "w") as output:
            output.write(name)
    new_file = tarfile.TarInfo("sv/old")
    directory = tarfile.TarInfo("sv/f2")
    directory.type = tarfile.DIRTYPE
    symlink = tarfile.TarInfo("sv/f3")
    symlink.type = tarfile.SYMTYPE
    symlink.linkname = "x"
    driver.apply_diff("layer", io.BytesIO(tar_bytes((new_file, b"new"), (directory, None), (symlink, None))))
    with open(os.path.join(root, "sv", "old")) as data:
        assert data.read() == "new"
    assert os.path.isdir(os.path.join(root, "sv", "f2"))
    assert os.readlink(os.path.join(root, "sv", "f3")) == "x"
    assert sorted(os.listdir(os.path.join(root, "sv"))) == ["f2", "f3", "old"]


def test_remap_checks_every_owner_first(driver):
    driver.create("layer")
    root = driver.get("layer")
    for name, owner in (("a", 100000), ("m", 5), ("z", 100001)):
        with open(os.path.join(root, name), "w") as output:
            output.write(name)
        os.chown(os.path.join(root, name), owner, owner)
    old = [btrfsdrv.IDMap(0, 100000, 200000)]
    new = [btrfsdrv.IDMap(0, 150000, 200000)]
    for _ in range(2):
        with pytest.raises(ValueError, match="outside the old ID maps; nothing was changed"):
            driver.update_layer_id_map("layer", (old, old), (new, new))
        owners = {name: os.lstat(os.path.join(root, name)).st_uid for name in "amz"}
        assert owners == {"a": 100000, "m": 5, "z": 100001}


def test_remap_owner_outside_maps_names_layer(driver):
    driver.create("layer")
    root = driver.get("layer")
    os.mkdir(os.path.join(root, "d0"))
    os.chown(os.path.join(root, "d0"), 5, 5)
    old = [btrfsdrv.IDMap(0, 100000, 65536)]
    with pytest.raises(ValueError) as raised:
        driver.update_layer_id_map("layer", (old, old), None)
    message = str(raised.value)
    assert os.path.join(driver.home, "subvolumes", "layer") in message
    assert "'/d0'" in message
    assert "owner 5:5 is outside the old ID maps" in message
    assert "to_container" in message
    assert "nothing was changed" in message


def test_remap_owner_outside_new_maps_names_layer(driver):
    driver.create("layer")
    root = driver.get("layer")
    os.mkdir(os.path.join(root, "d0"))
    os.chown(os.path.join(root, "d0"), 100000 + 70000, 100000 + 70000)
    old = [btrfsdrv.IDMap(0, 100000, 100000)]
    new = [btrfsdrv.IDMap(0, 200000, 65536)]
    with pytest.raises(ValueError) as raised:
        driver.update_layer_id_map("layer", (old, old), (new, new))
    message = str(raised.value)
    assert os.path.join(driver.home, "subvolumes", "layer") in message
    assert "'/d0'" in message
    assert "container owner 70000:70000 is outside the new ID maps" in message
    assert "to_host" in message


WALKS = {
    "changes": lambda driver: driver.changes("layer"),
    "diff_size": lambda driver: driver.diff_size("layer"),
    "update_layer_id_map": lambda driver: driver.update_layer_id_map("layer", None, None),
}


@pytest.mark.parametrize("operation", sorted(WALKS))
def test_walk_entry_vanished_names_layer(driver, monkeypatch, operation):
    driver.create("layer")
    root = driver.get("layer")
    write(os.path.join(root, "x0"), b"data")
    original = btrfsdrv._list_dir

    def list_then_remove(dir_fd):
        # Another process deletes x0 after the walk listed it.
        entries = original(dir_fd)
        if any(entry.name == "x0" for entry in entries):
            os.unlink("x0", dir_fd=dir_fd)
        return entries

    monkeypatch.setattr(btrfsdrv, "_list_dir", list_then_remove)
    with pytest.raises(OSError) as raised:
        WALKS[operation](driver)
    assert raised.value.errno == errno.ESTALE
    assert raised.value.filename == os.path.join(driver.home, "subvolumes", "layer", "x0")
    assert "'/x0'" in raised.value.strerror
    assert "stop whatever writes to the layer" in raised.value.strerror


@pytest.mark.parametrize("operation", ["diff_size", "diff"])
@pytest.mark.parametrize("victim", ["d/x0", "d", "d-symlink"])
def test_changed_entry_vanished_names_layer(driver, monkeypatch, operation, victim):
    driver.create("parent")
    driver.create_read_write("layer", "parent")
    root = driver.get("layer")
    write(os.path.join(root, "d", "x0"), b"data")
    original = btrfsdrv._layer_changes_fast

    def list_then_remove(*args):
        # Another process deletes the entry after its change was listed.
        changes = original(*args)
        path = os.path.join(root, victim)
        if victim == "d-symlink":
            # A container replaces the directory with a symlink.
            os.rename(os.path.join(root, "d"), os.path.join(root, "old"))
            os.symlink("/etc", os.path.join(root, "d"))
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return changes

    monkeypatch.setattr(btrfsdrv, "_layer_changes_fast", list_then_remove)
    with pytest.raises(OSError) as raised:
        if operation == "diff":
            with driver.diff("layer", "parent") as stream:
                stream.read()
        else:
            driver.diff_size("layer", "parent")

    assert raised.value.errno == errno.ESTALE
    assert raised.value.filename == os.path.join(root, victim if victim != "d-symlink" else "d/x0")
    assert "stop whatever writes to the layer" in raised.value.strerror


@pytest.mark.parametrize("operation", sorted(WALKS))
@pytest.mark.parametrize("mutation", ["replace", "remove", "symlink"])
def test_walk_directory_replaced_names_layer(driver, monkeypatch, operation, mutation):
    driver.create("layer")
    root = driver.get("layer")
    os.makedirs(os.path.join(root, "d0", "x2"))
    original = btrfsdrv._open_directory_for_reading

    def change_then_open(name, dir_fd=None):
        # Another process changes x2 after the walk read its stat.
        if name == "x2":
            os.rename("x2", "x2.old", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            if mutation == "replace":
                os.mkdir("x2", dir_fd=dir_fd)
            elif mutation == "symlink":
                os.symlink("x2.old", "x2", dir_fd=dir_fd)
        return original(name, dir_fd)

    monkeypatch.setattr(btrfsdrv, "_open_directory_for_reading", change_then_open)
    with pytest.raises(OSError) as raised:
        WALKS[operation](driver)
    assert raised.value.errno == errno.ESTALE
    assert raised.value.filename == os.path.join(driver.home, "subvolumes", "layer", "d0", "x2")
    assert "'/d0/x2'" in raised.value.strerror
    assert "stop whatever writes to the layer" in raised.value.strerror


def test_changes_parent_directory_replaced_names_parent(driver, monkeypatch):
    driver.create("base")
    os.makedirs(os.path.join(driver.get("base"), "d0"))
    driver.create("layer")
    os.makedirs(os.path.join(driver.get("layer"), "d0"))
    parent_root = os.path.join(driver.home, "subvolumes", "base")
    original = btrfsdrv._open_directory_for_reading

    def change_then_open(name, dir_fd=None):
        # Another process replaces d0 of the parent layer after the walk read its stat.
        if name == "d0" and dir_fd is not None and os.readlink(f"/proc/self/fd/{dir_fd}") == parent_root:
            os.rename("d0", "d0.old", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.mkdir("d0", dir_fd=dir_fd)
        return original(name, dir_fd)

    monkeypatch.setattr(btrfsdrv, "_open_directory_for_reading", change_then_open)
    with pytest.raises(OSError) as raised:
        driver.changes("layer", "base")
    assert raised.value.errno == errno.ESTALE
    assert raised.value.filename == os.path.join(parent_root, "d0")
    assert "'/d0'" in raised.value.strerror


def inode_flags(path):
    flags = ctypes.c_int()  # the kernel copies an int, whatever linux/fs.h declares
    _ioctl(path, ioctl_structs.FS_IOC_GETFLAGS, flags)
    return flags.value & (ioctl_structs.FS_IMMUTABLE_FL | ioctl_structs.FS_APPEND_FL)


def test_remap_changes_immutable_entries(driver):
    driver.create("layer")
    root = driver.get("layer")
    write(root + "/dir/immutable", b"x", mode=0o4755)
    write(root + "/dir/append-only", b"x")
    os.mkdir(root + "/locked")
    chattr("+i", root + "/dir/immutable", root + "/locked")
    chattr("+a", root + "/dir/append-only")
    new = [btrfsdrv.IDMap(0, 100000, 65536)]
    try:
        driver.update_layer_id_map("layer", None, (new, new))
        for name in ("dir/immutable", "dir/append-only", "locked"):
            assert os.stat(os.path.join(root, name)).st_uid == 100000, name
        assert stat.S_IMODE(os.stat(root + "/dir/immutable").st_mode) == 0o4755
        assert inode_flags(root + "/dir/immutable") == ioctl_structs.FS_IMMUTABLE_FL
        assert inode_flags(root + "/locked") == ioctl_structs.FS_IMMUTABLE_FL
        assert inode_flags(root + "/dir/append-only") == ioctl_structs.FS_APPEND_FL
    finally:
        chattr("-i", root + "/dir/immutable", root + "/locked")
        chattr("-a", root + "/dir/append-only")


def test_remap_rejects_read_only_nested_subvolume(driver):
    driver.create("layer")
    root = driver.get("layer")
    write(root + "/a", b"a")
    btrfsdrv.create_subvolume(root + "/nested")
    write(root + "/nested/file", b"x")
    btrfsdrv.create_snapshot(root + "/nested", root + "/read-only", read_only=True)
    new = [btrfsdrv.IDMap(0, 100000, 65536)]
    with pytest.raises(OSError, match=r"btrfs property set .*/read-only ro false") as raised:
        driver.update_layer_id_map("layer", None, (new, new))
    assert raised.value.errno == errno.EROFS
    assert raised.value.filename == root + "/read-only"
    for name in ("a", "nested", "nested/file", "read-only/file"):
        assert os.stat(os.path.join(root, name)).st_uid == 0, name


def test_remap_skips_snapshot_placeholders(driver):
    driver.create("P")
    parent = driver.get("P")
    write(parent + "/file", b"x")
    btrfsdrv.create_subvolume(parent + "/nested")
    write(parent + "/nested/inside", b"x")
    driver.create_read_write("C", "P")
    child = driver.get("C")
    # The snapshot has an empty placeholder directory in place of the nested
    # subvolume, and chown on it changes nothing.
    assert os.lstat(child + "/nested").st_ino == ioctl_structs.BTRFS_EMPTY_SUBVOL_DIR_OBJECTID
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]

    driver.update_layer_id_map("C", None, (maps, maps))
    assert os.lstat(child + "/file").st_uid == 100000
    driver.update_layer_id_map("C", (maps, maps), None)
    assert os.lstat(child + "/file").st_uid == 0
    driver.update_layer_id_map("C", None, (maps, maps))
    assert os.lstat(child + "/file").st_uid == 100000
    assert os.lstat(child + "/nested").st_uid == 0


def test_diff_exports_snapshot_placeholder_owner(driver):
    # The placeholder has the owner that the kernel shows, as for any entry.
    driver.create("P")
    parent = driver.get("P")
    os.mkdir(parent + "/users")
    os.chown(parent + "/users", 1000, 1000)
    btrfsdrv.create_subvolume(parent + "/users/nested")
    os.chown(parent + "/users/nested", 1000, 1000)
    write(parent + "/users/nested/inside", b"x")
    driver.create_read_write("C", "P")
    placeholder = os.lstat(driver.get("C") + "/users/nested")
    assert placeholder.st_ino == ioctl_structs.BTRFS_EMPTY_SUBVOL_DIR_OBJECTID

    changed = members(read_diff(driver.get("C"), parent))

    assert changed["users/nested"].isdir()
    assert changed["users/nested"].uid == placeholder.st_uid
    assert changed["users/nested"].gid == placeholder.st_gid


def test_diff_exports_unmapped_snapshot_placeholder_as_root(driver):
    # A remap changes no placeholder, so one that the kernel loaded before
    # the remap can show an owner that the maps do not cover.
    driver.create("P")
    parent = driver.get("P")
    btrfsdrv.create_subvolume(parent + "/nested")
    write(parent + "/nested/inside", b"x")
    driver.create_read_write("C", "P")
    child = driver.get("C")
    write(child + "/file", b"x")
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    driver.update_layer_id_map("C", None, (maps, maps))

    full = members(read_diff(child, uid_maps=maps, gid_maps=maps))
    assert full["nested"].isdir()
    assert (full["nested"].uid, full["nested"].gid) == (0, 0)
    assert (full["file"].uid, full["file"].gid) == (0, 0)

    changed = members(read_diff(child, parent, uid_maps=maps, gid_maps=maps))
    assert changed["nested"].isdir()
    assert (changed["nested"].uid, changed["nested"].gid) == (0, 0)
    assert "nested/.wh.inside" in changed


def test_remap_error_names_layer_path(driver, monkeypatch):
    driver.create("layer")
    root = driver.get("layer")
    write(root + "/dir/file", b"x")

    def fail(inode, st, uid, gid, uid_maps, path):
        raise OSError(errno.EIO, "Input/output error", inode)

    monkeypatch.setattr(btrfsdrv, "_set_owner", fail)
    new = [btrfsdrv.IDMap(0, 100000, 65536)]
    with pytest.raises(OSError, match="change owner failed") as raised:
        driver.update_layer_id_map("layer", None, (new, new))
    assert raised.value.errno == errno.EIO
    assert raised.value.filename == root + "/dir"


def test_diff_skips_non_utf8_xattr_name(driver, caplog):
    import tarfile
    root = create_open_layer(driver, "layer")
    with open(os.path.join(root, "x"), "w") as output:
        output.write("x")
    os.setxattr(os.path.join(root, "x"), b"user.\xff\xfe", b"v")
    os.setxattr(os.path.join(root, "x"), "user.ok", b"kept")
    with caplog.at_level("WARNING", logger="btrfsdrv"), driver.diff("layer") as stream:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            headers = {member.name: dict(member.pax_headers) for member in archive}
    assert headers["x"]["SCHILY.xattr.user.ok"] == "kept"
    assert "not UTF-8" in caplog.text


def test_apply_removes_xattrs_missing_from_directory(driver):
    driver.create("base")
    base = driver.get("base")
    os.mkdir(base + "/d")
    os.setxattr(base + "/d", "user.t", b"old")
    os.setxattr(base + "/d", "user.keep", b"kept")
    os.setxattr(base + "/d", "trusted.local", b"not carried")
    driver.create("child", "base")
    os.removexattr(driver.get("child") + "/d", "user.t")
    with driver.diff("child", "base") as stream:
        raw = stream.read()
    driver.create("target", "base")
    driver.apply_diff("target", io.BytesIO(raw))
    merged = driver.get("target") + "/d"
    assert "user.t" not in os.listxattr(merged)
    assert os.getxattr(merged, "user.keep") == b"kept"
    assert os.getxattr(merged, "trusted.local") == b"not carried"


def test_diff_skips_xattr_name_with_equals(driver, caplog):
    driver.create("layer")
    root = driver.get("layer")
    write(root + "/x", b"x")
    os.setxattr(root + "/x", "user.a=b", b"v")
    os.setxattr(root + "/x", "user.ok", b"kept")
    with caplog.at_level("WARNING", logger="btrfsdrv"), driver.diff("layer") as stream:
        raw = stream.read()
    driver.create("copy")
    driver.apply_diff("copy", io.BytesIO(raw))
    names = os.listxattr(driver.get("copy") + "/x")
    assert os.getxattr(driver.get("copy") + "/x", "user.ok") == b"kept"
    assert "user.a" not in names
    assert "user.a=b" not in names
    assert "contains '='" in caplog.text


def whiteout_named_layer(driver, name):
    """Make layer "box", a snapshot of "base" (/etc/passwd, /data/keep), that adds a file at name."""
    driver.create("base")
    base = driver.get("base")
    os.chmod(base, 0o755)
    write(base + "/etc/passwd", b"root")
    write(base + "/data/keep", b"k")
    driver.create_read_write("box", "base")
    write(driver.get("box") + "/" + name, b"")


@pytest.mark.parametrize("name, entry_path", [
    ("/.wh.etc", "/.wh.etc"),
    ("/data/.wh..wh..opq", "/data/.wh..wh..opq"),
    ("/.wh..wh.plnk/f", "/.wh..wh.plnk"),
])
def test_driver_diff_rejects_whiteout_names(driver, name, entry_path):
    whiteout_named_layer(driver, name)
    assert Change(entry_path, ADD) in driver.changes("box", "base")
    assert Change(entry_path, ADD) in driver.changes("box")
    message = f"{entry_path!r}.* would be read as a whiteout"
    for parent in ("base", None):
        with pytest.raises(ValueError, match=message):
            driver.diff("box", parent)  # raised before a stream exists
        with pytest.raises(ValueError, match=message):
            driver.diff_size("box", parent)


def set_many_xattrs(path, count=300):
    """Give path count user xattrs with 250-byte names: more names than listxattr(2) returns."""
    for index in range(count):
        name = f"user.{index:03d}"
        os.setxattr(path, name + "x" * (250 - len(name)), b"v")


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_diff_names_entry_with_huge_xattr_list(driver, kind):
    root = create_open_layer(driver, "layer")
    if kind == "file":
        write(root + "/d/big", b"x")
    else:
        os.makedirs(root + "/d/big")
    set_many_xattrs(root + "/d/big")
    with pytest.raises(OSError, match=r"listxattr\(2\) can return") as raised:
        with driver.diff("layer") as stream:
            stream.read()
    assert raised.value.errno == errno.E2BIG
    assert raised.value.filename == "/d/big"

    driver.create("child", "layer")
    os.removexattr(driver.get("child") + "/d/big", "user.000" + "x" * 242)
    with pytest.raises(OSError, match=r"listxattr\(2\) can return") as raised:
        driver.diff("child", "layer")
    assert raised.value.errno == errno.E2BIG
    assert raised.value.filename == "/d/big"


def test_apply_names_directory_with_huge_xattr_list(driver):
    driver.create("layer")
    names = [f"user.{index:03d}" for index in range(300)]
    names = [name + "x" * (250 - len(name)) for name in names]
    first, _ = entry("d", tarfile.DIRTYPE, mode=0o755)
    first.pax_headers = {"SCHILY.xattr." + name: "v" for name in names}
    again, _ = entry("d", tarfile.DIRTYPE, mode=0o700)
    raw = make_tar([(first, None), entry("d/keep", data=b"kept"), (again, None)])
    with pytest.raises(OSError, match=r"'d'.*listxattr\(2\) can return") as raised:
        driver.apply_diff("layer", io.BytesIO(raw))
    assert raised.value.errno == errno.E2BIG
    directory = driver.get("layer") + "/d"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755
    assert os.getxattr(directory, names[0]) == b"v"
    assert os.getxattr(directory, names[-1]) == b"v"
    with open(directory + "/keep", "rb") as data:
        assert data.read() == b"kept"


def make_special_hard_links(root):
    """Add a symlink, a FIFO and a character device to root, each with a second name."""
    os.makedirs(root + "/links")
    os.symlink("../target", root + "/links/s")
    os.mkfifo(root + "/links/f")
    os.mknod(root + "/links/n", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for name in ("s", "f", "n"):
        os.link(root + "/links/" + name, root + "/links/" + name + "2", follow_symlinks=False)


def assert_special_hard_links(root):
    for name in ("s", "f", "n"):
        first = os.lstat(root + "/links/" + name)
        second = os.lstat(root + "/links/" + name + "2")
        assert second.st_ino == first.st_ino, name
        assert first.st_nlink == 2, name
    assert os.readlink(root + "/links/s2") == "../target"


def test_driver_diff_keeps_special_hard_links(driver):
    driver.create("base")
    write(driver.get("base") + "/etc/passwd", b"root")
    driver.create_read_write("layer", "base")
    make_special_hard_links(driver.get("layer"))

    with driver.diff("layer", "base") as stream:
        raw = stream.read()
    driver.create_read_write("copy", "base")
    driver.apply_diff("copy", io.BytesIO(raw))
    assert driver.changes("copy", "layer") == []
    assert_special_hard_links(driver.get("copy"))

    with driver.diff("layer") as stream:
        raw = stream.read()
    driver.create_read_write("whole")
    driver.apply_diff("whole", io.BytesIO(raw))
    assert driver.changes("whole", "layer") == []
    assert_special_hard_links(driver.get("whole"))


@pytest.mark.parametrize("kind", ["pax", "longname"])
def test_apply_rejects_huge_extended_header(driver, kind):
    import gzip
    import io
    import tarfile
    driver.create("layer")
    entry = tarfile.TarInfo("f")
    if kind == "pax":
        entry.pax_headers = {"comment": "x" * (2 << 20)}
        data = tar_bytes((entry, b"data"))
    else:
        entry.name = "n" * (2 << 20)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
            entry.size = 4
            archive.addfile(entry, io.BytesIO(b"data"))
        data = buffer.getvalue()
    with pytest.raises(ValueError, match="larger than 1048576") as raised:
        driver.apply_diff("layer", io.BytesIO(gzip.compress(data)))
    assert len(str(raised.value)) < 1000
    assert os.listdir(driver.get("layer")) == []


def test_failed_create_spares_layer_that_replaced_it(driver, monkeypatch):
    driver.create("base")
    original = btrfsdrv.Driver._finish_layer

    def finish_after_race(self, *args, **kwargs):
        # Another process removes the new layer and creates one with the same id.
        monkeypatch.setattr(btrfsdrv.Driver, "_finish_layer", original)
        driver.remove("layer")
        driver.create("layer", "base")
        raise OSError(errno.EIO, "injected failure")

    monkeypatch.setattr(btrfsdrv.Driver, "_finish_layer", finish_after_race)
    with pytest.raises(OSError, match="injected failure"):
        driver.create("layer")
    assert driver.exists("layer")
    assert btrfsdrv.is_subvolume(driver.get("layer"))

def test_create_leaves_layer_that_replaced_it_alone(driver, fs, monkeypatch):
    driver.create("base")
    original = btrfsdrv.Driver._finish_layer

    def finish_after_race(self, *args, **kwargs):
        # Another process removes the new layer and creates a sized one with the same id.
        monkeypatch.setattr(btrfsdrv.Driver, "_finish_layer", original)
        driver.remove("layer")
        driver.create("layer", "base", storage_opt={"size": "8m"})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(btrfsdrv.Driver, "_finish_layer", finish_after_race)
    with pytest.raises(OSError, match="another process") as raised:
        driver.create("layer")

    assert raised.value.errno == errno.ESTALE
    assert raised.value.filename == os.path.join(driver.home, "subvolumes", "layer")
    assert driver.metadata("layer")["SizeLimit"] == str(8 * 1024**2)
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("layer"))] == 8 * 1024**2


def test_sized_create_removed_before_quota_file(driver, fs, monkeypatch):
    driver.create("base")
    original = btrfsdrv._write_file_atomically

    def remove_then_write(*args, **kwargs):
        # Another process removes the new layer before its quota file exists.
        monkeypatch.setattr(btrfsdrv, "_write_file_atomically", original)
        driver.remove("layer")
        return original(*args, **kwargs)

    monkeypatch.setattr(btrfsdrv, "_write_file_atomically", remove_then_write)
    with pytest.raises(OSError, match="removed the layer during the create") as raised:
        driver.create("layer", "base", storage_opt={"size": "8m"})

    assert raised.value.errno == errno.ESTALE
    assert not driver.exists("layer")
    assert os.listdir(os.path.join(driver.home, "quotas")) == []



# A child that runs get(sys.argv[3]) and stops inside _clear_stray_limit:
# it prints "clearing" and clears the limit only after a line on stdin.
_GET_PAUSED_AT_CLEAR = r"""
import sys
sys.path.insert(0, sys.argv[1])
import btrfsdrv

original = btrfsdrv.Driver._clear_stray_limit


def pause_then_clear(self, *args, **kwargs):
    print("clearing", flush=True)
    sys.stdin.readline()
    return original(self, *args, **kwargs)


btrfsdrv.Driver._clear_stray_limit = pause_then_clear
with btrfsdrv.Driver(sys.argv[2]) as driver:
    driver.get(sys.argv[3])
"""


def test_sized_create_keeps_limit_during_get(driver, fs, monkeypatch):
    driver.create("base")
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    original = btrfsdrv._write_file_atomically
    getters = []

    def start_get_then_write(*args, **kwargs):
        # Another process's get finds no quota file and stops before it clears the limit.
        monkeypatch.setattr(btrfsdrv, "_write_file_atomically", original)
        getter = subprocess.Popen([sys.executable, "-c", _GET_PAUSED_AT_CLEAR, module_dir, driver.home, "layer"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        getters.append(getter)
        assert getter.stdout.readline() == "clearing\n", getter.stderr.read()
        return original(*args, **kwargs)

    monkeypatch.setattr(btrfsdrv, "_write_file_atomically", start_get_then_write)
    driver.create("layer", "base", storage_opt={"size": "8m"})
    # The create has set its limit; the get now clears the limit it found.
    output, errors = getters[0].communicate("\n")

    assert getters[0].returncode == 0, errors
    assert driver.metadata("layer")["SizeLimit"] == str(8 * 1024**2)
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("layer"))] == 8 * 1024**2


def test_sized_create_keeps_limit_with_get_between_steps(driver, fs, monkeypatch):
    driver.create("base")
    fs.btrfs("quota", "enable", fs.mountpoint)
    original_write = btrfsdrv._write_file_atomically
    original_limit = btrfsdrv._set_layer_limit
    limits_seen = []

    def get_around(original):
        def step(*args, **kwargs):
            # Another process gets the layer before and after each step of the create.
            monkeypatch.setattr(btrfsdrv, original.__name__, original)
            driver.get("layer")
            result = original(*args, **kwargs)
            driver.get("layer")
            limits_seen.append(qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("layer"))])
            return result
        return step

    monkeypatch.setattr(btrfsdrv, "_write_file_atomically", get_around(original_write))
    monkeypatch.setattr(btrfsdrv, "_set_layer_limit", get_around(original_limit))
    driver.create("layer", "base", storage_opt={"size": "8m"})

    assert limits_seen == [8 * 1024**2] * len(limits_seen)
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("layer"))] == 8 * 1024**2


def test_get_applies_quota_file_replaced_during_get(driver, fs, monkeypatch):
    driver.create("layer", storage_opt={"size": "16m"})
    layer_dir = driver.get("layer")
    original = btrfsdrv.Driver._apply_limit

    def replace_then_apply(self, *args, **kwargs):
        # After the get read the quota file, another process removes the
        # layer and creates it again with another size.
        monkeypatch.setattr(btrfsdrv.Driver, "_apply_limit", original)
        driver.remove("layer")
        driver.create("layer", storage_opt={"size": "8m"})
        home_fd, _, size, path = args
        with btrfsdrv._Fd(btrfsdrv._open_directory(layer_dir)) as layer_fd:
            return original(self, home_fd, layer_fd, size, path)

    monkeypatch.setattr(btrfsdrv.Driver, "_apply_limit", replace_then_apply)
    driver.get("layer")

    assert driver.metadata("layer")["SizeLimit"] == str(8 * 1024**2)
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("layer"))] == 8 * 1024**2


def test_failed_remove_keeps_quota_file_written_meanwhile(tmp_path):
    quotas = tmp_path / "quotas"
    quotas.mkdir()
    layer = tmp_path / "layer"
    layer.mkdir()
    (quotas / "layer").write_bytes(b"1000")

    with pytest.raises(OSError):
        with btrfsdrv._QuotaFileAside(str(quotas), b"layer", str(layer)):
            # Another process writes the quota file of a new layer of this id,
            # then the remove fails with the layer directory still there.
            (quotas / "layer").write_bytes(b"2000")
            raise OSError(errno.EIO, "delete failed")

    assert (quotas / "layer").read_bytes() == b"2000"
    assert os.listdir(quotas) == ["layer"]


def test_failed_remove_restores_quota_file(tmp_path):
    quotas = tmp_path / "quotas"
    quotas.mkdir()
    layer = tmp_path / "layer"
    layer.mkdir()
    (quotas / "layer").write_bytes(b"1000")

    with pytest.raises(OSError):
        with btrfsdrv._QuotaFileAside(str(quotas), b"layer", str(layer)):
            assert os.listdir(quotas) != ["layer"]
            raise OSError(errno.EIO, "delete failed")

    assert (quotas / "layer").read_bytes() == b"1000"
    assert os.listdir(quotas) == ["layer"]


def fail_rename_with_enospc(monkeypatch):
    """Make os.rename fail as it does on a filesystem whose metadata is full."""
    def rename(source, destination, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), source, None, destination)

    monkeypatch.setattr(os, "rename", rename)


def unrenamable_quota_file(tmp_path, monkeypatch):
    """Make a quotas directory with the quota file of a layer directory, both below tmp_path, and fail renames."""
    quotas = tmp_path / "quotas"
    quotas.mkdir()
    layer = tmp_path / "layer"
    layer.mkdir()
    (quotas / "layer").write_bytes(b"1000")
    fail_rename_with_enospc(monkeypatch)
    return quotas, layer


def test_unrenamed_quota_file_deleted_after_layer(tmp_path, monkeypatch, caplog):
    quotas, layer = unrenamable_quota_file(tmp_path, monkeypatch)

    with btrfsdrv._QuotaFileAside(str(quotas), b"layer", str(layer)):
        assert os.listdir(quotas) == ["layer"]
        layer.rmdir()

    assert os.listdir(quotas) == []
    assert f"could not rename {quotas / 'layer'} to {quotas}/.layer." in caplog.text
    assert "No space left on device" in caplog.text
    assert "b'" not in caplog.text


def test_failed_remove_keeps_unrenamed_quota_file(tmp_path, monkeypatch):
    quotas, layer = unrenamable_quota_file(tmp_path, monkeypatch)

    with pytest.raises(OSError, match="delete failed"):
        with btrfsdrv._QuotaFileAside(str(quotas), b"layer", str(layer)):
            raise OSError(errno.EIO, "delete failed")

    assert (quotas / "layer").read_bytes() == b"1000"
    assert os.listdir(quotas) == ["layer"]


def test_unrenamed_quota_file_spares_replacement(tmp_path, monkeypatch):
    quotas, layer = unrenamable_quota_file(tmp_path, monkeypatch)

    with btrfsdrv._QuotaFileAside(str(quotas), b"layer", str(layer)):
        layer.rmdir()
        # Another process creates the id again and writes its quota file.
        (quotas / "new").write_bytes(b"2000")
        os.replace(quotas / "new", quotas / "layer")

    assert (quotas / "layer").read_bytes() == b"2000"
    assert os.listdir(quotas) == ["layer"]


def test_remove_keeps_quota_file_of_new_layer(driver, fs, monkeypatch):
    driver.create("layer", storage_opt={"size": "16m"})
    original = btrfsdrv.Driver._destroy_layer_subvolume

    def destroy_then_create(self, *args, **kwargs):
        # Another process creates the id again as soon as the subvolume is gone.
        monkeypatch.setattr(btrfsdrv.Driver, "_destroy_layer_subvolume", original)
        original(self, *args, **kwargs)
        driver.create("layer", storage_opt={"size": "8m"})

    monkeypatch.setattr(btrfsdrv.Driver, "_destroy_layer_subvolume", destroy_then_create)
    driver.remove("layer")

    assert driver.metadata("layer")["SizeLimit"] == str(8 * 1024**2)
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("layer"))] == 8 * 1024**2


def test_remove_of_missing_id_keeps_new_quota_file(driver, fs, monkeypatch):
    quotas = os.path.join(driver.home, "quotas")
    os.makedirs(quotas)
    with open(os.path.join(quotas, "layer"), "w") as quota:
        quota.write(str(16 * 1024**2))
    original = btrfsdrv.Driver._open_quotas

    def create_then_open(self, *args, **kwargs):
        # Another process creates the id after the remove found no layer.
        monkeypatch.setattr(btrfsdrv.Driver, "_open_quotas", original)
        driver.create("layer", storage_opt={"size": "8m"})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(btrfsdrv.Driver, "_open_quotas", create_then_open)
    with pytest.raises(FileNotFoundError, match="layer 'layer' not found"):
        driver.remove("layer")

    assert driver.metadata("layer")["SizeLimit"] == str(8 * 1024**2)
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(driver.get("layer"))] == 8 * 1024**2


def test_create_of_child_while_parent_removed(driver, fs, monkeypatch):
    driver.create("parent")
    original = btrfsdrv._snapshot_create_at

    def remove_parent_then_snapshot(*args, **kwargs):
        # Another process removes the parent after the create opened it.
        monkeypatch.setattr(btrfsdrv, "_snapshot_create_at", original)
        driver.remove("parent")
        return original(*args, **kwargs)

    monkeypatch.setattr(btrfsdrv, "_snapshot_create_at", remove_parent_then_snapshot)
    with pytest.raises(FileNotFoundError, match="parent layer 'parent' was removed by another process") as raised:
        driver.create("child", "parent", storage_opt={"size": "8m"})

    assert raised.value.errno == errno.ENOENT
    assert raised.value.filename == os.path.join(driver.home, "subvolumes", "parent")
    assert driver.list_layers() == []
    assert not os.path.lexists(os.path.join(driver.home, "quotas", "child"))


def test_get_ignores_quota_file_of_plain_directory(fs, caplog):
    # A store copied with cp -a or rsync has plain directories for layers.
    home = fs.path("home")
    os.makedirs(os.path.join(home, "subvolumes", "copied"))
    os.makedirs(os.path.join(home, "quotas"))
    with open(os.path.join(home, "quotas", "copied"), "w") as quota:
        quota.write(str(1024**2))
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("sized", storage_opt={"size": "16m"})  # turns quota on
        with caplog.at_level("WARNING", logger="btrfsdrv"):
            assert driver.get("copied") == os.path.join(home, "subvolumes", "copied")
        assert "plain directory" in caplog.text
        assert qgroup_limits(fs).get(5) is None
        with open(fs.path("outside"), "wb") as output:
            output.write(b"x" * (4 * 1024**2))
        driver.remove("copied")
        assert not os.path.exists(os.path.join(home, "quotas", "copied"))


def test_get_takes_one_option_as_string(driver):
    driver.create("base")
    assert driver.get("base", "ro") == os.path.join(driver.home, "subvolumes", "base")
    with pytest.raises(ValueError, match="invalid mount option 'rw'"):
        driver.get("base", "rw")


def test_remove_default_subvolume_keeps_files(driver, fs):
    driver.create("keep", storage_opt={"size": "16m"})
    root = driver.get("keep")
    write(os.path.join(root, "dir", "file"), b"kept")
    btrfsdrv.create_subvolume(os.path.join(root, "nested"))
    write(os.path.join(root, "nested", "data"), b"nested")
    fs.btrfs("subvolume", "set-default", str(btrfsdrv.subvolume_id(root)), fs.mountpoint)
    before = tree_digest(root)

    with pytest.raises(PermissionError, match="default subvolume") as raised:
        driver.remove("keep")
    assert raised.value.filename == root
    assert tree_digest(root) == before
    assert btrfsdrv.is_subvolume(os.path.join(root, "nested"))
    assert qgroup_limits(fs)[btrfsdrv.subvolume_id(root)] == 16 * 1024**2

    fs.btrfs("subvolume", "set-default", "5", fs.mountpoint)
    driver.remove("keep")
    assert not driver.exists("keep")


def test_remove_nested_default_subvolume_keeps_layer(driver, fs):
    driver.create("keep")
    root = driver.get("keep")
    btrfsdrv.create_subvolume(os.path.join(root, "a"))
    btrfsdrv.create_subvolume(os.path.join(root, "z"))
    write(os.path.join(root, "z", "data"), b"precious")
    fs.btrfs("subvolume", "set-default", str(btrfsdrv.subvolume_id(os.path.join(root, "a"))), fs.mountpoint)
    before = tree_digest(root)

    with pytest.raises(PermissionError, match="nested subvolume a is the filesystem's default"):
        driver.remove("keep")
    assert tree_digest(root) == before
    assert btrfsdrv.is_subvolume(os.path.join(root, "z"))

    fs.btrfs("subvolume", "set-default", "5", fs.mountpoint)
    driver.remove("keep")
    assert not driver.exists("keep")


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


def read_quota_file(path):
    directory, name = os.path.split(path)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return btrfsdrv._read_quota_file(directory_fd, os.fsencode(name), path)
    finally:
        os.close(directory_fd)


@pytest.mark.parametrize("data, value", [
    pytest.param(b"0" * 100 + b"4096", 4096, id="leading-zeros"),  # as Go's strconv.ParseUint takes them
    pytest.param(b"1234" + b" " * 70 + b"5", None, id="digits-after-spaces"),
    pytest.param(b"0" * 4094 + b"512", None, id="longer-than-4096-bytes"),
])
def test_quota_file_reader_reads_whole_file(tmp_path, data, value):
    path = str(tmp_path / "quota")
    with open(path, "wb") as quota:
        quota.write(data)
    assert read_quota_file(path) == value


def test_quota_file_reader_random_contents(tmp_path):
    path = str(tmp_path / "quota")
    alphabet = b"0123456789 \n\t-+x.\xff\x00"

    def check(rng):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        if rng.random() < 0.3:
            data = str(rng.randrange(0, 2**63)).encode()
        with open(path, "wb") as quota:
            quota.write(data)
        value = read_quota_file(path)
        stripped = data.strip()
        if stripped and all(48 <= byte <= 57 for byte in stripped) and int(stripped) < 2**63:
            assert value == int(stripped)
        else:
            assert value is None

    run_cases(check, cases=2000)
    os.unlink(path)
    assert read_quota_file(path) is None


# -- Layer diffs ---------------------------------------------------------------

import bz2  # noqa: E402
import gzip  # noqa: E402
import io  # noqa: E402
import lzma  # noqa: E402
import random  # noqa: E402
import struct  # noqa: E402
import tarfile  # noqa: E402
import zlib  # noqa: E402

from btrfsdrv import Change, ChangeKind  # noqa: E402

ADD, MODIFY, DELETE = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE

# A version 2 security.capability value granting CAP_NET_BIND_SERVICE (10),
# effective, as struct vfs_cap_data in linux/capability.h lays it out.
CAPABILITY = struct.pack("<IIIII", 0x02000000 | 0x1, 1 << 10, 0, 0, 0)


def capability(rootid=None):
    """Return a security.capability value granting CAP_NET_RAW (13), effective.

    It is a version 2 value (20 bytes) without rootid, else a version 3
    value (24 bytes, struct vfs_ns_cap_data) with that root uid.
    """
    if rootid is None:
        return struct.pack("<5I", 0x02000000 | 0x1, 1 << 13, 0, 0, 0)
    return struct.pack("<6I", 0x03000000 | 0x1, 1 << 13, 0, 0, 0, rootid)


def member_capability(member):
    """Return the security.capability bytes that a tar member carries, or None."""
    value = member.pax_headers.get("SCHILY.xattr.security.capability")
    return None if value is None else value.encode("utf-8", "surrogateescape")


def capable_file(path, uid, value):
    """Write a file owned by uid:uid with value as its security.capability.

    The capability is set after the owner, because chown removes it.
    """
    write(path, b"elf", mode=0o755)
    os.chown(path, uid, uid)
    os.setxattr(path, "security.capability", value)


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


def tree_digest(root, whole_seconds=False):
    """Digest names, types, modes, owners, sizes, contents, link targets and mtimes below root.

    With whole_seconds, mtimes count in seconds, as a layer diff carries
    them. The kernel makes up the mtime of a snapshot's placeholder for a
    nested subvolume (inode 2) each time it loads it, so that one is left out.
    """
    digest = hashlib.sha256()
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            mtime = st.st_mtime_ns // 10**9 if whole_seconds else st.st_mtime_ns
            if stat.S_ISDIR(st.st_mode) and st.st_ino == 2:
                mtime = 0
            digest.update(os.fsencode(os.path.relpath(path, root)))
            digest.update(b"%o %d %d %d %d" % (st.st_mode, st.st_uid, st.st_gid, mtime,
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


def test_diff_maps_capability_root_ids(tmp_path):
    layer = str(tmp_path / "l")
    capable_file(layer + "/v2", 100000, capability())
    capable_file(layer + "/root", 100000, capability(100000))
    capable_file(layer + "/user", 100005, capability(100005))
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    found = members(read_diff(layer, uid_maps=maps, gid_maps=maps))
    assert member_capability(found["v2"]) == capability()
    assert member_capability(found["root"]) == capability()
    assert member_capability(found["user"]) == capability(5)


def test_diff_drops_capability_of_unmapped_root(tmp_path, caplog):
    layer = str(tmp_path / "l")
    capable_file(layer + "/other", 100000, capability(300000))
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    with caplog.at_level("WARNING", logger="btrfsdrv"):
        found = members(read_diff(layer, uid_maps=maps, gid_maps=maps))
    assert member_capability(found["other"]) is None
    assert "security.capability" in caplog.text
    assert "/other" in caplog.text
    assert "300000" in caplog.text


def test_diff_close_early_releases(tmp_path):
    layer = str(tmp_path / "l")
    for index in range(200):
        write(layer + f"/f{index}", os.urandom(64 * 1024))
    released = []
    stream = btrfsdrv.layer_diff(layer, release=lambda: released.append(True))
    stream.read(1000)
    stream.close()
    assert released == [True]


def test_diff_names_file_that_shrinks(tmp_path, monkeypatch):
    layer = str(tmp_path / "l")
    write(layer + "/dir/file", b"x" * 100_000)
    open_file = btrfsdrv._TarEntryWriter._open_file

    def open_and_shrink(dir_fd, name, st, path):
        data = open_file(dir_fd, name, st, path)
        os.truncate(layer + "/dir/file", 10)  # as a running container could
        return data

    monkeypatch.setattr(btrfsdrv._TarEntryWriter, "_open_file", staticmethod(open_and_shrink))
    with pytest.raises(OSError, match="shrank") as raised:
        read_diff(layer)
    assert raised.value.errno == errno.ESTALE
    assert raised.value.filename == "/dir/file"


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


def test_diff_rejects_whiteout_name_added_late(tmp_path, monkeypatch):
    layer = str(tmp_path / "l")
    write(layer + "/a", b"a")
    os.mkdir(layer + "/z")
    open_file = btrfsdrv._TarEntryWriter._open_file

    def open_and_add_name(dir_fd, name, st, path):
        write(layer + "/z/.wh.late", b"")  # as a running container could
        return open_file(dir_fd, name, st, path)

    monkeypatch.setattr(btrfsdrv._TarEntryWriter, "_open_file", staticmethod(open_and_add_name))
    stream = btrfsdrv.layer_diff(layer)
    with pytest.raises(ValueError, match="'/z/.wh.late'"):
        stream.read()
    stream.close()


def test_diff_rejects_deletion_of_whiteout_name(tmp_path):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    write(parent + "/d/.wh.x")
    copy_tree(parent, layer)
    os.unlink(layer + "/d/.wh.x")
    assert Change("/d/.wh.x", DELETE) in btrfsdrv.layer_changes(layer, parent)
    with pytest.raises(ValueError, match="deletion of '/d/.wh.x'"):
        btrfsdrv.layer_diff(layer, parent)


def test_diff_size_rejects_whiteout_names(tmp_path):
    layer = str(tmp_path / "l")
    write(layer + "/d/.wh.x")
    with pytest.raises(ValueError, match="'/d/.wh.x'"):
        btrfsdrv.layer_diff_size(layer)


def test_round_trip_of_special_hard_links(tmp_path):
    parent, layer, target = str(tmp_path / "p"), str(tmp_path / "l"), str(tmp_path / "t")
    write(parent + "/etc/passwd", b"root", mtime=1000)
    copy_tree(parent, layer)
    copy_tree(parent, target)
    make_special_hard_links(layer)
    found = members(read_diff(layer, parent))
    for name in ("s", "f", "n"):
        assert found["links/" + name + "2"].islnk(), name
        assert found["links/" + name + "2"].linkname == "links/" + name
    apply(target, read_diff(layer, parent))
    assert btrfsdrv.layer_changes(target, layer) == []
    assert_special_hard_links(target)


def test_apply_links_symlinks_from_gnu_tar(tmp_path):
    source, layer = tmp_path / "source", tmp_path / "layer"
    source.mkdir()
    layer.mkdir()
    os.symlink("target", source / "s")
    os.link(source / "s", source / "s2", follow_symlinks=False)
    raw = subprocess.run(["tar", "-C", str(source), "--format=gnu", "-cf", "-", "s", "s2"],
                         stdout=subprocess.PIPE, check=True).stdout
    assert members(raw)["s2"].islnk()
    apply(layer, raw)
    first, second = os.lstat(layer / "s"), os.lstat(layer / "s2")
    assert stat.S_ISLNK(second.st_mode)
    assert second.st_ino == first.st_ino
    assert os.readlink(layer / "s2") == "target"


def parent_layer_with_linked_symlinks(tmp_path):
    """A layer whose d/a and e/b are two names of one symlink inode, all older than the apply."""
    layer = str(tmp_path / "l")
    os.makedirs(layer + "/d")
    os.mkdir(layer + "/e")
    os.symlink("target", layer + "/d/a")
    os.link(layer + "/d/a", layer + "/e/b", follow_symlinks=False)
    time.sleep(0.01)
    return layer


def test_opaque_hides_relinked_parent_symlink(tmp_path):
    layer = parent_layer_with_linked_symlinks(tmp_path)
    apply(layer, make_tar([entry("e/c", tarfile.LNKTYPE, linkname="d/a"), entry("d/.wh..wh..opq")]))
    assert os.listdir(layer + "/d") == []
    assert os.lstat(layer + "/e/c").st_ino == os.lstat(layer + "/e/b").st_ino


def test_opaque_keeps_own_links_to_symlink(tmp_path):
    layer = parent_layer_with_linked_symlinks(tmp_path)
    raw = make_tar([entry("d/own", tarfile.LNKTYPE, linkname="e/b"), entry("d/.wh..wh..opq"),
                    entry("e/.wh..wh..opq")])
    apply(layer, raw)
    assert os.listdir(layer + "/d") == ["own"]
    assert os.listdir(layer + "/e") == []
    assert os.readlink(layer + "/d/own") == "target"


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


@pytest.mark.parametrize("window_log", [28, 29, 30])
def test_apply_zstd_long_windows(tmp_path, window_log):
    # containers/storage's zstd decoder takes windows up to 512 MiB (2**29).
    raw = make_tar([entry("file", data=b"hello")])
    packed = compress_with(["zstd", "-c", f"--long={window_log}"], raw)
    if window_log <= 29:
        assert apply(tmp_path, packed) == 5
        assert (tmp_path / "file").read_bytes() == b"hello"
    else:
        with pytest.raises(ValueError, match="zstd frame needs a window larger than 512 MiB"):
            apply(tmp_path, packed)


def zstd_v07_frame(data):
    """Return data in a frame of zstd 0.7 (magic FD2FB527) of raw blocks, which libzstd still decodes."""
    frame = bytearray((0xFD2FB527).to_bytes(4, "little")) + bytes([0, 7 << 3])
    for start in range(0, len(data), 65536):
        block = data[start:start + 65536]
        frame += bytes([0x40 | (len(block) >> 16 & 7), len(block) >> 8 & 255, len(block) & 255]) + block
    return bytes(frame + b"\xc0\0\0")


def test_apply_rejects_legacy_zstd_frames(tmp_path):
    # libzstd decodes a zstd 0.7 frame after a current one, and the zstd
    # decoder of containers/storage rejects it.
    raw = make_tar([entry("file", data=b"hello")])
    empty = compress_with(["zstd", "-q", "-c"], b"")
    with pytest.raises(ValueError, match="magic number 27b52ffd"):
        apply(tmp_path, empty + zstd_v07_frame(raw))
    assert not (tmp_path / "file").exists()


def test_apply_accepts_concatenated_zstd_frames(tmp_path):
    raw = make_tar([entry("file", data=b"hello")])
    half = len(raw) // 2
    packed = compress_with(["zstd", "-q", "-c"], raw[:half]) + compress_with(["zstd", "-q", "-c"], raw[half:])
    assert apply(tmp_path, packed) == 5


@pytest.mark.parametrize("read_size", [7, 4096, 1 << 20])
def test_zstd_reader_returns_whole_frame(read_size):
    data = bytes(3 << 20) + random_content(100_000, 3)
    packed = compress_with(["zstd", "-c"], data)
    reader = btrfsdrv._ZstdReader(io.BufferedReader(io.BytesIO(packed)))
    output = bytearray()
    buffer = bytearray(read_size)
    while True:
        count = reader.readinto(buffer)
        if not count:
            break
        output += buffer[:count]
    reader.close()
    assert output == data


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


def test_apply_repeated_deep_directory_opens_linear(tmp_path, monkeypatch):
    depth, repeats = 300, 40
    layer = tmp_path / "layer"
    layer.mkdir()
    name = "/".join(["a"] * depth)
    raw = make_tar([entry(name, tarfile.DIRTYPE, mode=0o755, mtime=1_600_000_000 + index)
                    for index in range(repeats)])

    opens = count_calls(monkeypatch, os, "open")
    try:
        apply(layer, raw)
        open_count = len(opens)
        monkeypatch.undo()
        mtime = os.stat(layer / name).st_mtime
    finally:
        monkeypatch.undo()
        remove_contents(layer)

    assert open_count <= 4 * (depth + repeats)
    assert mtime == 1_600_000_000 + repeats - 1


def test_apply_directory_times_last_entry_wins(tmp_path):
    entries = [
        entry("a", tarfile.DIRTYPE, mode=0o755, mtime=1000),
        entry("a/b", tarfile.DIRTYPE, mode=0o755, mtime=1001),
        entry("a-c", tarfile.DIRTYPE, mode=0o755, mtime=1002),
        entry("a/b/d", tarfile.DIRTYPE, mode=0o755, mtime=1003),
        entry("a", tarfile.DIRTYPE, mode=0o755, mtime=1004),
        entry("a/e", tarfile.DIRTYPE, mode=0o755, mtime=1005),
        entry("a/b", tarfile.DIRTYPE, mode=0o755, mtime=1006),
        entry("a/b/d/f", tarfile.DIRTYPE, mode=0o755, mtime=1007),
        entry("g", tarfile.DIRTYPE, mode=0o755, mtime=1008),
        entry(".", tarfile.DIRTYPE, mode=0o755, mtime=1009),
    ]
    apply(tmp_path, make_tar(entries))

    expected = {"a": 1004, "a/b": 1006, "a-c": 1002, "a/b/d": 1003, "a/e": 1005, "a/b/d/f": 1007, "g": 1008,
                ".": 1009}
    for name, mtime in expected.items():
        assert os.stat(tmp_path / name).st_mtime == mtime, name


def test_apply_directory_times_skip_replaced_parent(tmp_path):
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    os.utime(outside / "b", (5, 5))
    layer = tmp_path / "l"
    layer.mkdir()
    entries = [
        entry("a", tarfile.DIRTYPE, mode=0o755, mtime=1000),
        entry("a/b", tarfile.DIRTYPE, mode=0o755, mtime=1001),
        entry("a/c", tarfile.DIRTYPE, mode=0o755, mtime=1002),
        entry("a", tarfile.SYMTYPE, linkname=str(outside)),
    ]
    apply(layer, make_tar(entries))

    assert os.readlink(layer / "a") == str(outside)
    assert os.stat(outside / "b").st_mtime == 5


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


@pytest.mark.parametrize("entries, expected", [
    pytest.param([entry("d/old/.wh.deep")], [], id="whiteout-inside"),
    pytest.param([entry("d/old/new", data=b"n")], [], id="entry-added-inside"),
    pytest.param([entry("d/old/new", data=b"n"), entry("d/old", tarfile.DIRTYPE, mode=0o755)], ["old"],
                 id="directory-entry-after"),
    pytest.param([entry("d/made/f", data=b"f")], ["made"], id="parent-made-by-apply"),
])
def test_apply_opaque_directory_hides_touched_parent_directories(tmp_path, entries, expected):
    # containers/storage keeps only what the tar has entries for, and a
    # whiteout or a new entry inside a parent layer's directory is none.
    layer = str(tmp_path / "l")
    write(layer + "/d/old/deep")
    time.sleep(0.01)
    apply(layer, make_tar(entries + [entry("d/.wh..wh..opq")]))
    assert sorted(os.listdir(layer + "/d")) == expected


@pytest.mark.parametrize("marker", [".wh..wh.plnk/.wh..wh..opq", ".wh..wh.plnk/sub/.wh..wh..opq"])
def test_apply_skips_opaque_markers_below_aufs_metadata(tmp_path, marker):
    layer = tmp_path / "layer"
    (layer / ".wh..wh.plnk" / "sub").mkdir(parents=True)
    (layer / ".wh..wh.plnk" / "sub" / "keep").write_bytes(b"data")
    apply(layer, make_tar([entry(marker)]))
    assert (layer / ".wh..wh.plnk" / "sub" / "keep").read_bytes() == b"data"


def test_apply_opaque_directory_hides_touched_nested_subvolume(driver):
    # The entry's temporary is staged in the nested subvolume's top, which changes its ctime.
    driver.create("layer")
    root = driver.get("layer")
    os.mkdir(os.path.join(root, "a"))
    btrfsdrv.create_subvolume(os.path.join(root, "a", "sv"))
    os.mkdir(os.path.join(root, "a", "sv", "d"))
    time.sleep(0.01)
    driver.apply_diff("layer", io.BytesIO(make_tar([entry("a/sv/d/f", data=b"new"), entry("a/.wh..wh..opq")])))
    assert os.listdir(os.path.join(root, "a")) == []


def parent_layer_with_hard_links(tmp_path):
    """A layer whose d/a and e/b are two names of one inode, all older than the apply."""
    layer = str(tmp_path / "l")
    write(layer + "/d/a", b"parent")
    os.mkdir(layer + "/e")
    os.link(layer + "/d/a", layer + "/e/b")
    time.sleep(0.01)
    return layer


@pytest.mark.parametrize("first", [
    pytest.param([entry("e/.wh.b")], id="whiteout-other-name"),
    pytest.param([entry("e/b", data=b"new")], id="replace-other-name"),
    pytest.param([entry("e/c", tarfile.LNKTYPE, linkname="d/a")], id="link-to-it"),
])
def test_opaque_hides_relinked_parent_files(tmp_path, first):
    # Each first entry changes the ctime of d/a's inode through another name;
    # d/a still comes from the parent layer, so the opaque directory hides it.
    layer = parent_layer_with_hard_links(tmp_path)
    apply(layer, make_tar(first + [entry("d/.wh..wh..opq")]))
    assert os.listdir(layer + "/d") == []


def test_opaque_hides_parent_link_of_name_replaced_by_directory(driver):
    # x, another name of the parent layer's inode behind d/g, becomes a
    # directory; d/g stays a parent-layer name, which the opaque d hides.
    driver.create("lower")
    driver.apply_diff("lower", io.BytesIO(make_tar([
        entry("f", data=b"lower"), entry("d", tarfile.DIRTYPE, mode=0o755),
        entry("d/g", tarfile.LNKTYPE, linkname="f"), entry("x", tarfile.LNKTYPE, linkname="f")])))
    driver.create("upper", "lower")
    driver.apply_diff("upper", io.BytesIO(make_tar([
        entry("x", tarfile.DIRTYPE, mode=0o755), entry("d", tarfile.DIRTYPE, mode=0o755),
        entry("d/.wh..wh..opq", data=b"")])))
    upper = driver.get("upper")
    assert os.listdir(os.path.join(upper, "d")) == []
    assert os.path.isdir(os.path.join(upper, "x"))
    assert open(os.path.join(upper, "f"), "rb").read() == b"lower"


@pytest.mark.parametrize("contents", [[], [entry("g", data=b"x")]], ids=["empty", "with-file"])
def test_snapshot_keeps_root_set_by_parent_tar(driver, contents):
    # containers/storage leaves a snapshot's root as the parent's tar set it.
    root_entry, _ = entry("./", tarfile.DIRTYPE, mode=0o750)
    root_entry.uid, root_entry.gid = 5, 555
    driver.create("parent")
    driver.apply_diff("parent", io.BytesIO(make_tar([(root_entry, None)] + contents)))
    driver.create("child", "parent")
    driver.create_read_write("box", "parent")
    for layer_id in ("parent", "child", "box"):
        st = os.stat(driver.get(layer_id))
        assert stat.S_IMODE(st.st_mode) == 0o750, layer_id
        assert (st.st_uid, st.st_gid) == (5, 555), layer_id


def test_opaque_keeps_own_links(tmp_path):
    layer = parent_layer_with_hard_links(tmp_path)
    raw = make_tar([entry("d/own", tarfile.LNKTYPE, linkname="e/b"), entry("d/.wh..wh..opq"),
                    entry("e/.wh..wh..opq")])
    apply(layer, raw)
    assert os.listdir(layer + "/d") == ["own"]
    assert os.listdir(layer + "/e") == []
    with open(layer + "/d/own", "rb") as file:
        assert file.read() == b"parent"


def test_opaque_removes_snapshot_placeholder(driver, monkeypatch):
    driver.create("P")
    parent = driver.get("P")
    write(parent + "/d/old", b"parent")
    btrfsdrv.create_subvolume(parent + "/d/nested")
    write(parent + "/d/nested/inside", b"parent")
    driver.create("C", "P")
    placeholder = os.path.join(driver.get("C"), "d", "nested")
    assert os.lstat(placeholder).st_ino == ioctl_structs.BTRFS_EMPTY_SUBVOL_DIR_OBJECTID

    # The kernel keeps no placeholder inode cached, so every lookup makes a
    # new one with the current time as its ctime. A lookup after the epoch,
    # as the opaque walk makes, therefore gets a ctime at or after it.
    seen = []
    original = btrfsdrv._layer_epoch

    def epoch_then_stat(*args):
        epoch = original(*args)
        seen.append((epoch, os.lstat(placeholder).st_ctime_ns))
        return epoch

    monkeypatch.setattr(btrfsdrv, "_layer_epoch", epoch_then_stat)
    driver.apply_diff("C", io.BytesIO(make_tar([entry("d/.wh..wh..opq"), entry("d/new", data=b"n")])))

    [(epoch, placeholder_ctime)] = seen
    assert placeholder_ctime >= epoch
    assert os.listdir(os.path.join(driver.get("C"), "d")) == ["new"]


def test_apply_reports_progress(tmp_path):
    layer = tmp_path / "l"
    layer.mkdir()
    calls = []
    raw = make_tar([entry(f"f{index}", data=b"x") for index in range(10)])
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


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_apply_writes_sparse_members_with_holes(tmp_path, tar_format):
    source, layer = tmp_path / "source", tmp_path / "layer"
    source.mkdir()
    layer.mkdir()
    with open(source / "sparse", "wb") as file:
        file.seek(64 << 20)
        file.write(b"middle")
        file.truncate(128 << 20)
    raw = subprocess.run(["tar", "-C", str(source), "--sparse", f"--format={tar_format}", "-cf", "-", "sparse"],
                         stdout=subprocess.PIPE, check=True).stdout
    assert len(raw) < 64 << 10
    assert apply(layer, raw) == 128 << 20
    st = os.stat(layer / "sparse")
    assert st.st_size == 128 << 20
    assert st.st_blocks * 512 < 1 << 20
    with open(layer / "sparse", "rb") as file:
        file.seek((64 << 20) - 1)
        assert file.read(8) == b"\0middle\0"


def _data_ranges(path):
    """Return the (start, end) byte ranges that SEEK_DATA and SEEK_HOLE report as data in a file."""
    ranges = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno != errno.ENXIO:
                    raise
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, offset))
    finally:
        os.close(fd)
    return ranges


def assert_same_sparse_contents(path, expected_path):
    """Compare two files by reading only the ranges that either stores as data."""
    assert os.stat(path).st_size == os.stat(expected_path).st_size
    with open(path, "rb") as actual, open(expected_path, "rb") as expected:
        for start, end in _data_ranges(path) + _data_ranges(expected_path):
            actual.seek(start)
            expected.seek(start)
            assert actual.read(end - start) == expected.read(end - start), (start, end)


@pytest.mark.parametrize("clone", ["ficlone", "ficlone-unsupported", "nodatacow"])
def test_apply_sparse_file_into_nested_subvolume(tmp_path, monkeypatch, caplog, clone):
    # The file is 16 times the filesystem, so a copy that writes its holes
    # fails with ENOSPC.
    source = tmp_path / "source"
    (source / "sv").mkdir(parents=True)
    with open(source / "sv" / "big", "wb") as file:
        file.seek(1 << 30)
        file.write(b"middle")
        file.seek((4 << 30) - 3)
        file.write(b"end")
    raw = subprocess.run(["tar", "-C", str(source), "--sparse", "-cf", "-", "sv/big"],
                         stdout=subprocess.PIPE, check=True).stdout
    assert len(raw) < 64 << 10
    if clone == "ficlone-unsupported":
        def unsupported(source_fd, fd):
            raise OSError(errno.EOPNOTSUPP, "injected: FICLONE is not supported")

        monkeypatch.setattr(btrfsdrv, "_clone_file", unsupported)

    with loopback_btrfs(tmp_path / "fs", size=SMALL_IMAGE) as small:
        layer = small.path("layer")
        btrfsdrv.create_subvolume(layer)
        btrfsdrv.create_subvolume(os.path.join(layer, "sv"))
        if clone == "nodatacow":
            # New files in sv inherit nodatacow, and btrfs rejects (EINVAL)
            # a clone between a datacow and a nodatacow file.
            subprocess.run(["chattr", "+C", os.path.join(layer, "sv")], check=True)

        with caplog.at_level("DEBUG", logger="btrfsdrv"):
            assert apply(layer, raw) == 4 << 30
        copied = [record for record in caplog.records if "cannot clone the data" in record.getMessage()]
        assert len(copied) == (0 if clone == "ficlone" else 1)

        applied = os.path.join(layer, "sv", "big")
        assert os.stat(applied).st_blocks * 512 < 1 << 20
        assert_same_sparse_contents(applied, source / "sv" / "big")
        with open(applied, "rb") as file:
            file.seek((1 << 30) - 1)
            assert file.read(8) == b"\0middle\0"
        assert sorted(os.listdir(os.path.join(layer, "sv"))) == ["big"]
        if clone == "nodatacow":
            assert "C" in subprocess.run(["lsattr", applied], stdout=subprocess.PIPE, check=True,
                                         text=True).stdout.split()[0]


def sparse_tar(sparse_map, real_size, data):
    """A PAX tar with one GNU sparse (format 0.1) member named f."""
    info, _ = entry("f")
    info.pax_headers = {"GNU.sparse.map": sparse_map, "GNU.sparse.realsize": str(real_size),
                        "GNU.sparse.numblocks": str(len(sparse_map.split(",")) // 2), "GNU.sparse.name": "f"}
    return make_tar([(info, data)])


@pytest.mark.parametrize("sparse_map", ["1000,3,100,3", "100,3,4999,3", "-5,3", "0,10,5,3"])
def test_apply_rejects_invalid_sparse_maps(tmp_path, sparse_map):
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "f").write_bytes(b"before")
    with pytest.raises(ValueError, match="invalid sparse map"):
        apply(layer, sparse_tar(sparse_map, 5000, b"abcxyz"))
    assert os.listdir(layer) == ["f"]
    assert (layer / "f").read_bytes() == b"before"


def test_apply_rejects_sparse_map_beyond_data(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    info, _ = entry("s")
    info.pax_headers = {"GNU.sparse.map": "0,4,100,600", "GNU.sparse.size": "1000", "GNU.sparse.numblocks": "2"}
    raw = make_tar([entry("first", data=b"1"), (info, b"12345678"), entry("next", data=b"2")])
    with pytest.raises(ValueError, match=r"entry 's'.*invalid sparse map.*604 bytes.*stores 8 bytes"):
        apply(layer, raw)
    assert sorted(os.listdir(layer)) == ["first"]


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


def test_apply_maps_capability_root_ids(tmp_path):
    layer = tmp_path / "l"
    layer.mkdir()
    entries = []
    for name, value in (("v2", capability()), ("root", capability(0)), ("user", capability(5))):
        info, data = entry(name, data=b"elf", mode=0o755)
        info.pax_headers = {"SCHILY.xattr.security.capability": value.decode("utf-8", "surrogateescape")}
        entries.append((info, data))
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    apply(layer, make_tar(entries), uid_maps=maps, gid_maps=maps)
    assert os.getxattr(layer / "v2", "security.capability") == capability(100000)
    assert os.getxattr(layer / "root", "security.capability") == capability(100000)
    assert os.getxattr(layer / "user", "security.capability") == capability(100005)


def test_apply_capability_root_without_host_id(tmp_path, caplog):
    layer = tmp_path / "l"
    layer.mkdir()
    info, data = entry("dir/ping", data=b"elf", mode=0o755)
    info.pax_headers = {"SCHILY.xattr.security.capability":
                        capability(70000).decode("utf-8", "surrogateescape")}
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    raw = make_tar([(info, data)])
    with pytest.raises(ValueError, match="'dir/ping'.*security.capability.*70000"):
        apply(layer, raw, uid_maps=maps, gid_maps=maps)
    assert not os.path.exists(layer / "dir" / "ping")
    with caplog.at_level("WARNING", logger="btrfsdrv"):
        apply(layer, raw, uid_maps=maps, gid_maps=maps, ignore_chown_errors=True)
    assert "security.capability" not in os.listxattr(layer / "dir" / "ping")
    assert "dir/ping" in caplog.text
    assert "70000" in caplog.text


@pytest.mark.parametrize("maps", [None, [btrfsdrv.IDMap(0, 100000, 2**32 - 100000)]])
def test_apply_rejects_capability_rootid_beyond_uids(tmp_path, maps):
    layer = tmp_path / "l"
    layer.mkdir()
    info, data = entry("bin/tool", data=b"elf", mode=0o755)
    info.pax_headers = {"SCHILY.xattr.security.capability":
                        capability(2**32 - 1).decode("utf-8", "surrogateescape")}

    with pytest.raises(ValueError, match="'bin/tool'.*rootid 4294967295 is not a valid uid"):
        apply(layer, make_tar([(info, data)]), uid_maps=maps, gid_maps=maps)
    assert os.listdir(layer) == []


def capability_entry(name, value, kind=tarfile.REGTYPE, uid=0):
    """Return a tar entry owned by uid:uid carrying value as its security.capability."""
    info, data = entry(name, kind, data=b"elf" if kind == tarfile.REGTYPE else None, mode=0o755)
    info.uid = info.gid = uid
    info.pax_headers = {"SCHILY.xattr.security.capability": value.decode("utf-8", "surrogateescape")}
    return info, data


def test_apply_version_2_capability_under_id_maps(tmp_path):
    # As cap_convert_nscap stores a version 2 value that a process in a user
    # namespace writes: version 3 with the host uid of the namespace's root.
    layer = tmp_path / "l"
    layer.mkdir()
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    apply(layer, make_tar([capability_entry("ping", capability())]), uid_maps=maps, gid_maps=maps)
    assert os.getxattr(layer / "ping", "security.capability") == capability(100000)


@pytest.mark.parametrize("maps", [None, [btrfsdrv.IDMap(0, 0, 65536)], [btrfsdrv.IDMap(0, 0, 1),
                                                                       btrfsdrv.IDMap(1, 100001, 65535)]],
                         ids=["no-maps", "identity", "root-to-host-root"])
def test_apply_version_2_capability_for_host_root(tmp_path, maps):
    layer = tmp_path / "l"
    layer.mkdir()
    apply(layer, make_tar([capability_entry("ping", capability())]), uid_maps=maps, gid_maps=maps)
    assert os.getxattr(layer / "ping", "security.capability") == capability()


def test_apply_version_2_capability_without_host_root(tmp_path, caplog):
    layer = tmp_path / "l"
    layer.mkdir()
    maps = [btrfsdrv.IDMap(1, 100001, 65535)]
    raw = make_tar([capability_entry("ping", capability(), uid=5)])
    with pytest.raises(ValueError, match="'ping'.*version 2 security.capability.*container uid 0"):
        apply(layer, raw, uid_maps=maps, gid_maps=maps)
    assert not os.path.exists(layer / "ping")
    with caplog.at_level("WARNING", logger="btrfsdrv"):
        apply(layer, raw, uid_maps=maps, gid_maps=maps, ignore_chown_errors=True)
    assert "security.capability" not in os.listxattr(layer / "ping")
    assert "ping" in caplog.text
    assert "container uid 0" in caplog.text


def test_capability_round_trip_under_id_maps(tmp_path):
    layer, target = str(tmp_path / "l"), tmp_path / "t"
    target.mkdir()
    capable_file(layer + "/root", 100000, capability(100000))
    capable_file(layer + "/user", 100005, capability(100005))
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    apply(target, read_diff(layer, uid_maps=maps, gid_maps=maps), uid_maps=maps, gid_maps=maps)
    assert os.getxattr(target / "root", "security.capability") == capability(100000)
    assert os.getxattr(target / "user", "security.capability") == capability(100005)


def test_apply_drops_capability_of_non_regular_files(tmp_path, caplog):
    layer = tmp_path / "l"
    layer.mkdir()
    entries = [capability_entry(name, capability(), kind)
               for name, kind in (("dir", tarfile.DIRTYPE), ("fifo", tarfile.FIFOTYPE),
                                  ("block", tarfile.BLKTYPE), ("link", tarfile.SYMTYPE))]
    entries[-1][0].linkname = "dir"
    with caplog.at_level("WARNING", logger="btrfsdrv"):
        apply(layer, make_tar(entries))
    for name in ("dir", "fifo", "block", "link"):
        assert "security.capability" not in os.listxattr(layer / name, follow_symlinks=False), name
        assert f"security.capability of {name}:" in caplog.text, name


def test_apply_removes_capability_of_existing_directory(tmp_path):
    layer = tmp_path / "l"
    (layer / "dir").mkdir(parents=True)
    os.setxattr(layer / "dir", "security.capability", capability())
    apply(layer, make_tar([capability_entry("dir", capability(), tarfile.DIRTYPE)]))
    assert "security.capability" not in os.listxattr(layer / "dir")


def test_special_file_xattrs_round_trip(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    entries = []
    for name, kind in (("fifo", tarfile.FIFOTYPE), ("block", tarfile.BLKTYPE)):
        info, data = capability_entry(name, capability(), kind)
        info.devmajor, info.devminor = (7, 200) if kind == tarfile.BLKTYPE else (0, 0)
        info.pax_headers["SCHILY.xattr.trusted.x"] = "local"
        entries.append((info, data))
    apply(first, make_tar(entries))
    apply(second, read_diff(str(first)))
    for name in ("fifo", "block"):
        first_xattrs = {key: os.getxattr(first / name, key, follow_symlinks=False)
                        for key in os.listxattr(first / name, follow_symlinks=False)}
        second_xattrs = {key: os.getxattr(second / name, key, follow_symlinks=False)
                         for key in os.listxattr(second / name, follow_symlinks=False)}
        assert first_xattrs == second_xattrs, name


def test_diff_carries_no_capability_of_directory(tmp_path):
    parent, layer = str(tmp_path / "p"), str(tmp_path / "l")
    os.makedirs(parent + "/dir")
    os.utime(parent + "/dir", (1000, 1000))
    copy_tree(parent, layer)
    os.setxattr(layer + "/dir", "security.capability", capability())
    os.setxattr(layer + "/dir", "user.note", b"kept")
    assert btrfsdrv.layer_changes(layer, parent) == [Change("/dir", MODIFY)]
    found = members(read_diff(layer))
    assert member_capability(found["dir"]) is None
    assert found["dir"].pax_headers["SCHILY.xattr.user.note"] == "kept"
    os.removexattr(layer + "/dir", "user.note")
    assert btrfsdrv.layer_changes(layer, parent) == []


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


def test_hostile_hard_link_to_symlink_is_not_followed(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("s", tarfile.SYMTYPE, linkname=str(sentinel / "secret")),
                    entry("h", tarfile.LNKTYPE, linkname="s"), entry("h2", tarfile.LNKTYPE, linkname="h"),
                    entry("h", data=b"owned")])
    apply(layer, raw)
    assert (layer / "h").read_bytes() == b"owned"
    assert os.readlink(layer / "h2") == str(sentinel / "secret")
    assert os.lstat(layer / "h2").st_ino == os.lstat(layer / "s").st_ino
    assert_sentinel_intact(sentinel, digest)


def test_hostile_hard_link_to_directory(trees):
    layer, sentinel, digest = trees
    raw = make_tar([entry("d", tarfile.DIRTYPE, mode=0o755), entry("h", tarfile.LNKTYPE, linkname="d")])
    with pytest.raises(ValueError, match="'d' is a directory"):
        apply(layer, raw)
    assert not os.path.lexists(layer / "h")
    assert_sentinel_intact(sentinel, digest)


@pytest.mark.parametrize("name, target", [("d", "d/f"), ("d", "d/e/f"), ("./d/", "d/./f")])
def test_hostile_hard_link_into_replaced_directory(trees, name, target):
    # containers/storage deletes the directory the entry replaces before it
    # links, so the link's target is gone and the layer is rejected.
    layer, sentinel, digest = trees
    write(str(layer / "d" / "f"), b"data")
    write(str(layer / "d" / "e" / "f"), b"data")
    with pytest.raises(ValueError, match="inside the directory it replaces"):
        apply(layer, make_tar([entry(name, tarfile.LNKTYPE, linkname=target)]))
    assert (layer / "d" / "f").read_bytes() == b"data"
    assert (layer / "d" / "e" / "f").read_bytes() == b"data"
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


def pax_record(key, value):
    """Return the PAX record of key and value, with the length that counts its own digits."""
    record = b" " + key + b"=" + value + b"\n"
    length = len(record) + len(str(len(record)))
    length += len(str(length)) - len(str(len(record)))
    return str(length).encode() + record


def pax_header_tar(records, data):
    """A tar whose second member, s, has the PAX records given as (key, value) byte pairs."""
    return pax_body_tar(b"".join(pax_record(key, value) for key, value in records), data)


def pax_body_tar(body, data):
    """A tar whose second member, s, follows a PAX header at offset 1024 with body as its data."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(body)
    member = tarfile.TarInfo("s")
    member.size = len(data)
    first = make_tar([entry("first", data=b"1")])[:1024]
    return (first + header.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)
            + member.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512) + b"\0" * 1024)


SPARSE_1_0 = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.realsize", b"100")]


SPARSE_0_1 = [(b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.map", b"0,4")]


@pytest.mark.parametrize("records, data", [
    (SPARSE_0_1 + [(b"GNU.sparse.size", b"x")], b"12345678"),
    ([(b"GNU.sparse.map", b"0,zz")], b"12345678"),
    ([(b"GNU.sparse.map", b"0,4\xff")], b"12345678"),
    (SPARSE_1_0, b"zz\n"),
    (SPARSE_1_0, b"99999999999999999999\n"),
], ids=["sparse-size", "sparse-map", "sparse-map-bytes", "sparse-1.0-map", "sparse-1.0-count"])
def test_apply_names_offset_of_malformed_header(tmp_path, records, data):
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=r"^invalid layer tar at offset \d+ \(after entry 'first'\): "):
        apply(layer, pax_header_tar(records, data))
    assert sorted(os.listdir(layer)) == ["first"]


def digits_only_pax_header(count):
    """A tar whose only entry, f, follows a PAX header of count digits and nothing else."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = count
    return (header.tobuf(tarfile.USTAR_FORMAT) + b"1" * count + b"\0" * (-count % 512)
            + tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024)


def test_apply_rejects_pax_digit_runs(tmp_path):
    # tarfile of CPython 3.11.7 spends about 10 s parsing this header itself.
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=r"offset 0 .*PAX record at offset 512 does not start with a decimal length"):
        apply(layer, gzip.compress(digits_only_pax_header(100_000)))
    assert os.listdir(layer) == []


def test_apply_accepts_moderate_pax_digit_runs(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    value = b"7" * 4000
    apply(layer, pax_header_tar([(b"SCHILY.xattr.user.digits", value)], b"data"))
    assert os.getxattr(layer / "s", "user.digits") == value


def test_apply_ignores_gnu_sparse_name_of_plain_entry(tmp_path):
    # Go's archive/tar reads GNU.sparse.* only for GNU sparse entries.
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "victim").write_bytes(b"parent")
    apply(layer, pax_header_tar([(b"path", b"innocent"), (b"GNU.sparse.name", b".wh.victim")], b"data"))
    assert (layer / "innocent").read_bytes() == b"data"
    assert (layer / "victim").read_bytes() == b"parent"


def test_apply_ignores_gnu_sparse_size_of_plain_entry(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    info, data = entry("f", data=b"abc")
    info.pax_headers = {"GNU.sparse.size": "100000"}
    apply(layer, make_tar([(info, data)]))
    assert (layer / "f").read_bytes() == b"abc"
    assert os.stat(layer / "f").st_size == 3


@pytest.mark.parametrize("records", [
    [(b"GNU.sparse.major", b"2"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.map", b"0,4")],
    [(b"GNU.sparse.major", b"0"), (b"GNU.sparse.minor", b"2"), (b"GNU.sparse.size", b"100000")],
    [(b"GNU.sparse.map", b""), (b"GNU.sparse.realsize", b"100000")],
], ids=["major-2", "minor-2", "empty-map"])
def test_apply_ignores_unknown_gnu_sparse_versions(tmp_path, records):
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, pax_header_tar(records + [(b"GNU.sparse.name", b"other")], b"data"))
    assert sorted(os.listdir(layer)) == ["first", "s"]
    assert (layer / "s").read_bytes() == b"data"


@pytest.mark.parametrize("records", [
    [(b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.map", b"0,4"), (b"GNU.sparse.size", b"1_0")],
    [(b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.map", b"0,4"), (b"GNU.sparse.realsize", b" 10")],
    [(b"GNU.sparse.numblocks", b"1_0"), (b"GNU.sparse.map", b"0,4"), (b"GNU.sparse.size", b"10")],
    [(b"GNU.sparse.numblocks", b"2"), (b"GNU.sparse.map", b"0,4"), (b"GNU.sparse.size", b"10")],
    [(b"GNU.sparse.map", b"0,4"), (b"GNU.sparse.size", b"10")],
    [(b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.offset", b"0"), (b"GNU.sparse.numbytes", b"1_0"),
     (b"GNU.sparse.size", b"10")],
    [(b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.numbytes", b"4"), (b"GNU.sparse.offset", b"0"),
     (b"GNU.sparse.size", b"10")],
    [(b"GNU.sparse.numblocks", b"1"), (b"GNU.sparse.offset", b"0,4"), (b"GNU.sparse.numbytes", b"4"),
     (b"GNU.sparse.size", b"10")],
], ids=["size", "realsize", "numblocks", "numblocks-count", "numblocks-missing", "numbytes",
        "numbytes-first", "offset-comma"])
def test_apply_rejects_invalid_gnu_sparse_numbers(tmp_path, records):
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=r"^invalid layer tar at offset 1024 \(after entry 'first'\): "):
        apply(layer, pax_header_tar(records, b"data"))
    assert sorted(os.listdir(layer)) == ["first"]


def test_apply_reads_gnu_sparse_0_0_records(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    records = [(b"GNU.sparse.size", b"5000"), (b"GNU.sparse.numblocks", b"2"),
               (b"GNU.sparse.offset", b"0"), (b"GNU.sparse.numbytes", b"3"),
               (b"GNU.sparse.offset", b"4997"), (b"GNU.sparse.numbytes", b"3"), (b"GNU.sparse.name", b"f")]
    apply(layer, pax_header_tar(records, b"abcxyz"))
    content = (layer / "f").read_bytes()
    assert len(content) == 5000
    assert content[:3] == b"abc"
    assert content[-3:] == b"xyz"
    assert content[3:-3] == bytes(4994)


def test_apply_keeps_comment_records_from_tarfile(tmp_path, monkeypatch):
    applied = []
    original = tarfile.TarInfo._apply_pax_info

    def record_pax_info(self, pax_headers, encoding, errors):
        applied.append(dict(pax_headers))
        return original(self, pax_headers, encoding, errors)

    def fail_proc_pax(self, tar):
        raise AssertionError("tarfile parsed a PAX header itself")

    monkeypatch.setattr(tarfile.TarInfo, "_apply_pax_info", record_pax_info)
    monkeypatch.setattr(tarfile.TarInfo, "_proc_pax", fail_proc_pax)
    layer = tmp_path / "layer"
    layer.mkdir()
    comment = (b"1" * 64 + b"x") * 1000
    apply(layer, pax_header_tar([(b"comment", comment), (b"path", b"p"), (b"atime", b"1.5")], b"data"))
    assert (layer / "p").read_bytes() == b"data"
    # tarfile applies the (empty) global records to every header.
    assert [headers for headers in applied if headers] == [{"path": "p"}]


def test_apply_parses_pax_digit_runs_without_regex(tmp_path, monkeypatch):
    # tarfile of CPython 3.11.7 spends about 64 regex steps per byte on runs
    # of 64 digits, in each of its searches over the PAX data.
    class NoRegex:
        def __getattr__(self, name):
            raise AssertionError(f"tarfile called re.{name} while parsing a PAX header")

    monkeypatch.setattr(tarfile, "re", NoRegex())
    layer = tmp_path / "layer"
    layer.mkdir()
    value = (b"1" * 64 + b"x") * 60
    comment = (b"1" * 64 + b"x") * 16000
    apply(layer, pax_header_tar([(b"SCHILY.xattr.user.x", value), (b"comment", comment)], b"data"))
    assert os.getxattr(layer / "s", "user.x") == value


# PAX header data with one malformed record, and the position of that record
# in the data. Each record before it is well-formed.
MALFORMED_PAX_RECORDS = {
    "length-too-small": (b"3 path=abc\n", 0),
    "length-too-large": (b"99 path=abc\n", 0),
    "length-not-digits": (b"1a path=ab\n", 0),
    "length-without-space": (b"11path=abc\n", 0),
    "no-newline": (b"11 path=abc", 0),
    "newline-before-end": (b"12 path=ab\nX", 0),
    "no-equals": (b"9 pathab\n", 0),
    "empty-keyword": (b"7 =abc\n", 0),
    "nul-in-keyword": (b"12 pa\0h=abc\n", 0),
    "bytes-after-nul": (b"11 path=ab\n\0\0xyz", 11),
    "nul-padding": (b"11 path=ab\n\0\0\0", 11),
    "nul-in-path": (b"12 path=a\0b\n", 0),
    "nul-in-uname": (b"11 path=ab\n13 uname=r\0t\n", 11),
    "after-good-record": (b"11 path=ab\n9 pathab\n", 11),
    "repeated-without-equals": (b"6 aaa\n" * 1000 + b"=\n", 0),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED_PAX_RECORDS))
def test_apply_rejects_malformed_pax_records(tmp_path, kind):
    layer = tmp_path / "layer"
    layer.mkdir()
    body, position = MALFORMED_PAX_RECORDS[kind]
    with pytest.raises(ValueError) as raised:
        apply(layer, pax_body_tar(body, b"data"))
    message = str(raised.value)
    assert message.startswith("invalid layer tar at offset 1024 (after entry 'first'): ")
    assert f"PAX record at offset {1536 + position}" in message
    assert len(message) < 300
    assert sorted(os.listdir(layer)) == ["first"]


_PAX_WITHOUT_EQUALS_CHILD = r"""
import gzip, io, resource, sys, tarfile
sys.path.insert(0, sys.argv[1])
import btrfsdrv

records = b"6 aaa\n" * 60000 + b"=\n"
header = tarfile.TarInfo("././@PaxHeader")
header.type = tarfile.XHDTYPE
header.size = len(records)
raw = (header.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)
       + tarfile.TarInfo("file").tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024)
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
try:
    btrfsdrv.apply_layer_diff(sys.argv[2], io.BytesIO(gzip.compress(raw, 9)))
except ValueError as error:
    print(error)
"""


def test_apply_bounds_pax_records_without_equals(tmp_path):
    # tarfile of CPython 3.8.18, 3.11.7 and 3.12.1 scans from each record to
    # the one '=' at the end and keeps 60,000 keywords of 180 kB on average.
    layer = tmp_path / "layer"
    layer.mkdir()
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    result = subprocess.run([sys.executable, "-c", _PAX_WITHOUT_EQUALS_CHILD, module_dir, str(layer)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PAX record at offset 512 has no '='" in result.stdout
    assert os.listdir(layer) == []


def test_apply_accepts_well_formed_pax_records(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    body = (pax_record(b"path", b"d/" + b"n" * 200) + pax_record(b"SCHILY.xattr.user.a", b"x=y\nz")
            + pax_record(b"comment", b"") + pax_record(b"mtime", b"1700000000.123456789"))
    apply(layer, pax_body_tar(body, b"data"))
    path = layer / "d" / ("n" * 200)
    assert path.read_bytes() == b"data"
    assert os.getxattr(path, "user.a") == b"x=y\nz"
    assert abs(os.stat(path).st_mtime - 1700000000.123456789) < 1e-6
    binary = make_tar([entry("caf\udce9", data=b"x")])
    assert b"21 hdrcharset=BINARY\n13 path=caf\xe9\n" in binary
    apply(layer, binary)
    with open(os.path.join(os.fsencode(layer), b"caf\xe9"), "rb") as data:
        assert data.read() == b"x"


def test_apply_accepts_gnu_tar_pax(tmp_path):
    if shutil.which("tar") is None:
        pytest.skip("tar is not installed")
    source = tmp_path / "source"
    long_dir = source / ("d" * 120) / ("e" * 120)
    long_dir.mkdir(parents=True)
    long_file = long_dir / ("f" * 200)
    long_file.write_bytes(b"content")
    os.setxattr(long_file, "user.note", b"a=b\nc")
    os.link(long_file, source / ("h" * 150))
    os.symlink("t" * 300, source / "link")
    latin1 = os.path.join(os.fsencode(source), b"caf\xe9")
    with open(latin1, "wb") as output:
        output.write(b"latin-1 name")
    raw = subprocess.run(["tar", "--format=pax", "--xattrs", "-C", str(source), "-cf", "-", "."],
                         stdout=subprocess.PIPE, check=True).stdout
    assert b"SCHILY.xattr.user.note" in raw
    layer = tmp_path / "layer"
    layer.mkdir()
    assert apply(layer, raw) == len(b"content") + len(b"latin-1 name")
    copy = layer / long_file.relative_to(source)
    assert copy.read_bytes() == b"content"
    assert os.getxattr(copy, "user.note") == b"a=b\nc"
    assert os.stat(layer / ("h" * 150)).st_ino == os.stat(copy).st_ino
    assert os.readlink(layer / "link") == "t" * 300
    with open(os.path.join(os.fsencode(layer), b"caf\xe9"), "rb") as data:
        assert data.read() == b"latin-1 name"


@pytest.mark.parametrize("name, kind, size, match", [
    (".wh.gone", tarfile.REGTYPE, "-1", r"size -1 is out of range"),
    (".wh.gone", tarfile.REGTYPE, "-511", r"size -511 is out of range"),
    (".wh.gone", tarfile.REGTYPE, "-512", r"size -512 is out of range"),
    (".wh.gone", tarfile.REGTYPE, str(2**63), r"size 9223372036854775808 is out of range"),
    (".wh.gone", tarfile.REGTYPE, "9" * 4000, r"invalid PAX size '9{40}\.\.\.'"),
    (".wh.gone", tarfile.REGTYPE, "-" + "9" * 4000, r"invalid PAX size '-9{39}\.\.\.'"),
    (".wh.gone", tarfile.REGTYPE, "abc", r"invalid PAX size 'abc'"),
    (".wh.gone", tarfile.REGTYPE, "1_0", r"invalid PAX size '1_0'"),
    (".wh.gone", tarfile.REGTYPE, " 10", r"invalid PAX size ' 10'"),
    ("d", tarfile.DIRTYPE, "-5", r"size -5 is out of range"),
    ("l", tarfile.SYMTYPE, "-5", r"size -5 is out of range"),
], ids=["-1", "-511", "-512", "2**63", "4000-digits", "-4000-digits", "letters", "underscore", "space",
        "directory", "symlink"])
def test_apply_rejects_invalid_entry_size(tmp_path, name, kind, size, match):
    info, _ = entry(name, kind, linkname="first")
    info.pax_headers = {"size": size}
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=rf"^entry '{re.escape(name)}' at offset 1024: {match}") as raised:
        apply(layer, make_tar([entry("first", data=b"1"), (info, None), entry("last", data=b"2")]))
    assert len(str(raised.value)) < 300
    assert sorted(os.listdir(layer)) == ["first"]


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME],
                         ids=["whiteout", "pax", "long-name"])
def test_apply_rejects_negative_base_256_size(tmp_path, kind):
    match = (r"^invalid layer tar at offset 1024 \(after entry 'first'\): malformed header: header at offset 1024: "
             "size -1024 is negative")
    layer = tmp_path / "layer"
    layer.mkdir()
    header = tarfile.TarInfo(".wh.gone")
    header.type = kind
    header.size = -1024  # GNU tar's base-256 encoding allows negative numbers
    raw = (make_tar([entry("first", data=b"1")])[:1024] + header.tobuf(tarfile.GNU_FORMAT)
           + make_tar([entry("last", data=b"2")]))
    with pytest.raises(ValueError, match=match):
        apply(layer, raw)
    assert sorted(os.listdir(layer)) == ["first"]


@pytest.mark.parametrize("keyword, value", [
    ("uid", "\u0661"), ("gid", "+\u0661"), ("uid", "1_000"), ("mtime", "1e3"), ("mtime", "1700000000 "),
    ("mtime", "0x10"),
])
def test_apply_rejects_pax_numbers_tarfile_misreads(tmp_path, keyword, value):
    layer = tmp_path / "layer"
    layer.mkdir()
    info, data = entry("f", data=b"data")
    info.pax_headers = {keyword: value}
    with pytest.raises(ValueError, match=rf"^entry 'f' at offset 0: invalid PAX {keyword} "):
        apply(layer, make_tar([(info, data)]))
    assert os.listdir(layer) == []


def test_apply_returns_size_of_written_files(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    link, _ = entry("b", tarfile.LNKTYPE, linkname="a")
    raw = make_tar([entry("a", data=b"12345"), (link, None), entry(".wh.gone", data=b"xyz"),
                    entry(".wh..wh.plnk/1", data=b"aufs"), entry("d", tarfile.DIRTYPE, mode=0o755),
                    entry("d/e", data=b"67")])
    assert apply(layer, raw) == 7


def test_apply_ignores_global_pax_headers(tmp_path):
    # containers/storage ignores global headers, so one tar must not unpack
    # to other paths or capabilities here than in Podman.
    layer = tmp_path / "layer"
    layer.mkdir()
    buffer = io.BytesIO()
    global_records = {"SCHILY.xattr.security.capability": CAPABILITY.decode("latin-1"),
                      "path": "usr/bin/evil", "uid": "7"}
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers=global_records) as tar:
        info, data = entry("bin/ls", data=b"#!/bin/sh\n")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    apply(layer, buffer.getvalue())
    assert sorted(os.listdir(layer)) == ["bin"]
    assert os.listxattr(layer / "bin" / "ls") == []
    assert os.stat(layer / "bin" / "ls").st_uid == 0


# -- Tar streams that Go's archive/tar reads differently from tarfile --------


def raw_header(name, size_field, typeflag=b"0", magic=b"ustar\x0000", prefix=b"", fields=None):
    """A 512-byte tar header built field by field, with a correct checksum.

    fields maps the offset of a numeric field (100 mode, 108 uid, 116 gid,
    136 mtime) to its raw bytes.
    """
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = size_field
    block[136:148] = b"00000000000\0"
    for offset, value in (fields or {}).items():
        block[offset:offset + len(value)] = value
    block[156:157] = typeflag
    block[257:265] = magic
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def raw_member(name, data, typeflag=b"0", **options):
    return raw_header(name, b"%011o\0" % len(data), typeflag, **options) + data + b"\0" * (-len(data) % 512)


def raw_pax(typeflag=b"x", **records):
    return raw_member(b"pax", b"".join(pax_record(key.encode(), value) for key, value in records.items()),
                      typeflag)


def raw_long_name(name, typeflag=b"L"):
    return raw_member(b"././@LongLink", name + b"\0", typeflag, magic=b"ustar  \0")


HIDDEN_MEMBER = raw_member(b"hidden", b"smuggled\n")  # 1024 bytes


@pytest.mark.parametrize("raw, expected", [
    pytest.param(raw_pax(size=b"0") + raw_pax(mtime=b"1") + raw_member(b"visible", HIDDEN_MEMBER),
                 {"visible": HIDDEN_MEMBER}, id="last-pax-size"),
    pytest.param(raw_pax(path=b"paxpath") + raw_long_name(b"gnulong") + raw_member(b"header", b"x"),
                 {"gnulong": b"x"}, id="pax-then-long-name"),
    pytest.param(raw_long_name(b"gnulong") + raw_pax(path=b"paxpath") + raw_member(b"header", b"x"),
                 {"gnulong": b"x"}, id="long-name-then-pax"),
    pytest.param(raw_long_name(b"first") + raw_long_name(b"second") + raw_member(b"header", b"x"),
                 {"second": b"x"}, id="two-long-names"),
    pytest.param(raw_long_name(b"first") + raw_long_name(b"") + raw_member(b"header", b"x"),
                 {"header": b"x"}, id="empty-last-long-name"),
    pytest.param(raw_pax(path=b"paxpath") + raw_long_name(b"") + raw_member(b"header", b"x"),
                 {"paxpath": b"x"}, id="empty-long-name-keeps-pax-path"),
    pytest.param(raw_pax(path=b"fromx") + raw_pax(b"g", comment=b"") + raw_member(b"header", b"x"),
                 {"header": b"x"}, id="pax-then-global"),
    pytest.param(raw_long_name(b"gnulong") + raw_pax(b"g", comment=b"") + raw_member(b"header", b"x"),
                 {"header": b"x"}, id="long-name-then-global"),
    pytest.param(raw_header(b"visible", b"\x000000002000\x00") + HIDDEN_MEMBER,
                 {"visible": HIDDEN_MEMBER}, id="size-with-leading-nul"),
    pytest.param(raw_pax(path=b"") + raw_member(b"header", b"x"), {"header": b"x"}, id="empty-pax-path"),
    pytest.param(raw_pax(size=b"", mtime=b"", uid=b"", gid=b"") + raw_member(b"header", b"xyz"),
                 {"header": b"xyz"}, id="empty-pax-numbers"),
])
def test_apply_reads_headers_as_go(tmp_path, raw, expected):
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, raw + b"\0" * 1024)
    assert sorted(os.listdir(layer)) == sorted(expected)
    for name, data in expected.items():
        assert (layer / name).read_bytes() == data


def test_apply_reads_numbers_with_leading_nul_as_go(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    fields = {100: b"\x00000755\0", 108: b"\x00000007\0", 136: b"\x00000001750\0"}
    apply(layer, raw_member(b"visible", b"x", fields=fields) + b"\0" * 1024)
    st = os.stat(layer / "visible")
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_uid == 7
    assert st.st_mtime == 0o1750


@pytest.mark.parametrize("value, expected", [
    (b"1700000000.123456789", 1700000000123456789),
    (b"1700000000.9999999999", 1700000000999999999),
    (b"1700000000.5", 1700000000500000000),
    (b"-1.25", -1250000000),
])
def test_apply_reads_pax_mtime_exactly(tmp_path, value, expected):
    # Go's parsePAXTime truncates the fraction to 9 digits.
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, raw_pax(mtime=value) + raw_member(b"f", b"x") + b"\0" * 1024)
    assert os.stat(layer / "f").st_mtime_ns == expected


def sparse_1_0_data(map_lines):
    """The data of a GNU sparse 1.0 entry: its map of map_lines in one block, then 4 bytes."""
    text = b"".join(line + b"\n" for line in map_lines)
    return text + b"\0" * (512 - len(text)) + b"abcd"


@pytest.mark.parametrize("map_lines", [
    [b"1", b"0_0", b"4"], [b"1", b" 0", b"4"], [b"0_1", b"0", b"4"], [b"-1", b"0", b"4"],
], ids=["underscore", "space", "count-underscore", "negative-count"])
def test_apply_rejects_invalid_sparse_1_0_numbers(tmp_path, map_lines):
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=r"^invalid layer tar at offset \d+ \(after entry 'first'\): .*sparse map"):
        apply(layer, pax_header_tar(SPARSE_1_0, sparse_1_0_data(map_lines)))
    assert sorted(os.listdir(layer)) == ["first"]


def test_apply_reads_valid_sparse_1_0_map(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, pax_header_tar(SPARSE_1_0, sparse_1_0_data([b"1", b"0", b"4"])))
    assert (layer / "s").read_bytes() == b"abcd" + b"\0" * 96


def test_apply_uses_only_last_pax_header(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = (raw_pax(**{"SCHILY.xattr.user.evil": b"1", "mtime": b"12345"}) + raw_pax(path=b"inner")
           + raw_member(b"header", b"x", fields={136: b"00000001750\0"}))
    apply(layer, raw + b"\0" * 1024)
    assert os.listdir(layer) == ["inner"]
    assert os.listxattr(layer / "inner") == []
    assert os.stat(layer / "inner").st_mtime == 0o1750


def test_apply_keeps_long_link_over_pax_linkpath(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = (raw_pax(linkpath=b"paxtarget") + raw_long_name(b"gnutarget", b"K")
           + raw_header(b"link", b"00000000000\0", b"2"))
    apply(layer, raw + b"\0" * 1024)
    assert os.readlink(layer / "link") == "gnutarget"


def assert_apply_rejects(tmp_path, raw, match):
    """Check that applying raw and the end of the archive raises ValueError matching match, and writes nothing."""
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=match):
        apply(layer, raw + b"\0" * 1024)
    assert os.listdir(layer) == []


@pytest.mark.parametrize("raw, match", [
    pytest.param(raw_pax(path=b"file") + raw_member(b"dir/", HIDDEN_MEMBER, b"\0"),
                 r"offset 0: .*'file'.*'/'", id="pax-path-drops-slash"),
    pytest.param(raw_pax(path=b"dir/") + raw_member(b"file", HIDDEN_MEMBER, b"\0"),
                 r"offset 0: .*'dir/'.*'/'", id="pax-path-adds-slash"),
    pytest.param(raw_long_name(b"dir/") + raw_member(b"file", HIDDEN_MEMBER, b"\0"),
                 r"offset 0: .*'dir/'.*'/'", id="long-name-adds-slash"),
    pytest.param(raw_member(b"pax", pax_record(b"path", b"x"), b"X") + raw_member(b"f", b"x"),
                 r"offset 0 .*type 'X'", id="solaris-extended-header"),
    pytest.param(raw_member(b"", HIDDEN_MEMBER, b"\0", prefix=b"dir"),
                 r"offset 0: .*'dir/'.*'/'", id="prefix-with-empty-name"),
    pytest.param(raw_member(b"", HIDDEN_MEMBER, b"\0", magic=b"ustar  \0", prefix=b"dir"),
                 r"offset 0: .*'dir/'.*'/'", id="gnu-prefix-with-empty-name"),
    pytest.param(raw_pax(path=b"dir/", **{"GNU.sparse.major": b"1", "GNU.sparse.minor": b"0",
                                          "GNU.sparse.name": b"file"})
                 + raw_member(b"x", sparse_1_0_data([b"1", b"0", b"4"]), b"\0"),
                 r"offset 0: .*'dir/'.*'/'", id="sparse-name-after-pax-path"),
    pytest.param(raw_long_name(b"dir/") + raw_pax(**{"GNU.sparse.major": b"1", "GNU.sparse.minor": b"0",
                                                     "GNU.sparse.name": b"file"})
                 + raw_member(b"x", sparse_1_0_data([b"1", b"0", b"4"]), b"\0"),
                 r"offset 0: .*'dir/'.*'/'", id="sparse-name-after-long-name"),
])
def test_apply_rejects_types_go_reads_differently(tmp_path, raw, match):
    assert_apply_rejects(tmp_path, raw, match)


@pytest.mark.parametrize("raw, match", [
    pytest.param(raw_member(b"visible", b"x", magic=b"\0" * 8, prefix=b"evil"),
                 r"offset 0 .*prefix", id="v7-prefix"),
    pytest.param(raw_member(b"visible", b"x", magic=b"ustar  \0", prefix=b"00000000001\0" + b"00000000002\0"),
                 r"offset 0 .*prefix .*access and change times", id="gnu-prefix"),
    pytest.param(raw_header(b"visible", b"00000000001\0", fields={108: b"+000001\0"}) + b"x" + b"\0" * 511,
                 r"offset 0 .*uid", id="uid-with-sign"),
    pytest.param(raw_header(b"visible", b"00000000001\0", fields={116: b"0o00001\0"}) + b"x" + b"\0" * 511,
                 r"offset 0 .*gid", id="gid-with-base-prefix"),
    pytest.param(raw_header(b"visible", b"00000000001\0", fields={136: b"\t0000000001\0"}) + b"x" + b"\0" * 511,
                 r"offset 0 .*mtime", id="mtime-with-tab"),
    pytest.param(raw_member(b"visible", b"x", fields={476: b"evil", 508: b"tar\0"}),
                 r"offset 0: the access time field b'evil.*STAR header", id="star-access-time"),
    pytest.param(raw_member(b"visible", b"x", fields={488: b"9" * 12, 508: b"tar\0"}),
                 r"offset 0: the change time field .*STAR header", id="star-change-time"),
])
def test_apply_rejects_headers_go_reads_differently(tmp_path, raw, match):
    assert_apply_rejects(tmp_path, raw, match)


@pytest.mark.parametrize("raw, match", [
    pytest.param(raw_header(b"link", b"00000000000\0", b"2"), "symlink target is empty", id="empty-target"),
    pytest.param(raw_pax(linkpath=b"") + raw_header(b"link", b"00000000000\0", b"2"), "symlink target is empty",
                 id="empty-target-after-empty-linkpath"),
    pytest.param(raw_header(b"dev", b"00000000000\0", b"3", fields={329: b"0010000\0"}),
                 r"devmajor 4096 is out of range \(0 to 4095\)", id="major"),
    pytest.param(raw_header(b"dev", b"00000000000\0", b"4", fields={337: b"4000000\0"}),
                 r"devminor 1048576 is out of range \(0 to 1048575\)", id="minor"),
])
def test_apply_rejects_entries_linux_cannot_make(tmp_path, raw, match):
    assert_apply_rejects(tmp_path, raw, match)


def test_apply_ignores_device_numbers_of_files(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, raw_member(b"file", b"x", fields={329: b"7777777\0"}) + b"\0" * 1024)
    assert (layer / "file").read_bytes() == b"x"


@pytest.mark.parametrize("after", [b"", b"\0" * 512, b"\0" * 1024 + raw_member(b"ignored", b"x")],
                         ids=["end-of-stream", "second-zero-block", "data-after-two-zero-blocks"])
def test_apply_ends_tar_at_zero_blocks(tmp_path, after):
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, raw_member(b"first", b"1") + b"\0" * 512 + after)
    assert os.listdir(layer) == ["first"]


@pytest.mark.parametrize("after", [raw_member(b"hidden", b"x") + b"\0" * 1024, b"\0" * 100, b"\0" * 511 + b"x"],
                         ids=["entry", "short-block", "nonzero-byte"])
def test_apply_rejects_data_after_one_zero_block(tmp_path, after):
    # Go's archive/tar rejects a tar whose first zero block is followed by anything but a zero block or its end.
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=r"offset 1536: the zero block before it is followed by data"):
        apply(layer, raw_member(b"first", b"1") + b"\0" * 512 + after)


@pytest.mark.parametrize("raw, match", [
    pytest.param(raw_pax(atime=b"garbage") + raw_member(b"a", b"x"), r"offset 0: invalid atime record b'garbage'",
                 id="atime"),
    pytest.param(raw_pax(ctime=b"1e5") + raw_member(b"a", b"x"), r"offset 0: invalid ctime record b'1e5'", id="ctime"),
    pytest.param(raw_pax(size=b"5") + raw_header(b"a", b"\xff" * 12) + b"hello" + b"\0" * 507,
                 r"offset 1024: size -1 is negative", id="negative-size-under-pax-size"),
    pytest.param(raw_pax(b"g", comment=b"x") [:512] + b"not a pax record\n".ljust(512, b"\0")
                 + raw_member(b"a", b"x"), "PAX record at offset 512", id="malformed-global"),
])
def test_apply_rejects_pax_headers_go_rejects(tmp_path, raw, match):
    assert_apply_rejects(tmp_path, raw, match)


@pytest.mark.parametrize("raw, expected", [
    pytest.param(raw_pax(b"g", comment=b"x"), [], id="only-a-global-header"),
    pytest.param(raw_member(b"a", b"x") + raw_pax(b"g", comment=b"x"), ["a"], id="global-header-last"),
    pytest.param(raw_pax(b"g", comment=b"x") + raw_member(b"a", b"x"), ["a"], id="global-header-first"),
    pytest.param(raw_pax(path=b"lost") + raw_pax(b"g", comment=b"x") + raw_member(b"a", b"x"), ["a"],
                 id="pax-before-global"),
    pytest.param(raw_pax(atime=b"", ctime=b"1700000000.5") + raw_member(b"a", b"x"), ["a"], id="valid-times"),
    # Each global header is an entry of its own to Go, so they form no chain.
    pytest.param(raw_pax(b"g", comment=b"x") * 300 + raw_member(b"a", b"x"), ["a"], id="many-global-headers"),
])
def test_apply_reads_global_headers_and_times_as_go(tmp_path, raw, expected):
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, raw + b"\0" * 1024)
    assert os.listdir(layer) == expected


def test_apply_makes_missing_parents_0755_under_any_umask(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    previous = os.umask(0o077)
    try:
        apply(layer, raw_member(b"usr/share/f", b"x") + b"\0" * 1024)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(layer / "usr").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(layer / "usr" / "share").st_mode) == 0o755


@pytest.mark.parametrize("name", [b"a/b/.wh.c", b"a/b/.wh..wh..opq"])
def test_apply_makes_missing_parents_of_whiteouts(tmp_path, name):
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, raw_member(name, b"") + b"\0" * 1024)
    assert os.listdir(layer / "a" / "b") == []
    assert stat.S_IMODE(os.stat(layer / "a").st_mode) == 0o755


def test_apply_keeps_header_values_for_empty_pax_records(tmp_path):
    # Go's mergePAX skips empty records, but keeps empty xattr records in PAXRecords.
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = (raw_pax(linkpath=b"") + raw_header(b"link", b"00000000000\0", b"2", fields={157: b"target"})
           + raw_pax(mtime=b"", **{"SCHILY.xattr.user.empty": b""})
           + raw_member(b"file", b"x", fields={136: b"00000001750\0"}))
    apply(layer, raw + b"\0" * 1024)
    assert os.readlink(layer / "link") == "target"
    assert os.stat(layer / "file").st_mtime == 1000
    assert os.getxattr(layer / "file", "user.empty") == b""


def test_apply_joins_gnu_prefix_where_times_are_invalid(tmp_path):
    # Go's archive/tar reads such a header as Go before 1.8 wrote it, with a
    # USTAR prefix, and so does tarfile.
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, raw_member(b"visible", b"x", magic=b"ustar  \0", prefix=b"dir") + b"\0" * 1024)
    assert (layer / "dir" / "visible").read_bytes() == b"x"


def extended_header(kind, body):
    header = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "././@PaxHeader")
    header.type = kind
    header.size = len(body)
    return header.tobuf(tarfile.GNU_FORMAT) + body + b"\0" * (-len(body) % 512)


@pytest.mark.parametrize("kind, body", [
    pytest.param(tarfile.XHDTYPE, b"11 path=ab\n", id="pax"),
    pytest.param(tarfile.GNUTYPE_LONGNAME, b"abcde\0", id="long-name"),
])
def test_apply_rejects_extended_header_chains(tmp_path, kind, body):
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = (extended_header(kind, body) * 300 + tarfile.TarInfo("f").tobuf(tarfile.GNU_FORMAT)
           + b"\0" * 1024)
    with pytest.raises(ValueError, match="more than 8 extended headers"):
        apply(layer, gzip.compress(raw))
    assert os.listdir(layer) == []


def old_gnu_sparse_header(extension_blocks, end_early=False):
    """A type S header whose map continues in extension_blocks blocks, each flagged as extended."""
    header = tarfile.TarInfo("s")
    header.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(header.tobuf(tarfile.GNU_FORMAT))
    block[482] = 1  # isextended
    block[148:156] = b" " * 8  # the checksum counts its own field as spaces
    block[148:155] = b"%06o\0" % sum(block)
    extension = bytearray(512)
    extension[504] = 1
    raw = bytes(block) + bytes(extension) * extension_blocks
    return raw if end_early else raw + bytes(512) + b"\0" * 1024


@pytest.mark.parametrize("blocks, end_early", [(3, True), (4096, False)], ids=["short", "over-1-MiB"])
def test_apply_bounds_old_gnu_sparse_map(tmp_path, blocks, end_early):
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match="old GNU sparse map"):
        apply(layer, old_gnu_sparse_header(blocks, end_early))
    assert os.listdir(layer) == []


def sparse_map_entries(entries):
    """The raw map entries of an old GNU sparse header: (offset, length) pairs, or raw 24-byte fields."""
    return b"".join(b"%011o\0%011o\0" % entry if isinstance(entry, tuple) else entry for entry in entries)


NUL_ENTRY = b"\0" * 24  # ends the map in its block


def raw_old_gnu_sparse(data, real_size, entries, extensions=(), magic=b"ustar  \0", size_field=None, times=b""):
    """A type S member s: its header contains entries, and each item of extensions is one extension block.

    times is the raw bytes from offset 345, where the access and change time fields are.
    """
    real_size_field = real_size if isinstance(real_size, bytes) else b"%011o\0" % real_size
    fields = {345: times, 386: sparse_map_entries(entries), 482: b"\1" if extensions else b"\0",
              483: real_size_field}
    header = raw_header(b"s", size_field or b"%011o\0" % len(data), b"S", magic=magic, fields=fields)
    blocks = b""
    for index, extension in enumerate(extensions):
        block = bytearray(512)
        raw = sparse_map_entries(extension)
        block[:len(raw)] = raw
        block[504] = index + 1 < len(extensions)
        blocks += bytes(block)
    return header + blocks + data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("raw, expected", [
    pytest.param(raw_old_gnu_sparse(b"abcdwxyz", 104, [NUL_ENTRY], [[(0, 4), (100, 4)]]),
                 b"abcd" + b"\0" * 96 + b"wxyz", id="offset-0-in-extension"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 8, [(0, 4), NUL_ENTRY, (2, 100)]),
                 b"abcd" + b"\0" * 4, id="nul-entry-ends-map"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 8, [(0, 4), NUL_ENTRY + b"\xff" * 24 + b"zz"]),
                 b"abcd" + b"\0" * 4, id="garbage-after-nul-entry"),
    pytest.param(raw_old_gnu_sparse(b"abcd", b"\0" + b"%010o\0" % 4096, [(0, 4)]),
                 b"abcd" + b"\0" * 4092, id="real-size-with-leading-nul"),
    pytest.param(raw_old_gnu_sparse(b"abcdwxyz", 20, [(0, 4), (4, 0), (10, 4)], [[(16, 0)]]),
                 b"abcd" + b"\0" * 6 + b"wxyz" + b"\0" * 6, id="empty-regions-in-order"),
    pytest.param(raw_pax(size=b"4") + raw_old_gnu_sparse(b"abcd", 100, [(0, 4)], size_field=b"0" * 11 + b"\0"),
                 b"abcd" + b"\0" * 96, id="pax-size-is-stored-size"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 4, [(0, 4)], times=b"00000000001\0" + b"00000000002\0"),
                 b"abcd", id="gnu-times"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 4, [(0, 4)], times=b"\0" * 12 + b"dir\0"),
                 b"abcd", id="invalid-change-time-without-prefix"),
])
def test_apply_reads_old_gnu_sparse_as_go(tmp_path, raw, expected):
    # The expected contents are those that Go's archive/tar (readOldGNUSparseMap) reads.
    layer = tmp_path / "layer"
    layer.mkdir()
    assert apply(layer, raw + raw_member(b"next", b"2") + b"\0" * 1024) == len(expected) + 1
    assert (layer / "s").read_bytes() == expected
    assert (layer / "next").read_bytes() == b"2"


@pytest.mark.parametrize("raw, message", [
    pytest.param(raw_old_gnu_sparse(b"abcd", 8, [(0, 4)], magic=b"ustar\x0000"), "without GNU magic",
                 id="ustar-magic"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 8, [(0, 4)], magic=bytes(8)), "without GNU magic", id="v7"),
    pytest.param(raw_old_gnu_sparse(b"abcd", b"00000000010x", [(0, 4)]), "invalid real size", id="real-size"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 8, [b"0000000000x\0" + b"%011o\0" % 4]), "invalid sparse map",
                 id="map-number"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 8, [NUL_ENTRY], [[(0, 4), b"-" * 24]]), "invalid sparse map",
                 id="extension-number"),
    pytest.param(raw_old_gnu_sparse(b"abcdefgh", 8, [(0, 4)]), "regions hold 4 bytes.*stores 8 bytes",
                 id="unused-data"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 8, [(0, 8)]), "regions hold 8 bytes.*stores 4 bytes",
                 id="regions-read-padding"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 20, [(10, 0), (5, 4)]), "region at offset 5 .* overlaps",
                 id="empty-region-out-of-order"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 20, [(0, 4), (30, 0)]), "region at offset 30 .* past the file size",
                 id="empty-region-past-size"),
    pytest.param(raw_pax(size=b"-1") + raw_old_gnu_sparse(b"", 8, []), "PAX size -1 .* is negative",
                 id="negative-pax-size"),
    pytest.param(raw_old_gnu_sparse(b"abcd", 4, [(0, 4)], times=b"evil/dir\0"), "joins the bytes from offset 345",
                 id="prefix-in-access-time"),
])
def test_apply_rejects_old_gnu_sparse_that_go_rejects(tmp_path, raw, message):
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=message):
        apply(layer, raw_member(b"first", b"1") + raw + b"\0" * 1024)
    assert os.listdir(layer) == ["first"]


@pytest.mark.parametrize("records, data, message", [
    pytest.param(SPARSE_1_0, sparse_1_0_data([b"1", b"0", b"2"]), "regions hold 2 bytes.*stores 4 bytes",
                 id="1.0-unused-data"),
    pytest.param(SPARSE_1_0, sparse_1_0_data([b"1", b"0", b"8"]), "regions hold 8 bytes.*stores 4 bytes",
                 id="1.0-regions-read-padding"),
    pytest.param(SPARSE_1_0 + [(b"size", b"100")], sparse_1_0_data([b"1", b"0", b"4"]),
                 "map of 512 bytes is longer than the 100 bytes", id="1.0-map-longer-than-data"),
    pytest.param(SPARSE_0_1 + [(b"GNU.sparse.size", b"10")], b"abcdefgh", "regions hold 4 bytes.*stores 8 bytes",
                 id="0.1-unused-data"),
])
def test_apply_rejects_sparse_data_that_go_rejects(tmp_path, records, data, message):
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ValueError, match=message):
        apply(layer, pax_header_tar(records, data))
    assert os.listdir(layer) == ["first"]


def test_apply_old_gnu_sparse_many_regions(tmp_path):
    # GNU tar writes the map entries past the first 4 into extension blocks.
    source, layer = tmp_path / "source", tmp_path / "layer"
    source.mkdir()
    layer.mkdir()
    with open(source / "sparse", "wb") as file:
        for index in range(60):
            file.seek(index * (1 << 20))
            file.write(b"region %d" % index)
        file.truncate(64 << 20)
    raw = subprocess.run(["tar", "-C", str(source), "--sparse", "--format=gnu", "-cf", "-", "sparse"],
                         stdout=subprocess.PIPE, check=True).stdout
    assert raw[156:157] == b"S"
    assert apply(layer, raw) == 64 << 20
    assert_same_sparse_contents(layer / "sparse", source / "sparse")
    assert os.stat(layer / "sparse").st_blocks * 512 < 8 << 20


def test_apply_old_gnu_sparse_map_limit(tmp_path):
    # Go's archive/tar counts 97 bytes for the header's map and 505 for each
    # extension block, and rejects a count of 1 MiB, so it reads 2,076 blocks.
    layer = tmp_path / "layer"
    layer.mkdir()
    apply(layer, old_gnu_sparse_header(2075))
    assert (layer / "s").stat().st_size == 0
    with pytest.raises(ValueError, match="old GNU sparse map at offset 0 is larger than 1048576 bytes"):
        apply(layer, old_gnu_sparse_header(2076))


def test_apply_bounds_sparse_1_0_map(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    data = b"1000000000\n" + b"0\n" * (2 << 20)
    with pytest.raises(ValueError, match=r"offset \d+ \(after entry 'first'\): GNU sparse map is larger"):
        apply(layer, gzip.compress(pax_header_tar(SPARSE_1_0, data)))


def test_apply_names_offset_of_malformed_first_header(tmp_path):
    raw = pax_header_tar(SPARSE_0_1 + [(b"GNU.sparse.size", b"x")], b"12345678")[1024:]
    with pytest.raises(ValueError, match=r"^invalid layer tar at offset 0 \(before the first entry\): malformed"):
        apply(tmp_path, raw)


@pytest.mark.parametrize("name", [".wh.gone", ".wh..wh.plnk/1"])
def test_apply_unread_entry_with_huge_size_fails(tmp_path, name):
    info, _ = entry(name)
    info.pax_headers = {"size": str(2**63 - 1)}
    raw = make_tar([entry("first", data=b"1"), (info, None)])

    def time_out(signum, frame):
        raise TimeoutError("apply_diff did not return")

    previous = signal.signal(signal.SIGALRM, time_out)
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match=r"offset \d+ \(after entry '.*'\): the entry's data ends") as raised:
            apply(tmp_path, raw)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    # The offset is where the data ran out, not the one that the size claims.
    assert int(re.search(r"offset (\d+)", str(raised.value)).group(1)) <= len(raw)


def test_hostile_corrupt_gzip(trees):
    layer, sentinel, digest = trees
    packed = subprocess.run(["gzip", "-c"], input=make_tar([entry("f", data=os.urandom(50000))]),
                            stdout=subprocess.PIPE, check=True).stdout
    with pytest.raises(ValueError):
        apply(layer, packed[:len(packed) // 2])
    assert no_temporaries(layer)


def random_hostile_member(rng, sentinel):
    """Return a (TarInfo, data) pair built from names and targets that aim at the sentinel."""
    components = ["a", "b", "link", "up", "..", ".", "", ".wh.a", ".wh.link", ".wh..wh..opq",
                  ".wh..wh.plnk", "sentinel", str(sentinel).lstrip("/")]
    name = "/".join(rng.choice(components) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.2:
        name = "/" + name
    targets = [str(sentinel), str(sentinel / "secret"), "../sentinel", "../sentinel/secret",
               "../../" * 4, "/", "a", "link", "link/secret", "up/secret"]
    kind = rng.choice([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                       tarfile.FIFOTYPE, tarfile.CHRTYPE])
    info, data = entry(name, kind, linkname=rng.choice(targets), mode=rng.choice([0o644, 0o4755, 0o000]))
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    if kind == tarfile.REGTYPE:
        data = b"owned"
    return info, data


def insert_malformed_pax_header(rng, raw):
    """Insert a PAX header with a malformed record in front of a random header of the tar raw."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        offsets = [member.offset for member in tar]
    body, _ = MALFORMED_PAX_RECORDS[rng.choice(sorted(MALFORMED_PAX_RECORDS))]
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(body)
    at = rng.choice(offsets)
    return raw[:at] + header.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512) + raw[at:]


def insert_extended_header_chain(rng, raw):
    """Insert extended headers that Go's archive/tar and tarfile order differently in front of a random header."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        offsets = [member.offset for member in tar]
    chains = [
        raw_pax(size=b"0") + raw_pax(mtime=b"1"),
        raw_pax(size=b"1024") + raw_long_name(b"../escape"),
        raw_pax(path=b"../escape") + raw_long_name(b"inside"),
        raw_long_name(b"../escape") + raw_long_name(b""),
        raw_pax(path=b"../escape") + raw_pax(b"g", comment=b""),
        raw_header(b"nul-size", b"\x000000002000\x00"),
        raw_member(b"name", b"", magic=b"ustar  \0", prefix=b".."),
    ]
    at = rng.choice(offsets)
    return raw[:at] + rng.choice(chains) + raw[at:]


def mutate_bytes(rng, raw):
    """Flip, cut or repeat bytes of a tar stream."""
    raw = bytearray(raw)
    choice = rng.random()
    if choice < 0.6:
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif choice < 0.8:
        raw = raw[:rng.randrange(len(raw))]
    else:
        start = rng.randrange(len(raw))
        raw[start:start] = raw[start:start + rng.randint(1, 1024)]
    return bytes(raw)


_DEEP_WHITEOUT_CHILD = r"""
import io, os, resource, sys, tarfile
sys.path.insert(0, sys.argv[1])
import btrfsdrv

layer, depth = sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
fd = os.open(layer, os.O_RDONLY)
for name in ("d", "e"):
    os.mkdir(name, dir_fd=fd)
    level = os.open(name, os.O_RDONLY, dir_fd=fd)
    for _ in range(depth):
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=level))
        os.mkdir("a", dir_fd=level)
        deeper = os.open("a", os.O_RDONLY, dir_fd=level)
        os.close(level)
        level = deeper
    os.close(level)
buffer = io.BytesIO()
with tarfile.open(fileobj=buffer, mode="w") as tar:
    tar.addfile(tarfile.TarInfo(".wh.d"))
    tar.addfile(tarfile.TarInfo("e"), io.BytesIO(b""))
btrfsdrv.apply_layer_diff(layer, io.BytesIO(buffer.getvalue()))
print(sorted(os.listdir(layer)))
"""


def test_failed_deep_entry_removes_its_parents(tmp_path, monkeypatch):
    layer = tmp_path / "layer"
    layer.mkdir()
    info, _ = entry("a/" * 3000 + "device", tarfile.BLKTYPE)

    def fail(*args, **kwargs):
        raise OSError(errno.EINVAL, "injected: mknod failed")

    monkeypatch.setattr(os, "mknod", fail)
    with pytest.raises(OSError, match="injected"):
        apply(layer, make_tar([(info, None)]))
    assert os.listdir(layer) == []


def test_diff_replaces_placeholder_with_directory(driver):
    driver.create("parent")
    btrfsdrv.create_subvolume(os.path.join(driver.get("parent"), "nested"))
    write(os.path.join(driver.get("parent"), "nested", "file"), b"parent")
    driver.create("child", "parent")
    child = driver.get("child")
    os.rmdir(os.path.join(child, "nested"))  # the snapshot's placeholder
    write(os.path.join(child, "nested", "file"), b"child")
    driver.create("copy", "parent")
    with driver.diff("child", "parent") as stream:
        driver.apply_diff("copy", stream)
    with open(os.path.join(driver.get("copy"), "nested", "file"), "rb") as data:
        assert data.read() == b"child"


@pytest.mark.parametrize("name", ["nested/new", "nested/dir/new"])
@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE])
def test_apply_below_placeholder_names_it(driver, name, kind):
    driver.create("parent")
    btrfsdrv.create_subvolume(os.path.join(driver.get("parent"), "nested"))
    driver.create("child", "parent")

    with pytest.raises(OSError) as raised:
        driver.apply_diff("child", io.BytesIO(make_tar([entry(name, kind, linkname="target")])))

    assert raised.value.errno == errno.EPERM
    assert "'nested' is the empty placeholder" in raised.value.strerror
    assert "replace it" in raised.value.strerror
    assert os.listdir(os.path.join(driver.get("child"), "nested")) == []


def remove_contents(directory):
    """Delete everything in directory at any depth.

    shutil.rmtree, which cleans up tmp_path, recurses once per level.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            btrfsdrv._remove_tree(fd, name)
    finally:
        os.close(fd)


def down_and_up_entries(depth):
    """Return directory entries down a chain, then a file entry at every level from the bottom back up."""
    entries = [entry("a/" * level, tarfile.DIRTYPE, mode=0o755) for level in range(1, depth + 1)]
    entries += [entry("a/" * level + "f") for level in range(depth, 0, -1)]
    return entries


def alternating_entries(depth):
    """Return a directory and a file entry one level down chain x, then the same in chain y, and so on."""
    entries = []
    for level in range(depth):
        for top in ("x/", "y/"):
            entries.append(entry(top + "a/" * level, tarfile.DIRTYPE, mode=0o755))
            entries.append(entry(top + "a/" * level + "f"))
    return entries


@pytest.mark.parametrize("order", ["down_and_up", "alternating"])
def test_apply_opens_linear_in_depth(tmp_path, monkeypatch, order):
    depth = 300
    layer = tmp_path / "layer"
    layer.mkdir()
    entries = {"down_and_up": down_and_up_entries, "alternating": alternating_entries}[order](depth)
    raw = make_tar(entries)

    opens = count_calls(monkeypatch, os, "open")
    try:
        apply(layer, raw)
        open_count = len(opens)
        missing = [info.name for info, _ in entries if not os.path.lexists(layer / info.name)]
        assert missing == []
    finally:
        monkeypatch.undo()
        remove_contents(layer)

    # Resolving each entry's parent from the layer root would take about
    # depth * depth / 2 opens for each chain.
    entry_count = len(entries)
    assert open_count <= 4 * entry_count


def test_apply_reopens_directories_that_entries_replace(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    entries = [
        entry("d/x/y/old"), entry(".wh.d"), entry("d/x/y/new"),
        entry("g/x/old"), entry("g"), entry("g", tarfile.DIRTYPE, mode=0o755), entry("g/x/new"),
        entry("h/x/target", data=b"old"), entry("l/old", tarfile.LNKTYPE, linkname="h/x/target"),
        entry(".wh.h"), entry("h/x/target", data=b"new"),
        entry("l/new", tarfile.LNKTYPE, linkname="h/x/target"),
    ]
    apply(layer, make_tar(entries))

    assert os.listdir(layer / "d" / "x" / "y") == ["new"]
    assert os.listdir(layer / "g" / "x") == ["new"]
    assert (layer / "l" / "new").read_bytes() == b"new"
    assert (layer / "l" / "old").read_bytes() == b"old"
    assert os.path.samefile(layer / "l" / "new", layer / "h" / "x" / "target")


@pytest.mark.parametrize("marker", [".wh.victim", ".wh..wh..opq"])
def test_apply_whiteouts_below_path_max(tmp_path, marker):
    # 300 levels of 20-byte names: the directories' paths are far longer
    # than PATH_MAX, so nothing may need a path of them, not even a message.
    layer = tmp_path / "layer"
    layer.mkdir()
    top = "/".join(["d" * 20] * 300)
    setup = [entry(top + "/victim/inner/file", data=b"old"), entry(top + "/keep", data=b"k")]
    apply(layer, make_tar(setup))
    try:
        apply(layer, make_tar([entry(top + "/" + marker)]))
        fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
        for name in top.split("/"):
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        try:
            remaining = sorted(os.listdir(fd))
        finally:
            os.close(fd)
    finally:
        remove_contents(layer)

    assert remaining == ([] if marker == ".wh..wh..opq" else ["keep"])


def test_directory_opener_walks_from_root_after_move(tmp_path):
    os.makedirs(tmp_path / "x" / "y" / "z")
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with btrfsdrv._DirectoryOpener(root_fd) as directories:
            directories.open(["x", "y", "z"], "x/y/z")
            os.rename(tmp_path / "x" / "y" / "z", tmp_path / "moved")
            # Climbing from the moved directory reaches the root, not x/y.
            fd = directories.open(["x", "y"], "x/y")
            assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "x" / "y"))
    finally:
        os.close(root_fd)


def test_apply_removes_trees_deeper_than_fd_limit(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    result = subprocess.run([sys.executable, "-c", _DEEP_WHITEOUT_CHILD, module_dir, str(layer), "300"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "['e']"


def test_apply_opaque_directory_of_any_depth(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    deep = "d/" + "a/" * 1100 + "f"
    apply(layer, make_tar([entry("d", tarfile.DIRTYPE, mode=0o755), entry(deep, data=b"x"),
                           entry("d/.wh..wh..opq")]))
    with open(layer / deep, "rb") as data:
        assert data.read() == b"x"
    # shutil.rmtree, which cleans up tmp_path later, recurses once per level.
    apply(layer, make_tar([entry(".wh.d")]))
    assert os.listdir(layer) == []


def test_apply_walks_repeated_opaque_marker_once(tmp_path, monkeypatch):
    layer = tmp_path / "layer"
    write(str(layer / "d" / "old"), b"parent")
    time.sleep(0.01)
    walks = []
    original = btrfsdrv.walk_tree

    def counting_walk(top_fd, visit, *args, **kwargs):
        walks.append(top_fd)
        return original(top_fd, visit, *args, **kwargs)

    monkeypatch.setattr(btrfsdrv, "walk_tree", counting_walk)
    entries = [entry("d", tarfile.DIRTYPE, mode=0o755)] + [entry(f"d/f{index}") for index in range(50)]
    apply(layer, make_tar(entries + [entry("d/.wh..wh..opq")] * 200))
    assert len(walks) == 1
    assert sorted(os.listdir(layer / "d")) == sorted(f"f{index}" for index in range(50))


def test_apply_random_and_mutated_tars_stay_inside(trees):
    layer, sentinel, digest = trees
    beside = sorted(os.listdir(layer.parent))

    def check(rng):
        raw = make_tar([random_hostile_member(rng, sentinel) for _ in range(rng.randint(1, 8))])
        malformed_pax = rng.random() < 0.2
        if malformed_pax:
            raw = insert_malformed_pax_header(rng, raw)
        elif rng.random() < 0.2:
            raw = insert_extended_header_chain(rng, raw)
        elif rng.random() < 0.5:
            raw = mutate_bytes(rng, raw)
        try:
            apply(layer, raw)
        except (ValueError, OSError):
            pass  # a rejected stream is fine; only what it left behind matters
        else:
            assert not malformed_pax, "a tar with a malformed PAX record was applied"
        assert_sentinel_intact(sentinel, digest)
        assert sorted(os.listdir(layer.parent)) == beside
        assert no_temporaries(layer)

    run_cases(check, cases=1000)


def flip_byte_inside(packed, marker):
    """Return packed with one byte changed inside the first copy of marker, which must be stored verbatim."""
    spoiled = bytearray(packed)
    spoiled[packed.index(marker) + len(marker) // 2] ^= 0x01
    return bytes(spoiled)


def compress_with(command, raw):
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    return subprocess.run(command, input=raw, stdout=subprocess.PIPE, check=True).stdout


# Each case spoils a stream after the tar's last block, where only the
# decompressor's end-of-stream checks can notice.
SPOILED_STREAMS = {
    "gzip-crc": lambda raw, data: flip_byte_inside(gzip.compress(raw, compresslevel=0), data),
    "gzip-no-trailer": lambda raw, data: gzip.compress(raw)[:-8],
    "xz-no-end": lambda raw, data: lzma.compress(raw)[:-24],
    "bzip2-no-end": lambda raw, data: bz2.compress(raw)[:-4],
    "zstd-checksum": lambda raw, data: flip_byte_inside(compress_with(["zstd", "-c", "--check"], raw), data),
    "zstd-no-end": lambda raw, data: compress_with(["zstd", "-c", "--check"], raw)[:-4],
}


@pytest.mark.parametrize("spoil", sorted(SPOILED_STREAMS))
def test_apply_checks_end_of_compressed_stream(tmp_path, spoil):
    layer = tmp_path / "layer"
    layer.mkdir()
    # Incompressible and larger than the 1 MiB read buffers, so that the
    # first entry is applied before the decompressor reaches the end.
    data = random_content(3 << 20, 7)
    raw = make_tar([entry("first", data=b"1"), entry("big", data=data)])
    with pytest.raises(ValueError, match=r"truncated or corrupt \w+ stream") as raised:
        apply(layer, SPOILED_STREAMS[spoil](raw, data[100_000:100_064]))
    assert "offset" in str(raised.value)
    assert (layer / "first").read_bytes() == b"1"  # entries before the error stay applied


def test_apply_discards_data_after_plain_tar(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = make_tar([entry("f", data=b"data")])
    stream = io.BytesIO(raw + b"\0" * (3 << 20) + b"trailing bytes")
    assert btrfsdrv.apply_layer_diff(str(layer), stream) == 4
    assert stream.read() == b""  # read to the end, as a pipe writer needs
    assert (layer / "f").read_bytes() == b"data"


def xz_stating_dictionary(chunks, dictionary_code, directory):
    """Compress chunks with xz and a 1 MiB dictionary, then state another dictionary size in the header.

    A decoder allocates and fills the dictionary size that the block header
    states, while the encoder needs memory only for its own small one.
    dictionary_code is the LZMA2 property byte, which stands for
    (2 | code % 2) << (code // 2 + 11) bytes.
    """
    if shutil.which("xz") is None:
        pytest.skip("xz is not installed")
    path = os.path.join(directory, "stream.xz")
    with open(path, "wb") as out:
        process = subprocess.Popen(["xz", "-T1", "--lzma2=preset=0,dict=1MiB", "-c"],
                                   stdin=subprocess.PIPE, stdout=out)
        for chunk in chunks:
            process.stdin.write(chunk)
        process.stdin.close()
        assert process.wait() == 0
    with open(path, "rb") as packed_file:
        packed = bytearray(packed_file.read())

    # The block header follows the 12-byte stream header: a size byte, a
    # flags byte, optional sizes, then the filter flags (id 0x21 for LZMA2,
    # property size 1, the dictionary byte), padding and a CRC32.
    start = 12
    header_size = (packed[start] + 1) * 4
    flags = packed[start + 1]
    assert flags & 0x03 == 0, "one filter only"
    position = start + 2
    for size_flag in (0x40, 0x80):
        if flags & size_flag:
            while packed[position] & 0x80:
                position += 1
            position += 1
    assert packed[position:position + 2] == b"\x21\x01"
    packed[position + 2] = dictionary_code
    crc_at = start + header_size - 4
    packed[crc_at:crc_at + 4] = struct.pack("<I", zlib.crc32(packed[start:crc_at]))
    with open(path, "wb") as out:
        out.write(packed)
    return path


LZMA2_DICTIONARY_512_MIB = 34


def test_apply_rejects_xz_with_huge_dictionary(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = make_tar([entry("f", data=b"data")])
    path = xz_stating_dictionary([raw], LZMA2_DICTIONARY_512_MIB, str(tmp_path))
    with open(path, "rb") as stream:
        with pytest.raises(ValueError, match=r"offset 0 .*xz stream needs more than 128 MiB of memory"):
            btrfsdrv.apply_layer_diff(str(layer), stream)
    assert os.listdir(layer) == []


def test_apply_checks_dictionary_of_later_xz_stream(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = make_tar([entry("first", data=b"1"), entry("second", data=b"2")])
    path = xz_stating_dictionary([raw[1024:]], LZMA2_DICTIONARY_512_MIB, str(tmp_path))
    with open(path, "rb") as second_stream:
        packed = lzma.compress(raw[:1024]) + second_stream.read()
    with pytest.raises(ValueError, match=r"xz stream needs more than 128 MiB of memory"):
        apply(layer, packed)


# Applies a layer file (argv[2]) to a directory (argv[3]) with btrfsdrv from
# argv[1], then prints the error or "applied", and the peak RSS in KiB. A
# process's ru_maxrss keeps the peak of the process that ran exec (for
# subprocess, the test runner), so the apply runs in a forked process.
APPLY_AND_MEASURE_SCRIPT = """
import os, resource, sys, traceback
sys.path.insert(0, sys.argv[1])
import btrfsdrv
pid = os.fork()
if pid == 0:
    try:
        with open(sys.argv[2], "rb") as stream:
            btrfsdrv.apply_layer_diff(sys.argv[3], stream)
        print("applied")
    except ValueError as error:
        print(error)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(0 if status == 0 else 1)
"""


def test_apply_xz_memory_stays_below_dictionary(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    # A whiteout's data is skipped, but decoding it fills the dictionary.
    whiteout = tarfile.TarInfo(".wh.big")
    whiteout.size = 512 << 20
    chunks = [whiteout.tobuf(tarfile.PAX_FORMAT)] + [bytes(1 << 20)] * 512 + [bytes(1024)]
    path = xz_stating_dictionary(chunks, LZMA2_DICTIONARY_512_MIB, str(tmp_path))
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    result = subprocess.run([sys.executable, "-c", APPLY_AND_MEASURE_SCRIPT, module_dir, path, str(layer)],
                            capture_output=True, text=True, check=True)
    message, max_rss_kib = result.stdout.splitlines()
    assert "xz stream needs more than 128 MiB of memory" in message
    assert int(max_rss_kib) < 300 * 1024, f"peak RSS was {int(max_rss_kib) // 1024} MiB"


def split_xz(raw, split):
    return lzma.compress(raw[:split]) + lzma.compress(raw[split:])


XZ_TAILS = {
    "concatenated": lambda raw: split_xz(raw, 1000),
    "garbage-after-stream": lambda raw: lzma.compress(raw) + b"not xz" * 1000,
}


@pytest.mark.parametrize("tail", sorted(XZ_TAILS))
def test_apply_reads_xz_like_lzmafile(tmp_path, tail):
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = make_tar([entry("first", data=b"1"), entry("second", data=random_content(5000, 3))])
    packed = XZ_TAILS[tail](raw)
    assert lzma.LZMAFile(io.BytesIO(packed)).read() == raw
    stream = io.BytesIO(packed)
    assert btrfsdrv.apply_layer_diff(str(layer), stream) == 5001
    assert stream.read() == b""  # read to the end, as a pipe writer needs
    assert (layer / "second").read_bytes() == random_content(5000, 3)


def test_apply_rejects_truncated_later_xz_stream(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    raw = make_tar([entry("first", data=b"1"), entry("second", data=b"2")])
    with pytest.raises(ValueError, match=r"truncated or corrupt xz stream"):
        apply(layer, split_xz(raw, 1000)[:-24])


@pytest.mark.parametrize("read_size", [7, 4096, 1 << 20])
def test_xz_reader_bounds_each_read(read_size):
    data = bytes(3 << 20) + random_content(100_000, 3)
    reader = btrfsdrv._XzReader(io.BufferedReader(io.BytesIO(lzma.compress(data) + lzma.compress(b"end"))))
    output = bytearray()
    buffer = bytearray(read_size)
    while True:
        count = reader.readinto(buffer)
        assert count <= read_size
        if not count:
            break
        output += buffer[:count]
    assert output == data + b"end"


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
    # The version 2 capability was container root's, so it moves with root.
    assert (os.getxattr(layer + "/bin/ping", "security.capability")
            == btrfsdrv._capability_with_rootid(CAPABILITY, 100000))
    assert os.stat(layer + "/bin/ping2").st_ino == st.st_ino
    assert os.stat(layer + "/sgid").st_gid == 200005
    assert stat.S_IMODE(os.stat(layer + "/sgid").st_mode) == 0o2755
    assert os.lstat(layer + "/link").st_uid == 100000
    assert os.stat(layer).st_uid == 0
    btrfsdrv.remap_layer_owners(layer, new, old)
    assert os.stat(layer + "/bin/ping").st_uid == 0
    assert os.getxattr(layer + "/bin/ping", "security.capability") == CAPABILITY


def test_remap_moves_capability_root_ids(tmp_path):
    layer = str(tmp_path / "l")
    capable_file(layer + "/v2", 100000, capability())
    capable_file(layer + "/root", 100000, capability(100000))
    capable_file(layer + "/user", 100005, capability(100005))
    old = [btrfsdrv.IDMap(0, 100000, 65536)]
    new = [btrfsdrv.IDMap(0, 200000, 65536)]
    btrfsdrv.remap_layer_owners(layer, (old, old), (new, new))
    assert os.getxattr(layer + "/v2", "security.capability") == capability()
    assert os.getxattr(layer + "/root", "security.capability") == capability(200000)
    assert os.getxattr(layer + "/user", "security.capability") == capability(200005)
    assert os.stat(layer + "/root").st_uid == 200000
    btrfsdrv.remap_layer_owners(layer, (new, new), None)
    assert os.getxattr(layer + "/v2", "security.capability") == capability()
    assert os.getxattr(layer + "/root", "security.capability") == capability()
    assert os.getxattr(layer + "/user", "security.capability") == capability(5)


def test_remap_moves_version_2_capability_of_unmapped_layer(tmp_path):
    # A layer made without ID maps: its version 2 capability is container
    # root's, so it must not stay honoured on the host after the remap.
    layer = str(tmp_path / "l")
    capable_file(layer + "/v2", 0, capability())
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]

    btrfsdrv.remap_layer_owners(layer, None, (maps, maps))
    assert os.getxattr(layer + "/v2", "security.capability") == capability(100000)
    assert os.stat(layer + "/v2").st_uid == 100000

    btrfsdrv.remap_layer_owners(layer, (maps, maps), None)
    assert os.getxattr(layer + "/v2", "security.capability") == capability()
    assert os.stat(layer + "/v2").st_uid == 0


def test_remap_capability_of_unchanged_owner(tmp_path):
    layer = str(tmp_path / "l")
    capable_file(layer + "/ping", 100005, capability(100000))
    old = [btrfsdrv.IDMap(0, 100000, 65536)]
    new = [btrfsdrv.IDMap(0, 200000, 1), btrfsdrv.IDMap(1, 100001, 65535)]
    btrfsdrv.remap_layer_owners(layer, (old, old), (new, new))
    assert os.stat(layer + "/ping").st_uid == 100005
    assert stat.S_IMODE(os.stat(layer + "/ping").st_mode) == 0o755
    assert os.getxattr(layer + "/ping", "security.capability") == capability(200000)


def test_remap_capability_root_outside_new_maps(tmp_path):
    layer = str(tmp_path / "l")
    capable_file(layer + "/ping", 100000, capability(100020))
    old = [btrfsdrv.IDMap(0, 100000, 65536)]
    new = [btrfsdrv.IDMap(0, 200000, 10)]
    with pytest.raises(ValueError, match="'/ping'.*security.capability.*20.*nothing was changed"):
        btrfsdrv.remap_layer_owners(layer, (old, old), (new, new))
    assert os.stat(layer + "/ping").st_uid == 100000
    assert os.getxattr(layer + "/ping", "security.capability") == capability(100020)


def test_remap_drops_capability_of_unmapped_root(tmp_path, caplog):
    layer = str(tmp_path / "l")
    capable_file(layer + "/ping", 100000, capability(300000))
    old = [btrfsdrv.IDMap(0, 100000, 65536)]
    new = [btrfsdrv.IDMap(0, 200000, 65536)]
    with caplog.at_level("WARNING", logger="btrfsdrv"):
        btrfsdrv.remap_layer_owners(layer, (old, old), (new, new))
    assert os.stat(layer + "/ping").st_uid == 200000
    assert "security.capability" not in os.listxattr(layer + "/ping")
    assert "/ping" in caplog.text
    assert "300000" in caplog.text


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
        directory = os.path.join(root, f"directory-{index - index % 100}")
        os.makedirs(directory, exist_ok=True)
        write(os.path.join(directory, f"file-{index}"), random_content(64, seed + index), mode=0o755)


def change_many_files(root, count, seed):
    """Modify, add and delete a third of the files each; return the expected changes."""
    expected = []
    for index in range(count):
        directory = f"/directory-{index - index % 100}"
        if index % 100 == 0:
            expected.append(Change(directory, MODIFY))
        if index % 3 == 0:
            path = directory + f"/file-{index}"
            before = os.stat(root + path).st_mtime_ns
            while os.stat(root + path).st_mtime_ns == before:
                write(root + path, random_content(64, seed + index), mode=0o755)
            expected.append(Change(path, MODIFY))
        elif index % 3 == 1:
            path = directory + f"/file-{seed}-{index}"
            write(root + path, random_content(64, seed + index), mode=0o755)
            expected.append(Change(path, ADD))
        else:
            path = directory + f"/file-{index}"
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
        with open(diff_root + f"/directory-0/file-{index}", "rb") as data:
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
        path += f"/subdir{index + 1}"
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
    # The version 2 capability was container root's, so it moves with root.
    assert (os.getxattr(root + "/usr/bin/ping", "security.capability")
            == btrfsdrv._capability_with_rootid(CAPABILITY, 100000))
    assert os.stat(root + "/usr/bin/ping6").st_ino == st.st_ino
    assert driver.supports_shifting() is False


def test_driver_capability_root_follows_id_maps(home):
    old = [btrfsdrv.IDMap(0, 100000, 65536)]
    new = [btrfsdrv.IDMap(0, 200000, 65536)]
    with btrfsdrv.Driver(home, uid_maps=old, gid_maps=old) as driver:
        driver.create("base")
        driver.create_read_write("c", "base")
        ping = driver.get("c") + "/ping"
        capable_file(ping, 100000, capability(100000))
        with driver.diff("c", "base") as stream:
            found = members(stream.read())
        assert (found["ping"].uid, found["ping"].gid) == (0, 0)
        assert member_capability(found["ping"]) == capability()
        driver.update_layer_id_map("c", (old, old), (new, new))
        assert os.stat(ping).st_uid == 200000
        assert os.getxattr(ping, "security.capability") == capability(200000)


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
        name = rng.choice(["d", "f", "x"]) + str(index)
        path = os.path.join(parent, name)
        if rng.random() < 0.25 and path.count("/") - root.count("/") < 5:
            os.mkdir(path)
            directories.append(path)
        else:
            write(path, random_content(rng.randrange(0, 300), index))
            files.append(path)
    for _ in range(5):
        source = rng.choice(files)
        link = os.path.join(rng.choice(directories), f"link{rng.randrange(10**6)}")
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
    new_name = os.path.join(directory, f"new{rng.randrange(10**6)}")

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
        os.rename(path, os.path.join(target, f"moved{rng.randrange(10**6)}"))
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
    return f"{edit} {os.path.relpath(path, root)}"


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


def test_fast_path_sees_directories_renamed_into_place(driver):
    driver.create("base")
    base = driver.get("base")
    for name, data in (("app", b"old version"), ("app.new", b"NEW VERSION 2.0"), ("one", b"1"), ("two", b"2")):
        write(f"{base}/opt/{name}/bin/tool", data)
    # Tar-applied layers give every directory one mtime, so only the inodes differ.
    for directory, dirnames, _ in os.walk(base):
        for name in dirnames:
            os.utime(os.path.join(directory, name), (1_700_000_000, 1_700_000_000))
    driver.create("child", "base")
    child = driver.get("child")
    shutil.rmtree(child + "/opt/app")
    os.rename(child + "/opt/app.new", child + "/opt/app")
    os.rename(child + "/opt/one", child + "/opt/swap")
    os.rename(child + "/opt/two", child + "/opt/one")
    os.rename(child + "/opt/swap", child + "/opt/two")
    for name in ("opt", "opt/app", "opt/one", "opt/two"):
        os.utime(f"{child}/{name}", (1_700_000_000, 1_700_000_000))

    full = btrfsdrv.layer_changes(child, base)
    assert "/opt/app/bin/tool" in [change.path for change in full]
    assert driver.changes("child", "base") == full
    with driver.diff("child", "base") as stream:
        assert b"NEW VERSION 2.0" in stream.read()


def test_fast_path_compares_nested_subvolumes(driver):
    driver.create("base")
    base = driver.get("base")
    btrfsdrv.create_subvolume(base + "/placeholder")
    write(base + "/placeholder/inside", b"parent")
    btrfsdrv.create_subvolume(base + "/replaced")
    write(base + "/replaced/file", b"parent")
    driver.create("child", "base")
    child = driver.get("child")
    # The snapshot has empty placeholder directories where base has subvolumes.
    os.rmdir(child + "/replaced")
    btrfsdrv.create_subvolume(child + "/replaced")
    write(child + "/replaced/file", b"child!")

    full = btrfsdrv.layer_changes(child, base)
    paths = [change.path for change in full]
    assert "/placeholder/inside" in paths
    assert "/replaced/file" in paths
    assert driver.changes("child", "base") == full


def test_fast_path_sees_placeholders_in_unchanged_directories(driver):
    driver.create("base")
    base = driver.get("base")
    os.makedirs(base + "/dir/deeper")
    btrfsdrv.create_subvolume(base + "/dir/deeper/nested")
    write(base + "/dir/deeper/nested/inside", b"parent")
    btrfsdrv.create_subvolume(base + "/top")
    driver.create("child", "base")

    full = btrfsdrv.layer_changes(driver.get("child"), base)
    assert "/dir/deeper/nested/inside" in [change.path for change in full]
    assert driver.changes("child", "base") == full


def test_fast_path_declines_unrelated_layers(driver):
    driver.create("one")
    driver.create("two")
    assert btrfsdrv._snapshot_changes(driver.get("two"), driver.get("one")) is None
    driver.create("child", "one")
    assert btrfsdrv._snapshot_changes(driver.get("child"), driver.get("two")) is None


def count_calls(monkeypatch, owner, name):
    """Replace owner.name with a wrapper that records each call; return the list of recorded arguments."""
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def make_chain(root, depth, name="a", file_name=None):
    """Walk a chain of depth directories called name below root, making the missing ones.

    With file_name, an empty file of that name is made at every level.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            if file_name is not None:
                write_at(fd, file_name)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def deep_snapshot_pair(driver, depth, name="a"):
    """Make a chain in layer "parent" and a snapshot "child" with a new file at every level."""
    driver.create("parent")
    make_chain(driver.get("parent"), depth, name)
    driver.create("child", "parent")
    make_chain(driver.get("child"), depth, name, file_name="new")
    return driver.get("child"), driver.get("parent")


def read_whole_diff(driver):
    with driver.diff("child", "parent") as stream:
        return stream.read()


@pytest.mark.parametrize("operation", ["changes", "diff_size", "diff"])
def test_fast_path_opens_linear_in_depth(driver, monkeypatch, operation):
    depth = 400
    child, parent = deep_snapshot_pair(driver, depth)
    expected = btrfsdrv.layer_changes(child, parent)
    run = {"changes": lambda: driver.changes("child", "parent"),
           "diff_size": lambda: driver.diff_size("child", "parent"),
           "diff": lambda: read_whole_diff(driver)}[operation]

    opens = count_calls(monkeypatch, os, "open")
    result = run()
    open_count = len(opens)

    # Every level is dirty, so reopening each directory from the layer root
    # would take about depth * depth / 2 opens on each side.
    assert open_count <= 6 * depth
    if operation == "changes":
        assert result == expected
    elif operation == "diff_size":
        assert result == btrfsdrv.layer_diff_size(child, parent)
    else:
        assert len(members(result)) == len(expected)


def test_fast_path_ioctls_linear_beyond_ino_lookup_limit(driver, monkeypatch):
    depth = 300
    # 21 bytes a level: INO_LOOKUP fails with ENAMETOOLONG below level 194.
    child, parent = deep_snapshot_pair(driver, depth, name="d" * 20)
    expected = btrfsdrv.layer_changes(child, parent)

    ioctls = count_calls(monkeypatch, btrfsdrv, "_ioctl")
    changes = driver.changes("child", "parent")
    ioctl_count = len(ioctls)

    # Each level takes two searches for the references of its changed file
    # and directory and one to name the directory. Looking up each directory
    # below level 194 one level at a time would take about 26,000 searches.
    assert ioctl_count <= 6 * depth
    assert changes == expected


def run_with_fd_limit(function, limit=256):
    """Run function() in a forked child whose RLIMIT_NOFILE is limit, and return its result or re-raise its error."""
    import pickle
    import resource
    import traceback
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        status = 0
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            result = ("ok", function())
        except BaseException as error:  # reported to the parent
            result = ("error", (repr(error), getattr(error, "errno", None), traceback.format_exc()))
            status = 1
        with os.fdopen(write_end, "wb") as output:
            pickle.dump(result, output)
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"with {limit} open files at most: {value[0]} (errno {value[1]})\n{value[2]}")
    return value


def test_apply_into_many_nested_subvolumes(driver):
    # More nested subvolumes than the open-file limit, one entry into each,
    # and an entry back into the first one after all the others.
    count, limit = 300, 128
    driver.create("layer")
    root = driver.get("layer")
    for index in range(count):
        btrfsdrv.create_subvolume(os.path.join(root, f"s{index}"))
    entries = [entry(f"s{index}/f", data=str(index).encode()) for index in range(count)]
    entries.append(entry("s0/again", data=b"again"))

    run_with_fd_limit(lambda: driver.apply_diff("layer", io.BytesIO(make_tar(entries))), limit)

    for index in range(count):
        with open(os.path.join(root, f"s{index}", "f"), "rb") as data:
            assert data.read() == str(index).encode()
    with open(os.path.join(root, "s0", "again"), "rb") as data:
        assert data.read() == b"again"
    assert not any(name.startswith(".btrfsdrv-") for name in os.listdir(os.path.join(root, "s0")))


FD_LIMIT_DEPTH = 600


def deep_unrelated_layers(driver, depth=FD_LIMIT_DEPTH):
    """Make layers "layer" and "other", two snapshots of "base" with a chain of depth levels, and change "layer".

    Return the changes of "layer" against "other", sorted by path. Neither
    layer is a snapshot of the other, so comparing them walks both in full.
    """
    driver.create("base")
    base = driver.get("base")
    make_chain(base, depth)
    chain = "/a" * depth
    middle = "/a" * (depth // 2)
    write(base + "/top")
    write(base + middle + "/middle")
    write(base + chain + "/bottom")
    driver.create("other", "base")
    driver.create("layer", "base")
    layer = driver.get("layer")

    write(layer + "/a" * 300 + "/added")
    write(layer + middle + "/middle", b"changed")
    os.unlink(layer + chain + "/bottom")
    # A directory only in "layer", with a chain as deep again below it.
    branch = "/a" * 10 + "/new"
    os.mkdir(layer + branch)
    make_chain(layer + branch, depth, name="b")
    write(layer + branch + "/b" * depth + "/file")

    expected = [btrfsdrv.Change("/a" * level, btrfsdrv.ChangeKind.MODIFY) for level in range(1, depth + 1)]
    expected += [btrfsdrv.Change("/a" * 300 + "/added", btrfsdrv.ChangeKind.ADD),
                 btrfsdrv.Change(middle + "/middle", btrfsdrv.ChangeKind.MODIFY),
                 btrfsdrv.Change(chain + "/bottom", btrfsdrv.ChangeKind.DELETE),
                 btrfsdrv.Change(branch + "/b" * depth + "/file", btrfsdrv.ChangeKind.ADD)]
    expected += [btrfsdrv.Change(branch + "/b" * level, btrfsdrv.ChangeKind.ADD) for level in range(depth + 1)]
    return sorted(expected, key=lambda change: os.fsencode(change.path))


def test_changes_deeper_than_fd_limit(driver):
    expected = deep_unrelated_layers(driver)
    assert btrfsdrv._snapshot_changes(driver.get("layer"), driver.get("other")) is None

    changes = run_with_fd_limit(lambda: driver.changes("layer", "other"))

    assert changes == expected


def test_full_diff_deeper_than_fd_limit(driver):
    deep_unrelated_layers(driver)
    expected = read_whole_layer_diff(driver, "layer")
    driver.create("copy")

    def diff_and_apply():
        raw = read_whole_layer_diff(driver, "layer")
        driver.apply_diff("copy", io.BytesIO(raw))
        return raw

    raw = run_with_fd_limit(diff_and_apply)

    assert raw == expected
    names = set(members(raw))
    assert "a/" * 10 + "new" + "/b" * FD_LIMIT_DEPTH + "/file" in names
    assert "a" + "/a" * (FD_LIMIT_DEPTH // 2 - 1) + "/middle" in names
    copy, layer = driver.get("copy"), driver.get("layer")
    assert tree_digest(copy, whole_seconds=True) == tree_digest(layer, whole_seconds=True)


def read_whole_layer_diff(driver, layer_id):
    with driver.diff(layer_id) as stream:
        return stream.read()


def test_remap_deeper_than_fd_limit(driver):
    deep_unrelated_layers(driver)
    layer = driver.get("layer")
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]

    run_with_fd_limit(lambda: driver.update_layer_id_map("layer", None, (maps, maps)))

    owners = set()
    entry_count = 0
    for directory, dirnames, filenames in os.walk(layer):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(directory, name))
            owners.add((st.st_uid, st.st_gid))
            entry_count += 1
    assert owners == {(100000, 100000)}
    assert entry_count == 2 * FD_LIMIT_DEPTH + 5
    assert os.lstat(layer).st_uid == 0


def test_walk_opens_linear_in_depth(tmp_path, monkeypatch):
    depth = FD_LIMIT_DEPTH
    layer, parent = tmp_path / "layer", tmp_path / "parent"
    layer.mkdir()
    parent.mkdir()
    make_chain(str(parent), depth)
    make_chain(str(layer), depth, file_name="new")
    try:
        opens = count_calls(monkeypatch, os, "open")
        changes = btrfsdrv.layer_changes(layer, parent)
        open_count = len(opens)
    finally:
        monkeypatch.undo()
        remove_contents(layer)
        remove_contents(parent)

    assert len(changes) == 2 * depth
    # Each level is entered once on each side and, below the levels that
    # stay open, reopened once on each side on the way back. Reopening each
    # closed level from the top would take about depth * depth / 2 opens.
    assert open_count <= 4 * depth + 10


def test_walk_detects_directory_moved_above_closed_levels(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    depth = 3 * btrfsdrv._WALK_OPEN_LEVELS
    make_chain(str(layer), depth)
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk = btrfsdrv._walk_changes(fd, None)
        for item in walk:
            if item.path == "/a" * depth:
                break
        # The walk is at the bottom, with the fds of the levels above closed.
        os.rename(layer / "a" / "a" / "a", layer / "moved")
        with pytest.raises(OSError, match=r"'/a/a' was moved or removed") as raised:
            list(walk)
    finally:
        os.close(fd)
        remove_contents(layer)

    assert raised.value.errno == errno.ESTALE


# -- Hardening -----------------------------------------------------------------


def make_sentinel(directory):
    """Create a small tree beside a layer that no operation may change; return its digest."""
    os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
    for name, data in (("precious", b"keep"), (os.path.join("sub", "deeper"), b"keep too")):
        with open(os.path.join(directory, name), "wb") as output:
            output.write(data)
    os.symlink("precious", os.path.join(directory, "link"))
    return tree_digest(directory)


def write_at(dir_fd, name, data=b"data"):
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_deep_path(root, sentinel, levels=300, name=b"d" * 20):
    """Nest levels directories below root with fd-relative calls; return the path length.

    The bottom contains a file and a symlink to the sentinel, so a walk that
    gives up at PATH_MAX leaves something behind.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        write_at(fd, b"bottom")
        os.symlink(sentinel, b"escape", dir_fd=fd)
    finally:
        os.close(fd)
    return levels * (len(name) + 1)


def chattr(flags, *paths):
    subprocess.run(["chattr", flags, *paths], check=True, capture_output=True)


def populate_hostile(root, sentinel, entries=1000):
    """Fill root with what a hostile container can leave in its layer."""
    join = os.path.join
    os.symlink(sentinel, join(root, "to-sentinel"))
    os.symlink(join(sentinel, "precious"), join(root, "to-sentinel-file"))
    os.symlink("/", join(root, "to-root"))
    os.symlink("../../../../../../..", join(root, "up"))
    os.symlink("loop-b", join(root, "loop-a"))
    os.symlink("loop-a", join(root, "loop-b"))
    os.symlink("self", join(root, "self"))
    os.mkfifo(join(root, "fifo"))
    os.mknod(join(root, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))

    long_file = join(root, "n" * 255)
    with open(long_file, "wb") as output:
        output.write(b"long")
    long_dir = join(root, "m" * 255)
    os.mkdir(long_dir)
    os.symlink(sentinel, join(long_dir, "l" * 255))

    bad = os.fsencode(root) + b"/\xff\xfe-not-utf8"
    os.mkdir(bad)
    with open(bad + b"/\x80\xc3\x28", "wb") as output:
        output.write(b"bytes")

    many = join(root, "many")
    os.mkdir(many)
    many_fd = os.open(many, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for index in range(entries):
            os.close(os.open(str(index), os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=many_fd))
    finally:
        os.close(many_fd)

    depth = make_deep_path(root, sentinel)
    assert depth > 4096

    closed = join(root, "closed")
    os.mkdir(closed)
    with open(join(closed, "inside"), "wb") as output:
        output.write(b"x")
    os.chmod(closed, 0)

    frozen = join(root, "frozen")
    with open(frozen, "wb") as output:
        output.write(b"immutable")
    appended = join(root, "appended")
    with open(appended, "wb") as output:
        output.write(b"append-only")
    append_dir = join(root, "append-dir")
    os.mkdir(append_dir)
    with open(join(append_dir, "kept"), "wb") as output:
        output.write(b"x")
    frozen_dir = join(root, "frozen-dir")
    os.mkdir(frozen_dir)
    with open(join(frozen_dir, "kept"), "wb") as output:
        output.write(b"x")
    chattr("+i", frozen, frozen_dir)
    chattr("+a", appended, append_dir)


def assert_no_subvolumes(filesystem):
    sync_subvolumes(filesystem)
    assert filesystem.btrfs("subvolume", "list", filesystem.mountpoint).strip() == ""


def _refuse_snap_destroy(monkeypatch):
    """Make SNAP_DESTROY fail as it does without privilege, so the file-by-file path runs."""
    def refuse(dir_fd, name, path):
        raise btrfsdrv._os_error(errno.EPERM, "delete subvolume", path)

    monkeypatch.setattr(btrfsdrv, "_subvolume_destroy_at", refuse)
    monkeypatch.setattr(btrfsdrv, "_can_search_trees", lambda fd: False)


def _refuse_tree_search(monkeypatch):
    """Make TREE_SEARCH fail as it does without CAP_SYS_ADMIN, so root refs come from GET_SUBVOL_ROOTREF."""
    def refuse(top_fd, top_id, path):
        raise btrfsdrv._os_error(errno.EPERM, "search btrfs tree", path)

    monkeypatch.setattr(btrfsdrv, "_find_nested_privileged", refuse)


def make_layer_of_kind(driver, layer_id, kind, monkeypatch):
    """Create a layer and return its writable root.

    kind is "subvolume" (SNAP_DESTROY), "fallback" (a subvolume whose
    removal goes file by file) or "plain" (a plain directory under
    HOME/subvolumes, as an older store may hold).
    """
    if kind == "plain":
        root = os.path.join(driver.home, "subvolumes", layer_id)
        os.mkdir(root)
        return root
    driver.create(layer_id)
    root = driver.get(layer_id)
    os.chmod(root, 0o755)
    if kind == "fallback":
        _refuse_snap_destroy(monkeypatch)
        _refuse_tree_search(monkeypatch)
    return root


LAYER_KINDS = ["subvolume", "fallback", "plain"]


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_remove_hostile_layer(driver, fs, tmp_path, monkeypatch, kind):
    sentinel = str(tmp_path / "sentinel")
    digest = make_sentinel(sentinel)
    root = make_layer_of_kind(driver, "hostile", kind, monkeypatch)
    populate_hostile(root, sentinel)
    # A hard link to a file outside the layer, possible only within one subvolume.
    outside = os.path.join(driver.home, "outside-file")
    with open(outside, "wb") as output:
        output.write(b"outside")
    if kind == "plain":
        os.link(outside, os.path.join(root, "hardlink"))

    usage = driver.read_write_disk_usage("hostile")
    assert usage.inode_count > 1300
    assert driver.get("hostile") == root

    driver.remove("hostile")

    assert not os.path.lexists(root)
    assert driver.list_layers() == []
    assert tree_digest(sentinel) == digest
    with open(outside, "rb") as data:
        assert data.read() == b"outside"
    assert os.path.isdir("/proc/self")
    assert_no_subvolumes(fs)


@pytest.mark.parametrize("kind", ["fallback", "plain"])
def test_remove_directory_of_100000_entries(driver, fs, monkeypatch, kind):
    root = make_layer_of_kind(driver, "wide", kind, monkeypatch)
    wide = os.path.join(root, "wide")
    os.mkdir(wide)
    wide_fd = os.open(wide, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for index in range(100_000):
            os.close(os.open(f"entry-{index:06d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=wide_fd))
    finally:
        os.close(wide_fd)

    assert driver.read_write_disk_usage("wide").inode_count == 100_002
    driver.remove("wide")

    assert not os.path.lexists(root)
    assert_no_subvolumes(fs)


def test_layer_replaced_by_symlink(driver, fs, tmp_path):
    sentinel = str(tmp_path / "sentinel")
    digest = make_sentinel(sentinel)
    driver.create("real")
    link = os.path.join(driver.home, "subvolumes", "evil")
    os.symlink(sentinel, link)

    assert not driver.exists("evil")
    assert driver.list_layers() == ["real"]
    with pytest.raises(NotADirectoryError):
        driver.get("evil")
    with pytest.raises(NotADirectoryError):
        driver.read_write_disk_usage("evil")
    with pytest.raises(NotADirectoryError):
        driver.metadata("evil")
    with pytest.raises(FileExistsError):
        driver.create("evil")
    with pytest.raises(OSError) as raised:
        driver.create("child", "evil")
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert raised.value.filename == link
    assert not driver.exists("child")

    driver.remove("evil")

    assert not os.path.lexists(link)
    assert tree_digest(sentinel) == digest
    assert driver.list_layers() == ["real"]


def make_nested_subvolumes(root, sentinel):
    """Create subvolumes at depths 1, 3 and 4 below root, one read-only; return their paths."""
    direct = os.path.join(root, "direct")
    btrfsdrv.create_subvolume(direct)
    os.makedirs(os.path.join(root, "a", "b"))
    deep = os.path.join(root, "a", "b", "deep")
    btrfsdrv.create_subvolume(deep)
    deeper = os.path.join(deep, "deeper")
    btrfsdrv.create_subvolume(deeper)
    for subvolume in (direct, deep, deeper):
        with open(os.path.join(subvolume, "file"), "wb") as output:
            output.write(b"nested")
        os.symlink(sentinel, os.path.join(subvolume, "to-sentinel"))
    frozen = os.path.join(deeper, "frozen")
    with open(frozen, "wb") as output:
        output.write(b"x")
    chattr("+i", frozen)
    read_only = os.path.join(root, "a", "read-only")
    btrfsdrv.create_snapshot(direct, read_only, read_only=True)
    return [direct, deep, deeper, read_only]


@pytest.mark.parametrize("kind", ["subvolume", "fallback"])
def test_remove_nested_subvolumes_and_placeholders(driver, fs, tmp_path, monkeypatch, kind):
    sentinel = str(tmp_path / "sentinel")
    digest = make_sentinel(sentinel)
    root = create_open_layer(driver, "base")
    make_nested_subvolumes(root, sentinel)
    driver.create("child", "base")
    child = driver.get("child")
    # A snapshot contains an empty directory (inode 2) where each nested subvolume was.
    for placeholder in ("direct", os.path.join("a", "b", "deep"), os.path.join("a", "read-only")):
        assert os.stat(os.path.join(child, placeholder)).st_ino == ioctl_structs.BTRFS_EMPTY_SUBVOL_DIR_OBJECTID
    if kind == "fallback":
        _refuse_snap_destroy(monkeypatch)
        _refuse_tree_search(monkeypatch)

    assert driver.read_write_disk_usage("child").inode_count > 0
    driver.remove("child")
    driver.remove("base")

    assert driver.list_layers() == []
    assert tree_digest(sentinel) == digest
    assert_no_subvolumes(fs)


def _after_discovery(monkeypatch, action):
    """Run action once between finding the nested subvolumes and deleting them."""
    original = btrfsdrv.find_nested_subvolumes
    pending = [action]

    def find_then_act(top_fd, top_id, path=None):
        found = original(top_fd, top_id, path)
        if pending:
            pending.pop()()
        return found

    monkeypatch.setattr(btrfsdrv, "find_nested_subvolumes", find_then_act)


@pytest.mark.parametrize("kind", ["subvolume", "fallback"])
def test_remove_nested_deleted_during_remove(driver, fs, tmp_path, monkeypatch, kind):
    root = create_open_layer(driver, "layer")
    nested = make_nested_subvolumes(root, str(tmp_path))
    chattr("-i", os.path.join(nested[2], "frozen"))
    # nested[2] lies inside nested[1]; the btrfs CLI deletes the deepest first.
    _after_discovery(monkeypatch, lambda: fs.btrfs("subvolume", "delete", nested[2], nested[1]))
    if kind == "fallback":
        _refuse_snap_destroy(monkeypatch)

    driver.remove("layer")

    assert not driver.exists("layer")
    assert_no_subvolumes(fs)


@pytest.mark.parametrize("kind", ["subvolume", "fallback"])
def test_remove_nested_renamed_during_remove(driver, fs, tmp_path, monkeypatch, kind):
    root = create_open_layer(driver, "layer")
    nested = make_nested_subvolumes(root, str(tmp_path))
    _after_discovery(monkeypatch, lambda: os.rename(nested[0], os.path.join(root, "a", "moved")))
    if kind == "fallback":
        _refuse_snap_destroy(monkeypatch)

    driver.remove("layer")

    assert not driver.exists("layer")
    assert_no_subvolumes(fs)


def test_remove_keeps_nested_moved_out(driver, fs, tmp_path, monkeypatch):
    root = create_open_layer(driver, "layer")
    nested = make_nested_subvolumes(root, str(tmp_path))
    escaped = os.path.join(driver.home, "escaped")
    _after_discovery(monkeypatch, lambda: os.rename(nested[1], escaped))

    driver.remove("layer")

    assert not driver.exists("layer")
    assert btrfsdrv.is_subvolume(escaped)
    assert btrfsdrv.is_subvolume(os.path.join(escaped, "deeper"))
    with open(os.path.join(escaped, "file"), "rb") as data:
        assert data.read() == b"nested"


def test_remove_never_destroys_swapped_in_subvolume(driver, fs, tmp_path, monkeypatch):
    root = create_open_layer(driver, "layer")
    nested = make_nested_subvolumes(root, str(tmp_path))
    foreign = os.path.join(driver.home, "foreign")
    btrfsdrv.create_subvolume(foreign)
    with open(os.path.join(foreign, "precious"), "wb") as output:
        output.write(b"keep")
    foreign_id = btrfsdrv.subvolume_id(foreign)

    def swap():
        os.rename(nested[0], os.path.join(driver.home, "direct-out"))
        os.rename(foreign, nested[0])

    _after_discovery(monkeypatch, swap)
    with pytest.raises(OSError) as raised:
        driver.remove("layer")

    assert raised.value.errno == errno.ESTALE
    assert raised.value.filename == os.path.join(root, "direct")
    assert btrfsdrv.subvolume_id(nested[0]) == foreign_id
    with open(os.path.join(nested[0], "precious"), "rb") as data:
        assert data.read() == b"keep"


def _bind_mount(source, target):
    subprocess.run(["mount", "--bind", source, target], check=True, capture_output=True)


def _mount_source(fs, tmp_path, source):
    """Return a directory to bind-mount into a layer: on the host, or another subvolume."""
    if source == "host":
        return str(tmp_path / "host")
    mounted = fs.path("other")
    btrfsdrv.create_subvolume(mounted)
    return mounted


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("source", ["host", "subvolume"])
def test_remove_refuses_mount_inside_layer(driver, fs, tmp_path, monkeypatch, kind, source):
    mounted = _mount_source(fs, tmp_path, source)
    digest = make_sentinel(mounted)
    root = make_layer_of_kind(driver, "busy", kind, monkeypatch)
    populate_hostile(root, mounted, entries=10)
    target = os.path.join(root, "a", "b", "mnt")
    os.makedirs(target)
    _bind_mount(mounted, target)
    try:
        with pytest.raises(OSError) as raised:
            driver.remove("busy")
        assert raised.value.errno == errno.EBUSY
        assert target in str(raised.value)
        assert os.path.isdir(os.path.join(root, "many"))
    finally:
        subprocess.run(["umount", target], check=True)

    assert tree_digest(mounted) == digest
    driver.remove("busy")
    assert not driver.exists("busy")
    assert tree_digest(mounted) == digest
    if source == "subvolume":
        assert btrfsdrv.is_subvolume(mounted)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("source", ["host", "subvolume"])
def test_remove_mount_made_after_check(driver, fs, tmp_path, monkeypatch, kind, source):
    mounted = _mount_source(fs, tmp_path, source)
    digest = make_sentinel(mounted)
    root = make_layer_of_kind(driver, "busy", kind, monkeypatch)
    target = os.path.join(root, "dir", "mnt")
    os.makedirs(target)
    original = btrfsdrv.Driver._check_no_mounts

    def check_then_mount(self, path):
        original(self, path)
        _bind_mount(mounted, target)

    monkeypatch.setattr(btrfsdrv.Driver, "_check_no_mounts", check_then_mount)
    try:
        try:
            driver.remove("busy")
        except OSError as error:
            assert error.errno == errno.EBUSY
            assert error.filename is not None
    finally:
        for point in _mounts_below(root):
            subprocess.run(["umount", "-l", point], check=False)

    assert tree_digest(mounted) == digest
    if source == "subvolume":
        assert btrfsdrv.is_subvolume(mounted)


def _mount_escape_attempts(driver):
    """Operations that would read or change the mounted directory at mnt of layer busy."""
    maps = ([btrfsdrv.IDMap(0, 100000, 65536)],) * 2

    def read_diff():
        with driver.diff("busy") as stream:
            stream.read()

    def apply(*members):
        driver.apply_diff("busy", io.BytesIO(make_tar(list(members))))

    return {
        "changes": lambda: driver.changes("busy"),
        "changes-against-parent": lambda: driver.changes("busy", "base"),
        "diff": read_diff,
        "diff-size": lambda: driver.diff_size("busy"),
        "remap": lambda: driver.update_layer_id_map("busy", None, maps),
        "apply-whiteout": lambda: apply(entry("mnt/.wh.precious")),
        "apply-opaque": lambda: apply(entry("mnt/.wh..wh..opq")),
        "apply-file": lambda: apply(entry("mnt/planted", data=b"x")),
        "apply-replace": lambda: apply(entry("mnt", data=b"x")),
    }


@pytest.mark.parametrize("source", ["host", "subvolume"])
def test_layer_operations_refuse_mounts_inside(driver, fs, tmp_path, source):
    mounted = _mount_source(fs, tmp_path, source)
    digest = make_sentinel(mounted)
    driver.create("base")
    driver.create("busy", "base")
    target = os.path.join(driver.get("busy"), "mnt")
    os.mkdir(target)
    _bind_mount(mounted, target)
    try:
        for name, attempt in _mount_escape_attempts(driver).items():
            with pytest.raises(OSError, match="is mounted inside it") as raised:
                attempt()
            assert raised.value.errno == errno.EBUSY, name
            assert tree_digest(mounted) == digest, name
    finally:
        subprocess.run(["umount", target], check=True)
    assert tree_digest(mounted) == digest


@pytest.mark.parametrize("source", ["host", "subvolume"])
def test_layer_operations_mount_made_after_check(driver, fs, tmp_path, monkeypatch, source):
    mounted = _mount_source(fs, tmp_path, source)
    digest = make_sentinel(mounted)
    driver.create("base")
    driver.create("busy", "base")
    target = os.path.join(driver.get("busy"), "mnt")
    os.mkdir(target)
    with open(os.path.join(target, "precious"), "wb") as output:
        output.write(b"layer")
    original = btrfsdrv._check_no_mounts_below

    def check_then_mount(fd, operation, path):
        original(fd, operation, path)
        if not os.path.ismount(target):
            _bind_mount(mounted, target)

    monkeypatch.setattr(btrfsdrv, "_check_no_mounts_below", check_then_mount)
    try:
        for name, attempt in _mount_escape_attempts(driver).items():
            with pytest.raises(OSError) as raised:
                attempt()
            assert raised.value.errno == errno.EBUSY, name
            assert "mount point" in str(raised.value), name
            assert tree_digest(mounted) == digest, name
            subprocess.run(["umount", target], check=True)
    finally:
        for point in _mounts_below(target):
            subprocess.run(["umount", "-l", point], check=False)
    assert tree_digest(mounted) == digest


def test_apply_names_layer_removed_during_apply(driver, monkeypatch):
    import io

    driver.create("layer")
    path = driver.get("layer")
    original = btrfsdrv._remove_apply_temporaries

    def remove_layer_first(root_fd, layer_dir):
        original(root_fd, layer_dir)
        # Another tool: Driver.remove would wait for the apply's lock.
        btrfsdrv.delete_subvolume(path)

    monkeypatch.setattr(btrfsdrv, "_remove_apply_temporaries", remove_layer_first)
    with pytest.raises(FileNotFoundError, match="apply layer diff failed.*removed during the apply") as raised:
        driver.apply_diff("layer", io.BytesIO(make_tar([entry("file", data=b"data")])))
    assert raised.value.filename == path


@pytest.mark.parametrize("old_kind, new_entry", [
    ("file", entry("victim", data=b"new")),
    ("directory", entry("victim", data=b"new")),
    ("file", entry("victim", tarfile.DIRTYPE, mode=0o755)),
    ("file", entry("victim", tarfile.SYMTYPE, linkname="elsewhere")),
])
def test_failed_rename_keeps_replaced_entry(tmp_path, monkeypatch, old_kind, new_entry):
    # btrfs can fail the rename with EDQUOT when it cannot reserve metadata.
    layer = tmp_path / "layer"
    if old_kind == "file":
        write(str(layer / "victim"), b"old")
    else:
        write(str(layer / "victim" / "inside"), b"old")
    before = tree_digest(str(layer))
    original = os.rename
    failed = []

    def rename(source, target, **kwargs):
        if target == "victim" and not failed:  # the move back may succeed
            failed.append(source)
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return original(source, target, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError) as raised:
        apply(layer, make_tar([new_entry]))
    assert raised.value.errno == errno.EDQUOT
    monkeypatch.setattr(os, "rename", original)
    assert tree_digest(str(layer)) == before
    assert no_temporaries(layer)


def test_apply_removes_immutable_and_read_only_contents(driver):
    driver.create("layer")
    root = driver.get("layer")
    for directory in ("replaced", "whited-out"):
        os.makedirs(os.path.join(root, directory, "sub"))
        for name in "abcdefgh":
            write(os.path.join(root, directory, "sub", name), b"x")
        btrfsdrv.create_subvolume(os.path.join(root, directory, "nested"))
        write(os.path.join(root, directory, "nested", "file"), b"x")
        btrfsdrv.create_snapshot(os.path.join(root, directory, "nested"),
                                 os.path.join(root, directory, "read-only"), read_only=True)
        chattr("+i", os.path.join(root, directory, "sub", "e"))
        chattr("+a", os.path.join(root, directory, "sub", "f"))
        chattr("+i", os.path.join(root, directory, "sub"))

    driver.apply_diff("layer", io.BytesIO(make_tar([entry("replaced", data=b"a file now"),
                                                    entry(".wh.whited-out")])))
    assert sorted(os.listdir(root)) == ["replaced"]
    with open(os.path.join(root, "replaced"), "rb") as data:
        assert data.read() == b"a file now"


def test_apply_keeps_flags_of_surviving_inodes(driver):
    driver.create("base")
    base = driver.get("base")
    write(base + "/etc/x")
    write(base + "/etc/y", b"old")
    write(base + "/lib/h", b"linked")
    os.link(base + "/lib/h", base + "/etc/h2")
    os.mkdir(base + "/opt")
    os.link(base + "/lib/h", base + "/opt/h3")
    write(base + "/var/old")
    chattr("+i", base + "/lib/h", base + "/etc")
    chattr("+a", base + "/var")
    driver.create("child", "base")
    child = driver.get("child")
    raw = make_tar([entry("etc/.wh.x"), entry("etc/.wh.h2"), entry("etc/y", data=b"new"),
                    entry("opt/h3", data=b"replaced"), entry("var/.wh..wh..opq")])
    try:
        driver.apply_diff("child", io.BytesIO(raw))
        assert os.listdir(child + "/etc") == ["y"]
        with open(child + "/etc/y", "rb") as data:
            assert data.read() == b"new"
        assert os.listdir(child + "/var") == []
        assert os.stat(child + "/lib/h").st_nlink == 1
        assert inode_flags(child + "/etc") == ioctl_structs.FS_IMMUTABLE_FL
        assert inode_flags(child + "/lib/h") == ioctl_structs.FS_IMMUTABLE_FL
        assert inode_flags(child + "/var") == ioctl_structs.FS_APPEND_FL
    finally:
        for root in (base, child):
            chattr("-i", root + "/lib/h", root + "/etc")
            chattr("-a", root + "/var")


def test_failed_whiteout_keeps_directory_flags(driver, monkeypatch):
    driver.create("layer")
    root = driver.get("layer")
    write(root + "/etc/x")
    chattr("+i", root + "/etc")
    unlink_at = btrfsdrv._unlink_at

    def unlink_then_fail(dir_fd, name, is_dir):
        unlink_at(dir_fd, name, is_dir)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(btrfsdrv, "_unlink_at", unlink_then_fail)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            driver.apply_diff("layer", io.BytesIO(make_tar([entry("etc/.wh.x")])))
        assert inode_flags(root + "/etc") == ioctl_structs.FS_IMMUTABLE_FL
    finally:
        chattr("-i", root + "/etc")


# A child that runs one driver operation and SIGKILLs itself at the Nth line
# event inside btrfsdrv.py (with N 0, it runs to the end and prints the count).
# With a function name as its last argument, only the lines of that function count.
_KILL_CHILD = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import btrfsdrv

home, operation, kill_at = sys.argv[2], sys.argv[3], int(sys.argv[4])
kill_in = sys.argv[6] if len(sys.argv) > 6 else None
module_file = btrfsdrv.__file__
count = 0


def trace_lines(frame, event, arg):
    global count
    if event == "line" and (kill_in is None or frame.f_code.co_name == kill_in):
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return trace_lines


def trace_calls(frame, event, arg):
    return trace_lines if frame.f_code.co_filename == module_file else None


sys.settrace(trace_calls)
driver = btrfsdrv.Driver(home)
if operation == "create":
    driver.create("victim", "base")
elif operation == "create-size":
    driver.create("victim", "base", storage_opt={"size": "16m"})
elif operation == "apply":
    with open(sys.argv[5], "rb") as diff:
        driver.apply_diff("victim", diff)
else:
    driver.remove("victim")
print(operation, "returned", flush=True)
driver.cleanup()
sys.settrace(None)
print("lines", count, flush=True)
"""

VICTIM_SIZE = 16 * 1024**2


def make_diff(path, size=64 * 1024):
    """Write a layer tar with a directory, a file of size bytes, a symlink and a whiteout."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        entries = [
            (tarfile.TarInfo("dir"), None),
            (tarfile.TarInfo("dir/data"), os.urandom(size)),
            (tarfile.TarInfo("dir/link"), None),
            (tarfile.TarInfo(".wh.file"), b""),
        ]
        entries[0][0].type = tarfile.DIRTYPE
        entries[2][0].type = tarfile.SYMTYPE
        entries[2][0].linkname = "/"
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def run_kill_child(home, operation, kill_at, kill_in=None):
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    diff = os.path.join(os.path.dirname(home), "diff.tar")
    command = [sys.executable, "-c", _KILL_CHILD, module_dir, home, operation, str(kill_at), diff]
    if kill_in is not None:
        command.append(kill_in)
    return subprocess.run(command, capture_output=True, text=True)


def make_victim(home):
    """Create the layer that the remove child deletes: sized, with nested subvolumes."""
    with btrfsdrv.Driver(home) as driver:
        driver.create("victim", "base", storage_opt={"size": "16m"})
        root = driver.get("victim")
        btrfsdrv.create_subvolume(os.path.join(root, "nested"))
        btrfsdrv.create_snapshot(os.path.join(root, "nested"), os.path.join(root, "ro"), read_only=True)


def check_store_after_kill(fs, home, operation, returned):
    """Open the store a killed child left, check it, and remove the layer it worked on."""
    real_home = os.path.realpath(home)
    assert _mounts_below(home).count(real_home) <= 1
    quotas = os.path.join(home, "quotas")
    with btrfsdrv.Driver(home) as driver:
        names = os.listdir(quotas) if os.path.isdir(quotas) else []
        assert [name for name in names if name.endswith(".tmp")] == []
        if not driver.exists("victim"):
            assert "victim" not in names, "orphan quota file"
        for name in names:
            with open(os.path.join(quotas, name), "rb") as quota:
                assert quota.read() == str(VICTIM_SIZE).encode(), name
        if returned and operation != "remove":
            assert driver.exists("victim")
        if returned and operation == "create-size":
            assert "victim" in names
            victim_id = btrfsdrv.subvolume_id(driver.get("victim"))
            assert qgroup_limits(fs)[victim_id] == VICTIM_SIZE
        if returned and operation == "remove":
            assert not driver.exists("victim")
            assert "victim" not in names
        if returned and operation == "apply":
            assert os.path.getsize(os.path.join(driver.get("victim"), "dir", "data")) == 64 * 1024
            assert not os.path.lexists(os.path.join(driver.get("victim"), "file"))

        for layer_id in driver.list_layers():
            assert driver.exists(layer_id)
            assert os.path.isdir(driver.get(layer_id))
        if driver.exists("victim"):
            driver.remove("victim")
        else:
            with pytest.raises(FileNotFoundError):
                driver.remove("victim")
        assert driver.list_layers() == ["base"]
        base_id = btrfsdrv.subvolume_id(driver.get("base"))

    assert not os.path.exists(os.path.join(quotas, "victim"))
    sync_subvolumes(fs)
    listed = fs.btrfs("subvolume", "list", fs.mountpoint).split("\n")
    assert [line.split()[1] for line in listed if line] == [str(base_id)]
    if quota_is_enabled(fs):
        limits = qgroup_limits(fs)
        assert {qgroup: limit for qgroup, limit in limits.items() if limit is not None} == {}


@pytest.mark.parametrize("operation", ["create", "create-size", "remove", "apply"])
def test_kill_at_every_step(fs, operation, record_property):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        driver.create("base")
        os.chmod(driver.get("base"), 0o755)
        with open(os.path.join(driver.get("base"), "file"), "wb") as output:
            output.write(b"base")
    make_diff(os.path.join(os.path.dirname(home), "diff.tar"))
    if operation in ("remove", "apply"):
        make_victim(home)
    full = run_kill_child(home, operation, 0)
    assert full.returncode == 0, full.stderr
    lines = int(full.stdout.split()[-1])
    check_store_after_kill(fs, home, operation, returned=True)

    # About 100 kill points for each operation, spread evenly over its lines.
    stride = max(1, lines // 100)
    kills = 0
    for kill_at in range(1, lines + 1, stride):
        if operation in ("remove", "apply"):
            make_victim(home)
        result = run_kill_child(home, operation, kill_at)
        assert result.returncode in (-signal.SIGKILL, 0), result.stderr
        kills += result.returncode == -signal.SIGKILL
        check_store_after_kill(fs, home, operation, returned=f"{operation} returned" in result.stdout)
    record_property("kill_points", kills)
    print(f"{operation}: {lines} lines, {kills} kills")
    assert kills >= min(lines, 100) // 2

    assert _mounts_below(home).count(os.path.realpath(home)) <= 1
    cleanup = run_cli(home, "cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    assert _mounts_below(home) == []


def apply_temporaries_below(root):
    """Return the paths below root, relative to it, of names that apply_diff uses for temporaries."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            if name.startswith(".btrfsdrv-"):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def nested_diff_entry(kind, directory):
    """Return the entry of kind in directory, and the function that runs while its temporary exists."""
    if kind == "file":
        return entry(f"{directory}/new", data=b"new data"), "move_into_place"
    if kind == "directory":
        return entry(f"{directory}/new", tarfile.DIRTYPE, mode=0o755), "move_into_place"
    if kind == "symlink":
        return entry(f"{directory}/new", tarfile.SYMTYPE, linkname="target"), "move_into_place"
    if kind == "hard link":
        return entry(f"{directory}/new", tarfile.LNKTYPE, linkname=f"{directory}/old"), "move_into_place"
    # A file replacing a directory: the directory is moved aside, then deleted.
    return entry(f"{directory}/tree", data=b"file now"), "remove_tree"


def check_nested_entry(root, kind, directory):
    target = os.path.join(root, directory, "new")
    if kind == "file":
        with open(target, "rb") as data:
            assert data.read() == b"new data"
    elif kind == "directory":
        assert os.path.isdir(target)
    elif kind == "symlink":
        assert os.readlink(target) == "target"
    elif kind == "hard link":
        assert os.path.samefile(target, os.path.join(root, directory, "old"))
    else:
        with open(os.path.join(root, directory, "tree"), "rb") as data:
            assert data.read() == b"file now"
    expected = ["old", "tree"] if kind == "replaced directory" else ["new", "old", "tree"]
    assert sorted(os.listdir(os.path.join(root, directory))) == expected


@pytest.mark.parametrize("directory", ["sv/d", "sv/inner/d"])
@pytest.mark.parametrize("kind", ["file", "directory", "symlink", "hard link", "replaced directory"])
def test_apply_after_kill_in_nested_subvolume(fs, kind, directory):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        root = create_open_layer(driver, "victim")
        btrfsdrv.create_subvolume(os.path.join(root, "sv"))
        btrfsdrv.create_subvolume(os.path.join(root, "sv", "inner"))
        write(os.path.join(root, directory, "old"), b"old")
        write(os.path.join(root, directory, "tree", "file"), b"in tree")
        member, kill_in = nested_diff_entry(kind, directory)
        raw = make_tar([member])
        with open(os.path.join(os.path.dirname(home), "diff.tar"), "wb") as output:
            output.write(raw)

        killed = run_kill_child(home, "apply", 1, kill_in=kill_in)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert [path for path in apply_temporaries_below(root) if path.startswith("sv/")] != []

        driver.apply_diff("victim", io.BytesIO(raw))
        assert apply_temporaries_below(root) == []
        check_nested_entry(root, kind, directory)


# Removes the sized layer "victim" and is SIGKILLed right after its subvolume is deleted.
_KILL_AFTER_DELETE = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import btrfsdrv

original = btrfsdrv._delete_subvolume_or_contents


def delete_then_die(*args):
    original(*args)
    os.kill(os.getpid(), signal.SIGKILL)


btrfsdrv._delete_subvolume_or_contents = delete_then_die
btrfsdrv.Driver(sys.argv[2]).remove("victim")
"""


def test_remove_killed_after_delete_leaves_no_quota_file(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        driver.create("victim", storage_opt={"size": "16m"})
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))

    result = subprocess.run([sys.executable, "-c", _KILL_AFTER_DELETE, module_dir, home], capture_output=True)

    assert result.returncode == -signal.SIGKILL, result.stderr
    with btrfsdrv.Driver(home) as driver:
        assert not driver.exists("victim")
        assert os.listdir(os.path.join(home, "quotas")) == []


def test_failed_remove_keeps_quota_file(driver, monkeypatch):
    driver.create("sized", storage_opt={"size": "8m"})
    quotas = os.path.join(driver.home, "quotas")
    renamed = []

    def fail_delete(dir_fd, name, path):
        renamed.extend(os.listdir(quotas))
        # Another process's init runs while the quota file has its temporary name.
        btrfsdrv.Driver(driver.home).cleanup()
        raise OSError(errno.EBUSY, "injected failure")

    monkeypatch.setattr(btrfsdrv, "_delete_subvolume_or_contents", fail_delete)
    with pytest.raises(OSError, match="injected failure"):
        driver.remove("sized")

    assert [name.endswith(".tmp") for name in renamed] == [True]
    assert os.listdir(quotas) == ["sized"]
    assert driver.metadata("sized")["SizeLimit"] == str(8 * 1024**2)


def test_remove_with_quota_directory_in_place(driver, caplog):
    driver.create("layer", storage_opt={"size": "8m"})
    quota_file = os.path.join(driver.home, "quotas", "layer")
    os.unlink(quota_file)
    os.mkdir(quota_file)

    with caplog.at_level("WARNING", logger="btrfsdrv"):
        driver.remove("layer")
    assert not driver.exists("layer")
    assert f"could not delete {quota_file}" in caplog.text
    assert "by hand" in caplog.text

    with pytest.raises(IsADirectoryError, match="move the directory away") as raised:
        driver.create("layer", storage_opt={"size": "8m"})
    assert raised.value.filename == quota_file
    assert not driver.exists("layer")
    driver.create("layer")
    assert "SizeLimit" not in driver.metadata("layer")


def test_remove_after_quotas_replaced_by_file(driver, caplog):
    driver.create("layer", storage_opt={"size": "8m"})
    quotas = os.path.join(driver.home, "quotas")
    shutil.rmtree(quotas)
    with open(quotas, "w") as replacement:
        replacement.write("not a directory")

    with caplog.at_level("WARNING", logger="btrfsdrv"):
        driver.remove("layer")

    assert not driver.exists("layer")
    assert os.path.join(quotas, "layer") in caplog.text
    assert "by hand" in caplog.text


def test_create_ignores_stale_quota_file(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        # A remove killed after deleting the subvolume leaves the quota file.
        os.makedirs(os.path.join(home, "quotas"))
        with open(os.path.join(home, "quotas", "reused"), "w") as quota:
            quota.write(str(VICTIM_SIZE))
        driver.create("reused")
        layer = btrfsdrv.subvolume_id(driver.get("reused"))

        assert not os.path.exists(os.path.join(home, "quotas", "reused"))
        assert "SizeLimit" not in driver.metadata("reused")
        assert qgroup_limits(fs).get(layer) is None


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_init_skips_non_file_temporaries(fs, caplog, kind):
    home = fs.path("home")
    entry = os.path.join(home, "quotas", ".layer.0123456789ab.tmp")
    os.makedirs(os.path.dirname(entry))
    if kind == "directory":
        os.mkdir(entry)
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        os.symlink("/", entry)

    with caplog.at_level("WARNING", logger="btrfsdrv"):
        with btrfsdrv.Driver(home) as driver:
            driver.create("layer")

    assert os.path.lexists(entry)
    assert entry in caplog.text
    assert "move it away" in caplog.text
    assert _mounts_below(home) == []


def read_mount_table():
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        return mountinfo.read()


def test_failed_init_unmounts_its_bind_mount(fs, monkeypatch):
    home = fs.path("home")
    before = read_mount_table()

    def fail(*args):
        raise OSError(errno.EIO, "injected failure")

    monkeypatch.setattr(btrfsdrv, "_remove_stale_temporary_files", fail)
    os.makedirs(os.path.join(home, "quotas"))
    with pytest.raises(OSError, match="injected failure"):
        btrfsdrv.Driver(home)

    assert read_mount_table() == before


def test_init_and_cleanup_1000_times(fs):
    # Only mounts at or below the test's filesystem count, because other
    # processes on the machine may mount and unmount meanwhile.
    home = fs.path("home")
    top = os.fsencode(fs.mountpoint)

    def own_mounts():
        with open("/proc/self/mountinfo", "rb") as mountinfo:
            return [line for line in mountinfo
                    if line.split()[4] == top or line.split()[4].startswith(top + b"/")]

    before = own_mounts()
    assert before
    for _ in range(1000):
        driver = btrfsdrv.Driver(home)
        driver.cleanup()
    assert own_mounts() == before


def test_cli_cleanup_removes_leftover_bind_mount(fs):
    home = fs.path("home")
    # A process killed after Driver init leaves its bind mount of home behind.
    script = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import btrfsdrv; "
        "btrfsdrv.Driver(sys.argv[2]); os.kill(os.getpid(), signal.SIGKILL)"
    )
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    for _ in range(5):
        result = subprocess.run([sys.executable, "-c", script, module_dir, home], capture_output=True)
        assert result.returncode == -signal.SIGKILL
        assert _mounts_below(home) == [os.path.realpath(home)]

    cleanup = run_cli(home, "cleanup")

    assert cleanup.returncode == 0, cleanup.stderr
    assert _mounts_below(home) == []


_FORK = __import__("multiprocessing").get_context("fork")


def is_clear_error(error):
    """Tell whether a failed call raised an error that names its errno and path."""
    return isinstance(error, OSError) and error.errno is not None and error.filename is not None


def _create_and_remove_layers(home, worker, count):
    """Create, use and remove count layers in one process; return the failures as text."""
    failures = []
    with btrfsdrv.Driver(home) as driver:
        for index in range(count):
            layer_id = f"w{worker}-{index}"
            storage_opt = {"size": "8m"} if index % 2 else None
            try:
                driver.create_read_write(layer_id, "base", storage_opt=storage_opt)
                with open(os.path.join(driver.get(layer_id), "written"), "w") as output:
                    output.write(layer_id)
                driver.remove(layer_id)
            except Exception as error:  # reported to the parent, which asserts on it
                failures.append(f"{layer_id}: {error!r}")
    return failures


def assert_store_consistent(fs, driver, expected_layers):
    """Check that every layer gets and that no quota file, limit or subvolume is left over."""
    layers = driver.list_layers()
    assert layers == sorted(expected_layers)
    for layer_id in layers:
        assert os.path.isdir(driver.get(layer_id))
    quotas = os.path.join(driver.home, "quotas")
    leftover = sorted(set(os.listdir(quotas)) - set(layers)) if os.path.isdir(quotas) else []
    assert leftover == []
    sync_subvolumes(fs)
    listed = [line for line in fs.btrfs("subvolume", "list", fs.mountpoint).splitlines() if line]
    assert len(listed) == len(layers)
    if quota_is_enabled(fs):
        live = {btrfsdrv.subvolume_id(driver.get(layer_id)) for layer_id in layers}
        limits = qgroup_limits(fs)
        assert {qgroup for qgroup, limit in limits.items() if limit is not None} <= live


def test_processes_create_and_remove_hundreds(fs):
    home = fs.path("home")
    workers, count = 4, 60
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("base")
        with _FORK.Pool(workers) as pool:
            results = pool.starmap(_create_and_remove_layers, [(home, worker, count) for worker in range(workers)])

        assert [failure for failures in results for failure in failures] == []
        assert_store_consistent(fs, driver, ["base"])


def _create_same_id(home, barrier, size, queue):
    with btrfsdrv.Driver(home) as driver:
        barrier.wait()
        try:
            parent = "base" if size % 2 == 0 else None
            driver.create("same", parent, storage_opt={"size": str(size)})
            queue.put((size, "created"))
        except Exception as error:  # reported to the parent, which asserts on it
            queue.put((size, type(error).__name__))


def test_processes_create_same_id(fs):
    home = fs.path("home")
    rounds = 40
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("base")
        for round_number in range(rounds):
            barrier = _FORK.Barrier(2)
            queue = _FORK.Queue()
            # Even sizes snapshot base and odd ones create an empty layer.
            sizes = (8 * 1024**2 + round_number % 2, 12 * 1024**2 + round_number % 2)
            processes = [_FORK.Process(target=_create_same_id, args=(home, barrier, size, queue)) for size in sizes]
            for process in processes:
                process.start()
            outcomes = dict(queue.get() for _ in processes)
            for process in processes:
                process.join()

            winners = [size for size, outcome in outcomes.items() if outcome == "created"]
            losers = [outcome for outcome in outcomes.values() if outcome != "created"]
            assert len(winners) == 1, outcomes
            assert losers == ["FileExistsError"], outcomes
            with open(os.path.join(home, "quotas", "same"), "rb") as quota:
                assert quota.read() == str(winners[0]).encode()
            layer = btrfsdrv.subvolume_id(driver.get("same"))
            assert qgroup_limits(fs)[layer] == winners[0]
            driver.remove("same")

        assert_store_consistent(fs, driver, ["base"])


def _open_drivers_until(home, stop):
    """Open and clean up Drivers on home, each removing stale temporary files, until stop is set."""
    while not stop.is_set():
        btrfsdrv.Driver(home).cleanup()


def test_sized_create_races_driver_init(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        stop = _FORK.Event()
        workers = [_FORK.Process(target=_open_drivers_until, args=(home, stop)) for _ in range(3)]
        for worker in workers:
            worker.start()
        failures = []
        try:
            for index in range(300):
                layer_id = f"sized-{index}"
                try:
                    driver.create(layer_id, storage_opt={"size": "8m"})
                    driver.remove(layer_id)
                except OSError as error:
                    failures.append(f"{layer_id}: {error}")
        finally:
            stop.set()
            for worker in workers:
                worker.join()

        assert failures == []
        assert [worker.exitcode for worker in workers] == [0, 0, 0]


def test_quota_file_locked_before_named(driver, monkeypatch):
    real_flock = fcntl.flock
    cleanups = []

    def flock_after_cleanup(fd, operation):
        # Another process's init runs between the creation of the temporary
        # file and its lock.
        if operation == fcntl.LOCK_EX and stat.S_ISREG(os.fstat(fd).st_mode) and not cleanups:
            quotas_fd = os.open(os.path.join(driver.home, "quotas"), os.O_RDONLY | os.O_DIRECTORY)
            try:
                btrfsdrv._remove_stale_temporary_files(quotas_fd, "quotas")
            finally:
                os.close(quotas_fd)
            cleanups.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(btrfsdrv.fcntl, "flock", flock_after_cleanup)
    driver.create("sized", storage_opt={"size": "8m"})

    assert cleanups != []
    assert driver.metadata("sized")["SizeLimit"] == str(8 * 1024**2)


def test_quota_file_written_without_o_tmpfile(driver, monkeypatch):
    real_open = os.open

    def open_without_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(btrfsdrv.os, "open", open_without_tmpfile)
    driver.create("sized", storage_opt={"size": "8m"})

    with open(os.path.join(driver.home, "quotas", "sized"), "rb") as quota:
        assert quota.read() == str(8 * 1024**2).encode()
    assert os.listdir(os.path.join(driver.home, "quotas")) == ["sized"]


def test_sized_layer_with_longest_id(driver):
    layer_id = "x" * 255
    driver.create(layer_id, storage_opt={"size": "8m"})
    assert driver.metadata(layer_id)["SizeLimit"] == str(8 * 1024**2)


def _race_on_layer(home, role, layer_id, barrier, queue):
    """Remove layer_id, get it, or snapshot it, as role selects, and report each outcome."""
    outcomes = []
    with btrfsdrv.Driver(home) as driver:
        barrier.wait()
        for attempt in range(20 if role != "remove" else 1):
            try:
                if role == "remove":
                    driver.remove(layer_id)
                elif role == "get":
                    driver.get(layer_id)
                else:
                    driver.create(f"{layer_id}-child-{attempt}", layer_id, storage_opt={"size": "8m"})
                outcomes.append("ok")
            except Exception as error:  # reported to the parent, which asserts on it
                outcomes.append("clear" if is_clear_error(error) else repr(error))
    queue.put((role, outcomes))


def test_remove_races_get_and_create_child(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("base")
        for round_number in range(15):
            layer_id = f"doomed{round_number}"
            driver.create(layer_id, "base", storage_opt={"size": "16m"})
            btrfsdrv.create_subvolume(os.path.join(driver.get(layer_id), "nested"))
            barrier = _FORK.Barrier(3)
            queue = _FORK.Queue()
            processes = [
                _FORK.Process(target=_race_on_layer, args=(home, role, layer_id, barrier, queue))
                for role in ("remove", "get", "create")
            ]
            for process in processes:
                process.start()
            outcomes = dict(queue.get() for _ in processes)
            for process in processes:
                process.join()

            assert outcomes["remove"] == ["ok"]
            for role in ("get", "create"):
                assert set(outcomes[role]) <= {"ok", "clear"}, outcomes[role]
            assert not driver.exists(layer_id)

        survivors = [layer for layer in driver.list_layers() if layer != "base"]
        assert_store_consistent(fs, driver, ["base", *survivors])
        for layer_id in survivors:
            driver.remove(layer_id)
        assert_store_consistent(fs, driver, ["base"])


class _PausingStream:
    """A layer stream that stops at pause_at until the other end of connection sends a message."""

    def __init__(self, data, pause_at, connection):
        self.data = data
        self.pause_at = pause_at
        self.connection = connection
        self.position = 0
        self.paused = False

    def read(self, size=-1):
        if self.position == self.pause_at and not self.paused:
            self.connection.send("paused")
            self.connection.recv()
            self.paused = True
        end = len(self.data) if size is None or size < 0 else self.position + size
        if not self.paused:
            end = min(end, self.pause_at)
        chunk = self.data[self.position:end]
        self.position += len(chunk)
        return chunk


def _apply_with_pause(layer, raw, pause_at, connection):
    """Apply raw to layer, pausing in the middle of the stream, and send the outcome."""
    try:
        size = btrfsdrv.apply_layer_diff(layer, _PausingStream(raw, pause_at, connection))
    except Exception as error:  # reported to the parent, which asserts on it
        connection.send(("failed", repr(error)))
        return
    connection.send(("applied", size))


def test_remove_waits_for_apply_lock(driver, fs):
    import threading

    driver.create("layer", storage_opt={"size": "16m"})
    path = driver.get("layer")
    layer_id = btrfsdrv.subvolume_id(path)
    quota_file = os.path.join(driver.home, "quotas", "layer")
    outcome = []

    def remove():
        try:
            driver.remove("layer")
        except OSError as error:
            outcome.append(error)

    locked = btrfsdrv._open_layer_for_writing(path)
    try:
        waiting = threading.Thread(target=remove)
        waiting.start()
        waiting.join(0.5)
        # The limit holds while the remove waits: the quota file stays, and
        # a get finds it.
        assert os.path.exists(quota_file)
        driver.get("layer")
        assert qgroup_limits(fs)[layer_id] == 16 * 1024**2
        waiting.join()
    finally:
        btrfsdrv._unlock_and_close_layer(locked)

    [error] = outcome
    assert error.errno == errno.EBUSY
    assert "another remove is deleting it" in str(error)
    assert driver.exists("layer")
    assert os.path.exists(quota_file)
    driver.remove("layer")
    assert not driver.exists("layer")


def test_forked_copy_of_layer_fd_holds_no_lock(driver):
    # A child forked without exec keeps copies of the parent's descriptors.
    # Only the lock's own descriptor holds the lock, and the child closes it.
    driver.create("layer")
    path = driver.get("layer")
    ready_read, ready_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_read)
            root_fd = btrfsdrv._open_layer_for_writing(path)
            os.dup(root_fd)  # as a walk makes
            if os.fork() == 0:
                os.close(release_write)
                os.read(release_read, 1)  # until the test closes its end
                os._exit(0)
            os.write(ready_write, b"locked")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_write)
    os.close(release_read)
    try:
        assert os.read(ready_read, 6) == b"locked"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_read)
    try:
        root_fd = btrfsdrv._open_layer_for_writing(path)
        btrfsdrv._unlock_and_close_layer(root_fd)
    finally:
        os.close(release_write)  # the grandchild exits


def test_remap_names_layer_removed_while_waiting(driver, monkeypatch):
    driver.create("layer")
    path = driver.get("layer")
    flock_with_retries = btrfsdrv._flock_with_retries

    def remove_first(*args):
        btrfsdrv.delete_subvolume(path)  # as a remove that held the lock would
        return flock_with_retries(*args)

    monkeypatch.setattr(btrfsdrv, "_flock_with_retries", remove_first)
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    with pytest.raises(FileNotFoundError, match="another process removed the layer") as raised:
        driver.update_layer_id_map("layer", None, (maps, maps))
    assert raised.value.filename == path


def test_remove_names_layer_removed_before_open(driver, monkeypatch):
    driver.create("layer")
    path = driver.get("layer")
    check_no_mounts = driver._check_no_mounts

    def remove_first(layer_path):
        check_no_mounts(layer_path)
        btrfsdrv.delete_subvolume(path)

    monkeypatch.setattr(driver, "_check_no_mounts", remove_first)
    with pytest.raises(FileNotFoundError, match="another process removed it") as raised:
        driver.remove("layer")
    assert raised.value.filename == path


def test_concurrent_removes_of_one_layer(driver, monkeypatch):
    # The second remove waits for the first, then finds the layer gone,
    # instead of repairing and checking the layer while it is deleted.
    import threading

    driver.create("layer")
    btrfsdrv.create_subvolume(os.path.join(driver.get("layer"), "nested"))
    paused, resume = threading.Event(), threading.Event()
    clear_removal_flags = btrfsdrv._clear_removal_flags

    def pause_first(*args):
        if threading.current_thread().name == "first":
            paused.set()
            resume.wait(30)
        return clear_removal_flags(*args)

    monkeypatch.setattr(btrfsdrv, "_clear_removal_flags", pause_first)
    outcomes = {}

    def remove():
        try:
            driver.remove("layer")
            outcomes[threading.current_thread().name] = "removed"
        except OSError as error:
            outcomes[threading.current_thread().name] = error

    first = threading.Thread(target=remove, name="first")
    second = threading.Thread(target=remove, name="second")
    first.start()
    try:
        assert paused.wait(30)
        second.start()
        second.join(0.5)  # the second remove waits for the lock meanwhile
    finally:
        resume.set()
        first.join()
    second.join()

    assert outcomes["first"] == "removed"
    assert isinstance(outcomes["second"], FileNotFoundError), outcomes["second"]
    assert "another process removed it" in str(outcomes["second"])
    assert driver.list_layers() == []


@pytest.mark.parametrize("first_apply", ["resumed", "killed"])
def test_concurrent_apply_on_one_layer(driver, first_apply):
    import multiprocessing.connection

    root = create_open_layer(driver, "layer")
    big = os.urandom(4 * 1024**2)
    raw = make_tar([entry("d", tarfile.DIRTYPE, mode=0o755), entry("d/first", data=b"first"),
                    entry("d/big", data=big), entry("d/last", data=b"last")])
    parent_end, child_end = _FORK.Pipe()
    first = _FORK.Process(target=_apply_with_pause, args=(root, raw, len(raw) // 2, child_end))
    first.start()
    try:
        ready = multiprocessing.connection.wait([parent_end, first.sentinel])
        assert parent_end in ready, f"the first apply exited with {first.exitcode} before it paused"
        assert parent_end.recv() == "paused"
        assert apply_temporaries_below(root) != []

        with pytest.raises(OSError, match="another apply_diff or update_layer_id_map is writing") as raised:
            driver.apply_diff("layer", io.BytesIO(make_tar([entry("second", data=b"second")])))
        assert raised.value.errno == errno.EBUSY
        assert raised.value.filename == root
        assert not os.path.lexists(os.path.join(root, "second"))

        if first_apply == "resumed":
            parent_end.send("resume")
            assert parent_end.recv() == ("applied", len(big) + len(b"first") + len(b"last"))
        else:
            os.kill(first.pid, signal.SIGKILL)
    except BaseException:
        first.kill()  # it may wait for a message that never comes
        first.join()
        raise
    first.join()
    if first_apply == "killed":
        assert first.exitcode == -signal.SIGKILL
        driver.apply_diff("layer", io.BytesIO(raw))
    else:
        assert first.exitcode == 0

    assert apply_temporaries_below(root) == []
    assert sorted(os.listdir(os.path.join(root, "d"))) == ["big", "first", "last"]
    with open(os.path.join(root, "d", "big"), "rb") as data:
        assert data.read() == big
    with open(os.path.join(root, "d", "last"), "rb") as data:
        assert data.read() == b"last"


def test_apply_lock_survives_subprocess_spawning(tmp_path):
    import threading

    layer = tmp_path / "layer"
    layer.mkdir()
    stop = threading.Event()
    spawned = []

    def spawn_until_stopped():
        while not stop.is_set():
            subprocess.run(["true"], check=True)
            spawned.append(1)

    spawner = threading.Thread(target=spawn_until_stopped)
    spawner.start()
    try:
        for index in range(50):
            apply(layer, make_tar([entry(f"f{index}", data=b"x")]))
    finally:
        stop.set()
        spawner.join()
    assert len(spawned) > 0
    assert sorted(os.listdir(layer)) == sorted(f"f{index}" for index in range(50))


def test_apply_lock_not_held_by_forked_child(tmp_path, monkeypatch):
    layer = tmp_path / "layer"
    layer.mkdir()
    read_end, write_end = os.pipe()
    children = []
    original = btrfsdrv._remove_apply_temporaries

    def fork_while_locked(root_fd, layer_dir):
        original(root_fd, layer_dir)
        if children:
            return
        pid = os.fork()
        if pid == 0:
            # The child lives until the parent closes the pipe.
            try:
                os.close(write_end)
                os.read(read_end, 1)
            finally:
                os._exit(0)
        children.append(pid)

    monkeypatch.setattr(btrfsdrv, "_remove_apply_temporaries", fork_while_locked)
    try:
        apply(layer, make_tar([entry("first", data=b"1")]))
        assert len(children) == 1
        assert os.waitpid(children[0], os.WNOHANG) == (0, 0)

        apply(layer, make_tar([entry("second", data=b"2")]))
        assert os.waitpid(children[0], os.WNOHANG) == (0, 0)
    finally:
        os.close(write_end)
        os.close(read_end)
        for pid in children:
            os.waitpid(pid, 0)
    assert sorted(os.listdir(layer)) == ["first", "second"]


def test_apply_lock_excludes_other_thread(tmp_path, monkeypatch):
    import threading

    layer = tmp_path / "layer"
    layer.mkdir()
    monkeypatch.setattr(btrfsdrv, "_APPLY_LOCK_WAIT", 0.1)
    errors = []
    original = btrfsdrv._remove_apply_temporaries

    def apply_second():
        try:
            apply(layer, make_tar([entry("second", data=b"2")]))
        except OSError as error:
            errors.append(error)

    def apply_in_thread_while_locked(root_fd, layer_dir):
        original(root_fd, layer_dir)
        if not errors:
            second = threading.Thread(target=apply_second)
            second.start()
            second.join()

    monkeypatch.setattr(btrfsdrv, "_remove_apply_temporaries", apply_in_thread_while_locked)
    apply(layer, make_tar([entry("first", data=b"1")]))

    assert len(errors) == 1
    assert errors[0].errno == errno.EBUSY
    assert errors[0].filename == str(layer)
    assert os.listdir(layer) == ["first"]


@pytest.mark.parametrize("first", ["apply", "remap"])
def test_apply_and_remap_exclude_each_other(tmp_path, monkeypatch, first):
    import threading

    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "file").write_bytes(b"data")
    maps = [btrfsdrv.IDMap(0, 100000, 65536)]
    monkeypatch.setattr(btrfsdrv, "_APPLY_LOCK_WAIT", 0.1)
    errors = []

    def second():
        try:
            if first == "apply":
                btrfsdrv.remap_layer_owners(str(layer), None, (maps, maps))
            else:
                apply(layer, make_tar([entry("second", data=b"2")]))
        except OSError as error:
            errors.append(error)

    def run_second_while_locked(*args):
        # Runs inside the first operation, after it took the lock.
        if not errors:
            thread = threading.Thread(target=second)
            thread.start()
            thread.join()
        return original(*args)

    name = "_remove_apply_temporaries" if first == "apply" else "_check_no_mounts_below"
    original = getattr(btrfsdrv, name)
    monkeypatch.setattr(btrfsdrv, name, run_second_while_locked)
    if first == "apply":
        apply(layer, make_tar([entry("first", data=b"1")]))
    else:
        btrfsdrv.remap_layer_owners(str(layer), None, (maps, maps))

    assert len(errors) == 1
    assert errors[0].errno == errno.EBUSY
    assert errors[0].filename == str(layer)
    assert "update_layer_id_map" in errors[0].strerror


NOBODY = 65534

# Runs as a user without CAP_SYS_ADMIN and prints what each step did as JSON.
_UNPRIVILEGED_CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import btrfsdrv

home = sys.argv[2]
results = {}


def attempt(step, call):
    try:
        call()
        results[step] = "ok"
    except Exception as error:
        results[step] = f"{type(error).__name__}: {error}"


def fill(layer_id):
    root = driver.get(layer_id)
    os.chmod(root, 0o755)
    with open(os.path.join(root, "file"), "w") as output:
        output.write("data")
    os.symlink("/", os.path.join(root, "to-root"))


def close(layer_id):
    root = driver.get(layer_id)
    for name, mode in (("read-only", 0o555), ("closed", 0)):
        os.mkdir(os.path.join(root, name))
        with open(os.path.join(root, name, "file"), "w") as output:
            output.write("data")
        os.chmod(os.path.join(root, name), mode)


def nest(layer_id):
    root = driver.get(layer_id)
    btrfsdrv.create_subvolume(os.path.join(root, "nested"))
    with open(os.path.join(root, "nested", "file"), "w") as output:
        output.write("data")
    btrfsdrv.create_snapshot(os.path.join(root, "nested"), os.path.join(root, "read-only-nested"), read_only=True)


driver = btrfsdrv.Driver(home)
attempt("create", lambda: driver.create("base"))
attempt("fill", lambda: fill("base"))
attempt("snapshot", lambda: driver.create("box", "base"))
attempt("nest", lambda: nest("box"))
attempt("usage", lambda: driver.read_write_disk_usage("box"))
attempt("close", lambda: close("box"))
attempt("remove box", lambda: driver.remove("box"))
attempt("remove base", lambda: driver.remove("base"))
attempt("create sized", lambda: driver.create("sized", storage_opt={"size": "8m"}))
results["sized exists"] = driver.exists("sized")
attempt("remove limited", lambda: driver.remove("limited"))
attempt("remove mixed", lambda: driver.remove("mixed"))
driver.cleanup()
print(json.dumps(results))
"""


@pytest.fixture(params=[(), ("user_subvol_rm_allowed",)], ids=["default", "user_subvol_rm_allowed"])
def open_fs(request):
    """A loopback btrfs whose mount point every user can reach (pytest's tmp_path is 0700)."""
    directory = tempfile.mkdtemp(prefix="btrfsdrv-test-")
    os.chmod(directory, 0o755)
    try:
        with loopback_btrfs(directory, mount_options=request.param) as filesystem:
            os.chmod(filesystem.mountpoint, 0o755)
            yield filesystem
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def prepare_unprivileged_home(filesystem, owner):
    """Make a home owned by owner with a sized layer and a layer holding a root-owned subvolume."""
    home = filesystem.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"], uid_maps=[(0, owner, 1)], gid_maps=[(0, owner, 1)]) as driver:
        driver.create("limited", storage_opt={"size": "8m"})
        driver.create("mixed")
        mixed = driver.get("mixed")
        os.chmod(mixed, 0o755)
        btrfsdrv.create_subvolume(os.path.join(mixed, "root-owned"))
        with open(os.path.join(mixed, "root-owned", "file"), "w") as output:
            output.write("root's")
    for path in (home, os.path.join(home, "quotas"), os.path.join(home, "quotas", "limited")):
        os.chown(path, owner, owner)
    return home


def _copy_module(directory):
    """Copy the module under test where every user can read it; return that directory."""
    module_dir = os.path.join(directory, "module")
    os.mkdir(module_dir)
    source_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))
    for name in ("btrfsdrv.py", "ioctl_structs.py"):
        if os.path.exists(os.path.join(source_dir, name)):
            shutil.copy(os.path.join(source_dir, name), module_dir)
    os.chmod(module_dir, 0o755)
    return module_dir


def as_user(user, command):
    """Return command run by setpriv as uid and gid user, without supplementary groups.

    subprocess.run() takes user and group only from Python 3.9 on.
    """
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]


def _interpreter_for(user):
    """Return a Python interpreter that user can run (pyenv builds under /root are not)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(as_user(user, [candidate, "-c", "pass"]), capture_output=True)
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    reason = f"no Python interpreter that uid {user} can run"
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def run_unprivileged(filesystem, home, how):
    module_dir = _copy_module(filesystem.directory)
    if how == "unshare":
        command = ["unshare", "-Ur", sys.executable, "-c", _UNPRIVILEGED_CHILD, module_dir, home]
        result = subprocess.run(command, capture_output=True, text=True)
    else:
        command = [_interpreter_for(NOBODY), "-c", _UNPRIVILEGED_CHILD, module_dir, home]
        result = subprocess.run(as_user(NOBODY, command), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("how", ["unshare", "setuid"])
def test_unprivileged_store(open_fs, how):
    owner = 0 if how == "unshare" else NOBODY
    home = prepare_unprivileged_home(open_fs, owner)
    limited_id = btrfsdrv.subvolume_id(os.path.join(home, "subvolumes", "limited"))

    results = run_unprivileged(open_fs, home, how)

    for step in ("create", "fill", "snapshot", "nest", "usage", "close", "remove box", "remove base", "remove limited"):
        assert results[step] == "ok", (step, results[step])
    assert "CAP_SYS_ADMIN" in results["create sized"]
    assert results["sized exists"] is False
    assert not os.path.exists(os.path.join(home, "quotas", "limited"))
    if how == "unshare":
        assert results["remove mixed"] == "ok"
        expected = []
    else:
        # The layer's owner cannot empty a subvolume that root owns.
        assert "PermissionError" in results["remove mixed"]
        assert "CAP_SYS_ADMIN" in results["remove mixed"]
        assert "root-owned" in results["remove mixed"]
        expected = ["mixed", "root-owned"]
    sync_subvolumes(open_fs)
    listed = open_fs.btrfs("subvolume", "list", open_fs.mountpoint)
    assert [os.path.basename(line.split()[-1]) for line in listed.splitlines() if line] == expected
    # Without CAP_SYS_ADMIN the remove can neither clear the limit nor destroy
    # the qgroup. Linux 6.18 deletes the qgroup of a dropped subvolume itself,
    # but only when its accounting has reached zero by then.
    assert qgroup_limits(open_fs).get(limited_id) in (None, 8 * 1024**2)
    assert _mounts_below(home) == []


# A layer (or a subvolume inside it) with chattr +i or +a where the kernel
# checks it when it unlinks a subvolume: the layer's top directory, a
# directory holding a nested subvolume, or a nested subvolume's top.
FLAGGED_LAYER_CASES = {
    "top immutable": ("+i", ""),
    "top append-only": ("+a", ""),
    "nested in immutable directory": ("+i", "imm"),
    "nested top immutable": ("+i", "imm/n2"),
}


def make_flagged_layer(root, flag, flagged):
    """Fill root with nested subvolumes holding data, then chattr flag the entry flagged below root."""
    os.chmod(root, 0o755)
    os.mkdir(os.path.join(root, "imm"))
    for nested in ("imm/n2", "n1", "zz"):
        btrfsdrv.create_subvolume(os.path.join(root, nested))
        write(os.path.join(root, nested, "file"), b"data")
    target = os.path.join(root, flagged) if flagged else root
    chattr(flag, target)
    return target


@pytest.mark.parametrize("case", FLAGGED_LAYER_CASES)
def test_remove_clears_blocking_flags(driver, fs, case):
    flag, flagged = FLAGGED_LAYER_CASES[case]
    driver.create("layer")
    make_flagged_layer(driver.get("layer"), flag, flagged)

    driver.remove("layer")

    assert not driver.exists("layer")
    assert_no_subvolumes(fs)


@pytest.mark.parametrize("flag", ["+i", "+a"])
@pytest.mark.parametrize("flagged", ["n1", "n1/dir", ""])
def test_remove_clears_flags_in_read_only_subvolumes(driver, fs, flag, flagged):
    # The flags of a read-only subvolume's inodes cannot change (EROFS)
    # until the subvolume is writable again.
    root = create_open_layer(driver, "layer")
    btrfsdrv.create_subvolume(os.path.join(root, "n1"))
    os.mkdir(os.path.join(root, "n1", "dir"))
    btrfsdrv.create_subvolume(os.path.join(root, "n1", "dir", "n2"))
    write(os.path.join(root, "n1", "dir", "n2", "file"), b"data")
    chattr(flag, os.path.join(root, flagged) if flagged else root)
    read_only = os.path.join(root, "n1") if flagged else root
    fs.btrfs("property", "set", read_only, "ro", "true")

    driver.remove("layer")

    assert not driver.exists("layer")
    assert_no_subvolumes(fs)


@pytest.mark.parametrize("read_only", ["layer", "A", "layer and A"])
def test_remove_nested_in_read_only_subvolumes(driver, fs, read_only):
    root = create_open_layer(driver, "layer")
    btrfsdrv.create_subvolume(os.path.join(root, "A"))
    btrfsdrv.create_subvolume(os.path.join(root, "A", "B"))
    btrfsdrv.create_subvolume(os.path.join(root, "C"))
    for name in read_only.split(" and "):
        fs.btrfs("property", "set", root if name == "layer" else os.path.join(root, name), "ro", "true")

    driver.remove("layer")

    assert not driver.exists("layer")
    assert_no_subvolumes(fs)


def test_delete_subvolume_recursive_clears_blocking_flags(fs):
    top = fs.path("top")
    btrfsdrv.create_subvolume(top)
    make_flagged_layer(top, "+i", "imm")

    btrfsdrv.delete_subvolume(top, recursive=True)

    assert not os.path.exists(top)
    assert_no_subvolumes(fs)


@pytest.mark.parametrize("flag", ["+i", "+a"])
def test_delete_subvolume_checks_holder_flags_first(fs, flag):
    holder = fs.path("holder")
    os.mkdir(holder)
    top = os.path.join(holder, "top")
    btrfsdrv.create_subvolume(top)
    btrfsdrv.create_subvolume(os.path.join(top, "n1"))
    btrfsdrv.create_subvolume(os.path.join(top, "n1", "n2"))
    before = subvolume_paths(fs)
    chattr(flag, holder)
    try:
        with pytest.raises(PermissionError) as raised:
            btrfsdrv.delete_subvolume(top, recursive=True)
        after = subvolume_paths(fs)
    finally:
        chattr(flag.replace("+", "-"), holder)

    assert after == before
    assert raised.value.filename == holder
    assert f"chattr {flag.replace('+', '-')} {holder}" in str(raised.value)


def test_remove_checks_subvolumes_directory_flags_first(fs):
    with btrfsdrv.Driver(fs.path("home")) as driver:
        driver.create("layer")
        btrfsdrv.create_subvolume(os.path.join(driver.get("layer"), "nested"))
        before = subvolume_paths(fs)
        subvolumes = os.path.join(driver.home, "subvolumes")
        chattr("+i", subvolumes)
        try:
            with pytest.raises(PermissionError) as raised:
                driver.remove("layer")
            after = subvolume_paths(fs)
        finally:
            chattr("-i", subvolumes)

        assert after == before
        assert raised.value.filename == subvolumes
        driver.remove("layer")
        assert driver.list_layers() == []


@pytest.mark.parametrize("flag", ["+i", "+a"])
@pytest.mark.parametrize("size", [None, "100m"])
def test_create_from_flagged_parent_leaves_nothing(fs, flag, size):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create("parent")
        parent = driver.get("parent")
        chattr(flag, parent)
        try:
            with pytest.raises(PermissionError) as raised:
                driver.create("child", "parent", storage_opt={"size": size} if size else None)
            layers = driver.list_layers()
            quotas = os.path.join(driver.home, "quotas")
            quota_files = os.listdir(quotas) if os.path.exists(quotas) else []
        finally:
            chattr(flag.replace("+", "-"), parent)

        assert layers == ["parent"]
        assert quota_files == []
        assert raised.value.filename == parent
        assert f"chattr {flag.replace('+', '-')} {parent}" in str(raised.value)
        assert "create the layer again" in str(raised.value)


def test_delete_subvolume_names_immutable_top(fs):
    top = fs.path("top")
    btrfsdrv.create_subvolume(top)
    chattr("+i", top)
    fd = os.open(fs.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(PermissionError) as raised:
            btrfsdrv._delete_subvolume_or_contents(fd, b"top", top)
    finally:
        os.close(fd)
        chattr("-i", top)
    message = str(raised.value)
    assert "immutable" in message
    assert f"chattr -i {top}" in message
    assert "default subvolume" not in message


_FLAGGED_REMOVE_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import btrfsdrv

try:
    btrfsdrv.Driver(sys.argv[2]).remove(sys.argv[3])
    print(json.dumps({"errno": None, "permission": False, "message": ""}))
except OSError as error:
    print(json.dumps({"errno": error.errno, "permission": isinstance(error, PermissionError), "message": str(error)}))
"""


def _flag_state(root):
    """Return the immutable and append-only flags of every directory and regular file below root."""
    flags = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            path = os.path.join(directory, name)
            flags[os.path.relpath(path, root)] = inode_flags(path)
    return flags


@pytest.mark.parametrize("case", FLAGGED_LAYER_CASES)
@pytest.mark.parametrize("how", ["unshare", "setuid"])
def test_unprivileged_remove_rejects_flags(open_fs, how, case):
    flag, flagged = FLAGGED_LAYER_CASES[case]
    owner = 0 if how == "unshare" else NOBODY
    home = open_fs.path("home")
    with btrfsdrv.Driver(home, uid_maps=[(0, owner, 1)], gid_maps=[(0, owner, 1)]) as driver:
        driver.create("layer")
        root = driver.get("layer")
    os.chown(home, owner, owner)
    os.chmod(root, 0o755)
    os.mkdir(os.path.join(root, "imm"))
    for nested in ("imm/n2", "n1", "zz"):
        btrfsdrv.create_subvolume(os.path.join(root, nested))
        write(os.path.join(root, nested, "file"), b"data")
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(directory, name), owner, owner)
    target = os.path.join(root, flagged) if flagged else root
    chattr(flag, target)
    subvolumes = subvolume_paths(open_fs)
    digest = tree_digest(root)
    flags = _flag_state(root)
    module_dir = _copy_module(open_fs.directory)
    try:
        if how == "unshare":
            command = ["unshare", "-Ur", sys.executable, "-c", _FLAGGED_REMOVE_CHILD, module_dir, home, "layer"]
            result = subprocess.run(command, capture_output=True, text=True)
        else:
            command = [_interpreter_for(NOBODY), "-c", _FLAGGED_REMOVE_CHILD, module_dir, home, "layer"]
            result = subprocess.run(as_user(NOBODY, command), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)

        assert outcome["permission"], outcome
        assert outcome["errno"] == errno.EPERM
        name = "immutable" if flag == "+i" else "append-only"
        assert name in outcome["message"]
        assert f"chattr -{flag[1]} {target}" in outcome["message"]
        assert outcome["message"].count("failed") == 1, outcome["message"]
        assert subvolume_paths(open_fs) == subvolumes
        assert tree_digest(root) == digest
        assert _flag_state(root) == flags
    finally:
        chattr("-" + flag[1], target)


_UNMAPPED_REMAP_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import btrfsdrv

try:
    btrfsdrv.Driver(sys.argv[2]).update_layer_id_map("layer", None, ([(0, 5000, 1)], [(0, 5000, 1)]))
    print("ok")
except OSError as error:
    print(error)
"""


def test_remap_to_unmapped_host_id_names_namespace(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        driver.create("layer")
        write(os.path.join(driver.get("layer"), "file"), b"data")
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))

    result = subprocess.run(["unshare", "-Ur", sys.executable, "-c", _UNMAPPED_REMAP_CHILD, module_dir, home],
                            capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert "not mapped in this user namespace" in result.stdout
    assert "/proc/self/uid_map" in result.stdout
    assert "5000" in result.stdout



_UNMAPPED_APPLY_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import btrfsdrv

try:
    with open(sys.argv[3], "rb") as stream:
        btrfsdrv.Driver(sys.argv[2]).apply_diff("layer", stream)
    print(json.dumps({"errno": None}))
except OSError as error:
    print(json.dumps({"errno": error.errno, "filename": error.filename, "message": str(error)}))
"""


def write_gid_42_tar(directory):
    """Write a layer tar whose etc/shadow has gid 42 and return its path."""
    shadow, data = entry("etc/shadow", data=b"1")
    shadow.gid = 42
    path = os.path.join(directory, "gid42.tar")
    write(path, make_tar([entry("etc", tarfile.DIRTYPE), (shadow, data)]))
    return path


def run_cli_in_user_namespace(home, tar_path, *arguments):
    """Run the command line under unshare -Ur, which maps only uid and gid 0, with tar_path on stdin."""
    with open(tar_path, "rb") as stream:
        return subprocess.run(["unshare", "-Ur", sys.executable, btrfsdrv.__file__, "--home", home, *arguments],
                              stdin=stream, capture_output=True, text=True)


def test_apply_names_gid_unmapped_in_namespace(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        driver.create("layer")
    tar_path = write_gid_42_tar(fs.directory)
    module_dir = os.path.dirname(os.path.abspath(btrfsdrv.__file__))

    result = subprocess.run(["unshare", "-Ur", sys.executable, "-c", _UNMAPPED_APPLY_CHILD, module_dir, home,
                             tar_path], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["errno"] == errno.EINVAL
    assert outcome["filename"] == os.path.join(home, "subvolumes", "layer")
    assert "apply entry 'etc/shadow' at offset 512 failed" in outcome["message"]
    assert "gid 42 is not mapped in this user namespace" in outcome["message"]
    assert "uid 0" not in outcome["message"]
    assert "ignore_chown_errors=True" in outcome["message"]
    assert "ID maps" in outcome["message"]


def test_cli_apply_names_unmapped_gid(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        driver.create("layer")
    tar_path = write_gid_42_tar(fs.directory)

    result = run_cli_in_user_namespace(home, tar_path, "apply", "layer")

    assert result.returncode == btrfsdrv.EXIT_FAILURE
    assert "gid 42 is not mapped in this user namespace" in result.stderr
    assert "--ignore-chown-errors" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_apply_ignore_chown_errors(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home) as driver:
        driver.create("layer")
        layer_dir = driver.get("layer")
    tar_path = write_gid_42_tar(fs.directory)

    result = run_cli_in_user_namespace(home, tar_path, "apply", "layer", "--ignore-chown-errors")

    assert result.returncode == 0, result.stderr
    assert "keeping the default ones" in result.stderr
    shadow = os.stat(os.path.join(layer_dir, "etc", "shadow"))
    assert shadow.st_gid == 0
    assert shadow.st_size == 1


def test_cli_apply_help_names_option():
    result = subprocess.run([sys.executable, btrfsdrv.__file__, "--home", "unused", "apply", "--help"],
                            capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert "--ignore-chown-errors" in result.stdout

SMALL_IMAGE = 256 * 1024**2


def assert_clean_outcome(driver, layer_id, call):
    """Run a create that may fail; if it fails, no part of the layer may remain."""
    try:
        call()
    except OSError as error:
        assert is_clear_error(error), repr(error)
        assert not driver.exists(layer_id)
        assert not os.path.exists(os.path.join(driver.home, "quotas", layer_id))
        return False
    assert os.path.isdir(driver.get(layer_id))
    return True


def test_full_filesystem(tmp_path):
    with loopback_btrfs(tmp_path, size=SMALL_IMAGE) as small:
        with btrfsdrv.Driver(small.path("home"), ["btrfs.min_space=1m"]) as driver:
            driver.create("base")
            driver.create("big", "base", storage_opt={"size": "64m"})
            big = driver.get("big")
            os.chmod(big, 0o755)
            with open(os.path.join(big, "data"), "wb") as output:
                output.write(os.urandom(32 * 1024**2))
            assert write_until_error(small.path("filler"), maximum=SMALL_IMAGE) == errno.ENOSPC
            sync_subvolumes(small)

            created = {
                "empty": assert_clean_outcome(driver, "empty", lambda: driver.create("empty")),
                "snapshot": assert_clean_outcome(driver, "snapshot", lambda: driver.create("snapshot", "base")),
                "sized": assert_clean_outcome(
                    driver, "sized", lambda: driver.create("sized", "base", storage_opt={"size": "8m"})),
            }
            print(f"created on a full filesystem: {created}")
            free_before = os.statvfs(small.mountpoint).f_bavail

            driver.remove("big")

            sync_subvolumes(small)
            assert os.statvfs(small.mountpoint).f_bavail > free_before
            assert not os.path.exists(os.path.join(driver.home, "quotas", "big"))
            for layer_id in driver.list_layers():
                driver.remove(layer_id)
            assert driver.list_layers() == []
        os.unlink(small.path("filler"))
        assert_no_subvolumes(small)


def fill_metadata(directory, maximum_files=100000):
    """Create files with 12,000-byte xattrs in directory until 51 in a row fail, as they do when metadata is full."""
    failures = 0
    for number in range(maximum_files):
        path = os.path.join(directory, f"inode-{number}")
        try:
            with open(path, "wb"):
                pass
            os.setxattr(path, "user.padding", b"x" * 12000)
        except OSError:
            failures += 1
            if failures > 50:
                return
        else:
            failures = 0


def test_full_filesystem_remove_deletes_quota_file(tmp_path, caplog):
    with loopback_btrfs(tmp_path, size=SMALL_IMAGE) as small:
        with btrfsdrv.Driver(small.path("home"), ["btrfs.min_space=1m"]) as driver:
            driver.create_read_write("box", storage_opt={"size": "8m"})
            driver.create_read_write("filler")
            filler = driver.get("filler")
            for number in range(SMALL_IMAGE // (4 * 1024**2)):
                if write_until_error(os.path.join(filler, f"data-{number}"), maximum=4 * 1024**2):
                    break
            fill_metadata(filler)
            os.sync()

            driver.remove("box")

            assert driver.list_layers() == ["filler"]
            assert os.listdir(os.path.join(driver.home, "quotas")) == []
            assert "b'" not in caplog.text
            driver.remove("filler")


def test_layer_at_its_limit(fs):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create("base")
        driver.create_read_write("box", "base", storage_opt={"size": "16m"})
        root = driver.get("box")
        os.chmod(root, 0o755)
        assert write_until_error(os.path.join(root, "fill")) == errno.EDQUOT

        assert assert_clean_outcome(driver, "child", lambda: driver.create("child", "box"))
        assert_clean_outcome(
            driver, "sized-child", lambda: driver.create("sized-child", "box", storage_opt={"size": "32m"}))
        assert driver.get("box") == root
        assert qgroup_limits(fs)[btrfsdrv.subvolume_id(root)] == 16 * 1024**2
        diff = make_diff(os.path.join(os.path.dirname(driver.home), "big.tar"), size=8 * 1024**2)
        with open(diff, "rb") as stream, pytest.raises(OSError) as raised:
            driver.apply_diff("box", stream)
        assert raised.value.errno == errno.EDQUOT
        assert raised.value.filename is not None
        try:
            driver.apply_diff("box", io.BytesIO(make_tar([entry(".wh.fill")])))
        except OSError as error:  # the apply's probe file found no room
            assert error.errno == errno.EDQUOT
            assert error.filename == root
            assert "size limit" in str(error)
        else:
            assert not os.path.exists(os.path.join(root, "fill"))

        driver.remove("box")

        assert not driver.exists("box")
        assert os.path.getsize(os.path.join(driver.get("child"), "fill")) > 0
        assert_store_consistent(fs, driver, driver.list_layers())


@pytest.mark.parametrize("change", [
    ("qgroup", "limit", "none"),
    ("qgroup", "limit", "1G"),
    ("qgroup", "destroy"),
    ("quota", "disable"),
], ids=" ".join)
def test_get_restores_limit_changed_outside(fs, change):
    with btrfsdrv.Driver(fs.path("home"), ["btrfs.min_space=1m"]) as driver:
        driver.create("box", storage_opt={"size": "12m"})
        root = driver.get("box")
        layer = btrfsdrv.subvolume_id(root)
        if change[0] == "qgroup" and change[1] == "limit":
            fs.btrfs(*change, root)
        elif change[0] == "qgroup":
            # Linux 6.x rejects destroying the qgroup of a live subvolume (EBUSY).
            subprocess.run(["btrfs", *change, f"0/{layer}", fs.mountpoint], capture_output=True)
        else:
            fs.btrfs(*change, fs.mountpoint)

        driver.get("box")

        assert quota_is_enabled(fs)
        assert qgroup_limits(fs)[layer] == 12 * 1024**2


def test_reused_subvolume_id_has_no_limit(fs):
    home = fs.path("home")
    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("old")
        driver.create("limited", storage_opt={"size": "12m"})
        limited_id = btrfsdrv.subvolume_id(driver.get("limited"))
        assert limited_id > btrfsdrv.subvolume_id(driver.get("old"))
        driver.remove("limited")
    sync_subvolumes(fs)
    fs.remount()

    with btrfsdrv.Driver(home, ["btrfs.min_space=1m"]) as driver:
        driver.create("new")
        new_id = btrfsdrv.subvolume_id(driver.get("new"))

        assert new_id == limited_id
        assert qgroup_limits(fs).get(new_id) is None
        assert "SizeLimit" not in driver.metadata("new")


# -- Vendoring, packaging and interoperation ------------------------------------

# These tests also run against the vendored single file (make test-vendored),
# which runs pytest from dist/ with BTRFSDRV_VENDORED=1. Repository files are
# found next to this file, never through sys.path.

import importlib.util  # noqa: E402
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
    """A directory that contains a fresh dist/btrfsdrv.py and nothing else."""
    directory = tmp_path / "vendored"
    directory.mkdir()
    _vendor_to(directory / "btrfsdrv.py")
    return str(directory)


def _run_isolated(code, import_dir, *args, check=True):
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
        # Ask a fresh interpreter started like this run (same directory and
        # environment), because tools that other tests import may have grown
        # this process's sys.path since it started.
        probe = subprocess.run(
            [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('ioctl_structs'))"],
            capture_output=True, text=True, check=True, cwd=MODULE_DIR,
        )
        assert probe.stdout.strip() == "None"
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
    header_words = " ".join(header.replace("#", " ").split())  # novm: str.replace, not TarInfo's
    assert f"Linux {btrfsdrv._structs.PORTED_HEADERS_VERSION} UAPI headers" in header_words
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
    result = _run_isolated(
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
    source = json.loads(_run_isolated(code, REPOSITORY).stdout)
    vendored = json.loads(_run_isolated(code, vendored_dir).stdout)
    assert "structs" not in vendored
    assert vendored["all"] == source["all"]
    missing_driver_names = set(source["dir"]) - set(vendored["dir"]) - {"_structs"}
    assert not missing_driver_names
    missing_structs_names = set(source["structs"]) - set(vendored["dir"]) - {"__builtins__", "__cached__"}
    assert not missing_structs_names
    assert not set(source["structs_all"]) - set(vendored["dir"])


# - Command line


def _cli(*args, check=False):
    """Run python -m btrfsdrv, importing it from where the tests imported it."""
    environment = dict(os.environ, PYTHONPATH=MODULE_DIR)
    return subprocess.run(
        [sys.executable, "-m", "btrfsdrv", *args],
        check=check, capture_output=True, text=True, env=environment, cwd="/",
    )


def test_cli_help_lists_each_exit_status():
    result = _cli("--help")
    assert result.returncode == 0
    for line in ("0  success", "1  the layer does not exist", "2  usage error", "3  any other failure"):
        assert line in result.stdout


@pytest.mark.parametrize("command", ["create", "remove", "get", "exists", "list", "status",
                                     "metadata", "usage", "cleanup"])
def test_cli_command_help_offers_json(command):
    result = _cli("--home", "/nonexistent", command, "--help")
    assert result.returncode == 0
    assert "--json" in result.stdout
    assert "--verbose" in result.stdout


def test_cli_json_before_and_after_command(home):
    assert _cli("--home", home, "create", "base").returncode == 0
    for args in (["--json", "metadata", "base"], ["metadata", "base", "--json"]):
        result = _cli("--home", home, *args)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["Path"] == os.path.join(home, "subvolumes", "base")


def test_cli_every_command_prints_json(home):
    outputs = {}
    commands = [
        ["create", "base", "--json"],
        ["create", "top", "--parent", "base", "--size", "64M", "--read-write", "--json"],
        ["get", "top", "--json"],
        ["exists", "top", "--json"],
        ["list", "--json"],
        ["status", "--json"],
        ["metadata", "top", "--json"],
        ["usage", "top", "--json"],
        ["remove", "top", "--json"],
        ["cleanup", "--json"],
    ]
    for args in commands:
        result = _cli("--home", home, *args)
        assert result.returncode == 0, (args, result.stderr)
        outputs[args[0] + ":" + args[1]] = json.loads(result.stdout)
    assert outputs["create:top"]["path"] == os.path.join(home, "subvolumes", "top")
    assert outputs["get:top"] == os.path.join(home, "subvolumes", "top")
    assert outputs["exists:top"] is True
    assert outputs["list:--json"] == ["base", "top"]
    assert outputs["status:--json"]["Quota Enabled"] == "true"
    assert outputs["metadata:top"]["SizeLimit"] == str(64 * 1024**2)
    assert set(outputs["usage:top"]) == {"size", "inode_count"}
    assert outputs["remove:top"] == {"id": "top", "removed": True}
    assert outputs["cleanup:--json"]["home"] == home


def test_cli_exit_statuses(home):
    assert _cli("--home", home, "create", "base").returncode == 0
    assert _cli("--home", home, "exists", "base").returncode == 0
    assert _cli("--home", home, "exists", "missing").returncode == 1
    assert _cli("--home", home, "create", "bad/id").returncode == 2
    assert _cli("--home", home, "create", "sized", "--size", "ten").returncode == 2
    assert _cli("--home", home, "no-such-command").returncode == 2
    assert _cli("--home", home, "-o", "btrfs.unknown=1", "list").returncode == 2
    missing = _cli("--home", home, "remove", "missing")
    assert missing.returncode == 3
    assert "not found" in missing.stderr


def test_cli_verbose_logs_changes(home):
    quiet = _cli("--home", home, "create", "quiet")
    verbose = _cli("--home", home, "create", "loud", "-v")
    assert quiet.returncode == 0
    assert verbose.returncode == 0
    assert quiet.stderr == ""
    assert "btrfsdrv: created subvolume " + os.path.join(home, "subvolumes", "loud") in verbose.stderr


# - Packaging


def _copy_checkout(destination):
    """Copy the repository's files, without build output, so builds leave it clean."""
    ignore = shutil.ignore_patterns(".git", "dist", "build", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(REPOSITORY, destination, ignore=ignore)
    return str(destination)


def _require_build_tools():
    missing = [name for name in ("setuptools", "wheel", "pip") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    reason = f"building a wheel offline needs {', '.join(missing)} (make test-deps installs them)"
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def test_wheel_builds_offline_and_installs(tmp_path):
    _require_build_tools()
    source = _copy_checkout(tmp_path / "source")
    wheels = tmp_path / "wheels"
    target = tmp_path / "target"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), source],
                   check=True, capture_output=True, text=True)
    (wheel,) = os.listdir(wheels)
    assert wheel == f"btrfsdrv-{btrfsdrv.__version__}-py3-none-any.whl"

    import zipfile
    with zipfile.ZipFile(wheels / wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"btrfsdrv-{btrfsdrv.__version__}.dist-info/entry_points.txt").decode()
    assert {"btrfsdrv.py", "ioctl_structs.py"} <= names
    assert "btrfsdrv = btrfsdrv:main" in entry_points

    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheels / wheel)],
                   check=True, capture_output=True, text=True)
    environment = dict(os.environ, PYTHONPATH=str(target))
    script = subprocess.run([str(target / "bin" / "btrfsdrv"), "--help"],
                            capture_output=True, text=True, env=environment, cwd="/")
    assert script.returncode == 0, script.stderr
    assert "exit status:" in script.stdout
    module = subprocess.run([sys.executable, "-m", "btrfsdrv", "--version"],
                            capture_output=True, text=True, env=environment, cwd="/")
    assert module.stdout.strip() == f"btrfsdrv {btrfsdrv.__version__}"
    where = subprocess.run([sys.executable, "-c", "import btrfsdrv, ioctl_structs; print(btrfsdrv.__file__)"],
                           capture_output=True, text=True, env=environment, cwd="/")
    assert where.stdout.strip() == str(target / "btrfsdrv.py")


# - No processes and no libraries but libc


_AUDIT_SCRIPT = """
    import json, os
    process_events = {"subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                      "os.fork", "os.forkpty"}
    violations, libraries = [], []

    def audit(event, args):
        if event in process_events:
            violations.append([event, repr(args)[:300]])
        elif event == "ctypes.dlopen":
            name = args[0]
            libraries.append(repr(name))
            allowed = name is None or os.path.basename(os.fsdecode(name)).startswith(("libc.so", "libzstd.so"))
            if not allowed:
                violations.append([event, repr(name)])

    sys.addaudithook(audit)
    import btrfsdrv
    home = sys.argv[1]
    with btrfsdrv.Driver(home) as driver:
        driver.create("base")
        driver.create_read_write("top", "base", storage_opt={"size": "64M"})
        driver.get("top")
        driver.metadata("top")
        driver.read_write_disk_usage("top")
        driver.status()
        driver.remove("top")
        driver.remove("base")
    print(json.dumps({"file": btrfsdrv.__file__, "violations": violations, "libraries": libraries}))
"""


@pytest.mark.parametrize("variant", ["source", "vendored"])
def test_driver_starts_no_process_and_loads_only_libc(variant, home, vendored_dir):
    import_dir = REPOSITORY if variant == "source" else vendored_dir
    result = _run_isolated(_AUDIT_SCRIPT, import_dir, home, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["file"] == os.path.join(import_dir, "btrfsdrv.py")
    assert report["violations"] == []
    assert "None" in report["libraries"]  # ctypes.CDLL(None): the hook saw libc load


# - Interoperation with Podman's btrfs driver (containers/storage)

PODMAN_IMAGE = "localhost/btrfsdrv-test:latest"
ROOTFS_FILES = {
    "etc/greeting": b"hello from a podman layer\n",
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "usr/share/doc/readme": b"x" * 5000,
}

# Podman runs in a private mount namespace: mounts it makes end with it, and
# a tmpfs over /var/lib there takes the blob info cache that Podman 4.3 keeps
# in /var/lib/containers/cache for root whatever --root is.
_PODMAN_WRAPPER = 'mount -t tmpfs -o mode=0755 btrfsdrv-test /var/lib && exec podman "$@"'


def _require_podman():
    missing = [tool for tool in ("podman", "unshare") if shutil.which(tool) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (make test-deps runs apt-get install -y podman)"
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


class PodmanStore:
    """A Podman store whose graph root is on the test's loopback btrfs.

    Configuration, run root and temporary files live in a directory of the
    test, so Podman touches none of the host's stores, locks or caches.
    """

    def __init__(self, fs, config):
        self.fs = fs
        self.root = fs.path("podman")
        self.home = os.path.join(self.root, "btrfs")
        with open(os.path.join(config, "containers.conf"), "w") as conf:
            conf.write(textwrap.dedent(f"""\
                [engine]
                cgroup_manager = "cgroupfs"
                events_logger = "file"
                events_logfile_path = "{config}/events.log"
                lock_type = "file"
                tmp_dir = "{config}/tmp"
                """))
        with open(os.path.join(config, "storage.conf"), "w") as conf:
            conf.write(textwrap.dedent(f"""\
                [storage]
                driver = "btrfs"
                graphroot = "{self.root}"
                runroot = "{config}/run"
                """))
        self.environment = dict(
            os.environ,
            CONTAINERS_CONF=os.path.join(config, "containers.conf"),
            CONTAINERS_STORAGE_CONF=os.path.join(config, "storage.conf"),
            HOME=config,
        )
        self.rootfs = os.path.join(config, "rootfs.tar")
        _write_rootfs(self.rootfs)

    def run(self, *args, driver_options=()):
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _PODMAN_WRAPPER, "podman",
                   "--root", self.root, "--runroot", os.path.dirname(self.rootfs) + "/run",
                   "--storage-driver", "btrfs"]
        for option in driver_options:
            command += ["--storage-opt", option]
        result = subprocess.run(command + list(args), capture_output=True, text=True, env=self.environment)
        assert result.returncode == 0, f"podman {' '.join(args)} failed: {result.stderr}"
        return result.stdout.strip()

    def layers(self):
        """Return {layer id: parent id or None} from containers/storage's layers.json."""
        with open(os.path.join(self.root, "btrfs-layers", "layers.json")) as layers_file:
            return {layer["id"]: layer.get("parent") for layer in json.load(layers_file)}

    def container_layer(self, name):
        container_id = self.run("container", "inspect", "--format", "{{.ID}}", name)
        with open(os.path.join(self.root, "btrfs-containers", "containers.json")) as containers_file:
            (layer,) = [entry["layer"] for entry in json.load(containers_file) if entry["id"] == container_id]
        return layer

    def import_image_and_create(self, *names, driver_options=()):
        """Import the test rootfs, create containers, and return (image layer, {name: layer})."""
        self.run("import", self.rootfs, PODMAN_IMAGE, driver_options=driver_options)
        for name in names:
            self.run("create", "--pull=never", "--network", "none", "--name", name, PODMAN_IMAGE, "/bin/true",
                     driver_options=driver_options)
        (image_layer,) = [layer for layer, parent in self.layers().items() if parent is None]
        return image_layer, {name: self.container_layer(name) for name in names}


def _write_rootfs(path):
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, data in ROOTFS_FILES.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            member.mode = 0o644
            archive.addfile(member, io.BytesIO(data))


def _qgroup_limits(fs):
    """Return {subvolume path: (max referenced, max exclusive)} from btrfs qgroup show -re --raw."""
    limits = {}
    for line in fs.btrfs("qgroup", "show", "-re", "--raw", fs.mountpoint).splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[0].startswith("0/"):
            limits[fields[5]] = (fields[3], fields[4])
    return limits


def _layer_limit(fs, store, layer):
    relative = os.path.relpath(os.path.join(store.home, "subvolumes", layer), fs.mountpoint)
    return _qgroup_limits(fs)[relative]


def _write_until_full(directory, limit):
    """Write up to twice limit bytes into directory and return the errno that stopped it."""
    chunk = b"\0" * 1024**2
    with open(os.path.join(directory, "filler"), "wb") as filler:
        try:
            for _ in range(2 * limit // len(chunk)):
                filler.write(chunk)
                filler.flush()
                os.fsync(filler.fileno())
        except OSError as error:
            return error.errno
    return None


@pytest.fixture
def podman(fs):
    _require_podman()
    # Podman rejects a run root longer than 50 characters, and pytest's
    # tmp_path is longer, so the configuration goes to a short directory.
    import tempfile

    config = tempfile.mkdtemp(prefix="btrfsdrv-podman-", dir="/tmp")
    try:
        yield PodmanStore(fs, config)
    finally:
        shutil.rmtree(config)


def test_podman_layers_read_by_btrfsdrv(podman):
    image_layer, containers = podman.import_image_and_create("first", "second")

    with btrfsdrv.Driver(podman.home) as driver:
        assert set(driver.list_layers()) == set(podman.layers())
        for layer in (image_layer, containers["first"]):
            path = driver.get(layer)
            assert path == os.path.join(podman.home, "subvolumes", layer)
            for name, data in ROOTFS_FILES.items():
                with open(os.path.join(path, name), "rb") as layer_file:
                    assert layer_file.read() == data

        image_metadata = driver.metadata(image_layer)
        container_metadata = driver.metadata(containers["first"])
        assert container_metadata["ParentUUID"] == image_metadata["UUID"]
        assert int(image_metadata["SubvolumeID"]) >= 256
        usage = driver.read_write_disk_usage(image_layer)
        assert usage.size == sum(len(data) for data in ROOTFS_FILES.values())
        assert usage.inode_count == len(ROOTFS_FILES) + 5  # files, the layer, etc, usr, share, doc

        driver.remove(containers["second"])
        assert not driver.exists(containers["second"])
        assert driver.exists(image_layer)
        assert driver.exists(containers["first"])

    # Podman still reads the layers that btrfsdrv left.
    mounted = podman.run("mount", "first")
    assert mounted == os.path.join(podman.home, "subvolumes", containers["first"])
    assert PODMAN_IMAGE in podman.run("images", "--format", "{{.Repository}}:{{.Tag}}")
    subvolumes = podman.fs.btrfs("subvolume", "list", podman.fs.mountpoint)
    assert containers["second"] not in subvolumes
    assert containers["first"] in subvolumes


def test_podman_applies_quota_file_of_btrfsdrv(podman):
    limit = 32 * 1024**2
    image_layer, containers = podman.import_image_and_create("limited", "newline")
    with btrfsdrv.Driver(podman.home) as driver:
        driver.create_read_write("btrfsdrv-limited", image_layer, storage_opt={"size": "32M"})
    with open(os.path.join(podman.home, "quotas", "btrfsdrv-limited"), "rb") as quota_file:
        quota = quota_file.read()
    assert quota == str(limit).encode()  # strconv.ParseUint(data, 10, 64) rejects anything else

    # containers/storage's Get reads HOME/quotas/ID and sets the qgroup limit.
    # The same bytes with a newline are rejected, which shows Get parsed them.
    with open(os.path.join(podman.home, "quotas", containers["limited"]), "wb") as quota_file:
        quota_file.write(quota)
    with open(os.path.join(podman.home, "quotas", containers["newline"]), "wb") as quota_file:
        quota_file.write(quota + b"\n")
    podman.run("mount", "limited")
    podman.run("mount", "newline")

    btrfsdrv_limits = _layer_limit(podman.fs, podman, "btrfsdrv-limited")
    assert btrfsdrv_limits == (str(limit), "none")
    assert _layer_limit(podman.fs, podman, containers["limited"]) == btrfsdrv_limits
    assert _layer_limit(podman.fs, podman, containers["newline"]) == ("none", "none")

    # Both limits stop writes the same way.
    for layer in ("btrfsdrv-limited", containers["limited"]):
        assert _write_until_full(os.path.join(podman.home, "subvolumes", layer), limit) == errno.EDQUOT


def test_podman_min_space_agrees_with_btrfsdrv(podman):
    with btrfsdrv.Driver(podman.home) as driver:
        assert dict(driver.status())["Quota Enabled"] == "false"

    # btrfs.min_space makes containers/storage turn quota on at init.
    image_layer, containers = podman.import_image_and_create("small", "large",
                                                             driver_options=["btrfs.min_space=8M"])
    with btrfsdrv.Driver(podman.home, ["btrfs.min_space=8M"]) as driver:
        assert dict(driver.status())["Quota Enabled"] == "true"
        with pytest.raises(ValueError, match="btrfs.min_space"):
            driver.create_read_write("too-small", image_layer, storage_opt={"size": "4M"})

    # Both drivers ignore a quota file below btrfs.min_space and apply one above it.
    os.makedirs(os.path.join(podman.home, "quotas"), exist_ok=True)
    for name, size in (("small", 4 * 1024**2), ("large", 16 * 1024**2)):
        with open(os.path.join(podman.home, "quotas", containers[name]), "w") as quota_file:
            quota_file.write(str(size))
    podman.run("mount", "small", driver_options=["btrfs.min_space=8M"])
    podman.run("mount", "large", driver_options=["btrfs.min_space=8M"])
    podman_limits = {name: _layer_limit(podman.fs, podman, containers[name]) for name in containers}
    assert podman_limits == {"small": ("none", "none"), "large": (str(16 * 1024**2), "none")}

    with btrfsdrv.Driver(podman.home, ["btrfs.min_space=8M"]) as driver:
        for name in ("small", "large"):
            driver.create_read_write(name, image_layer)
            with open(os.path.join(podman.home, "quotas", name), "wb") as quota_file:
                quota_file.write(str(4 * 1024**2 if name == "small" else 16 * 1024**2).encode())
            driver.get(name)
    btrfsdrv_limits = {name: _layer_limit(podman.fs, podman, name) for name in ("small", "large")}
    assert btrfsdrv_limits == podman_limits


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


def make_subvolume_beyond_lookup_limit(top):
    """Create a subvolume at top and one below a directory path longer than INO_LOOKUP_USER can return."""
    btrfsdrv.create_subvolume(top)
    deep = os.path.join(top, *["d" * 99] * 40)  # 4,000 bytes below top; the kernel's limit is 3,824
    os.makedirs(deep)
    btrfsdrv.create_subvolume(os.path.join(deep, "nested"))
    btrfsdrv.create_subvolume(os.path.join(top, "shallow"))


@pytest.mark.parametrize("make_tree", [make_nested_tree, make_subvolume_beyond_lookup_limit],
                         ids=["nested-tree", "beyond-lookup-limit"])
def test_nested_search_as_unprivileged_user(fs, make_tree):
    nobody = 65534
    top = fs.path("top")
    make_tree(top)
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


def make_deep_subvolumes(root, depth, count, name=b"d"):
    """Create count subvolumes in the directory at the bottom of a chain of depth directories below root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        for index in range(count):
            btrfsdrv._subvolume_create_at(fd, b"s%d" % index, root)
    finally:
        os.close(fd)


def make_subvolume_chain(root, count):
    """Create count subvolumes below root, each inside the one before."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(count):
            btrfsdrv._subvolume_create_at(fd, b"s", root)
            child = os.open(b"s", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


# Nested subvolume layouts, as (directories, subvolumes), that cost about
# subvolumes * depth opens when each subvolume's path is opened from the
# top. The tests allow 12 opens per directory and subvolume.
NESTED_LAYOUTS = {"deep directory": (200, 50), "chain": (0, 150)}


def make_nested_layout(root, layout):
    """Create a layout of NESTED_LAYOUTS below root; return the number of directories and subvolumes made."""
    depth, count = NESTED_LAYOUTS[layout]
    if depth:
        make_deep_subvolumes(root, depth, count)
    else:
        make_subvolume_chain(root, count)
    return depth + count


@pytest.mark.parametrize("layout", sorted(NESTED_LAYOUTS))
def test_remove_nested_opens_linear(driver, fs, monkeypatch, layout):
    root = create_open_layer(driver, "layer")
    size = make_nested_layout(root, layout)

    opens = count_calls(monkeypatch, os, "open")
    driver.remove("layer")
    open_count = len(opens)
    monkeypatch.undo()

    assert not driver.exists("layer")
    assert_no_subvolumes(fs)
    assert open_count <= 12 * size


@pytest.mark.parametrize("layout", sorted(NESTED_LAYOUTS))
def test_delete_subvolume_recursive_opens_linear(fs, monkeypatch, layout):
    top = fs.path("top")
    btrfsdrv.create_subvolume(top)
    size = make_nested_layout(top, layout)

    opens = count_calls(monkeypatch, os, "open")
    btrfsdrv.delete_subvolume(top, recursive=True)
    open_count = len(opens)
    monkeypatch.undo()

    assert not os.path.lexists(top)
    assert_no_subvolumes(fs)
    assert open_count <= 12 * size


@pytest.mark.parametrize("layout", sorted(NESTED_LAYOUTS))
def test_apply_nested_opens_linear(driver, monkeypatch, layout):
    root = create_open_layer(driver, "layer")
    size = make_nested_layout(root, layout)

    opens = count_calls(monkeypatch, os, "open")
    driver.apply_diff("layer", io.BytesIO(make_tar([])))
    open_count = len(opens)
    monkeypatch.undo()

    assert open_count <= 12 * size


@pytest.mark.parametrize("method", ["_find_nested_unprivileged", "_find_nested_by_walk"])
@pytest.mark.parametrize("layout", sorted(NESTED_LAYOUTS))
def test_nested_search_opens_linear(fs, monkeypatch, method, layout):
    top = fs.path("top")
    btrfsdrv.create_subvolume(top)
    size = make_nested_layout(top, layout)

    with open_top(top) as (fd, top_id):
        expected = sorted(btrfsdrv._find_nested_privileged(fd, top_id, top))
        opens = count_calls(monkeypatch, os, "open")
        found = getattr(btrfsdrv, method)(fd, top_id, top)
        open_count = len(opens)
        monkeypatch.undo()

    assert sorted(found) == expected
    assert len(found) == NESTED_LAYOUTS[layout][1]
    assert open_count <= 12 * size


def test_privileged_search_long_paths_linear(fs, monkeypatch):
    depth, count = 25, 40  # 25 levels of 201 bytes: beyond the 4080 bytes INO_LOOKUP returns
    name = b"e" * 200
    top = fs.path("top")
    btrfsdrv.create_subvolume(top)
    make_deep_subvolumes(top, depth, count, name)

    with open_top(top) as (fd, top_id):
        searches = count_calls(monkeypatch, btrfsdrv, "tree_search")
        found = btrfsdrv._find_nested_privileged(fd, top_id, top)
        search_count = len(searches)
        monkeypatch.undo()

    expected = sorted(b"/".join([name] * depth + [b"s%d" % index]) for index in range(count))
    assert nested_paths(found) == expected
    # One search for the refs of each subvolume and one per directory level.
    # Building each path from its directory's refs would take count * depth.
    assert search_count <= 2 * (depth + count)


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
