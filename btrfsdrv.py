"""btrfs layer store for container tooling, in pure Python.

A port of the btrfs graph driver of containers/storage: a layer is a btrfs
subvolume at ``HOME/subvolumes/ID``, a child layer is a writable snapshot of
its parent, and a layer may carry a size limit that a btrfs qgroup enforces and
``HOME/quotas/ID`` records as a decimal byte count.  Stores are compatible with
Podman, Buildah and CRI-O in both directions.

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

import ctypes
import errno
import fcntl
import os
import re
import stat
import sys
import threading
from typing import (
    Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional,
    Sequence, Set, Tuple, Union,
)

# tools/vendor.py replaces the lines from here to "end of ioctl_structs" with
# the module itself, so the vendored single file needs no import.
import ioctl_structs as _structs
from ioctl_structs import (
    BTRFS_EMPTY_SUBVOL_DIR_OBJECTID, BTRFS_FIRST_FREE_OBJECTID,
    BTRFS_QGROUP_LIMIT_MAX_RFER, BTRFS_QGROUP_STATUS_FLAG_ON,
    BTRFS_QGROUP_STATUS_KEY, BTRFS_QGROUP_LIMIT_KEY, BTRFS_QUOTA_CTL_ENABLE,
    BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA, BTRFS_QUOTA_TREE_OBJECTID,
    BTRFS_ROOT_REF_KEY, BTRFS_ROOT_TREE_OBJECTID, BTRFS_SUBVOL_RDONLY,
    BTRFS_SUPER_MAGIC,
    btrfs_ioctl_fs_info_args, btrfs_ioctl_get_subvol_info_args,
    btrfs_ioctl_get_subvol_rootref_args, btrfs_ioctl_ino_lookup_args,
    btrfs_ioctl_ino_lookup_user_args, btrfs_ioctl_qgroup_create_args,
    btrfs_ioctl_qgroup_limit_args, btrfs_ioctl_quota_ctl_args,
    btrfs_ioctl_search_args, btrfs_ioctl_search_header,
    btrfs_ioctl_vol_args, btrfs_ioctl_vol_args_v2, btrfs_qgroup_limit_item,
    btrfs_qgroup_status_item, btrfs_root_ref,
)
# end of ioctl_structs

__version__ = "0.1.0"

__all__ = [
    "Driver", "init", "DriverError", "PrerequisiteError", "IDMap", "DiskUsage",
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
        logging = sys.modules.get("logging")
        if logging is None:
            if not required:
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

_libc: Optional[ctypes.CDLL] = None


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
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _libc = libc
    return _libc


def _os_error(err: int, operation: str, path: Any, hint: str = "") -> OSError:
    """Build the OSError subclass for errno err with a message naming the operation."""
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


def _mount(source: Optional[bytes], target: PathArg, flags: int, operation: str) -> None:
    _libc_call(_get_libc().mount(source, os.fsencode(target), None, flags, None), operation, target)


def _umount(target: PathArg, flags: int) -> None:
    _libc_call(_get_libc().umount2(os.fsencode(target), flags), "umount2", target)


def _open_directory(path: PathArg, dir_fd: Optional[int] = None) -> int:
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


# -- Tree search ---------------------------------------------------------------


class SearchItem(NamedTuple):
    """One item that BTRFS_IOC_TREE_SEARCH returned: its key, generation and bytes."""

    objectid: int
    type: int
    offset: int
    transid: int
    data: bytes


def _next_key(objectid: int, key_type: int, offset: int) -> Optional[Tuple[int, int, int]]:
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
    min_key: Tuple[int, int, int] = (0, 0, 0),
    max_key: Tuple[int, int, int] = (_U64_MAX, 255, _U64_MAX),
    *,
    min_transid: int = 0,
    max_transid: int = _U64_MAX,
    path: Any = None,
    max_item_size: Optional[int] = None,
) -> Iterator[SearchItem]:
    """Yield the items of a btrfs tree whose keys lie in [min_key, max_key].

    Keys are (objectid, type, offset) tuples compared as a whole, as the
    kernel does, so callers filter on type themselves.  min_transid skips tree
    blocks older than that generation; items of a newer leaf all come back,
    changed or not.  Needs CAP_SYS_ADMIN: EPERM otherwise.

    A caller that knows the largest item in the range passes max_item_size,
    which saves the final empty search: the kernel stops early only when the
    next item does not fit in the buffer, so a batch that left room for one
    more such item ended at the end of the range.
    """
    args = btrfs_ioctl_search_args()
    key = args.key
    key.tree_id = tree_id
    key.max_objectid, key.max_type, key.max_offset = max_key
    key.min_transid = min_transid
    key.max_transid = max_transid
    start: Optional[Tuple[int, int, int]] = min_key
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


def _ino_lookup_path(fd: int, tree_id: int, dirid: int, path: Any) -> bytes:
    """Return the path of directory dirid inside subvolume tree_id ('' for its root)."""
    args = btrfs_ioctl_ino_lookup_args()
    args.treeid = tree_id
    args.objectid = dirid
    _ioctl(fd, _structs.BTRFS_IOC_INO_LOOKUP, args, "look up directory path", path)
    return bytes(args.name)


def _child_refs_privileged(fd: int, parent_id: int, path: Any) -> Iterator[Tuple[int, bytes]]:
    """Yield (child id, path below parent) from the ROOT_REF items of parent_id."""
    header = ctypes.sizeof(btrfs_root_ref)
    items = tree_search(
        fd, BTRFS_ROOT_TREE_OBJECTID,
        (parent_id, BTRFS_ROOT_REF_KEY, 0), (parent_id, BTRFS_ROOT_REF_KEY, _U64_MAX),
        path=path, max_item_size=header + _NAME_MAX,
    )
    for item in items:
        if item.type != BTRFS_ROOT_REF_KEY:
            continue
        ref = btrfs_root_ref.from_buffer_copy(item.data)
        name = item.data[header:header + ref.name_len]
        directory = _ino_lookup_path(fd, parent_id, int(ref.dirid), path)
        yield item.offset, directory + name


def _child_refs_unprivileged(subvolume_fd: int, path: Any) -> Iterator[Tuple[int, bytes]]:
    """Yield (child id, path below the subvolume of subvolume_fd) without CAP_SYS_ADMIN.

    GET_SUBVOL_ROOTREF returns at most 255 refs per call and EOVERFLOW when
    there are more; INO_LOOKUP_USER (kernel 4.18+) names each one relative to
    subvolume_fd, which must be the subvolume's root directory.
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


def _walk_relative(top_fd: int, relative: bytes, path: Any) -> int:
    """Open relative below top_fd one component at a time, never following a symlink."""
    fd = os.dup(top_fd)
    try:
        for component in relative.split(b"/"):
            if component in (b"", b"."):
                continue
            if component == b"..":
                raise _os_error(errno.EINVAL, "resolve nested subvolume path", path)
            child = _open_directory(component, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


# errno values of an ioctl that the running kernel does not implement.
_IOCTL_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)


def find_nested_subvolumes(top_fd: int, top_id: int, path: Any = None) -> List[NestedSubvolume]:
    """Return every subvolume below top_id, parents before children.

    Reads the kernel's root refs: TREE_SEARCH of the root tree when the caller
    has CAP_SYS_ADMIN, otherwise GET_SUBVOL_ROOTREF and INO_LOOKUP_USER from
    each subvolume's own directory.  No file of the layer is read, unless the
    kernel lacks those two ioctls (before Linux 4.18) and the caller is
    unprivileged: then every directory is walked.
    """
    try:
        return _find_nested_privileged(top_fd, top_id, path)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EACCES):
            raise
    try:
        return _find_nested_unprivileged(top_fd, top_id, path)
    except OSError as error:
        if error.errno not in _IOCTL_UNSUPPORTED:
            raise
        log.debug("listing nested subvolumes of %s by walking it: %s", os.fsdecode(path or b"?"), error)
    return _find_nested_by_walk(top_fd, top_id, path)


def _find_nested_privileged(top_fd: int, top_id: int, path: Any) -> List[NestedSubvolume]:
    found: List[NestedSubvolume] = []
    queue: List[Tuple[int, bytes]] = [(top_id, b"")]
    while queue:
        parent_id, parent_path = queue.pop(0)
        for child_id, relative in _child_refs_privileged(top_fd, parent_id, path):
            child_path = parent_path + b"/" + relative if parent_path else relative
            found.append(NestedSubvolume(child_id, parent_id, child_path))
            queue.append((child_id, child_path))
    return found


def _find_nested_unprivileged(top_fd: int, top_id: int, path: Any) -> List[NestedSubvolume]:
    found: List[NestedSubvolume] = []
    queue: List[Tuple[int, bytes]] = [(top_id, b"")]
    while queue:
        parent_id, parent_path = queue.pop(0)
        try:
            parent_fd = _walk_relative(top_fd, parent_path, path)
        except FileNotFoundError:
            continue
        with _Fd(parent_fd):
            if _subvolume_id_of_fd(parent_fd, path) != parent_id:
                continue
            for child_id, relative in _child_refs_unprivileged(parent_fd, path):
                child_path = parent_path + b"/" + relative if parent_path else relative
                found.append(NestedSubvolume(child_id, parent_id, child_path))
                queue.append((child_id, child_path))
    return found


def _find_nested_by_walk(top_fd: int, top_id: int, path: Any) -> List[NestedSubvolume]:
    found: List[NestedSubvolume] = []
    for relative in find_nested_subvolumes_by_walk(top_fd, path):
        with _Fd(_walk_relative(top_fd, relative, path)) as fd:
            subvolume = _subvolume_id_of_fd(fd, path)
        # The walk lists parents first, so the nearest enclosing subvolume,
        # if any, is the last one found whose path is a prefix.
        parent_id = top_id
        for candidate in reversed(found):
            if relative.startswith(candidate.path + b"/"):
                parent_id = candidate.id
                break
        found.append(NestedSubvolume(subvolume, parent_id, relative))
    return found


def find_nested_subvolumes_by_walk(top_fd: int, path: Any = None) -> List[bytes]:
    """Return the paths of subvolumes below top_fd found by walking its directories.

    This is the fallback for where the kernel cannot list root refs; it reads
    every directory, so it costs time in proportion to the tree.
    """
    found: List[bytes] = []

    def visit(fd: int, relative: bytes, entries: List[Any]) -> List[bytes]:
        subdirectories = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                name = os.fsencode(entry.name)
                child = relative + b"/" + name if relative else name
                # readdir reports a subvolume's id as its inode number, so
                # only stat shows the root directory's inode 256.
                if entry.stat(follow_symlinks=False).st_ino == BTRFS_FIRST_FREE_OBJECTID:
                    found.append(child)
                subdirectories.append(name)
        return subdirectories

    walk_tree(top_fd, visit, path=path)
    return found


# -- Walking layer contents ------------------------------------------------------


def _mount_id(fd: int) -> Optional[int]:
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
) -> None:
    """Walk the directories below top_fd depth-first, without following symlinks.

    visit(fd, relative, entries) is called for every directory with an open
    descriptor, its path relative to the top (b"" for the top) and its
    os.DirEntry list, and returns the names of the subdirectories to enter.
    leave(parent_fd, name, stat) is called after a subdirectory was walked.

    Only one directory is open at a time: the walk climbs back with ".." and
    checks that it reaches the directory it came from, so trees deeper than
    PATH_MAX or than the open-file limit are walked too.  A directory on
    another mount (a bind mount inside a layer) raises EBUSY instead of being
    entered.
    """
    top_mount = _mount_id(top_fd)
    fd = os.dup(top_fd)
    relative = b""
    # One entry per open ancestor: its stat, its relative path, its
    # subdirectories still to walk, and the name of the child walked now.
    stack: List[Tuple[os.stat_result, bytes, List[bytes], bytes]] = []
    try:
        pending = _visit_directory(fd, relative, visit)
        while True:
            if pending:
                name = pending.pop()
                child = _enter_directory(fd, name, top_mount, path)
                if child is None:
                    continue
                stack.append((os.fstat(fd), relative, pending, name))
                os.close(fd)
                fd = child
                relative = relative + b"/" + name if relative else name
                pending = _visit_directory(fd, relative, visit)
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
                leave(fd, name, child_st)
    finally:
        os.close(fd)


def _visit_directory(fd: int, relative: bytes, visit: Any) -> List[bytes]:
    with os.scandir(fd) as iterator:
        entries = list(iterator)
    return list(visit(fd, relative, entries))


def _enter_directory(fd: int, name: bytes, top_mount: Optional[int], path: Any) -> Optional[int]:
    """Open subdirectory name of fd; None when it is gone or no longer a directory."""
    try:
        child = _open_directory(name, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:  # replaced by a symlink since it was listed
            return None
        raise
    if top_mount is not None and _mount_id(child) != top_mount:
        os.close(child)
        raise _os_error(errno.EBUSY, "walk layer", path,
                        f"{os.fsdecode(name)} is a mount point inside the layer; unmount it first")
    return child


# -- File-by-file removal -----------------------------------------------------

_FS_IMMUTABLE_FL = 0x00000010
_FS_APPEND_FL = 0x00000020


def _clear_inode_flags(dir_fd: int, name: Optional[bytes]) -> bool:
    """Clear the immutable and append-only flags of name (or of dir_fd itself).

    Return True when a flag was cleared.  Only regular files and directories
    are opened, so a FIFO or device node is never opened for its side effects.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        if name is None:
            fd = os.dup(dir_fd)
        else:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return False
            fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return False
    with _Fd(fd):
        # The kernel reads and writes an int, although the request number
        # encodes sizeof(long).
        value = ctypes.c_int()
        try:
            fcntl.ioctl(fd, _structs.FS_IOC_GETFLAGS, value)
            if not value.value & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
                return False
            value.value &= ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL)
            fcntl.ioctl(fd, _structs.FS_IOC_SETFLAGS, value)
        except OSError:
            return False
    log.debug("cleared immutable and append-only flags of %s", os.fsdecode(name or b"."))
    return True


def _unlink_at(dir_fd: int, name: bytes, is_dir: bool) -> None:
    """Unlink name (rmdir when is_dir), clearing chattr +i/+a flags when they block it."""
    for attempt in range(2):
        try:
            if is_dir:
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
            return
        except PermissionError:
            if attempt or not (_clear_inode_flags(dir_fd, name) | _clear_inode_flags(dir_fd, None)):
                raise


def _remove_contents(top_fd: int, path: Any) -> None:
    """Delete everything below top_fd, never following a symlink or entering a mount.

    Nested subvolumes met on the way are emptied and removed with rmdir, and
    read-only ones are made writable first.
    """

    def visit(fd: int, relative: bytes, entries: List[Any]) -> List[bytes]:
        if os.fstat(fd).st_ino == BTRFS_FIRST_FREE_OBJECTID:
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
                _unlink_at(fd, name, is_dir=False)
            except FileNotFoundError:
                pass
        return subdirectories

    walk_tree(top_fd, visit, _remove_walked_directory, path=path)


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


def _parse_mountinfo(text: bytes) -> List[MountInfo]:
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
        self._file: Optional[Any] = None
        self._poller: Optional[Any] = None
        self._pid = 0
        self._mounts: Optional[List[MountInfo]] = None

    def mounts(self) -> List[MountInfo]:
        with self._lock:
            if self._file is None or self._pid != os.getpid():
                self._open()
            elif self._poller.poll(0):
                self._mounts = None
            if self._mounts is None:
                self._file.seek(0)
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
        chunks = []
        while True:
            chunk = self._file.read(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


_mount_table = _MountTable()


def _read_mountinfo() -> List[MountInfo]:
    return _mount_table.mounts()


def _mount_points_below(directory: bytes, include_self: bool = True) -> List[bytes]:
    """Return mount points at (when include_self) or below directory."""
    prefix = directory.rstrip(b"/") + b"/"
    points = []
    for mount in _read_mountinfo():
        if mount.mount_point.startswith(prefix) or (include_self and mount.mount_point == directory):
            points.append(mount.mount_point)
    return points


def _is_mount_point(directory: bytes) -> bool:
    return any(mount.mount_point == directory for mount in _read_mountinfo())


# -- Quota and qgroups -----------------------------------------------------------


def _quota_status(fd: int, path: Any) -> Optional[Any]:
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


def _set_qgroup_limit(fd: int, qgroup_id: int, max_rfer: Optional[int], path: Any) -> None:
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
    _ioctl(fd, _structs.BTRFS_IOC_QGROUP_LIMIT, args, "set qgroup limit", path)
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


def _qgroup_limit(fd: int, qgroup_id: int, path: Any) -> Optional[int]:
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
    match = re.fullmatch(_SIZE_PATTERN, value, re.IGNORECASE | re.ASCII)
    if match is None:
        raise ValueError(
            f"invalid size {value!r}: use a number with an optional unit b, k, m, g, t or p "
            "(powers of 1024), such as 512m or 1.5G"
        )
    from fractions import Fraction  # exact decimals; imported here to keep the import fast

    number, unit = match.groups()
    size = int(Fraction(number) * _SIZE_MULTIPLIERS.get((unit or "").lower(), 1))
    if size >= _SIZE_LIMIT:
        raise ValueError(f"invalid size {value!r}: it must be less than 2**63 bytes")
    return size


def validate_layer_id(layer_id: Any) -> bytes:
    """Return the layer id as bytes or raise ValueError naming it."""
    if not isinstance(layer_id, (str, bytes)):
        raise ValueError(f"invalid layer id {layer_id!r}: expected a string")
    return _encode_name(layer_id, _NAME_MAX, "layer id")


class _Options(NamedTuple):
    min_space: int
    default_size: Optional[int]
    quota_required: bool
    quota_mode: str


def _split_option(option: str) -> Tuple[str, str]:
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


def parse_storage_opt(storage_opt: Optional[Mapping[str, str]]) -> Optional[int]:
    """Return the size limit requested by a layer's storage options, if any."""
    if not storage_opt:
        return None
    size = None
    for key, value in storage_opt.items():
        if not isinstance(key, str) or key.strip().lower() != "size":
            raise ValueError(f"unknown storage option {key!r}: btrfs layers take only 'size'")
        size = parse_size(value.strip() if isinstance(value, str) else value)
    return size


def _id_maps(maps: Optional[Iterable[Any]], what: str) -> Optional[List[IDMap]]:
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
        result.append(mapping)
    return result


def _host_id(maps: Optional[Sequence[IDMap]], container_id: int, what: str) -> int:
    """Map a container id to the host id, as containers/storage's idtools does."""
    if maps is None:
        return container_id
    for mapping in maps:
        if mapping.container_id <= container_id < mapping.container_id + mapping.size:
            return mapping.host_id + container_id - mapping.container_id
    raise ValueError(f"{what} does not map container id {container_id}; add a range that includes it")


# -- Quota files -------------------------------------------------------------------


def _read_quota_file(path: str) -> Optional[int]:
    """Return the byte count in a quota file, None when it is missing or unreadable."""
    try:
        with open(path, "rb") as quota_file:
            text = quota_file.read(64)
    except FileNotFoundError:
        return None
    stripped = text.strip()
    if not stripped.isdigit() or not stripped.isascii() or int(stripped) >= _SIZE_LIMIT:
        log.warning("ignoring quota file %s: it must contain a decimal byte count below 2**63, found %r",
                    path, text)
        return None
    return int(stripped)


# sync_file_range(2) flags from linux/fs.h.
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4

_TEMPORARY_SUFFIX = ".tmp"


def _write_back(fd: int, path: Any) -> None:
    """Write the file's data into the filesystem without waiting for a device flush.

    On btrfs this puts the data into the running transaction, so the next
    commit persists it together with every later change, at no extra cost.
    """
    flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
    _libc_call(_get_libc().sync_file_range(fd, 0, 0, flags), "sync_file_range", path)


def _write_file_atomically(directory: str, name: str, data: bytes) -> None:
    """Write directory/name through a temporary file, written back, then renamed.

    There is no fsync: btrfs commits transactions in order, and the data
    is in the filesystem before the rename, so a crash before the next
    commit loses the new file but never leaves a partial or empty one
    under the final name.  An fsync here forced a log commit of about 5 ms
    per call on a loopback device, ten times the rest of creating a layer.

    The temporary file is locked (flock) while it exists, so a process that
    finds it unlocked knows its writer died and may delete it.
    """
    import tempfile

    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=_TEMPORARY_SUFFIX, dir=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
        _write_back(fd, temporary)
        os.fchmod(fd, 0o644)
        os.rename(temporary, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(fd)


def _remove_stale_temporary_files(directory: str) -> None:
    """Delete temporary files in directory whose writer died before renaming them."""
    try:
        entries = [entry for entry in os.scandir(directory)
                   if entry.name.startswith(".") and entry.name.endswith(_TEMPORARY_SUFFIX)]
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        with _Fd(fd):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            if os.path.samestat(os.fstat(fd), os.lstat(entry.path)):
                os.unlink(entry.path)
                log.warning("removed %s, left by a process that died while writing it", entry.path)


# -- SELinux labels ----------------------------------------------------------------


def _selinux_enabled() -> bool:
    return os.path.exists("/sys/fs/selinux/enforce")


def _relabel(layer_fd: int, label: str, path: Any) -> None:
    """Set security.selinux on every entry of the layer, never following symlinks."""
    value = label.encode()

    def visit(fd: int, relative: bytes, entries: List[Any]) -> List[bytes]:
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
        uid_maps: Optional[Iterable[Any]] = None,
        gid_maps: Optional[Iterable[Any]] = None,
    ) -> None:
        self.home = os.path.abspath(os.fsdecode(os.fspath(home)))
        self.options = parse_options(list(options))
        self.uid_maps = _id_maps(uid_maps, "uid_maps")
        self.gid_maps = _id_maps(gid_maps, "gid_maps")
        # Without maps, layers belong to root, or to the caller when it is not
        # root (rootless use), as containers/storage owns them by the caller.
        self.root_uid = _host_id(self.uid_maps, 0, "uid_maps") if self.uid_maps is not None else os.geteuid()
        self.root_gid = _host_id(self.gid_maps, 0, "gid_maps") if self.gid_maps is not None else os.getegid()
        self._made_mount = False

        _require_btrfs(self.home)
        self._make_directory(self.home)
        self._make_directory(self._subvolumes_dir)
        # Mount points in /proc/self/mountinfo are resolved paths.  Home is
        # resolved once: the driver owns it, and a layer id is one component.
        self._real_home = os.path.realpath(self.home)
        self._make_private_mount()
        _remove_stale_temporary_files(self._quotas_dir)
        if self.options.quota_required:
            try:
                self._ensure_quota()
            except BaseException:
                self.cleanup()
                raise
        log.debug("initialized btrfs driver at %s", self.home)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Driver({self.home!r})"

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.cleanup()

    # -- Layout

    @property
    def _subvolumes_dir(self) -> str:
        return os.path.join(self.home, "subvolumes")

    @property
    def _quotas_dir(self) -> str:
        return os.path.join(self.home, "quotas")

    def _layer_dir(self, layer_id: Any) -> str:
        return os.path.join(self._subvolumes_dir, os.fsdecode(validate_layer_id(layer_id)))

    def _quota_file(self, layer_id: Any) -> str:
        return os.path.join(self._quotas_dir, os.fsdecode(validate_layer_id(layer_id)))

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

    def _make_private_mount(self) -> None:
        home = os.fsencode(self._real_home)
        try:
            if not _is_mount_point(home):
                _mount(home, home, _MS_BIND, "bind mount home onto itself")
                self._made_mount = True
                log.debug("bind-mounted %s onto itself", self.home)
            _mount(None, home, _MS_PRIVATE, "make home a private mount")
        except PermissionError as error:
            # Without CAP_SYS_ADMIN (rootless use) mounts inside layers are
            # the caller's own, so the store works without a private mount.
            log.warning("cannot make %s a private mount, continuing without: %s", self.home, error)

    def cleanup(self) -> None:
        """Unmount the bind mount of home that this driver made, if any.

        Quota stays on: it is filesystem-wide and other limits depend on it.
        """
        if not self._made_mount:
            return
        try:
            _umount(self._real_home, _MNT_DETACH)
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: no longer mounted
                raise
        self._made_mount = False
        log.debug("unmounted %s", self.home)

    # -- Quota

    def _open_home(self) -> _Fd:
        return _Fd(_open_directory(self.home))

    def _ensure_quota(self, fd: Optional[int] = None) -> None:
        """Turn quota on unless it is on; fd is any directory on home's filesystem."""
        if fd is None:
            with self._open_home() as home_fd:
                self._ensure_quota(home_fd)
            return
        if not quota_enabled(fd, self.home):
            _enable_quota(fd, self.options.quota_mode == "simple", self.home)

    def _quota_on(self) -> bool:
        with self._open_home() as fd:
            return quota_enabled(fd, self.home)

    def _apply_limit(self, home_fd: int, layer_fd: int, size: int, path: str) -> None:
        """Set the layer's qgroup limit, turning quota on first when it is off.

        The limit ioctl doubles as the quota check, because it fails with
        ENOTCONN while quota is off, so quota that someone turned off from
        outside is turned on again here.  The limit is set through home_fd,
        any directory of home's own subvolume, because through the layer the
        kernel would charge the ioctl's transaction to the layer's qgroup and
        return EDQUOT once the layer is over its new limit.
        """
        qgroup_id = _subvolume_id_of_fd(layer_fd, path)
        try:
            _set_layer_limit(home_fd, qgroup_id, size, path)
        except OSError as error:
            if error.errno != errno.ENOTCONN:
                raise
            self._ensure_quota(home_fd)
            _set_layer_limit(home_fd, qgroup_id, size, path)

    # -- Create

    def create(
        self,
        layer_id: str,
        parent: Optional[str] = None,
        *,
        mount_label: str = "",
        storage_opt: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Create an image layer: an empty subvolume, or a snapshot of parent."""
        self._create(layer_id, parent, mount_label, storage_opt, read_write=False)

    def create_read_write(
        self,
        layer_id: str,
        parent: Optional[str] = None,
        *,
        mount_label: str = "",
        storage_opt: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Create a container layer; btrfs.size applies when no size is given."""
        self._create(layer_id, parent, mount_label, storage_opt, read_write=True)

    def create_from_template(
        self,
        layer_id: str,
        template: str,
        *,
        parent: Optional[str] = None,
        mount_label: str = "",
        storage_opt: Optional[Mapping[str, str]] = None,
        read_write: bool = False,
    ) -> None:
        """Create a layer with the contents of template: a snapshot of it."""
        if parent is not None:
            validate_layer_id(parent)
        self._create(layer_id, template, mount_label, storage_opt, read_write=read_write)

    def _layer_size(self, storage_opt: Optional[Mapping[str, str]], read_write: bool) -> Optional[int]:
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
        parent: Optional[str],
        mount_label: str,
        storage_opt: Optional[Mapping[str, str]],
        read_write: bool,
    ) -> None:
        name = validate_layer_id(layer_id)
        parent_name = None if parent is None or parent == "" else validate_layer_id(parent)
        size = self._layer_size(storage_opt, read_write)
        path = self._layer_dir(layer_id)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, f"layer {os.fsdecode(name)!r} already exists", path)

        with _Fd(_open_directory(self._subvolumes_dir)) as subvolumes_fd:
            if parent_name is None:
                self._create_empty(subvolumes_fd, name, path)
            else:
                self._create_snapshot(subvolumes_fd, parent_name, name, path)
            try:
                self._finish_layer(subvolumes_fd, name, path, size, mount_label)
            except BaseException:
                self._roll_back(subvolumes_fd, name, path)
                raise

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
            raise _os_error(error.errno, f"open parent layer {os.fsdecode(parent)!r}", parent_path,
                            "the parent must be a layer directory") from None
        with _Fd(parent_fd):
            try:
                _snapshot_create_at(parent_fd, subvolumes_fd, name, False, path)
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, f"layer {os.fsdecode(name)!r} already exists", path) from None

    def _finish_layer(self, subvolumes_fd: int, name: bytes, path: str, size: Optional[int], mount_label: str) -> None:
        """Set owner, mode, quota and label of a new layer; its creator rolls back on error."""
        with _Fd(_open_directory(name, dir_fd=subvolumes_fd)) as layer_fd:
            st = os.fstat(layer_fd)
            # A btrfs directory's size is twice the length of its entries'
            # names, so 0 means empty without reading the directory.
            if st.st_ino == BTRFS_FIRST_FREE_OBJECTID and st.st_size == 0:
                os.fchmod(layer_fd, 0o555)
            if (st.st_uid, st.st_gid) != (self.root_uid, self.root_gid):
                os.fchown(layer_fd, self.root_uid, self.root_gid)
            if size is not None:
                self._apply_limit(subvolumes_fd, layer_fd, size, path)
                self._write_quota_file(name, size, path)
            else:
                # While the subvolume exists no other create can take its
                # id, so a quota file with its name was left by a crash.
                self._remove_quota_file(os.fsdecode(name))
                self._clear_inherited_limit(subvolumes_fd, layer_fd, path)
            if mount_label and _selinux_enabled():
                _relabel(layer_fd, mount_label, path)

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
            return

    def _write_quota_file(self, name: bytes, size: int, path: str) -> None:
        self._make_directory(self._quotas_dir)
        _write_file_atomically(self._quotas_dir, os.fsdecode(name), str(size).encode())
        log.debug("wrote quota file for %s: %d bytes", path, size)

    def _roll_back(self, subvolumes_fd: int, name: bytes, path: str) -> None:
        """Delete a layer whose create failed: its quota file first, then its subvolume.

        While the subvolume exists no other create can take its id, so the
        quota file with that name can only be this layer's.
        """
        quota_file = os.path.join(self._quotas_dir, os.fsdecode(name))
        try:
            os.unlink(quota_file)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as error:
            log.warning("could not delete %s after a failed create: %s", quota_file, error)
        try:
            _delete_subvolume_or_contents(subvolumes_fd, name, path)
        except OSError as error:
            log.warning("could not delete %s after a failed create: %s", path, error)

    # -- Remove

    def remove(self, layer_id: str) -> None:
        """Delete a layer with its nested subvolumes, qgroup and quota file."""
        name = validate_layer_id(layer_id)
        path = self._layer_dir(layer_id)
        with _Fd(_open_directory(self._subvolumes_dir)) as subvolumes_fd:
            try:
                st = os.stat(name, dir_fd=subvolumes_fd, follow_symlinks=False)
            except FileNotFoundError:
                self._remove_quota_file(layer_id)
                raise FileNotFoundError(
                    errno.ENOENT, f"layer {os.fsdecode(name)!r} not found; list the layers to check the id",
                    path) from None
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=subvolumes_fd)
                log.debug("removed %s, which was not a directory", path)
            else:
                self._check_no_mounts(name, path)
                self._remove_layer_directory(subvolumes_fd, name, path)
        self._remove_quota_file(layer_id)

    def _check_no_mounts(self, name: bytes, path: str) -> None:
        real_path = os.path.join(os.fsencode(self._real_home), b"subvolumes", name)
        mounts = _mount_points_below(real_path)
        if mounts:
            raise _os_error(
                errno.EBUSY, "remove layer", path,
                f"{os.fsdecode(mounts[0])} is mounted inside it; unmount it first",
            )

    def _remove_layer_directory(self, subvolumes_fd: int, name: bytes, path: str) -> None:
        with _Fd(_open_directory(name, dir_fd=subvolumes_fd)) as layer_fd:
            if not _is_subvolume_stat(os.fstat(layer_fd)):
                _remove_contents(layer_fd, path)
                subvolume_ids: List[int] = []
            else:
                layer_subvolume_id = _subvolume_id_of_fd(layer_fd, path)
                subvolume_ids = self._remove_nested(layer_fd, layer_subvolume_id, path)
                subvolume_ids.append(layer_subvolume_id)
                _clear_read_only(layer_fd, path)
        if subvolume_ids:
            _delete_subvolume_or_contents(subvolumes_fd, name, path)
        else:
            _unlink_at(subvolumes_fd, name, is_dir=True)
            log.debug("removed directory %s", path)
        self._destroy_qgroups(subvolumes_fd, subvolume_ids)

    def _remove_nested(self, layer_fd: int, layer_subvolume_id: int, path: str) -> List[int]:
        """Delete the subvolumes below the layer, deepest first, and return their ids."""
        nested = find_nested_subvolumes(layer_fd, layer_subvolume_id, path)
        removed = []
        for subvolume in reversed(nested):
            if _delete_nested_subvolume(layer_fd, subvolume, path):
                removed.append(subvolume.id)
        return removed

    def _destroy_qgroups(self, fd: int, subvolume_ids: List[int]) -> None:
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

    def _remove_quota_file(self, layer_id: str) -> None:
        try:
            os.unlink(self._quota_file(layer_id))
            log.debug("removed quota file of %s", layer_id)
        except FileNotFoundError:
            pass

    # -- Get, put and queries

    def get(self, layer_id: str, options: Iterable[str] = (), *, mount_label: str = "") -> str:
        """Return the layer's directory, re-applying its size limit if it has one."""
        for option in options:
            if option != "ro":
                raise ValueError(f"invalid mount option {option!r}: btrfs layers take only 'ro'")
        path = self._layer_dir(layer_id)
        self._require_layer(layer_id, path)
        size = _read_quota_file(self._quota_file(layer_id))
        if size is not None and size >= self.options.min_space:
            if size == 0:
                log.warning("ignoring quota file of %s: a limit of 0 bytes is not valid", layer_id)
            else:
                with self._open_home() as home_fd, _Fd(_open_directory(path)) as layer_fd:
                    self._apply_limit(home_fd, layer_fd, size, path)
        return path

    def _require_layer(self, layer_id: str, path: str) -> os.stat_result:
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
        try:
            return stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            return False

    def list_layers(self) -> List[str]:
        layers = []
        with os.scandir(self._subvolumes_dir) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    layers.append(entry.name)
        return sorted(layers)

    def status(self) -> List[Tuple[str, str]]:
        with self._open_home() as fd:
            fsid = _format_uuid(_fs_info(fd, self.home).fsid)
            quota = quota_enabled(fd, self.home)
        return [
            ("Filesystem UUID", str(fsid)),
            ("Kernel Version", os.uname().release),
            ("Quota Enabled", "true" if quota else "false"),
            ("Quota Mode", self.options.quota_mode),
            ("Min Space", str(self.options.min_space)),
            ("Default Size", str(self.options.default_size or 0)),
            ("Layers", str(len(self.list_layers()))),
        ]

    def metadata(self, layer_id: str) -> Dict[str, str]:
        path = self._layer_dir(layer_id)
        self._require_layer(layer_id, path)
        result = {"Path": path}
        with _Fd(_open_directory(path)) as fd:
            if _is_subvolume_stat(os.fstat(fd)):
                info = _subvolume_info(fd, path)
                result["SubvolumeID"] = str(info.treeid)
                result["UUID"] = _format_uuid(info.uuid)
                if any(bytes(info.parent_uuid)):
                    result["ParentUUID"] = _format_uuid(info.parent_uuid)
                result["Generation"] = str(info.generation)
                result["ReadOnly"] = "true" if info.flags & BTRFS_SUBVOL_RDONLY else "false"
        size = _read_quota_file(self._quota_file(layer_id))
        if size is not None:
            result["SizeLimit"] = str(size)
        return result

    def read_write_disk_usage(self, layer_id: str) -> DiskUsage:
        """Sum st_size of non-directories and count inodes, each inode once."""
        path = self._layer_dir(layer_id)
        self._require_layer(layer_id, path)
        seen: Set[Tuple[int, int]] = set()
        total = [0]

        def visit(fd: int, relative: bytes, entries: List[Any]) -> List[bytes]:
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

        with _Fd(_open_directory(path)) as layer_fd:
            walk_tree(layer_fd, visit, path=path)
        return DiskUsage(total[0], len(seen))

    def additional_image_stores(self) -> List[str]:
        return []


def init(
    home: PathArg,
    options: Iterable[str] = (),
    uid_maps: Optional[Iterable[Any]] = None,
    gid_maps: Optional[Iterable[Any]] = None,
) -> Driver:
    """Return a Driver for home, as the graph-driver registry's init function does."""
    return Driver(home, options, uid_maps, gid_maps)


def _require_btrfs(home: str) -> None:
    """Raise PrerequisiteError unless home (or, until it exists, its parent) is on btrfs."""
    probe = home
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    magic = _statfs_type(probe)
    if magic != BTRFS_SUPER_MAGIC:
        raise PrerequisiteError(
            f"{home} is not on a btrfs filesystem ({probe} has filesystem magic {magic:#x}); "
            "point the driver at a directory on btrfs"
        )


def _delete_nested_subvolume(layer_fd: int, subvolume: NestedSubvolume, path: Any) -> bool:
    """Delete one nested subvolume after checking it is what the kernel listed.

    Return False when it is gone already.  The parent directory is opened from
    the layer one component at a time, and the subvolume must still have the
    listed id: a renamed, replaced or mounted-over entry is never deleted.
    """
    parent_path, _, name = subvolume.path.rpartition(b"/")
    display = os.path.join(os.fsdecode(path), os.fsdecode(subvolume.path))
    try:
        parent_fd = _walk_relative(layer_fd, parent_path, display)
    except (FileNotFoundError, NotADirectoryError):
        return False
    with _Fd(parent_fd):
        try:
            child_fd = _open_directory(name, dir_fd=parent_fd)
        except (FileNotFoundError, NotADirectoryError):
            return False
        with _Fd(child_fd):
            if not _is_subvolume_stat(os.fstat(child_fd)) or _subvolume_id_of_fd(child_fd, display) != subvolume.id:
                raise _os_error(errno.ESTALE, "delete nested subvolume", display,
                                f"it is no longer subvolume {subvolume.id}; run remove again")
            _clear_read_only(child_fd, display)
        _delete_subvolume_or_contents(parent_fd, name, display)
    return True


def _delete_subvolume_or_contents(dir_fd: int, name: bytes, path: Any) -> None:
    """Destroy subvolume name; without the privilege to, empty it and rmdir it.

    rmdir of an empty subvolume by its owner works since Linux 4.18, which is
    how rootless callers delete subvolumes without user_subvol_rm_allowed.
    """
    try:
        _subvolume_destroy_at(dir_fd, name, path)
        return
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EACCES):
            raise
        log.debug("cannot destroy subvolume %s (%s); deleting its files", os.fsdecode(path), error)
    with _Fd(_open_directory(name, dir_fd=dir_fd)) as fd:
        _remove_contents(fd, path)
    try:
        _unlink_at(dir_fd, name, is_dir=True)
    except OSError as error:
        raise _os_error(
            error.errno, "delete subvolume", path,
            "deleting a subvolume needs CAP_SYS_ADMIN, the user_subvol_rm_allowed mount option, "
            "or Linux 4.18 or newer and ownership of the subvolume",
        ) from None
    log.debug("removed subvolume %s by emptying it", os.fsdecode(path))


# -- Module-level subvolume helpers ------------------------------------------------


def _split_path(path: PathArg) -> Tuple[bytes, bytes]:
    encoded = os.fsencode(path).rstrip(b"/")
    parent, _, name = encoded.rpartition(b"/")
    if not name or name in (b".", b".."):
        raise ValueError(f"invalid subvolume path {os.fsdecode(path)!r}: it must end in a name")
    if len(name) > _NAME_MAX:
        raise ValueError(f"invalid subvolume path {os.fsdecode(path)!r}: the name is longer than 255 bytes")
    return parent if parent or not encoded.startswith(b"/") else b"/", name


def _open_parent(path: PathArg) -> Tuple[int, bytes]:
    parent, name = _split_path(path)
    return _open_directory(parent or b"."), name


def create_subvolume(path: PathArg) -> None:
    """Create an empty subvolume at path."""
    parent_fd, name = _open_parent(path)
    with _Fd(parent_fd):
        _subvolume_create_at(parent_fd, name, path)


def create_snapshot(source: PathArg, path: PathArg, *, read_only: bool = False) -> None:
    """Create a snapshot of the subvolume source at path."""
    parent_fd, name = _open_parent(path)
    with _Fd(parent_fd), _Fd(_open_directory(os.fsencode(source))) as source_fd:
        _snapshot_create_at(source_fd, parent_fd, name, read_only, path)


def delete_subvolume(path: PathArg, *, recursive: bool = False) -> None:
    """Delete the subvolume at path; with recursive, the subvolumes below it first."""
    parent_fd, name = _open_parent(path)
    with _Fd(parent_fd):
        with _Fd(_open_directory(name, dir_fd=parent_fd)) as fd:
            if not _is_subvolume_stat(os.fstat(fd)):
                raise _os_error(errno.EINVAL, "delete subvolume", path, "it is not a subvolume")
            if recursive:
                nested = find_nested_subvolumes(fd, _subvolume_id_of_fd(fd, path), path)
                for subvolume in reversed(nested):
                    _delete_nested_subvolume(fd, subvolume, path)
        _subvolume_destroy_at(parent_fd, name, path)


def is_subvolume(path: PathArg) -> bool:
    """Return whether path is the root directory of a btrfs subvolume."""
    st = os.lstat(path)
    return _is_subvolume_stat(st) and _statfs_type(path) == BTRFS_SUPER_MAGIC


def subvolume_id(path: PathArg) -> int:
    """Return the id of the subvolume that contains path."""
    with _Fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) as fd:
        return _subvolume_id_of_fd(fd, path)


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
    return driver.exists(args.id)


def _command_list(driver: Driver, args: Any) -> Any:
    return driver.list_layers()


def _command_status(driver: Driver, args: Any) -> Any:
    return dict(driver.status())


def _command_metadata(driver: Driver, args: Any) -> Any:
    return driver.metadata(args.id)


def _command_usage(driver: Driver, args: Any) -> Any:
    return driver.read_write_disk_usage(args.id)._asdict()


def _command_cleanup(driver: Driver, args: Any) -> Any:
    driver.cleanup()
    home = os.fsencode(os.path.realpath(driver.home))
    if _is_self_bind_mount(home):
        # A bind mount that a killed btrfsdrv or containers/storage process left.
        _umount(home, _MNT_DETACH)
        log.debug("unmounted leftover bind mount of %s", driver.home)
    return {"home": driver.home, "mounted": _is_mount_point(home)}


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

    def add(name: str, handler: Any, help_text: str) -> Any:
        command = commands.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
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


def _add_diff_commands(add: Any) -> None:
    """Register the layer diff commands; filled in by the diff section."""


def _print_result(command: str, result: Any, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif isinstance(result, bool):
        print("true" if result else "false")
    elif isinstance(result, dict):
        for key, value in result.items():
            print(f"{key}: {value}")
    elif isinstance(result, list):
        for item in result:
            print(item)
    elif result is not None:
        print(result)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line and return its exit status."""
    import logging

    args = _build_parser().parse_args(argv)
    logging.basicConfig(format="btrfsdrv: %(message)s", level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        with Driver(args.home, args.option) as driver:
            result = args.handler(driver, args)
    except ValueError as error:
        print(f"btrfsdrv: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, DriverError) as error:
        print(f"btrfsdrv: {_describe_error(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    if args.command == "exists":
        if args.json:
            _print_result(args.command, result, True)
        return EXIT_SUCCESS if result else EXIT_NO
    _print_result(args.command, result, args.json)
    return EXIT_SUCCESS


def _describe_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
