"""Layer diffs: changes, diff, apply_diff, diff_size and ID-map updates.

Scratch module: these functions move into btrfsdrv.py once the Driver lands.
"""

from __future__ import annotations

import collections
import enum
import errno
import io
import logging
import os
import stat
import struct
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

log = logging.getLogger("btrfsdrv")

IDMap = collections.namedtuple("IDMap", "container_id host_id size")


# -- Layer diffs ---------------------------------------------------------------


class ChangeKind(enum.IntEnum):
    """Kind of a change between a layer and its parent, as in containers/storage."""

    MODIFY = 0
    ADD = 1
    DELETE = 2


Change = collections.namedtuple("Change", "path kind")
Change.__doc__ = "A path inside a layer (absolute, like /etc/passwd) and its ChangeKind."

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE_DIR = ".wh..wh..opq"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_NS_PER_SECOND = 1_000_000_000
_COPY_CHUNK = 1024 * 1024
_PROGRESS_INTERVAL = 0.5  # seconds; progress must be reported at least once a second


def _open_dir(name, dir_fd=None) -> int:
    """Open a directory without following a symlink in its last component."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _fd_path(dir_fd: int, name) -> bytes:
    """Return a /proc path naming name inside dir_fd, for calls without dir_fd."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, os.fsencode(name))


def _lstat_at(dir_fd: int, name) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _list_dir(dir_fd: int) -> List[Tuple[str, os.stat_result]]:
    """List a directory's entries with their lstat, sorted by name bytes."""
    entries = []
    with os.scandir(dir_fd) as scan:
        for entry in scan:
            entries.append((entry.name, entry.stat(follow_symlinks=False)))
    entries.sort(key=lambda item: os.fsencode(item[0]))
    return entries


def _open_listed_dir(dir_fd: int, name: str, listed: os.stat_result, path: str) -> int:
    """Open a subdirectory and check that it is still the one that was listed."""
    fd = _open_dir(name, dir_fd)
    if not os.path.samestat(os.fstat(fd), listed):
        os.close(fd)
        raise OSError(errno.ESTALE, "directory was replaced during the walk", path)
    return fd


def _path_parts(path: str) -> List[str]:
    """Split a path inside a layer into its components, rejecting '..'."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"path {path!r} contains a '..' component")
    return parts


def _open_parent(root_fd: int, parts: Sequence[str], path: str, create: bool = False) -> Optional[int]:
    """Open the directory that contains parts[-1], walking from root_fd.

    No component is followed if it is a symlink. Returns None when a component
    is missing and create is false; with create, missing directories are made
    with mode 0755. Raises ValueError when a component is not a directory.
    """
    fd = os.dup(root_fd)
    try:
        for index, part in enumerate(parts[:-1]):
            try:
                child = _open_dir(part, fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                os.mkdir(part, 0o755, dir_fd=fd)
                child = _open_dir(part, fd)
            except (NotADirectoryError, OSError) as error:
                if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                prefix = "/".join(parts[:index + 1])
                raise ValueError(f"path {path!r}: {prefix!r} is not a directory") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_tree(dir_fd: int, name: str) -> None:
    """Remove name inside dir_fd and, if it is a directory, all below it.

    The walk is fd-relative and never follows a symlink, so it cannot leave
    the tree that it removes.
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass

    top_fd = _open_dir(name, dir_fd)
    stack = [(dir_fd, name, top_fd, os.scandir(top_fd))]
    try:
        while stack:
            parent_fd, dir_name, fd, scan = stack[-1]
            descended = False
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    child = _open_dir(entry.name, fd)
                    stack.append((fd, entry.name, child, os.scandir(child)))
                    descended = True
                    break
                try:
                    os.unlink(entry.name, dir_fd=fd)
                except FileNotFoundError:
                    pass
            if descended:
                continue
            stack.pop()
            scan.close()
            os.close(fd)
            os.rmdir(dir_name, dir_fd=parent_fd)
    finally:
        for _, _, fd, scan in stack:
            scan.close()
            os.close(fd)


# ID maps -----------------------------------------------------------------


def _map_id(maps: Sequence[IDMap], value: int, to_host: bool) -> Optional[int]:
    """Map an id between container and host; None when no map covers it.

    An empty map list is the identity, as in containers/storage.
    """
    if not maps:
        return value
    for entry in maps:
        source, target = (entry.container_id, entry.host_id) if to_host else (entry.host_id, entry.container_id)
        if source <= value < source + entry.size:
            return target + (value - source)
    return None


def _map_owner(uid_maps, gid_maps, uid: int, gid: int, to_host: bool, path: str) -> Tuple[int, int]:
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


def _read_xattrs(target) -> Dict[str, bytes]:
    """Read the carried extended attributes of an fd or a path (not followed)."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target) if follow else os.listxattr(target, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
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
                raise
    return values


def _entry_xattrs(dir_fd: int, name: str, st: os.stat_result) -> Dict[str, bytes]:
    # user.* exists only on regular files and directories, and
    # security.capability only on regular files, so others are not read.
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return {}
    return _read_xattrs(_fd_path(dir_fd, name))


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
                    new: os.stat_result, old: os.stat_result) -> bool:
    """Compare an entry present in both the layer and its parent."""
    if (new.st_mode != old.st_mode or new.st_uid != old.st_uid or new.st_gid != old.st_gid
            or new.st_rdev != old.st_rdev):
        return True
    if not _same_mtime(new, old):
        return True
    if not stat.S_ISDIR(new.st_mode) and new.st_size != old.st_size:
        return True
    if stat.S_ISLNK(new.st_mode):
        return os.readlink(name, dir_fd=layer_fd) != os.readlink(name, dir_fd=parent_fd)
    return _entry_xattrs(layer_fd, name, new) != _entry_xattrs(parent_fd, name, old)


class _WalkedChange:
    """A change found by _walk_changes, with a handle on the layer entry.

    dir_fd and name locate the entry in the layer (not in the parent, for a
    DELETE) and stay valid only until the walk goes on.
    """

    __slots__ = ("path", "kind", "st", "dir_fd", "name")

    def __init__(self, path, kind, st, dir_fd, name):
        self.path = path
        self.kind = kind
        self.st = st
        self.dir_fd = dir_fd
        self.name = name


class _DirFrame:
    __slots__ = ("path", "layer_fd", "parent_fd", "entries", "parent_entries",
                 "changes_at_entry", "report_when_changed", "st", "name")

    def __init__(self, path, layer_fd, parent_fd, report_when_changed, st, name, changes_at_entry):
        self.path = path
        self.layer_fd = layer_fd
        self.parent_fd = parent_fd
        self.entries = iter(_list_dir(layer_fd))
        self.parent_entries = dict(_list_dir(parent_fd)) if parent_fd is not None else {}
        self.report_when_changed = report_when_changed
        self.changes_at_entry = changes_at_entry
        self.st = st
        self.name = name


def _walk_changes(layer_root_fd: int, parent_root_fd: Optional[int]) -> Iterator[_WalkedChange]:
    """Walk a layer and its parent together and yield their differences.

    With parent_root_fd None every entry is an ADD, in depth-first order with
    each directory before its contents. Otherwise the order is unspecified
    (callers sort); a directory that contains a change and is not itself
    reported is yielded as MODIFY after its contents. The root is never
    reported. Memory grows with the depth and the size of one directory, not
    with the whole tree.
    """
    count = 0
    stack = [_DirFrame("", os.dup(layer_root_fd),
                       os.dup(parent_root_fd) if parent_root_fd is not None else None,
                       False, None, None, 0)]
    try:
        while stack:
            frame = stack[-1]
            descended = False
            for name, new in frame.entries:
                path = frame.path + "/" + name
                old = frame.parent_entries.pop(name, None)
                reported = False
                if old is None:
                    count += 1
                    reported = True
                    yield _WalkedChange(path, ChangeKind.ADD, new, frame.layer_fd, name)
                elif _entry_modified(frame.layer_fd, frame.parent_fd, name, new, old):
                    count += 1
                    reported = True
                    yield _WalkedChange(path, ChangeKind.MODIFY, new, frame.layer_fd, name)
                if not stat.S_ISDIR(new.st_mode):
                    continue
                child_fd = _open_listed_dir(frame.layer_fd, name, new, path)
                child_parent_fd = None
                if old is not None and stat.S_ISDIR(old.st_mode):
                    try:
                        child_parent_fd = _open_listed_dir(frame.parent_fd, name, old, path)
                    except BaseException:
                        os.close(child_fd)
                        raise
                try:
                    stack.append(_DirFrame(path, child_fd, child_parent_fd, not reported,
                                           new, name, count))
                except BaseException:
                    os.close(child_fd)
                    if child_parent_fd is not None:
                        os.close(child_parent_fd)
                    raise
                descended = True
                break
            if descended:
                continue

            for name in sorted(frame.parent_entries, key=os.fsencode):
                count += 1
                yield _WalkedChange(frame.path + "/" + name, ChangeKind.DELETE, None, frame.layer_fd, name)
            frame.parent_entries = {}
            stack.pop()
            os.close(frame.layer_fd)
            if frame.parent_fd is not None:
                os.close(frame.parent_fd)
            if stack and frame.report_when_changed and count > frame.changes_at_entry:
                count += 1
                yield _WalkedChange(frame.path, ChangeKind.MODIFY, frame.st, stack[-1].layer_fd, frame.name)
    finally:
        for frame in stack:
            os.close(frame.layer_fd)
            if frame.parent_fd is not None:
                os.close(frame.parent_fd)


def _change_sort_key(change) -> bytes:
    return os.fsencode(change.path)


def layer_changes(layer_dir, parent_dir=None) -> List[Change]:
    """Return the changes of a layer directory against its parent, sorted by path."""
    layer_fd = _open_dir(layer_dir)
    parent_fd = None
    try:
        if parent_dir is not None:
            parent_fd = _open_dir(parent_dir)
        changes = [Change(item.path, item.kind) for item in _walk_changes(layer_fd, parent_fd)]
    finally:
        os.close(layer_fd)
        if parent_fd is not None:
            os.close(parent_fd)
    changes.sort(key=_change_sort_key)
    return changes


def layer_diff_size(layer_dir, parent_dir=None) -> int:
    """Sum the sizes of the non-directories that a layer adds or modifies.

    Sizes are lstat sizes (a symlink counts its target's length), and an inode
    with several links counts once.
    """
    layer_fd = _open_dir(layer_dir)
    parent_fd = None
    total = 0
    seen_inodes = set()
    try:
        if parent_dir is not None:
            parent_fd = _open_dir(parent_dir)
        for item in _walk_changes(layer_fd, parent_fd):
            if item.kind == ChangeKind.DELETE or stat.S_ISDIR(item.st.st_mode):
                continue
            if item.st.st_nlink > 1:
                inode = (item.st.st_dev, item.st.st_ino)
                if inode in seen_inodes:
                    continue
                seen_inodes.add(inode)
            total += item.st.st_size
    finally:
        os.close(layer_fd)
        if parent_fd is not None:
            os.close(parent_fd)
    return total


# Diff (writing a layer tar) -------------------------------------------------


class _TarEntryWriter:
    """Writes layer entries into a PAX tar stream, keeping hard links linked."""

    def __init__(self, tar, uid_maps, gid_maps):
        self.tar = tar
        self.uid_maps = uid_maps
        self.gid_maps = gid_maps
        self.link_names: Dict[Tuple[int, int], str] = {}

    def add(self, archive_name: str, path: str, dir_fd: int, name: str, st: os.stat_result) -> None:
        import tarfile

        info = tarfile.TarInfo(archive_name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = _map_owner(self.uid_maps, self.gid_maps, st.st_uid, st.st_gid, False, path)
        info.mtime = st.st_mtime_ns // _NS_PER_SECOND
        mode = st.st_mode
        data = None
        if stat.S_ISREG(mode):
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and inode in self.link_names:
                info.type = tarfile.LNKTYPE
                info.linkname = self.link_names[inode]
            else:
                if st.st_nlink > 1:
                    self.link_names[inode] = archive_name
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
            # Sockets are not carried in layers (nor by containers/storage).
            return
        if info.type != tarfile.LNKTYPE:
            xattrs = _read_xattrs(data.fileno()) if data is not None else _entry_xattrs(dir_fd, name, st)
            for key, value in xattrs.items():
                info.pax_headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        try:
            self.tar.addfile(info, data)
        finally:
            if data is not None:
                data.close()

    @staticmethod
    def _open_file(dir_fd: int, name: str, st: os.stat_result, path: str):
        fd = os.open(name, _FILE_READ_FLAGS, dir_fd=dir_fd)
        if not os.path.samestat(os.fstat(fd), st):
            os.close(fd)
            raise OSError(errno.ESTALE, "file was replaced while the diff was written", path)
        return open(fd, "rb", closefd=True)

    def add_whiteout(self, path: str) -> None:
        import tarfile

        parent, _, name = path.rpartition("/")
        info = tarfile.TarInfo((parent + "/" + WHITEOUT_PREFIX + name).lstrip("/"))
        info.type = tarfile.REGTYPE
        info.mode = 0
        self.tar.addfile(info)


def _write_full_tar(out, layer_fd: int, uid_maps, gid_maps) -> None:
    import tarfile

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        writer = _TarEntryWriter(tar, uid_maps, gid_maps)
        for item in _walk_changes(layer_fd, None):
            writer.add(item.path.lstrip("/"), item.path, item.dir_fd, item.name, item.st)


def _write_changes_tar(out, layer_fd: int, changes: List[Change], uid_maps, gid_maps) -> None:
    import tarfile

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        writer = _TarEntryWriter(tar, uid_maps, gid_maps)
        for change in changes:
            if change.kind == ChangeKind.DELETE:
                writer.add_whiteout(change.path)
                continue
            parts = _path_parts(change.path)
            dir_fd = _open_parent(layer_fd, parts, change.path)
            if dir_fd is None:
                raise FileNotFoundError(errno.ENOENT, "changed entry vanished during the diff", change.path)
            try:
                st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                writer.add(change.path.lstrip("/"), change.path, dir_fd, parts[-1], st)
            finally:
                os.close(dir_fd)


class _PipeReader(io.RawIOBase):
    """The read end of a pipe that a writer thread fills.

    Reading to the end raises the writer's exception, if it failed. Closing
    stops the writer (its next write fails with EPIPE), waits for it and
    calls release.
    """

    def __init__(self, write: Callable[[io.BufferedWriter], None], release: Optional[Callable[[], None]]):
        super().__init__()
        self._read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self._release = release
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(write, write_fd),
                                        name="btrfsdrv-diff", daemon=True)
        self._thread.start()

    def _run(self, write, write_fd: int) -> None:
        try:
            with open(write_fd, "wb", closefd=True) as out:
                write(out)
        except BrokenPipeError:
            pass  # the reader closed the stream early
        except BaseException as error:
            self._error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = os.read(self._read_fd, len(buffer))
        if not data:
            self._thread.join()
            if self._error is not None:
                raise self._error
            return 0
        buffer[:len(data)] = data
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


def layer_diff(layer_dir, parent_dir=None, uid_maps=(), gid_maps=(),
               release: Optional[Callable[[], None]] = None):
    """Stream a layer as an uncompressed PAX tar, as a readable binary file.

    Without a parent the tar holds the whole layer; otherwise it holds the
    changed entries and a whiteout for each deletion. Owners are mapped back
    to container ids with the given maps. Closing the file calls release.
    """
    layer_fd = _open_dir(layer_dir)
    parent_fd = None
    try:
        if parent_dir is None:
            def write(out):
                try:
                    _write_full_tar(out, layer_fd, uid_maps, gid_maps)
                finally:
                    os.close(layer_fd)
        else:
            parent_fd = _open_dir(parent_dir)
            try:
                changes = [Change(item.path, item.kind) for item in _walk_changes(layer_fd, parent_fd)]
            finally:
                os.close(parent_fd)
            changes.sort(key=_change_sort_key)

            def write(out):
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

    def __init__(self, source):
        super().__init__()
        self.source = source
        self.count = 0
        self.prefix = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.prefix:
            size = min(len(buffer), len(self.prefix))
            buffer[:size] = self.prefix[:size]
            self.prefix = self.prefix[size:]
            return size
        data = self.source.read(len(buffer))
        if not data:
            return 0
        self.count += len(data)
        buffer[:len(data)] = data
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

    Decompressor failures become _CorruptStream, so that they are told apart
    from errors of the filesystem.
    """

    _TAIL = 64 * 1024

    def __init__(self, source, decompression_errors):
        super().__init__()
        self.source = source
        self.errors = decompression_errors
        self.position = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.source.read(len(buffer))
        except self.errors as error:
            raise _CorruptStream(f"corrupt compressed data: {error}") from None
        if not data:
            return 0
        buffer[:len(data)] = data
        self.position += len(data)
        self.tail += data
        if len(self.tail) > 2 * self._TAIL:
            del self.tail[:-self._TAIL]
        return len(data)

    def block_at(self, offset: int) -> Optional[bytes]:
        """Return the 512-byte block at offset if it was read and is still kept."""
        start = offset - (self.position - len(self.tail))
        if start < 0 or offset + 512 > self.position:
            return None
        return bytes(self.tail[start:start + 512])


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstd stream with the system's libzstd through ctypes."""

    def __init__(self, source):
        super().__init__()
        import ctypes

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
        self._input = ctypes.create_string_buffer(0)
        self._in = Buffer(ctypes.addressof(self._input), 0, 0)
        self._frame_complete = True

    def _check(self, result: int) -> int:
        if self._lib.ZSTD_isError(result):
            raise _CorruptStream("corrupt zstd data: " + self._lib.ZSTD_getErrorName(result).decode())
        return result

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ctypes = self._ctypes
        target = (ctypes.c_char * len(buffer)).from_buffer(buffer)
        out = self._buffer_type(ctypes.addressof(target), len(buffer), 0)
        while out.pos == 0:
            if self._in.pos == self._in.size:
                data = self._source.read(_COPY_CHUNK)
                if not data:
                    if not self._frame_complete:
                        raise _CorruptStream("truncated zstd data")
                    return 0
                self._input = ctypes.create_string_buffer(data, len(data))
                self._in = self._buffer_type(ctypes.addressof(self._input), len(data), 0)
            result = self._check(self._lib.ZSTD_decompressStream(self._stream, ctypes.byref(out),
                                                                 ctypes.byref(self._in)))
            self._frame_complete = result == 0
        return out.pos

    def close(self) -> None:
        if not self.closed and self._stream:
            self._lib.ZSTD_freeDStream(self._stream)
            self._stream = None
        super().close()


def _decompressed(counting: _CountingReader) -> _TarInput:
    """Detect the compression of a layer stream by its magic bytes and undo it."""
    magic = counting.peek_magic(6)
    raw = io.BufferedReader(counting, buffer_size=_COPY_CHUNK)
    if magic.startswith(b"\x1f\x8b"):
        import gzip
        import zlib

        return _TarInput(gzip.GzipFile(fileobj=raw, mode="rb"), (EOFError, OSError, zlib.error))
    if magic.startswith(b"BZh"):
        import bz2

        return _TarInput(bz2.BZ2File(raw), (EOFError, OSError))
    if magic.startswith(b"\xfd7zXZ\x00"):
        import lzma

        return _TarInput(lzma.LZMAFile(raw), (EOFError, lzma.LZMAError))
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        return _TarInput(io.BufferedReader(_ZstdReader(raw), buffer_size=_COPY_CHUNK), ())
    return _TarInput(raw, ())


class _PendingDirTimes:
    """Directory times to set once all entries are applied, spilled to a file.

    Creating entries in a directory changes its mtime, so directory times are
    set last. Records go to an unnamed temporary file, so memory stays flat
    however many directories the layer has.
    """

    _HEADER = struct.Struct("=qqI")

    def __init__(self):
        import tempfile

        self.file = tempfile.TemporaryFile()

    def add(self, parts: Sequence[str], atime_ns: int, mtime_ns: int) -> None:
        path = b"/".join(os.fsencode(part) for part in parts)
        self.file.write(self._HEADER.pack(atime_ns, mtime_ns, len(path)) + path)

    def apply(self, root_fd: int) -> None:
        self.file.seek(0)
        while True:
            header = self.file.read(self._HEADER.size)
            if not header:
                break
            atime_ns, mtime_ns, length = self._HEADER.unpack(header)
            parts = [os.fsdecode(part) for part in self.file.read(length).split(b"/") if part]
            self._set_times(root_fd, parts, (atime_ns, mtime_ns))

    @staticmethod
    def _set_times(root_fd: int, parts: List[str], times: Tuple[int, int]) -> None:
        if not parts:
            os.utime(root_fd, ns=times)
            return
        path = "/".join(parts)
        try:
            dir_fd = _open_parent(root_fd, parts, path)
        except ValueError:
            return  # a later entry replaced a parent with a non-directory
        if dir_fd is None:
            return
        try:
            st = _lstat_at(dir_fd, parts[-1])
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.utime(parts[-1], ns=times, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        self.file.close()


def _layer_epoch(root_fd: int) -> int:
    """Return a ctime that every inode this apply creates or changes will reach.

    The kernel stamps ctime from a coarse clock, so the epoch is read from a
    probe inode, and the probe is repeated until that clock moves on: every
    inode changed before this call then has a smaller ctime than the result.
    """
    name = ".btrfsdrv-epoch-%d" % os.getpid()
    first = None
    while True:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=root_fd)
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


class _LayerApplier:
    """Applies the entries of a layer tar to a layer directory.

    Every path is resolved from the layer root one component at a time with
    O_NOFOLLOW, so no entry can reach outside the layer. New non-directories
    are written under a temporary name and renamed into place, so a failed
    entry leaves the layer as it was before it.
    """

    def __init__(self, root_fd: int, uid_maps, gid_maps, ignore_chown_errors: bool):
        self.root_fd = root_fd
        self.uid_maps = uid_maps
        self.gid_maps = gid_maps
        self.ignore_chown_errors = ignore_chown_errors
        self.dir_times = _PendingDirTimes()
        self.epoch_ns = _layer_epoch(root_fd)
        self.temporary_name = ".btrfsdrv-apply-%d-%d" % (os.getpid(), threading.get_ident())
        self.warned_chown = False

    def close(self) -> None:
        self.dir_times.close()

    # Owners and metadata -------------------------------------------------

    def host_owner(self, member, path: str) -> Optional[Tuple[int, int]]:
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

    def chown(self, function, path: str) -> None:
        try:
            function()
        except OSError as error:
            if not self.ignore_chown_errors or error.errno not in (errno.EPERM, errno.EINVAL):
                raise
            if not self.warned_chown:
                log.warning("cannot set owners in the layer, keeping the default ones: %s (first: %s)",
                            error, path)
                self.warned_chown = True

    @staticmethod
    def xattrs(member) -> Dict[str, bytes]:
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

    def set_fd_metadata(self, fd: int, member, path: str) -> None:
        """Set owner, mode, extended attributes and (for files) times through an fd."""
        owner = self.host_owner(member, path)
        if owner is not None:
            self.chown(lambda: os.fchown(fd, *owner), path)
        # chmod after chown, because chown clears setuid and setgid.
        os.fchmod(fd, member.mode & 0o7777)
        # security.capability last, because chown removes it too.
        for name, value in sorted(self.xattrs(member).items(), key=lambda item: item[0] == "security.capability"):
            os.setxattr(fd, name, value)
        if not member.isdir():
            os.utime(fd, ns=(int(member.mtime * _NS_PER_SECOND),) * 2)

    def set_path_metadata(self, dir_fd: int, name: str, member, path: str) -> None:
        """Set metadata on a new symlink, device node or FIFO, which are never opened."""
        owner = self.host_owner(member, path)
        if owner is not None:
            self.chown(lambda: os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False), path)
        if not member.issym():
            os.chmod(name, member.mode & 0o7777, dir_fd=dir_fd)
            for key, value in self.xattrs(member).items():
                os.setxattr(_fd_path(dir_fd, name), key, value, follow_symlinks=False)
        os.utime(name, ns=(int(member.mtime * _NS_PER_SECOND),) * 2, dir_fd=dir_fd, follow_symlinks=False)

    # Entries ------------------------------------------------------------

    def apply(self, member, data_reader) -> None:
        path = member.name
        parts = _path_parts(path)
        if parts and parts[0].startswith(WHITEOUT_META_PREFIX) and parts[-1] != WHITEOUT_OPAQUE_DIR:
            return  # AUFS metadata (.wh..wh.plnk and the like) is not layer content
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self.apply_whiteout(parts, path)
            return
        if not parts:
            if not member.isdir():
                raise ValueError(f"entry {path!r} names the layer root but is not a directory")
            self.apply_directory(self.root_fd, None, [], member, path)
            return
        if member.isreg():
            self.apply_file(parts, member, data_reader, path)
            return
        parent_fd = _open_parent(self.root_fd, parts, path, create=True)
        try:
            if member.isdir():
                self.apply_directory(parent_fd, parts[-1], parts, member, path)
            else:
                self.apply_special(parent_fd, parts[-1], member, path)
        finally:
            os.close(parent_fd)

    def apply_whiteout(self, parts: List[str], path: str) -> None:
        base = parts[-1]
        if base.startswith(WHITEOUT_META_PREFIX) and base != WHITEOUT_OPAQUE_DIR:
            return
        target = base[len(WHITEOUT_PREFIX):]
        if base != WHITEOUT_OPAQUE_DIR and target in ("", ".", ".."):
            raise ValueError(f"whiteout {path!r} does not name an entry")
        parent_fd = _open_parent(self.root_fd, parts, path)
        if parent_fd is None:
            return
        try:
            if base == WHITEOUT_OPAQUE_DIR:
                self.empty_opaque_directory(parent_fd)
            else:
                _remove_tree(parent_fd, target)
        finally:
            os.close(parent_fd)

    def empty_opaque_directory(self, dir_fd: int) -> None:
        """Remove everything below dir_fd that this apply did not create or change.

        What this layer wrote has a ctime at or after the apply's epoch; what
        came from the parent is older. NOTE: a hard link that this layer adds
        to an inode of the parent also makes that inode's other names look new.
        """
        for name, st in _list_dir(dir_fd):
            if st.st_ctime_ns < self.epoch_ns:
                _remove_tree(dir_fd, name)
            elif stat.S_ISDIR(st.st_mode):
                child = _open_dir(name, dir_fd)
                try:
                    self.empty_opaque_directory(child)
                finally:
                    os.close(child)

    def remove_existing(self, dir_fd: int, name: str, keep_directory: bool) -> Optional[os.stat_result]:
        """Remove what is at name unless both it and the new entry are directories."""
        st = _lstat_at(dir_fd, name)
        if st is None:
            return None
        if keep_directory and stat.S_ISDIR(st.st_mode):
            return st
        _remove_tree(dir_fd, name)
        return None

    def apply_directory(self, parent_fd: int, name: Optional[str], parts: List[str], member, path: str) -> None:
        if name is None:
            fd = os.dup(parent_fd)
        else:
            if self.remove_existing(parent_fd, name, keep_directory=True) is None:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            fd = _open_dir(name, parent_fd)
        try:
            self.set_fd_metadata(fd, member, path)
        finally:
            os.close(fd)
        mtime_ns = int(member.mtime * _NS_PER_SECOND)
        self.dir_times.add(parts, mtime_ns, mtime_ns)

    def apply_file(self, parts: List[str], member, data_reader, path: str) -> None:
        # The data goes to a temporary file in the layer root first, so that a
        # truncated stream fails before any parent directory is created.
        temporary = self.temporary_name
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.root_fd)
        installed = False
        try:
            with open(fd, "wb", closefd=False) as out:
                data_reader(member, out)
            self.set_fd_metadata(fd, member, path)
            parent_fd = _open_parent(self.root_fd, parts, path, create=True)
            try:
                self.remove_existing(parent_fd, parts[-1], keep_directory=False)
                os.rename(temporary, parts[-1], src_dir_fd=self.root_fd, dst_dir_fd=parent_fd)
                installed = True
            finally:
                os.close(parent_fd)
        finally:
            os.close(fd)
            if not installed:
                with _suppress_missing():
                    os.unlink(temporary, dir_fd=self.root_fd)

    def apply_special(self, parent_fd: int, name: str, member, path: str) -> None:
        """Create a symlink, hard link, device node or FIFO under a temporary name, then rename it."""
        import tarfile

        temporary = self.temporary_name
        if member.issym():
            # The target is stored as given: nothing here ever follows it.
            os.symlink(member.linkname, temporary, dir_fd=parent_fd)
        elif member.islnk():
            self.link(parent_fd, temporary, member, path)
        elif member.type in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
            kind = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
                    tarfile.FIFOTYPE: stat.S_IFIFO}[member.type]
            device = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
            os.mknod(temporary, kind | 0o600, device, dir_fd=parent_fd)
        else:
            raise ValueError(f"entry {path!r} has unsupported tar type {member.type!r}")
        try:
            if not member.islnk():
                # A hard link shares the metadata of its target, as with GNU tar.
                self.set_path_metadata(parent_fd, temporary, member, path)
            self.remove_existing(parent_fd, name, keep_directory=False)
            os.rename(temporary, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        finally:
            # rename() does nothing when both names are links to one inode,
            # so the temporary name can remain even after success.
            with _suppress_missing():
                os.unlink(temporary, dir_fd=parent_fd)

    def link(self, parent_fd: int, temporary: str, member, path: str) -> None:
        target = member.linkname
        target_parts = _path_parts(target)
        if not target_parts:
            raise ValueError(f"hard link {path!r} points at the layer root")
        target_dir_fd = _open_parent(self.root_fd, target_parts, target)
        if target_dir_fd is None:
            raise ValueError(f"hard link {path!r}: target {target!r} does not exist in the layer")
        try:
            st = _lstat_at(target_dir_fd, target_parts[-1])
            if st is None:
                raise ValueError(f"hard link {path!r}: target {target!r} does not exist in the layer")
            if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
                raise ValueError(f"hard link {path!r}: target {target!r} is a symlink or directory")
            os.link(target_parts[-1], temporary, src_dir_fd=target_dir_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        finally:
            os.close(target_dir_fd)


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, FileNotFoundError)


def apply_layer_tar(layer_dir, diff, uid_maps=(), gid_maps=(), ignore_chown_errors: bool = False,
                    progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Apply a layer tar (uncompressed, gzip, bzip2, xz or zstd) to a layer directory.

    Returns the sum of the regular files' sizes in the tar. Raises ValueError
    naming the entry and offset for a corrupt, truncated or hostile stream;
    the layer then keeps every entry before the bad one.
    """
    import tarfile

    counting = _CountingReader(diff)
    tar_input = _decompressed(counting)
    root_fd = _open_dir(layer_dir)
    applier = _LayerApplier(root_fd, uid_maps, gid_maps, ignore_chown_errors)
    applied = 0
    total_size = 0
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

    def copy_data(member, out) -> None:
        source = tar.extractfile(member)
        remaining = member.size
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

    try:
        try:
            tar = tarfile.open(fileobj=tar_input, mode="r|", encoding="utf-8", errors="surrogateescape")
        except tarfile.ReadError as error:
            if tar_input.position == 0 and str(error) == "empty file":
                return 0  # an empty stream is an empty layer, as for containers/storage
            raise ValueError(f"invalid layer tar at offset 0: {error}") from None
        except _CorruptStream as error:
            raise ValueError(f"invalid layer tar at offset 0: {error}") from None
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, _CorruptStream) as error:
                raise ValueError(f"invalid layer tar at offset {tar.offset} (after entry "
                                 f"{last_name!r}): {error}") from None
            if member is None:
                break
            tar.members.clear()  # tarfile keeps every member read; memory must stay flat
            last_name = member.name
            try:
                applier.apply(member, copy_data)
            except ValueError as error:
                raise ValueError(f"entry {member.name!r} at offset {member.offset}: {error}") from None
            if member.isreg():
                total_size += member.size
            applied += 1
            report()
        end = tar_input.block_at(tar.offset)
        if end is None or end.count(0) != len(end):
            raise ValueError(f"invalid layer tar at offset {tar.offset} (after entry {last_name!r}): "
                             "truncated or corrupt, no end-of-archive block")
        applier.dir_times.apply(root_fd)
        report(force=True)
        return total_size
    finally:
        applier.close()
        os.close(root_fd)


# ID-map updates ------------------------------------------------------------


def _chown_entry(dir_fd: int, name: str, st: os.stat_result, uid: int, gid: int) -> None:
    """Change an entry's owner, keeping setuid, setgid and security.capability."""
    capability = None
    if stat.S_ISREG(st.st_mode):
        try:
            capability = os.getxattr(_fd_path(dir_fd, name), "security.capability", follow_symlinks=False)
        except OSError as error:
            if error.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    if capability is not None:
        os.setxattr(_fd_path(dir_fd, name), "security.capability", capability, follow_symlinks=False)


def remap_layer_owners(layer_dir, to_container, to_host) -> None:
    """Rewrite every owner below a layer's root from one ID mapping to another.

    to_container is the (uid_maps, gid_maps) pair that maps the current host
    ids back to container ids, and to_host the pair that maps those to the
    new host ids; None or empty maps are the identity. The root keeps its
    owner. Each inode is changed once.
    """
    old_uid_maps, old_gid_maps = to_container or ((), ())
    new_uid_maps, new_gid_maps = to_host or ((), ())
    root_fd = _open_dir(layer_dir)
    seen_inodes = set()
    try:
        for item in _walk_changes(root_fd, None):
            st = item.st
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                inode = (st.st_dev, st.st_ino)
                if inode in seen_inodes:
                    continue
                seen_inodes.add(inode)
            container_uid = _map_id(old_uid_maps, st.st_uid, False)
            container_gid = _map_id(old_gid_maps, st.st_gid, False)
            if container_uid is None or container_gid is None:
                raise ValueError(f"{item.path!r}: owner {st.st_uid}:{st.st_gid} is outside the old ID maps")
            uid = _map_id(new_uid_maps, container_uid, True)
            gid = _map_id(new_gid_maps, container_gid, True)
            if uid is None or gid is None:
                raise ValueError(f"{item.path!r}: container owner {container_uid}:{container_gid} "
                                 "is outside the new ID maps")
            if (uid, gid) != (st.st_uid, st.st_gid):
                _chown_entry(item.dir_fd, item.name, st, uid, gid)
    finally:
        os.close(root_fd)
