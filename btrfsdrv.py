"""btrfs layer store for container tooling, in pure Python.

A port of the btrfs graph driver of containers/storage.  A layer is a btrfs
subvolume at ``HOME/subvolumes/ID``, and a child layer is a writable snapshot
of its parent.  A layer may carry a size limit, which a btrfs qgroup enforces
and ``HOME/quotas/ID`` records as a decimal byte count.  Stores are compatible
with Podman, Buildah and CRI-O in both directions.

Everything goes through ``fcntl.ioctl`` and a few libc calls made with ctypes,
so the module needs no compiler, no btrfs-progs and no libbtrfsutil.  The
structures and request numbers come from ``ioctl_structs``, which
``make vendor`` inlines to produce a single file.

    >>> import btrfsdrv
    >>> with btrfsdrv.Driver("/var/lib/mystore/btrfs") as driver:
    ...     driver.create("base")
    ...     driver.create_read_write("container", "base", storage_opt={"size": "1G"})
    ...     path = driver.get("container")
"""

# Annotations stay unevaluated strings, which keeps the typing subscripts of
# every signature out of the import time.
from __future__ import annotations

import collections
import ctypes
import enum
import errno
import fcntl
import functools
import io
import os
import re
import shlex
import stat
import struct
import sys
import threading
import time
from typing import (
    Any, Callable, IO, Iterable, Iterator, Mapping, NamedTuple, Sequence, TYPE_CHECKING, Union,
)

# tools/vendor.py replaces the lines from here to "end of ioctl_structs" with
# the module itself, so the vendored single file needs no import.
import ioctl_structs as _structs
from ioctl_structs import (
    BTRFS_EMPTY_SUBVOL_DIR_OBJECTID, BTRFS_FIRST_FREE_OBJECTID, BTRFS_INODE_REF_KEY,
    BTRFS_QGROUP_LIMIT_MAX_RFER, BTRFS_QGROUP_STATUS_FLAG_ON, BTRFS_QGROUP_STATUS_FLAG_SIMPLE_MODE,
    BTRFS_QGROUP_STATUS_KEY, BTRFS_QGROUP_LIMIT_KEY, BTRFS_QUOTA_CTL_ENABLE,
    BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA, BTRFS_QUOTA_TREE_OBJECTID,
    BTRFS_ROOT_REF_KEY, BTRFS_ROOT_TREE_OBJECTID, BTRFS_SUBVOL_RDONLY,
    BTRFS_SUPER_MAGIC,
    btrfs_ioctl_fs_info_args, btrfs_ioctl_get_subvol_info_args,
    btrfs_ioctl_get_subvol_rootref_args, btrfs_ioctl_ino_lookup_args,
    btrfs_ioctl_ino_lookup_user_args, btrfs_ioctl_qgroup_create_args,
    btrfs_ioctl_qgroup_limit_args, btrfs_ioctl_quota_ctl_args,
    btrfs_ioctl_search_args, btrfs_ioctl_search_header,
    btrfs_inode_ref, btrfs_ioctl_vol_args, btrfs_ioctl_vol_args_v2, btrfs_qgroup_limit_item,
    btrfs_qgroup_status_item, btrfs_root_ref,
)
# end of ioctl_structs

if TYPE_CHECKING:
    # Only for annotations: the layer diff functions import lzma and tarfile when they run.
    import lzma
    import tarfile
    from types import TracebackType

    from _typeshed import WriteableBuffer

__version__ = "0.1.0"

__all__ = [
    "Driver", "init", "DriverError", "PrerequisiteError", "IDMap", "DiskUsage",
    "Change", "ChangeKind",
    "create_subvolume", "create_snapshot", "delete_subvolume", "is_subvolume",
    "subvolume_id", "parse_size", "main", "__version__",
]



class _LazyLogger:
    """The "btrfsdrv" logger, with the logging module imported only when it is needed.

    Until some code imports logging, no handler or level can have been
    configured, so a debug record would be dropped anyway and is skipped.
    Warnings and errors import logging, whose last-resort handler prints
    them to stderr as usual.  Importing logging costs several milliseconds,
    which would be most of the import time of this module.
    """

    __slots__ = ()

    def _logger(self, required: bool) -> Any:
        if "logging" not in sys.modules and not required:
            return None
        import logging

        return logging.getLogger("btrfsdrv")

    def debug(self, message: str, *args: Any) -> None:
        logger = self._logger(False)
        if logger is not None:
            logger.debug(message, *args, stacklevel=2)

    def info(self, message: str, *args: Any) -> None:
        logger = self._logger(False)
        if logger is not None:
            logger.info(message, *args, stacklevel=2)

    def warning(self, message: str, *args: Any) -> None:
        self._logger(True).warning(message, *args, stacklevel=2)

    def error(self, message: str, *args: Any) -> None:
        self._logger(True).error(message, *args, stacklevel=2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger(True), name)


log = _LazyLogger()

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

_U64_MAX = 2**64 - 1
_NAME_MAX = 255
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# mount(2) and umount2(2) flags from linux/mount.h; identical on every architecture.
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2


# -- Public types and errors ---------------------------------------------------


class DriverError(Exception):
    """Base of the errors that btrfsdrv raises for its own reasons."""


class PrerequisiteError(DriverError):
    """Home is not on btrfs, or the kernel lacks something the driver needs."""


class IDMap(NamedTuple):
    """One range of a user-namespace ID map, as in /proc/PID/uid_map."""

    container_id: int
    host_id: int
    size: int


class DiskUsage(NamedTuple):
    """Bytes in non-directory files and the number of distinct inodes of a layer."""

    size: int
    inode_count: int


# -- libc and ioctl helpers ----------------------------------------------------

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    """Load libc once, without ctypes.util.find_library (it spawns ldconfig or gcc)."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p,
        ]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        _libc = libc
    return _libc


def _os_error(err: int | None, operation: str, path: Any, hint: str = "") -> OSError:
    """Build the OSError subclass for errno err with a message naming the operation.

    err is an OSError's errno, which is None for an OSError raised without
    one; that case is reported as EIO.
    """
    if err is None:
        err = errno.EIO
    message = f"{operation} failed: {os.strerror(err)}"
    if hint:
        message = f"{message}; {hint}"
    return OSError(err, message, os.fsdecode(path) if path is not None else None)


def _ioctl(fd: int, request: int, args: Any, operation: str, path: Any) -> None:
    """Run one ioctl on fd, retrying EINTR, and raise OSError naming operation and path."""
    while True:
        try:
            fcntl.ioctl(fd, request, args)
            return
        except InterruptedError:
            continue
        except OSError as error:
            raise _os_error(error.errno, operation, path) from None


def _libc_call(result: int, operation: str, path: Any) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise _os_error(err, operation, path)


def _statfs_type(path: PathArg) -> int:
    """Return f_type of statfs(2) for path (the filesystem's magic number)."""
    buffer = ctypes.create_string_buffer(256)
    _libc_call(_get_libc().statfs(os.fsencode(path), buffer), "statfs", path)
    # f_type is the first field of struct statfs: a long everywhere except
    # s390x, where it is an unsigned int.
    if os.uname().machine.startswith("s390"):
        return ctypes.c_uint.from_buffer(buffer).value
    return ctypes.c_ulong.from_buffer(buffer).value & 0xFFFFFFFF


def _mount(source: bytes | None, target: PathArg, flags: int, operation: str) -> None:
    _libc_call(_get_libc().mount(source, os.fsencode(target), None, flags, None), operation, target)


def _umount(target: PathArg, flags: int) -> None:
    _libc_call(_get_libc().umount2(os.fsencode(target), flags), "umount2", target)


def _open_directory(path: PathArg, dir_fd: int | None = None) -> int:
    """Open a directory without following a final symlink."""
    return os.open(path, _OPEN_DIRECTORY, dir_fd=dir_fd)


class _Fd:
    """A file descriptor closed on exit from a with-block."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc_info: Any) -> None:
        os.close(self.fd)


class _OptionalFd:
    """A file descriptor or None, closed on exit from a with-block."""

    __slots__ = ("fd",)

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __enter__(self) -> int | None:
        return self.fd

    def __exit__(self, *exc_info: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _encode_name(name: PathArg, limit: int, what: str) -> bytes:
    encoded = os.fsencode(name)
    if not encoded or b"/" in encoded or b"\0" in encoded or encoded in (b".", b".."):
        raise ValueError(
            f"invalid {what} {name!r}: it must be a single path component, not empty, "
            "'.' or '..', without '/' or NUL"
        )
    if len(encoded) > limit:
        raise ValueError(f"invalid {what} {name!r}: it is {len(encoded)} bytes, the maximum is {limit}")
    return encoded


# -- Low-level subvolume operations -------------------------------------------


def _subvolume_create_at(dir_fd: int, name: bytes, path: Any) -> None:
    args = btrfs_ioctl_vol_args()
    args.name = name
    _ioctl(dir_fd, _structs.BTRFS_IOC_SUBVOL_CREATE, args, "create subvolume", path)
    log.debug("created subvolume %s", os.fsdecode(path))


def _snapshot_create_at(source_fd: int, dir_fd: int, name: bytes, read_only: bool, path: Any) -> None:
    args = btrfs_ioctl_vol_args_v2()
    args.fd = source_fd
    args.flags = BTRFS_SUBVOL_RDONLY if read_only else 0
    args.name = name
    _ioctl(dir_fd, _structs.BTRFS_IOC_SNAP_CREATE_V2, args, "create snapshot", path)
    log.debug("created %ssnapshot %s", "read-only " if read_only else "", os.fsdecode(path))


def _subvolume_destroy_at(dir_fd: int, name: bytes, path: Any) -> None:
    args = btrfs_ioctl_vol_args()
    args.name = name
    _ioctl(dir_fd, _structs.BTRFS_IOC_SNAP_DESTROY, args, "delete subvolume", path)
    log.debug("deleted subvolume %s", os.fsdecode(path))


def _subvolume_id_of_fd(fd: int, path: Any) -> int:
    """Return the id of the subvolume that contains fd (no privilege needed)."""
    args = btrfs_ioctl_ino_lookup_args()
    args.objectid = BTRFS_FIRST_FREE_OBJECTID
    _ioctl(fd, _structs.BTRFS_IOC_INO_LOOKUP, args, "look up subvolume id", path)
    return int(args.treeid)


def _subvolume_flags(fd: int, path: Any) -> int:
    flags = ctypes.c_uint64()
    _ioctl(fd, _structs.BTRFS_IOC_SUBVOL_GETFLAGS, flags, "read subvolume flags", path)
    return int(flags.value)


def _set_subvolume_flags(fd: int, flags: int, path: Any) -> None:
    value = ctypes.c_uint64(flags)
    _ioctl(fd, _structs.BTRFS_IOC_SUBVOL_SETFLAGS, value, "set subvolume flags", path)
    log.debug("set subvolume flags of %s to %#x", os.fsdecode(path), flags)


def _clear_read_only(fd: int, path: Any) -> None:
    flags = _subvolume_flags(fd, path)
    if flags & BTRFS_SUBVOL_RDONLY:
        _set_subvolume_flags(fd, flags & ~BTRFS_SUBVOL_RDONLY, path)


def _fs_info(fd: int, path: Any) -> Any:
    args = btrfs_ioctl_fs_info_args()
    _ioctl(fd, _structs.BTRFS_IOC_FS_INFO, args, "read filesystem info", path)
    return args


def _subvolume_info(fd: int, path: Any) -> Any:
    """Return GET_SUBVOL_INFO of the subvolume containing fd (kernel 4.18+, no privilege)."""
    args = btrfs_ioctl_get_subvol_info_args()
    _ioctl(fd, _structs.BTRFS_IOC_GET_SUBVOL_INFO, args, "read subvolume info", path)
    return args


def _format_uuid(raw: Any) -> str:
    """Format a 16-byte UUID field of a kernel structure as 8-4-4-4-12 hex."""
    import uuid

    return str(uuid.UUID(bytes=bytes(raw)))


def _is_subvolume_stat(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_FIRST_FREE_OBJECTID


def _is_snapshot_placeholder(st: os.stat_result) -> bool:
    """Return whether st is the placeholder that a snapshot has for a nested subvolume.

    A snapshot does not contain the nested subvolumes of its source. The
    kernel shows an empty directory with inode number 2 in place of each one,
    and a chown of it changes nothing. Linux 6.18 gives it the owner that
    the directory holding it had when the kernel loaded the placeholder,
    while kernels whose new_simple_dir() sets no owner show 0:0. Other btrfs
    inode numbers start at 256. The root directory of an ext4 mount has inode
    number 2 too, so callers check for mounts, as every layer walk does.
    """
    return stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_EMPTY_SUBVOL_DIR_OBJECTID


# -- Tree search ---------------------------------------------------------------


class SearchItem(NamedTuple):
    """One item that BTRFS_IOC_TREE_SEARCH returned: its key, generation and bytes."""

    objectid: int
    type: int
    offset: int
    transid: int
    data: bytes


def _next_key(objectid: int, key_type: int, offset: int) -> tuple[int, int, int] | None:
    if offset < _U64_MAX:
        return objectid, key_type, offset + 1
    if key_type < 255:
        return objectid, key_type + 1, 0
    if objectid < _U64_MAX:
        return objectid + 1, 0, 0
    return None


def tree_search(
    fd: int,
    tree_id: int,
    min_key: tuple[int, int, int] = (0, 0, 0),
    max_key: tuple[int, int, int] = (_U64_MAX, 255, _U64_MAX),
    *,
    min_transid: int = 0,
    max_transid: int = _U64_MAX,
    path: Any = None,
    max_item_size: int | None = None,
) -> Iterator[SearchItem]:
    """Yield the items of a btrfs tree whose keys lie in [min_key, max_key].

    Keys are (objectid, type, offset) tuples compared as a whole, as the
    kernel does, so callers filter on type themselves.  min_transid skips tree
    blocks older than that generation; items of a newer leaf all come back,
    changed or not.  Needs CAP_SYS_ADMIN: EPERM otherwise.

    A caller that knows the largest item in the range passes max_item_size,
    which saves the final empty search.  The kernel stops a batch early only
    when the next item does not fit in the buffer, so a batch that left room
    for one more such item reached the end of the range.
    """
    args = btrfs_ioctl_search_args()
    key = args.key
    key.tree_id = tree_id
    key.max_objectid, key.max_type, key.max_offset = max_key
    key.min_transid = min_transid
    key.max_transid = max_transid
    start: tuple[int, int, int] | None = min_key
    header_size = ctypes.sizeof(btrfs_ioctl_search_header)

    while start is not None:
        key.min_objectid, key.min_type, key.min_offset = start
        key.nr_items = 4096
        _ioctl(fd, _structs.BTRFS_IOC_TREE_SEARCH, args, "search btrfs tree", path)
        if key.nr_items == 0:
            return
        buffer = bytes(args.buf)
        offset = 0
        for _ in range(key.nr_items):
            header = btrfs_ioctl_search_header.from_buffer_copy(buffer, offset)
            offset += header_size
            yield SearchItem(
                int(header.objectid), int(header.type), int(header.offset),
                int(header.transid), buffer[offset:offset + header.len],
            )
            offset += header.len
        full = key.nr_items == 4096 or offset + header_size + (max_item_size or 0) > len(buffer)
        if max_item_size is not None and not full:
            return
        start = _next_key(int(header.objectid), int(header.type), int(header.offset))
        if start is not None and start > max_key:
            return


# -- Nested subvolumes ----------------------------------------------------------


class NestedSubvolume(NamedTuple):
    """A subvolume below another one: its id, its parent's id and its path below the top."""

    id: int
    parent_id: int
    path: bytes


# More levels than this in a chain of INODE_REF items means the references
# form a loop, which a consistent filesystem never has.
_MAX_DIRECTORY_DEPTH = 1 << 20


def _directory_ref(fd: int, tree_id: int, inode: int, path: Any) -> tuple[int, bytes] | None:
    """Return the parent inode and the name of directory inode (CAP_SYS_ADMIN); None when it has none."""
    # A directory has exactly one INODE_REF: (inode, INODE_REF, parent inode).
    items = tree_search(fd, tree_id, (inode, BTRFS_INODE_REF_KEY, 0),
                        (inode, BTRFS_INODE_REF_KEY, _U64_MAX), path=path)
    item = next((item for item in items if item.type == BTRFS_INODE_REF_KEY), None)
    if item is None:
        return None
    header = ctypes.sizeof(btrfs_inode_ref)
    ref = btrfs_inode_ref.from_buffer_copy(item.data)
    return item.offset, item.data[header:header + ref.name_len]


def _directory_paths(fd: int, tree_id: int, directories: set[int], path: Any) -> dict[int, bytes]:
    """Return the path of each directory inode inside subvolume tree_id, with a trailing slash.

    The root directory of the subvolume gives b"", and a directory deleted
    meanwhile is left out. Each directory costs one tree search
    (CAP_SYS_ADMIN) the first time that a walk up passes it. A walk stops at
    the first directory already passed, so time and memory follow the
    number of directories passed plus the length of the returned paths.
    INO_LOOKUP would walk every level of every path in the kernel, and
    fails beyond BTRFS_INO_LOOKUP_PATH_MAX (4080) bytes.
    """
    # inode -> (the path of a directory at or below it, the length of its own path in that one)
    prefixes: dict[int, tuple[bytes, int]] = {BTRFS_FIRST_FREE_OBJECTID: (b"", 0)}
    unreachable: set[int] = set()  # inodes whose chain of refs ends before the root
    paths: dict[int, bytes] = {}
    for directory in directories:
        chain: list[tuple[int, bytes]] = []  # (inode, name) from directory upwards
        inode = directory
        while inode not in prefixes and inode not in unreachable and len(chain) <= _MAX_DIRECTORY_DEPTH:
            ref = _directory_ref(fd, tree_id, inode, path)
            if ref is None:
                break
            chain.append((inode, ref[1]))
            inode = ref[0]
        if inode not in prefixes:
            unreachable.add(inode)
            unreachable.update(node for node, _ in chain)
            continue  # deleted while we looked
        known, length = prefixes[inode]
        full = known[:length] + b"".join(name + b"/" for _, name in reversed(chain))
        end = len(full)
        for node, name in chain:
            prefixes[node] = (full, end)
            end -= len(name) + 1
        paths[directory] = full
    return paths


def _child_refs_privileged(fd: int, parent_id: int, path: Any) -> Iterator[tuple[int, bytes]]:
    """Yield (child id, path below parent) from the ROOT_REF items of parent_id."""
    header = ctypes.sizeof(btrfs_root_ref)
    items = tree_search(
        fd, BTRFS_ROOT_TREE_OBJECTID,
        (parent_id, BTRFS_ROOT_REF_KEY, 0), (parent_id, BTRFS_ROOT_REF_KEY, _U64_MAX),
        path=path, max_item_size=header + _NAME_MAX,
    )
    refs = []  # (child id, directory inode, name)
    for item in items:
        if item.type != BTRFS_ROOT_REF_KEY:
            continue
        ref = btrfs_root_ref.from_buffer_copy(item.data)
        refs.append((item.offset, int(ref.dirid), item.data[header:header + ref.name_len]))
    directory_paths = _directory_paths(fd, parent_id, {dirid for _, dirid, _ in refs}, path)
    for child_id, dirid, name in refs:
        directory = directory_paths.get(dirid)
        if directory is not None:  # None: the directory was deleted after the search, so the subvolume moved
            yield child_id, directory + name


def _child_refs_unprivileged(subvolume_fd: int, path: Any) -> Iterator[tuple[int, bytes]]:
    """Yield (child id, path below the subvolume of subvolume_fd) without CAP_SYS_ADMIN.

    GET_SUBVOL_ROOTREF returns at most 255 refs per call and EOVERFLOW when
    there are more; INO_LOOKUP_USER (kernel 4.18+) names each one relative to
    subvolume_fd, which must be the subvolume's root directory.

    NOTE: INO_LOOKUP_USER walks up the directory's path in the kernel for
    every ref, so each subvolume costs time in proportion to its depth. A
    directory path that does not fit in BTRFS_INO_LOOKUP_USER_PATH_MAX (3824)
    bytes fails with ENAMETOOLONG, and find_nested_subvolumes then walks the
    layer instead.
    """
    args = btrfs_ioctl_get_subvol_rootref_args()
    while True:
        overflow = False
        try:
            _ioctl(subvolume_fd, _structs.BTRFS_IOC_GET_SUBVOL_ROOTREF, args,
                   "list nested subvolumes", path)
        except OSError as error:
            if error.errno != errno.EOVERFLOW:
                raise
            overflow = True
        refs = [(int(args.rootref[i].treeid), int(args.rootref[i].dirid)) for i in range(args.num_items)]
        for tree_id, dirid in refs:
            lookup = btrfs_ioctl_ino_lookup_user_args()
            lookup.dirid = dirid
            lookup.treeid = tree_id
            _ioctl(subvolume_fd, _structs.BTRFS_IOC_INO_LOOKUP_USER, lookup,
                   "look up nested subvolume name", path)
            yield tree_id, bytes(lookup.path) + bytes(lookup.name)
        if not overflow:
            return


def _nested_parts(relative: bytes) -> list[str]:
    """Split the path of a nested subvolume, as the kernel lists it, into components for _DirectoryOpener."""
    return _path_parts(os.fsdecode(relative))


def _tree_order_key(relative: bytes) -> bytes:
    """Return the sort key that puts paths in depth-first order.

    NUL sorts before every byte that a name can contain, so each directory
    comes right before its own subtree, and the subtree is contiguous.
    """
    return relative.replace(b"/", b"\0")


def _in_tree_order(nested: Iterable[NestedSubvolume]) -> list[NestedSubvolume]:
    """Return nested sorted depth-first by path, so parents come before children.

    A _DirectoryOpener reaches paths in this order, or in its reverse, with
    a number of opens that follows the number of directories on the paths.
    In the kernel's listing order (by subvolume id) it can take one open per
    component of every path.
    """
    return sorted(nested, key=lambda subvolume: _tree_order_key(subvolume.path))


def _open_nested_top(directories: _DirectoryOpener, relative: bytes) -> tuple[int, int] | None:
    """Open the parent directory and the top of the subvolume at relative, or return None when either is missing.

    Returns (parent fd, top fd). The parent fd belongs to the opener and
    stays open until its next call. The caller closes the other and checks
    that it is on the expected mount. The opener's cursor stays in the
    parent directory, where the next subvolume in tree order is often found.
    """
    parent_path, _, name = relative.rpartition(b"/")
    try:
        parent_fd = directories.open(_nested_parts(parent_path), os.fsdecode(parent_path))
    except ValueError:
        return None  # a component is not a directory
    if parent_fd is None:
        return None
    try:
        return parent_fd, _open_directory(name, dir_fd=parent_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None


# errno values of an ioctl that the running kernel does not implement.
_IOCTL_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)


def find_nested_subvolumes(top_fd: int, top_id: int, path: Any = None) -> list[NestedSubvolume]:
    """Return every subvolume below top_id, parents before children.

    Reads the kernel's root refs: TREE_SEARCH of the root tree when the caller
    has CAP_SYS_ADMIN, otherwise GET_SUBVOL_ROOTREF and INO_LOOKUP_USER from
    each subvolume's own directory.  No file of the layer is read, unless the
    caller is unprivileged and the kernel lacks those two ioctls (before Linux
    4.18) or a subvolume lies below a directory path longer than
    INO_LOOKUP_USER returns: then every directory is walked.
    """
    try:
        return _find_nested_privileged(top_fd, top_id, path)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EACCES):
            raise
    try:
        return _find_nested_unprivileged(top_fd, top_id, path)
    except OSError as error:
        # ENAMETOOLONG: a directory path longer than INO_LOOKUP_USER can return.
        if error.errno not in _IOCTL_UNSUPPORTED + (errno.ENAMETOOLONG,):
            raise
        log.debug("listing nested subvolumes of %s by walking it: %s", os.fsdecode(path or b"?"), error)
    return _find_nested_by_walk(top_fd, top_id, path)


def _find_nested_privileged(top_fd: int, top_id: int, path: Any) -> list[NestedSubvolume]:
    found: list[NestedSubvolume] = []
    queue: list[tuple[int, bytes]] = [(top_id, b"")]
    while queue:
        parent_id, parent_path = queue.pop(0)
        for child_id, relative in _child_refs_privileged(top_fd, parent_id, path):
            child_path = parent_path + b"/" + relative if parent_path else relative
            found.append(NestedSubvolume(child_id, parent_id, child_path))
            queue.append((child_id, child_path))
    return found


def _find_nested_unprivileged(top_fd: int, top_id: int, path: Any) -> list[NestedSubvolume]:
    found: list[NestedSubvolume] = []
    # Subvolumes are entered depth-first by path, so that the opener reaches
    # each one from the last with few opens however deep both are.
    stack = [NestedSubvolume(top_id, 0, b"")]
    with _DirectoryOpener(top_fd) as directories:
        while stack:
            children = _list_children_unprivileged(directories, stack.pop(), path)
            found.extend(children)
            stack.extend(reversed(_in_tree_order(children)))
    return found


def _list_children_unprivileged(directories: _DirectoryOpener, parent: NestedSubvolume,
                                path: Any) -> list[NestedSubvolume]:
    """Return the subvolumes directly below parent, or none when its path no longer leads to it."""
    if parent.path:
        opened = _open_nested_top(directories, parent.path)
        if opened is None:
            return []
        parent_fd = opened[1]
    else:
        parent_fd = os.dup(directories.root_fd)
    with _Fd(parent_fd):
        if _subvolume_id_of_fd(parent_fd, path) != parent.id:
            return []
        children = []
        for child_id, relative in _child_refs_unprivileged(parent_fd, path):
            child_path = parent.path + b"/" + relative if parent.path else relative
            children.append(NestedSubvolume(child_id, parent.id, child_path))
        return children


def _find_nested_by_walk(top_fd: int, top_id: int, path: Any) -> list[NestedSubvolume]:
    found: list[NestedSubvolume] = []
    enclosing: list[NestedSubvolume] = []  # the subvolumes that contain the last one found, outermost first
    with _DirectoryOpener(top_fd) as directories:
        for relative in sorted(find_nested_subvolumes_by_walk(top_fd, path), key=_tree_order_key):
            opened = _open_nested_top(directories, relative)
            if opened is None:
                continue  # removed or replaced since the walk
            with _Fd(opened[1]) as fd:
                subvolume_id = _subvolume_id_of_fd(fd, path)
            # In depth-first order the nearest enclosing subvolume is the
            # innermost of those that contain the last one found.
            while enclosing and not relative.startswith(enclosing[-1].path + b"/"):
                enclosing.pop()
            parent_id = enclosing[-1].id if enclosing else top_id
            subvolume = NestedSubvolume(subvolume_id, parent_id, relative)
            found.append(subvolume)
            enclosing.append(subvolume)
    return found


def find_nested_subvolumes_by_walk(top_fd: int, path: Any = None) -> list[bytes]:
    """Return the paths of subvolumes below top_fd found by walking its directories.

    This is the fallback for where the kernel cannot list root refs; it reads
    every directory, so it costs time in proportion to the tree.
    """
    found: list[bytes] = []

    def visit(fd: int, relative: _WalkPath, entries: list[Any]) -> list[bytes]:
        subdirectories = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                name = os.fsencode(entry.name)
                # readdir reports a subvolume's id as its inode number, so
                # only stat shows the root directory's inode 256.
                if entry.stat(follow_symlinks=False).st_ino == BTRFS_FIRST_FREE_OBJECTID:
                    found.append(relative.child(entry.name).relative_bytes())
                subdirectories.append(name)
        return subdirectories

    walk_tree(top_fd, visit, path=path)
    return found


# -- Walking layer contents ------------------------------------------------------


class _WalkPath:
    """A path in a walked tree, as a name and the _WalkPath of the directory that contains it.

    A walk keeps one per level, so its memory grows with the depth, where
    full path strings for every level would grow with its square. The string
    is built on demand by str() or os.fspath(), for messages and for callers
    that need it. It joins the names with "/", starting with the root's name.
    """

    __slots__ = ("parent", "name")

    def __init__(self, parent: _WalkPath | None, name: str) -> None:
        self.parent = parent
        self.name = name

    def child(self, name: str) -> _WalkPath:
        return _WalkPath(self, name)

    def __str__(self) -> str:
        names = []
        node: _WalkPath | None = self
        while node is not None:
            names.append(node.name)
            node = node.parent
        names.reverse()
        return "/".join(names)

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return repr(str(self))

    def __bool__(self) -> bool:
        """Return False for the root when its name is empty, as for an empty path string."""
        return self.parent is not None or bool(self.name)

    def relative_bytes(self) -> bytes:
        """Return the path below a root named "" without the leading "/": b"" for the root, b"a/b" below it."""
        return os.fsencode(str(self))[1:]


class _PathBelow:
    """The path of a walked entry below a directory given as a string, built only when formatted."""

    __slots__ = ("top", "walked")

    def __init__(self, top: str, walked: _WalkPath) -> None:
        self.top = top
        self.walked = walked

    def __str__(self) -> str:
        return self.top + str(self.walked)

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return repr(str(self))


def _mount_id(fd: int) -> int | None:
    """Return the mount id of fd from /proc/self/fdinfo (Linux 3.15+), None if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as fdinfo:
            for line in fdinfo:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def walk_tree(
    top_fd: int,
    visit: Any,
    leave: Any = None,
    *,
    path: Any = None,
    skip_mounts: bool = False,
    repair_permissions: bool = False,
    repairs: _RemovalRepairs | None = None,
) -> None:
    """Walk the directories below top_fd depth-first, without following symlinks.

    visit(fd, relative, entries) is called for every directory with an open
    descriptor, its _WalkPath below a root named "" (false for the top, and
    relative.relative_bytes() is b"a/b" for a/b) and its os.DirEntry list,
    and returns the names of the subdirectories to enter.
    leave(parent_fd, name, stat) is called after a subdirectory was walked.

    Only one directory is open at a time: the walk climbs back with ".." and
    checks that it reaches the directory it came from, so trees deeper than
    PATH_MAX or than the open-file limit are walked too.  A directory on
    another mount (a bind mount inside a layer) is skipped with skip_mounts,
    and otherwise raises EBUSY instead of being entered.  With
    repair_permissions, a directory the caller owns but may not enter gets
    owner rwx (removal needs this without CAP_DAC_OVERRIDE), and with
    repairs a read-only flag in the way is cleared too, both recorded there.
    An OSError from
    visit or leave names the full path of the entry it was about.
    NOTE: below a bind mount, such as the driver's home, an openat of ".."
    took time in proportion to the depth (137 µs at 20,000 levels on Linux
    6.18), so the climb makes a walk of a long chain take time in proportion
    to the square of its depth.
    """
    top_mount = _mount_id(top_fd)
    fd = os.dup(top_fd)
    relative = _WalkPath(None, "")
    # One entry per ancestor of the directory open now: its stat, its path,
    # its subdirectories still to walk, and the name of the child walked now.
    stack: list[tuple[os.stat_result, _WalkPath, list[bytes], bytes]] = []
    try:
        pending = _visit_directory(fd, relative, visit, path)
        while True:
            if pending:
                name = pending.pop()
                try:
                    child = _enter_directory(fd, name, top_mount, path, skip_mounts,
                                             _Repair(relative, repairs) if repair_permissions else None)
                except PermissionError as error:
                    raise _with_full_path(error, path, relative, name) from None
                if child is None:
                    continue
                stack.append((os.fstat(fd), relative, pending, name))
                os.close(fd)
                fd = child
                relative = relative.child(os.fsdecode(name))
                pending = _visit_directory(fd, relative, visit, path)
                continue
            if not stack:
                return
            child_st = os.fstat(fd)
            parent_st, relative, pending, name = stack.pop()
            parent = _open_directory(b"..", dir_fd=fd)
            os.close(fd)
            fd = parent
            if not os.path.samestat(os.fstat(fd), parent_st):
                raise _os_error(errno.ESTALE, "walk layer", path,
                                "a directory was moved during the walk; run the operation again")
            if leave is not None:
                try:
                    leave(fd, name, child_st)
                except OSError as error:
                    raise _with_full_path(error, path, relative, name) from None
    finally:
        os.close(fd)


def _visit_directory(fd: int, relative: _WalkPath, visit: Any, path: Any) -> list[bytes]:
    try:
        with os.scandir(fd) as iterator:
            entries = list(iterator)
        return list(visit(fd, relative, entries))
    except OSError as error:
        raise _with_full_path(error, path, relative, error.filename) from None


def _with_full_path(error: OSError, path: Any, relative: _WalkPath, name: Any) -> OSError:
    """Return error with its filename made a full path below path (the walk's top)."""
    parts = [os.fsencode(path if path is not None else ".")]
    if relative:
        parts.append(relative.relative_bytes())
    if isinstance(name, (str, bytes)) and name and not os.fsencode(name).startswith(b"/"):
        parts.append(os.fsencode(name))
    full = os.fsdecode(b"/".join(parts))
    # The class is kept, so callers still tell _InodeFlagError from other errors.
    return type(error)(error.errno, error.strerror, full)


class _Repair(NamedTuple):
    """The state that walk_tree passes to _make_owner_accessible: the walk's position and the removal's repairs."""

    relative: _WalkPath
    repairs: _RemovalRepairs | None


def _enter_directory(
    fd: int, name: bytes, top_mount: int | None, path: Any, skip_mounts: bool, repair: _Repair | None,
) -> int | None:
    """Open subdirectory name of fd; None when it is gone, no longer a directory or skipped."""
    try:
        child = _open_directory(name, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        if repair is None or not _repair_owner_access(fd, name, path, repair):
            raise
        return _enter_directory(fd, name, top_mount, path, skip_mounts, None)
    except OSError as error:
        if error.errno == errno.ELOOP:  # replaced by a symlink since it was listed
            return None
        raise
    if top_mount is not None and _mount_id(child) != top_mount:
        os.close(child)
        if skip_mounts:
            return None
        raise _os_error(errno.EBUSY, "walk layer", path,
                        f"{os.fsdecode(name)} is a mount point inside the layer; unmount it first")
    if repair is not None and _lacks_owner_access(child):
        # It opened, but without search or write permission the walk could
        # neither enter it nor delete its entries.
        os.close(child)
        _repair_owner_access(fd, name, path, repair)
        return _enter_directory(fd, name, top_mount, path, skip_mounts, None)
    return child


def _repair_owner_access(fd: int, name: bytes, path: Any, repair: _Repair) -> bool:
    """Give the caller's subdirectory name of fd owner rwx for a walk (see _make_owner_accessible)."""
    walked = repair.relative.child(os.fsdecode(name))
    where = _PathBelow(os.fsdecode(path if path is not None else "."), walked)
    return _make_owner_accessible(fd, name, repair.repairs, where, walked)


def _lacks_owner_access(fd: int) -> bool:
    """Return whether the directory fd is the caller's, lacks owner write or search permission, and may get them.

    Root, also in a user namespace, searches and writes its own directories
    whatever their mode. An immutable or append-only directory keeps its
    mode, and the removal reports its flags.
    """
    uid = os.geteuid()
    if uid == 0:
        return False
    st = os.fstat(fd)
    return st.st_uid == uid and st.st_mode & 0o300 != 0o300 and not _blocking_inode_flags(fd)


# -- File-by-file removal -----------------------------------------------------

_FS_IMMUTABLE_FL = 0x00000010
_FS_APPEND_FL = 0x00000020


def _inode_flags(fd: int) -> int | None:
    """Return the inode flags of fd (FS_IOC_GETFLAGS), None on a filesystem without them."""
    # The kernel reads and writes an int, although the request number
    # encodes sizeof(long).
    value = ctypes.c_int()
    try:
        fcntl.ioctl(fd, _structs.FS_IOC_GETFLAGS, value)
    except OSError:
        return None
    return value.value


_FLAGS_OPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


def _clear_inode_flags(dir_fd: int, name: str | bytes | None) -> bool:
    """Clear the immutable and append-only flags of name (or of dir_fd itself).

    Return True when a flag was cleared.  Only regular files and directories
    are opened, so a FIFO or device node is never opened for its side effects.
    """
    try:
        if name is None:
            fd = os.dup(dir_fd)
        else:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return False
            fd = os.open(name, _FLAGS_OPEN, dir_fd=dir_fd)
    except OSError:
        return False
    with _Fd(fd):
        flags = _inode_flags(fd)
        if flags is None or not flags & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
            return False
        try:
            fcntl.ioctl(fd, _structs.FS_IOC_SETFLAGS, ctypes.c_int(flags & ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL)))
        except OSError:
            return False
    log.debug("cleared immutable and append-only flags of %s", os.fsdecode(name or b"."))
    return True


class _SavedInodeFlags:
    """The immutable and append-only flags of an inode, to set again after a removal cleared them.

    An fd of the inode stays open until restore(), so the flags go back on
    the inode that was saved, whatever names it has by then.
    """

    __slots__ = ("fd", "flags")

    def __init__(self, fd: int, flags: int) -> None:
        self.fd = fd
        self.flags = flags

    @classmethod
    def of_fd(cls, fd: int) -> _SavedInodeFlags | None:
        """Save the flags of fd's inode with a duplicate of fd. Return None when it has neither flag."""
        flags = _inode_flags(fd)
        if flags is None or not flags & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
            return None
        return cls(os.dup(fd), flags)

    @classmethod
    def of_file(cls, dir_fd: int, name: str, st: os.stat_result) -> _SavedInodeFlags | None:
        """Save the flags of the regular file name, whose lstat is st.

        Return None when it has neither flag or is no longer the inode of st.
        """
        try:
            fd = os.open(name, _FLAGS_OPEN, dir_fd=dir_fd)
        except OSError:
            return None
        with _Fd(fd):
            if not os.path.samestat(os.fstat(fd), st):
                return None
            return cls.of_fd(fd)

    def restore(self) -> None:
        """Set the saved flags again where they are cleared, and close the fd."""
        with _Fd(self.fd):
            current = _inode_flags(self.fd)
            cleared = self.flags & (_FS_IMMUTABLE_FL | _FS_APPEND_FL) & ~(current or 0)
            if current is None or not cleared:
                return
            path = _describe_fd(self.fd)
            _ioctl(self.fd, _structs.FS_IOC_SETFLAGS, ctypes.c_int(current | cleared),
                   "set immutable and append-only flags again", path)
        log.debug("set the immutable and append-only flags of %s again", path)


_CAP_LINUX_IMMUTABLE = 9
_FULL_IDENTITY_MAP = [b"0", b"0", b"4294967295"]


def _may_change_inode_flags() -> bool:
    """Return whether this process may set or clear the immutable and append-only flags.

    The kernel checks CAP_LINUX_IMMUTABLE in the initial user namespace, so
    root of another namespace (unshare -Ur) lacks it. A uid_map that maps all
    ids to themselves is taken as the initial namespace, as runc does.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            effective = next((int(line.split()[1], 16) for line in status if line.startswith(b"CapEff:")), 0)
        with open("/proc/self/uid_map", "rb") as uid_map:
            ranges = uid_map.read().split()
    except (OSError, ValueError, IndexError):
        return False
    return bool(effective >> _CAP_LINUX_IMMUTABLE & 1) and ranges == _FULL_IDENTITY_MAP


class _InodeFlagError(PermissionError):
    """EPERM because an immutable or append-only inode blocks a removal or a snapshot."""


def _inode_flag_error(flags: int, where: Any, operation: str = "delete subvolume",
                      retry: str = "remove again") -> _InodeFlagError:
    """Return the error for where, whose immutable or append-only flag (in flags) blocks operation."""
    names = [name for bit, name in ((_FS_IMMUTABLE_FL, "immutable"), (_FS_APPEND_FL, "append-only")) if flags & bit]
    letters = "".join(letter for bit, letter in ((_FS_IMMUTABLE_FL, "i"), (_FS_APPEND_FL, "a")) if flags & bit)
    where = os.fsdecode(where)
    message = (f"{operation} failed: {os.strerror(errno.EPERM)}; {where} has the {' and '.join(names)} "
               f"flag{'s' if len(names) > 1 else ''}, which only root on the host can clear: "
               f"run chattr -{letters} {shlex.quote(where)} as root, then {retry}")
    return _InodeFlagError(errno.EPERM, message, where)


def _blocking_inode_flags(fd: int) -> int:
    """Return the immutable and append-only flags of fd, 0 when it has neither."""
    return (_inode_flags(fd) or 0) & (_FS_IMMUTABLE_FL | _FS_APPEND_FL)


def _flag_error_at(dir_fd: int, name: bytes, path: Any) -> _InodeFlagError | None:
    """Return the error for the flag that stops the kernel from unlinking directory name, None without one.

    The kernel rejects the unlink when the directory or dir_fd, the
    directory it is unlinked from, is immutable or append-only. path names name.
    """
    try:
        fd = _open_directory(name, dir_fd=dir_fd)
    except OSError:
        fd = None
    if fd is not None:
        with _Fd(fd):
            flags = _blocking_inode_flags(fd)
        if flags:
            return _inode_flag_error(flags, path)
    flags = _blocking_inode_flags(dir_fd)
    if flags:
        return _inode_flag_error(flags, os.path.dirname(os.fsdecode(path)) or ".")
    return None


def _make_owner_accessible(
    dir_fd: int, name: str | bytes | None, repairs: _RemovalRepairs | None = None, where: Any = None,
    walked: _WalkPath | None = None,
) -> bool:
    """Add owner read, write and search permission to directory name (or dir_fd itself).

    Return True when the mode changed.  Only a directory that the caller owns
    and that lacks one of those bits is changed, so an unprivileged owner can
    delete read-only and mode-0 directories, as root can without this.  With
    repairs, the read-only flag of a subvolume in the way is cleared, and the
    old mode is recorded with walked, the directory's path below the layer's
    top (see _RemovalRepairs).  where is the directory's path for messages.
    """
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(b"." if name is None else name, flags, dir_fd=dir_fd)
    except OSError:
        return False
    with _Fd(fd):
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o700 == 0o700:
            return False
        if where is None:
            where = os.path.join(_describe_fd(dir_fd), os.fsdecode(name)) if name is not None else _describe_fd(fd)

        # fchmod rejects O_PATH descriptors, and the /proc link reaches the
        # opened inode itself, never a symlink swapped in since.
        def chmod() -> None:
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | 0o700)

        if name is None:
            _chmod_for_owner(chmod, dir_fd, 0, where, repairs)
        elif st.st_dev == os.fstat(dir_fd).st_dev:
            _chmod_for_owner(chmod, dir_fd, 1, where, repairs)
        else:
            _chmod_subvolume_top_for_owner(chmod, fd, where, repairs)
        if repairs is not None and walked is not None:
            repairs.record_mode(walked, st)
    log.debug("made %s accessible to its owner", os.fsdecode(name or b"."))
    return True


def _chmod_for_owner(
    chmod: Callable[[], None], fd: int, depth: int, where: Any, repairs: _RemovalRepairs | None,
) -> None:
    """Run chmod, which gives the owner access to the directory at where, clearing a read-only flag in its way.

    fd is a directory in the same subvolume as that directory, depth levels
    above it. chmod fails with EROFS in a read-only subvolume. Then, with
    repairs, the subvolume's read-only flag is cleared and chmod runs again.
    """
    if _chmod_unless_read_only(chmod, where):
        return
    _clear_read_only_for_owner(fd, depth, where, repairs)
    _chmod_again(chmod, where)


def _chmod_subvolume_top_for_owner(
    chmod: Callable[[], None], path_fd: int, where: Any, repairs: _RemovalRepairs | None,
) -> None:
    """Run chmod for the top directory of a subvolume, open at the O_PATH descriptor path_fd, as _chmod_for_owner.

    Clearing the read-only flag needs a descriptor that the ioctl accepts,
    which only read permission on the directory gives.
    """
    if _chmod_unless_read_only(chmod, where):
        return
    try:
        top_fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        raise _os_error(errno.EROFS, "give the owner access to the directory", where,
                        "it is the top directory of a read-only subvolume and denies its owner read permission, "
                        "so only root can change its mode or its read-only flag; remove the layer as root") from None
    with _Fd(top_fd):
        _clear_read_only_for_owner(top_fd, 0, where, repairs)
    _chmod_again(chmod, where)


def _chmod_unless_read_only(chmod: Callable[[], None], where: Any) -> bool:
    """Run chmod and return True; return False when it fails with EROFS, and raise for other failures."""
    try:
        chmod()
    except OSError as error:
        if error.errno != errno.EROFS:
            raise _permission_repair_error(error, where) from None
        return False
    return True


def _chmod_again(chmod: Callable[[], None], where: Any) -> None:
    """Run chmod after a read-only flag in its way was cleared."""
    try:
        chmod()
    except OSError as error:
        raise _permission_repair_error(error, where) from None


def _clear_read_only_for_owner(fd: int, depth: int, where: Any, repairs: _RemovalRepairs | None) -> None:
    """Clear the read-only flag of the subvolume holding fd, which is depth levels above the directory at where.

    Raise the error for a failed chmod of that directory when the mount is
    read-only, when repairs is None, or when the flag does not clear. A flag
    that is clear already (another process cleared it) is left as it is.
    """
    operation = "give the owner access to the directory"
    if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
        raise _os_error(errno.EROFS, operation, where,
                        "the filesystem is mounted read-only; remount it read-write, then remove again")
    if _is_subvolume_stat(os.fstat(fd)):
        # fd is the subvolume's top, and ".." would need search permission on it.
        top_fd, levels = os.dup(fd), 0
    else:
        top_fd, levels = _open_device_top_and_depth(fd)
    with _Fd(top_fd):
        subvolume = str(where).rsplit("/", depth + levels)[0] if depth + levels else str(where)
        if not _subvolume_flags(top_fd, subvolume) & BTRFS_SUBVOL_RDONLY:
            return
        hint = (f"it is in the read-only subvolume {subvolume}; run btrfs property set {shlex.quote(subvolume)} "
                "ro false as its owner, or remove the layer as root")
        if repairs is None:
            raise _os_error(errno.EROFS, operation, where, hint)
        try:
            repairs.clear(top_fd, subvolume)
        except OSError as error:
            if error.errno == errno.EMFILE:
                hint = ("the remove keeps a descriptor of each read-only subvolume that it makes writable, and "
                        "this process reached its open-file limit; raise it (ulimit -n), or remove the layer "
                        "as root")
            raise _os_error(error.errno, operation, where, hint) from None


def _unlink_at(dir_fd: int, name: str | bytes, is_dir: bool) -> None:
    """Unlink name (rmdir when is_dir), clearing chattr +i/+a flags when they block it."""
    for attempt in range(2):
        try:
            if is_dir:
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
            return
        except PermissionError:
            changed = _clear_inode_flags(dir_fd, name) | _clear_inode_flags(dir_fd, None)
            if attempt or not (changed | _make_owner_accessible(dir_fd, None)):
                raise


def _unlink_file(dir_fd: int, name: str) -> None:
    """Unlink a non-directory as _remove_tree does by default."""
    _unlink_at(dir_fd, name, is_dir=False)


def _remove_contents(top_fd: int, path: Any, unlink: Callable[[int, str], None] | None = None) -> None:
    """Delete everything below top_fd, never following a symlink or entering a mount.

    Nested subvolumes met on the way are emptied and removed with rmdir, and
    read-only ones are made writable first. unlink(dir_fd, name), when
    given, removes each non-directory in place of _unlink_at. The walk keeps
    one directory open at a time, so any depth works.
    """

    def visit(fd: int, relative: _WalkPath, entries: list[Any]) -> list[bytes]:
        st = os.fstat(fd)
        if st.st_ino == BTRFS_FIRST_FREE_OBJECTID:
            try:
                _clear_read_only(fd, path)
            except OSError:
                pass  # not a btrfs subvolume, or not ours to change: unlink reports it
        subdirectories = []
        for entry in entries:
            name = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(name)
                continue
            try:
                if unlink is None:
                    _unlink_at(fd, name, is_dir=False)
                else:
                    unlink(fd, entry.name)
            except FileNotFoundError:
                pass
        return subdirectories

    walk_tree(top_fd, visit, _remove_walked_directory, path=path, repair_permissions=True)


def _remove_walked_directory(parent_fd: int, name: bytes, child_st: os.stat_result) -> None:
    """rmdir name below parent_fd if it is still the directory that was emptied."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if os.path.samestat(st, child_st):
        _unlink_at(parent_fd, name, is_dir=True)


# -- Mount table ---------------------------------------------------------------


def _unescape_mountinfo(field: bytes) -> bytes:
    """Decode the octal escapes (\\040 for a space) that /proc/self/mountinfo uses."""
    if b"\\" not in field:
        return field
    return re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match.group(1), 8)]), field)


class MountInfo(NamedTuple):
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    device: str
    root: bytes
    mount_point: bytes


def _parse_mountinfo(text: bytes) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        mounts.append(MountInfo(
            int(fields[0]), int(fields[1]), fields[2].decode(),
            _unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4]),
        ))
    return mounts


class _MountTable:
    """The parsed /proc/self/mountinfo, read again only after the table changed.

    The kernel flags an open mountinfo file with POLLPRI when a mount or
    unmount happens in its mount namespace (Linux 2.6.15 and later), so an
    unchanged table costs one poll(2) in place of a read and a parse.  A
    child process after fork() opens its own file, because a shared file
    offset would mix the two processes' reads.

    NOTE: the open file stays bound to the mount namespace it was opened in,
    so a process that calls unshare(CLONE_NEWNS) or setns() afterwards must
    call invalidate().
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._file: Any | None = None
        self._poller: Any | None = None
        self._pid = 0
        self._mounts: list[MountInfo] | None = None

    def mounts(self) -> list[MountInfo]:
        with self._lock:
            if self._file is None or self._poller is None or self._pid != os.getpid():
                self._open()
            elif self._poller.poll(0):
                self._mounts = None
            if self._mounts is None:
                self._mounts = _parse_mountinfo(self._read_all())
            return self._mounts

    def invalidate(self) -> None:
        """Close the file, so that the next read opens it in the current namespace."""
        with self._lock:
            if self._file is not None and self._pid == os.getpid():
                self._file.close()
            self._file = None
            self._mounts = None

    def _open(self) -> None:
        import select

        self._file = open("/proc/self/mountinfo", "rb", buffering=0)
        self._pid = os.getpid()
        self._poller = select.poll()
        self._poller.register(self._file, select.POLLPRI)
        self._mounts = None

    def _read_all(self) -> bytes:
        assert self._file is not None
        self._file.seek(0)
        chunks: list[bytes] = []
        while True:
            chunk = self._file.read(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


_mount_table = _MountTable()


def _read_mountinfo() -> list[MountInfo]:
    return _mount_table.mounts()


def _mount_points_below(directory: bytes, include_self: bool = True) -> list[bytes]:
    """Return mount points at (when include_self) or below directory."""
    prefix = directory.rstrip(b"/") + b"/"
    points = []
    for mount in _read_mountinfo():
        if mount.mount_point.startswith(prefix) or (include_self and mount.mount_point == directory):
            points.append(mount.mount_point)
    return points


def _check_no_mounts_below(fd: int, operation: str, path: Any) -> None:
    """Raise EBUSY when anything is mounted below the directory fd.

    Paths inside a layer are resolved one component at a time, and opening
    a mount point enters the mounted tree, so the operations that read or
    write a layer's contents start with this check.
    """
    directory = os.readlink(f"/proc/self/fd/{fd}")
    mounts = _mount_points_below(os.fsencode(directory), include_self=False)
    if mounts:
        raise _os_error(errno.EBUSY, operation, path,
                        f"{os.fsdecode(mounts[0])} is mounted inside it; unmount it first")


def _check_same_mount(top_fd: int, fd: int, operation: str, path: Any) -> None:
    """Raise EBUSY when fd was reached through a mount point below top_fd."""
    top_mount = _mount_id(top_fd)
    if top_mount is not None and _mount_id(fd) != top_mount:
        raise _os_error(errno.EBUSY, operation, path, "it is a mount point or lies behind one; unmount it first")


def _check_mount_boundary(parent_fd: int, child_fd: int, operation: str, path: Any) -> None:
    """Raise EBUSY when child_fd, opened by name from parent_fd, is on another mount.

    This catches a mount made after the operation's first check. A nested
    subvolume or a mount has another st_dev, and only then are mount ids read.
    """
    if os.fstat(child_fd).st_dev != os.fstat(parent_fd).st_dev:
        _check_same_mount(parent_fd, child_fd, operation, path)


def _is_mount_point(directory: bytes) -> bool:
    return any(mount.mount_point == directory for mount in _read_mountinfo())


# -- Quota and qgroups -----------------------------------------------------------


def _quota_status(fd: int, path: Any) -> Any | None:
    """Return the quota tree's status item, or None when quota is off."""
    try:
        for item in tree_search(
            fd, BTRFS_QUOTA_TREE_OBJECTID,
            (0, BTRFS_QGROUP_STATUS_KEY, 0), (0, BTRFS_QGROUP_STATUS_KEY, _U64_MAX),
            path=path,
        ):
            if item.type == BTRFS_QGROUP_STATUS_KEY:
                status = btrfs_qgroup_status_item()
                size = min(len(item.data), ctypes.sizeof(status))
                ctypes.memmove(ctypes.addressof(status), item.data, size)
                return status
    except FileNotFoundError:  # no quota tree: quota was never enabled
        return None
    return None


def _quota_enabled_from_sysfs(fd: int, path: Any) -> bool:
    """Report quota state without CAP_SYS_ADMIN (sysfs qgroups directory, kernel 5.9+)."""
    fsid = _format_uuid(_fs_info(fd, path).fsid)
    return os.path.isdir(f"/sys/fs/btrfs/{fsid}/qgroups")


def quota_enabled(fd: int, path: Any = None) -> bool:
    """Return whether btrfs quota is on for the filesystem of fd."""
    try:
        status = _quota_status(fd, path)
    except PermissionError:
        return _quota_enabled_from_sysfs(fd, path)
    return status is not None and bool(status.flags & BTRFS_QGROUP_STATUS_FLAG_ON)


# Values of /sys/fs/btrfs/FSID/qgroups/mode (Linux 6.7 and newer) as btrfs.quota_mode names them.
_SYSFS_QUOTA_MODES = {"qgroup": "full", "squota": "simple"}


def _quota_mode(fd: int, path: Any = None) -> str | None:
    """Return the quota mode of the filesystem of fd, "full" or "simple", or None when quota is off."""
    try:
        status = _quota_status(fd, path)
    except PermissionError:
        return _quota_mode_from_sysfs(fd, path)
    if status is None or not status.flags & BTRFS_QGROUP_STATUS_FLAG_ON:
        return None
    return "simple" if status.flags & BTRFS_QGROUP_STATUS_FLAG_SIMPLE_MODE else "full"


def _quota_mode_from_sysfs(fd: int, path: Any) -> str | None:
    """Read the quota mode without CAP_SYS_ADMIN. Kernels before 6.7 have no mode file and only full quotas."""
    if not _quota_enabled_from_sysfs(fd, path):
        return None
    fsid = _format_uuid(_fs_info(fd, path).fsid)
    try:
        with open(f"/sys/fs/btrfs/{fsid}/qgroups/mode") as mode_file:
            mode = mode_file.read().strip()
    except FileNotFoundError:
        return "full"
    return _SYSFS_QUOTA_MODES.get(mode, mode)


def _qgroup_limit_from_sysfs(fd: int, qgroup_id: int, path: Any) -> int | None:
    """Return the referenced-bytes limit of qgroup 0/qgroup_id from sysfs, None when unknown or unset.

    /sys/fs/btrfs/FSID/qgroups/0_ID/max_referenced is readable without
    CAP_SYS_ADMIN and exists only while quota is on.
    """
    try:
        fsid = _format_uuid(_fs_info(fd, path).fsid)
        with open(f"/sys/fs/btrfs/{fsid}/qgroups/0_{qgroup_id}/max_referenced", "rb") as limit_file:
            text = limit_file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _enable_quota(fd: int, simple: bool, path: Any) -> None:
    args = btrfs_ioctl_quota_ctl_args()
    args.cmd = BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA if simple else BTRFS_QUOTA_CTL_ENABLE
    mode = "simple quota" if simple else "quota"
    try:
        _ioctl(fd, _structs.BTRFS_IOC_QUOTA_CTL, args, f"enable btrfs {mode}", path)
    except OSError as error:
        if error.errno == errno.EPERM:
            raise _os_error(error.errno, f"enable btrfs {mode}", path,
                            "this needs CAP_SYS_ADMIN in the initial user namespace") from None
        if simple and error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            raise PrerequisiteError(
                f"the kernel {os.uname().release} rejected btrfs simple quotas on "
                f"{os.fsdecode(path)} ({os.strerror(error.errno)}): they need Linux 6.7 "
                "or newer; use btrfs.quota_mode=full"
            ) from None
        raise
    log.debug("enabled btrfs %s on %s", mode, os.fsdecode(path))


def _set_qgroup_limit(fd: int, qgroup_id: int, max_rfer: int | None, path: Any) -> None:
    """Set (or with max_rfer None, clear) the referenced-bytes limit of qgroup 0/qgroup_id.

    fd must not be inside the limited subvolume: the ioctl starts a
    transaction charged to fd's subvolume, which fails with EDQUOT when that
    subvolume is already over its limit.
    """
    args = btrfs_ioctl_qgroup_limit_args()
    args.qgroupid = qgroup_id
    args.lim.flags = BTRFS_QGROUP_LIMIT_MAX_RFER
    # The kernel clears a limit when it is given as (u64)-1 with its flag set.
    args.lim.max_rfer = _U64_MAX if max_rfer is None else max_rfer
    try:
        _ioctl(fd, _structs.BTRFS_IOC_QGROUP_LIMIT, args, "set qgroup limit", path)
    except PermissionError:
        raise _os_error(errno.EPERM, "set qgroup limit", path,
                        "size limits need CAP_SYS_ADMIN in the initial user namespace; "
                        "create the layer without a size") from None
    log.debug("set limit of qgroup 0/%d (%s) to %s", qgroup_id, os.fsdecode(path),
              "none" if max_rfer is None else max_rfer)


def _set_layer_limit(home_fd: int, qgroup_id: int, size: int, path: Any) -> None:
    """Set the limit of qgroup 0/qgroup_id, re-creating the qgroup if it was destroyed."""
    try:
        _set_qgroup_limit(home_fd, qgroup_id, size, path)
    except FileNotFoundError:
        _create_qgroup(home_fd, qgroup_id, path)
        _set_qgroup_limit(home_fd, qgroup_id, size, path)


def _create_qgroup(fd: int, qgroup_id: int, path: Any) -> None:
    args = btrfs_ioctl_qgroup_create_args()
    args.create = 1
    args.qgroupid = qgroup_id
    _ioctl(fd, _structs.BTRFS_IOC_QGROUP_CREATE, args, "create qgroup", path)
    log.debug("created qgroup 0/%d", qgroup_id)


def _destroy_qgroup(fd: int, qgroup_id: int, path: Any) -> None:
    """Destroy qgroup 0/qgroup_id, treating one that is gone or still busy as done.

    Kernels since 6.x refuse (EBUSY) to destroy the qgroup of a subvolume that
    is deleted but not yet cleaned, and delete that qgroup themselves later.
    """
    args = btrfs_ioctl_qgroup_create_args()
    args.create = 0
    args.qgroupid = qgroup_id
    try:
        _ioctl(fd, _structs.BTRFS_IOC_QGROUP_CREATE, args, "destroy qgroup", path)
    except OSError as error:
        if error.errno in (errno.EBUSY, errno.ENOENT, errno.EINVAL):
            return
        raise
    log.debug("destroyed qgroup 0/%d", qgroup_id)


def _qgroup_limit(fd: int, qgroup_id: int, path: Any) -> int | None:
    """Return the max_rfer limit of qgroup 0/qgroup_id, or None when it has none."""
    for item in tree_search(
        fd, BTRFS_QUOTA_TREE_OBJECTID,
        (0, BTRFS_QGROUP_LIMIT_KEY, qgroup_id), (0, BTRFS_QGROUP_LIMIT_KEY, qgroup_id),
        path=path,
    ):
        limit = btrfs_qgroup_limit_item.from_buffer_copy(item.data.ljust(ctypes.sizeof(btrfs_qgroup_limit_item), b"\0"))
        if limit.flags & BTRFS_QGROUP_LIMIT_MAX_RFER:
            return int(limit.max_rfer)
    return None


# -- Sizes, options and ids ----------------------------------------------------

# Compiled on first use (re caches it), not at import.
_SIZE_PATTERN = r"([0-9]+\.?[0-9]*|\.[0-9]+) ?(?:([kmgtp])(?:i?b)?|b)?"
_SIZE_MULTIPLIERS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_SIZE_LIMIT = 2**63


def parse_size(value: str) -> int:
    """Parse a size the way Docker's RAMInBytes does and return whole bytes.

    A decimal number (1.5, .5 and 5. allowed), an optional space, then an
    optional suffix b, or k m g t p optionally followed by b or ib, all powers
    of 1024 and case-insensitive.  Raise ValueError for anything else and for
    sizes of 2**63 bytes or more.
    """
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}: expected a string such as '10G'")
    # A valid size below 2**63 bytes has at most 19 digits.  Far longer input
    # would only make int() raise its own digit-limit error.
    match = re.fullmatch(_SIZE_PATTERN, value, re.IGNORECASE | re.ASCII) if len(value) <= 64 else None
    if match is None:
        raise ValueError(
            f"invalid size {value!r}: use a number with an optional unit b, k, m, g, t or p "
            "(powers of 1024), such as 512m or 1.5G"
        )
    number, unit = match.groups()
    multiplier = _SIZE_MULTIPLIERS.get((unit or "").lower(), 1)
    if number.isdigit():
        size = int(number) * multiplier
    else:
        # Exact decimals; imported here to keep the import fast.
        from fractions import Fraction

        size = int(Fraction(number) * multiplier)
    if size >= _SIZE_LIMIT:
        raise ValueError(f"invalid size {value!r}: it must be less than 2**63 bytes")
    return size


def validate_layer_id(layer_id: Any) -> bytes:
    """Return the layer id as bytes or raise ValueError naming it."""
    if not isinstance(layer_id, (str, bytes)):
        raise ValueError(f"invalid layer id {layer_id!r}: expected a string")
    return _encode_name(layer_id, _NAME_MAX, "layer id")


def _check_new_layer_id(name: bytes, layer_id: Any) -> None:
    """Raise ValueError for an id that only existing layers may have.

    containers/storage records layer ids in layers.json, and Go's
    encoding/json replaces bytes that are not UTF-8 with U+FFFD, so such an
    id would not survive in a containers/storage store. An id shaped like
    the driver's temporary files would have its quota file deleted by init.
    """
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"invalid layer id {layer_id!r}: it is not valid UTF-8, which containers/storage "
                         "needs to record it; use an id of UTF-8 text") from None
    if _TEMPORARY_NAME.fullmatch(name):
        raise ValueError(f"invalid layer id {layer_id!r}: it has the form of the driver's temporary files "
                         "(.NAME.<12 hex digits>.tmp); choose another id")


class _Options(NamedTuple):
    min_space: int
    default_size: int | None
    quota_required: bool
    quota_mode: str


def _split_option(option: str) -> tuple[str, str]:
    if not isinstance(option, str) or "=" not in option:
        raise ValueError(f"invalid driver option {option!r}: expected KEY=VALUE")
    key, value = option.split("=", 1)
    return key.strip().lower(), value.strip()


def parse_options(options: Iterable[str]) -> _Options:
    """Parse the driver options (btrfs.min_space, btrfs.size, btrfs.quota_mode)."""
    if isinstance(options, (str, bytes)):
        raise ValueError(f"invalid driver options {options!r}: expected a list of KEY=VALUE strings")
    min_space = 0
    default_size = None
    quota_required = False
    quota_mode = "full"
    for option in options:
        key, value = _split_option(option)
        if key == "btrfs.min_space":
            min_space = parse_size(value)
            quota_required = True
        elif key == "btrfs.size":
            default_size = parse_size(value)
            quota_required = True
        elif key == "btrfs.quota_mode":
            if value.lower() not in ("full", "simple"):
                raise ValueError(f"invalid btrfs.quota_mode {value!r}: use full or simple")
            quota_mode = value.lower()
        elif key == "btrfs.mountopt":
            raise ValueError(
                f"invalid driver option {option!r}: btrfs layers are subvolumes and take "
                "no mount options; remove btrfs.mountopt"
            )
        else:
            raise ValueError(
                f"unknown driver option {option!r}: btrfs takes btrfs.min_space, "
                "btrfs.size and btrfs.quota_mode"
            )
    if default_size is not None and (default_size <= 0 or default_size < min_space):
        raise ValueError(
            f"invalid btrfs.size {default_size}: it must be greater than 0 and at least "
            f"btrfs.min_space ({min_space} bytes)"
        )
    return _Options(min_space, default_size, quota_required, quota_mode)


def parse_storage_opt(storage_opt: Mapping[str, str] | None) -> int | None:
    """Return the size limit requested by a layer's storage options, if any."""
    if not storage_opt:
        return None
    if not isinstance(storage_opt, Mapping):
        raise ValueError(f"invalid storage options {storage_opt!r}: expected a mapping such as {{'size': '10G'}}")
    size = None
    for key, value in storage_opt.items():
        if not isinstance(key, str) or key.strip().lower() != "size":
            raise ValueError(f"unknown storage option {key!r}: btrfs layers take only 'size'")
        size = parse_size(value.strip() if isinstance(value, str) else value)
    return size


_ID_MAX = 2**32 - 2


def _id_maps(maps: Iterable[Any] | None, what: str) -> list[IDMap] | None:
    if maps is None:
        return None
    result = []
    for entry in maps:
        try:
            mapping = IDMap(*entry)
        except TypeError:
            raise ValueError(f"invalid {what} entry {entry!r}: expected (container_id, host_id, size)") from None
        if any(not isinstance(value, int) or value < 0 for value in mapping) or mapping.size == 0:
            raise ValueError(f"invalid {what} entry {entry!r}: ids and size must be non-negative integers, size > 0")
        # Ids are 32-bit, and chown(2) reads (uid_t)-1 as "leave the id unchanged".
        if max(mapping.container_id, mapping.host_id) + mapping.size - 1 > _ID_MAX:
            raise ValueError(f"invalid {what} entry {entry!r}: ids must stay at or below {_ID_MAX}")
        result.append(mapping)
    return result


def _host_id(maps: Sequence[IDMap] | None, container_id: int, what: str) -> int:
    """Map a container id to the host id, as containers/storage's idtools does."""
    if maps is None:
        return container_id
    for mapping in maps:
        if mapping.container_id <= container_id < mapping.container_id + mapping.size:
            return mapping.host_id + container_id - mapping.container_id
    raise ValueError(f"{what} does not map container id {container_id}; add a range that includes it")


# -- Quota files -------------------------------------------------------------------


# Bytes read from a quota file. A valid one has at most 19 significant
# digits, but Go's strconv.ParseUint, which containers/storage reads it
# with, also takes leading zeros.
_QUOTA_FILE_MAX = 4096
# Reads of a quota file in one get while other processes change it; see Driver._sync_limit.
_LIMIT_SYNC_ATTEMPTS = 3
_TEMPORARY_SUFFIX = ".tmp"


def _read_quota_file(quotas_fd: int | None, name: bytes, path: str) -> int | None:
    """Return the byte count in quotas/name, None when it is missing or invalid.

    The file is opened without following a symlink and without blocking, and
    anything but a regular file holding decimal digits below 2**63 (spaces
    around them allowed) is logged as a warning and ignored.
    """
    if quotas_fd is None:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=quotas_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning("ignoring quota file %s: %s", path, error.strerror)
        return None
    with _Fd(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("ignoring quota file %s: it is not a regular file", path)
            return None
        text = os.read(fd, _QUOTA_FILE_MAX + 1)
    if len(text) > _QUOTA_FILE_MAX:
        log.warning("ignoring quota file %s: it is longer than %d bytes", path, _QUOTA_FILE_MAX)
        return None
    stripped = text.strip()
    if not stripped.isdigit() or not stripped.isascii() or int(stripped) >= _SIZE_LIMIT:
        log.warning("ignoring quota file %s: it must contain a decimal byte count below 2**63, found %r",
                    path, text)
        return None
    return int(stripped)


# Names of temporary files, as _temporary_name makes them; init deletes unlocked ones.
_TEMPORARY_NAME = re.compile(rb"\..*\.[0-9a-f]{12}\.tmp", re.DOTALL)


def _temporary_name(name: bytes) -> bytes:
    """Return a unique name ".NAME.RANDOM.tmp" that _remove_stale_temporary_files recognizes.

    NAME is cut to 200 bytes so that the result fits NAME_MAX (255 bytes).
    """
    return b".%s.%s%s" % (name[:200], os.urandom(6).hex().encode(), _TEMPORARY_SUFFIX.encode())


def _open_locked_temporary(directory_fd: int, temporary: bytes) -> tuple[int, bool]:
    """Open a new file for writing in directory_fd, locked (flock) before anyone can open it.

    Return the descriptor and whether the file already has the name
    temporary.  With O_TMPFILE the file has no name until _link_temporary
    gives it one, so no other process can see it unlocked.  Filesystems and
    kernels without O_TMPFILE get a file created under temporary and locked
    right after; _remove_stale_temporary_files may delete such a file in
    between, which then fails the write with ENOENT.
    """
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=directory_fd)
        named = False
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o644, dir_fd=directory_fd)
        named = True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        if named:
            os.unlink(temporary, dir_fd=directory_fd)
        raise
    return fd, named


def _link_temporary(fd: int, directory_fd: int, temporary: bytes) -> None:
    """Give the O_TMPFILE file open as fd the name temporary in directory_fd.

    linkat with AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH, so the link
    goes through /proc/self/fd, which needs /proc mounted.
    """
    os.link(f"/proc/self/fd/{fd}", temporary, dst_dir_fd=directory_fd, follow_symlinks=True)


def _write_file_atomically(directory_fd: int, name: bytes, data: bytes, path: str) -> None:
    """Write name below directory_fd: temporary file, fsync, rename, fsync of the directory.

    Creating a subvolume commits its transaction, so without the fsyncs a
    power loss soon after a create could keep the layer and lose its quota
    file, leaving the layer without its limit.  The temporary file is
    locked (flock) whenever it has a name, so a process that finds it
    unlocked can conclude that its writer died and may delete it.
    """
    temporary = _temporary_name(name)
    try:
        fd, named = _open_locked_temporary(directory_fd, temporary)
        try:
            # A short write would leave a torn file behind the rename.
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
            if not named:
                _link_temporary(fd, directory_fd, temporary)
                named = True
            os.rename(temporary, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
        except BaseException:
            if named:
                try:
                    os.unlink(temporary, dir_fd=directory_fd)
                except FileNotFoundError:
                    pass
            raise
        finally:
            os.close(fd)
        os.fsync(directory_fd)
    except OSError as error:
        raise _os_error(error.errno, "write quota file", path) from None


def _remove_stale_temporary_files(directory_fd: int, directory: str) -> None:
    """Delete temporary files below directory_fd whose writer died before renaming them.

    A file is stale when no process holds its lock (flock).  Entries with a
    temporary name that are not regular files are left alone with a warning.
    """
    with os.scandir(directory_fd) as iterator:
        names = [entry.name for entry in iterator if _TEMPORARY_NAME.fullmatch(os.fsencode(entry.name))]
    for name in names:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=directory_fd)
        except FileNotFoundError:
            continue
        except OSError as error:
            log.warning("ignoring %s: %s; it is not a temporary file of btrfsdrv, so move it away",
                        os.path.join(directory, name), error.strerror)
            continue
        with _Fd(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                log.warning("ignoring %s: it is not a regular file, so not a temporary file of btrfsdrv; "
                            "move it away", os.path.join(directory, name))
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            try:
                current = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if os.path.samestat(st, current):
                os.unlink(name, dir_fd=directory_fd)
                log.warning("removed %s, left by a process that died while writing it",
                            os.path.join(directory, name))


def _unlink_if_same(dir_fd: int, name: bytes, found: os.stat_result) -> bool:
    """Delete name below dir_fd when it is still the inode found, and return whether it was deleted.

    Quota files are always new inodes (written under a temporary name and
    renamed), so a quota file that another process wrote since is spared.
    NOTE: one renamed onto name between the check and the unlink is deleted.
    """
    try:
        current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not os.path.samestat(found, current):
        return False
    os.unlink(name, dir_fd=dir_fd)
    return True


class _QuotaFileAside:
    """Keep a layer's quota file under a locked temporary name while the layer is deleted.

    Used as a with-block around the delete.  On success the file is
    deleted.  When the delete fails and the layer is still there, the file
    gets its name back.  A remove killed inside the block leaves the file
    under its temporary name and unlocked, so the next Driver init deletes
    it.  NOTE: that also happens when the kill comes before the delete, and
    the surviving layer then has no quota file until it is created again.
    An entry that is not a regular file stays under its name, and so does
    a quota file that could not be renamed, for example on a filesystem
    with no metadata space left.  After the delete such an entry is deleted
    only while it is still the inode found before, because another process
    may then create the id and write its own.
    """

    def __init__(self, quotas_dir: str, name: bytes, layer_path: str) -> None:
        self.quotas_dir = quotas_dir
        self.name = name
        self.layer_path = layer_path
        self.quota_file = os.path.join(quotas_dir, os.fsdecode(name))
        self.quotas_fd: int | None = None
        self.fd: int | None = None
        self.temporary: bytes | None = None
        self.found: os.stat_result | None = None

    def __enter__(self) -> _QuotaFileAside:
        try:
            self._set_aside()
        except OSError as error:
            self._keep_name(error)
        return self

    def _keep_name(self, error: OSError) -> None:
        """Log why _set_aside failed, leaving the entry found, if any, to _delete_found."""
        if self.found is None:
            log.warning("could not stat %s during the remove of its layer: %s; if it outlives the layer, "
                        "delete it by hand", self.quota_file, error.strerror)
            self._close()
            return
        log.warning("could not open and lock %s during the remove of its layer: %s; it is deleted once the "
                    "layer is", self.quota_file, error.strerror)

    def _set_aside(self) -> None:
        try:
            self.quotas_fd = _open_directory(self.quotas_dir)
        except FileNotFoundError:
            return
        try:
            self.found = os.stat(self.name, dir_fd=self.quotas_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(self.found.st_mode):
            return
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        self.fd = os.open(self.name, flags, dir_fd=self.quotas_fd)
        st = os.fstat(self.fd)
        self.found = st
        if not stat.S_ISREG(st.st_mode):
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        # The lock is on the inode opened above, so the rename must move that inode.
        if not os.path.samestat(st, os.stat(self.name, dir_fd=self.quotas_fd, follow_symlinks=False)):
            return
        temporary = _temporary_name(self.name)
        try:
            os.rename(self.name, temporary, src_dir_fd=self.quotas_fd, dst_dir_fd=self.quotas_fd)
        except OSError as error:
            log.warning("could not rename %s to %s during the remove of its layer: %s; it is deleted once the "
                        "layer is", self.quota_file, os.path.join(self.quotas_dir, os.fsdecode(temporary)),
                        error.strerror)
            return
        self.temporary = temporary
        log.debug("renamed %s to %s during the remove of its layer", self.quota_file, os.fsdecode(temporary))

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            layer_deleted = kind is None or not os.path.lexists(self.layer_path)
            if self.temporary is not None:
                if layer_deleted:
                    self._delete()
                else:
                    self._restore()
            elif self.found is not None and layer_deleted:
                self._delete_found()
        finally:
            self._close()

    def _delete(self) -> None:
        assert self.temporary is not None and self.quotas_fd is not None
        temporary = os.path.join(self.quotas_dir, os.fsdecode(self.temporary))
        try:
            os.unlink(self.temporary, dir_fd=self.quotas_fd)
        except OSError as error:
            log.warning("could not delete %s, the quota file of removed layer %s: %s; delete it by hand",
                        temporary, self.layer_path, error.strerror)
            return
        log.debug("removed quota file %s", temporary)

    def _delete_found(self) -> None:
        """Delete the entry found under the quota file's name if it is still there."""
        assert self.found is not None and self.quotas_fd is not None
        try:
            deleted = _unlink_if_same(self.quotas_fd, self.name, self.found)
        except IsADirectoryError:
            log.warning("could not delete %s: it is a directory, not a quota file; delete it by hand",
                        self.quota_file)
            return
        except OSError as error:
            log.warning("could not delete %s, the quota file of removed layer %s: %s; delete it by hand",
                        self.quota_file, self.layer_path, error.strerror)
            return
        if deleted:
            log.debug("removed quota file %s", self.quota_file)

    def _restore(self) -> None:
        assert self.temporary is not None and self.quotas_fd is not None
        temporary = os.path.join(self.quotas_dir, os.fsdecode(self.temporary))
        # A link, unlike a rename, never replaces a quota file that another
        # process wrote under the name meanwhile for a layer of the same id.
        try:
            os.link(self.temporary, self.name, src_dir_fd=self.quotas_fd, dst_dir_fd=self.quotas_fd)
        except FileExistsError:
            log.warning("not renaming %s back to %s after the failed remove: another process wrote a new "
                        "quota file under that name", temporary, self.quota_file)
        except OSError as error:
            log.warning("could not rename %s back to %s after the failed remove: %s; rename it by hand",
                        temporary, self.quota_file, error.strerror)
            return
        else:
            log.debug("renamed %s back to %s after the failed remove", temporary, self.quota_file)
        with _suppress_missing():
            os.unlink(self.temporary, dir_fd=self.quotas_fd)

    def _close(self) -> None:
        for fd in (self.fd, self.quotas_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.quotas_fd = None


# -- SELinux labels ----------------------------------------------------------------


def _selinux_enabled() -> bool:
    return os.path.exists("/sys/fs/selinux/enforce")


def _relabel(layer_fd: int, label: str, path: Any) -> None:
    """Set security.selinux on every entry of the layer, never following symlinks."""
    value = label.encode()

    def visit(fd: int, relative: _WalkPath, entries: list[Any]) -> list[bytes]:
        base = f"/proc/self/fd/{fd}"
        os.setxattr(base, "security.selinux", value)
        subdirectories = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(os.fsencode(entry.name))
            else:
                os.setxattr(f"{base}/{entry.name}", "security.selinux", value, follow_symlinks=False)
        return subdirectories

    walk_tree(layer_fd, visit, path=path)
    log.debug("relabeled %s with %s", os.fsdecode(path), label)


# -- The driver ------------------------------------------------------------------------

# How many times remove lists and deletes nested subvolumes before it gives up
# on a layer whose subvolumes keep moving under it.
_REMOVE_ATTEMPTS = 3


def _check_real_directory(directory: str) -> None:
    """Raise DriverError when directory is a symlink or another non-directory (a missing one is fine)."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise DriverError(
            f"{directory} is not a directory (a symlink or another file is in its place); "
            "move it away so the driver can create the directory"
        )


class Driver:
    """The btrfs graph driver: layers as subvolumes below one home directory.

    Home must be on btrfs.  The driver makes home a private mount (binding it
    onto itself when it is not a mount point) so that mounts made inside
    layers do not propagate, and cleanup() undoes only the bind mount it made.
    """

    name = "btrfs"

    def __init__(
        self,
        home: PathArg,
        options: Iterable[str] = (),
        uid_maps: Iterable[Any] | None = None,
        gid_maps: Iterable[Any] | None = None,
    ) -> None:
        if not os.fspath(home):
            # realpath would turn it into the current directory.
            raise ValueError("invalid home '': it is empty; pass the driver's home directory on btrfs, "
                             "such as /var/lib/containers/storage/btrfs")
        # Resolved once, so that a home reached through a symlink works with
        # the O_NOFOLLOW opens below and with the mount table's paths.
        self.home = os.path.realpath(os.fsdecode(os.fspath(home)))
        self.options = parse_options(options if isinstance(options, (str, bytes)) else list(options))
        self.uid_maps = _id_maps(uid_maps, "uid_maps")
        self.gid_maps = _id_maps(gid_maps, "gid_maps")
        # Without maps, layers belong to root, or to the caller when it is not
        # root (rootless use), as containers/storage owns them by the caller.
        self.root_uid = _host_id(self.uid_maps, 0, "uid_maps") if self.uid_maps is not None else os.geteuid()
        self.root_gid = _host_id(self.gid_maps, 0, "gid_maps") if self.gid_maps is not None else os.getegid()
        self._made_mount = False

        _require_btrfs(self.home)
        self._make_directory(self.home)
        if not os.path.isdir(self.home):
            raise NotADirectoryError(errno.ENOTDIR, "home is not a directory; move the file away or pass "
                                     "another directory as home", self.home)
        self._make_directory(self._subvolumes_dir)
        self._check_layout()
        self._make_private_mount()
        try:
            self._prepare_quotas()
        except BaseException:
            self._cleanup_after_failed_init()
            raise
        log.debug("initialized btrfs driver at %s", self.home)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Driver({self.home!r})"

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.cleanup()

    # -- Layout

    @property
    def _subvolumes_dir(self) -> str:
        return os.path.join(self.home, "subvolumes")

    def _open_subvolumes(self) -> _Fd:
        """Open HOME/subvolumes without following a symlink."""
        _check_real_directory(self._subvolumes_dir)
        return _Fd(_open_directory(self._subvolumes_dir))

    @property
    def _quotas_dir(self) -> str:
        return os.path.join(self.home, "quotas")

    def _layer_dir(self, layer_id: Any) -> str:
        return os.path.join(self._subvolumes_dir, os.fsdecode(validate_layer_id(layer_id)))

    def _quota_file(self, layer_id: Any) -> str:
        return os.path.join(self._quotas_dir, os.fsdecode(validate_layer_id(layer_id)))

    def _check_layout(self) -> None:
        """Raise DriverError when subvolumes or quotas in home is not a real directory.

        Every path below them is trusted not to lead elsewhere, so a symlink
        in their place (which only a writer of home can make) is rejected.
        """
        for directory in (self._subvolumes_dir, self._quotas_dir):
            _check_real_directory(directory)

    def _open_quotas(self, create: bool = False) -> _OptionalFd:
        """Open HOME/quotas without following a symlink; None when it does not exist."""
        if create:
            self._make_directory(self._quotas_dir)
        try:
            return _OptionalFd(_open_directory(self._quotas_dir))
        except FileNotFoundError:
            return _OptionalFd(None)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                hint = "it must be a directory, not a symlink"
            elif error.errno in (errno.EACCES, errno.EPERM):
                hint = "run as root or as the owner of the store"
            else:
                hint = ""
            raise _os_error(error.errno, "open quotas directory", self._quotas_dir, hint) from None

    def _read_quota(self, layer_id: Any) -> int | None:
        name = validate_layer_id(layer_id)
        with self._open_quotas() as quotas_fd:
            return _read_quota_file(quotas_fd, name, self._quota_file(layer_id))

    def _make_directory(self, path: str) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        except FileNotFoundError:
            os.makedirs(path, 0o700, exist_ok=True)
        os.chown(path, self.root_uid, self.root_gid)
        log.debug("created directory %s", path)

    # -- Home mount

    def _home_mount_lock(self) -> _Fd:
        """Lock home's directory (flock) for the mount steps of init and cleanup.

        The kernel has no atomic "bind unless mounted", and umount takes
        whatever mount is on top of home.  Under this lock, btrfsdrv
        processes check, bind and unmount one at a time, so they never stack
        two bind mounts or unmount one made by another btrfsdrv process
        between its bind and MS_PRIVATE.  The lock is on the directory inode,
        which is the same through the bind mount.  Other programs (Podman)
        do not take it; init retries the steps when they race with one.
        """
        fd = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _Fd(fd)

    def _make_private_mount(self) -> None:
        """Bind home onto itself unless it is a mount point, then make it private."""
        home = os.fsencode(self.home)
        attempts = 5
        try:
            with self._home_mount_lock():
                for attempt in range(attempts):
                    try:
                        if not _is_mount_point(home):
                            _mount(home, home, _MS_BIND, "bind mount home onto itself")
                            self._made_mount = True
                            log.debug("bind-mounted %s onto itself", self.home)
                        _mount(None, home, _MS_PRIVATE, "make home a private mount")
                        return
                    except OSError as error:
                        # EINVAL or ENOENT: another program unmounted home
                        # between the check and these calls.
                        if error.errno not in (errno.EINVAL, errno.ENOENT) or attempt == attempts - 1:
                            raise
                        self._made_mount = False
                        log.debug("the mount at %s changed during init; trying again", self.home)
        except PermissionError as error:
            # Without CAP_SYS_ADMIN (rootless use) mounts inside layers are
            # the caller's own, so the store works without a private mount.
            log.info("cannot make %s a private mount, continuing without: %s", self.home, error)

    def _cleanup_after_failed_init(self) -> None:
        """Unmount the bind mount of a failed init, logging a failure so that the init's error stays."""
        try:
            self.cleanup()
        except OSError as error:
            log.warning("could not unmount the bind mount of %s after a failed init: %s; "
                        "run the cleanup command", self.home, error)

    def cleanup(self) -> None:
        """Unmount the bind mount of home that this driver made, if any.

        Quota stays on: it is filesystem-wide and other limits depend on it.
        """
        if not self._made_mount:
            return
        try:
            with self._home_mount_lock():
                _umount(self.home, _MNT_DETACH)
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: no longer mounted
                raise
        self._made_mount = False
        log.debug("unmounted %s", self.home)

    # -- Quota

    def _open_home(self) -> _Fd:
        return _Fd(_open_directory(self.home))

    def _prepare_quotas(self) -> None:
        """Delete stale temporary quota files and turn quota on when an option needs it."""
        with self._open_quotas() as quotas_fd:
            if quotas_fd is not None:
                _remove_stale_temporary_files(quotas_fd, self._quotas_dir)
        if self.options.quota_required:
            self._ensure_quota()

    def _ensure_quota(self, fd: int | None = None) -> None:
        """Turn quota on unless it is on; fd is any directory on home's filesystem."""
        if fd is None:
            with self._open_home() as home_fd:
                self._ensure_quota(home_fd)
            return
        if not quota_enabled(fd, self.home):
            _enable_quota(fd, self.options.quota_mode == "simple", self.home)

    def _apply_limit(self, home_fd: int, layer_fd: int, size: int, path: str) -> None:
        """Set the layer's qgroup limit, turning quota on first when it is off.

        The limit ioctl doubles as the quota check, because it fails with
        ENOTCONN while quota is off, so quota that someone turned off from
        outside is turned on again here.  The limit is set through home_fd,
        any directory of home's own subvolume, because through the layer the
        kernel would charge the ioctl's transaction to the layer's qgroup and
        return EDQUOT once the layer is over its new limit.
        """
        if not _is_subvolume_stat(os.fstat(layer_fd)):
            # The id would be that of the subvolume containing the directory.
            raise _os_error(errno.EINVAL, "set layer limit", path, "the layer is not a subvolume")
        # Through a mount on the layer's directory, the id would be that of
        # the mounted subvolume, which is not the layer's.
        _check_same_mount(home_fd, layer_fd, "set layer limit", path)
        qgroup_id = _subvolume_id_of_fd(layer_fd, path)
        if _qgroup_limit_from_sysfs(home_fd, qgroup_id, path) == size:
            return  # already set; this also spares callers without CAP_SYS_ADMIN the ioctl
        try:
            _set_layer_limit(home_fd, qgroup_id, size, path)
        except OSError as error:
            # Without CAP_SYS_ADMIN the ioctl fails with EPERM before it
            # checks quota, and the attempt to turn quota on then raises an
            # error that names the missing privilege.
            if error.errno not in (errno.ENOTCONN, errno.EPERM):
                raise
            self._ensure_quota(home_fd)
            _set_layer_limit(home_fd, qgroup_id, size, path)

    # -- Create

    def create(
        self,
        layer_id: str,
        parent: str | None = None,
        *,
        mount_label: str = "",
        storage_opt: Mapping[str, str] | None = None,
    ) -> None:
        """Create an image layer: an empty subvolume, or a snapshot of parent."""
        self._create(layer_id, parent, mount_label, storage_opt, read_write=False)

    def create_read_write(
        self,
        layer_id: str,
        parent: str | None = None,
        *,
        mount_label: str = "",
        storage_opt: Mapping[str, str] | None = None,
    ) -> None:
        """Create a container layer; btrfs.size applies when no size is given."""
        self._create(layer_id, parent, mount_label, storage_opt, read_write=True)

    def create_from_template(
        self,
        layer_id: str,
        template: str,
        *,
        parent: str | None = None,
        mount_label: str = "",
        storage_opt: Mapping[str, str] | None = None,
        read_write: bool = False,
    ) -> None:
        """Create a layer with the contents of template: a snapshot of it."""
        if parent is not None:
            validate_layer_id(parent)
        self._create(layer_id, template, mount_label, storage_opt, read_write=read_write)

    def _layer_size(self, storage_opt: Mapping[str, str] | None, read_write: bool) -> int | None:
        size = parse_storage_opt(storage_opt)
        if size is None and read_write:
            size = self.options.default_size
        if size is None:
            return None
        if size <= 0:
            raise ValueError(f"invalid layer size {size}: it must be greater than 0")
        if size < self.options.min_space:
            raise ValueError(
                f"invalid layer size {size}: it is less than btrfs.min_space "
                f"({self.options.min_space} bytes)"
            )
        return size

    def _create(
        self,
        layer_id: str,
        parent: str | None,
        mount_label: str,
        storage_opt: Mapping[str, str] | None,
        read_write: bool,
    ) -> None:
        name = validate_layer_id(layer_id)
        _check_new_layer_id(name, layer_id)
        parent_name = None if parent is None or parent == "" else validate_layer_id(parent)
        size = self._layer_size(storage_opt, read_write)
        path = self._layer_dir(layer_id)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, f"layer {os.fsdecode(name)!r} already exists", path)
        self._check_quota_file_writable(name, size)

        with self._open_subvolumes() as subvolumes_fd:
            if parent_name is None:
                self._create_empty(subvolumes_fd, name, path)
            else:
                self._create_snapshot(subvolumes_fd, parent_name, name, path)
            # The subvolume id distinguishes the one made here from one that a racing
            # remove and create put in its place (st_dev can be reused).
            created = self._subvolume_id_at(subvolumes_fd, name, path)
            try:
                self._finish_layer(subvolumes_fd, name, path, created, size, mount_label,
                                   snapshot=parent_name is not None)
            except BaseException:
                self._roll_back(subvolumes_fd, name, path, created)
                raise

    def _check_quota_file_writable(self, name: bytes, size: int | None) -> None:
        """Raise before a create changes anything when it could not write or delete the layer's quota file.

        HOME/quotas must be a directory.  A directory at HOME/quotas/ID
        blocks only a sized create, because the rename of the new quota file
        fails on it.  A create without a size leaves it with a warning.
        """
        with self._open_quotas() as quotas_fd:
            if quotas_fd is None or size is None:
                return
            try:
                st = os.stat(name, dir_fd=quotas_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
        if stat.S_ISDIR(st.st_mode):
            raise _os_error(errno.EISDIR, "create layer", self._quota_file(name),
                            "the size limit is recorded in this quota file, which is a directory; "
                            "move the directory away")

    def _create_empty(self, subvolumes_fd: int, name: bytes, path: str) -> None:
        try:
            _subvolume_create_at(subvolumes_fd, name, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"layer {os.fsdecode(name)!r} already exists", path) from None

    def _create_snapshot(self, subvolumes_fd: int, parent: bytes, name: bytes, path: str) -> None:
        parent_path = os.path.join(self._subvolumes_dir, os.fsdecode(parent))
        try:
            parent_fd = _open_directory(parent, dir_fd=subvolumes_fd)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"parent layer {os.fsdecode(parent)!r} not found; create it first",
                parent_path) from None
        except OSError as error:
            hint = "the parent must be a layer directory"
            if error.errno == errno.EACCES:
                hint = ("the parent layer's top directory denies this process read or search permission; run "
                        "chmod u+rwx on it as its owner, or create the layer as root")
            raise _os_error(error.errno, f"open parent layer {os.fsdecode(parent)!r}", parent_path, hint) from None
        with _Fd(parent_fd):
            # A snapshot copies the inode flags of the parent's top directory,
            # and an immutable or append-only top would stop _finish_layer and
            # the roll back, leaving a half-made layer.
            flags = _blocking_inode_flags(parent_fd)
            if flags:
                raise _inode_flag_error(flags, parent_path, "create layer", "create the layer again")
            try:
                _snapshot_create_at(parent_fd, subvolumes_fd, name, False, path)
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, f"layer {os.fsdecode(name)!r} already exists", path) from None
            except FileNotFoundError:
                # The kernel returns ENOENT for a source subvolume deleted after it was opened.
                current = _lstat_at(subvolumes_fd, os.fsdecode(parent))
                if current is not None and os.path.samestat(current, os.fstat(parent_fd)):
                    raise
                raise FileNotFoundError(
                    errno.ENOENT, f"parent layer {os.fsdecode(parent)!r} was removed by another process during "
                    "the create; create the parent again", parent_path) from None

    def _finish_layer(self, subvolumes_fd: int, name: bytes, path: str, created: int | None, size: int | None,
                      mount_label: str, snapshot: bool) -> None:
        """Set owner, mode, quota and label of a new layer; its creator rolls back on error.

        created is the subvolume id the create recorded.  When another
        process removed the layer and created one with the same id since,
        this raises ESTALE and leaves that layer alone.  A snapshot keeps
        its parent's root mode and owner, which the parent's tar may have
        set, except that a remapped container root owns it, as in
        containers/storage.
        """
        try:
            layer_fd = _open_directory(name, dir_fd=subvolumes_fd)
        except FileNotFoundError:
            raise _os_error(errno.ESTALE, "create layer", path,
                            "another process removed the layer during the create; create it again") from None
        with _Fd(layer_fd):
            self._check_created_subvolume(layer_fd, path, created)
            st = os.fstat(layer_fd)
            if not snapshot:
                os.fchmod(layer_fd, 0o555)
            owner_wanted = not snapshot or (self.root_uid, self.root_gid) != (0, 0)
            if owner_wanted and (st.st_uid, st.st_gid) != (self.root_uid, self.root_gid):
                try:
                    os.fchown(layer_fd, self.root_uid, self.root_gid)
                except OSError as error:
                    raise _os_error(
                        error.errno, f"change owner of layer to {self.root_uid}:{self.root_gid}", path,
                        "run as root, or pass uid_maps and gid_maps that map container root to your ids",
                    ) from None
            if size is not None:
                # The quota file comes first: a get that finds a limit but no
                # quota file clears the limit as stray.
                with self._open_quotas(create=True) as quotas_fd:
                    assert quotas_fd is not None
                    _write_file_atomically(quotas_fd, name, str(size).encode(), self._quota_file(name))
                log.debug("wrote quota file for %s: %d bytes", path, size)
                try:
                    self._apply_limit(subvolumes_fd, layer_fd, size, path)
                except OSError:
                    # The limit ioctl fails on the qgroup of a removed layer.
                    self._check_not_removed(subvolumes_fd, name, path, created)
                    raise
                self._check_not_removed(subvolumes_fd, name, path, created)
            else:
                # A quota file of this name is a leftover of a killed remove.
                # NOTE: a remove and create of this id by another process
                # after the check above still race with this, and the other
                # layer's quota file is then deleted.
                self._remove_quota_file(name)
                self._clear_inherited_limit(subvolumes_fd, layer_fd, path)
            if mount_label and _selinux_enabled():
                _relabel(layer_fd, mount_label, path)

    def _check_not_removed(self, subvolumes_fd: int, name: bytes, path: str, created: int | None) -> None:
        """Raise ESTALE, deleting the new quota file, when another process removed the layer.

        A remove that ran before the quota file was written could not delete
        it, so the file would outlive its layer. When another layer has the
        id by now, the quota file may be its own and stays.
        """
        current = self._subvolume_id_at(subvolumes_fd, name, path)
        if current == created:
            return
        if current is None:
            self._remove_quota_file(name)
        raise _os_error(errno.ESTALE, "create layer", path,
                        "another process removed the layer during the create; create it again")

    @staticmethod
    def _check_created_subvolume(layer_fd: int, path: str, created: int | None) -> None:
        """Raise ESTALE unless layer_fd is the subvolume with id created."""
        current = _subvolume_id_of_fd(layer_fd, path)
        if current != created:
            raise _os_error(errno.ESTALE, "create layer", path,
                            f"another process removed the new layer and created subvolume {current} "
                            "under the same id; that layer now has the id, so create yours "
                            "under another id or remove that layer first")

    def _clear_inherited_limit(self, subvolumes_fd: int, layer_fd: int, path: str) -> None:
        """Clear a limit a new layer's qgroup kept from a deleted subvolume with its id.

        btrfs reuses the highest subvolume id after a remount, and a qgroup
        the kernel had not yet deleted keeps its limit for the new subvolume.
        """
        try:
            if not quota_enabled(subvolumes_fd, self.home):
                return
            subvolume = _subvolume_id_of_fd(layer_fd, path)
            if _qgroup_limit(subvolumes_fd, subvolume, path) is not None:
                _set_qgroup_limit(subvolumes_fd, subvolume, None, path)
        except PermissionError:
            self._clear_stray_limit(subvolumes_fd, layer_fd, path)

    def _clear_stray_limit(self, home_fd: int, layer_fd: int, path: str) -> None:
        """Clear a qgroup limit that a layer without a quota file has, as sysfs shows it.

        A snapshot's qgroup starts with its source's limit, and a create
        killed before it cleared that limit leaves it. Without CAP_SYS_ADMIN
        the limit stays, with a warning.
        """
        if not _is_subvolume_stat(os.fstat(layer_fd)) or _mount_id(layer_fd) != _mount_id(home_fd):
            return  # a plain directory, or a mount on the layer's directory: not the layer's qgroup
        subvolume = _subvolume_id_of_fd(layer_fd, path)
        limit = _qgroup_limit_from_sysfs(home_fd, subvolume, path)
        if limit is None:
            return
        try:
            _set_qgroup_limit(home_fd, subvolume, None, path)
        except PermissionError:
            log.warning("layer %s has a limit of %d bytes but no quota file; clearing it needs CAP_SYS_ADMIN: "
                        "run btrfs qgroup limit none 0/%d %s as root", path, limit, subvolume, path)

    @staticmethod
    def _subvolume_id_at(dir_fd: int, name: bytes, path: str) -> int | None:
        """Return the id of the subvolume at name below dir_fd, None when it is gone."""
        try:
            fd = _open_directory(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        with _Fd(fd):
            return _subvolume_id_of_fd(fd, path)

    def _roll_back(self, subvolumes_fd: int, name: bytes, path: str, created: int | None) -> None:
        """Delete a layer whose create failed: its quota file first, then its subvolume.

        Nothing is deleted when a racing remove and create replaced the
        subvolume before the check here.  NOTE: a replacement after the
        check still loses its quota file.
        """
        current = self._subvolume_id_at(subvolumes_fd, name, path)
        if current is None:
            return
        if current != created:
            log.warning("not rolling back %s: another process replaced it during the failed create", path)
            return
        try:
            self._remove_quota_file(name)
        except OSError as error:
            log.warning("could not delete the quota file of %s after a failed create: %s", path, error)
        try:
            _delete_subvolume_or_contents(subvolumes_fd, name, path)
        except OSError as error:
            log.warning("could not delete %s after a failed create: %s", path, error)

    # -- Remove

    def remove(self, layer_id: str) -> None:
        """Delete a layer with its nested subvolumes, qgroup and quota file."""
        name = validate_layer_id(layer_id)
        path = self._layer_dir(layer_id)
        with self._open_subvolumes() as subvolumes_fd:
            try:
                st = os.stat(name, dir_fd=subvolumes_fd, follow_symlinks=False)
            except FileNotFoundError:
                self._remove_leftover_quota_file(subvolumes_fd, name)
                raise FileNotFoundError(
                    errno.ENOENT, f"layer {os.fsdecode(name)!r} not found; list the layers to check the id",
                    path) from None
            if not stat.S_ISDIR(st.st_mode):
                with _QuotaFileAside(self._quotas_dir, name, path):
                    os.unlink(name, dir_fd=subvolumes_fd)
                log.debug("removed %s, which was not a directory", path)
            else:
                self._check_no_mounts(path)
                self._remove_layer_directory(subvolumes_fd, name, path)

    def _check_no_mounts(self, path: str) -> None:
        # Home is resolved at init and a layer id is one component, so path
        # is resolved as the mount points in /proc/self/mountinfo are.
        mounts = _mount_points_below(os.fsencode(path))
        if mounts:
            raise _os_error(
                errno.EBUSY, "remove layer", path,
                f"{os.fsdecode(mounts[0])} is mounted inside it; unmount it first",
            )

    def _remove_layer_directory(self, subvolumes_fd: int, name: bytes, path: str) -> None:
        """Remove the layer directory name, holding the layer's lock (see _lock_layer_for_removal)."""
        with _RemovalRepairs() as repairs:
            layer_fd = _open_layer_for_removal(subvolumes_fd, name, path, repairs)
            try:
                repairs.set_top(layer_fd, path)
                try:
                    lock_fd = _lock_layer_for_removal(layer_fd, subvolumes_fd, name, path)
                except BaseException:
                    repairs.restore()  # the top's mode, which the open may have repaired
                    raise
                try:
                    self._remove_locked_layer(subvolumes_fd, name, path, layer_fd, repairs)
                except BaseException:
                    repairs.restore()  # before the next remove or apply may start
                    raise
                finally:
                    _unlock_layer(lock_fd)
            finally:
                os.close(layer_fd)

    def _remove_locked_layer(self, subvolumes_fd: int, name: bytes, path: str, layer_fd: int,
                             repairs: _RemovalRepairs) -> None:
        """Remove the layer directory name, open and locked at layer_fd, with its quota file and qgroups."""
        limit_cleared = False
        try:
            # The quota file is set aside first, so a concurrent get finds
            # none and does not set the limit again once it is cleared. That
            # happens only once this remove holds the layer's lock, so the
            # limit holds for an apply that the remove waits for.
            with _QuotaFileAside(self._quotas_dir, name, path):
                limit_cleared = True  # a get meanwhile clears the limit, finding no quota file
                subvolume_ids = self._delete_locked_layer(subvolumes_fd, name, path, layer_fd, repairs)
            # A get that read the quota file before it was set aside can set
            # the limit after the clear, and turn quota on to do so, so the
            # limit is cleared again. A get that sets it after this clear
            # finds the layer gone and clears it itself (_check_layer_kept).
            if subvolume_ids and self._clear_limit(subvolumes_fd, subvolume_ids[-1], path):
                self._destroy_qgroups(subvolumes_fd, subvolume_ids)
        except BaseException:
            if limit_cleared:
                self._restore_limit(os.fsdecode(name), path)
            raise

    def _delete_locked_layer(self, subvolumes_fd: int, name: bytes, path: str, layer_fd: int,
                             repairs: _RemovalRepairs) -> list[int]:
        """Delete the layer directory name, open and locked at layer_fd; return the subvolume ids deleted, its last."""
        if not _is_subvolume_stat(os.fstat(layer_fd)):
            if not _can_search_trees(layer_fd):
                _check_contents_removable(layer_fd, path, repairs)
            repairs.keep()
            _remove_contents(layer_fd, path)
            subvolume_ids: list[int] = []
        else:
            layer_subvolume_id = _subvolume_id_of_fd(layer_fd, path)
            _check_holder_not_flagged(subvolumes_fd, path)
            nested = _find_nested_for_removal(layer_fd, layer_subvolume_id, path, repairs)
            _check_layer_deletable(layer_fd, layer_subvolume_id, nested, path, repairs)
            _clear_removal_flags(layer_fd, nested, path)
            repairs.keep()
            # The kernel charges deleting a nested subvolume's entry to the
            # layer's qgroup, which fails with EDQUOT when it is full.
            self._clear_limit(subvolumes_fd, layer_subvolume_id, path)
            subvolume_ids = self._remove_nested(layer_fd, layer_subvolume_id, path, nested)
            subvolume_ids.append(layer_subvolume_id)
            _clear_read_only(layer_fd, path)
        if subvolume_ids:
            self._destroy_layer_subvolume(subvolumes_fd, name, path, subvolume_ids)
        else:
            _unlink_at(subvolumes_fd, name, is_dir=True)
            log.debug("removed directory %s", path)
        return subvolume_ids

    def _restore_limit(self, layer_id: str, path: str) -> None:
        """Set a layer's limit from its quota file again after a remove that cleared it failed, or log why not."""
        if not os.path.lexists(path):
            return
        try:
            self._sync_limit(layer_id, path)
        except Exception as error:
            log.warning("could not set the limit of %s again after its remove failed: %s; get the layer to "
                        "set it", path, error)

    def _destroy_layer_subvolume(self, subvolumes_fd: int, name: bytes, path: str, subvolume_ids: list[int]) -> None:
        """Destroy the layer's subvolume, first deleting nested subvolumes listed too early.

        A nested subvolume renamed inside the layer after it was listed makes
        SNAP_DESTROY fail with ENOTEMPTY, so the layer is listed again, up to
        _REMOVE_ATTEMPTS times.  The ids deleted on the way join subvolume_ids.
        """
        for attempt in range(1, _REMOVE_ATTEMPTS + 1):
            try:
                _delete_subvolume_or_contents(subvolumes_fd, name, path)
                return
            except OSError as error:
                if error.errno != errno.ENOTEMPTY or attempt == _REMOVE_ATTEMPTS:
                    raise
                log.warning("nested subvolumes of %s changed during remove, listing them again", path)
            with _Fd(_open_directory(name, dir_fd=subvolumes_fd)) as layer_fd:
                subvolume_ids[:0] = self._remove_nested(layer_fd, _subvolume_id_of_fd(layer_fd, path), path)

    def _remove_nested(self, layer_fd: int, layer_subvolume_id: int, path: str,
                       nested: list[NestedSubvolume] | None = None) -> list[int]:
        """Delete the subvolumes below the layer, deepest first, and return their ids.

        nested is the list that find_nested_subvolumes returned, or None to list them here.
        """
        if nested is None:
            nested = _find_nested_for_removal(layer_fd, layer_subvolume_id, path)
        return _delete_nested_subvolumes(layer_fd, layer_subvolume_id, nested, path)

    def _clear_limit(self, fd: int, subvolume: int, path: str) -> bool:
        """Clear the limit of a layer's qgroup and return whether quota is on.

        The remove calls this before and again after it deletes the layer.
        The kernel rejects (EBUSY) destroying the qgroup of a deleted
        subvolume until its cleaner has dropped it, and Linux 6.18 then
        sometimes keeps the qgroup, limit included, for the next subvolume
        that gets the same id.  Failing here never fails the remove.  The
        limit search doubles as the quota check, because the quota tree
        exists only while quota is on; fd is any directory of home's subvolume.
        """
        try:
            if _qgroup_limit(fd, subvolume, path) is not None:
                _set_qgroup_limit(fd, subvolume, None, path)
        except FileNotFoundError:
            return False
        except PermissionError as error:
            log.debug("cannot clear the qgroup limit of %s: %s", path, error)
        except OSError as error:
            log.warning("could not clear the qgroup limit of %s during its remove: %s", path, error)
        return True

    def _destroy_qgroups(self, fd: int, subvolume_ids: list[int]) -> None:
        """Destroy the qgroups of deleted subvolumes; fd is any directory on the filesystem.

        The first destroy doubles as the quota check: with quota off the
        kernel returns ENOTCONN, which is cheaper than reading the quota
        tree's status item first.
        """
        try:
            for subvolume in subvolume_ids:
                _destroy_qgroup(fd, subvolume, self.home)
        except OSError as error:
            if error.errno == errno.ENOTCONN:
                return
            if error.errno == errno.EPERM and not quota_enabled(fd, self.home):
                return
            log.warning("could not destroy qgroups %s of removed layer: %s", subvolume_ids, error)

    def _remove_quota_file(self, layer_id: Any) -> None:
        """Delete HOME/quotas/ID, leaving a directory in its place with a warning.

        Readers ignore anything there but a regular file, so a directory
        fails no operation.
        """
        name = validate_layer_id(layer_id)
        quota_file = self._quota_file(name)
        with self._open_quotas() as quotas_fd:
            if quotas_fd is None:
                return
            try:
                os.unlink(name, dir_fd=quotas_fd)
            except FileNotFoundError:
                return
            except IsADirectoryError:
                log.warning("could not delete %s: it is a directory, not a quota file; delete it by hand",
                            quota_file)
                return
            except OSError as error:
                raise _os_error(error.errno, "delete quota file", quota_file) from None
        log.debug("removed quota file %s", quota_file)

    def _remove_leftover_quota_file(self, subvolumes_fd: int, name: bytes) -> None:
        """Delete the quota file of a missing layer, logging a failure instead of raising it.

        A remove killed after deleting the subvolume leaves the quota file.
        When another process creates the id meanwhile, the quota file found
        is replaced by its own or the layer is back, and the file stays.
        """
        quota_file = self._quota_file(name)
        try:
            with self._open_quotas() as quotas_fd:
                if quotas_fd is None:
                    return
                try:
                    found = os.stat(name, dir_fd=quotas_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if _lstat_at(subvolumes_fd, os.fsdecode(name)) is not None:
                    return  # another process created the layer since the remove found it missing
                deleted = _unlink_if_same(quotas_fd, name, found)
        except IsADirectoryError:
            log.warning("could not delete %s: it is a directory, not a quota file; delete it by hand", quota_file)
            return
        except OSError as error:
            log.warning("could not delete the quota file of removed layer %r: %s; delete %s by hand",
                        os.fsdecode(name), error, quota_file)
            return
        if deleted:
            log.debug("removed quota file %s", quota_file)

    # -- Get, put and queries

    def get(self, layer_id: str, options: Iterable[str] = (), *, mount_label: str = "") -> str:
        """Return the layer's directory, re-applying its size limit if it has one."""
        if isinstance(options, (str, bytes)):
            options = [os.fsdecode(options)]  # one option, not a sequence of characters
        for option in options:
            if option != "ro":
                raise ValueError(f"invalid mount option {option!r}: btrfs layers take only 'ro'")
        path = self._layer_dir(layer_id)
        self._require_layer(layer_id, path)
        self._sync_limit(layer_id, path)
        return path

    def _sync_limit(self, layer_id: str, path: str) -> None:
        """Set the layer's limit to the size in its quota file, clearing it when there is no quota file.

        A sized create writes the quota file before it sets the limit, and
        an unsized create deletes a leftover quota file before it clears the
        limit.  So the quota file is read again after each change, and the
        change is redone until two reads agree: the create's own change then
        comes after this one, or matches it.
        """
        quota = self._quota_state(layer_id)
        for _ in range(_LIMIT_SYNC_ATTEMPTS):
            self._apply_quota_state(layer_id, path, *quota)
            current = self._quota_state(layer_id)
            if current == quota:
                return
            quota = current
        log.warning("the quota file of %s changed %d times during a get; the limit may not match it, so "
                    "get the layer again", path, _LIMIT_SYNC_ATTEMPTS)

    def _quota_state(self, layer_id: str) -> tuple[int | None, bool]:
        """Return the size in the layer's quota file and whether anything is at its path."""
        size = self._read_quota(layer_id)
        return size, size is not None or os.path.lexists(self._quota_file(layer_id))

    def _apply_quota_state(self, layer_id: str, path: str, size: int | None, exists: bool) -> None:
        if size is not None and size >= self.options.min_space:
            if size == 0:
                log.warning("ignoring quota file of %s: a limit of 0 bytes is not valid", layer_id)
            else:
                with self._open_home() as home_fd, _Fd(self._open_layer(layer_id, path)) as layer_fd:
                    if _is_subvolume_stat(os.fstat(layer_fd)):
                        self._apply_limit(home_fd, layer_fd, size, path)
                        self._check_layer_kept(home_fd, layer_fd, layer_id, path)
                    else:
                        log.warning("ignoring quota file of %s: the layer is a plain directory (a copied "
                                    "store?), not a subvolume, so it cannot have a limit", path)
        elif not exists:
            # An invalid quota file is ignored with a warning, and the limit stays.
            with self._open_home() as home_fd, _Fd(self._open_layer(layer_id, path)) as layer_fd:
                self._clear_stray_limit(home_fd, layer_fd, path)

    def _check_layer_kept(self, home_fd: int, layer_fd: int, layer_id: str, path: str) -> None:
        """Undo the limit just set through layer_fd if a remove deleted that layer meanwhile.

        A remove clears the limit once more after its delete. A limit set
        before the layer is seen here is therefore cleared by the remove, and
        one set after the delete is cleared here, with its qgroup destroyed.
        Raises FileNotFoundError when no layer has the id any more; a layer
        created again under the id got its own limit from its create.
        """
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(layer_fd)):
            return
        subvolume = _subvolume_id_of_fd(layer_fd, path)
        try:
            _set_qgroup_limit(home_fd, subvolume, None, path)
            _destroy_qgroup(home_fd, subvolume, self.home)
        except OSError as error:
            log.warning("could not undo the limit that a get set on qgroup 0/%d of %s, removed meanwhile: %s",
                        subvolume, path, error)
        if current is None:
            raise _removed_layer_error(layer_id, path)

    @staticmethod
    def _open_layer(layer_id: str, path: str) -> int:
        """Open a layer's directory; a layer removed meanwhile raises FileNotFoundError naming it."""
        try:
            return _open_layer_top(path)
        except FileNotFoundError:
            raise _removed_layer_error(layer_id, path) from None

    def _require_layer(self, layer_id: str, path: str) -> os.stat_result:
        # Layer paths are strings that the callers and the kernel resolve
        # again, so the layout is checked before each use, not only at init.
        _check_real_directory(self._subvolumes_dir)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"layer {layer_id!r} not found; list the layers to check the id", path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, f"layer {layer_id!r} is not a directory", path)
        return st

    def put(self, layer_id: str) -> None:
        """Release a layer; get() holds nothing, so there is nothing to do."""

    def exists(self, layer_id: str) -> bool:
        try:
            path = self._layer_dir(layer_id)
        except ValueError:
            return False
        _check_real_directory(self._subvolumes_dir)
        try:
            return stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            return False

    def list_layers(self) -> list[str]:
        _check_real_directory(self._subvolumes_dir)
        layers = []
        with os.scandir(self._subvolumes_dir) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    layers.append(entry.name)
        return sorted(layers)

    def status(self) -> list[tuple[str, str]]:
        with self._open_home() as fd:
            fsid = _format_uuid(_fs_info(fd, self.home).fsid)
            mode = _quota_mode(fd, self.home)
        if mode is not None and mode != self.options.quota_mode:
            log.warning("quota on %s is in %s mode, but btrfs.quota_mode is %s; the filesystem's mode applies "
                        "until quota is disabled and enabled again", self.home, mode, self.options.quota_mode)
        return [
            ("Filesystem UUID", str(fsid)),
            ("Kernel Version", os.uname().release),
            ("Quota Enabled", "true" if mode is not None else "false"),
            # The configured mode while quota is off: the mode a create would enable.
            ("Quota Mode", mode or self.options.quota_mode),
            ("Min Space", str(self.options.min_space)),
            ("Default Size", str(self.options.default_size or 0)),
            ("Layers", str(len(self.list_layers()))),
        ]

    def metadata(self, layer_id: str) -> dict[str, str]:
        path = self._layer_dir(layer_id)
        self._require_layer(layer_id, path)
        result = {"Path": path}
        with _Fd(_open_layer_top(path)) as fd:
            if _is_subvolume_stat(os.fstat(fd)):
                info = _subvolume_info(fd, path)
                result["SubvolumeID"] = str(info.treeid)
                result["UUID"] = _format_uuid(info.uuid)
                if any(bytes(info.parent_uuid)):
                    result["ParentUUID"] = _format_uuid(info.parent_uuid)
                result["Generation"] = str(info.generation)
                result["ReadOnly"] = "true" if info.flags & BTRFS_SUBVOL_RDONLY else "false"
        size = self._read_quota(layer_id)
        if size is not None:
            result["SizeLimit"] = str(size)
        return result

    def read_write_disk_usage(self, layer_id: str) -> DiskUsage:
        """Sum st_size of non-directories and count inodes, each inode once."""
        path = self._layer_dir(layer_id)
        self._require_layer(layer_id, path)
        seen: set[tuple[int, int]] = set()
        total = [0]

        def visit(fd: int, relative: _WalkPath, entries: list[Any]) -> list[bytes]:
            st = os.fstat(fd)
            seen.add((st.st_dev, st.st_ino))
            subdirectories = []
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    subdirectories.append(os.fsencode(entry.name))
                    continue
                try:
                    entry_st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key = (entry_st.st_dev, entry_st.st_ino)
                if key not in seen:
                    seen.add(key)
                    total[0] += entry_st.st_size
            return subdirectories

        with _Fd(_open_layer_top(path)) as layer_fd:
            walk_tree(layer_fd, visit, path=path, skip_mounts=True)
        return DiskUsage(total[0], len(seen))

    def additional_image_stores(self) -> list[str]:
        return []

    # -- Layer diffs: thin wrappers over the "Layer diffs" section

    def _existing_layer_dir(self, layer_id: str) -> str:
        path = self._layer_dir(layer_id)
        self._require_layer(layer_id, path)
        return path

    def _parent_dir(self, parent: str | None) -> str | None:
        # The driver does not record parents, so None diffs against nothing.
        return None if parent is None else self._existing_layer_dir(parent)

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        """Return the changes of a layer against parent (or all of it), sorted by path.

        Entries named .wh.*, which diff rejects, are listed like any other.
        """
        return _layer_changes_fast(self._existing_layer_dir(layer_id), self._parent_dir(parent))

    def diff(self, layer_id: str, parent: str | None = None) -> io.BufferedReader:
        """Stream the layer's changes against parent (or all of it) as an uncompressed tar.

        Closing the returned file stops the writer and releases the layer.
        Raises ValueError before any of the tar is written when an entry is
        named .wh.*, which a layer tar cannot carry (see layer_diff).
        """
        layer_dir = self._existing_layer_dir(layer_id)
        parent_dir = self._parent_dir(parent)
        changes = None if parent_dir is None else _layer_changes_fast(layer_dir, parent_dir)
        return layer_diff(layer_dir, parent_dir, self.uid_maps, self.gid_maps,
                          release=lambda: self.put(layer_id), changes=changes)

    def apply_diff(self, layer_id: str, diff: Any, *, parent: str | None = None,
                   uid_maps: Iterable[Any] | None = None, gid_maps: Iterable[Any] | None = None,
                   ignore_chown_errors: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> int:
        """Apply a layer tar to a layer and return the size of its regular files.

        The layer is already a snapshot of its parent, so parent is accepted
        for compatibility and not used. Owners map to host ids through
        uid_maps and gid_maps (default: the driver's). A second apply to the
        layer while one runs raises OSError with EBUSY (see apply_layer_diff).
        """
        path = self._existing_layer_dir(layer_id)
        uid_maps = self.uid_maps if uid_maps is None else _id_maps(uid_maps, "uid_maps")
        gid_maps = self.gid_maps if gid_maps is None else _id_maps(gid_maps, "gid_maps")
        return apply_layer_diff(path, diff, uid_maps, gid_maps, ignore_chown_errors, progress)

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        """Sum the sizes of the non-directories that the layer adds or modifies.

        Raises ValueError where diff does, for an entry named .wh.*.
        """
        layer_dir = self._existing_layer_dir(layer_id)
        parent_dir = self._parent_dir(parent)
        if parent_dir is None:
            return layer_diff_size(layer_dir)
        return _changes_size(layer_dir, _layer_changes_fast(layer_dir, parent_dir))

    def update_layer_id_map(self, layer_id: str, to_container: Any, to_host: Any) -> None:
        """Rewrite the layer's owners from one ID mapping to another.

        to_container is the (uid_maps, gid_maps) pair of the mapping the files
        have now, to_host the pair of the new one; None is the identity.
        """
        remap_layer_owners(self._existing_layer_dir(layer_id), _id_map_pair(to_container, "to_container"),
                           _id_map_pair(to_host, "to_host"))

    def supports_shifting(self) -> bool:
        """Return False: layers never shift ids at mount time, update_layer_id_map rewrites them."""
        return False


def init(
    home: PathArg,
    options: Iterable[str] = (),
    uid_maps: Iterable[Any] | None = None,
    gid_maps: Iterable[Any] | None = None,
) -> Driver:
    """Return a Driver for home, as the graph-driver registry's init function does."""
    return Driver(home, options, uid_maps, gid_maps)


def _require_btrfs(home: str) -> None:
    """Raise PrerequisiteError unless home (or, until it exists, its parent) is on btrfs."""
    probe = home
    while True:
        try:
            magic = _statfs_type(probe)
            break
        except FileNotFoundError:
            parent = os.path.dirname(probe)
            if parent == probe:
                raise
            probe = parent
    if magic != BTRFS_SUPER_MAGIC:
        raise PrerequisiteError(
            f"{home} is not on a btrfs filesystem ({probe} has filesystem magic {magic:#x}); "
            "point the driver at a directory on btrfs"
        )


def _delete_nested_subvolumes(top_fd: int, top_id: int, nested: list[NestedSubvolume], path: Any) -> list[int]:
    """Delete the nested subvolumes of the subvolume top_fd, children first, and return the ids deleted.

    nested is what find_nested_subvolumes listed for top_id. The subvolumes
    that contain others are taken in reverse depth-first order, and the
    children of each right after its top, so one _DirectoryOpener reaches
    every path with a number of opens that follows the number of
    directories on the paths.

    NOTE: the opener keeps directories open from one subvolume to the next.
    When someone moves a nested subvolume out of top_fd while the subvolumes
    below it are being deleted, the listed ones that remain are still
    deleted. Each deletion checks the subvolume's id, so only listed
    subvolumes are deleted.
    """
    ordered = _in_tree_order(nested)
    children: dict[int, list[NestedSubvolume]] = {}
    for subvolume in ordered:
        children.setdefault(subvolume.parent_id, []).append(subvolume)
    holders = [NestedSubvolume(top_id, 0, b"")] + [subvolume for subvolume in ordered if subvolume.id in children]
    deleted: list[int] = []
    with _DirectoryOpener(top_fd) as directories:
        for holder in reversed(holders):
            if holder.id in children:
                deleted += _delete_children(directories, top_fd, holder, children[holder.id], path)
    return deleted


def _delete_children(directories: _DirectoryOpener, top_fd: int, holder: NestedSubvolume,
                     children: list[NestedSubvolume], path: Any) -> list[int]:
    """Delete the listed children of holder and return the ids deleted.

    holder is the subvolume of top_fd itself (path b"") or one nested in it.
    Nothing is deleted when holder is gone from its path.
    """
    if holder.path:
        opened = _open_listed_subvolume(directories, top_fd, holder, _nested_display(path, holder.path))
        if opened is None:
            return []
        holder_fd = opened[1]
    else:
        holder_fd = os.dup(top_fd)
    with _Fd(holder_fd):
        return [child.id for child in reversed(children)
                if _delete_nested_subvolume(directories, top_fd, holder_fd, child, path)]


def _nested_display(path: Any, relative: bytes) -> str:
    """Return the path of a nested subvolume for messages: relative below path."""
    return os.path.join(os.fsdecode(path), os.fsdecode(relative))


def _open_listed_subvolume(directories: _DirectoryOpener, top_fd: int, subvolume: NestedSubvolume,
                           display: str) -> tuple[int, int] | None:
    """Open the parent directory and the top of a listed nested subvolume, or return None when it is gone.

    Returns (parent fd, subvolume fd). The parent fd belongs to directories,
    and the caller closes the other. The subvolume must be on the mount of
    top_fd and still have the listed id, so a renamed, replaced or
    mounted-over entry is never returned. Raises ESTALE when another
    directory has taken its place.
    """
    opened = _open_nested_top(directories, subvolume.path)
    if opened is None:
        return None
    parent_fd, child_fd = opened
    try:
        _check_same_mount(top_fd, child_fd, "delete nested subvolume", display)
        if not _is_subvolume_stat(os.fstat(child_fd)) or _subvolume_id_of_fd(child_fd, display) != subvolume.id:
            raise _os_error(errno.ESTALE, "delete nested subvolume", display,
                            f"it is no longer subvolume {subvolume.id}; run remove again")
    except BaseException:
        os.close(child_fd)
        raise
    return parent_fd, child_fd


def _delete_nested_subvolume(directories: _DirectoryOpener, top_fd: int, holder_fd: int,
                             subvolume: NestedSubvolume, path: Any) -> bool:
    """Delete one nested subvolume after checking it is what the kernel listed.

    holder_fd is the top of the subvolume that contains it. Return False
    when it is gone already, or has moved to another subvolume since.
    """
    display = _nested_display(path, subvolume.path)
    opened = _open_listed_subvolume(directories, top_fd, subvolume, display)
    if opened is None:
        return False
    parent_fd, child_fd = opened
    with _Fd(child_fd):
        if os.fstat(parent_fd).st_dev != os.fstat(holder_fd).st_dev:
            return False
        _clear_read_only(child_fd, display)
    # The subvolume that contains it (top_fd, or a nested one deleted
    # later) must be writable too, because the kernel rejects the unlink with EROFS.
    _clear_read_only(holder_fd, os.path.dirname(display))
    # Directories that the opener keeps open inside the subvolume would keep it after it is deleted.
    directories.forget(_nested_parts(subvolume.path))
    try:
        _delete_subvolume_or_contents(parent_fd, subvolume.path.rpartition(b"/")[2], display)
    except FileNotFoundError:
        # Renamed away since the check, so remove lists the subvolumes again. A
        # FileNotFoundError must not escape, because callers read it as "no such layer".
        return False
    return True


class _FlaggedDirectory(NamedTuple):
    """A directory with the immutable or append-only flag: an open fd, its flags and its path for messages."""

    fd: int
    flags: int
    where: str


def _find_flagged_directories(top_fd: int, nested: list[NestedSubvolume], path: Any) -> list[_FlaggedDirectory]:
    """Open the flagged directories that stop the kernel from unlinking the subvolumes top_fd and nested.

    The kernel rejects the unlink of a subvolume whose top directory, or the
    directory it is unlinked from, is immutable or append-only. Those are
    top_fd itself, each nested subvolume's top and the directory holding it.
    A directory gone or replaced since nested was listed is skipped: the
    deletion reports it.
    """
    found: list[_FlaggedDirectory] = []
    seen: set[tuple[int, int]] = set()

    def add(fd: int, relative: bytes) -> None:
        st = os.fstat(fd)
        flags = _blocking_inode_flags(fd)
        if flags and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            where = os.path.join(os.fsdecode(path), os.fsdecode(relative)) if relative else os.fsdecode(path)
            found.append(_FlaggedDirectory(os.dup(fd), flags, where))

    try:
        add(top_fd, b"")
        with _DirectoryOpener(top_fd) as directories:
            for subvolume in _in_tree_order(nested):
                opened = _open_nested_top(directories, subvolume.path)
                if opened is None:
                    continue
                parent_fd, child_fd = opened
                with _Fd(child_fd):
                    add(parent_fd, subvolume.path.rpartition(b"/")[0])
                    add(child_fd, subvolume.path)
    except BaseException:
        for directory in found:
            os.close(directory.fd)
        raise
    return found


def _check_holder_not_flagged(holder_fd: int, path: Any) -> None:
    """Raise _InodeFlagError when holder_fd, the directory that holds the subvolume at path, blocks its unlink.

    That directory is outside what the removal deletes, so its immutable or
    append-only flag is never cleared, and the removal must fail before it
    deletes any nested subvolume.
    """
    flags = _blocking_inode_flags(holder_fd)
    if flags:
        raise _inode_flag_error(flags, os.path.dirname(os.fsdecode(path)) or ".")


def _clear_removal_flags(top_fd: int, nested: list[NestedSubvolume], path: Any) -> None:
    """Clear the immutable and append-only flags that stop the kernel from deleting top_fd and nested.

    The subvolumes are about to be deleted, so the flags are not set again
    once this returns. Without CAP_LINUX_IMMUTABLE, or when a clear fails,
    this raises _InodeFlagError naming the flagged directory, and every flag
    is as before.
    """
    flagged = _find_flagged_directories(top_fd, nested, path)
    cleared: list[_FlaggedDirectory] = []
    # Tops of read-only subvolumes made writable to clear a flag inside them.
    made_writable: list[tuple[int, str]] = []
    try:
        if flagged and not _may_change_inode_flags():
            raise _inode_flag_error(flagged[0].flags, flagged[0].where)
        for directory in flagged:
            try:
                _clear_blocking_flags(directory, made_writable)
            except OSError as error:
                log.warning("could not clear the flags of %s: %s", directory.where, error)
                _set_flags_again(cleared)
                _set_read_only_again(made_writable)
                raise _inode_flag_error(directory.flags, directory.where) from None
            cleared.append(directory)
            log.debug("cleared immutable and append-only flags of %s", directory.where)
    finally:
        for directory in flagged:
            os.close(directory.fd)
        for fd, _ in made_writable:
            os.close(fd)


def _clear_blocking_flags(directory: _FlaggedDirectory, made_writable: list[tuple[int, str]]) -> None:
    """Clear the immutable and append-only flags of directory.

    Inode flags of a read-only subvolume cannot change (EROFS), so the
    subvolume is made writable first, and its top is added to made_writable.
    """
    def clear() -> None:
        fcntl.ioctl(directory.fd, _structs.FS_IOC_SETFLAGS, ctypes.c_int(
            (_inode_flags(directory.fd) or 0) & ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL)))

    try:
        clear()
        return
    except OSError as error:
        if error.errno != errno.EROFS:
            raise
    top_fd = _open_device_top(directory.fd)
    try:
        _clear_read_only(top_fd, directory.where)
    except BaseException:
        os.close(top_fd)
        raise
    made_writable.append((top_fd, directory.where))
    log.debug("cleared the read-only flag of the subvolume holding %s", directory.where)
    clear()


class _ModeChange(NamedTuple):
    """A directory of a layer whose mode a removal changed: its path below the layer's top, identity and old mode."""

    walked: _WalkPath
    device: int
    inode: int
    mode: int


class _RemovalRepairs:
    """The modes and read-only flags that a removal without CAP_SYS_ADMIN changed before it deletes anything.

    The caller's directories get owner rwx, so that it can read and delete
    them. That fails with EROFS in a read-only subvolume, whose owner may
    clear its read-only flag, as the removal does anyway before it deletes
    the subvolume. Used as a context manager, it sets the modes and flags
    back when the block raises before keep() was called, so a refused
    removal leaves the layer as it was, except for the ctimes and a setgid
    bit, which chmod drops outside the caller's groups (logged as a warning).
    NOTE: a removal killed after a repair leaves the changed modes and
    cleared flags, and a later removal takes them for the originals.
    """

    def __init__(self) -> None:
        self.subvolumes: list[tuple[int, str]] = []
        self.modes: list[_ModeChange] = []
        self.top_fd: int | None = None
        self.top_path = ""
        self._keep = False

    def __enter__(self) -> _RemovalRepairs:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        try:
            if kind is not None:
                self.restore()
        finally:
            for fd, _ in self.subvolumes:
                os.close(fd)
            self.subvolumes.clear()
            self.top_fd = None

    def keep(self) -> None:
        """Keep the modes and flags changed from now on, because the removal has started deleting."""
        self._keep = True

    def restore(self) -> None:
        """Set the modes and flags back, unless keep() was called; only the first call acts."""
        if self._keep:
            return
        self._keep = True
        self._restore_modes()
        _set_read_only_again(self.subvolumes)

    def set_top(self, layer_fd: int, path: str) -> None:
        """Record the layer's top directory, which the paths of mode changes start from; the caller closes it."""
        self.top_fd = layer_fd
        self.top_path = path

    def record_mode(self, walked: _WalkPath, st: os.stat_result) -> None:
        """Record that the directory at walked below the layer's top had st's mode before a repair."""
        self.modes.append(_ModeChange(walked, st.st_dev, st.st_ino, stat.S_IMODE(st.st_mode)))

    def _restore_modes(self) -> None:
        """Set the recorded modes again, deepest changes first, logging each failure."""
        if self.top_fd is None:
            if self.modes:
                log.warning("could not set the modes of %d directories back, because the layer did not open",
                            len(self.modes))
            return
        with _DirectoryOpener(self.top_fd) as directories:
            for change in reversed(self.modes):
                where = _PathBelow(self.top_path, change.walked)
                try:
                    _restore_mode(directories, self.top_fd, change)
                except (OSError, ValueError) as error:
                    log.warning("could not set the mode of %s back to %o: %s", where, change.mode, error)

    def clear(self, top_fd: int, where: str) -> bool:
        """Clear the read-only flag of the subvolume whose top directory is top_fd; return whether it was set.

        NOTE: a descriptor of each such subvolume stays open until the
        removal ends, so that a refusal can set the flag again, and so a
        layer with more read-only subvolumes than the open-file limit allows
        cannot be removed without CAP_SYS_ADMIN.
        """
        flags = _subvolume_flags(top_fd, where)
        if not flags & BTRFS_SUBVOL_RDONLY:
            return False
        kept_fd = os.dup(top_fd)
        try:
            _set_subvolume_flags(top_fd, flags & ~BTRFS_SUBVOL_RDONLY, where)
        except BaseException:
            os.close(kept_fd)
            raise
        self.subvolumes.append((kept_fd, where))
        log.debug("cleared the read-only flag of %s to give its owner access to its directories", where)
        return True

    def clear_if_owner(self, top_fd: int, where: str) -> bool:
        """Clear the read-only flag as clear() does; return False when this process may not clear it."""
        try:
            return self.clear(top_fd, where)
        except PermissionError:
            return False


def _restore_mode(directories: _DirectoryOpener, top_fd: int, change: _ModeChange) -> None:
    """Set the mode of the directory that change names back, unless another inode is there now."""
    parts = str(change.walked).split("/")[1:]
    if parts:
        parent_fd = directories.open(parts[:-1], str(change.walked))
        if parent_fd is None:
            return
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, dir_fd=parent_fd)
        except (FileNotFoundError, NotADirectoryError):
            return
    else:
        fd = os.dup(top_fd)
    with _Fd(fd):
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (change.device, change.inode):
            return
        os.chmod(f"/proc/self/fd/{fd}", change.mode)
        restored = stat.S_IMODE(os.fstat(fd).st_mode)
    if restored != change.mode:
        # chmod by a process outside the directory's group, without
        # CAP_FSETID, drops the setgid bit, in the repair and here alike.
        raise OSError(errno.EPERM, f"the kernel set mode {restored:o}, because this process may not set the "
                      "setgid bit outside the directory's group")
    log.debug("set the mode of %s back to %o", change.walked, change.mode)


def _set_read_only_again(made_writable: list[tuple[int, str]]) -> None:
    """Make the subvolumes that _clear_blocking_flags made writable read-only again, logging each failure."""
    for fd, where in made_writable:
        try:
            _set_subvolume_flags(fd, _subvolume_flags(fd, where) | BTRFS_SUBVOL_RDONLY, where)
        except OSError as error:
            log.warning("could not make the subvolume holding %s read-only again: %s", where, error)


def _set_flags_again(cleared: list[_FlaggedDirectory]) -> None:
    """Set the flags of directories whose flags _clear_removal_flags cleared, logging each failure."""
    for directory in cleared:
        try:
            current = _inode_flags(directory.fd) or 0
            fcntl.ioctl(directory.fd, _structs.FS_IOC_SETFLAGS, ctypes.c_int(current | directory.flags))
        except OSError as error:
            log.warning("could not set the flags of %s again: %s", directory.where, error)


def _check_layer_deletable(layer_fd: int, subvolume_id: int, nested: list[NestedSubvolume], path: Any,
                           repairs: _RemovalRepairs) -> None:
    """Raise, before anything is deleted, when the kernel will refuse to delete the layer or its nested subvolumes.

    The nested subvolumes are deleted first, so a refusal found only at the
    end would leave the layer without them. With CAP_SYS_ADMIN the check
    covers the filesystem's default subvolume. Without it, the kernel
    deletes a subvolume only with the user_subvol_rm_allowed mount option
    and write access to its top directory, which a read-only layer's owner
    gets by clearing the flag (recorded in repairs). That is checked for the
    layer, and for nested subvolumes the caller owns in directories it owns.
    Otherwise the layer is emptied file by file, so every entry must be
    removable by the caller.
    """
    if _can_search_trees(layer_fd):
        default = _default_subvolume_id(layer_fd, path)
        if default is None or default == _structs.BTRFS_FS_TREE_OBJECTID:
            return
        if default == subvolume_id:
            raise _os_error(errno.EPERM, "delete subvolume", path,
                            "it is the filesystem's default subvolume; set another one with "
                            "btrfs subvolume set-default, then remove again")
        for subvolume in nested:
            if subvolume.id == default:
                raise _os_error(errno.EPERM, "delete subvolume", path,
                                f"its nested subvolume {os.fsdecode(subvolume.path)} is the filesystem's default "
                                "subvolume; set another one with btrfs subvolume set-default, then remove again")
        return
    if _mount_has_option(layer_fd, b"user_subvol_rm_allowed"):
        if not _may_write_and_search(layer_fd):
            repairs.clear_if_owner(layer_fd, path)
        if _may_write_and_search(layer_fd) and _owns_nested_subvolumes(layer_fd, nested, path, repairs):
            return
    try:
        _check_contents_removable(layer_fd, path, repairs)
    except _InodeFlagError:
        raise
    except PermissionError as error:
        raise _removal_permission_error(error, path) from None


def _owns_nested_subvolumes(layer_fd: int, nested: list[NestedSubvolume], path: Any,
                            repairs: _RemovalRepairs) -> bool:
    """Return whether SNAP_DESTROY will delete every subvolume in nested for this process.

    Without CAP_SYS_ADMIN it needs write and search permission on the
    subvolume's top directory and on the directory holding it. The deletion
    makes a read-only subvolume writable first, which only its owner may,
    so both directories must be the caller's. Those that lack owner write
    or search permission get owner rwx here (recorded in repairs). Any other
    subvolume may need emptying file by file, which only a check of every
    entry can promise. A subvolume gone since it was listed passes, because
    the deletion skips it.
    """
    uid = os.geteuid()
    with _DirectoryOpener(layer_fd) as directories:
        for subvolume in _in_tree_order(nested):
            try:
                opened = _open_nested_top(directories, subvolume.path)
            except PermissionError:
                return False
            if opened is None:
                continue
            parent_fd, top_fd = opened
            top_walked = _WalkPath(None, "")
            for part in _nested_parts(subvolume.path):
                top_walked = top_walked.child(part)
            holder_walked = top_walked.parent
            assert holder_walked is not None  # a nested subvolume's path has a component
            with _Fd(top_fd):
                for fd, walked in ((parent_fd, holder_walked), (top_fd, top_walked)):
                    if not _owned_with_write_and_search(fd, uid, _PathBelow(os.fsdecode(path), walked), walked,
                                                        repairs):
                        return False
    return True


def _owned_with_write_and_search(fd: int, uid: int, where: Any, walked: _WalkPath, repairs: _RemovalRepairs) -> bool:
    """Return whether uid owns the directory fd, giving it owner rwx when it lacks write or search permission.

    False when the directory is another user's, or when the repair fails:
    the full check of every entry then repairs or reports it.
    """
    st = os.fstat(fd)
    if st.st_uid != uid:
        return False
    if st.st_mode & 0o300 == 0o300:
        return True
    if _blocking_inode_flags(fd):
        return False
    try:
        _give_open_directory_owner_rwx(fd, st, where, walked, repairs)
    except OSError as error:
        log.debug("cannot give %s owner rwx (%s); checking every entry of the layer", where, error)
        return False
    return True


def _give_open_directory_owner_rwx(fd: int, st: os.stat_result, where: Any, walked: _WalkPath,
                                   repairs: _RemovalRepairs | None) -> None:
    """Add owner rwx to the mode st of the open directory fd, recording the old mode in repairs.

    fchmod on the fd needs no search permission on the directory, which a
    chmod through a path or an O_PATH descriptor of it would need.
    """
    _chmod_for_owner(functools.partial(os.fchmod, fd, stat.S_IMODE(st.st_mode) | 0o700), fd, 0, where, repairs)
    if repairs is not None:
        repairs.record_mode(walked, st)
    log.debug("made %s accessible to its owner", where)


def _find_nested_for_removal(
    layer_fd: int, layer_id: int, path: Any, repairs: _RemovalRepairs | None = None,
) -> list[NestedSubvolume]:
    """Return the subvolumes below a layer that is being removed, giving the caller's directories rwx when needed.

    Without CAP_SYS_ADMIN the listing fails with EACCES when a directory
    above a nested subvolume denies the caller read or search permission.
    The removal gives the caller's own directories owner rwx anyway, so they
    get it here and the listing runs again. The first listing runs without
    that repair, because the repair reads every directory of the layer.
    With repairs, read-only flags in the way of the repair are cleared.
    """
    try:
        return find_nested_subvolumes(layer_fd, layer_id, path)
    except PermissionError as error:
        if error.errno != errno.EACCES:
            raise
        log.debug("cannot list the nested subvolumes of %s (%s); giving the caller's directories in it owner rwx",
                  os.fsdecode(path), error)
    blocked = _make_own_directories_accessible(layer_fd, path, repairs)
    try:
        return find_nested_subvolumes(layer_fd, layer_id, path)
    except PermissionError as error:
        if error.errno != errno.EACCES:
            raise
        if blocked is None:
            hint = ("a directory above a nested subvolume denies this process read or search permission; "
                    "give this user read and search permission on the layer's directories, or remove it as root")
        else:
            hint = (f"the directory {blocked} of another user denies this process read or search permission; "
                    f"run chmod o+rx {shlex.quote(blocked)} as its owner, or remove the layer as root")
        raise _os_error(errno.EACCES, "list nested subvolumes", path, hint) from None


def _open_layer_for_removal(subvolumes_fd: int, name: bytes, path: str, repairs: _RemovalRepairs) -> int:
    """Open the layer directory name for a remove, giving it owner rwx if the caller owns it but may not use it.

    A container whose root is mapped to the layer's owner can chmod the
    layer's top directory to 0, or to a mode that lets it be opened but not
    searched or written. The mode change is recorded in repairs.
    """
    try:
        fd = _open_directory(name, dir_fd=subvolumes_fd)
    except FileNotFoundError:
        raise _removed_layer_error(os.fsdecode(name), path) from None
    except PermissionError as error:
        fd = _open_closed_layer_for_removal(subvolumes_fd, name, path, repairs, error)
    try:
        if _lacks_owner_access(fd):
            _give_open_directory_owner_rwx(fd, os.fstat(fd), path, _WalkPath(None, ""), repairs)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_closed_layer_for_removal(subvolumes_fd: int, name: bytes, path: str, repairs: _RemovalRepairs,
                                   error: OSError) -> int:
    """Open the layer directory name, whose open failed with error, after giving it owner rwx if the caller owns it."""
    if not _make_owner_accessible(subvolumes_fd, name, repairs, path, _WalkPath(None, "")):
        raise _os_error(error.errno, "open layer", path, "the layer's top directory denies this process "
                        f"read or search permission; run chmod u+rwx {path} as its owner, or remove the "
                        "layer as root") from None
    return _open_directory(name, dir_fd=subvolumes_fd)


def _lock_layer_for_removal(layer_fd: int, subvolumes_fd: int, name: bytes, path: str) -> int:
    """Take the layer's lock for a remove, check that the layer is still at name, and return the lock's fd.

    It is the lock of apply_diff and update_layer_id_map (see
    _lock_directory), so a remove waits for them, and for another remove of
    the layer, as they wait for each other. A remove that waited for
    another one finds the layer gone and raises FileNotFoundError. Release
    the lock with _unlock_layer.
    """
    lock_fd = _lock_directory(layer_fd, path, "remove layer")
    try:
        try:
            st = os.stat(name, dir_fd=subvolumes_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None or not os.path.samestat(st, os.fstat(layer_fd)):
            raise _removed_layer_error(os.fsdecode(name), path)
    except BaseException:
        _unlock_layer(lock_fd)
        raise
    return lock_fd


def _permission_repair_error(error: OSError, where: Any) -> OSError:
    """Return the error for a failed chmod that was to give the owner access to the directory at where."""
    return _os_error(error.errno, "give the owner access to the directory", where,
                     "give the owner read, write and search permission on it, or remove the layer as root")


def _removed_layer_error(layer_id: str, path: str) -> FileNotFoundError:
    """Return the error for a layer that another process removed during an operation on it."""
    return FileNotFoundError(errno.ENOENT, f"layer {layer_id!r} not found; another process removed it", path)


def _make_own_directories_accessible(top_fd: int, path: Any, repairs: _RemovalRepairs | None) -> str | None:
    """Give every directory below top_fd that the caller owns owner rwx, clearing read-only flags with repairs.

    Returns the path of the first directory of another user that the caller
    may not read or search, or None. The walk does not enter such a
    directory, so the directories below it keep their modes.
    """
    uid = os.geteuid()
    effective = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    blocked: list[str] = []

    def visit(fd: int, relative: _WalkPath, entries: list[Any]) -> list[bytes]:
        where = _PathBelow(os.fsdecode(path), relative)
        st = os.fstat(fd)
        if st.st_uid == uid and st.st_mode & 0o700 != 0o700:
            _give_open_directory_owner_rwx(fd, st, where, relative, repairs)
        subdirectories = []
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if (entry.stat(follow_symlinks=False).st_uid != uid
                    and not os.access(entry.name, os.R_OK | os.X_OK, dir_fd=fd, **effective)):
                blocked.append(f"{where}/{entry.name}")
                continue
            subdirectories.append(os.fsencode(entry.name))
        return subdirectories

    walk_tree(top_fd, visit, path=path, repair_permissions=True, repairs=repairs)
    return blocked[0] if blocked else None


def _may_write_and_search(fd: int) -> bool:
    """Return whether this process, by its effective ids, may create and delete entries in the directory fd."""
    effective = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    return os.access(f"/proc/self/fd/{fd}", os.W_OK | os.X_OK, **effective)


def _removal_permission_error(error: OSError, path: Any) -> OSError:
    """Return the error for a subvolume the caller cannot empty, naming the entry in the way."""
    return _os_error(
        error.errno, "delete subvolume", path,
        f"{error.strerror} at {os.fsdecode(error.filename or b'?')!r}: deleting a subvolume that "
        "contains other users' files needs CAP_SYS_ADMIN, or the user_subvol_rm_allowed mount option "
        "and write access to its top directory",
    )


def _default_subvolume_id(fd: int, path: Any) -> int | None:
    """Return the id of the filesystem's default subvolume, from the root tree's "default" dir item."""
    directory, key_type = _structs.BTRFS_ROOT_TREE_DIR_OBJECTID, _structs.BTRFS_DIR_ITEM_KEY
    items = tree_search(fd, BTRFS_ROOT_TREE_OBJECTID, (directory, key_type, 0), (directory, key_type, _U64_MAX),
                        path=path)
    for item in items:
        # struct btrfs_dir_item: location key (objectid u64, type u8, offset u64),
        # transid u64, data_len u16, name_len u16, type u8, then the name.
        if len(item.data) < 30:
            continue
        location, = struct.unpack_from("<Q", item.data, 0)
        name_length, = struct.unpack_from("<H", item.data, 27)
        if item.data[30:30 + name_length] == b"default":
            return int(location)
    return None


def _mount_has_option(fd: int, option: bytes) -> bool:
    """Return whether the mount of fd has option among its superblock options in /proc/self/mountinfo."""
    mount_id = _mount_id(fd)
    if mount_id is None:
        return False
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields and fields[0] == b"%d" % mount_id and b"-" in fields:
                return option in fields[-1].split(b",")
    return False


def _check_contents_removable(top_fd: int, path: Any, repairs: _RemovalRepairs | None = None) -> None:
    """Raise PermissionError, before anything is deleted, when this caller could not empty top_fd.

    Without CAP_SYS_ADMIN a layer is emptied file by file, and a directory
    that the caller neither owns nor may write into, or a sticky directory
    holding another user's file, would stop that halfway. Directories the
    caller owns but may not enter get owner rwx, as the removal would give
    them, clearing read-only flags in the way with repairs. Without
    CAP_LINUX_IMMUTABLE, an immutable or append-only directory or regular
    file raises _InodeFlagError.
    NOTE: the flags of symlinks and special files are not read, because
    FS_IOC_GETFLAGS needs an open descriptor of the inode.
    """
    uid = os.geteuid()
    check_flags = not _may_change_inode_flags()

    top = os.fsdecode(path)

    def visit(fd: int, relative: _WalkPath, entries: list[Any]) -> list[bytes]:
        # The directory's path is built only for an error, because building
        # it for every directory costs time in proportion to the depth.
        where = _PathBelow(top, relative)
        st = os.fstat(fd)
        if check_flags:
            _check_no_blocking_flags(fd, entries, where)
        if st.st_uid != uid and not _may_write_and_search(fd):
            raise PermissionError(errno.EACCES, "a directory of another user is in the way", str(where))
        if st.st_mode & stat.S_ISVTX and st.st_uid != uid and uid != 0:
            for entry in entries:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    raise PermissionError(errno.EPERM, "another user's file is in a sticky directory",
                                          os.path.join(where, entry.name))
        return [os.fsencode(entry.name) for entry in entries if entry.is_dir(follow_symlinks=False)]

    walk_tree(top_fd, visit, path=path, repair_permissions=True, repairs=repairs)


def _check_no_blocking_flags(fd: int, entries: list[Any], where: Any) -> None:
    """Raise _InodeFlagError when directory fd, or a regular file in entries, is immutable or append-only."""
    flags = _blocking_inode_flags(fd)
    if flags:
        raise _inode_flag_error(flags, where)
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            file_fd = os.open(entry.name, _FLAGS_OPEN, dir_fd=fd)
        except OSError:
            continue  # unreadable: the removal reports what stops it
        with _Fd(file_fd):
            flags = _blocking_inode_flags(file_fd)
        if flags:
            raise _inode_flag_error(flags, os.path.join(where, entry.name))


def _can_search_trees(fd: int) -> bool:
    """Return whether the kernel lets this process search btrfs trees, which needs CAP_SYS_ADMIN."""
    try:
        for _ in tree_search(fd, BTRFS_ROOT_TREE_OBJECTID, (0, 0, 0), (0, 0, 0)):
            pass
    except PermissionError:
        return False
    return True


# The kernel charges removing a subvolume's directory entry to the qgroup of
# the subvolume holding it. A remove with CAP_SYS_ADMIN clears the layer's
# limit first.
_DELETE_OVER_LIMIT_HINT = ("the subvolume holding it is at its qgroup size limit, and the kernel charges the "
                           "deletion to it; delete some files from the layer, or remove it with CAP_SYS_ADMIN, "
                           "which clears the limit first")


def _delete_subvolume_or_contents(dir_fd: int, name: bytes, path: Any) -> None:
    """Destroy subvolume name; without the privilege to, empty it and rmdir it.

    rmdir of an empty subvolume by its owner works since Linux 4.18, which is
    how rootless callers delete subvolumes without user_subvol_rm_allowed.
    """
    try:
        _subvolume_destroy_at(dir_fd, name, path)
        return
    except OSError as error:
        if error.errno == errno.EDQUOT:
            raise _os_error(error.errno, "delete subvolume", path, _DELETE_OVER_LIMIT_HINT) from None
        if error.errno not in (errno.EPERM, errno.EACCES):
            raise
        if error.errno == errno.EPERM and _can_search_trees(dir_fd):
            # Emptying the subvolume would not help: rmdir checks the same.
            flag_error = _flag_error_at(dir_fd, name, path)
            if flag_error is not None:
                raise flag_error from None
            raise _os_error(
                errno.EPERM, "delete subvolume", path,
                "the kernel refuses to delete it although this process has CAP_SYS_ADMIN; it may be "
                "the filesystem's default subvolume (btrfs subvolume get-default), hold an active "
                "swap file, or be in use by btrfs send",
            ) from None
        log.debug("cannot destroy subvolume %s (%s); deleting its files", os.fsdecode(path), error)
    with _Fd(_open_directory(name, dir_fd=dir_fd)) as fd:
        try:
            _check_contents_removable(fd, path)
            _remove_contents(fd, path)
        except _InodeFlagError:
            raise
        except PermissionError as error:
            raise _removal_permission_error(error, path) from None
    try:
        _unlink_at(dir_fd, name, is_dir=True)
    except OSError as error:
        flag_error = _flag_error_at(dir_fd, name, path) if error.errno == errno.EPERM else None
        if flag_error is not None:
            raise flag_error from None
        hint = ("deleting a subvolume needs CAP_SYS_ADMIN, the user_subvol_rm_allowed mount option, "
                "or Linux 4.18 or newer and ownership of the subvolume")
        if error.errno == errno.EDQUOT:
            hint = _DELETE_OVER_LIMIT_HINT
        raise _os_error(error.errno, "delete subvolume", path, hint) from None
    log.debug("removed subvolume %s by emptying it", os.fsdecode(path))


# -- Module-level subvolume helpers ------------------------------------------------


def _split_path(path: PathArg) -> tuple[bytes, bytes]:
    encoded = os.fsencode(path).rstrip(b"/")
    parent, _, name = encoded.rpartition(b"/")
    if not name or name in (b".", b".."):
        raise ValueError(f"invalid subvolume path {os.fsdecode(path)!r}: it must end in a name")
    if len(name) > _NAME_MAX:
        raise ValueError(f"invalid subvolume path {os.fsdecode(path)!r}: the name is longer than 255 bytes")
    return parent if parent or not encoded.startswith(b"/") else b"/", name


def _open_parent(path: PathArg) -> tuple[int, bytes]:
    """Open the directory that contains path, following symlinks the caller put in it."""
    parent, name = _split_path(path)
    return os.open(parent or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name


def create_subvolume(path: PathArg) -> None:
    """Create an empty subvolume at path."""
    parent_fd, name = _open_parent(path)
    with _Fd(parent_fd):
        _subvolume_create_at(parent_fd, name, path)


def create_snapshot(source: PathArg, path: PathArg, *, read_only: bool = False) -> None:
    """Create a snapshot of the subvolume source at path."""
    parent_fd, name = _open_parent(path)
    source_fd = os.open(os.fsencode(source), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with _Fd(parent_fd), _Fd(source_fd):
        _snapshot_create_at(source_fd, parent_fd, name, read_only, path)


def delete_subvolume(path: PathArg, *, recursive: bool = False) -> None:
    """Delete the subvolume at path; with recursive, the subvolumes below it first."""
    parent_fd, name = _open_parent(path)
    with _Fd(parent_fd):
        with _Fd(_open_directory(name, dir_fd=parent_fd)) as fd:
            # The kernel destroys the subvolume under a mount point, not the
            # mounted directory that fd would be: check and delete one thing.
            _check_same_mount(parent_fd, fd, "delete subvolume", path)
            if not _is_subvolume_stat(os.fstat(fd)):
                raise _os_error(errno.EINVAL, "delete subvolume", path, "it is not a subvolume")
            if recursive:
                _check_holder_not_flagged(parent_fd, path)
                _check_no_mounts_below(fd, "delete subvolume", path)
                top_id = _subvolume_id_of_fd(fd, path)
                nested = find_nested_subvolumes(fd, top_id, path)
                _clear_removal_flags(fd, nested, path)
                _delete_nested_subvolumes(fd, top_id, nested, path)
        try:
            _subvolume_destroy_at(parent_fd, name, path)
        except PermissionError:
            flag_error = _flag_error_at(parent_fd, name, path)
            if flag_error is None:
                raise
            raise flag_error from None


def is_subvolume(path: PathArg) -> bool:
    """Return whether path is the root directory of a btrfs subvolume."""
    st = os.lstat(path)
    return _is_subvolume_stat(st) and _statfs_type(path) == BTRFS_SUPER_MAGIC


def subvolume_id(path: PathArg) -> int:
    """Return the id of the subvolume that contains path."""
    with _Fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) as fd:
        return _subvolume_id_of_fd(fd, path)


# -- Layer diffs ---------------------------------------------------------------


class ChangeKind(enum.IntEnum):
    """Kind of a change between a layer and its parent, as in containers/storage."""

    MODIFY = 0
    ADD = 1
    DELETE = 2


class Change(NamedTuple):
    """A path inside a layer (absolute, like /etc/passwd) and its ChangeKind."""

    path: str
    kind: ChangeKind

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE_DIR = ".wh..wh..opq"

_FILE_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_NS_PER_SECOND = 1_000_000_000
_COPY_CHUNK = 1024 * 1024
_PROGRESS_INTERVAL = 0.5  # seconds; progress must be reported at least once a second


def _open_layer_top(layer_dir: PathArg, opener: Callable[[PathArg], int] = _open_directory) -> int:
    """Open a layer's top directory with opener; a PermissionError names the layer and the fix."""
    try:
        return opener(layer_dir)
    except PermissionError as error:
        raise _os_error(error.errno, "open layer", layer_dir,
                        "the layer's top directory denies this process read or search permission, which a "
                        "container mapped to its owner can do; run chmod u+rwx on it as its owner, or use the "
                        "layer as root") from None


def _open_for_reading(name: PathArg, flags: int, dir_fd: int | None = None) -> int:
    """Open with O_NOATIME where allowed, so that reading a layer does not change it.

    O_NOATIME needs ownership of the file or CAP_FOWNER. Without it an atime
    update would dirty the inode, which also makes the tree-search fast path
    of changes compare more directories.
    """
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dir_fd)


def _open_directory_for_reading(name: PathArg, dir_fd: int | None = None) -> int:
    return _open_for_reading(name, _OPEN_DIRECTORY, dir_fd)


def _fd_path(dir_fd: int, name: str) -> bytes:
    """Return a /proc path naming name inside dir_fd, for calls without dir_fd."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, os.fsencode(name))


def _describe_fd(fd: int) -> str:
    """Return the path of the file open at fd, for messages.

    The kernel cannot return a path longer than PATH_MAX (ENAMETOOLONG), which
    a directory deep in a layer can have, so the /proc name is used instead.
    """
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"/proc/self/fd/{fd}"


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class _ListedEntry(NamedTuple):
    """A directory entry as readdir(2) returned it: its name, inode number and whether it is a directory."""

    name: str
    inode: int
    is_dir: bool


def _list_dir(dir_fd: int) -> list[_ListedEntry]:
    """List a directory's entries, sorted by name bytes.

    The entries keep no reference to dir_fd. Only on a filesystem whose
    readdir(2) leaves the file type unknown does listing stat each entry.
    """
    with os.scandir(dir_fd) as scan:
        entries = [_ListedEntry(entry.name, entry.inode(), entry.is_dir(follow_symlinks=False)) for entry in scan]
    entries.sort(key=lambda entry: os.fsencode(entry.name))
    return entries


def _lstat_walked(dir_fd: int, name: str, path: str | _WalkPath) -> os.stat_result:
    """Return the lstat of a listed entry, and raise ESTALE when it is gone.

    A FileNotFoundError must not escape: callers read it as "no such layer".
    """
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise _walk_changed_error(dir_fd, name, path, "was removed or renamed") from None
    except PermissionError as error:
        raise _walk_permission_error(error, dir_fd, name, path) from None


def _walk_permission_error(error: OSError, dir_fd: int, name: str, path: str | _WalkPath) -> OSError:
    """Build the error for an entry of a walked layer that this process may not read, naming its host path."""
    try:
        filename = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
    except OSError:
        filename = str(path)
    return _os_error(error.errno, "read entry", filename,
                     "this process lacks read or search permission on it or on the directory holding it; "
                     "give the owner read and search permission, or run the operation as root")


def _walk_changed_error(dir_fd: int, name: str, path: str | _WalkPath, change: str) -> OSError:
    """Build the ESTALE error for an entry that something changed while its layer was walked.

    path is the entry's path inside the layer, and the filename is its host
    path, read from dir_fd (the layer's or the parent layer's directory).
    """
    try:
        filename = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
    except OSError:
        filename = str(path)
    return OSError(errno.ESTALE, f"{path!r} {change} while the layer was walked; stop whatever writes "
                   "to the layer and run the operation again", filename)


def _open_listed_dir(dir_fd: int, name: str, listed: os.stat_result, path: str | _WalkPath) -> int:
    """Open a subdirectory and check that it is still the one that was listed.

    Raises OSError with ESTALE when it was removed or replaced since.
    """
    try:
        fd = _open_directory_for_reading(name, dir_fd)
    except PermissionError as error:
        raise _walk_permission_error(error, dir_fd, name, path) from None
    except OSError as error:
        # A FileNotFoundError must not escape: callers read it as "no such layer".
        if error.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise
        raise _walk_changed_error(dir_fd, name, path, "was removed or replaced by a non-directory") from None
    try:
        if not os.path.samestat(os.fstat(fd), listed):
            raise _walk_changed_error(dir_fd, name, path, "was replaced by another directory")
        _check_mount_boundary(dir_fd, fd, "walk layer", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _path_parts(path: str) -> list[str]:
    """Split a path inside a layer into its components, rejecting '..'."""
    # Searching the string runs in C, so only a path with an empty or "."
    # component pays for a loop over its components.
    stripped = path.strip("/")
    padded = "/" + stripped + "/"
    if "/../" in padded:
        raise ValueError(f"path {path!r} contains a '..' component")
    if not stripped:
        return []
    if "//" in padded or "/./" in padded:
        return [part for part in stripped.split("/") if part not in ("", ".")]
    return stripped.split("/")


def _open_path_component(dir_fd: int, dir_dev: int, parts: Sequence[str], index: int, path: str,
                         open_directory: Callable[[str, int], int], create: bool = False,
                         created: list[int] | None = None,
                         on_create: Callable[[int], None] | None = None) -> tuple[int, os.stat_result] | None:
    """Open directory parts[index] inside dir_fd, whose st_dev is dir_dev; return its fd and stat.

    open_directory must not follow a symlink. Returns None when the entry is
    missing and create is false. With create, a missing directory is made
    with mode 0755, plus the setgid bit that a setgid dir_fd passes on, index
    is appended to created, and on_create is called with its fd. Raises
    ValueError when the entry is not a directory, and EBUSY when it is on
    another mount.
    """
    part = parts[index]
    try:
        child = open_directory(part, dir_fd)
    except FileNotFoundError:
        if not create:
            return None
        os.mkdir(part, 0o755, dir_fd=dir_fd)
        if created is not None:
            created.append(index)
        child = open_directory(part, dir_fd)
        try:
            # mkdir applied the process umask, and containers/storage unpacks with umask 0.
            os.fchmod(child, 0o755 | (os.fstat(child).st_mode & stat.S_ISGID))
            if on_create is not None:
                on_create(child)
        except BaseException:
            os.close(child)
            raise
    except (NotADirectoryError, OSError) as error:
        if error.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        prefix = "/".join(parts[:index + 1])
        raise ValueError(f"path {path!r}: {prefix!r} is not a directory") from None
    try:
        st = os.fstat(child)
        if st.st_dev != dir_dev:  # as _check_mount_boundary, without a join per level
            _check_same_mount(dir_fd, child, "open layer directory", "/".join(parts[:index + 1]))
    except BaseException:
        os.close(child)
        raise
    return child, st


def _open_entry_parent(root_fd: int, parts: Sequence[str], path: str, create: bool = False,
                       created: list[int] | None = None) -> int | None:
    """Open the directory that contains parts[-1], walking from root_fd.

    No component is followed if it is a symlink. Returns None when a component
    is missing and create is false; with create, missing directories are made
    with mode 0755, and the index in parts of each one made is appended to
    created. Raises ValueError when a component is not a directory. The
    cost is linear in the number of components.
    """
    fd = os.dup(root_fd)
    try:
        dev = os.fstat(fd).st_dev
        for index in range(len(parts) - 1):
            opened = _open_path_component(fd, dev, parts, index, path, _open_directory, create, created)
            if opened is None:
                os.close(fd)
                return None
            os.close(fd)
            fd, dev = opened[0], opened[1].st_dev
    except BaseException:
        os.close(fd)
        raise
    return fd


def _path_key(parts: Sequence[str]) -> bytes:
    """Return parts as bytes with a "/" after each component, the form _common_components compares."""
    return os.fsencode("/".join(parts)) + b"/" if parts else b""


def _common_components(key: bytes, other: bytes) -> int:
    """Count the leading components that two _path_key values share.

    The highest set bit of the XOR of both as big integers marks the first
    byte that differs, so the comparison runs in C however long the paths are.
    """
    length = min(len(key), len(other))
    difference = int.from_bytes(key[:length], "big") ^ int.from_bytes(other[:length], "big")
    same = length - (difference.bit_length() + 7) // 8
    return key.count(b"/", 0, same)


class _DirectoryCursor:
    """An open directory of a _DirectoryOpener and the directories above it.

    ids lists (st_dev, st_ino) of the opener's root and of each directory
    of parts, so ids[-1] is that of fd. key is _path_key(parts).
    """

    __slots__ = ("parts", "ids", "key", "fd")

    def __init__(self, parts: list[str], ids: list[tuple[int, int]], fd: int) -> None:
        self.parts = parts
        self.ids = ids
        self.key = _path_key(parts)
        self.fd = fd


class _DirectoryOpener:
    """Opens directories below a root by path, starting where earlier paths were opened.

    Each directory is entered as _open_entry_parent enters it: one component
    at a time, never through a symlink, and with a mount check. Up to
    max_cursors cursors keep one directory open each, and a path is reached
    from the cursor, or from the root, with the fewest steps. Paths in tree
    order, or alternating among a few subtrees, thus cost a few opens each
    however deep they are. A cursor climbs with "..", and each directory it
    reaches must be the one it passed on the way down. When a directory was
    moved or removed, the path is walked from the root instead.

    NOTE: a cursor moves with its directory, so after someone else renames a
    directory that a cursor is in, later paths below it resolve inside the
    renamed directory, as walk_tree does. Inside a btrfs subvolume, rename(2)
    moves only nested subvolumes out of it. Paths that cycle through more
    than max_cursors subtrees cost one open per component again.
    """

    def __init__(self, root_fd: int, open_directory: Callable[[str, int], int] = _open_directory,
                 max_cursors: int = 8) -> None:
        self.root_fd = root_fd
        self.open_directory = open_directory
        self.max_cursors = max_cursors
        root_st = os.fstat(root_fd)
        self.root_id = (root_st.st_dev, root_st.st_ino)
        self.cursors: list[_DirectoryCursor] = []  # the least recently used first

    def __enter__(self) -> _DirectoryOpener:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self.forget(())

    def open(self, parts: Sequence[str], path: str, create: bool = False,
             created: list[int] | None = None, on_create: Callable[[int], None] | None = None) -> int | None:
        """Return an fd of the directory at parts below the root; None when a component is missing.

        create, created and the ValueError for a component that is not a
        directory work as in _open_entry_parent, with path naming the entry
        in messages, and on_create as in _open_path_component. The fd belongs
        to the opener and stays open until its next call.
        """
        key = _path_key(parts)
        cursor, common = self.start_cursor(parts, key)
        try:
            for index in range(common, len(parts)):
                opened = _open_path_component(cursor.fd, cursor.ids[-1][0], parts, index, path,
                                              self.open_directory, create, created, on_create)
                if opened is None:
                    return None
                child, st = opened
                os.close(cursor.fd)
                cursor.fd = child
                cursor.parts.append(parts[index])
                cursor.ids.append((st.st_dev, st.st_ino))
        finally:
            cursor.key = key if len(cursor.parts) == len(parts) else _path_key(cursor.parts)
            self.cursors.append(cursor)
        return cursor.fd

    def start_cursor(self, parts: Sequence[str], key: bytes) -> tuple[_DirectoryCursor, int]:
        """Return the cursor to walk down to parts from, taken out of self.cursors, and its depth.

        The start with the fewest steps wins. A cursor at an ancestor of
        parts walks on itself. Otherwise a new cursor starts from the root
        or from a copy of another cursor climbed to their common ancestor,
        and the least recently used cursor is closed when there are too many.
        """
        best: _DirectoryCursor | None = None
        best_common = 0
        # Among starts with equal steps, walking on an existing cursor comes
        # first, then starting a new one at the root, then climbing.
        best_rank = (len(parts), 1)
        for cursor in reversed(self.cursors):  # the most recently used is most often the best
            if (abs(len(cursor.parts) - len(parts)), 0) >= best_rank:
                continue  # it cannot take fewer steps
            common = _common_components(cursor.key, key)
            climbs = len(cursor.parts) - common
            rank = (climbs + len(parts) - common, 0 if climbs == 0 else 2)
            if rank < best_rank:
                best, best_common, best_rank = cursor, common, rank
        if best is not None and best_common == len(best.parts):
            self.cursors.remove(best)
            return best, best_common
        start = None
        if best is not None:
            start = self.climbed_copy(best, best_common)
            if start is None:  # a directory that best passed has changed since
                self.cursors.remove(best)
                os.close(best.fd)
        if start is None:
            start = _DirectoryCursor([], [self.root_id], os.dup(self.root_fd))
        if len(self.cursors) >= self.max_cursors:
            os.close(self.cursors.pop(0).fd)
        return start, len(start.parts)

    def climbed_copy(self, cursor: _DirectoryCursor, depth: int) -> _DirectoryCursor | None:
        """Return a new cursor at the ancestor of cursor that is depth levels below the root.

        Returns None when a directory on the way is not the one that the
        cursor passed on its way down: it was moved or removed since.
        """
        fd = os.dup(cursor.fd)
        try:
            for level in range(len(cursor.parts), depth, -1):
                parent = self.open_directory("..", fd)
                os.close(fd)
                fd = parent
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != cursor.ids[level - 1] or st.st_nlink == 0:
                    os.close(fd)
                    return None
        except OSError:
            os.close(fd)
            return None
        return _DirectoryCursor(cursor.parts[:depth], cursor.ids[:depth + 1], fd)

    def forget(self, parts: Sequence[str], below_only: bool = False) -> None:
        """Close the cursors in the directory at parts and below it (only below it with below_only).

        Call it when that directory is moved, removed or emptied, because a
        cursor inside it would find entries where the path no longer leads.
        """
        key = _path_key(parts)
        remaining = []
        for cursor in self.cursors:
            if cursor.key.startswith(key) and not (below_only and len(cursor.parts) == len(parts)):
                os.close(cursor.fd)
            else:
                remaining.append(cursor)
        self.cursors = remaining


def _open_entered_directory(dir_fd: int, name: str) -> int:
    """Open directory name of dir_fd for removing its contents.

    A mount point is refused, and a read-only nested subvolume is made
    writable, because its entries are to be deleted.
    """
    fd = _open_directory(name, dir_fd)
    try:
        _check_mount_boundary(dir_fd, fd, "remove directory", _fd_path(dir_fd, name))
        if os.fstat(fd).st_ino == BTRFS_FIRST_FREE_OBJECTID:
            _clear_read_only(fd, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_tree(dir_fd: int, name: str, unlink: Callable[[int, str], None] = _unlink_file) -> None:
    """Remove name inside dir_fd and, if it is a directory, all below it.

    The walk is fd-relative and never follows a symlink or enters a mount, so
    it cannot leave the tree that it removes, and it keeps one directory
    open at a time. Immutable and append-only flags are cleared where they
    block a deletion, and read-only nested subvolumes are made writable.
    unlink(dir_fd, name) removes each non-directory, and is called for name
    itself first. Like _unlink_at, it must raise IsADirectoryError for a
    directory and FileNotFoundError for a missing name.
    """
    try:
        unlink(dir_fd, name)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass

    with _Fd(_open_entered_directory(dir_fd, name)) as fd:
        _remove_contents(fd, _describe_fd(fd), unlink)
    _unlink_at(dir_fd, name, is_dir=True)


# ID maps -----------------------------------------------------------------


def _map_id(maps: Sequence[IDMap] | None, value: int, to_host: bool) -> int | None:
    """Map an id between container and host; None when no map covers it.

    None or an empty map list is the identity, as in containers/storage.
    """
    if not maps:
        return value
    for entry in maps:
        source, target = (entry.container_id, entry.host_id) if to_host else (entry.host_id, entry.container_id)
        if source <= value < source + entry.size:
            return target + (value - source)
    return None


def _map_owner(uid_maps: Sequence[IDMap] | None, gid_maps: Sequence[IDMap] | None, uid: int, gid: int,
               to_host: bool, path: str) -> tuple[int, int]:
    mapped_uid = _map_id(uid_maps, uid, to_host)
    mapped_gid = _map_id(gid_maps, gid, to_host)
    if mapped_uid is None or mapped_gid is None:
        direction = "host" if to_host else "container"
        raise ValueError(f"{path!r}: owner {uid}:{gid} has no {direction} id in the layer's ID maps")
    return mapped_uid, mapped_gid


# Extended attributes -------------------------------------------------------


def _is_carried_xattr(name: str) -> bool:
    """Tell whether a layer diff carries this extended attribute."""
    return name == "security.capability" or name.startswith("user.")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _list_xattrs(target: int | bytes, path: str, operation: str = "list extended attributes") -> list[str]:
    """List the extended attribute names of an fd or a path (not followed).

    Returns [] where the filesystem has no extended attributes. Errors name
    path, the entry's path inside its layer, not target.
    """
    try:
        if isinstance(target, int):
            return os.listxattr(target)
        return os.listxattr(target, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        hint = ""
        if error.errno == errno.E2BIG:
            # btrfs stores any number of names, but the list that one
            # listxattr(2) call returns is at most XATTR_LIST_MAX bytes.
            hint = (f"the file has more extended attribute names than listxattr(2) can return "
                    f"({_XATTR_LIST_MAX} bytes); remove some of them")
        raise _os_error(error.errno, operation, path, hint) from None


def _read_xattrs(target: int | bytes, path: str, operation: str = "read extended attributes") -> dict[str, bytes]:
    """Read the carried extended attributes of an fd or a path (not followed).

    Errors name path, the entry's path inside its layer.
    """
    follow = isinstance(target, int)
    names = _list_xattrs(target, path, operation)
    values = {}
    for name in sorted(names):
        if not _is_carried_xattr(name):
            continue
        try:
            if follow:
                values[name] = os.getxattr(target, name)
            else:
                values[name] = os.getxattr(target, name, follow_symlinks=False)
        except OSError as error:
            if error.errno != errno.ENODATA:
                raise _os_error(error.errno, f"{operation} ({name})", path) from None
    return values


def _entry_xattrs(dir_fd: int, name: str, st: os.stat_result, path: str,
                  operation: str = "read extended attributes") -> dict[str, bytes]:
    # Linux allows user.* only on regular files and directories, and exec
    # reads security.capability only from regular files. So a diff carries
    # no extended attribute of other types and no capability of a directory.
    # apply sets none of them either (see _LayerApplier.check_capability).
    if stat.S_ISREG(st.st_mode):
        return _read_xattrs(_fd_path(dir_fd, name), path, operation)
    if not stat.S_ISDIR(st.st_mode):
        return {}
    xattrs = _read_xattrs(_fd_path(dir_fd, name), path, operation)
    xattrs.pop("security.capability", None)
    return xattrs


# Changes -------------------------------------------------------------------


def _same_mtime(a: os.stat_result, b: os.stat_result) -> bool:
    # Tar headers keep whole seconds, so a zero nanosecond part on either side
    # matches any nanoseconds (as containers/storage compares them).
    a_seconds, a_nanoseconds = divmod(a.st_mtime_ns, _NS_PER_SECOND)
    b_seconds, b_nanoseconds = divmod(b.st_mtime_ns, _NS_PER_SECOND)
    if a_seconds != b_seconds:
        return False
    return a_nanoseconds == b_nanoseconds or a_nanoseconds == 0 or b_nanoseconds == 0


def _entry_modified(layer_fd: int, parent_fd: int, name: str,
                    new: os.stat_result, old: os.stat_result, path: str) -> bool:
    """Compare an entry present in both the layer and its parent.

    A snapshot's placeholder for a nested subvolume has made-up metadata
    (its times are those of its in-memory inode), so it counts as changed
    only through its contents.
    """
    if _is_snapshot_placeholder(new):
        return False
    if (new.st_mode != old.st_mode or new.st_uid != old.st_uid or new.st_gid != old.st_gid
            or new.st_rdev != old.st_rdev):
        return True
    if not _same_mtime(new, old):
        return True
    if not stat.S_ISDIR(new.st_mode) and new.st_size != old.st_size:
        return True
    if stat.S_ISLNK(new.st_mode):
        return os.readlink(name, dir_fd=layer_fd) != os.readlink(name, dir_fd=parent_fd)
    return (_entry_xattrs(layer_fd, name, new, path)
            != _entry_xattrs(parent_fd, name, old, path, "read extended attributes in the parent layer"))


class _WalkedChange:
    """A change found by _walk_changes, with a handle on the layer entry.

    dir_fd and name locate the entry in the layer (not in the parent, for a
    DELETE) and stay valid only until the walk goes on. st is None for a DELETE.
    """

    __slots__ = ("location", "kind", "st", "dir_fd", "name")

    def __init__(self, location: _WalkPath, kind: ChangeKind, st: os.stat_result | None, dir_fd: int,
                 name: str) -> None:
        self.location = location
        self.kind = kind
        self.st = st
        self.dir_fd = dir_fd
        self.name = name

    @property
    def path(self) -> str:
        """The entry's path in the layer, "/a/b", built at each access in time proportional to its depth."""
        return str(self.location)


# Directory levels on each side whose fds a _walk_changes walk keeps open.
# The fds of the levels above them are closed and reopened on the way back.
_WALK_OPEN_LEVELS = 16


class _DirFrame:
    """A directory on the stack of _walk_changes. The walk's top, never reported, has st None and name "".

    parent_fd is None when the parent layer has no such directory. A closed
    fd (see _push_frame) is -1, and layer_id and parent_id, the
    (st_dev, st_ino) of both directories, check the directory reopened.
    """

    __slots__ = ("path", "layer_fd", "parent_fd", "layer_id", "parent_id", "entries", "parent_entries",
                 "changes_at_entry", "report_when_changed", "st", "name", "same_tree")

    def __init__(self, path: _WalkPath, layer_fd: int, parent_fd: int | None, report_when_changed: bool,
                 st: os.stat_result | None, name: str, changes_at_entry: int, same_tree: bool) -> None:
        self.path = path
        # Whether equal inode numbers on both sides name one inode: true in
        # the fast path, until the walk enters a nested subvolume.
        self.same_tree = same_tree
        self.layer_fd = layer_fd
        self.parent_fd = parent_fd
        self.layer_id = _file_id(os.fstat(layer_fd))
        self.parent_id = _file_id(os.fstat(parent_fd)) if parent_fd is not None else None
        self.entries = iter(_list_dir(layer_fd))
        self.parent_entries = ({entry.name: entry for entry in _list_dir(parent_fd)}
                               if parent_fd is not None else {})
        self.report_when_changed = report_when_changed
        self.changes_at_entry = changes_at_entry
        self.st = st
        self.name = name


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _is_plain_directory_entry(entry: _ListedEntry, st: os.stat_result) -> bool:
    """Return whether a listed directory, whose lstat is st, is a directory of its own subvolume.

    readdir() gives the entry of a nested subvolume (and of a snapshot's
    placeholder for one) the subvolume id as its inode number, while stat()
    gives 256 (2 for the placeholder).
    """
    return st.st_ino == entry.inode


def _push_frame(stack: list[_DirFrame], frame: _DirFrame) -> None:
    """Push frame, closing the fds of the level _WALK_OPEN_LEVELS above it.

    The open fds on each side are thus those of at most _WALK_OPEN_LEVELS
    of the deepest levels on the stack. On the parent layer's side these are
    the deepest levels that have a parent directory, because a level without
    one closes no parent fd: the level above it must be reopened from its
    own fd (see _pop_frame).
    """
    stack.append(frame)
    if len(stack) <= _WALK_OPEN_LEVELS:
        return
    above = stack[-1 - _WALK_OPEN_LEVELS]
    if above.layer_fd >= 0:
        os.close(above.layer_fd)
        above.layer_fd = -1
    if frame.parent_fd is not None and above.parent_fd is not None and above.parent_fd >= 0:
        os.close(above.parent_fd)
        above.parent_fd = -1


def _pop_frame(stack: list[_DirFrame]) -> _DirFrame:
    """Pop the deepest frame and close its fds, reopening those of the frame above it where closed."""
    frame = stack.pop()
    try:
        if stack:
            _reopen_frame(stack[-1], frame)
    finally:
        _close_frame(frame)
    return frame


def _reopen_frame(frame: _DirFrame, child: _DirFrame) -> None:
    """Reopen the closed fds of frame through ".." from those of child, its subdirectory's frame."""
    if frame.layer_fd < 0:
        frame.layer_fd = _open_walked_parent(child.layer_fd, frame.layer_id, frame.path)
    if frame.parent_fd is not None and frame.parent_fd < 0:
        # A closed parent fd has a deeper open one (see _push_frame), and
        # only the child is deeper.
        assert child.parent_fd is not None and child.parent_fd >= 0
        assert frame.parent_id is not None  # set for every frame with a parent_fd
        frame.parent_fd = _open_walked_parent(child.parent_fd, frame.parent_id, frame.path)


def _open_walked_parent(child_fd: int, expected: tuple[int, int], path: _WalkPath) -> int:
    """Open ".." of child_fd, a directory of the walk, and check that it is the directory expected.

    expected is the (st_dev, st_ino) of the directory at path when the walk
    entered it. The walk entered the child on the same mount, so ".." does
    not cross a mount point. Raises ESTALE when the child or its parent was
    moved or removed since.
    """
    try:
        fd = _open_directory_for_reading("..", child_fd)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
        raise _walk_changed_error(child_fd, "..", str(path) or "/", "was moved or removed") from None
    try:
        st = os.fstat(fd)
        if _file_id(st) != expected or st.st_nlink == 0:
            raise _walk_changed_error(child_fd, "..", str(path) or "/", "was moved or removed")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_frame(frame: _DirFrame) -> None:
    if frame.layer_fd >= 0:
        os.close(frame.layer_fd)
        frame.layer_fd = -1
    if frame.parent_fd is not None and frame.parent_fd >= 0:
        os.close(frame.parent_fd)
        frame.parent_fd = -1


def _walk_changes(layer_root_fd: int, parent_root_fd: int | None, top: str = "",
                  changed_inodes: set[int] | None = None) -> Iterator[_WalkedChange]:
    """Walk a layer and its parent together and yield their differences.

    With parent_root_fd None every entry is an ADD, in depth-first order with
    each directory before its contents. Otherwise the order is unspecified
    (callers sort), and a directory that contains a change and is not itself
    reported is yielded as MODIFY after its contents. The walk's top (path
    top, "" for the root) is never reported. Memory grows with the depth and
    the size of one directory, not with the whole tree. The walk keeps the
    directories of at most _WALK_OPEN_LEVELS levels open on each side, so
    trees deeper than the open-file limit are walked too.

    With changed_inodes (the tree-search fast path), an entry that is the
    same inode on both sides and not in changed_inodes counts as unchanged
    without a look, and a directory that is the same inode on both sides is
    not entered, because the fast path compares each dirty directory on its
    own. A directory that is another inode (one renamed into place, or a
    snapshot's placeholder for a nested subvolume) is compared in full, and
    so is everything below a nested subvolume, whose inode numbers come from
    another tree.
    """
    count = 0
    stack: list[_DirFrame] = []
    layer_fd = os.dup(layer_root_fd)
    parent_fd = None
    try:
        if parent_root_fd is not None:
            parent_fd = os.dup(parent_root_fd)
        stack.append(_DirFrame(_WalkPath(None, top), layer_fd, parent_fd, False, None, "", 0,
                               changed_inodes is not None))
    except BaseException:
        os.close(layer_fd)
        if parent_fd is not None:
            os.close(parent_fd)
        raise
    try:
        while stack:
            frame = stack[-1]
            descended = False
            for entry in frame.entries:
                name = entry.name
                # Built into a string only for an error or a caller that
                # reads it (see _WalkPath).
                path = frame.path.child(name)
                parent_entry = frame.parent_entries.pop(name, None)
                same_inode = frame.same_tree and parent_entry is not None and entry.inode == parent_entry.inode
                new = old = None
                if same_inode and entry.is_dir:
                    assert parent_entry is not None and frame.parent_fd is not None  # same_inode implies it
                    new = _lstat_walked(frame.layer_fd, name, path)
                    old = _lstat_walked(frame.parent_fd, name, path)
                    same_inode = _is_plain_directory_entry(entry, new) and _is_plain_directory_entry(parent_entry, old)
                if same_inode and changed_inodes is not None and entry.inode not in changed_inodes:
                    continue  # the same inode, unchanged since the snapshot
                if new is None:
                    new = _lstat_walked(frame.layer_fd, name, path)
                if old is None and parent_entry is not None:
                    assert frame.parent_fd is not None  # parent_entries is empty without a parent_fd
                    old = _lstat_walked(frame.parent_fd, name, path)
                reported = False
                if old is None:
                    count += 1
                    reported = True
                    yield _WalkedChange(path, ChangeKind.ADD, new, frame.layer_fd, name)
                else:
                    assert frame.parent_fd is not None  # parent_entries is empty without a parent_fd
                    if _entry_modified(frame.layer_fd, frame.parent_fd, name, new, old, str(path)):
                        count += 1
                        reported = True
                        yield _WalkedChange(path, ChangeKind.MODIFY, new, frame.layer_fd, name)
                if not stat.S_ISDIR(new.st_mode):
                    continue
                if same_inode and old is not None and stat.S_ISDIR(old.st_mode):
                    continue  # the fast path compares each dirty directory on its own
                child_fd = _open_listed_dir(frame.layer_fd, name, new, path)
                child_parent_fd = None
                if old is not None and stat.S_ISDIR(old.st_mode):
                    assert frame.parent_fd is not None  # parent_entries is empty without a parent_fd
                    try:
                        child_parent_fd = _open_listed_dir(frame.parent_fd, name, old, path)
                    except BaseException:
                        os.close(child_fd)
                        raise
                same_tree = (frame.same_tree and new.st_ino != BTRFS_FIRST_FREE_OBJECTID
                             and (old is None or old.st_ino != BTRFS_FIRST_FREE_OBJECTID))
                try:
                    child = _DirFrame(path, child_fd, child_parent_fd, not reported, new, name, count, same_tree)
                except BaseException:
                    os.close(child_fd)
                    if child_parent_fd is not None:
                        os.close(child_parent_fd)
                    raise
                _push_frame(stack, child)
                descended = True
                break
            if descended:
                continue

            for name in sorted(frame.parent_entries, key=os.fsencode):
                count += 1
                yield _WalkedChange(frame.path.child(name), ChangeKind.DELETE, None, frame.layer_fd, name)
            frame.parent_entries = {}
            _pop_frame(stack)
            if stack and frame.report_when_changed and count > frame.changes_at_entry:
                count += 1
                yield _WalkedChange(frame.path, ChangeKind.MODIFY, frame.st, stack[-1].layer_fd, frame.name)
    finally:
        for frame in stack:
            _close_frame(frame)


def _change_sort_key(change: Change) -> bytes:
    return os.fsencode(change.path)


def layer_changes(layer_dir: PathArg, parent_dir: PathArg | None = None) -> list[Change]:
    """Return the changes of a layer directory against its parent, sorted by path."""
    layer_fd = _open_layer_top(layer_dir, _open_directory_for_reading)
    parent_fd = None
    try:
        _check_no_mounts_below(layer_fd, "list layer changes", layer_dir)
        if parent_dir is not None:
            parent_fd = _open_layer_top(parent_dir, _open_directory_for_reading)
            _check_no_mounts_below(parent_fd, "list layer changes", parent_dir)
        changes = [Change(item.path, item.kind) for item in _walk_changes(layer_fd, parent_fd)]
    finally:
        os.close(layer_fd)
        if parent_fd is not None:
            os.close(parent_fd)
    changes.sort(key=_change_sort_key)
    return changes


def layer_diff_size(layer_dir: PathArg, parent_dir: PathArg | None = None) -> int:
    """Sum the sizes of the non-directories that a layer adds or modifies.

    Sizes are lstat sizes (a symlink counts its target's length), and an inode
    with several links counts once. Raises ValueError where layer_diff would,
    for a name starting with .wh..
    """
    layer_fd = _open_layer_top(layer_dir, _open_directory_for_reading)
    parent_fd = None
    try:
        _check_no_mounts_below(layer_fd, "measure layer diff", layer_dir)
        if parent_dir is not None:
            parent_fd = _open_layer_top(parent_dir, _open_directory_for_reading)
            _check_no_mounts_below(parent_fd, "measure layer diff", parent_dir)
        return _sum_sizes(_carried_stats(_walk_changes(layer_fd, parent_fd)))
    finally:
        os.close(layer_fd)
        if parent_fd is not None:
            os.close(parent_fd)


def _carried_stats(walk: Iterable[_WalkedChange]) -> Iterator[os.stat_result]:
    """Yield the stat of each entry that walk adds or modifies.

    Raises ValueError for a .wh.* name, as layer_diff does.
    """
    for item in walk:
        if item.name.startswith(WHITEOUT_PREFIX):
            _check_diff_path(item.path, item.kind == ChangeKind.DELETE)
        if item.kind != ChangeKind.DELETE and item.st is not None:
            yield item.st


def _sum_sizes(stats: Iterable[os.stat_result]) -> int:
    """Sum the sizes of non-directories, counting an inode with several links once."""
    total = 0
    seen_inodes = set()
    for st in stats:
        if stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            inode = (st.st_dev, st.st_ino)
            if inode in seen_inodes:
                continue
            seen_inodes.add(inode)
        total += st.st_size
    return total


def _changes_size(layer_dir: str, changes: list[Change]) -> int:
    """Sum the sizes of the non-directories that changes add or modify, as layer_diff_size does."""
    _check_change_names(changes)
    layer_fd = _open_layer_top(layer_dir, _open_directory_for_reading)
    try:
        return _sum_sizes(_lstat_changes(layer_fd, changes))
    finally:
        os.close(layer_fd)


def _lstat_changes(layer_fd: int, changes: list[Change]) -> Iterator[os.stat_result]:
    with _DirectoryOpener(layer_fd) as directories:
        for change in changes:
            if change.kind == ChangeKind.DELETE:
                continue
            yield _stat_changed_entry(layer_fd, directories, change.path)[2]


def _stat_changed_entry(layer_fd: int, directories: _DirectoryOpener,
                        path: str) -> tuple[int, str, os.stat_result]:
    """Return the open parent directory, the name and the stat of a changed entry at path.

    An entry removed since the changes were listed raises ESTALE naming its
    host path, as the walks do.
    """
    parts = _path_parts(path)
    try:
        dir_fd = directories.open(parts[:-1], path)
    except ValueError:
        # A directory on the path is no longer one: a symlink or a file took its place.
        raise _walk_changed_error(layer_fd, path.lstrip("/"), path,
                                  "is below an entry that was replaced by a non-directory") from None
    if dir_fd is None:
        raise _walk_changed_error(layer_fd, path.lstrip("/"), path, "was removed")
    try:
        st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise _walk_changed_error(dir_fd, parts[-1], path, "was removed") from None
    return dir_fd, parts[-1], st


def _layer_changes_fast(layer_dir: str, parent_dir: str | None = None) -> list[Change]:
    """Return layer_changes(layer_dir, parent_dir), by tree search when the layer is a snapshot of parent_dir."""
    if parent_dir is not None:
        changes = _snapshot_changes(layer_dir, parent_dir)
        if changes is not None:
            return changes
    return layer_changes(layer_dir, parent_dir)


# Changes of a snapshot through tree search --------------------------------

_INODE_TRANSID = struct.Struct("<Q")  # btrfs_inode_item.transid, at offset 8
_INODE_MODE = struct.Struct("<I")  # btrfs_inode_item.mode, at offset 52
_INODE_EXTREF_HEADER = struct.Struct("<QQH")  # parent_objectid, index, name_len


def _sync_filesystem(fd: int, path: str) -> None:
    """Write back dirty data and commit the running transaction (BTRFS_IOC_SYNC).

    TREE_SEARCH reads only the b-tree, and btrfs updates the inode item of a
    file written through the page cache only at writeback, and other recent
    inode updates only at a commit (they wait as delayed items until then).
    """
    _ioctl(fd, _structs.BTRFS_IOC_SYNC, 0, "sync filesystem", path)


def _changed_inodes(fd: int, tree_id: int, generation: int, path: str) -> tuple[set[int], set[int]]:
    """Return the inodes of a subvolume tree changed after generation, and which are directories.

    min_transid makes the kernel skip tree blocks not written since the
    snapshot. Those blocks that remain also contain unchanged items, so each
    inode item's own transid decides.
    """
    changed: set[int] = set()
    directories: set[int] = set()
    items = tree_search(fd, tree_id, (BTRFS_FIRST_FREE_OBJECTID, 0, 0),
                        (_structs.BTRFS_LAST_FREE_OBJECTID, 255, _U64_MAX),
                        min_transid=generation + 1, path=path)
    for item in items:
        if item.type != _structs.BTRFS_INODE_ITEM_KEY:
            continue
        if _INODE_TRANSID.unpack_from(item.data, 8)[0] <= generation:
            continue
        changed.add(item.objectid)
        if stat.S_ISDIR(_INODE_MODE.unpack_from(item.data, 52)[0]):
            directories.add(item.objectid)
    return changed, directories


def _parent_directories(fd: int, tree_id: int, inode: int, path: str) -> set[int]:
    """Return the directories that contain a name of inode, from its INODE_REF and INODE_EXTREF items."""
    parents = set()
    items = tree_search(fd, tree_id, (inode, _structs.BTRFS_INODE_REF_KEY, 0),
                        (inode, _structs.BTRFS_INODE_EXTREF_KEY, _U64_MAX), path=path)
    for item in items:
        if item.type == _structs.BTRFS_INODE_REF_KEY:
            parents.add(item.offset)
        elif item.type == _structs.BTRFS_INODE_EXTREF_KEY:
            position = 0
            while position + _INODE_EXTREF_HEADER.size <= len(item.data):
                parent, _, name_length = _INODE_EXTREF_HEADER.unpack_from(item.data, position)
                parents.add(parent)
                position += _INODE_EXTREF_HEADER.size + name_length
    return parents


def _dirty_directory_paths(fd: int, tree_id: int, generation: int, path: str) -> tuple[set[str], set[int]]:
    """Return the paths of directories whose entries may differ since generation, and the changed inodes.

    A directory is dirty when it changed itself (an entry was added, removed
    or renamed) or when it contains a name of a changed inode.
    """
    changed, directories = _changed_inodes(fd, tree_id, generation, path)
    dirty = set(directories)
    for inode in changed:
        if inode != BTRFS_FIRST_FREE_OBJECTID:
            dirty |= _parent_directories(fd, tree_id, inode, path)
    paths = set()
    for relative in _directory_paths(fd, tree_id, dirty, path).values():
        paths.add("/" + os.fsdecode(relative).strip("/") if relative else "")
    return paths, changed


def _nested_subvolume_directories(fd: int, tree_id: int, path: str) -> set[str]:
    """Return the paths of the directories that contain a nested subvolume of the subvolume fd.

    A snapshot has an empty placeholder directory where its source has a
    nested subvolume, and the directory entry keeps the subvolume id, so the
    tree search cannot see that difference.
    """
    directories = set()
    for subvolume in find_nested_subvolumes(fd, tree_id, path):
        parent = os.fsdecode(subvolume.path).rpartition("/")[0]
        directories.add("/" + parent if parent else "")
    return directories


def _open_directory_path(directories: _DirectoryOpener, path: str) -> int | None:
    """Open a directory below the opener's root without following symlinks; None if it is not one.

    The fd belongs to the opener and stays open until its next call.
    """
    try:
        return directories.open(_path_parts(path), path)
    except ValueError:
        return None


def _snapshot_changes(layer_dir: str, parent_dir: str) -> list[Change] | None:
    """Return the changes of a snapshot against its source by tree search, or None.

    Only directories that the search finds dirty on either side are compared,
    entry by entry, so the cost follows the size of the changes, not of the
    layer. Returns None when the fast path does not apply: the layer is not a
    snapshot of parent_dir, or the kernel rejects the search (it needs
    CAP_SYS_ADMIN). The result equals layer_changes(layer_dir, parent_dir).
    """
    layer_fd = _open_layer_top(layer_dir, _open_directory_for_reading)
    parent_fd = None
    try:
        parent_fd = _open_layer_top(parent_dir, _open_directory_for_reading)
        _check_no_mounts_below(layer_fd, "list layer changes", layer_dir)
        _check_no_mounts_below(parent_fd, "list layer changes", parent_dir)
        if not (_is_subvolume_stat(os.fstat(layer_fd)) and _is_subvolume_stat(os.fstat(parent_fd))):
            return None
        try:
            if bytes(_fs_info(layer_fd, layer_dir).fsid) != bytes(_fs_info(parent_fd, parent_dir).fsid):
                return None
            layer_info = _subvolume_info(layer_fd, layer_dir)
            parent_info = _subvolume_info(parent_fd, parent_dir)
            if bytes(layer_info.parent_uuid) != bytes(parent_info.uuid):
                return None
            generation = int(layer_info.otransid)
            _sync_filesystem(layer_fd, layer_dir)
            layer_paths, layer_changed = _dirty_directory_paths(
                layer_fd, int(layer_info.treeid), generation, layer_dir)
            parent_paths, parent_changed = _dirty_directory_paths(
                parent_fd, int(parent_info.treeid), generation, parent_dir)
            parent_paths |= _nested_subvolume_directories(parent_fd, int(parent_info.treeid), parent_dir)
        except OSError as error:
            if error.errno in (errno.EPERM, errno.EACCES, errno.ENOTTY, errno.EINVAL,
                               errno.EOPNOTSUPP, errno.ENAMETOOLONG):
                log.debug("comparing %s with %s file by file: tree search failed: %s",
                          layer_dir, parent_dir, error)
                return None
            raise
        return _compare_dirty_directories(layer_fd, parent_fd, layer_paths | parent_paths,
                                          layer_changed | parent_changed)
    finally:
        os.close(layer_fd)
        if parent_fd is not None:
            os.close(parent_fd)


def _compare_dirty_directories(layer_fd: int, parent_fd: int, paths: set[str],
                               changed_inodes: set[int]) -> list[Change]:
    """Compare the entries of each dirty directory and add the MODIFY of their ancestors.

    A dirty directory that is not a directory on both sides is skipped,
    because the comparison of one of its ancestors covers it.
    """
    changes: dict[str, Change] = {}
    containing: set[str] = set()
    # In sorted order, each directory is opened from the one before it.
    with _DirectoryOpener(layer_fd, _open_directory_for_reading) as layer_directories, \
            _DirectoryOpener(parent_fd, _open_directory_for_reading) as parent_directories:
        for path in sorted(paths, key=os.fsencode):
            layer_dir_fd = _open_directory_path(layer_directories, path)
            if layer_dir_fd is None:
                continue
            parent_dir_fd = _open_directory_path(parent_directories, path)
            if parent_dir_fd is None:
                continue
            found = False
            for item in _walk_changes(layer_dir_fd, parent_dir_fd, path, changed_inodes):
                changes[item.path] = Change(item.path, item.kind)
                found = True
            if found:
                containing.add(path)

    # As in the full walk, a directory that contains a change is reported.
    for path in containing:
        while path and path not in changes:
            changes[path] = Change(path, ChangeKind.MODIFY)
            path = path.rpartition("/")[0]
    return sorted(changes.values(), key=_change_sort_key)


# Diff (writing a layer tar) -------------------------------------------------


def _check_diff_path(path: str, deleted: bool = False) -> None:
    """Raise ValueError when a layer diff cannot carry the entry at path, or its deletion if deleted.

    The OCI image spec (layer.md, "Whiteouts") reserves names that start with
    .wh. for whiteouts and has no escape for them. apply_layer_diff reads
    .wh.NAME as the deletion of NAME and .wh..wh..opq as an opaque directory,
    and skips other .wh..wh.* names as AUFS metadata. So the deletion of an
    entry named .wh.NAME, whose whiteout is .wh..wh.NAME, is skipped too.
    """
    if "/" + WHITEOUT_PREFIX not in "/" + path:
        return  # a search in C, so a deep path skips the loop over its components
    parts = path.split("/")
    for index, part in enumerate(parts):
        if not part.startswith(WHITEOUT_PREFIX):
            continue
        entry = "/".join(parts[:index + 1])
        if deleted and index == len(parts) - 1:
            raise ValueError(f"layer diff cannot carry the deletion of {entry!r}: its whiteout would be named "
                             f"{WHITEOUT_PREFIX + part!r}, which every consumer of the diff drops as AUFS "
                             "metadata; diff the layer without a parent to export all of it instead")
        raise ValueError(f"layer diff cannot carry {entry!r}: a file named .wh.* would be read as a "
                         "whiteout by every consumer of the diff; rename or remove it in the layer")


def _check_change_names(changes: Iterable[Change]) -> None:
    """Raise ValueError when a layer diff cannot carry one of changes (see _check_diff_path)."""
    for change in changes:
        _check_diff_path(change.path, change.kind == ChangeKind.DELETE)


def _check_layer_names(layer_fd: int, layer_dir: PathArg) -> None:
    """Raise ValueError when an entry below layer_fd has a name that a layer diff cannot carry.

    The walk lists directories without a stat(2) of each entry, because
    readdir(2) returns the file type on btrfs.
    """

    def visit(fd: int, relative: _WalkPath, entries: list[Any]) -> list[bytes]:
        for entry in entries:
            if entry.name.startswith(WHITEOUT_PREFIX):
                _check_diff_path(str(relative.child(entry.name)))
        return [os.fsencode(entry.name) for entry in entries if entry.is_dir(follow_symlinks=False)]

    walk_tree(layer_fd, visit, path=layer_dir)


class _TarEntryWriter:
    """Writes layer entries into a PAX tar stream, keeping hard links linked.

    The second and later names of any non-directory inode (regular file,
    symlink, device node or FIFO) become hard link entries, as containers/storage
    archives them. GNU tar 1.34 links only regular files and symlinks, but
    extracts a hard link to any of them.

    NOTE: only links among the entries of one tar stay links. A new link to a
    file that the diff does not carry is archived as a copy, as containers/storage
    does, because finding the other names would take a walk of the whole layer.
    """

    def __init__(self, tar: tarfile.TarFile, uid_maps: Sequence[IDMap] | None,
                 gid_maps: Sequence[IDMap] | None) -> None:
        self.tar = tar
        self.uid_maps = uid_maps
        self.gid_maps = gid_maps
        self.link_names: dict[tuple[int, int], str] = {}

    def container_owner(self, st: os.stat_result, path: str) -> tuple[int, int]:
        """Return the owner of the entry st in the container, through the layer's ID maps.

        A snapshot placeholder's owner cannot be changed, so a remap never
        maps it. Its owner maps when it can, and is 0:0 otherwise.
        """
        try:
            return _map_owner(self.uid_maps, self.gid_maps, st.st_uid, st.st_gid, False, path)
        except ValueError:
            if not _is_snapshot_placeholder(st):
                raise
            return 0, 0

    def add(self, archive_name: str, path: str, dir_fd: int, name: str, st: os.stat_result) -> None:
        import tarfile

        if name.startswith(WHITEOUT_PREFIX):
            _check_diff_path(path)  # the entry can appear after layer_diff checked the names
        info = tarfile.TarInfo(archive_name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = self.container_owner(st, path)
        info.mtime = st.st_mtime_ns // _NS_PER_SECOND
        mode = st.st_mode
        data = None
        if stat.S_ISSOCK(mode):
            # Sockets are not carried in layers (nor by containers/storage).
            return
        first_name = self.first_link_name(archive_name, st)
        if first_name is not None:
            info.type = tarfile.LNKTYPE
            info.linkname = first_name
        elif stat.S_ISREG(mode):
            info.type = tarfile.REGTYPE
            info.size = st.st_size
            data = self._open_file(dir_fd, name, st, path)
        elif stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(name, dir_fd=dir_fd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor = os.major(st.st_rdev)
            info.devminor = os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            return  # a file type that tar cannot carry
        if info.type != tarfile.LNKTYPE:
            xattrs = _read_xattrs(data.fileno(), path) if data is not None else _entry_xattrs(dir_fd, name, st, path)
            self._map_capability(xattrs, path)
            info.pax_headers = self._xattr_records(xattrs, archive_name)
        try:
            self.tar.addfile(info, data)
        except OSError as error:
            # tarfile raises an OSError without errno when the data ends
            # before the size in the header. A failed write has an errno.
            if data is None or error.errno is not None:
                raise
            raise OSError(errno.ESTALE, f"file shrank below its size of {info.size} bytes while the diff "
                          "was written; stop whatever writes to the layer and run the diff again",
                          path) from None
        finally:
            if data is not None:
                data.close()
        _forget_tar_members(self.tar)  # tarfile keeps every member written; memory must stay flat

    def _map_capability(self, xattrs: dict[str, bytes], path: str) -> None:
        """Replace the security.capability in xattrs by the value that the container reads.

        A capability that the container cannot read (see
        _container_capability) is left out with a warning.
        """
        value = xattrs.get("security.capability")
        if value is None:
            return
        container_value = _container_capability(value, self.uid_maps)
        if container_value is not None:
            xattrs["security.capability"] = container_value
            return
        del xattrs["security.capability"]
        log.warning("not carrying security.capability of %s: its rootid %s has no container uid in the "
                    "ID maps, so the kernel does not honour it in the container", path, _capability_rootid(value))

    def first_link_name(self, archive_name: str, st: os.stat_result) -> str | None:
        """Return the archive name under which an earlier entry carried st's inode, or None.

        None also records archive_name as the first name of an inode with
        several links. Directories are never linked.
        """
        if st.st_nlink < 2 or stat.S_ISDIR(st.st_mode):
            return None
        inode = (st.st_dev, st.st_ino)
        first_name = self.link_names.get(inode)
        if first_name is None:
            self.link_names[inode] = archive_name
        return first_name

    @staticmethod
    def _xattr_records(xattrs: dict[str, bytes], archive_name: str) -> dict[str, str]:
        """Return the SCHILY.xattr PAX records of an entry's extended attributes.

        A PAX record's key must be UTF-8, and a reader ends it at the first
        "=", so a name that is not UTF-8 or contains "=" is skipped with a
        warning: "user.a=b" with value "v" would come back as "user.a" with
        value "b=v".
        """
        records = {}
        for key, value in xattrs.items():
            if not _is_utf8(key):
                log.warning("not carrying extended attribute %r of %s: its name is not UTF-8",
                            key, archive_name)
            elif "=" in key:
                log.warning("not carrying extended attribute %r of %s: its name contains '=', "
                            "which ends the key of a PAX record", key, archive_name)
            else:
                records["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        return records

    @staticmethod
    def _open_file(dir_fd: int, name: str, st: os.stat_result, path: str) -> io.BufferedReader:
        fd = _open_for_reading(name, _FILE_READ_FLAGS, dir_fd)
        try:
            if not os.path.samestat(os.fstat(fd), st):
                raise OSError(errno.ESTALE, "file was replaced while the diff was written", path)
            _check_mount_boundary(dir_fd, fd, "write layer diff", path)
        except BaseException:
            os.close(fd)
            raise
        return open(fd, "rb", closefd=True)

    def add_whiteout(self, path: str) -> None:
        import tarfile

        _check_diff_path(path, deleted=True)
        parent, _, name = path.rpartition("/")
        info = tarfile.TarInfo((parent + "/" + WHITEOUT_PREFIX + name).lstrip("/"))
        info.type = tarfile.REGTYPE
        info.mode = 0
        self.tar.addfile(info)
        _forget_tar_members(self.tar)


def _forget_tar_members(tar: tarfile.TarFile) -> None:
    """Empty the list of members that a TarFile keeps, without reading the rest of a stream.

    getmembers() returns the same list, but on a stream being read it first
    reads to the end. typeshed does not declare TarFile.members.
    """
    tar.members.clear()  # type: ignore[attr-defined]


def _write_full_tar(out: io.BufferedWriter, layer_fd: int, uid_maps: Sequence[IDMap] | None,
                    gid_maps: Sequence[IDMap] | None) -> None:
    import tarfile

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        writer = _TarEntryWriter(tar, uid_maps, gid_maps)
        for item in _walk_changes(layer_fd, None):
            assert item.st is not None  # a walk without a parent yields only ADDs
            writer.add(item.path.lstrip("/"), item.path, item.dir_fd, item.name, item.st)


def _write_changes_tar(out: io.BufferedWriter, layer_fd: int, changes: list[Change],
                       uid_maps: Sequence[IDMap] | None, gid_maps: Sequence[IDMap] | None) -> None:
    import tarfile

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        writer = _TarEntryWriter(tar, uid_maps, gid_maps)
        with _DirectoryOpener(layer_fd) as directories:
            for change in changes:
                if change.kind == ChangeKind.DELETE:
                    writer.add_whiteout(change.path)
                    continue
                dir_fd, name, st = _stat_changed_entry(layer_fd, directories, change.path)
                writer.add(change.path.lstrip("/"), change.path, dir_fd, name, st)


class _PipeReader(io.RawIOBase):
    """The read end of a pipe that a writer thread fills.

    Reading to the end raises the writer's exception, if it failed. Closing
    stops the writer (its next write fails with EPIPE), waits for it and
    calls release.
    """

    def __init__(self, write: Callable[[io.BufferedWriter], None], release: Callable[[], None] | None):
        import threading

        super().__init__()
        self._read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self._release = release
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write, write_fd),
                                        name="btrfsdrv-diff", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[io.BufferedWriter], None], write_fd: int) -> None:
        try:
            with open(write_fd, "wb", closefd=True) as out:
                write(out)
        except BrokenPipeError:
            pass  # the reader closed the stream early
        except BaseException as error:
            self._error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer)
        data = os.read(self._read_fd, len(view))
        if not data:
            self._thread.join()
            if self._error is not None:
                raise self._error
            return 0
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            os.close(self._read_fd)
            self._thread.join()
        finally:
            super().close()
            if self._release is not None:
                self._release()


def layer_diff(layer_dir: PathArg, parent_dir: PathArg | None = None, uid_maps: Sequence[IDMap] | None = (),
               gid_maps: Sequence[IDMap] | None = (), release: Callable[[], None] | None = None,
               changes: list[Change] | None = None) -> io.BufferedReader:
    """Stream a layer as an uncompressed PAX tar, as a readable binary file.

    Without a parent the tar contains the whole layer. Otherwise it contains
    the changed entries and a whiteout for each deletion; changes, when given,
    are those of layer_changes(layer_dir, parent_dir). Owners are mapped back
    to container ids with the given maps. Closing the file calls release.

    Raises ValueError before returning when an entry to be written, or a
    deleted one, has a name starting with .wh., which a layer tar cannot
    carry. Errors of the writer, for example a .wh.* name created while the
    tar is written, are raised by the read that reaches the end of the stream.
    """
    layer_fd = _open_layer_top(layer_dir, _open_directory_for_reading)
    try:
        _check_no_mounts_below(layer_fd, "write layer diff", layer_dir)
        # Names are checked before the writer starts, so that a diff the
        # format cannot carry raises here instead of after part of the tar.
        if parent_dir is None:
            _check_layer_names(layer_fd, layer_dir)

            def write(out: io.BufferedWriter) -> None:
                try:
                    _write_full_tar(out, layer_fd, uid_maps, gid_maps)
                finally:
                    os.close(layer_fd)
        else:
            if changes is None:
                changes = layer_changes(layer_dir, parent_dir)
            _check_change_names(changes)

            def write(out: io.BufferedWriter) -> None:
                try:
                    _write_changes_tar(out, layer_fd, changes, uid_maps, gid_maps)
                finally:
                    os.close(layer_fd)
        raw = _PipeReader(write, release)
    except BaseException:
        os.close(layer_fd)
        raise
    return io.BufferedReader(raw, buffer_size=_COPY_CHUNK)


# Apply (reading a layer tar) ------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Counts the bytes read from the caller's stream, for progress reports."""

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self.source = source
        self.count = 0
        self.prefix = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer)
        if self.prefix:
            size = min(len(view), len(self.prefix))
            view[:size] = self.prefix[:size]
            self.prefix = self.prefix[size:]
            return size
        data = self.source.read(len(view))
        if not data:
            return 0
        self.count += len(data)
        view[:len(data)] = data
        return len(data)

    def peek_magic(self, size: int) -> bytes:
        """Read up to size bytes and keep them to be read again."""
        while len(self.prefix) < size:
            data = self.source.read(size - len(self.prefix))
            if not data:
                break
            self.count += len(data)
            self.prefix += data
        return self.prefix


class _CorruptStream(ValueError):
    """Compressed data that cannot be decompressed."""


class _TarInput(io.RawIOBase):
    """The decompressed tar bytes, with the tail kept to check the end-of-archive block.

    Decompressor failures become _CorruptStream, so that callers can
    distinguish them from filesystem errors. compression is the name of the
    stream's compression ("gzip", "zstd"), or None for a plain tar.
    """

    _TAIL = 64 * 1024

    def __init__(self, source: io.BufferedIOBase, compression: str | None = None,
                 decompression_errors: tuple[type[BaseException], ...] = ()) -> None:
        super().__init__()
        self.source = source
        self.compression = compression
        self.errors = decompression_errors
        self.position = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer)
        try:
            data = self.source.read(len(view))
        except self.errors as error:
            raise _CorruptStream(f"truncated or corrupt {self.compression} stream: {error}") from None
        if not data:
            return 0
        view[:len(data)] = data
        self.position += len(data)
        self.tail += data
        if len(self.tail) > 2 * self._TAIL:
            del self.tail[:-self._TAIL]
        return len(data)

    def block_at(self, offset: int) -> bytes | None:
        """Return the 512-byte block at offset if it was read and is still kept."""
        start = offset - (self.position - len(self.tail))
        if start < 0 or offset + 512 > self.position:
            return None
        return bytes(self.tail[start:start + 512])

    def bytes_at(self, offset: int, size: int) -> bytes:
        """Return at most size bytes read from offset on. The bytes at offset must still be kept."""
        start = offset - (self.position - len(self.tail))
        assert start >= 0, "the bytes at offset are no longer kept"
        return bytes(self.tail[start:start + size])


# Memory that the xz decoder may use. liblzma needs the dictionary size that
# a stream's header states plus about 1 MiB, so streams of xz -9 and -9e
# (64 MiB dictionaries) need 65 MiB (the preset table of xz(1)).
_XZ_MEMORY_LIMIT = 128 * 1024 * 1024


class _XzReader(io.RawIOBase):
    """Decompresses xz streams like lzma.LZMAFile, but with a memory limit.

    A stream's header sets the dictionary size, up to 4 GiB, and the decoder
    allocates and fills a dictionary of that size. Like LZMAFile, the reader
    decodes concatenated streams and ignores data after a complete stream
    that does not start another one, but it reads that data to the end of
    the input. A stream that ends early raises EOFError, and corrupt data
    raises lzma.LZMAError.

    NOTE: as in LZMAFile, null bytes after a stream (xz stream padding, which
    the xz command skips) are decoded as the start of an .lzma stream, so a
    stream after them is ignored, or the reader raises EOFError.
    """

    def __init__(self, source: io.BufferedIOBase, memory_limit: int = _XZ_MEMORY_LIMIT) -> None:
        super().__init__()
        import lzma

        self._lzma = lzma
        self._source = source
        self._memory_limit = memory_limit
        self._decompressor = self._new_decompressor()
        self._finished = False

    def _new_decompressor(self) -> lzma.LZMADecompressor:
        return self._lzma.LZMADecompressor(format=self._lzma.FORMAT_AUTO, memlimit=self._memory_limit)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer)
        if self._finished or not len(view):
            return 0
        while True:
            if self._decompressor.eof:
                data = self._decompressor.unused_data or self._source.read(_COPY_CHUNK)
                if not data:
                    self._finished = True
                    return 0
                self._decompressor = self._new_decompressor()
                try:
                    output = self._decompress(data, len(view))
                except self._lzma.LZMAError:
                    # Not another stream: ignored, as LZMAFile does.
                    while self._source.read(_COPY_CHUNK):
                        pass
                    self._finished = True
                    return 0
            else:
                data = b""
                if self._decompressor.needs_input:
                    data = self._source.read(_COPY_CHUNK)
                    if not data:
                        raise EOFError("the input ends before the end of the stream")
                output = self._decompress(data, len(view))
            if output:
                view[:len(output)] = output
                return len(output)

    def _decompress(self, data: bytes, max_length: int) -> bytes:
        """Decompress up to max_length bytes, raising _CorruptStream when the memory limit is exceeded."""
        try:
            return self._decompressor.decompress(data, max_length)
        except self._lzma.LZMAError as error:
            # CPython's _lzma module (checked with 3.11) reports LZMA_MEMLIMIT_ERROR
            # with this message and no error code. Under another message the
            # error is handled as corrupt data (after a complete stream, as
            # data to ignore), and memory stays within the limit either way.
            if str(error) != "Memory usage limit exceeded":
                raise
            raise _CorruptStream(
                f"xz stream needs more than {self._memory_limit // (1024 * 1024)} MiB of memory to "
                "decode, because its header states a larger dictionary. Recompress the layer with a "
                "dictionary of at most 64 MiB (xz -9 or a lower preset)") from None


# ZSTD_d_windowLogMax of zstd.h, and the largest window that the zstd
# decoder of containers/storage (klauspost/compress, MaxWindowSize) accepts.
_ZSTD_D_WINDOW_LOG_MAX = 100
_ZSTD_WINDOW_LOG_MAX = 29
# The first bytes of a zstd frame; skippable frames start with 0x184D2A5?,
# both little-endian.
_ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstd stream with the system's libzstd through ctypes."""

    def __init__(self, source: io.BufferedIOBase) -> None:
        super().__init__()
        import ctypes

        self._stream: int | None = None  # close() runs from the finalizer even if loading fails
        try:
            lib = ctypes.CDLL("libzstd.so.1")
        except OSError as error:
            raise OSError(errno.ENOENT, "the layer is zstd-compressed, but libzstd.so.1 could not "
                          f"be loaded (install libzstd1): {error}") from None

        class Buffer(ctypes.Structure):
            """ZSTD_inBuffer and ZSTD_outBuffer of zstd.h (same layout)."""

            _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]

        lib.ZSTD_createDStream.restype = ctypes.c_void_p
        lib.ZSTD_freeDStream.argtypes = [ctypes.c_void_p]
        lib.ZSTD_initDStream.argtypes = [ctypes.c_void_p]
        lib.ZSTD_initDStream.restype = ctypes.c_size_t
        lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(Buffer), ctypes.POINTER(Buffer)]
        lib.ZSTD_decompressStream.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        self._ctypes = ctypes
        self._lib = lib
        self._buffer_type = Buffer
        self._source = source
        self._stream = lib.ZSTD_createDStream()
        if not self._stream:
            raise MemoryError("ZSTD_createDStream failed")
        self._check(lib.ZSTD_initDStream(self._stream))
        self._set_window_log_max(lib)
        self._input = ctypes.create_string_buffer(0)
        self._in = Buffer(ctypes.addressof(self._input), 0, 0)
        self._frame_complete = True
        # Whether the last call filled its output buffer inside a frame, so
        # that the decoder may hold bytes it can return without more input.
        self._output_pending = False

    def _set_window_log_max(self, lib: Any) -> None:
        """Accept frames with windows up to 2**_ZSTD_WINDOW_LOG_MAX bytes, as containers/storage does.

        libzstd accepts 2**27 (128 MiB) by default, less than `zstd --long`
        may write. ZSTD_DCtx_setParameter is stable since zstd 1.4.0, and a
        ZSTD_DStream is a ZSTD_DCtx.
        NOTE: an older libzstd keeps its default, and rejects such frames.
        """
        set_parameter = getattr(lib, "ZSTD_DCtx_setParameter", None)
        if set_parameter is None:
            return
        set_parameter.argtypes = [self._ctypes.c_void_p, self._ctypes.c_int, self._ctypes.c_int]
        set_parameter.restype = self._ctypes.c_size_t
        self._check(set_parameter(self._stream, _ZSTD_D_WINDOW_LOG_MAX, _ZSTD_WINDOW_LOG_MAX))

    def _check(self, result: int) -> int:
        if self._lib.ZSTD_isError(result):
            name = self._lib.ZSTD_getErrorName(result).decode()
            if name == "Frame requires too much memory for decoding":
                raise _CorruptStream(
                    f"zstd frame needs a window larger than {2 ** _ZSTD_WINDOW_LOG_MAX // 2 ** 20} MiB, which "
                    f"containers/storage rejects too; recompress the layer with zstd --long={_ZSTD_WINDOW_LOG_MAX} "
                    "or less")
            raise _CorruptStream(f"truncated or corrupt zstd stream: {name}")
        return result

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Decompress into buffer, and raise at the end of the input unless the last frame is complete.

        ZSTD_decompressStream checks a frame's content checksum, when the
        frame has one, as it decodes the frame's end.
        """
        ctypes = self._ctypes
        view = memoryview(buffer)
        target = (ctypes.c_char * len(view)).from_buffer(view)
        out = self._buffer_type(ctypes.addressof(target), len(view), 0)
        while out.pos == 0:
            if self._in.pos == self._in.size and not self._output_pending:
                data = self._source.read(_COPY_CHUNK)
                if not data:
                    if not self._frame_complete:
                        raise _CorruptStream("truncated or corrupt zstd stream: "
                                             "the input ends inside a frame")
                    return 0
                self._set_input(data)
            if self._frame_complete:
                self._check_frame_magic()
            result = self._check(self._lib.ZSTD_decompressStream(self._stream, ctypes.byref(out),
                                                                 ctypes.byref(self._in)))
            self._frame_complete = result == 0
            self._output_pending = result != 0 and out.pos == out.size
        return int(out.pos)

    def _set_input(self, data: bytes) -> None:
        self._input = self._ctypes.create_string_buffer(data, len(data))
        self._in = self._buffer_type(self._ctypes.addressof(self._input), len(data), 0)

    def _check_frame_magic(self) -> None:
        """Raise _CorruptStream unless the input at a frame boundary starts a zstd or skippable frame.

        libzstd also decodes the frames of zstd 0.5 to 0.7 there, which the
        decoder of containers/storage rejects. Fewer than 4 bytes left at the
        end of the input are left to the decoder, which finds them truncated.
        """
        unread = self._input.raw[self._in.pos:self._in.size]
        if len(unread) < 4:
            more = self._source.read(_COPY_CHUNK)
            if not more:
                return
            unread += more
            self._set_input(unread)
        magic = unread[:4]
        if magic == _ZSTD_FRAME_MAGIC or (magic[0] & 0xF0 == 0x50 and magic[1:] == b"\x2a\x4d\x18"):
            return
        raise _CorruptStream(f"invalid zstd stream: a frame starts with magic number {magic.hex()}, "
                             "which is not that of a zstd frame (28b52ffd); containers/storage rejects it, "
                             "so recompress the layer with a current zstd")

    def close(self) -> None:
        if not self.closed and self._stream is not None:
            self._lib.ZSTD_freeDStream(self._stream)
            self._stream = None
        super().close()


# Go's compress/gzip reads the file name and the comment of a gzip header
# into a 512-byte buffer, NUL included, and rejects longer ones (ErrHeader).
_GZIP_STRING_MAX = 511
# The longest gzip header that Go reads: 10 fixed bytes, an extra field of
# up to 2 + 65,535 bytes, a file name, a comment and a 2-byte header CRC.
_GZIP_HEADER_MAX = 10 + 2 + 65535 + 2 * (_GZIP_STRING_MAX + 1) + 2


class _PrefixedReader:
    """A binary stream that returns prefix, then what rest returns."""

    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        self.prefix = prefix
        self.rest = rest

    def read(self, size: int = -1) -> bytes:
        if not self.prefix:
            return self.rest.read(size)
        if size < 0:
            data, self.prefix = self.prefix + self.rest.read(), b""
            return data
        data, self.prefix = self.prefix[:size], self.prefix[size:]
        return data


def _check_gzip_header(header: bytes) -> None:
    """Raise ValueError for a gzip header that Go's compress/gzip rejects and Python's gzip module reads.

    header contains the stream's first bytes. Python's gzip module reads a name
    or comment of any length and ignores the header CRC.
    NOTE: only the first member's header is checked.
    """
    if len(header) < 10:
        return  # gzip reports the truncated header
    flags = header[3]
    offset = 10
    if flags & 0x04:  # FEXTRA: a 2-byte length, then that many bytes
        if len(header) < 12:
            return
        offset += 2 + int.from_bytes(header[10:12], "little")
    for bit, field in ((0x08, "file name"), (0x10, "comment")):
        if not flags & bit:
            continue
        end = header.find(b"\0", offset, offset + _GZIP_STRING_MAX + 1)
        if end < 0:
            if len(header) <= offset + _GZIP_STRING_MAX:
                return  # not enough input to tell
            raise ValueError(f"invalid gzip layer: the {field} in its header is longer than {_GZIP_STRING_MAX} "
                             "bytes, which containers/storage (Go's compress/gzip) rejects; compress the tar "
                             "without storing the name (gzip -n)")
        offset = end + 1
    if flags & 0x02 and len(header) >= offset + 2:  # FHCRC: the low 16 bits of the CRC-32 of what precedes it
        import zlib

        if zlib.crc32(header[:offset]) & 0xFFFF != int.from_bytes(header[offset:offset + 2], "little"):
            raise ValueError("invalid gzip layer: the CRC of its header does not match the header, which "
                             "containers/storage (Go's compress/gzip) rejects; compress the tar again")


def _decompressed(counting: _CountingReader) -> _TarInput:
    """Detect the compression of a layer stream by its magic bytes and undo it."""
    magic = counting.peek_magic(6)
    raw = io.BufferedReader(counting, buffer_size=_COPY_CHUNK)
    if magic.startswith(b"\x1f\x8b"):
        import gzip
        import zlib

        header = raw.read(_GZIP_HEADER_MAX)
        _check_gzip_header(header)
        source = _PrefixedReader(header, raw)
        return _TarInput(gzip.GzipFile(fileobj=source, mode="rb"), "gzip",  # type: ignore[call-overload]
                         (EOFError, OSError, zlib.error))
    if magic.startswith(b"BZh"):
        import bz2

        return _TarInput(bz2.BZ2File(raw), "bzip2", (EOFError, OSError))
    if magic.startswith(b"\xfd7zXZ\x00"):
        import lzma

        xz_reader = io.BufferedReader(_XzReader(raw), buffer_size=_COPY_CHUNK)
        return _TarInput(xz_reader, "xz", (EOFError, lzma.LZMAError))
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        # _ZstdReader raises _CorruptStream itself.
        return _TarInput(io.BufferedReader(_ZstdReader(raw), buffer_size=_COPY_CHUNK), "zstd")
    return _TarInput(raw)


def _check_block_after_end(tar_input: _TarInput, offset: int) -> None:
    """Raise ValueError unless the 512 bytes at offset, after the first zero block of a tar, are zeros or absent.

    tarfile ends a tar at its first zero block. Go's archive/tar (readHeader)
    ends it there only when the stream ends or a second zero block follows,
    and rejects the tar otherwise, so entries after a lone zero block are
    never dropped without an error.
    """
    end = offset + 512
    while tar_input.position < end and tar_input.read(end - tar_input.position):
        pass
    block = tar_input.bytes_at(offset, 512)
    if block and block != bytes(512):
        raise ValueError(f"invalid layer tar at offset {offset}: the zero block before it is followed by data, "
                         "not by a second zero block, so Go's archive/tar rejects the tar")


def _read_to_end(tar_input: _TarInput) -> None:
    """Read the rest of a layer stream after its end-of-archive block and discard it.

    Decompressors check their CRCs, content checksums and end markers only
    when they reach the end of the stream, so a truncated or corrupt stream
    raises here. Whatever follows the end of a plain tar is read and ignored,
    as the pkg/chrootarchive of containers/storage does after unpacking
    (tar pads its output to whole records). A program writing the layer
    into a pipe then does not fail with EPIPE.
    """
    while tar_input.read(_COPY_CHUNK):
        pass


class _PendingDirTimes:
    """Directory times to set once all entries are applied, spilled to a file.

    Creating entries in a directory changes its mtime, so directory times are
    set last. Records go to an unnamed temporary file, so memory stays flat
    however many directories the layer has.
    """

    _HEADER = struct.Struct("=qqI")

    def __init__(self) -> None:
        import tempfile

        self.file = tempfile.TemporaryFile()

    def add(self, parts: Sequence[str], atime_ns: int, mtime_ns: int) -> None:
        path = os.fsencode("/".join(parts))
        self.file.write(self._HEADER.pack(atime_ns, mtime_ns, len(path)) + path)

    def apply(self, root_fd: int) -> None:
        self.file.seek(0)
        with _DirectoryOpener(root_fd) as directories:
            while True:
                header = self.file.read(self._HEADER.size)
                if not header:
                    break
                atime_ns, mtime_ns, length = self._HEADER.unpack(header)
                self._set_times(directories, os.fsdecode(self.file.read(length)), (atime_ns, mtime_ns))

    @staticmethod
    def _set_times(directories: _DirectoryOpener, path: str, times: tuple[int, int]) -> None:
        if not path:
            os.utime(directories.root_fd, ns=times)
            return
        parts = path.split("/")
        try:
            dir_fd = directories.open(parts[:-1], path)
        except ValueError:
            return  # a later entry replaced a parent with a non-directory
        if dir_fd is None:
            return
        st = _lstat_at(dir_fd, parts[-1])
        if st is not None and stat.S_ISDIR(st.st_mode):
            os.utime(parts[-1], ns=times, dir_fd=dir_fd, follow_symlinks=False)

    def close(self) -> None:
        self.file.close()


# Names of the temporary files apply_diff makes in a layer's root directory
# and in the top directories of its nested subvolumes.
_APPLY_TEMPORARY_PREFIX = ".btrfsdrv-"


def _remove_apply_temporaries(dir_fd: int, path: Any) -> None:
    """Delete the temporary files that a killed apply_diff left in the directory dir_fd at path."""
    pattern = re.compile(re.escape(_APPLY_TEMPORARY_PREFIX) + r"(apply|epoch)-[0-9a-f]{16}")
    # NOTE: a layer file that a tar or a container gave such a name is deleted
    # too. The random 16-digit suffix makes that unlikely, not impossible.
    with os.scandir(dir_fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries
                 if pattern.fullmatch(entry.name)]
    for name, is_dir in names:
        with _suppress_missing():
            if is_dir:
                _remove_tree(dir_fd, name)
            else:
                os.unlink(name, dir_fd=dir_fd)
            log.warning("removed %s, left by an apply_diff that was killed",
                        os.path.join(os.fsdecode(path), name))


def _remove_nested_apply_temporaries(root_fd: int, layer_dir: PathArg) -> None:
    """Delete what a killed apply_diff left in the top directories of the layer's nested subvolumes.

    A nested subvolume that cannot be listed, entered or written (EACCES,
    EPERM, EROFS) is skipped with a warning, because what is left there takes
    space but does not disturb an apply.
    """
    if not _is_subvolume_stat(os.fstat(root_fd)):
        # NOTE: the search lists subvolumes by their path from the top of a
        # subvolume, so below a layer directory that is not one, what a killed
        # apply left in a nested subvolume stays.
        return
    try:
        root_id = _subvolume_id_of_fd(root_fd, layer_dir)
    except OSError as error:
        if error.errno in _IOCTL_UNSUPPORTED:
            return  # not on btrfs, so there are no subvolumes
        raise
    # NOTE: without CAP_SYS_ADMIN on kernels before Linux 4.18 the search
    # reads every directory of the layer, on every apply.
    try:
        nested = find_nested_subvolumes(root_fd, root_id, layer_dir)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM):
            raise
        log.warning("cannot list the nested subvolumes of %s to remove what a killed apply_diff left "
                    "in them: %s", os.fsdecode(layer_dir), error)
        return
    with _DirectoryOpener(root_fd) as directories:
        for subvolume in _in_tree_order(nested):
            display = _nested_display(layer_dir, subvolume.path)
            try:
                _remove_subvolume_apply_temporaries(directories, root_fd, subvolume, display)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                log.warning("cannot remove what a killed apply_diff left in %s: %s", display, error)


def _remove_subvolume_apply_temporaries(directories: _DirectoryOpener, root_fd: int, subvolume: NestedSubvolume,
                                        display: str) -> None:
    """Delete the apply temporaries in the top directory of one nested subvolume, if it is still there."""
    opened = _open_nested_top(directories, subvolume.path)
    if opened is None:
        return
    with _Fd(opened[1]) as fd:
        _check_same_mount(root_fd, fd, "apply layer diff", display)
        if _is_subvolume_stat(os.fstat(fd)):
            _remove_apply_temporaries(fd, display)


def _open_device_top(fd: int) -> int:
    """Open the top directory of the subvolume or filesystem that contains the directory fd."""
    return _open_device_top_and_depth(fd)[0]


def _open_device_top_and_depth(fd: int) -> tuple[int, int]:
    """Open the top directory of the subvolume or filesystem that contains the directory fd, and count its levels.

    It is the highest directory that ".." reaches from fd without a change
    of st_dev, because the ".." of a subvolume's top directory is in the
    subvolume that contains it. The count is how many ".." led there.
    """
    top = os.dup(fd)
    levels = 0
    try:
        top_st = os.fstat(top)
        while True:
            parent = _open_directory("..", top)
            parent_st = os.fstat(parent)
            if parent_st.st_dev != top_st.st_dev or parent_st.st_ino == top_st.st_ino:
                os.close(parent)
                return top, levels
            os.close(top)
            top, top_st = parent, parent_st
            levels += 1
    except BaseException:
        os.close(top)
        raise


def _layer_epoch(root_fd: int, layer_dir: PathArg) -> int:
    """Return a ctime that every inode this apply creates or changes will reach.

    The kernel stamps ctime from a coarse clock, so the epoch is read from a
    probe inode. The probe is repeated until that clock moves on, so every
    inode changed before this call has a smaller ctime than the result.
    """
    name = f"{_APPLY_TEMPORARY_PREFIX}epoch-{os.urandom(8).hex()}"
    first = None
    while True:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=root_fd)
        except FileNotFoundError:
            # Creating an entry in a deleted directory fails with ENOENT.
            raise _os_error(errno.ENOENT, "apply layer diff", layer_dir,
                            "the layer was removed during the apply") from None
        except PermissionError as error:
            raise _os_error(error.errno, "apply layer diff", layer_dir,
                            "the layer's top directory is not writable by this user (a new layer "
                            "without a parent has mode 0555); run as root or make it writable") from None
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # NOTE: so a layer that is full cannot take even a diff that only deletes.
            raise _os_error(error.errno, "apply layer diff", layer_dir,
                            "no room for the apply's probe file; free space on the filesystem or "
                            "raise the layer's size limit") from None
        try:
            ctime = os.fstat(fd).st_ctime_ns
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=root_fd)
        if first is None:
            first = ctime
        elif ctime > first:
            return ctime
        time.sleep(0.001)


# Callback that copies a regular-file entry's data from the tar into the given file.
_DataReader = Callable[["tarfile.TarInfo", io.BufferedWriter], None]


_TAR_ID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2)
# Linux keeps 12 bits of a device's major number and 20 bits of its minor
# number (MINORBITS in linux/kdev_t.h), so mknod(2) rejects larger ones.
_TAR_DEVICE_MAJOR_MAX = 2**12 - 1
_TAR_DEVICE_MINOR_MAX = 2**20 - 1
# NOTE: seconds whose nanoseconds fit in int64 (up to the year 2262), because
# the applier keeps directory times in nanoseconds. btrfs stores later times,
# so a layer with one exports a diff that apply_diff rejects.
_TAR_MTIME_MAX = 2**63 // 1_000_000_000 - 1
_XATTR_NAME_MAX = 255  # XATTR_NAME_MAX of linux/limits.h
_XATTR_SIZE_MAX = 65536  # XATTR_SIZE_MAX of linux/limits.h
_XATTR_LIST_MAX = 65536  # XATTR_LIST_MAX of linux/limits.h
_PATH_MAX = 4096  # PATH_MAX of linux/limits.h, with the terminating NUL
# struct vfs_cap_data sizes and magic_etc values of linux/capability.h.
_VFS_CAP_SIZE_2 = 20
_VFS_CAP_SIZE_3 = 24
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000
_VFS_CAP_FLAGS_EFFECTIVE = 0x000001


# tarfile reads a PAX extended header or a GNU long name whole into memory,
# so a few hundred kilobytes of compressed input could claim gigabytes.
_EXTENDED_HEADER_MAX = 1 << 20
_bounded_tarinfo: Any = None


def _bounded_tarinfo_class() -> Any:
    """Return the TarInfo subclass that apply_diff parses headers with.

    It rejects extended headers over 1 MiB before reading them, and more
    than _EXTENDED_HEADER_CHAIN_MAX of them in front of one entry, because
    tarfile parses each one a recursion level deeper and keeps the ones
    before it. It also rejects old GNU sparse maps over 1 MiB and malformed
    PAX headers. It parses PAX headers itself, in time linear in their size,
    and applies only the records that Go's archive/tar applies. It ignores
    global PAX headers.

    Of the extended headers in front of one entry it applies those that Go's
    archive/tar (Reader.next in reader.go) applies: only the last PAX header,
    only the last GNU long name and long link name, a GNU long name over a
    PAX path and a long link name over a PAX linkpath, and none in front of
    a global header. tarfile parses the chain recursively, so the headers
    nearest the entry are applied first and mark what they applied (see
    _applied_extended_headers) for the outer ones to skip.
    """
    global _bounded_tarinfo
    if _bounded_tarinfo is None:
        import tarfile

        # The methods' tarfile parameter hides the module. TarFile.next()
        # turns header_error (undeclared in typeshed) into ReadError.
        global_header_type = tarfile.XGLTYPE
        header_error = tarfile.SubsequentHeaderError  # type: ignore[attr-defined]
        any_header_error = tarfile.HeaderError
        old_gnu_sparse_type = tarfile.GNUTYPE_SPARSE
        long_name_type = tarfile.GNUTYPE_LONGNAME
        solaris_header_type = tarfile.SOLARIS_XHDTYPE
        supported_types = tarfile.SUPPORTED_TYPES
        block_size = tarfile.BLOCKSIZE
        nts = tarfile.nts  # type: ignore[attr-defined]
        tarfile_number = tarfile.nti  # type: ignore[attr-defined]

        def has_valid_checksum(block: bytes) -> bool:
            # The check of tarfile's frombuf, which Go's getFormat also makes.
            if len(block) != block_size:
                return False
            try:
                return tarfile_number(block[148:156]) in tarfile.calc_chksums(block)  # type: ignore[attr-defined]
            except any_header_error:
                return False

        class BoundedTarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tarfile: Any) -> Any:
                # TarInfo.fromtarfile, with the header block checked against Go's reading of it.
                block = tarfile.fileobj.read(block_size)
                offset = tarfile.fileobj.tell() - block_size
                old_gnu_sparse = None
                parsed_block = block
                if block[156:157] == old_gnu_sparse_type and has_valid_checksum(block):
                    # tarfile's frombuf would parse the map and the real
                    # size with its own rules, and raise for numbers that
                    # Go's archive/tar never reads.
                    old_gnu_sparse = _read_old_gnu_sparse_header(block, offset)
                    parsed_block = _without_old_gnu_sparse_fields(block)
                header: Any = cls.frombuf(parsed_block, tarfile.encoding, tarfile.errors)
                header.offset = offset
                if old_gnu_sparse is not None:
                    header.chksum = tarfile_number(block[148:156])
                header._btrfsdrv_typeflag = block[156:157]
                header._btrfsdrv_old_gnu_sparse = old_gnu_sparse
                _check_header_as_go_reads(header, block)
                if block[156] == 0:
                    # tarfile decided from the name field alone whether the
                    # entry is a directory, before it joined the prefix.
                    name = nts(block[0:100], tarfile.encoding, tarfile.errors)
                    prefix = nts(block[345:500], tarfile.encoding, tarfile.errors)
                    header._btrfsdrv_go_name = prefix + "/" + name if prefix else name
                return header._proc_member(tarfile)

            def _check_extended_size(self, tarfile: Any) -> None:
                if self.size < 0:
                    raise header_error(f"extended header size {self.size} is negative")
                if self.size > _EXTENDED_HEADER_MAX:
                    raise header_error(f"extended header of {self.size} bytes is larger than {_EXTENDED_HEADER_MAX}")
                chain = getattr(tarfile, "_btrfsdrv_header_chain", 0)
                if chain >= _EXTENDED_HEADER_CHAIN_MAX:
                    raise header_error(f"more than {_EXTENDED_HEADER_CHAIN_MAX} extended headers in front of "
                                       "one entry")

            def _proc_gnulong(self, tarfile: Any) -> Any:
                self._check_extended_size(tarfile)
                with _ExtendedHeaderChain(tarfile):
                    return self._proc_bounded_gnulong(tarfile)

            def _proc_bounded_gnulong(self, tarfile: Any) -> Any:
                data = tarfile.fileobj.read(self._block(self.size))  # type: ignore[attr-defined]
                if len(data) < self.size:
                    raise header_error(f"GNU long name ends early, after {len(data)} of its {self.size} bytes")
                try:
                    next = self.fromtarfile(tarfile)
                except any_header_error as error:
                    raise header_error(str(error)) from None
                next.offset = self.offset
                kind = "longname" if self.type == long_name_type else "longlink"
                applied = _applied_extended_headers(next)
                if kind in applied or "global" in applied:
                    return next
                applied.add(kind)
                # Go reads the size bytes up to the first NUL, and ignores an empty name.
                value = nts(data[:self.size], tarfile.encoding, tarfile.errors)
                if not value:
                    return next
                applied.add(kind + "_value")
                if kind == "longlink":
                    next.linkname = value
                    return next
                next._btrfsdrv_go_name = value
                if "sparse_name" in applied:
                    # Go's GNU.sparse.name replaces the long name, after the
                    # long name decided whether an entry of type NUL is a directory.
                    return next
                next.name = value.rstrip("/") if next.isdir() else value
                return next

            def _proc_sparse(self, tarfile: Any) -> Any:
                # As readOldGNUSparseMap of Go's archive/tar: fromtarfile read
                # the header's part of the map, and extension blocks of 21
                # entries follow while their flag at byte 504 is set.
                entries, is_extended, real_size = self._btrfsdrv_old_gnu_sparse  # type: ignore[attr-defined]
                del self._sparse_structs  # type: ignore[attr-defined]  # tarfile's reading of the zeroed fields
                map_size = _OLD_GNU_SPARSE_HEADER_MAP_SIZE
                while is_extended:
                    map_size += _SPARSE_EXTENSION_MAP_SIZE
                    if map_size >= _EXTENDED_HEADER_MAX:
                        raise header_error(f"old GNU sparse map at offset {self.offset} is larger than "
                                           f"{_EXTENDED_HEADER_MAX} bytes")
                    block_offset = tarfile.fileobj.tell()
                    block = tarfile.fileobj.read(block_size)
                    if len(block) < block_size:
                        raise header_error(f"old GNU sparse map at offset {self.offset} ends early")
                    entries += _read_old_gnu_sparse_entries(block, 0, _SPARSE_EXTENSION_ENTRIES, block_offset)
                    is_extended = block[_SPARSE_EXTENSION_FLAG] != 0
                if self.size < 0:
                    raise ValueError(f"header at offset {self.offset}: size {self.size} is negative")
                self.sparse = entries
                self.offset_data = tarfile.fileobj.tell()
                self._btrfsdrv_stored_size = self.size
                tarfile.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
                self.size = real_size
                return self

            def _proc_pax(self, tarfile: Any) -> Any:
                if self.type == solaris_header_type:
                    # Go's archive/tar reads it as an entry of type 'X', not as an extended header.
                    raise header_error(f"header at offset {self.offset} has type 'X' (a Solaris extended "
                                       "header), which Go's archive/tar does not read as an extended header")
                self._check_extended_size(tarfile)
                with _ExtendedHeaderChain(tarfile):
                    return self._proc_bounded_pax(tarfile)

            def _proc_bounded_pax(self, tarfile: Any) -> Any:
                stream = tarfile.fileobj
                records_offset = stream.tell()
                records = stream.read(self._block(self.size))  # type: ignore[attr-defined]
                if len(records) < self.size:
                    raise header_error(f"PAX header ends early, after {len(records)} of its {self.size} bytes")
                # tarfile's own parser searches the data with regular
                # expressions that backtrack on runs of digits, and parses the
                # padding after the size as records too.
                pax_records = _pax_records_as_go_reads(_parse_pax_records(records[:self.size], records_offset))
                if self.type == global_header_type:
                    # Go's archive/tar returns a global header as an entry of
                    # its own, so the extended headers in front of it apply
                    # to no entry. tarfile would apply its records to every
                    # later entry.
                    self.offset_data = records_offset
                    tarfile.offset = records_offset + len(records)
                    _applied_extended_headers(self).add("global")
                    return self
                try:
                    next = self.fromtarfile(tarfile)
                except any_header_error as error:
                    raise header_error(str(error)) from None
                applied = _applied_extended_headers(next)
                if "pax" in applied or "global" in applied:
                    # A later PAX header replaced this one. Its size record
                    # already decided where the next header starts.
                    next.offset = self.offset
                    return next
                applied.add("pax")
                _check_pax_times(pax_records, self.offset)
                if "longname_value" in applied:
                    pax_records.pop(b"path", None)
                if "longlink_value" in applied:
                    pax_records.pop(b"linkpath", None)
                # Go's archive/tar reads the old GNU map of a type S entry and
                # ignores GNU.sparse records on it.
                sparse_version = None
                if next.type != old_gnu_sparse_type:
                    sparse_version = _gnu_sparse_version(pax_records)
                self._apply_bounded_pax(next, pax_records, sparse_version, tarfile)
                if sparse_version is not None and pax_records.get(b"GNU.sparse.name"):
                    applied.add("sparse_name")
                return next

            def _apply_bounded_pax(self, next: Any, pax_records: dict[bytes, bytes], sparse_version: str | None,
                                   tarfile: Any) -> None:
                pax_headers = self._decode_kept_records(pax_records, sparse_version is not None, tarfile)
                # Numbers that the syntax rejects stay out of tarfile's int()
                # and float(). _check_entry_numbers rejects the entry later.
                fields = {keyword: value for keyword, value in pax_headers.items()
                          if keyword in _PAX_FIELDS and (keyword not in _PAX_NUMBER_SYNTAX
                                                         or _PAX_NUMBER_SYNTAX[keyword].fullmatch(value))}
                if next.type == old_gnu_sparse_type and "size" in fields:
                    # Go's archive/tar takes it as the size of the stored
                    # data, and keeps the real size of the header.
                    self._apply_old_gnu_sparse_stored_size(next, int(fields.pop("size")), tarfile)
                next._apply_pax_info(fields, tarfile.encoding, tarfile.errors)
                if "path" in fields:
                    next._btrfsdrv_go_name = fields["path"]
                next.pax_headers = pax_headers
                next.offset = self.offset
                if "size" in fields:
                    # The size record replaces the header's size, which decided
                    # where tarfile expects the next header.
                    offset = next.offset_data
                    if next.isreg() or next.type not in supported_types:
                        offset += next._block(next.size)
                    tarfile.offset = offset
                if sparse_version is not None:
                    _apply_gnu_sparse(next, pax_headers, sparse_version, tarfile.fileobj)

            @staticmethod
            def _apply_old_gnu_sparse_stored_size(next: Any, stored_size: int, tarfile: Any) -> None:
                if stored_size < 0:
                    raise ValueError(f"PAX size {stored_size} of an old GNU sparse entry is negative")
                next._btrfsdrv_stored_size = stored_size
                tarfile.offset = next.offset_data + next._block(stored_size)

            def _decode_kept_records(self, pax_records: dict[bytes, bytes], sparse: bool,
                                     tarfile: Any) -> dict[str, str]:
                """Decode the records that the applier uses, as tarfile decodes them.

                As mergePAX of Go's archive/tar does, it drops empty records
                of header fields, so that the header's value stays. Empty
                xattr and GNU.sparse records stay, because Go keeps them.
                """
                name_encoding = tarfile.encoding if pax_records.get(b"hdrcharset") == b"BINARY" else "utf-8"
                pax_headers = {}
                for key, value in pax_records.items():
                    if not _is_kept_pax_keyword(key, sparse):
                        continue
                    if not value and not key.startswith((b"SCHILY.xattr.", b"GNU.sparse.")):
                        continue
                    keyword = self._decode_pax_field(key, "utf-8", "utf-8", tarfile.errors)  # type: ignore[attr-defined]
                    encoding = name_encoding if keyword in _PAX_NAME_FIELDS else "utf-8"
                    pax_headers[keyword] = self._decode_pax_field(  # type: ignore[attr-defined]
                        value, encoding, tarfile.encoding, tarfile.errors)
                return pax_headers

        _bounded_tarinfo = BoundedTarInfo
    return _bounded_tarinfo


def _applied_extended_headers(member: Any) -> set[str]:
    """Return the kinds of extended header already applied to member, a set that the caller may add to.

    The kinds are:
      "pax": a PAX header.
      "global": a global PAX header, which ends the chain.
      "longname", "longlink": a GNU long name or long link name, even an empty one.
      "longname_value", "longlink_value": a GNU long name or long link name that set a name.
      "sparse_name": a GNU.sparse.name record that set the name.
    """
    applied: set[str] | None = getattr(member, "_btrfsdrv_applied", None)
    if applied is None:
        applied = set()
        member._btrfsdrv_applied = applied
    return applied


# The numeric fields of a tar header block that Go's archive/tar reads for
# every format, as (name, start, end).
_TAR_NUMERIC_FIELDS = (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124), ("size", 124, 136),
                       ("mtime", 136, 148))
# The device numbers, which Go's archive/tar reads only with USTAR or GNU magic.
_TAR_DEVICE_FIELDS = (("devmajor", 329, 337), ("devminor", 337, 345))
_TAR_NAME_PREFIX = (345, 500)
_TAR_STAR_PREFIX_END = 476
# The trailer of a STAR header, and its access and change time fields.
_TAR_STAR_TRAILER = b"tar\0"
_TAR_STAR_TIMES = (("access time", 476, 488), ("change time", 488, 500))
# The types whose prefix field tarfile ignores: GNU long names and old GNU sparse files.
_TAR_GNU_TYPES = (b"L", b"K", b"S")
_TAR_OCTAL_DIGITS = re.compile(rb"[0-7]+")
# The magic and version fields of a GNU header.
_TAR_GNU_MAGIC = b"ustar  \0"


def _check_header_as_go_reads(member: Any, block: bytes) -> None:
    """Raise ValueError where Go's archive/tar reads the header block of member otherwise than tarfile did.

    tarfile cuts a number at its first NUL and parses it with int(), which
    takes a sign, "_", "0o" and any whitespace. Go's parseNumeric trims NULs
    and spaces from both ends first and takes only octal digits (or base
    256). A number that Go reads replaces tarfile's, before the size decides
    where the next header starts, and one that Go rejects raises.

    tarfile joins the prefix field to the name in any header, but Go only
    with USTAR magic ("ustar\\0"), and only its first 131 bytes with the
    STAR trailer "tar\\0" at offset 508. Headers where that changes the name
    are rejected. A V7 header (no magic) gets no owner names or device
    numbers, as in Go.
    """
    is_ustar = block[257:263] == b"ustar\0"
    is_gnu = block[257:265] == _TAR_GNU_MAGIC
    fields = _TAR_NUMERIC_FIELDS + (_TAR_DEVICE_FIELDS if is_ustar or is_gnu else ())
    checked = [("checksum", 148, 156)] + list(fields)
    for name, start, end in checked:
        field = block[start:end]
        go_value = _parse_tar_number_as_go(field, base_256=name != "checksum")
        value = member.chksum if name == "checksum" else getattr(member, name)
        if go_value == value:
            continue
        if go_value is None or name == "checksum":
            go_reading = "rejects it" if go_value is None else f"reads {go_value}"
            raise ValueError(f"header at offset {member.offset}: the {name} field {field!r} reads as {value} "
                             f"in Python's tarfile, but Go's archive/tar {go_reading}; write it as octal "
                             "digits followed by NUL or space")
        setattr(member, name, go_value)
    if not (is_ustar or is_gnu):
        member.uname = member.gname = ""
        member.devmajor = member.devminor = 0
    if is_ustar and block[508:512] == _TAR_STAR_TRAILER:
        _check_star_times(member, block)
    if member.size < 0 and block[156:157] not in _HEADER_ONLY_TYPES:
        # Go's handleRegularFile rejects it before any PAX size can replace it.
        raise ValueError(f"header at offset {member.offset}: size {member.size} is negative")
    start, end = _TAR_NAME_PREFIX
    if member.type == b"S" and _go_reads_gnu_prefix(block):
        raise ValueError(f"header at offset {member.offset}: the access or change time field of this GNU "
                         "header is not a number, so Go's archive/tar joins the bytes from offset 345 to the "
                         "name as a prefix, but Python's tarfile ignores them; write the times as octal digits")
    if block[start] == 0 or member.type in _TAR_GNU_TYPES:
        return  # tarfile ignored the prefix too
    if is_gnu:
        if _go_reads_gnu_prefix(block):
            return  # Go joins the same prefix
        problem = "Go's archive/tar reads those bytes of a GNU header as access and change times"
    elif not is_ustar:
        problem = "Go's archive/tar ignores it without USTAR magic"
    elif block[508:512] == _TAR_STAR_TRAILER and block.find(0, start, _TAR_STAR_PREFIX_END) < 0:
        problem = "Go's archive/tar reads only its first 131 bytes in a header with the STAR trailer"
    else:
        return
    prefix = block[start:end].split(b"\0", 1)[0]
    raise ValueError(f"header at offset {member.offset}: the name prefix field {prefix!r} is joined to the "
                     f"name by Python's tarfile, but {problem}")


def _check_star_times(member: Any, block: bytes) -> None:
    """Raise ValueError for the time fields of a STAR header that Go's archive/tar cannot parse.

    Go's readHeader rejects the whole header then, and tarfile ignores the fields.
    """
    for name, start, end in _TAR_STAR_TIMES:
        if _parse_tar_number_as_go(block[start:end], base_256=True) is None:
            raise ValueError(f"header at offset {member.offset}: the {name} field {block[start:end]!r} of this "
                             "STAR header is not a number, so Go's archive/tar rejects the header; write it as "
                             "octal digits followed by NUL or space")


def _parse_tar_number_as_go(field: bytes, base_256: bool) -> int | None:
    """Return a numeric header field as Go's archive/tar reads it, or None where Go rejects it.

    base_256 selects parseNumeric, which also takes base 256, over parseOctal (used for the checksum).
    """
    if base_256 and field and field[0] & 0x80:
        # Two's complement, big-endian, without the marker bit.
        inversion = 0xFF if field[0] & 0x40 else 0
        magnitude = int.from_bytes(bytes([(field[0] ^ inversion) & 0x7F])
                                   + bytes(byte ^ inversion for byte in field[1:]), "big")
        if magnitude >= 2**63:
            return None
        return -magnitude - 1 if inversion else magnitude
    trimmed = field.strip(b" \0")
    if not trimmed:
        return 0
    digits = trimmed.split(b"\0", 1)[0]
    if not _TAR_OCTAL_DIGITS.fullmatch(digits):
        return None
    value = int(digits, 8)
    if value >= 2**64:
        return None
    return value - 2**64 if value >= 2**63 else value


# The access and change time fields of a GNU header.
_TAR_GNU_TIMES = ((345, 357), (357, 369))


def _go_reads_gnu_prefix(block: bytes) -> bool:
    """Return whether Go's archive/tar joins a prefix to the name in block, a header with GNU magic.

    Go reads the times in readHeader, and where either does not parse, it
    reads the bytes from offset 345 as a USTAR prefix, as Go before 1.8
    wrote them. It joins them if they are ASCII up to the first NUL.
    """
    for start, end in _TAR_GNU_TIMES:
        if block[start] != 0 and _parse_tar_number_as_go(block[start:end], base_256=True) is None:
            break
    else:
        return False
    prefix = block[_TAR_NAME_PREFIX[0]:_TAR_NAME_PREFIX[1]].split(b"\0", 1)[0]
    return bool(prefix) and prefix.isascii()


# The old GNU sparse header (type S), as headerGNU and sparseArray of Go's
# archive/tar (format.go) lay it out. Its map starts at byte 386 with 4
# entries, each a 12-byte offset and a 12-byte length. The byte at 482 is
# set when an extension block follows, and bytes 483 to 495 contain the
# real file size. Each extension block contains 21 entries and its own flag
# at byte 504.
_OLD_GNU_SPARSE_MAP = 386
_OLD_GNU_SPARSE_ENTRIES = 4
_OLD_GNU_SPARSE_FLAG = 482
_OLD_GNU_REAL_SIZE = (483, 495)
_SPARSE_ENTRY_SIZE = 24
_SPARSE_EXTENSION_ENTRIES = 21
_SPARSE_EXTENSION_FLAG = 504
# The bytes of map that readOldGNUSparseMap of Go's archive/tar counts for
# the header and for each extension block. It rejects maps whose count
# reaches maxSpecialFileSize, 1 MiB.
_OLD_GNU_SPARSE_HEADER_MAP_SIZE = _OLD_GNU_SPARSE_ENTRIES * _SPARSE_ENTRY_SIZE + 1
_SPARSE_EXTENSION_MAP_SIZE = _SPARSE_EXTENSION_ENTRIES * _SPARSE_ENTRY_SIZE + 1


def _read_old_gnu_sparse_header(block: bytes, offset: int) -> tuple[list[tuple[int, int]], bool, int]:
    """Return the map entries, the extension flag and the real size of block, a type S header at offset.

    Raises ValueError where readOldGNUSparseMap of Go's archive/tar rejects
    the header: without GNU magic (the STAR format has a type S of another
    layout), or with a number that Go cannot parse.
    """
    if block[257:265] != _TAR_GNU_MAGIC:
        raise ValueError(f"header at offset {offset} has type 'S' (an old GNU sparse file) without GNU magic, "
                         "which Go's archive/tar rejects; write sparse files in GNU or PAX format")
    start, end = _OLD_GNU_REAL_SIZE
    real_size = _parse_tar_number_as_go(block[start:end], base_256=True)
    if real_size is None:
        raise ValueError(f"header at offset {offset}: invalid real size {block[start:end]!r} of an old GNU "
                         "sparse file; write it as octal digits followed by NUL or space")
    entries = _read_old_gnu_sparse_entries(block, _OLD_GNU_SPARSE_MAP, _OLD_GNU_SPARSE_ENTRIES, offset)
    return entries, block[_OLD_GNU_SPARSE_FLAG] != 0, real_size


def _read_old_gnu_sparse_entries(block: bytes, start: int, count: int, offset: int) -> list[tuple[int, int]]:
    """Return up to count (offset, length) map entries from byte start of block, a block at offset in the tar.

    As in GNU tar and Go's archive/tar, the map ends at the first entry
    whose offset field starts with NUL. Raises ValueError for a number that
    Go cannot parse.
    """
    entries = []
    for position in range(start, start + count * _SPARSE_ENTRY_SIZE, _SPARSE_ENTRY_SIZE):
        if block[position] == 0:
            break
        fields = (block[position:position + 12], block[position + 12:position + 24])
        numbers = [_parse_tar_number_as_go(field, base_256=True) for field in fields]
        if None in numbers:
            raise ValueError(f"invalid sparse map: the entry {b''.join(fields)!r} at byte {position} of the block "
                             f"at offset {offset}; write its numbers as octal digits followed by NUL or space")
        entries.append((numbers[0], numbers[1]))
    return entries  # type: ignore[return-value]


def _without_old_gnu_sparse_fields(block: bytes) -> bytes:
    """Return block, a type S header, with its map, flag and real size zeroed and its checksum made again."""
    copy = bytearray(block)
    copy[_OLD_GNU_SPARSE_MAP:_OLD_GNU_REAL_SIZE[1]] = bytes(_OLD_GNU_REAL_SIZE[1] - _OLD_GNU_SPARSE_MAP)
    copy[148:156] = b" " * 8  # the checksum counts its own field as spaces
    copy[148:156] = b"%06o\0 " % sum(copy)
    return bytes(copy)


# Extended headers (PAX, GNU long names) in front of one entry, at most. A
# real tar needs three: a PAX header, a long name and a long link name.
_EXTENDED_HEADER_CHAIN_MAX = 8


class _ExtendedHeaderChain:
    """Counts, on a TarFile, the extended headers being parsed in front of one entry."""

    def __init__(self, tar: Any) -> None:
        self.tar = tar

    def __enter__(self) -> None:
        self.tar._btrfsdrv_header_chain = getattr(self.tar, "_btrfsdrv_header_chain", 0) + 1

    def __exit__(self, *exc_info: Any) -> None:
        self.tar._btrfsdrv_header_chain -= 1


# The maximum number of digits in a PAX record's length, as in tarfile of CPython 3.13.
_PAX_LENGTH_DIGITS_MAX = 20
# The PAX records whose values Go's archive/tar rejects with a NUL byte (validPAXRecord).
_PAX_NAME_KEYWORDS = frozenset({b"path", b"linkpath", b"uname", b"gname"})


def _parse_pax_records(records: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """Return the (keyword, value) pairs of records, the data of a PAX header at offset in the tar.

    Raises ValueError unless the records are well-formed.

    POSIX pax frames each record as "%d %s=%s\\n", where the decimal length
    counts the whole record, and the keyword is not empty and contains no
    "=". As in parsePAXRecord of Go's archive/tar, no keyword may contain
    NUL, nor the value of a path, linkpath, uname or gname record, and
    nothing may follow the last record (tarfile stops at a NUL there).

    tarfile of CPython 3.8.18, 3.11.7 and 3.12.1 does not check the framing.
    It matches rb"(\\d+) ([^=]+)=" at each record, and that runs on to the
    next "=" of the header. Records without "=" therefore take time and
    memory quadratic in the header's size. 3.13.0 and Debian's 3.11.2 check
    the framing. This parser reads each byte a bounded number of times.

    NOTE: each record costs about 1 microsecond of Python (CPython 3.11.7),
    so 1 MiB of six-byte records takes about 0.16 s of CPU.
    """
    position = 0
    parsed: list[tuple[bytes, bytes]] = []

    def malformed(reason: str) -> ValueError:
        return ValueError(f"PAX record at offset {offset + position} {reason}")

    while position < len(records):
        space = records.find(b" ", position, position + _PAX_LENGTH_DIGITS_MAX + 1)
        digits = records[position:space]
        if space < 0 or not digits.isdigit():
            raise malformed(f"does not start with a decimal length of at most {_PAX_LENGTH_DIGITS_MAX} "
                            "digits and a space")
        length = int(digits)
        end = position + length
        # The shortest record has a keyword of one byte and an empty value.
        if length < len(digits) + len(" k=\n"):
            raise malformed(f"has length {length}, too short for a keyword, '=' and a newline")
        if end > len(records):
            raise malformed(f"has length {length}, but only {len(records) - position} bytes of the PAX "
                            "header follow its start")
        if records[end - 1] != ord("\n"):
            raise malformed(f"does not end with a newline at its length {length}")
        equals = records.find(b"=", space + 1, end - 1)
        if equals < 0:
            raise malformed("has no '=' after its keyword")
        if equals == space + 1:
            raise malformed("has an empty keyword")
        if records.find(0, space + 1, equals) >= 0:
            raise malformed("has a NUL byte in its keyword")
        keyword = records[space + 1:equals]
        if keyword in _PAX_NAME_KEYWORDS and records.find(0, equals + 1, end - 1) >= 0:
            raise malformed(f"has a NUL byte in its {keyword.decode()} value")
        parsed.append((keyword, records[equals + 1:end - 1]))
        position = end
    return parsed


def _pax_records_as_go_reads(records: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Return the PAX records as a dictionary, as parsePAX of Go's archive/tar builds it.

    A later record replaces an earlier one with the same keyword. The
    GNU.sparse.offset and GNU.sparse.numbytes records of GNU sparse format
    0.0 must alternate, starting with an offset, and they become one
    GNU.sparse.map record that replaces any other.
    """
    result = {}
    sparse_map: list[bytes] = []
    for keyword, value in records:
        if keyword in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            expected = b"GNU.sparse.offset" if len(sparse_map) % 2 == 0 else b"GNU.sparse.numbytes"
            if keyword != expected or b"," in value:
                raise ValueError(f"invalid sparse map: expected a {expected.decode()} record, not "
                                 f"{keyword.decode()} with value {value[:40]!r}")
            sparse_map.append(value)
        else:
            result[keyword] = value
    if sparse_map:
        result[b"GNU.sparse.map"] = b",".join(sparse_map)
    return result


def _check_pax_times(records: dict[bytes, bytes], offset: int) -> None:
    """Raise ValueError for an atime or ctime record of the PAX header at offset that Go's archive/tar rejects.

    The driver sets neither time, but mergePAX of Go's archive/tar parses
    both and rejects the entry when one does not parse. An empty record is
    skipped there.
    """
    for keyword in (b"atime", b"ctime"):
        value = records.get(keyword)
        if value and not _PAX_NUMBER_SYNTAX["mtime"].fullmatch(value.decode("ascii", "replace")):
            raise ValueError(f"PAX header at offset {offset}: invalid {keyword.decode()} record {value[:40]!r}; "
                             "expected a decimal number of seconds with an optional fraction")


def _gnu_sparse_version(records: dict[bytes, bytes]) -> str | None:
    """Return the GNU sparse format ("0.x" or "1.0") that records declare, or None for an entry that is not sparse.

    It follows readGNUSparsePAXHeaders of Go's archive/tar: a version other
    than 0.0, 0.1 and 1.0 means "not sparse", and without a version a
    non-empty GNU.sparse.map means 0.0 or 0.1.
    """
    major = records.get(b"GNU.sparse.major", b"")
    minor = records.get(b"GNU.sparse.minor", b"")
    if major == b"0" and minor in (b"0", b"1"):
        return "0.x"
    if major == b"1" and minor == b"0":
        return "1.0"
    if major or minor:
        return None
    if records.get(b"GNU.sparse.map"):
        return "0.x"
    return None


# The PAX fields that tarfile's _apply_pax_info sets, and those of them that
# are names, as in tarfile of CPython 3.8 to 3.13.
_PAX_FIELDS = frozenset({"path", "linkpath", "size", "mtime", "uid", "gid", "uname", "gname"})
_PAX_NAME_FIELDS = frozenset({"path", "linkpath", "uname", "gname"})
_PAX_KEPT_KEYWORDS = frozenset(keyword.encode() for keyword in _PAX_FIELDS | {"hdrcharset"})


def _is_kept_pax_keyword(keyword: bytes, sparse: bool) -> bool:
    """Return whether the applier uses PAX records with keyword, the GNU.sparse ones only when sparse.

    Other records, such as comment, atime and ctime, never reach tarfile.
    """
    if keyword in _PAX_KEPT_KEYWORDS or keyword.startswith(b"SCHILY.xattr."):
        return True
    return sparse and keyword.startswith(b"GNU.sparse.")


# The entry types that a GNU sparse map cannot apply to, as isHeaderOnlyType
# of Go's archive/tar lists them.
_HEADER_ONLY_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")


def _apply_gnu_sparse(member: tarfile.TarInfo, pax_headers: dict[str, str], version: str, stream: Any) -> None:
    """Set the name, size and sparse map of a GNU sparse member from its PAX records, as Go's archive/tar does.

    version is "0.x" (the map is in the GNU.sparse.map record) or "1.0" (the
    map is in front of the data in stream). Raises ValueError for numbers
    that Go's strconv.ParseInt rejects.
    """
    if member.type in _HEADER_ONLY_TYPES:
        raise ValueError(f"GNU sparse records on entry {member.name!r} of type {member.type!r}, which has no data")
    stored_size = member.size
    name = pax_headers.get("GNU.sparse.name")
    if name:
        member.name = name
    real_size = pax_headers.get("GNU.sparse.size") or pax_headers.get("GNU.sparse.realsize")
    if real_size:
        member.size = _parse_sparse_number("GNU.sparse.size", real_size)
    if stored_size < 0:
        raise ValueError(f"size {stored_size} is negative")
    if version == "1.0":
        map_start = member.offset_data
        _read_sparse_map_1_0(member, stream)
        # Go's archive/tar reads the map from the entry's stored data.
        map_size = member.offset_data - map_start
        if map_size > stored_size:
            raise ValueError(f"GNU sparse map of {map_size} bytes is longer than the {stored_size} bytes "
                             "of data that the archive stores for the entry")
        member._btrfsdrv_stored_size = stored_size - map_size  # type: ignore[attr-defined]
        return
    member._btrfsdrv_stored_size = stored_size  # type: ignore[attr-defined]
    count = _parse_sparse_number("GNU.sparse.numblocks", pax_headers.get("GNU.sparse.numblocks", ""))
    map_text = pax_headers.get("GNU.sparse.map", "")
    fields = map_text.split(",") if map_text else []
    if count < 0 or len(fields) != 2 * count:
        raise ValueError(f"invalid sparse map: GNU.sparse.numblocks is {count}, but the map has "
                         f"{len(fields)} numbers")
    numbers = [_parse_sparse_number("GNU.sparse.map", field) for field in fields]
    member.sparse = list(zip(numbers[::2], numbers[1::2]))  # type: ignore[assignment]


def _parse_sparse_number(keyword: str, value: str) -> int:
    """Return value, a number in a GNU.sparse record, if Go's strconv.ParseInt accepts it, else raise ValueError."""
    if not _PAX_INTEGER_SYNTAX.fullmatch(value):
        excerpt = value if len(value) <= 40 else value[:40] + "..."
        raise ValueError(f"invalid sparse map: {keyword} {excerpt!r} is not a decimal number of at most 19 digits")
    return int(value)


def _read_sparse_map_1_0(member: tarfile.TarInfo, stream: Any) -> None:
    """Read the map in front of the data of a GNU sparse 1.0 member, at most 1 MiB of it.

    The map is decimal numbers, one a line, in whole 512-byte blocks: the
    region count, then the offset and length of each region. Sets the
    member's sparse map and the offset of its data in stream. Raises
    ValueError for numbers that Go's strconv.ParseInt rejects.
    """
    import tarfile

    count = None
    numbers: list[int] = []
    text = b""
    read = 0
    while count is None or len(numbers) < 2 * count:
        if b"\n" not in text:
            block = stream.read(tarfile.BLOCKSIZE)
            read += len(block)
            if not block:
                raise tarfile.SubsequentHeaderError("GNU sparse map ends early")  # type: ignore[attr-defined]
            if read > _EXTENDED_HEADER_MAX:
                raise tarfile.SubsequentHeaderError(  # type: ignore[attr-defined]
                    f"GNU sparse map is larger than {_EXTENDED_HEADER_MAX} bytes")
            text += block
            continue
        line, text = text.split(b"\n", 1)
        keyword = "GNU.sparse.numblocks" if count is None else "GNU.sparse.map"
        number = _parse_sparse_number(keyword, line.decode("ascii", "replace"))
        if count is None:
            if number < 0:
                raise ValueError(f"invalid sparse map: the region count {number} is negative")
            count = number
        else:
            numbers.append(number)
    member.offset_data = stream.tell()
    member.sparse = list(zip(numbers[::2], numbers[1::2]))  # type: ignore[assignment]


# The maximum size of an entry: off_t is int64, and Go's archive/tar, which
# containers/storage reads layers with, parses sizes as int64.
_TAR_SIZE_MAX = 2**63 - 1
# The PAX numbers that tarfile applies, in the syntax that Go's archive/tar
# accepts: an optional sign and decimal digits, with an optional fraction for
# mtime. tarfile parses them with int() and float(), which also take "1_0",
# " 10" and digits other than 0-9, and float() takes "1e3" and "nan".
# tarfile reads a number that they reject as 0, and since CPython 3.11 that
# includes an integer of more than 4300 digits.
# NOTE: at most 19 digits before any fraction, so that leading zeros beyond
# that are rejected although Go accepts them.
_PAX_INTEGER_SYNTAX = re.compile(r"[-+]?[0-9]{1,19}")
_PAX_NUMBER_SYNTAX = {
    "size": _PAX_INTEGER_SYNTAX,
    "uid": _PAX_INTEGER_SYNTAX,
    "gid": _PAX_INTEGER_SYNTAX,
    "mtime": re.compile(r"[-+]?[0-9]{1,19}(?:\.[0-9]*)?"),
}


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """Return the modification time of member in nanoseconds.

    A PAX mtime record is read as parsePAXTime of Go's archive/tar does it,
    with the fraction cut after 9 digits, because tarfile's float loses the
    last digits of today's times. _check_entry_numbers checked its syntax.
    """
    record = member.pax_headers.get("mtime")
    if record is None:
        return int(member.mtime * _NS_PER_SECOND)
    seconds, _, fraction = record.partition(".")
    nanoseconds = int((fraction + "0" * 9)[:9])
    if seconds.startswith("-"):
        nanoseconds = -nanoseconds
    return int(seconds) * _NS_PER_SECOND + nanoseconds


def _check_entry_type(member: tarfile.TarInfo) -> None:
    """Raise ValueError for an entry of type NUL that only one of Go's archive/tar and tarfile reads as a directory.

    Go makes such an entry a directory when its final name, after PAX
    records and GNU long names, ends with "/", and tarfile when the name in
    its own header does. A directory has no data, so the two would find the
    next header at different offsets.
    """
    go_name = getattr(member, "_btrfsdrv_go_name", None)
    if getattr(member, "_btrfsdrv_typeflag", None) != b"\0" or go_name is None:
        return
    if go_name.endswith("/") != member.isdir():
        header_kind = "a directory" if member.isdir() else "a regular file"
        raise ValueError(f"the header of type NUL makes it {header_kind}, but Go's archive/tar decides that "
                         f"from the name {go_name!r} of its extended headers, and whether it ends with '/'; "
                         "use type '0' or '5'")


def _check_entry_numbers(member: tarfile.TarInfo) -> None:
    """Raise ValueError for a PAX number that tarfile misreads, or a size that no entry can have.

    It runs on every entry, whiteouts and links too, because the size
    decides where the next header starts.
    """
    for keyword, syntax in _PAX_NUMBER_SYNTAX.items():
        value = member.pax_headers.get(keyword)
        if value is not None and not syntax.fullmatch(value):
            excerpt = value if len(value) <= 40 else value[:40] + "..."
            raise ValueError(f"invalid PAX {keyword} {excerpt!r}: expected a decimal number of at most 19 digits")
    if not 0 <= member.size <= _TAR_SIZE_MAX:
        raise ValueError(f"size {member.size} is out of range (0 to {_TAR_SIZE_MAX})")


def _check_member_values(member: tarfile.TarInfo) -> None:
    """Raise ValueError when a tar header contains a number the kernel cannot take."""
    mtime = member.mtime
    if not isinstance(mtime, (int, float)) or mtime != mtime or not -_TAR_MTIME_MAX <= mtime <= _TAR_MTIME_MAX:
        raise ValueError(f"modification time {mtime!r} is out of range")
    checked = [("uid", member.uid, _TAR_ID_MAX), ("gid", member.gid, _TAR_ID_MAX)]
    if member.ischr() or member.isblk():
        # Other entries ignore their device numbers.
        checked += [("devmajor", member.devmajor, _TAR_DEVICE_MAJOR_MAX),
                    ("devminor", member.devminor, _TAR_DEVICE_MINOR_MAX)]
    for field, value, maximum in checked:
        if not isinstance(value, int) or not 0 <= value <= maximum:
            raise ValueError(f"{field} {value!r} is out of range (0 to {maximum})")


def _check_xattrs(xattrs: dict[str, bytes]) -> None:
    """Raise ValueError for extended attributes that the kernel would reject."""
    for name, value in xattrs.items():
        _, _, suffix = name.partition(".")
        if not suffix or len(name.encode("utf-8", "surrogateescape")) > _XATTR_NAME_MAX or "\0" in name:
            raise ValueError(f"invalid extended attribute name {name!r}")
        if len(value) > _XATTR_SIZE_MAX:
            raise ValueError(f"extended attribute {name!r} is {len(value)} bytes, more than {_XATTR_SIZE_MAX}")
        if name == "security.capability":
            _check_capability(value)


def _check_symlink_target(member: tarfile.TarInfo) -> None:
    """Raise ValueError for a symlink target longer than Linux allows.

    symlink(2) takes a target of up to PATH_MAX (4096) bytes with its
    terminating NUL. btrfs stores a target inline in one leaf, so with 4 KiB
    nodes it allows only 3949 bytes, and the kernel rejects a longer target
    with ENAMETOOLONG.
    """
    size = len(member.linkname.encode("utf-8", "surrogateescape"))
    if not size:
        raise ValueError("symlink target is empty, which Linux does not allow")
    if size >= _PATH_MAX:
        raise ValueError(f"symlink target is {size} bytes, but Linux allows at most {_PATH_MAX - 1}")


def _check_xattr_file_type(member: tarfile.TarInfo, xattrs: dict[str, bytes]) -> None:
    """Raise ValueError for a user.* extended attribute on a device node or FIFO.

    Linux allows user.* only on regular files and directories (EPERM
    otherwise). Symlinks and hard links are not checked, because the applier
    sets no extended attributes on them.
    """
    if member.ischr():
        kind = "character device"
    elif member.isblk():
        kind = "block device"
    elif member.isfifo():
        kind = "FIFO"
    else:
        return
    for name in xattrs:
        if name.startswith("user."):
            raise ValueError(f"extended attribute {name!r} is not allowed on a {kind}: Linux allows "
                             "user.* only on regular files and directories")


def _check_capability(value: bytes) -> None:
    """Raise ValueError unless value is a security.capability that Linux accepts.

    Since Linux 4.14 setxattr takes only a version 2 (20 bytes) or version
    3 (24 bytes) struct vfs_cap_data, whose magic_etc field is
    VFS_CAP_REVISION_2 or _3, optionally with VFS_CAP_FLAGS_EFFECTIVE.
    """
    revisions = {_VFS_CAP_SIZE_2: _VFS_CAP_REVISION_2, _VFS_CAP_SIZE_3: _VFS_CAP_REVISION_3}
    if len(value) in revisions:
        magic = struct.unpack_from("<I", value)[0]
        if magic & ~_VFS_CAP_FLAGS_EFFECTIVE == revisions[len(value)]:
            rootid = _capability_rootid(value)
            if rootid is not None and rootid > _TAR_ID_MAX:
                # (uid_t)-1 means "no uid" to the kernel, which rejects it with EINVAL.
                raise ValueError(f"security.capability rootid {rootid} is not a valid uid "
                                 f"(at most {_TAR_ID_MAX}); fix the capability in the image")
            return
    raise ValueError(f"invalid security.capability of {len(value)} bytes: expected a version 2 "
                     f"({_VFS_CAP_SIZE_2} bytes) or version 3 ({_VFS_CAP_SIZE_3} bytes) vfs_cap_data")


# Root uids of file capabilities. A version 3 security.capability (struct
# vfs_ns_cap_data) ends with a rootid. The kernel honours the capability
# only in user namespaces whose root uid, or the root uid of an ancestor, is
# rootid, so the rootid is mapped between host and container uids like an
# owner. A version 2 one has no rootid and is honoured in every namespace.


def _capability_rootid(value: bytes) -> int | None:
    """Return the rootid of a version 3 security.capability, or None for any other value."""
    if len(value) != _VFS_CAP_SIZE_3:
        return None
    magic = struct.unpack_from("<I", value)[0]
    if magic & ~_VFS_CAP_FLAGS_EFFECTIVE != _VFS_CAP_REVISION_3:
        return None
    rootid: int = struct.unpack_from("<I", value, _VFS_CAP_SIZE_2)[0]
    return rootid


def _is_version_2_capability(value: bytes) -> bool:
    if len(value) != _VFS_CAP_SIZE_2:
        return False
    magic: int = struct.unpack_from("<I", value)[0]
    return magic & ~_VFS_CAP_FLAGS_EFFECTIVE == _VFS_CAP_REVISION_2


def _capability_with_rootid(value: bytes, rootid: int) -> bytes:
    """Return a version 2 or 3 security.capability with the flags and sets of value and this rootid.

    rootid 0 gives a version 2 value, as the kernel returns a version 3 one
    to a reader in the user namespace whose root is its rootid.
    """
    effective = struct.unpack_from("<I", value)[0] & _VFS_CAP_FLAGS_EFFECTIVE
    sets = value[4:_VFS_CAP_SIZE_2]  # permitted and inheritable, two 32-bit words each
    if rootid == 0:
        return struct.pack("<I", _VFS_CAP_REVISION_2 | effective) + sets
    return struct.pack("<I", _VFS_CAP_REVISION_3 | effective) + sets + struct.pack("<I", rootid)


def _container_capability(value: bytes, uid_maps: Sequence[IDMap] | None) -> bytes | None:
    """Return a security.capability as a process in the container reads it, or None if it reads none.

    This follows cap_inode_getsecurity in security/commoncap.c (Linux
    6.x). A version 3 value whose rootid maps to container uid 0 reads as
    version 2, and one whose rootid maps to another container uid reads as
    version 3 with that uid. A rootid without a container uid reads as
    version 2 when it is host uid 0, the root of an ancestor namespace.
    Any other rootid fails with EOVERFLOW, and the kernel does not honour
    the capability in the container. Other values are returned unchanged,
    among them version 2 ones, which a process in the container reads as stored.
    """
    rootid = _capability_rootid(value)
    if rootid is None:
        return value
    container_rootid = _map_id(uid_maps, rootid, False)
    if container_rootid is not None:
        return _capability_with_rootid(value, container_rootid)
    if rootid == 0:
        return _capability_with_rootid(value, 0)
    return None


def _host_capability(value: bytes, uid_maps: Sequence[IDMap] | None) -> bytes | None:
    """Return a container's security.capability as the host stores it, or None if its rootid has no host uid.

    This follows cap_convert_nscap in security/commoncap.c (Linux 6.x),
    which runs when a process in the container sets the capability. The
    rootid of a version 3 value maps to a host uid. A version 2 value is
    for the container's root, so it becomes version 3 with the host uid of
    container uid 0, and stays version 2 only when that is host uid 0.
    Invalid values are returned unchanged.
    """
    rootid = _capability_rootid(value)
    if rootid is None:
        if not _is_version_2_capability(value):
            return value
        rootid = 0
    host_rootid = _map_id(uid_maps, rootid, True)
    if host_rootid is None:
        return None
    return _capability_with_rootid(value, host_rootid)


def _check_sparse_map(member: tarfile.TarInfo) -> None:
    """Raise ValueError unless the map of a GNU sparse member is one that Go's archive/tar accepts.

    As validateSparseEntries of Go's archive/tar requires, regions must be in
    order and within the file size, empty regions too.
    """
    sparse_map: Any = member.sparse  # typeshed declares it an int
    end = 0
    for offset, length in sparse_map or ():
        if offset < 0 or length < 0 or offset < end or offset + length > member.size:
            raise ValueError(f"invalid sparse map: region at offset {offset} of length {length} overlaps "
                             f"the one before it or ends past the file size {member.size}")
        end = offset + length


def _sparse_regions(member: tarfile.TarInfo) -> list[tuple[int, int]]:
    """Return the data regions (offset, length) of a GNU sparse member, without empty ones.

    Raises ValueError unless the regions add up to exactly the data that the
    archive stores for the member, as sparseFileReader of Go's archive/tar
    (which containers/storage reads layers with) requires.
    _check_sparse_map checked their order.
    """
    sparse_map: Any = member.sparse  # typeshed declares it an int
    stored_size: int = member._btrfsdrv_stored_size  # type: ignore[attr-defined]
    regions = [(offset, length) for offset, length in sparse_map if length]
    total = sum(length for _, length in regions)
    if total != stored_size:
        raise ValueError(f"invalid sparse map: its regions hold {total} bytes, but the archive stores "
                         f"{stored_size} bytes of data for the entry")
    return regions


# Top directories of nested subvolumes that an apply keeps open, at most.
_SUBVOLUME_TOPS_OPEN = 16


class _LayerApplier:
    """Applies the entries of a layer tar to a layer directory.

    Every path is resolved one component at a time with O_NOFOLLOW, from the
    layer root or from a directory resolved that way (see _DirectoryOpener),
    so no entry can reach outside the layer. New non-directories
    are written under a temporary name and renamed into place, so a failed
    entry leaves the layer as it was before it.
    """

    def __init__(self, root_fd: int, uid_maps: Sequence[IDMap] | None, gid_maps: Sequence[IDMap] | None,
                 ignore_chown_errors: bool, layer_dir: PathArg) -> None:
        self.root_fd = root_fd
        self.uid_maps = uid_maps
        self.gid_maps = gid_maps
        self.ignore_chown_errors = ignore_chown_errors
        # Missing parent directories are made owned by the host ids of
        # container root, as containers/storage's Unpack makes them. Its
        # UnpackLayer leaves them to the applying process, whose ids the maps
        # need not cover, and a diff of the layer then fails.
        self.parent_owner = _container_root_owner(uid_maps, gid_maps)
        self.dir_times = _PendingDirTimes()
        self.epoch_ns = _layer_epoch(root_fd, layer_dir)
        # Inodes of the parent layer whose ctime this apply changed by adding
        # or removing one of their names, as (st_dev, st_ino), and the names
        # this apply linked to them, as (st_dev, directory st_ino, name).
        self.relinked: set[tuple[int, int]] = set()
        self.linked_names: set[tuple[int, int, str]] = set()
        # Directories that an opaque whiteout emptied, as (st_dev, st_ino).
        self.emptied: set[tuple[int, int]] = set()
        # Directories of the parent layer that this apply changed only by
        # their entries (see from_parent_layer), as (st_dev, st_ino).
        self.touched_directories: set[tuple[int, int]] = set()
        self.temporary_name = f"{_APPLY_TEMPORARY_PREFIX}apply-{os.urandom(8).hex()}"
        self.root_dev = os.fstat(root_fd).st_dev
        # Open top directories of the nested subvolumes that entries went
        # into, by st_dev, the least recently used first.
        self.subvolume_tops: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.warned_chown = False
        # Entries' parent directories, and hard links' target directories.
        self.parents = _DirectoryOpener(root_fd)
        self.link_targets = _DirectoryOpener(root_fd)
        # The components of the current entry's path, and the indexes of the
        # parent directories that entry_parent made for it.
        self.created_parents: tuple[Sequence[str], list[int]] = ((), [])

    def close(self) -> None:
        self.parents.close()
        self.link_targets.close()
        for fd in self.subvolume_tops.values():
            os.close(fd)
        self.subvolume_tops.clear()
        self.dir_times.close()

    # Owners and metadata -------------------------------------------------

    def host_owner(self, member: tarfile.TarInfo, path: str) -> tuple[int, int] | None:
        """Map an entry's owner to host ids; None means leave the owner as created."""
        uid = _map_id(self.uid_maps, member.uid, True)
        gid = _map_id(self.gid_maps, member.gid, True)
        if uid is not None and gid is not None:
            return uid, gid
        if not self.ignore_chown_errors:
            raise ValueError(f"entry {path!r}: owner {member.uid}:{member.gid} has no host id "
                             "in the ID maps")
        root_uid = _map_id(self.uid_maps, 0, True)
        root_gid = _map_id(self.gid_maps, 0, True)
        if root_uid is None or root_gid is None:
            return None
        return (uid if uid is not None else root_uid), (gid if gid is not None else root_gid)

    def chown(self, function: Callable[[], None], owner: tuple[int, int], path: str) -> None:
        """Run function, a chown of the entry at path to owner, applying ignore_chown_errors."""
        try:
            function()
        except OSError as error:
            if not self.ignore_chown_errors or error.errno not in (errno.EPERM, errno.EINVAL):
                uid, gid = owner
                raise _os_error(error.errno, f"change owner to {uid}:{gid}", path,
                                _unmapped_owner_hint(error.errno, uid, gid, _APPLY_UNMAPPED_REMEDY)) from None
            if not self.warned_chown:
                log.warning("cannot set owners in the layer, keeping the default ones: %s (first: %s)",
                            error, path)
                self.warned_chown = True

    @staticmethod
    def xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
        values = {}
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            if _is_carried_xattr(name):
                values[name] = value.encode("utf-8", "surrogateescape")
            else:
                log.debug("skipping extended attribute %s of %s", name, member.name)
        return values

    def host_xattrs(self, member: tarfile.TarInfo) -> dict[str, bytes]:
        """Return the entry's carried extended attributes, with the rootid of a capability mapped to the host.

        A capability whose rootid has no host uid is left out. Without
        ignore_chown_errors, check_capability_rootid has rejected the entry
        before. A capability of anything but a regular file is left out too
        (see check_capability).
        """
        xattrs = self.xattrs(member)
        value = xattrs.pop("security.capability", None)
        if value is not None and member.isreg():
            host_value = _host_capability(value, self.uid_maps)
            if host_value is not None:
                xattrs["security.capability"] = host_value
        return xattrs

    def check_capability(self, member: tarfile.TarInfo, xattrs: dict[str, bytes], path: str) -> None:
        """Check the entry's security.capability before anything is changed.

        The kernel reads file capabilities only when it executes a regular
        file, and chown removes them from anything but a directory, so the
        capability of a directory, symlink, device node or FIFO is not set,
        with a warning. Hard links take the capability of their target.
        """
        if "security.capability" not in xattrs:
            return
        if member.isreg() or member.islnk():
            self.check_capability_rootid(xattrs, path)
            return
        log.warning("not setting security.capability of %s: the kernel reads file capabilities only from "
                    "regular files", path)

    def check_capability_rootid(self, xattrs: dict[str, bytes], path: str) -> None:
        """Raise ValueError when the rootid of a security.capability has no host uid.

        A version 2 capability is for container uid 0 (see _host_capability).
        With ignore_chown_errors, log a warning instead, and host_xattrs
        leaves the capability out, because any other rootid would have it
        honoured in another user namespace.
        """
        value = xattrs.get("security.capability")
        if value is None or _host_capability(value, self.uid_maps) is not None:
            return
        rootid = _capability_rootid(value)
        capability = (f"security.capability rootid {rootid}" if rootid is not None
                      else "version 2 security.capability, which is for container uid 0,")
        if not self.ignore_chown_errors:
            raise ValueError(f"{capability} has no host uid in the ID maps: add it to the maps, "
                             "or set ignore_chown_errors to apply the entry without the capability")
        log.warning("not setting security.capability of %s: %s has no host uid in the ID maps",
                    path, f"its rootid {rootid}" if rootid is not None else "container uid 0, its root for version 2")

    def set_fd_metadata(self, fd: int, member: tarfile.TarInfo, path: str) -> None:
        """Set owner, mode, extended attributes and (for files) times through an fd."""
        owner = self.host_owner(member, path)
        if owner is not None:
            self.chown(lambda: os.fchown(fd, *owner), owner, path)
        # chmod after chown, because chown clears setuid and setgid.
        os.fchmod(fd, member.mode & 0o7777)
        # security.capability last, because chown removes it too.
        xattrs = self.host_xattrs(member)
        for name, value in sorted(xattrs.items(), key=lambda item: item[0] == "security.capability"):
            _set_xattr(fd, name, value, path)
        if not member.isdir():
            os.utime(fd, ns=(_mtime_ns(member),) * 2)

    def set_path_metadata(self, dir_fd: int, name: str, member: tarfile.TarInfo, path: str) -> None:
        """Set metadata on a new symlink, device node or FIFO, which are never opened."""
        owner = self.host_owner(member, path)
        if owner is not None:
            self.chown(lambda: os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False), owner, path)
        if not member.issym():
            os.chmod(name, member.mode & 0o7777, dir_fd=dir_fd)
            for key, value in self.host_xattrs(member).items():
                _set_xattr(_fd_path(dir_fd, name), key, value, path, follow_symlinks=False)
        os.utime(name, ns=(_mtime_ns(member),) * 2, dir_fd=dir_fd, follow_symlinks=False)

    # Entries ------------------------------------------------------------

    def apply(self, member: tarfile.TarInfo, data_reader: _DataReader) -> None:
        """Apply one entry. When it fails, the parent directories made for it are removed again."""
        self.created_parents = ((), [])
        try:
            self.apply_entry(member, data_reader)
        except BaseException:
            self.remove_created_parents(member.name)
            raise

    def apply_entry(self, member: tarfile.TarInfo, data_reader: _DataReader) -> None:
        path = member.name
        parts = _path_parts(path)
        if parts and parts[0].startswith(WHITEOUT_META_PREFIX) and parts != [WHITEOUT_OPAQUE_DIR]:
            return  # AUFS metadata (.wh..wh.plnk and the like) is not layer content
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self.apply_whiteout(parts, path)
            return
        # Reject what would fail halfway before anything at the path is replaced.
        _check_member_values(member)
        self.host_owner(member, path)
        xattrs = self.xattrs(member)
        _check_xattrs(xattrs)
        _check_xattr_file_type(member, xattrs)
        self.check_capability(member, xattrs, path)
        if member.issym():
            _check_symlink_target(member)
        if not parts:
            if not member.isdir():
                raise ValueError(f"entry {path!r} names the layer root but is not a directory")
            self.apply_directory(self.root_fd, None, [], member, path)
            return
        if member.isreg():
            self.apply_file(parts, member, data_reader, path)
            return

        # Reject a bad entry before its parent directories are created.
        if member.islnk():
            self.link_target(member, path)
            _check_link_outside_entry(parts, member, path)
        elif not (member.isdir() or member.issym() or member.ischr() or member.isblk() or member.isfifo()):
            raise ValueError(f"unsupported tar entry type {member.type!r}")
        parent_fd = self.entry_parent(parts, path)
        if member.isdir():
            self.apply_directory(parent_fd, parts[-1], parts, member, path)
        else:
            self.apply_special(parent_fd, parts, member, path)

    def entry_parent(self, parts: list[str], path: str) -> int:
        """Return an fd of the directory that contains parts[-1], creating missing ones.

        The fd belongs to the applier and stays open until the next
        entry_parent or whiteout: callers do not close it.
        """
        self.created_parents = (parts, [])
        try:
            on_create = None
            if self.parent_owner is not None:
                on_create = functools.partial(self.own_created_parent, path=path)
            fd = self.parents.open(parts[:-1], path, create=True, created=self.created_parents[1],
                                   on_create=on_create)
        except PermissionError:
            placeholder = _placeholder_on_path(self.root_fd, parts[:-1])
            if placeholder is None:
                raise
            raise _placeholder_error(placeholder) from None
        assert fd is not None  # with create, missing directories are made
        st = os.fstat(fd)
        if _is_snapshot_placeholder(st):
            raise _placeholder_error("/".join(parts[:-1]))
        if st.st_ctime_ns < self.epoch_ns:
            # The entry changes the parent layer's directory, and so its ctime.
            self.touched_directories.add((st.st_dev, st.st_ino))
        return fd

    def own_created_parent(self, fd: int, path: str) -> None:
        """Give a directory that entry_parent made the parent owner, keeping a group that a setgid parent passed on."""
        assert self.parent_owner is not None
        uid, gid = self.parent_owner
        st = os.fstat(fd)
        if st.st_mode & stat.S_ISGID:
            gid = st.st_gid
        self.chown(functools.partial(os.fchown, fd, uid, gid), (uid, gid), path)

    def remove_created_parents(self, path: str) -> None:
        """Remove the directories that entry_parent made for the failed entry path, deepest first.

        They form one chain, so the walk goes down it once and climbs back
        with "..", in time linear in the path's length. A directory that is
        not empty, or that cannot be removed for another reason, stays, and
        so do the ones above it.
        """
        parts, indexes = self.created_parents
        self.created_parents = ((), [])
        if not indexes:
            return
        first, last = indexes[0], indexes[-1]
        self.forget_directories(parts[:first + 1])
        try:
            fd = _open_entry_parent(self.root_fd, parts[:first + 1], path)
            if fd is None:
                return
            try:
                for part in parts[first:last]:
                    child = _open_directory(part, fd)
                    os.close(fd)
                    fd = child
                for index in range(last, first - 1, -1):
                    os.rmdir(parts[index], dir_fd=fd)
                    if index > first:
                        parent = _open_directory("..", fd)
                        os.close(fd)
                        fd = parent
            finally:
                os.close(fd)
        except (OSError, ValueError) as error:
            log.debug("kept directories made for the failed entry %s: %s", path, error)
            return
        log.debug("removed %d directories made for the failed entry %s", last - first + 1, path)

    def forget_directories(self, parts: Sequence[str], below_only: bool = False) -> None:
        """Close the kept directories at parts and below it (only below it with below_only).

        Call it before that directory is moved, removed or emptied.
        """
        self.parents.forget(parts, below_only)
        self.link_targets.forget(parts, below_only)

    def apply_whiteout(self, parts: list[str], path: str) -> None:
        base = parts[-1]
        if base.startswith(WHITEOUT_META_PREFIX) and base != WHITEOUT_OPAQUE_DIR:
            return
        target = base[len(WHITEOUT_PREFIX):]
        if base != WHITEOUT_OPAQUE_DIR and target in ("", ".", ".."):
            raise ValueError(f"whiteout {path!r} does not name an entry")
        # containers/storage creates the missing parents of any entry, a whiteout's too.
        parent_fd = self.entry_parent(parts, path)
        if base == WHITEOUT_OPAQUE_DIR:
            self.forget_directories(parts[:-1], below_only=True)
            self.empty_opaque_directory(parent_fd)
        else:
            self.forget_directories(parts[:-1] + [target])
            self.remove_tree(parent_fd, target)

    def empty_opaque_directory(self, dir_fd: int) -> None:
        """Remove everything below dir_fd that this apply did not create or change.

        What this layer wrote has a ctime at or after the apply's epoch; what
        came from the parent is older, except for the parent's inodes that
        this apply linked or unlinked another name of.  Their names count as
        the layer's only where this apply made them. The walk keeps one
        directory open at a time, so any depth works.

        A directory emptied once in this apply holds only the layer's own
        entries from then on, so it is not walked again: a tar repeating the
        marker costs one stat.
        """

        def visit(fd: int, relative: _WalkPath, entries: list[Any]) -> list[bytes]:
            dir_st = os.fstat(fd)
            self.emptied.add((dir_st.st_dev, dir_st.st_ino))
            subdirectories = []
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if self.from_parent_layer(dir_st, entry.name, st):
                    self.remove_tree(fd, entry.name)
                elif stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in self.emptied:
                    subdirectories.append(os.fsencode(entry.name))
            return subdirectories

        top = os.fstat(dir_fd)
        if (top.st_dev, top.st_ino) not in self.emptied:
            walk_tree(dir_fd, visit, path=_describe_fd(dir_fd))

    def from_parent_layer(self, dir_st: os.stat_result, name: str, st: os.stat_result) -> bool:
        """Return whether name (in the directory dir_st) came from the parent layer.

        A snapshot placeholder always did, because an apply never makes one.
        Its ctime is no help, because the kernel makes a new placeholder inode
        with the current time at each lookup. The root of a mount may have
        inode number 2 too, and remove_tree refuses to enter it.
        """
        if _is_snapshot_placeholder(st):
            return True
        if st.st_ctime_ns < self.epoch_ns:
            return True
        if stat.S_ISDIR(st.st_mode):
            # A directory of the parent layer that this apply only added
            # entries to or whited out entries in stays the parent's, as
            # containers/storage keeps only paths that were tar entries.
            return (st.st_dev, st.st_ino) in self.touched_directories
        if (st.st_dev, st.st_ino) not in self.relinked:
            return False
        return (dir_st.st_dev, dir_st.st_ino, name) not in self.linked_names

    def is_parent_inode(self, st: os.stat_result) -> bool:
        return st.st_ctime_ns < self.epoch_ns or (st.st_dev, st.st_ino) in self.relinked

    def unlink(self, dir_fd: int, name: str) -> None:
        """Unlink a non-directory for _remove_tree.

        An inode with other names survives the unlink, so it is noted for
        opaque directories and keeps its immutable and append-only flags,
        which _unlink_at clears when they block the unlink.
        """
        st = _lstat_at(dir_fd, name)
        saved = None
        if st is not None and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if self.is_parent_inode(st):
                self.relinked.add((st.st_dev, st.st_ino))
            if stat.S_ISREG(st.st_mode):
                saved = _SavedInodeFlags.of_file(dir_fd, name, st)
        try:
            _unlink_at(dir_fd, name, is_dir=False)
        finally:
            if saved is not None:
                saved.restore()

    def remove_tree(self, dir_fd: int, name: str) -> None:
        """Remove name in dir_fd and all below it, keeping the immutable and append-only flags of dir_fd."""
        saved = _SavedInodeFlags.of_fd(dir_fd)
        try:
            _remove_tree(dir_fd, name, self.unlink)
        finally:
            if saved is not None:
                saved.restore()

    def move_into_place(self, staging_fd: int, temporary: str, parent_fd: int, parts: list[str]) -> None:
        """Rename temporary (in staging_fd) to parts[-1] in parent_fd, replacing what is there.

        A non-directory replacing a non-directory is replaced by rename(2)
        itself. Anything else there is first moved aside and deleted only
        after the rename, and moved back when the rename fails. Either way a
        failed rename (EDQUOT when btrfs cannot reserve metadata) keeps the
        old entry. Immutable and append-only flags that block the rename are
        cleared for it and set again on the inodes that survive it.
        """
        name = parts[-1]
        existing = _lstat_at(parent_fd, name)
        new_is_dir = stat.S_ISDIR(os.stat(temporary, dir_fd=staging_fd, follow_symlinks=False).st_mode)
        aside = None
        if existing is not None and _is_snapshot_placeholder(existing):
            # It is empty and cannot be renamed (ENOTEMPTY), so it goes first.
            self.forget_directories(parts)
            os.rmdir(name, dir_fd=parent_fd)
            existing = None
        if existing is not None and (new_is_dir or stat.S_ISDIR(existing.st_mode)):
            if not stat.S_ISDIR(existing.st_mode):
                self.note_replaced(existing)  # before the rename aside changes its ctime
            aside = self.move_aside(parent_fd, parts, existing)
            existing = None
        saved = [_SavedInodeFlags.of_fd(parent_fd)]
        if existing is not None:
            self.note_replaced(existing)
            if stat.S_ISREG(existing.st_mode) and existing.st_nlink > 1:
                saved.append(_SavedInodeFlags.of_file(parent_fd, name, existing))
        try:
            self.rename_clearing_flags(staging_fd, temporary, parent_fd, name)
        except BaseException:
            if aside is not None:
                self.move_back(aside, parent_fd, name)
            raise
        finally:
            for flags in saved:
                if flags is not None:
                    flags.restore()
        if aside is not None:
            self.remove_tree(aside[0], aside[1])

    def note_replaced(self, st: os.stat_result) -> None:
        """Note a parent-layer inode whose other names survive the replacement of one of them."""
        if st.st_nlink > 1 and self.is_parent_inode(st):
            self.relinked.add((st.st_dev, st.st_ino))

    @staticmethod
    def rename_clearing_flags(source_fd: int, source: str, target_fd: int, target: str) -> None:
        """Rename, clearing the immutable and append-only flags of the target and its directory if they block it."""
        try:
            os.rename(source, target, src_dir_fd=source_fd, dst_dir_fd=target_fd)
        except PermissionError:
            if not (_clear_inode_flags(target_fd, target) | _clear_inode_flags(target_fd, None)
                    | _clear_inode_flags(source_fd, source)):
                raise
            os.rename(source, target, src_dir_fd=source_fd, dst_dir_fd=target_fd)

    def move_aside(self, parent_fd: int, parts: list[str], st: os.stat_result) -> tuple[int, str]:
        """Move the entry at parts under a new apply temporary name; return its directory fd and name.

        The name is in the staging directory (the layer root when it can be),
        where the next apply deletes what a killed one left.
        """
        if stat.S_ISDIR(st.st_mode):
            self.forget_directories(parts)
        staging_fd = self.staging_fd(parent_fd)
        aside = f"{_APPLY_TEMPORARY_PREFIX}apply-{os.urandom(8).hex()}"
        saved = _SavedInodeFlags.of_fd(parent_fd)
        try:
            self.rename_clearing_flags(parent_fd, parts[-1], staging_fd, aside)
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
            raise _os_error(errno.EBUSY, "replace entry", "/".join(parts),
                            "it is a mount point; unmount it first") from None
        finally:
            if saved is not None:
                saved.restore()
        return staging_fd, aside

    def move_back(self, aside: tuple[int, str], parent_fd: int, name: str) -> None:
        """Give an entry moved aside its name again after a failed replacement."""
        try:
            self.rename_clearing_flags(aside[0], aside[1], parent_fd, name)
        except OSError as error:
            directory = _describe_fd(aside[0])
            log.warning("could not move %s back to %s after a failed replacement: %s; rename it back "
                        "before the next apply_diff, which deletes it", os.path.join(directory, aside[1]),
                        name, error)

    def apply_directory(self, parent_fd: int, name: str | None, parts: list[str], member: tarfile.TarInfo,
                        path: str) -> None:
        existing = _lstat_at(parent_fd, name) if name is not None else None
        # A snapshot's placeholder for a nested subvolume takes no entries,
        # so it is replaced like a file.
        if name is None or (existing is not None and stat.S_ISDIR(existing.st_mode)
                            and not _is_snapshot_placeholder(existing)):
            # Both are directories: only the metadata of the existing one changes.
            # NOTE: when the kernel rejects an xattr here, the xattrs removed and
            # the owner and mode set before it stay changed. The directory and
            # its contents remain.
            fd = os.dup(parent_fd) if name is None else _open_directory(name, parent_fd)
            try:
                self.remove_unlisted_xattrs(fd, member, path)
                self.set_fd_metadata(fd, member, path)
                st = os.fstat(fd)
                self.touched_directories.discard((st.st_dev, st.st_ino))
            finally:
                os.close(fd)
        else:
            self.install_directory(parent_fd, parts, member, path)
        mtime_ns = _mtime_ns(member)
        self.dir_times.add(parts, mtime_ns, mtime_ns)

    def remove_unlisted_xattrs(self, fd: int, member: tarfile.TarInfo, path: str) -> None:
        """Remove the carried extended attributes of fd that the entry does not list.

        An entry lists every carried extended attribute of its inode, so one
        it leaves out was removed in the layer. Names that a diff does not
        carry (security.selinux, trusted.*) stay, and a capability, which a
        directory does not carry, is removed.
        """
        listed = self.host_xattrs(member)
        # Nothing is changed before this listing, so when it fails the entry is left as it was.
        for name in _list_xattrs(fd, path):
            if not _is_carried_xattr(name) or name in listed:
                continue
            try:
                os.removexattr(fd, name)
            except OSError as error:
                if error.errno != errno.ENODATA:
                    raise
            log.debug("removed extended attribute %s of %s", name, path)

    def install_directory(self, parent_fd: int, parts: list[str], member: tarfile.TarInfo, path: str) -> None:
        """Make a new directory under a temporary name, then move it over what is at parts.

        A failure while setting its metadata (an xattr the filesystem rejects)
        leaves the entry it was to replace as it was.
        """
        temporary = self.temporary_name
        staging_fd = self.staging_fd(parent_fd)
        os.mkdir(temporary, 0o700, dir_fd=staging_fd)
        installed = False
        try:
            fd = _open_directory(temporary, staging_fd)
            try:
                self.set_fd_metadata(fd, member, path)
            finally:
                os.close(fd)
            self.move_into_place(staging_fd, temporary, parent_fd, parts)
            installed = True
        finally:
            if not installed:
                with _suppress_missing():
                    os.rmdir(temporary, dir_fd=staging_fd)

    def apply_file(self, parts: list[str], member: tarfile.TarInfo, data_reader: _DataReader, path: str) -> None:
        # The data goes to a temporary file in the layer root first, so that a
        # truncated stream fails before any parent directory is created.
        temporary = self.temporary_name
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.root_fd)
        installed = False
        try:
            with open(fd, "wb", closefd=False) as out:
                data_reader(member, out)
            self.set_fd_metadata(fd, member, path)
            parent_fd = self.entry_parent(parts, path)
            staging_fd = self.staging_fd(parent_fd)
            if staging_fd != self.root_fd:
                self.copy_into_subvolume(fd, staging_fd, parent_fd, parts, member, path)
                return
            self.move_into_place(self.root_fd, temporary, parent_fd, parts)
            installed = True
        finally:
            os.close(fd)
            if not installed:
                with _suppress_missing():
                    os.unlink(temporary, dir_fd=self.root_fd)

    def staging_fd(self, parent_fd: int) -> int:
        """Return the directory for the temporaries of an entry in parent_fd. The applier owns the fd.

        It is the layer root, or the top directory of the nested subvolume
        that contains parent_fd, because rename(2) cannot cross subvolumes
        (EXDEV). The next apply deletes what a killed one left in either.
        """
        device = os.fstat(parent_fd).st_dev
        if device == self.root_dev:
            return self.root_fd
        top_fd = self.subvolume_tops.get(device)
        if top_fd is not None:
            self.subvolume_tops.move_to_end(device)
            return top_fd

        # A layer can hold any number of nested subvolumes, so only the last
        # few stay open. Every use of a staging fd ends before the next entry.
        if len(self.subvolume_tops) >= _SUBVOLUME_TOPS_OPEN:
            os.close(self.subvolume_tops.popitem(last=False)[1])
        # NOTE: an apply without CAP_DAC_OVERRIDE therefore needs write access to
        # the top directory of each nested subvolume that it writes into.
        top_fd = _open_device_top(parent_fd)
        self.subvolume_tops[device] = top_fd
        top = os.fstat(top_fd)
        if top.st_ctime_ns < self.epoch_ns:
            # Staging changes the ctime of the parent layer's directory.
            self.touched_directories.add((top.st_dev, top.st_ino))
        return top_fd

    def copy_into_subvolume(self, source_fd: int, staging_fd: int, parent_fd: int, parts: list[str],
                            member: tarfile.TarInfo, path: str) -> None:
        """Install a regular file whose data is staged in the root into another subvolume.

        The copy is made in staging_fd, the top directory of the subvolume
        that contains parent_fd. It shares the data extents of the staged
        file where the filesystem can clone them (see _copy_file_data).
        """
        temporary = self.temporary_name
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=staging_fd)
        installed = False
        try:
            _copy_file_data(source_fd, fd, path)
            self.set_fd_metadata(fd, member, path)
            self.move_into_place(staging_fd, temporary, parent_fd, parts)
            installed = True
        finally:
            os.close(fd)
            if not installed:
                with _suppress_missing():
                    os.unlink(temporary, dir_fd=staging_fd)

    def apply_special(self, parent_fd: int, parts: list[str], member: tarfile.TarInfo, path: str) -> None:
        """Create a symlink, hard link, device node or FIFO under a temporary name, then rename it."""
        import tarfile

        # The temporary name lives where the next apply finds and deletes
        # one that a killed apply left (see staging_fd).
        temporary = self.temporary_name
        staging_fd = self.staging_fd(parent_fd)
        linked_parent_inode = False
        if member.issym():
            # The target is stored as given: nothing here ever follows it.
            os.symlink(member.linkname, temporary, dir_fd=staging_fd)
        elif member.islnk():
            linked_parent_inode = self.link(staging_fd, temporary, member, path)
        else:
            kind = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
                    tarfile.FIFOTYPE: stat.S_IFIFO}[member.type]
            device = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
            os.mknod(temporary, kind | 0o600, device, dir_fd=staging_fd)
        try:
            if not member.islnk():
                # A hard link shares the metadata of its target, as with GNU tar.
                self.set_path_metadata(staging_fd, temporary, member, path)
            self.move_into_place(staging_fd, temporary, parent_fd, parts)
            if linked_parent_inode:
                parent_st = os.fstat(parent_fd)
                self.linked_names.add((parent_st.st_dev, parent_st.st_ino, parts[-1]))
        finally:
            # rename() does nothing when both names are links to one inode,
            # so the temporary name can remain even after success.
            with _suppress_missing():
                os.unlink(temporary, dir_fd=staging_fd)

    def link_target(self, member: tarfile.TarInfo, path: str) -> tuple[int, str, os.stat_result]:
        """Resolve a hard link's target inside the layer; return its directory fd, name and stat.

        The target must exist and must not be a directory. It may be a
        symlink, which is linked itself (see link). No directory on the way
        to it may be a symlink. The fd belongs to the applier and stays open
        until the next link_target.
        """
        target = member.linkname
        target_parts = _path_parts(target)
        if not target_parts:
            raise ValueError(f"hard link {path!r} points at the layer root")
        target_dir_fd = self.link_targets.open(target_parts[:-1], target)
        if target_dir_fd is None:
            raise ValueError(f"hard link {path!r}: target {target!r} does not exist in the layer")
        st = _lstat_at(target_dir_fd, target_parts[-1])
        if st is None or stat.S_ISDIR(st.st_mode):
            problem = "does not exist in the layer" if st is None else "is a directory"
            raise ValueError(f"hard link {path!r}: target {target!r} {problem}")
        return target_dir_fd, target_parts[-1], st

    def link(self, parent_fd: int, temporary: str, member: tarfile.TarInfo, path: str) -> bool:
        """Make temporary a hard link to the entry's target; return whether that is a parent-layer inode.

        linkat(2) without AT_SYMLINK_FOLLOW links a symlink itself, never
        what it points at, as GNU tar and containers/storage extract it.
        """
        target_dir_fd, target_name, st = self.link_target(member, path)
        os.link(target_name, temporary, src_dir_fd=target_dir_fd, dst_dir_fd=parent_fd,
                follow_symlinks=False)
        if not self.is_parent_inode(st):
            return False
        self.relinked.add((st.st_dev, st.st_ino))
        return True


def _container_root_owner(uid_maps: Sequence[IDMap] | None,
                          gid_maps: Sequence[IDMap] | None) -> tuple[int, int] | None:
    """Return the host uid and gid of container root under the ID maps, or None without maps or mapping."""
    if not uid_maps and not gid_maps:
        return None
    uid = _map_id(uid_maps, 0, True)
    gid = _map_id(gid_maps, 0, True)
    if uid is None or gid is None:
        return None
    return uid, gid


def _check_link_outside_entry(parts: list[str], member: tarfile.TarInfo, path: str) -> None:
    """Raise ValueError when the target of the hard link entry member lies inside the directory it replaces.

    containers/storage deletes the directory first, so its link fails
    because the target is gone.
    """
    target_parts = _path_parts(member.linkname)
    if len(target_parts) > len(parts) and target_parts[:len(parts)] == parts:
        raise ValueError(f"hard link {path!r}: target {member.linkname!r} is inside the directory it replaces, "
                         "which is deleted before the link is made; link to a file outside it")


def _set_xattr(target: int | bytes, name: str, value: bytes, path: str, follow_symlinks: bool = True) -> None:
    """Set the extended attribute name of target, an fd or a path; errors name the attribute and its size."""
    try:
        os.setxattr(target, name, value, follow_symlinks=follow_symlinks)
    except OSError as error:
        hint = ""
        if error.errno == errno.ENOSPC:
            # btrfs keeps an attribute's name and value in one item of a
            # metadata node, and reports a larger one as ENOSPC.
            hint = ("the filesystem is full, or the attribute is larger than btrfs stores in one metadata "
                    "node (about 16 KiB with the default node size); shorten the value")
        raise _os_error(error.errno, f"set extended attribute {name} ({len(value)} bytes)", path, hint) from None


def _invalid_tar_header(error: BaseException, offset: int, last_name: str | None) -> ValueError:
    """Build the ValueError for a tar header at offset that cannot be read.

    Besides its own errors, tarfile lets ValueError (UnicodeDecodeError
    among them) escape from its parsing of PAX records and GNU sparse maps,
    as a fuzzed run of CPython 3.11 showed.
    """
    import tarfile

    detail = str(error)
    if not isinstance(error, (tarfile.TarError, EOFError, _CorruptStream)):
        detail = f"malformed header: {error}"
    return ValueError(f"invalid layer tar {_tar_position(offset, last_name)}: {detail}")


def _tar_position(offset: int, last_name: str | None) -> str:
    """Describe a place in a layer tar for messages: its offset and the entry before it."""
    if last_name is None:
        return f"at offset {offset} (before the first entry)"
    return f"at offset {offset} (after entry {last_name!r})"


def _skip_to_next_header(tar: tarfile.TarFile) -> None:
    """Read and discard what is left of the current entry's data in a stream.

    TarFile.next() skips forward in a stream with a loop of reads that goes
    on at the end of the input. An entry whose data is never read (a
    whiteout) with a huge size in its header would make it spin forever.
    NOTE: the data is still decompressed, as Go's archive/tar does. 11 KB of
    bzip2 that expand to 16 GB of zeros took 51 s of CPU on a 2-core test
    machine.
    """
    import tarfile

    stream: Any = tar.fileobj  # tarfile's stream reader, in mode "r|"
    remaining = tar.offset - stream.tell()
    while remaining > 0:
        chunk = stream.read(min(remaining, _COPY_CHUNK))
        if not chunk:
            raise tarfile.ReadError("the entry's data ends before the size in its header")
        remaining -= len(chunk)


def _placeholder_on_path(root_fd: int, parts: list[str]) -> str | None:
    """Return the first directory of parts below root_fd that is a snapshot placeholder, or None."""
    fd = os.dup(root_fd)
    try:
        for index, part in enumerate(parts):
            st = _lstat_at(fd, part)
            if st is None or not stat.S_ISDIR(st.st_mode):
                return None
            if _is_snapshot_placeholder(st):
                return "/".join(parts[:index + 1])
            child = _open_directory(part, fd)
            os.close(fd)
            fd = child
        return None
    finally:
        os.close(fd)


def _placeholder_error(path: str) -> OSError:
    """Build the error for an entry below path, a snapshot's placeholder for a nested subvolume."""
    return OSError(errno.EPERM, f"{path!r} is the empty placeholder that a snapshot has for a nested "
                   "subvolume of the parent layer, and nothing can be created in it; put a directory entry "
                   "for it earlier in the tar to replace it, or build the parent layer without nested "
                   "subvolumes")


class _suppress_missing:
    def __enter__(self) -> _suppress_missing:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        return kind is not None and issubclass(kind, FileNotFoundError)


# FICLONE errors after which the data is copied instead. EXDEV means files on
# different filesystems, and EOPNOTSUPP a filesystem without reflinks. EINVAL
# means btrfs files that differ in nodatacow (chattr +C), and ENOTTY a file
# whose driver has no such ioctl.
_CLONE_UNSUPPORTED = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL})


def _clone_file(source_fd: int, fd: int) -> None:
    """Make fd share all data extents of source_fd (FICLONE), replacing fd's contents."""
    while True:
        try:
            fcntl.ioctl(fd, _structs.FICLONE, source_fd)
            return
        except InterruptedError:
            continue


def _copy_file_data(source_fd: int, fd: int, path: str) -> None:
    """Copy all data of source_fd into the empty file fd, by reflink where possible, keeping holes.

    path names the entry in errors.
    """
    try:
        _clone_file(source_fd, fd)
        return
    except OSError as error:
        if error.errno not in _CLONE_UNSUPPORTED:
            raise _os_error(error.errno, "clone file data", path) from None
        log.debug("cannot clone the data of %s (%s), copying it", path, os.strerror(error.errno))
    _copy_data_ranges(source_fd, fd)


def _copy_data_ranges(source_fd: int, fd: int) -> None:
    """Copy the data ranges of source_fd (SEEK_DATA, SEEK_HOLE) to the same offsets in fd.

    Holes are skipped, and the final ftruncate gives fd the size of
    source_fd, so fd stores no more blocks than source_fd.
    """
    size = os.fstat(source_fd).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(source_fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: only a hole remains
                raise
            break
        end = os.lseek(source_fd, start, os.SEEK_HOLE)
        _copy_range(source_fd, fd, start, end)
        offset = end
    os.ftruncate(fd, size)


def _copy_range(source_fd: int, fd: int, start: int, end: int) -> None:
    """Copy the bytes from start to end of source_fd to the same offsets in fd."""
    offset = start
    while offset < end:
        chunk = os.pread(source_fd, min(end - offset, _COPY_CHUNK), offset)
        if not chunk:
            raise OSError(errno.EIO, f"file data ends at offset {offset}, before the data range "
                          f"that SEEK_HOLE reported up to offset {end}")
        written = 0
        while written < len(chunk):
            written += os.pwrite(fd, chunk[written:], offset + written)
        offset += len(chunk)


# Seconds that an apply retries a held lock before it raises EBUSY, and the
# pause between two attempts. The retries outlast the window between fork()
# and exec() of a child spawned by another thread, in which the child shares
# the locked open file description.
_APPLY_LOCK_WAIT = 2.0
_APPLY_LOCK_RETRY_INTERVAL = 0.01

# Descriptors of the layer directories that applies in this process lock or
# are about to lock. A forked child closes its copies (see
# _close_apply_locks_in_child), so that it does not share the lock.
_apply_lock_fds: set[int] = set()
_apply_lock_fds_guard = threading.Lock()


def _acquire_apply_lock_fds_for_fork() -> None:
    # Taken before fork() and released after it on both sides, so that the
    # child gets the set in a consistent state and an unlocked guard.
    _apply_lock_fds_guard.acquire()


def _release_apply_lock_fds_after_fork() -> None:
    _apply_lock_fds_guard.release()


def _close_apply_locks_in_child() -> None:
    """Close, in a forked child, the descriptors that hold the parent's apply locks.

    The lock belongs to the open file description, and closing the child's
    copy leaves it with the parent alone.
    """
    for fd in _apply_lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _apply_lock_fds.clear()
    _apply_lock_fds_guard.release()


# NOTE: only forks that run Python's at-fork handlers (os.fork, and
# multiprocessing with the fork start method) close the copies. A child forked
# by C code that never calls exec() holds the lock until it exits, and applies
# to that layer meanwhile fail with EBUSY.
os.register_at_fork(before=_acquire_apply_lock_fds_for_fork, after_in_parent=_release_apply_lock_fds_after_fork,
                    after_in_child=_close_apply_locks_in_child)


# The layers locked by _open_layer_for_writing: each returned fd, with the fd
# that holds its lock.
_layer_lock_fds: dict[int, int] = {}


def _open_layer_for_writing(layer_dir: PathArg, operation: str = "apply layer diff") -> int:
    """Open a layer's top directory and lock the layer for one apply or remap; return the fd.

    Raises FileNotFoundError when another process removed the layer while
    this one waited for the lock (see _lock_directory). Release the lock
    and close the fd with _unlock_and_close_layer.
    """
    root_fd = _open_layer_top(layer_dir)
    try:
        lock_fd = _lock_directory(root_fd, layer_dir, operation)
        try:
            _check_layer_still_linked(root_fd, layer_dir, operation)
        except BaseException:
            _unlock_layer(lock_fd)
            raise
    except BaseException:
        os.close(root_fd)
        raise
    _layer_lock_fds[root_fd] = lock_fd
    return root_fd


def _check_layer_still_linked(root_fd: int, layer_dir: PathArg, operation: str) -> None:
    """Raise FileNotFoundError when the layer open at root_fd is no longer at layer_dir."""
    try:
        st = os.stat(layer_dir, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None or not os.path.samestat(st, os.fstat(root_fd)):
        raise FileNotFoundError(errno.ENOENT, f"{operation} failed: another process removed the layer while "
                                "this one waited for it", os.fsdecode(layer_dir))


def _lock_directory(dir_fd: int, path: PathArg, operation: str) -> int:
    """Take the layer lock on the directory dir_fd through a descriptor of its own, and return that descriptor.

    The lock is an exclusive flock on an open file description that no
    other descriptor shares, so an os.dup of dir_fd never holds it, and a
    forked child closes its copy (_close_apply_locks_in_child). Closing it,
    or the death of the process, releases the lock. While another
    description has it, which includes another thread's in this process,
    the call retries for _APPLY_LOCK_WAIT seconds and then raises OSError
    with EBUSY. Release it with _unlock_layer.
    """
    # Opened under the guard, so a fork in another thread never copies the
    # fd before it is in the set that the child closes.
    with _apply_lock_fds_guard:
        lock_fd = _reopen_directory(dir_fd)
        _apply_lock_fds.add(lock_fd)
    try:
        _flock_with_retries(lock_fd, path, operation)
    except BaseException:
        _unlock_layer(lock_fd)
        raise
    return lock_fd


def _reopen_directory(fd: int) -> int:
    """Open the directory fd again, as a new open file description."""
    try:
        return _open_directory(".", dir_fd=fd)
    except PermissionError:
        # "." needs search permission, the /proc link only read permission.
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _flock_with_retries(root_fd: int, layer_dir: PathArg, operation: str) -> None:
    deadline = time.monotonic() + _APPLY_LOCK_WAIT
    while True:
        try:
            fcntl.flock(root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            raise _os_error(errno.EBUSY, operation, layer_dir,
                            "another apply_diff or update_layer_id_map is writing to this layer, another "
                            "remove is deleting it, or another process holds a flock on its top directory; "
                            "retry when it finishes")
        time.sleep(_APPLY_LOCK_RETRY_INTERVAL)


def _unlock_and_close_layer(root_fd: int) -> None:
    """Release the lock that _open_layer_for_writing took, and close root_fd."""
    _unlock_layer(_layer_lock_fds.pop(root_fd))
    os.close(root_fd)


def _unlock_layer(lock_fd: int) -> None:
    """Release the layer lock held through lock_fd, and close lock_fd."""
    # Unlocking first releases the lock for every copy of the description,
    # also one that a fork copies before lock_fd leaves the set.
    fcntl.flock(lock_fd, fcntl.LOCK_UN)
    with _apply_lock_fds_guard:
        _apply_lock_fds.discard(lock_fd)
    os.close(lock_fd)


def apply_layer_diff(layer_dir: PathArg, diff: IO[bytes], uid_maps: Sequence[IDMap] | None = (),
                     gid_maps: Sequence[IDMap] | None = (), ignore_chown_errors: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> int:
    """Apply a layer tar (uncompressed, gzip, bzip2, xz or zstd) to a layer directory.

    Returns the sum of the sizes of the regular files that it wrote, so
    whiteouts, hard links and AUFS metadata add nothing. UnpackLayer in
    containers/storage's pkg/archive adds the size field of every entry
    instead. The sums differ only where a whiteout, an AUFS metadata file
    or a non-regular entry has a size other than 0.

    Raises ValueError naming the entry and offset for a corrupt, truncated
    or hostile stream; the layer then keeps every entry before the bad one.
    The stream is read to its end, so a compressed stream that fails its
    checksum or lacks its end after the last entry raises too, with every
    entry applied.

    Applies to one layer run one at a time: each holds an exclusive flock(2)
    on the layer's top directory, and one that finds it held retries for 2
    seconds, then raises OSError with EBUSY. That holds for two threads of
    one process too. A process that locks that directory itself (a
    container locking its "/") makes applies fail the same way. The lock
    ends with the apply or with its process. A child that os.fork() makes
    during an apply does not share the lock. It does not keep out other
    writers, such as a container, but Driver.remove takes the same lock.
    """
    import tarfile

    if not hasattr(diff, "read") or isinstance(diff, io.TextIOBase):
        raise TypeError(f"apply_diff needs a readable binary file object, not {type(diff).__name__}; "
                        "open the tar with open(path, 'rb')")
    counting = _CountingReader(diff)
    tar_input = _decompressed(counting)
    # The lock is taken first, because the removal of temporaries below
    # would delete those of an apply running at the same time.
    root_fd = _open_layer_for_writing(layer_dir)
    try:
        _check_no_mounts_below(root_fd, "apply layer diff", layer_dir)
        _remove_apply_temporaries(root_fd, layer_dir)
        _remove_nested_apply_temporaries(root_fd, layer_dir)
        applier = _LayerApplier(root_fd, uid_maps, gid_maps, ignore_chown_errors, layer_dir)
    except BaseException:
        # An open descriptor keeps a removed layer's subvolume from being cleaned.
        _unlock_and_close_layer(root_fd)
        raise
    applied = 0
    written_size = 0
    last_report = time.monotonic()
    last_name = None

    def report(force: bool = False) -> None:
        nonlocal last_report
        if progress is None:
            return
        now = time.monotonic()
        if force or now - last_report >= _PROGRESS_INTERVAL:
            last_report = now
            progress(counting.count, applied)

    def copy_data(member: tarfile.TarInfo, out: io.BufferedWriter) -> None:
        nonlocal written_size
        # The applier calls this once for each regular file that it writes.
        written_size += member.size
        # An io.BufferedReader over tarfile's reader of the member's data.
        source: Any = tar.extractfile(member)
        assert source is not None  # copy_data is called only for regular files
        if member.sparse is None:
            copy_range(source, out, member.size)
            return
        # A GNU sparse member: only its data regions are written, so holes
        # stay holes. The unbuffered reader never reads ahead into a hole.
        # NOTE: each region costs a seek and a read through tarfile, about
        # 25 microseconds, so a map of one-byte regions costs about 1.2 s of
        # CPU per MiB of map.
        regions = _sparse_regions(member)
        raw = source.raw
        for offset, length in regions:
            raw.seek(offset)
            out.seek(offset)
            copy_range(raw, out, length)
        out.truncate(member.size)

    def copy_range(source: Any, out: io.BufferedWriter, remaining: int) -> None:
        while remaining:
            try:
                chunk = source.read(min(remaining, _COPY_CHUNK))
            except (tarfile.TarError, EOFError, _CorruptStream) as error:
                raise ValueError(f"truncated or corrupt data: {error}") from None
            if not chunk:
                raise ValueError("data ends before the size in its header")
            out.write(chunk)
            remaining -= len(chunk)
            report()

    # Exceptions that reading a tar header can raise. _CorruptStream is a ValueError, and
    # OverflowError is caught as for entries, for numbers too large for C.
    header_errors = (tarfile.TarError, EOFError, ValueError, OverflowError)
    try:
        try:
            tar = tarfile.open(fileobj=tar_input, mode="r|", encoding="utf-8", errors="surrogateescape",
                               tarinfo=_bounded_tarinfo_class())
        except tarfile.ReadError as error:
            if tar_input.position == 0 and str(error) == "empty file":
                return 0  # an empty stream is an empty layer, as for containers/storage
            raise _invalid_tar_header(error, 0, None) from None
        except header_errors as error:
            raise _invalid_tar_header(error, 0, None) from None
        while True:
            # tarfile can move tar.offset past a header that then fails.
            header_offset = tar.offset
            try:
                member = tar.next()
            except header_errors as error:
                raise _invalid_tar_header(error, header_offset, last_name) from None
            if member is None:
                break
            _forget_tar_members(tar)  # tarfile keeps every member read; memory must stay flat
            if member.type == tarfile.XGLTYPE:
                # NOTE: containers/storage's UnpackLayer acts on the name of a
                # global header entry before it ignores the entry: it creates
                # the parents, applies a whiteout name and removes what is at
                # the path. The driver does none of that; the name is not a
                # layer entry to any tar writer.
                continue
            last_name = member.name
            try:
                _check_entry_type(member)
                _check_entry_numbers(member)
                _check_sparse_map(member)
                applier.apply(member, copy_data)
            except ValueError as error:
                raise ValueError(f"entry {member.name!r} at offset {member.offset}: {error}") from None
            except (OverflowError, struct.error) as error:
                raise ValueError(f"entry {member.name!r} at offset {member.offset}: "
                                 f"a value is out of range: {error}") from None
            except OSError as error:
                message = f"apply entry {member.name!r} at offset {member.offset} failed: {error.strerror}"
                if error.errno == errno.EDQUOT:
                    message += ("; the layer reached its size limit, so apply the tar to a layer created with "
                                "a larger size (storage option size, or btrfs.size)")
                raise OSError(error.errno, message, os.fsdecode(layer_dir)) from None
            try:
                _skip_to_next_header(tar)
            except header_errors as error:
                # The offset where the data ran out, not the one that the size claims.
                stream: Any = tar.fileobj
                raise _invalid_tar_header(error, stream.tell(), last_name) from None
            applied += 1
            report()
        end = tar_input.block_at(tar.offset)
        if end is None or end.count(0) != len(end):
            raise ValueError(f"invalid layer tar {_tar_position(tar.offset, last_name)}: "
                             "truncated or corrupt, no end-of-archive block")
        try:
            _check_block_after_end(tar_input, tar.offset + tarfile.BLOCKSIZE)
            _read_to_end(tar_input)
        except _CorruptStream as error:
            raise ValueError(f"invalid layer tar at offset {tar_input.position} (after the end-of-archive "
                             f"block at offset {tar.offset}): {error}; every entry was applied, but the "
                             "data of any of them may be corrupt") from None
        applier.dir_times.apply(root_fd)
        report(force=True)
        return written_size
    finally:
        applier.close()
        _unlock_and_close_layer(root_fd)


# ID-map updates ------------------------------------------------------------


def _id_map_pair(pair: Any, what: str) -> tuple[list[IDMap], list[IDMap]] | None:
    if pair is None:
        return None
    try:
        uid_maps, gid_maps = pair
    except (TypeError, ValueError):
        raise ValueError(f"invalid {what} {pair!r}: expected a (uid_maps, gid_maps) pair") from None
    return _id_maps(uid_maps, what + " uid_maps") or [], _id_maps(gid_maps, what + " gid_maps") or []


def _chown_entry(dir_fd: int, name: str, st: os.stat_result, uid: int, gid: int,
                 uid_maps: tuple[Sequence[IDMap], Sequence[IDMap]], path: Any) -> None:
    """Change an entry's owner, keeping setuid, setgid and security.capability.

    chown clears setuid, setgid and the capability, which are then restored,
    with the rootid of the capability moved from the old uid maps to the
    new ones of uid_maps (see _remapped_capability).
    Every call goes through an O_PATH descriptor of the inode the walk saw,
    so an entry swapped for a symlink meanwhile (a running container can do
    that) raises ESTALE instead of redirecting a chmod outside the layer.
    An immutable or append-only file or directory gets its flags cleared for
    the change and set again after it. path names the entry in errors.
    """
    if stat.S_ISLNK(st.st_mode):
        try:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)  # lchown never follows
        except OSError as error:
            raise _os_error(error.errno, "change owner", path, _unmapped_owner_hint(error.errno, uid, gid)) from None
        return
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        fd = -1
    with _OptionalFd(fd if fd >= 0 else None):
        current = os.fstat(fd) if fd >= 0 else None
        if current is None:
            raise OSError(errno.ESTALE, "entry vanished while its owner was remapped", str(path))
        if not os.path.samestat(current, st) or stat.S_IFMT(current.st_mode) != stat.S_IFMT(st.st_mode):
            raise OSError(errno.ESTALE, "entry changed while its owner was remapped; run the remap again",
                          str(path))
        inode = f"/proc/self/fd/{fd}"

        def change() -> None:
            try:
                _set_owner(inode, st, uid, gid, uid_maps, path)
            except OSError as error:
                raise _os_error(error.errno, "change owner", path,
                                _unmapped_owner_hint(error.errno, uid, gid)) from None

        try:
            change()
        except PermissionError:
            if not _run_with_inode_flags_cleared(inode, st, change, path):
                raise


def _set_owner(inode: str, st: os.stat_result, uid: int, gid: int,
               uid_maps: tuple[Sequence[IDMap], Sequence[IDMap]], path: Any) -> None:
    """Change the owner of inode (a /proc/self/fd path), restoring what chown clears.

    security.capability is set again with its rootid remapped (see
    _remapped_capability). One that the container did not read under the
    old maps stays removed, with a warning naming path.
    """
    capability = _read_capability(inode, True) if stat.S_ISREG(st.st_mode) else None
    remapped = _remapped_capability(capability, uid_maps, str(path)) if capability is not None else None
    # NOTE: chown(2) clears the capability and the setuid and setgid bits, and
    # their old values exist only in this process's memory until the calls
    # below set them again. A remap killed in between leaves the file without them.
    os.chown(inode, uid, gid)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(inode, stat.S_IMODE(st.st_mode))
    if remapped is not None:
        os.setxattr(inode, "security.capability", remapped)
    elif capability is not None:
        log.warning("removed security.capability of %s: its rootid %s has no container uid in the old ID maps, "
                    "so the kernel did not honour it in the container", path, _capability_rootid(capability))


def _read_capability(target: str | bytes, follow_symlinks: bool) -> bytes | None:
    """Return the security.capability of target, or None when it has none."""
    try:
        return os.getxattr(target, "security.capability", follow_symlinks=follow_symlinks)
    except OSError as error:
        if error.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    return None


def _remapped_capability(value: bytes, uid_maps: tuple[Sequence[IDMap], Sequence[IDMap]],
                         path: str) -> bytes | None:
    """Return a security.capability with its rootid moved from the old uid maps to the new ones.

    A version 2 value has host uid 0 as its rootid, as the kernel reads it.
    Where the old maps map host uid 0 (a layer made without ID maps), it
    belongs to that container uid and moves with it, as apply would store it
    under the new maps (see _host_capability). A version 3 value whose
    rootid is outside the old maps gives None, because the container did not
    read it (see _container_capability), except host uid 0, which gives
    version 2. A container rootid outside the new maps raises ValueError.
    """
    rootid = _capability_rootid(value)
    if rootid is None:
        if not _is_version_2_capability(value):
            return value
        rootid = 0
    old_uid_maps, new_uid_maps = uid_maps
    container_rootid = _map_id(old_uid_maps, rootid, False)
    if container_rootid is None:
        return _capability_with_rootid(value, 0) if rootid == 0 else None
    host_rootid = _map_id(new_uid_maps, container_rootid, True)
    if host_rootid is None:
        raise ValueError(f"{path!r}: security.capability rootid {container_rootid} (a container uid) "
                         "is outside the new ID maps; nothing was changed")
    return _capability_with_rootid(value, host_rootid)


def _remap_changes_capability(item: Any, uid_maps: tuple[Sequence[IDMap], Sequence[IDMap]]) -> bool:
    """Return whether a remap changes the security.capability of a walked entry.

    Raise ValueError when its rootid has no uid in the new maps.
    """
    if not stat.S_ISREG(item.st.st_mode):
        return False
    capability = _read_capability(_fd_path(item.dir_fd, item.name), False)
    return capability is not None and _remapped_capability(capability, uid_maps, item.path) != capability


def _run_with_inode_flags_cleared(inode: str, st: os.stat_result, change: Callable[[], None], path: Any) -> bool:
    """Run change with the immutable and append-only flags of inode cleared, then set them again.

    inode is a /proc/self/fd path; only regular files and directories are
    opened. Return False, without running change, when inode has neither flag.
    """
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return False
    # Opening the /proc link reopens the inode that the walk checked.
    try:
        fd = os.open(inode, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    with _Fd(fd):
        original = _inode_flags(fd)
        if original is None or not original & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
            return False
        cleared = ctypes.c_int(original & ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL))
        _ioctl(fd, _structs.FS_IOC_SETFLAGS, cleared, "clear immutable and append-only flags", path)
        try:
            change()
        finally:
            _ioctl(fd, _structs.FS_IOC_SETFLAGS, ctypes.c_int(original),
                   "set immutable and append-only flags again", path)
    log.debug("cleared and restored the immutable and append-only flags of %s", path)
    return True


def _check_writable_subvolume(dir_fd: int, name: str, st: os.stat_result, path: Any) -> None:
    """Raise EROFS when name (in dir_fd) is the root of a read-only nested subvolume.

    A subvolume's root directory has inode number 256 and a st_dev of its
    own, so an inode 256 on another filesystem is never mistaken for one.
    """
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != BTRFS_FIRST_FREE_OBJECTID:
        return
    if st.st_dev == os.fstat(dir_fd).st_dev:
        return
    with _Fd(_open_directory(name, dir_fd)) as fd:
        if _subvolume_flags(fd, path) & BTRFS_SUBVOL_RDONLY:
            raise _os_error(errno.EROFS, "remap layer owners", path,
                            f"the nested subvolume is read-only. Make it writable with 'btrfs property "
                            f"set {path} ro false' and run the remap again (nothing was changed)")


def _is_mapped_here(map_file: str, value: int) -> bool:
    """Return whether id value, as chown takes it, is mapped in this process's user namespace.

    map_file is /proc/self/uid_map or /proc/self/gid_map, whose first field
    is the first id of a range inside the namespace.
    """
    try:
        with open(map_file, "rb") as ranges:
            for line in ranges:
                inside, _, count = (int(field) for field in line.split())
                if inside <= value < inside + count:
                    return True
    except (OSError, ValueError):
        return True  # unknown: the hint names both ids
    return False


_REMAP_UNMAPPED_REMEDY = ("remap to host ids that this namespace maps, or run the remap in a namespace that maps "
                          "them, or as root on the host")
_APPLY_UNMAPPED_REMEDY = ("set ignore_chown_errors=True (--ignore-chown-errors on the command line) to keep the "
                          "owner that the entry was created with, pass ID maps that map the entry's owner to ids "
                          "that this namespace maps, or apply in a namespace that maps the entry's owner or as root "
                          "on the host")


def _unmapped_owner_hint(err: int | None, uid: int, gid: int, remedy: str = _REMAP_UNMAPPED_REMEDY) -> str:
    """Return the hint for a chown to uid:gid that failed with err; EINVAL means an id is not mapped here.

    The hint ends with remedy, the fix that it suggests.
    """
    if err != errno.EINVAL:
        return ""
    unmapped = [f"{kind} {value}" for kind, value, map_file in
                (("uid", uid, "/proc/self/uid_map"), ("gid", gid, "/proc/self/gid_map"))
                if not _is_mapped_here(map_file, value)] or [f"uid {uid} or gid {gid}"]
    return (f"{' and '.join(unmapped)} {'is' if len(unmapped) == 1 else 'are'} not mapped in this user namespace "
            f"(check /proc/self/uid_map and /proc/self/gid_map); {remedy}")


def remap_layer_owners(layer_dir: PathArg, to_container: tuple[Sequence[IDMap], Sequence[IDMap]] | None,
                       to_host: tuple[Sequence[IDMap], Sequence[IDMap]] | None) -> None:
    """Rewrite every owner below a layer's root from one ID mapping to another.

    to_container is the (uid_maps, gid_maps) pair that maps the current host
    ids back to container ids, and to_host the pair that maps those to the
    new host ids; None or empty maps are the identity. The root keeps its
    owner. Each inode is changed once. A first walk checks that every owner
    and every rootid of a security.capability maps and that no nested
    subvolume is read-only, so those raise ValueError or EROFS before
    anything changes, and running the remap again after them never shifts
    an owner twice. The rootid of a version 3 security.capability moves
    with the owners (see _remapped_capability). The remap holds the lock
    that apply_layer_diff takes (see _open_layer_for_writing), so the two
    never write to one layer at once.
    """
    maps = (to_container or ((), ())), (to_host or ((), ()))
    uid_maps = maps[0][0], maps[1][0]
    layer_path = os.fsdecode(layer_dir)
    root_fd = _open_layer_for_writing(layer_dir, "remap layer owners")
    try:
        _check_no_mounts_below(root_fd, "remap layer owners", layer_dir)
        # Inodes, as (st_dev, st_ino), whose security.capability the remap
        # changes. _chown_entry rewrites the capability, so it runs for them
        # even when their owner stays.
        changed_capabilities = set()
        for item, _ in _remapped_owners(root_fd, maps, layer_path):  # checks every owner first
            _check_writable_subvolume(item.dir_fd, item.name, item.st, _PathBelow(layer_path, item.location))
            if _remap_changes_capability(item, uid_maps):
                changed_capabilities.add((item.st.st_dev, item.st.st_ino))
        # NOTE: an error in this pass (an I/O error, or an entry changed by a
        # running container) leaves the layer partly remapped. Running the
        # remap again then shifts the owners changed before the error a
        # second time wherever the old and new ranges overlap.
        for item, (uid, gid) in _remapped_owners(root_fd, maps, layer_path):
            if ((uid, gid) != (item.st.st_uid, item.st.st_gid)
                    or (item.st.st_dev, item.st.st_ino) in changed_capabilities):
                _chown_entry(item.dir_fd, item.name, item.st, uid, gid, uid_maps,
                             _PathBelow(layer_path, item.location))
    finally:
        _unlock_and_close_layer(root_fd)


def _remapped_owners(
    root_fd: int, maps: tuple[tuple[Sequence[IDMap], Sequence[IDMap]], tuple[Sequence[IDMap], Sequence[IDMap]]],
    layer_path: str,
) -> Iterator[tuple[Any, tuple[int, int]]]:
    """Yield (walked entry, new owner) for each inode below root_fd, each once.

    Snapshot placeholders are skipped, because their owner cannot be changed.
    Raises ValueError, naming layer_path (the layer's directory), for an
    owner that either pair of maps does not cover.
    """
    (old_uid_maps, old_gid_maps), (new_uid_maps, new_gid_maps) = maps
    seen_inodes = set()
    for item in _walk_changes(root_fd, None):
        st = item.st
        assert st is not None  # a walk without a parent yields only ADDs
        if _is_snapshot_placeholder(st):
            continue
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            inode = (st.st_dev, st.st_ino)
            if inode in seen_inodes:
                continue
            seen_inodes.add(inode)
        container_uid = _map_id(old_uid_maps, st.st_uid, False)
        container_gid = _map_id(old_gid_maps, st.st_gid, False)
        if container_uid is None or container_gid is None:
            raise ValueError(f"layer {layer_path}, entry {item.path!r}: owner {st.st_uid}:{st.st_gid} is outside "
                             "the old ID maps; nothing was changed. Pass as to_container the (uid_maps, gid_maps) "
                             "pair that the layer's files were written with, which maps host uid "
                             f"{st.st_uid} and gid {st.st_gid} to container ids")
        uid = _map_id(new_uid_maps, container_uid, True)
        gid = _map_id(new_gid_maps, container_gid, True)
        if uid is None or gid is None:
            raise ValueError(f"layer {layer_path}, entry {item.path!r}: container owner "
                             f"{container_uid}:{container_gid} is outside the new ID maps; nothing was changed. "
                             "Pass as to_host a (uid_maps, gid_maps) pair that maps container uid "
                             f"{container_uid} and gid {container_gid} to host ids")
        yield item, (uid, gid)


# -- Command line ------------------------------------------------------------------------

EXIT_SUCCESS = 0
EXIT_NO = 1
EXIT_USAGE = 2
EXIT_FAILURE = 3

_EPILOG = """\
exit status:
  0  success
  1  the layer does not exist (exists command only)
  2  usage error or invalid value (a bad id, size or option)
  3  any other failure; the message on stderr says what failed
"""


def _command_create(driver: Driver, args: Any) -> Any:
    storage_opt = {"size": args.size} if args.size is not None else None
    create = driver.create_read_write if args.read_write else driver.create
    create(args.id, args.parent, storage_opt=storage_opt)
    return {"id": args.id, "path": driver.get(args.id)}


def _command_remove(driver: Driver, args: Any) -> Any:
    driver.remove(args.id)
    return {"id": args.id, "removed": True}


def _command_get(driver: Driver, args: Any) -> Any:
    return driver.get(args.id)


def _command_exists(driver: Driver, args: Any) -> Any:
    validate_layer_id(args.id)  # Driver.exists returns False for an invalid id, as containers/storage does
    return driver.exists(args.id)


def _command_list(driver: Driver, args: Any) -> Any:
    layers = driver.list_layers()
    if args.json:
        return [layer_id if _is_utf8(layer_id) else _escape_layer_id(layer_id) for layer_id in layers]
    return [_escape_layer_id(layer_id) for layer_id in layers]


def _escape_layer_id(layer_id: str) -> str:
    r"""Escape a backslash, a non-printable character or a byte that is not UTF-8 as Python does.

    The result fits on one line and names one id: \\, \n, \x1b, \u200b, or
    \xff for the byte 0xff.
    """
    parts = []
    for character in layer_id:
        if character == "\\":
            parts.append("\\\\")
        elif "\udc80" <= character <= "\udcff":  # a byte that os.fsdecode could not decode
            parts.append(f"\\x{ord(character) - 0xDC00:02x}")
        elif not character.isprintable():
            parts.append(character.encode("unicode_escape").decode("ascii"))
        else:
            parts.append(character)
    return "".join(parts)


def _command_status(driver: Driver, args: Any) -> Any:
    return dict(driver.status())


def _command_metadata(driver: Driver, args: Any) -> Any:
    return driver.metadata(args.id)


def _command_usage(driver: Driver, args: Any) -> Any:
    return driver.read_write_disk_usage(args.id)._asdict()


def _command_cleanup(driver: Driver, args: Any) -> Any:
    driver.cleanup()
    home = os.fsencode(os.path.realpath(driver.home))
    unmounted = False
    if _is_self_bind_mount(home):
        # A bind mount that a killed btrfsdrv or containers/storage process
        # left, or that one still running uses, as containers/storage's
        # Cleanup would unmount it too.
        _umount(home, _MNT_DETACH)
        unmounted = True
        log.debug("unmounted the bind mount of %s onto itself", driver.home)
    return {"home": driver.home, "unmounted_bind_mount": unmounted}


def _is_self_bind_mount(directory: bytes) -> bool:
    """Return whether directory is a bind mount of itself (as Driver init makes)."""
    mounts = {mount.mount_id: mount for mount in _read_mountinfo()}
    for mount in mounts.values():
        parent = mounts.get(mount.parent_id)
        if mount.mount_point != directory or parent is None or parent.device != mount.device:
            continue
        if not directory.startswith(parent.mount_point.rstrip(b"/") + b"/"):
            continue
        inside = directory[len(parent.mount_point.rstrip(b"/")):]
        if mount.root == parent.root.rstrip(b"/") + inside:
            return True
    return False


def _add_id(parser: Any, parent: bool = False) -> None:
    parser.add_argument("id", help="layer id: one path component, at most 255 bytes")
    if parent:
        parser.add_argument("--parent", help="id of the parent layer")


def _build_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="btrfsdrv",
        description="Manage container image and container layers stored as btrfs subvolumes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--home", required=True, help="driver home directory on btrfs (HOME/subvolumes, HOME/quotas)")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="driver option: btrfs.min_space=SIZE, btrfs.size=SIZE or btrfs.quota_mode=full|simple")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every change made to the filesystem")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    # --json and -v also work after COMMAND. SUPPRESS keeps a command's
    # default from overwriting the value given before COMMAND.
    after_command = argparse.ArgumentParser(add_help=False)
    after_command.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                               help="print results as JSON")
    after_command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                               help="log every change made to the filesystem")

    def add(name: str, handler: Any, help_text: str) -> Any:
        command = commands.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                                      parents=[after_command],
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.set_defaults(handler=handler)
        return command

    create = add("create", _command_create, "create a layer, empty or as a snapshot of --parent")
    _add_id(create, parent=True)
    create.add_argument("--size", help="size limit such as 10G (powers of 1024); turns quota on")
    create.add_argument("--read-write", action="store_true",
                        help="create a container layer (btrfs.size applies when --size is not given)")
    _add_id(add("remove", _command_remove, "delete a layer with its nested subvolumes and quota"))
    _add_id(add("get", _command_get, "print the layer's directory, re-applying its size limit"))
    _add_id(add("exists", _command_exists, "exit 0 when the layer exists, 1 when it does not"))
    add("list", _command_list, "list the layer ids")
    add("status", _command_status, "print filesystem UUID, kernel version and quota state")
    _add_id(add("metadata", _command_metadata, "print the layer's path, subvolume id and size limit"))
    _add_id(add("usage", _command_usage, "print bytes and inodes used by a layer"))
    add("cleanup", _command_cleanup, "unmount the bind mount of home made by btrfsdrv or containers/storage")
    _add_diff_commands(add)
    return parser


_CHANGE_LETTERS = {ChangeKind.MODIFY: "C", ChangeKind.ADD: "A", ChangeKind.DELETE: "D"}


def _add_diff_commands(add: Any) -> None:
    """Register the layer diff commands."""
    for name, handler, help_text in (
        ("changes", _command_changes, "list what the layer adds (A), changes (C) and deletes (D)"),
        ("diff", _command_diff, "write the layer's changes to stdout as an uncompressed tar"),
        ("apply", _command_apply, "apply a layer tar from stdin (plain, gzip, bzip2, xz or zstd)"),
        ("diff-size", _command_diff_size, "print the bytes of files the layer adds or changes"),
    ):
        command = add(name, handler, help_text)
        command.add_argument("id", help="layer id: one path component, at most 255 bytes")
        if name == "apply":
            command.add_argument("--parent", help="id of the parent layer; accepted for compatibility and "
                                 "unused, because the layer is already a snapshot of its parent")
            command.add_argument("--ignore-chown-errors", action="store_true",
                                 help="keep the owner that an entry was created with when the kernel rejects "
                                 "the entry's owner (EPERM, or EINVAL for an id that the user namespace "
                                 "does not map), with a warning")
        else:
            command.add_argument("--parent", help="id of the layer to compare with; without it every file "
                                 "of the layer counts as added")


def _command_changes(driver: Driver, args: Any) -> Any:
    changes = driver.changes(args.id, args.parent)
    if args.json:
        return [{"path": change.path, "kind": change.kind.name.lower()} for change in changes]
    out = _standard_output("changes")
    for change in changes:
        # Bytes, because layer paths need not be valid UTF-8.
        out.write(_CHANGE_LETTERS[change.kind].encode() + b" " + os.fsencode(change.path) + b"\n")
    out.flush()
    return None


def _command_diff(driver: Driver, args: Any) -> Any:
    import shutil

    out = _standard_output("diff")
    if out.isatty():
        raise ValueError("refusing to write a tar to a terminal; redirect stdout to a file or pipe")
    with driver.diff(args.id, args.parent) as stream:
        shutil.copyfileobj(stream, out, _COPY_CHUNK)
    out.flush()
    return None


def _standard_output(content: str) -> _StandardOutput:
    """Return the binary stdout for writing content, raising ValueError when the caller closed it."""
    if sys.stdout is None:
        raise ValueError("standard output is closed; redirect it to a file or pipe")
    return _StandardOutput(sys.stdout.buffer, content)


class _StandardOutputError(OSError):
    """A failed write to standard output, other than to a closed pipe."""


def _describe_output_failure(content: str, error: OSError) -> str:
    """Describe a failed write of content (such as "diff") to standard output, with the fix."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space where standard output goes, or redirect it to another file"
    else:
        hint = "redirect standard output to another file or pipe"
    reason = error.strerror or os.strerror(error.errno or errno.EIO)
    return f"writing the {content} to standard output failed: {reason}; {hint}"


class _StandardOutput:
    """Binary stdout that raises _StandardOutputError, naming content, when a write fails.

    BrokenPipeError passes unchanged, because main handles a reader that
    closed the pipe early (as `| head` does) without a message.
    """

    def __init__(self, buffer: Any, content: str) -> None:
        self.buffer = buffer
        self.content = content

    def isatty(self) -> bool:
        return bool(self.buffer.isatty())

    def write(self, data: bytes) -> int:
        try:
            return int(self.buffer.write(data))
        except BrokenPipeError:
            raise
        except OSError as error:
            raise _StandardOutputError(error.errno, _describe_output_failure(self.content, error)) from None

    def flush(self) -> None:
        try:
            self.buffer.flush()
        except BrokenPipeError:
            raise
        except OSError as error:
            raise _StandardOutputError(error.errno, _describe_output_failure(self.content, error)) from None


def _command_apply(driver: Driver, args: Any) -> Any:
    def show_progress(bytes_read: int, entries: int) -> None:
        sys.stderr.write(f"\rapplying {args.id}: {bytes_read / 1048576:.1f} MiB read, {entries} entries")
        sys.stderr.flush()

    progress = show_progress if sys.stderr.isatty() else None
    try:
        if sys.stdin is None:
            raise ValueError("standard input is closed; redirect a layer tar into it")
        size = driver.apply_diff(args.id, sys.stdin.buffer, parent=args.parent,
                                 ignore_chown_errors=args.ignore_chown_errors, progress=progress)
    finally:
        if progress is not None:
            sys.stderr.write("\n")
    return {"id": args.id, "size": size}


def _command_diff_size(driver: Driver, args: Any) -> Any:
    return driver.diff_size(args.id, args.parent)


def _print_result(command: str, result: Any, as_json: bool) -> None:
    import json

    if as_json:
        _print_line(json.dumps(result, indent=2, sort_keys=True))
    elif isinstance(result, bool):
        _print_line("true" if result else "false")
    elif isinstance(result, dict):
        for key, value in result.items():
            if key == "id":
                value = _escape_layer_id(value)  # a newline in an id would start a line of its own
            _print_line(f"{key}: {value}")
    elif isinstance(result, list):
        for item in result:
            _print_line(item)
    elif result is not None:
        _print_line(result)


def _print_line(value: Any) -> None:
    """Write str(value) and a newline to stdout, a decoded path as its original bytes.

    A layer path that is not UTF-8 comes out as its own bytes, which a shell
    can use, whatever encoding stdout has.
    """
    if sys.stdout is None:
        return  # the caller closed stdout, and the exit status still reports the result
    text = str(value)
    stdout = getattr(sys.stdout, "buffer", None)
    if stdout is None:
        print(text)
        return
    sys.stdout.flush()
    stdout.write(os.fsencode(text) + b"\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    import logging

    args = _build_parser().parse_args(argv)
    logging.basicConfig(format="btrfsdrv: %(message)s", level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        with Driver(args.home, args.option) as driver:
            result = args.handler(driver, args)
    except BrokenPipeError:
        _discard_standard_output()
        return EXIT_FAILURE
    except _StandardOutputError as error:
        print(f"btrfsdrv: {error.strerror}", file=sys.stderr)
        _discard_standard_output()
        return EXIT_FAILURE
    except ValueError as error:
        print(f"btrfsdrv: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, DriverError) as error:
        print(f"btrfsdrv: {_describe_error(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: exit status 1 would mean "no such layer" to exists
        import traceback

        log.debug("unexpected error:\n%s", traceback.format_exc())
        print(f"btrfsdrv: unexpected {type(error).__name__}: {error}; run with -v for the traceback "
              "and report it", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if args.command != "exists" or args.json:
            _print_result(args.command, result, args.json)
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_standard_output()
        return EXIT_FAILURE
    except OSError as error:
        # A full disk behind stdout, for example; the command itself ran.
        print(f"btrfsdrv: {_describe_output_failure(f'output of {args.command}', error)}", file=sys.stderr)
        _discard_standard_output()
        return EXIT_FAILURE
    if args.command == "exists":
        return EXIT_SUCCESS if result else EXIT_NO
    return EXIT_SUCCESS


def _discard_standard_output() -> None:
    """Point stdout at /dev/null after the reader closed the pipe early, as `| head` does.

    Python would otherwise report the failed flush of stdout again at exit.
    """
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _describe_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"
        if error.errno in (errno.EACCES, errno.EPERM) and "; " not in error.strerror:
            message += "; run as root or as the owner of the store"
        return message
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
