"""Kernel interface for btrfs: constants, ioctl request numbers and ctypes structures.

Hand-ported from the Linux 6.1 UAPI headers ``linux/btrfs.h``,
``linux/btrfs_tree.h``, ``linux/magic.h`` and ``linux/fs.h`` (Debian's
linux-libc-dev 6.1). Names newer than those headers are listed in
``ADDED_AFTER_PORTED_HEADERS`` with the kernel version that added them, and
a comment at each definition gives that version too. Every name is spelled as in the headers, so
``grep`` finds both.

The module contains definitions only and imports nothing outside the standard
library, so it imports on any machine, with or without a compiler.

Request numbers (``BTRFS_IOC_*``, ``FS_IOC_*``, ``FICLONE``) are computed on
first use from ``ctypes.sizeof`` of the argument structures and the ioctl encoding of
the running architecture (``platform.machine()``). Read them as module
attributes (``ioctl_structs.BTRFS_IOC_SYNC``), through ``from ioctl_structs
import *``, or with ``request_number(name)``. On a machine with no known
encoding, the first of these raises ``UnknownMachineError``, but the import
itself succeeds. A bare global name inside this file does not go through the
module ``__getattr__``, so code inlined next to these definitions must call
``request_number``.

Native structures use ctypes' native layout, which matches the C compiler of
the running ABI (for example, i386 aligns ``__u64`` to 4 bytes, and so does
ctypes there). On-disk items returned by a tree search are packed
little-endian structures, as they are stored on disk on every architecture.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, NamedTuple

PORTED_HEADERS_VERSION = "6.1"

# Public names that the Linux 6.1 headers lack, with the kernel version that
# added each. A structure field is named "struct.field".
ADDED_AFTER_PORTED_HEADERS: dict[str, str] = {
    "BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA": "6.7",
    "BTRFS_QGROUP_STATUS_FLAG_SIMPLE_MODE": "6.7",
    "btrfs_qgroup_status_item.enable_gen": "6.7",
}


# -- ioctl number encoding ----------------------------------------------------

# Directions in the generic encoding (asm-generic/ioctl.h). _IOC translates
# them into the bits of the architecture it encodes for.
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS


class IocEncoding(NamedTuple):
    """Layout of an ioctl request number on one architecture family."""

    family: str
    size_bits: int
    dir_bits: int
    none: int
    write: int
    read: int


# asm-generic/ioctl.h: x86, arm, arm64, riscv, s390, loongarch, ia64, m68k...
IOC_GENERIC = IocEncoding("generic", size_bits=14, dir_bits=2, none=0, write=1, read=2)
# arch/{powerpc,mips,sparc,alpha}/include/uapi/asm/ioctl.h
IOC_POWERPC = IocEncoding("powerpc", size_bits=13, dir_bits=3, none=1, write=4, read=2)
IOC_MIPS = IocEncoding("mips", size_bits=13, dir_bits=3, none=1, write=4, read=2)
IOC_SPARC = IocEncoding("sparc", size_bits=13, dir_bits=3, none=1, write=4, read=2)
IOC_ALPHA = IocEncoding("alpha", size_bits=13, dir_bits=3, none=1, write=4, read=2)
# arch/parisc/include/uapi/asm/ioctl.h swaps read and write.
IOC_PARISC = IocEncoding("parisc", size_bits=14, dir_bits=2, none=0, write=2, read=1)

# platform.machine() prefixes, lowercased. "arm" covers arm64 and armv7l.
_MACHINE_PREFIXES: tuple[tuple[tuple[str, ...], IocEncoding], ...] = (
    (("ppc", "powerpc"), IOC_POWERPC),
    (("mips",), IOC_MIPS),
    (("sparc",), IOC_SPARC),
    (("alpha",), IOC_ALPHA),
    (("parisc", "hppa"), IOC_PARISC),
    (
        (
            "x86", "amd64", "i386", "i486", "i586", "i686", "aarch64", "arm",
            "riscv", "s390", "loongarch", "ia64", "m68k", "sh", "microblaze",
            "nios2", "or1k", "openrisc", "csky", "arc", "xtensa", "hexagon",
        ),
        IOC_GENERIC,
    ),
)


class UnknownMachineError(ValueError):
    """No Linux ioctl encoding is known for a ``platform.machine()`` name."""

    def __init__(self, machine: str) -> None:
        super().__init__(
            f"unknown machine {machine!r}: no Linux ioctl number encoding is known "
            "for it, so btrfs request numbers cannot be computed (known families: "
            "generic, powerpc, mips, sparc, alpha, parisc)"
        )
        self.machine = machine


def ioc_encoding(machine: str | None = None) -> IocEncoding:
    """Return the ioctl encoding for a ``platform.machine()`` name (default: this one)."""
    # Imported here, on the first request number, to keep it out of the
    # import time of this module.
    import platform

    name = platform.machine() if machine is None else machine
    lowered = name.lower()
    for prefixes, encoding in _MACHINE_PREFIXES:
        if lowered.startswith(prefixes):
            return encoding
    raise UnknownMachineError(name)


def _IOC(
    direction: int, type: int | str, nr: int, size: int, *, machine: str | None = None
) -> int:
    """Encode an ioctl request number like the kernel's ``_IOC`` macro.

    ``direction`` is a combination of the generic ``_IOC_NONE``, ``_IOC_WRITE``
    and ``_IOC_READ``, translated here to the bits of ``machine``.
    ``type`` is an int or a one-character str, as in ``_IOR('f', 1, long)``.
    """
    encoding = ioc_encoding(machine)
    type_number = ord(type) if isinstance(type, str) else type
    if not 0 <= type_number < 1 << _IOC_TYPEBITS:
        raise ValueError(f"ioctl type {type!r} does not fit in {_IOC_TYPEBITS} bits")
    if not 0 <= nr < 1 << _IOC_NRBITS:
        raise ValueError(f"ioctl number {nr} does not fit in {_IOC_NRBITS} bits")
    if not 0 <= size < 1 << encoding.size_bits:
        raise ValueError(
            f"ioctl argument size {size} does not fit in the {encoding.size_bits}-bit "
            f"size field of the {encoding.family} encoding"
        )
    if direction & ~(_IOC_WRITE | _IOC_READ):
        raise ValueError(f"invalid ioctl direction {direction!r}")

    dir_bits = encoding.none if direction == _IOC_NONE else 0
    if direction & _IOC_WRITE:
        dir_bits |= encoding.write
    if direction & _IOC_READ:
        dir_bits |= encoding.read
    dir_shift = _IOC_SIZESHIFT + encoding.size_bits
    return (
        (dir_bits << dir_shift)
        | (size << _IOC_SIZESHIFT)
        | (type_number << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


def _argument_size(struct_or_size: Any) -> int:
    if isinstance(struct_or_size, int):
        return struct_or_size
    return ctypes.sizeof(struct_or_size)


def _IO(type: int | str, nr: int, *, machine: str | None = None) -> int:
    return _IOC(_IOC_NONE, type, nr, 0, machine=machine)


def _IOR(
    type: int | str, nr: int, struct_or_size: Any, *, machine: str | None = None
) -> int:
    """Encode a read request; ``struct_or_size`` is a ctypes type or a size in bytes."""
    return _IOC(_IOC_READ, type, nr, _argument_size(struct_or_size), machine=machine)


def _IOW(
    type: int | str, nr: int, struct_or_size: Any, *, machine: str | None = None
) -> int:
    """Encode a write request; ``struct_or_size`` is a ctypes type or a size in bytes."""
    return _IOC(_IOC_WRITE, type, nr, _argument_size(struct_or_size), machine=machine)


def _IOWR(
    type: int | str, nr: int, struct_or_size: Any, *, machine: str | None = None
) -> int:
    """Encode a read-write request; ``struct_or_size`` is a ctypes type or a size in bytes."""
    return _IOC(
        _IOC_READ | _IOC_WRITE, type, nr, _argument_size(struct_or_size), machine=machine
    )


# -- Constants: linux/magic.h, linux/btrfs.h ----------------------------------

BTRFS_SUPER_MAGIC = 0x9123683E
BTRFS_IOCTL_MAGIC = 0x94

BTRFS_VOL_NAME_MAX = 255
BTRFS_LABEL_SIZE = 256
BTRFS_PATH_NAME_MAX = 4087
BTRFS_DEVICE_PATH_NAME_MAX = 1024
BTRFS_SUBVOL_NAME_MAX = 4039
BTRFS_INO_LOOKUP_PATH_MAX = 4080
BTRFS_INO_LOOKUP_USER_PATH_MAX = 4080 - BTRFS_VOL_NAME_MAX - 1
BTRFS_FSID_SIZE = 16
BTRFS_UUID_SIZE = 16
BTRFS_UUID_UNPARSED_SIZE = 37
BTRFS_MAX_ROOTREF_BUFFER_NUM = 255

# btrfs_ioctl_vol_args_v2.flags. SUBVOL_CREATE_ASYNC is deprecated since
# Linux 5.7, which leaves it out of BTRFS_SUBVOL_CREATE_ARGS_MASK and so
# rejects it.
BTRFS_SUBVOL_CREATE_ASYNC = 1 << 0
BTRFS_SUBVOL_RDONLY = 1 << 1
BTRFS_SUBVOL_QGROUP_INHERIT = 1 << 2
BTRFS_DEVICE_SPEC_BY_ID = 1 << 3
BTRFS_SUBVOL_SPEC_BY_ID = 1 << 4

# btrfs_qgroup_limit.flags and btrfs_qgroup_limit_item.flags
BTRFS_QGROUP_LIMIT_MAX_RFER = 1 << 0
BTRFS_QGROUP_LIMIT_MAX_EXCL = 1 << 1
BTRFS_QGROUP_LIMIT_RSV_RFER = 1 << 2
BTRFS_QGROUP_LIMIT_RSV_EXCL = 1 << 3
BTRFS_QGROUP_LIMIT_RFER_CMPR = 1 << 4
BTRFS_QGROUP_LIMIT_EXCL_CMPR = 1 << 5

# btrfs_qgroup_inherit.flags
BTRFS_QGROUP_INHERIT_SET_LIMITS = 1 << 0

# btrfs_ioctl_fs_info_args.flags
BTRFS_FS_INFO_FLAG_CSUM_INFO = 1 << 0
BTRFS_FS_INFO_FLAG_GENERATION = 1 << 1
BTRFS_FS_INFO_FLAG_METADATA_UUID = 1 << 2

# btrfs_ioctl_quota_ctl_args.cmd
BTRFS_QUOTA_CTL_ENABLE = 1
BTRFS_QUOTA_CTL_DISABLE = 2
BTRFS_QUOTA_CTL_RESCAN__NOTUSED = 3
# Linux 6.7 (simple quotas). Older kernels reject it with EINVAL.
BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA = 4


# -- Constants: linux/btrfs_tree.h ---------------------------------------------

# Tree object ids. The header writes the top ones as negative unsigned
# constants (-256ULL), which are 2**64 - 256 here.
BTRFS_ROOT_TREE_OBJECTID = 1
BTRFS_EXTENT_TREE_OBJECTID = 2
BTRFS_CHUNK_TREE_OBJECTID = 3
BTRFS_DEV_TREE_OBJECTID = 4
BTRFS_FS_TREE_OBJECTID = 5
BTRFS_ROOT_TREE_DIR_OBJECTID = 6
BTRFS_CSUM_TREE_OBJECTID = 7
BTRFS_QUOTA_TREE_OBJECTID = 8
BTRFS_UUID_TREE_OBJECTID = 9
BTRFS_FREE_SPACE_TREE_OBJECTID = 10
BTRFS_BLOCK_GROUP_TREE_OBJECTID = 11
BTRFS_ORPHAN_OBJECTID = (1 << 64) - 5
BTRFS_TREE_RELOC_OBJECTID = (1 << 64) - 8
BTRFS_DATA_RELOC_TREE_OBJECTID = (1 << 64) - 9
BTRFS_FIRST_FREE_OBJECTID = 256
BTRFS_LAST_FREE_OBJECTID = (1 << 64) - 256
# Inode number of the placeholder directory that a snapshot of a nested
# subvolume contains in place of that subvolume.
BTRFS_EMPTY_SUBVOL_DIR_OBJECTID = 2

# Item key types
BTRFS_INODE_ITEM_KEY = 1
BTRFS_INODE_REF_KEY = 12
BTRFS_INODE_EXTREF_KEY = 13
BTRFS_XATTR_ITEM_KEY = 24
BTRFS_ORPHAN_ITEM_KEY = 48
BTRFS_DIR_ITEM_KEY = 84
BTRFS_DIR_INDEX_KEY = 96
BTRFS_EXTENT_DATA_KEY = 108
BTRFS_ROOT_ITEM_KEY = 132
BTRFS_ROOT_BACKREF_KEY = 144
BTRFS_ROOT_REF_KEY = 156
BTRFS_QGROUP_STATUS_KEY = 240
BTRFS_QGROUP_INFO_KEY = 242
BTRFS_QGROUP_LIMIT_KEY = 244
BTRFS_QGROUP_RELATION_KEY = 246
BTRFS_UUID_KEY_SUBVOL = 251
BTRFS_UUID_KEY_RECEIVED_SUBVOL = 252

# btrfs_dir_item.type
BTRFS_FT_UNKNOWN = 0
BTRFS_FT_REG_FILE = 1
BTRFS_FT_DIR = 2
BTRFS_FT_CHRDEV = 3
BTRFS_FT_BLKDEV = 4
BTRFS_FT_FIFO = 5
BTRFS_FT_SOCK = 6
BTRFS_FT_SYMLINK = 7
BTRFS_FT_XATTR = 8

# btrfs_root_item.flags
BTRFS_ROOT_SUBVOL_RDONLY = 1 << 0
BTRFS_ROOT_SUBVOL_DEAD = 1 << 48

BTRFS_QGROUP_LEVEL_SHIFT = 48

# btrfs_qgroup_status_item.flags
BTRFS_QGROUP_STATUS_FLAG_ON = 1 << 0
BTRFS_QGROUP_STATUS_FLAG_RESCAN = 1 << 1
BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT = 1 << 2
# Linux 6.7: the quota tree is in simple quota mode.
BTRFS_QGROUP_STATUS_FLAG_SIMPLE_MODE = 1 << 3
BTRFS_QGROUP_STATUS_VERSION = 1


# -- Constants: linux/fs.h ------------------------------------------------------

# Inode flags read and written by FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (chattr).
FS_APPEND_FL = 0x00000020
FS_IMMUTABLE_FL = 0x00000010
FS_NOCOW_FL = 0x00800000


def btrfs_qgroup_level(qgroupid: int) -> int:
    """Return the level of a qgroup id (``btrfs_qgroup_level`` in btrfs_tree.h)."""
    return (qgroupid >> BTRFS_QGROUP_LEVEL_SHIFT) & 0xFFFF


# -- ioctl argument structures: linux/btrfs.h (native layout) ---------------------


class btrfs_ioctl_vol_args(ctypes.Structure):
    """``struct btrfs_ioctl_vol_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("fd", ctypes.c_int64),
        ("name", ctypes.c_char * (BTRFS_PATH_NAME_MAX + 1)),
    ]


class btrfs_qgroup_limit(ctypes.Structure):
    """``struct btrfs_qgroup_limit`` (linux/btrfs.h)."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("max_rfer", ctypes.c_uint64),
        ("max_excl", ctypes.c_uint64),
        ("rsv_rfer", ctypes.c_uint64),
        ("rsv_excl", ctypes.c_uint64),
    ]


class btrfs_qgroup_inherit(ctypes.Structure):
    """``struct btrfs_qgroup_inherit`` (linux/btrfs.h) without its ``qgroups[]`` array.

    Use ``btrfs_qgroup_inherit_with(count)`` for an instance that carries the
    array. The kernel reads ``num_qgroups + 2 * (num_ref_copies +
    num_excl_copies)`` ids after ``lim``.
    """

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("num_qgroups", ctypes.c_uint64),
        ("num_ref_copies", ctypes.c_uint64),
        ("num_excl_copies", ctypes.c_uint64),
        ("lim", btrfs_qgroup_limit),
    ]


@functools.lru_cache(None)
def btrfs_qgroup_inherit_with(count: int) -> type[btrfs_qgroup_inherit]:
    """Return a ``btrfs_qgroup_inherit`` subclass whose ``qgroups`` array has ``count`` ids.

    Pass ``ctypes.sizeof`` of an instance as ``btrfs_ioctl_vol_args_v2.size``
    and its address as ``qgroup_inherit``.
    """
    if count < 0:
        raise ValueError(f"invalid qgroup count {count}: must be 0 or more")
    fields = [("qgroups", ctypes.c_uint64 * count)]
    return type(
        f"btrfs_qgroup_inherit_{count}", (btrfs_qgroup_inherit,), {"_fields_": fields}
    )


class btrfs_ioctl_qgroup_limit_args(ctypes.Structure):
    """``struct btrfs_ioctl_qgroup_limit_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("qgroupid", ctypes.c_uint64),
        ("lim", btrfs_qgroup_limit),
    ]


class _btrfs_ioctl_vol_args_v2_size(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        # struct btrfs_qgroup_inherit *: the address of an instance from
        # btrfs_qgroup_inherit_with(), which has a variable length.
        ("qgroup_inherit", ctypes.c_void_p),
    ]


class _btrfs_ioctl_vol_args_v2_inherit(ctypes.Union):
    _anonymous_ = ("_size",)
    _fields_ = [
        ("_size", _btrfs_ioctl_vol_args_v2_size),
        ("unused", ctypes.c_uint64 * 4),
    ]


class _btrfs_ioctl_vol_args_v2_spec(ctypes.Union):
    _fields_ = [
        ("name", ctypes.c_char * (BTRFS_SUBVOL_NAME_MAX + 1)),
        ("devid", ctypes.c_uint64),
        ("subvolid", ctypes.c_uint64),
    ]


class btrfs_ioctl_vol_args_v2(ctypes.Structure):
    """``struct btrfs_ioctl_vol_args_v2`` (linux/btrfs.h).

    The two anonymous unions of the C struct are anonymous here too, so
    ``size``, ``qgroup_inherit``, ``unused``, ``name``, ``devid`` and
    ``subvolid`` are attributes of the structure itself.
    """

    _anonymous_ = ("_inherit", "_spec")
    _fields_ = [
        ("fd", ctypes.c_int64),
        ("transid", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("_inherit", _btrfs_ioctl_vol_args_v2_inherit),
        ("_spec", _btrfs_ioctl_vol_args_v2_spec),
    ]


class btrfs_ioctl_fs_info_args(ctypes.Structure):
    """``struct btrfs_ioctl_fs_info_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("max_id", ctypes.c_uint64),
        ("num_devices", ctypes.c_uint64),
        ("fsid", ctypes.c_uint8 * BTRFS_FSID_SIZE),
        ("nodesize", ctypes.c_uint32),
        ("sectorsize", ctypes.c_uint32),
        ("clone_alignment", ctypes.c_uint32),
        ("csum_type", ctypes.c_uint16),
        ("csum_size", ctypes.c_uint16),
        ("flags", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("metadata_uuid", ctypes.c_uint8 * BTRFS_FSID_SIZE),
        ("reserved", ctypes.c_uint8 * 944),
    ]


class btrfs_ioctl_ino_lookup_args(ctypes.Structure):
    """``struct btrfs_ioctl_ino_lookup_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("treeid", ctypes.c_uint64),
        ("objectid", ctypes.c_uint64),
        ("name", ctypes.c_char * BTRFS_INO_LOOKUP_PATH_MAX),
    ]


class btrfs_ioctl_ino_lookup_user_args(ctypes.Structure):
    """``struct btrfs_ioctl_ino_lookup_user_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("dirid", ctypes.c_uint64),
        ("treeid", ctypes.c_uint64),
        ("name", ctypes.c_char * (BTRFS_VOL_NAME_MAX + 1)),
        ("path", ctypes.c_char * BTRFS_INO_LOOKUP_USER_PATH_MAX),
    ]


class btrfs_ioctl_search_key(ctypes.Structure):
    """``struct btrfs_ioctl_search_key`` (linux/btrfs.h).

    The kernel compares (objectid, type, offset) keys as one 136-bit number
    and returns every item between the min and max keys. So an item whose
    type lies outside [min_type, max_type] is still returned when its
    objectid lies strictly between min_objectid and max_objectid.
    """

    _fields_ = [
        ("tree_id", ctypes.c_uint64),
        ("min_objectid", ctypes.c_uint64),
        ("max_objectid", ctypes.c_uint64),
        ("min_offset", ctypes.c_uint64),
        ("max_offset", ctypes.c_uint64),
        ("min_transid", ctypes.c_uint64),
        ("max_transid", ctypes.c_uint64),
        ("min_type", ctypes.c_uint32),
        ("max_type", ctypes.c_uint32),
        ("nr_items", ctypes.c_uint32),
        ("unused", ctypes.c_uint32),
        ("unused1", ctypes.c_uint64),
        ("unused2", ctypes.c_uint64),
        ("unused3", ctypes.c_uint64),
        ("unused4", ctypes.c_uint64),
    ]


class btrfs_ioctl_search_header(ctypes.Structure):
    """``struct btrfs_ioctl_search_header`` (linux/btrfs.h), in native byte order.

    In a search result buffer each header is followed by ``len`` bytes of item
    data (an on-disk item, little-endian), with no alignment padding, so read
    headers with ``from_buffer_copy`` at any offset.
    """

    _fields_ = [
        ("transid", ctypes.c_uint64),
        ("objectid", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


BTRFS_SEARCH_ARGS_BUFSIZE = 4096 - ctypes.sizeof(btrfs_ioctl_search_key)


class btrfs_ioctl_search_args(ctypes.Structure):
    """``struct btrfs_ioctl_search_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("key", btrfs_ioctl_search_key),
        # char buf[] in C: a c_uint8 array so that reading it keeps the bytes
        # after a NUL, which a c_char array would cut off.
        ("buf", ctypes.c_uint8 * BTRFS_SEARCH_ARGS_BUFSIZE),
    ]


class btrfs_ioctl_search_args_v2(ctypes.Structure):
    """``struct btrfs_ioctl_search_args_v2`` (linux/btrfs.h) without its ``buf[]``.

    Use ``btrfs_ioctl_search_args_v2_with(buf_size)`` for an instance that
    carries the buffer. When one item does not fit, the ioctl fails with
    EOVERFLOW and sets ``buf_size`` to the size it needs.
    """

    _fields_ = [
        ("key", btrfs_ioctl_search_key),
        ("buf_size", ctypes.c_uint64),
    ]


@functools.lru_cache(None)
def btrfs_ioctl_search_args_v2_with(buf_size: int) -> type[btrfs_ioctl_search_args_v2]:
    """Return a ``btrfs_ioctl_search_args_v2`` subclass with a ``buf`` of ``buf_size`` bytes.

    Set the instance's ``buf_size`` field to the same number before the ioctl.
    """
    if buf_size < 0:
        raise ValueError(f"invalid search buffer size {buf_size}: must be 0 or more")
    fields = [("buf", ctypes.c_uint8 * buf_size)]
    return type(
        f"btrfs_ioctl_search_args_v2_{buf_size}",
        (btrfs_ioctl_search_args_v2,),
        {"_fields_": fields},
    )


class btrfs_ioctl_space_info(ctypes.Structure):
    """``struct btrfs_ioctl_space_info`` (linux/btrfs.h)."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("total_bytes", ctypes.c_uint64),
        ("used_bytes", ctypes.c_uint64),
    ]


class btrfs_ioctl_space_args(ctypes.Structure):
    """``struct btrfs_ioctl_space_args`` (linux/btrfs.h) without its ``spaces[]``.

    Use ``btrfs_ioctl_space_args_with(count)`` for an instance with room for
    ``count`` entries. With ``space_slots`` 0 the kernel only sets
    ``total_spaces``.
    """

    _fields_ = [
        ("space_slots", ctypes.c_uint64),
        ("total_spaces", ctypes.c_uint64),
    ]


@functools.lru_cache(None)
def btrfs_ioctl_space_args_with(count: int) -> type[btrfs_ioctl_space_args]:
    """Return a ``btrfs_ioctl_space_args`` subclass whose ``spaces`` array has ``count`` entries."""
    if count < 0:
        raise ValueError(f"invalid space info count {count}: must be 0 or more")
    fields = [("spaces", btrfs_ioctl_space_info * count)]
    return type(
        f"btrfs_ioctl_space_args_{count}", (btrfs_ioctl_space_args,), {"_fields_": fields}
    )


class btrfs_ioctl_quota_ctl_args(ctypes.Structure):
    """``struct btrfs_ioctl_quota_ctl_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("cmd", ctypes.c_uint64),
        ("status", ctypes.c_uint64),
    ]


class btrfs_ioctl_quota_rescan_args(ctypes.Structure):
    """``struct btrfs_ioctl_quota_rescan_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("progress", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    ]


class btrfs_ioctl_qgroup_assign_args(ctypes.Structure):
    """``struct btrfs_ioctl_qgroup_assign_args`` (linux/btrfs.h).

    ``assign`` is 1 to add the relation ``src`` -> ``dst`` and 0 to remove it.
    """

    _fields_ = [
        ("assign", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("dst", ctypes.c_uint64),
    ]


class btrfs_ioctl_qgroup_create_args(ctypes.Structure):
    """``struct btrfs_ioctl_qgroup_create_args`` (linux/btrfs.h).

    ``create`` is 1 to create ``qgroupid`` and 0 to remove it.
    """

    _fields_ = [
        ("create", ctypes.c_uint64),
        ("qgroupid", ctypes.c_uint64),
    ]


class btrfs_ioctl_timespec(ctypes.Structure):
    """``struct btrfs_ioctl_timespec`` (linux/btrfs.h).

    Native layout, so it is 16 bytes on most ABIs but 12 on i386.
    """

    _fields_ = [
        ("sec", ctypes.c_uint64),
        ("nsec", ctypes.c_uint32),
    ]


class btrfs_ioctl_get_subvol_info_args(ctypes.Structure):
    """``struct btrfs_ioctl_get_subvol_info_args`` (linux/btrfs.h)."""

    _fields_ = [
        ("treeid", ctypes.c_uint64),
        ("name", ctypes.c_char * (BTRFS_VOL_NAME_MAX + 1)),
        ("parent_id", ctypes.c_uint64),
        ("dirid", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("parent_uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("received_uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("ctransid", ctypes.c_uint64),
        ("otransid", ctypes.c_uint64),
        ("stransid", ctypes.c_uint64),
        ("rtransid", ctypes.c_uint64),
        ("ctime", btrfs_ioctl_timespec),
        ("otime", btrfs_ioctl_timespec),
        ("stime", btrfs_ioctl_timespec),
        ("rtime", btrfs_ioctl_timespec),
        ("reserved", ctypes.c_uint64 * 8),
    ]


class btrfs_ioctl_get_subvol_rootref_args_rootref(ctypes.Structure):
    """The anonymous element struct of ``btrfs_ioctl_get_subvol_rootref_args.rootref``."""

    _fields_ = [
        ("treeid", ctypes.c_uint64),
        ("dirid", ctypes.c_uint64),
    ]


class btrfs_ioctl_get_subvol_rootref_args(ctypes.Structure):
    """``struct btrfs_ioctl_get_subvol_rootref_args`` (linux/btrfs.h).

    The ioctl fails with EOVERFLOW when more refs remain than fit in
    ``rootref``.  It has then filled the array and set ``min_treeid``, so
    calling it again continues the listing.
    """

    _fields_ = [
        ("min_treeid", ctypes.c_uint64),
        ("rootref", btrfs_ioctl_get_subvol_rootref_args_rootref * BTRFS_MAX_ROOTREF_BUFFER_NUM),
        ("num_items", ctypes.c_uint8),
        ("align", ctypes.c_uint8 * 7),
    ]


# -- On-disk items: linux/btrfs_tree.h (packed, little-endian) --------------------


class btrfs_disk_key(ctypes.LittleEndianStructure):
    """``struct btrfs_disk_key`` (linux/btrfs_tree.h), 17 bytes."""

    _pack_ = 1
    _fields_ = [
        ("objectid", ctypes.c_uint64),
        ("type", ctypes.c_uint8),
        ("offset", ctypes.c_uint64),
    ]


class btrfs_timespec(ctypes.LittleEndianStructure):
    """``struct btrfs_timespec`` (linux/btrfs_tree.h), 12 bytes."""

    _pack_ = 1
    _fields_ = [
        ("sec", ctypes.c_uint64),
        ("nsec", ctypes.c_uint32),
    ]


class btrfs_inode_item(ctypes.LittleEndianStructure):
    """``struct btrfs_inode_item`` (linux/btrfs_tree.h), 160 bytes."""

    _pack_ = 1
    _fields_ = [
        ("generation", ctypes.c_uint64),
        ("transid", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("block_group", ctypes.c_uint64),
        ("nlink", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("rdev", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("sequence", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 4),
        ("atime", btrfs_timespec),
        ("ctime", btrfs_timespec),
        ("mtime", btrfs_timespec),
        ("otime", btrfs_timespec),
    ]


class btrfs_inode_ref(ctypes.LittleEndianStructure):
    """``struct btrfs_inode_ref`` (linux/btrfs_tree.h); ``name_len`` bytes of name follow."""

    _pack_ = 1
    _fields_ = [
        ("index", ctypes.c_uint64),
        ("name_len", ctypes.c_uint16),
    ]


class btrfs_inode_extref(ctypes.LittleEndianStructure):
    """``struct btrfs_inode_extref`` (linux/btrfs_tree.h); ``name_len`` bytes of name follow."""

    _pack_ = 1
    _fields_ = [
        ("parent_objectid", ctypes.c_uint64),
        ("index", ctypes.c_uint64),
        ("name_len", ctypes.c_uint16),
    ]


class btrfs_dir_item(ctypes.LittleEndianStructure):
    """``struct btrfs_dir_item`` (linux/btrfs_tree.h).

    ``name_len`` bytes of name and then ``data_len`` bytes of data (an xattr
    value) follow. One DIR_ITEM can hold several entries whose names hash
    alike, one after the other.
    """

    _pack_ = 1
    _fields_ = [
        ("location", btrfs_disk_key),
        ("transid", ctypes.c_uint64),
        ("data_len", ctypes.c_uint16),
        ("name_len", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
    ]


class btrfs_root_item(ctypes.LittleEndianStructure):
    """``struct btrfs_root_item`` (linux/btrfs_tree.h), 439 bytes.

    A root item written by a kernel older than Linux 3.6 ends before
    ``generation_v2`` (``btrfs_legacy_root_item_size()`` bytes), and the
    kernel returns it at that length. A decoder must accept a short item,
    for example by zero-padding it to ``sizeof``, and must trust the fields
    from ``generation_v2`` on only when ``generation_v2 == generation``.
    """

    _pack_ = 1
    _fields_ = [
        ("inode", btrfs_inode_item),
        ("generation", ctypes.c_uint64),
        ("root_dirid", ctypes.c_uint64),
        ("bytenr", ctypes.c_uint64),
        ("byte_limit", ctypes.c_uint64),
        ("bytes_used", ctypes.c_uint64),
        ("last_snapshot", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("refs", ctypes.c_uint32),
        ("drop_progress", btrfs_disk_key),
        ("drop_level", ctypes.c_uint8),
        ("level", ctypes.c_uint8),
        ("generation_v2", ctypes.c_uint64),
        ("uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("parent_uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("received_uuid", ctypes.c_uint8 * BTRFS_UUID_SIZE),
        ("ctransid", ctypes.c_uint64),
        ("otransid", ctypes.c_uint64),
        ("stransid", ctypes.c_uint64),
        ("rtransid", ctypes.c_uint64),
        ("ctime", btrfs_timespec),
        ("otime", btrfs_timespec),
        ("stime", btrfs_timespec),
        ("rtime", btrfs_timespec),
        ("reserved", ctypes.c_uint64 * 8),
    ]


def btrfs_legacy_root_item_size() -> int:
    """Return the size of a root item in the pre-3.6 format (``btrfs_legacy_root_item_size``)."""
    return int(btrfs_root_item.generation_v2.offset)


class btrfs_root_ref(ctypes.LittleEndianStructure):
    """``struct btrfs_root_ref`` (linux/btrfs_tree.h), the data of ROOT_REF and ROOT_BACKREF items.

    ``name_len`` bytes of the subvolume's name in its parent directory follow.
    """

    _pack_ = 1
    _fields_ = [
        ("dirid", ctypes.c_uint64),
        ("sequence", ctypes.c_uint64),
        ("name_len", ctypes.c_uint16),
    ]


class btrfs_qgroup_status_item(ctypes.LittleEndianStructure):
    """``struct btrfs_qgroup_status_item`` (linux/btrfs_tree.h), as of Linux 6.7.

    Linux 6.7 appended ``enable_gen``. Items written before that, or by a
    kernel that only writes it in simple quota mode, are 32 bytes long, so a
    decoder must accept an item shorter than ``sizeof``.
    """

    _pack_ = 1
    _fields_ = [
        ("version", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("rescan", ctypes.c_uint64),
        # Linux 6.7: generation at which simple quotas were enabled.
        ("enable_gen", ctypes.c_uint64),
    ]


class btrfs_qgroup_info_item(ctypes.LittleEndianStructure):
    """``struct btrfs_qgroup_info_item`` (linux/btrfs_tree.h)."""

    _pack_ = 1
    _fields_ = [
        ("generation", ctypes.c_uint64),
        ("rfer", ctypes.c_uint64),
        ("rfer_cmpr", ctypes.c_uint64),
        ("excl", ctypes.c_uint64),
        ("excl_cmpr", ctypes.c_uint64),
    ]


class btrfs_qgroup_limit_item(ctypes.LittleEndianStructure):
    """``struct btrfs_qgroup_limit_item`` (linux/btrfs_tree.h)."""

    _pack_ = 1
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("max_rfer", ctypes.c_uint64),
        ("max_excl", ctypes.c_uint64),
        ("rsv_rfer", ctypes.c_uint64),
        ("rsv_excl", ctypes.c_uint64),
    ]


# -- Request numbers -----------------------------------------------------------

# Name: (direction, type, nr, argument type), as in the _IO* macros of
# linux/btrfs.h and linux/fs.h. The argument type names a key of
# _native_sizes(), or is None for _IO.
_REQUESTS: dict[str, tuple[int, int | str, int, str | None]] = {
    "BTRFS_IOC_SNAP_CREATE": (_IOC_WRITE, BTRFS_IOCTL_MAGIC, 1, "btrfs_ioctl_vol_args"),
    "BTRFS_IOC_SYNC": (_IOC_NONE, BTRFS_IOCTL_MAGIC, 8, None),
    "BTRFS_IOC_SUBVOL_CREATE": (_IOC_WRITE, BTRFS_IOCTL_MAGIC, 14, "btrfs_ioctl_vol_args"),
    "BTRFS_IOC_SNAP_DESTROY": (_IOC_WRITE, BTRFS_IOCTL_MAGIC, 15, "btrfs_ioctl_vol_args"),
    "BTRFS_IOC_TREE_SEARCH": (
        _IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 17, "btrfs_ioctl_search_args",
    ),
    "BTRFS_IOC_TREE_SEARCH_V2": (
        _IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 17, "btrfs_ioctl_search_args_v2",
    ),
    "BTRFS_IOC_INO_LOOKUP": (
        _IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 18, "btrfs_ioctl_ino_lookup_args",
    ),
    "BTRFS_IOC_DEFAULT_SUBVOL": (_IOC_WRITE, BTRFS_IOCTL_MAGIC, 19, "__u64"),
    "BTRFS_IOC_SPACE_INFO": (
        _IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 20, "btrfs_ioctl_space_args",
    ),
    "BTRFS_IOC_START_SYNC": (_IOC_READ, BTRFS_IOCTL_MAGIC, 24, "__u64"),
    "BTRFS_IOC_WAIT_SYNC": (_IOC_WRITE, BTRFS_IOCTL_MAGIC, 22, "__u64"),
    "BTRFS_IOC_SNAP_CREATE_V2": (_IOC_WRITE, BTRFS_IOCTL_MAGIC, 23, "btrfs_ioctl_vol_args_v2"),
    "BTRFS_IOC_SUBVOL_CREATE_V2": (
        _IOC_WRITE, BTRFS_IOCTL_MAGIC, 24, "btrfs_ioctl_vol_args_v2",
    ),
    "BTRFS_IOC_SUBVOL_GETFLAGS": (_IOC_READ, BTRFS_IOCTL_MAGIC, 25, "__u64"),
    "BTRFS_IOC_SUBVOL_SETFLAGS": (_IOC_WRITE, BTRFS_IOCTL_MAGIC, 26, "__u64"),
    "BTRFS_IOC_FS_INFO": (_IOC_READ, BTRFS_IOCTL_MAGIC, 31, "btrfs_ioctl_fs_info_args"),
    "BTRFS_IOC_QUOTA_CTL": (
        _IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 40, "btrfs_ioctl_quota_ctl_args",
    ),
    "BTRFS_IOC_QGROUP_ASSIGN": (
        _IOC_WRITE, BTRFS_IOCTL_MAGIC, 41, "btrfs_ioctl_qgroup_assign_args",
    ),
    "BTRFS_IOC_QGROUP_CREATE": (
        _IOC_WRITE, BTRFS_IOCTL_MAGIC, 42, "btrfs_ioctl_qgroup_create_args",
    ),
    # _IOR, although userspace writes the argument: kept for ABI compatibility.
    "BTRFS_IOC_QGROUP_LIMIT": (
        _IOC_READ, BTRFS_IOCTL_MAGIC, 43, "btrfs_ioctl_qgroup_limit_args",
    ),
    "BTRFS_IOC_QUOTA_RESCAN": (
        _IOC_WRITE, BTRFS_IOCTL_MAGIC, 44, "btrfs_ioctl_quota_rescan_args",
    ),
    "BTRFS_IOC_QUOTA_RESCAN_STATUS": (
        _IOC_READ, BTRFS_IOCTL_MAGIC, 45, "btrfs_ioctl_quota_rescan_args",
    ),
    "BTRFS_IOC_QUOTA_RESCAN_WAIT": (_IOC_NONE, BTRFS_IOCTL_MAGIC, 46, None),
    "BTRFS_IOC_GET_SUBVOL_INFO": (
        _IOC_READ, BTRFS_IOCTL_MAGIC, 60, "btrfs_ioctl_get_subvol_info_args",
    ),
    "BTRFS_IOC_GET_SUBVOL_ROOTREF": (
        _IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 61, "btrfs_ioctl_get_subvol_rootref_args",
    ),
    "BTRFS_IOC_INO_LOOKUP_USER": (
        _IOC_READ | _IOC_WRITE, BTRFS_IOCTL_MAGIC, 62, "btrfs_ioctl_ino_lookup_user_args",
    ),
    "BTRFS_IOC_SNAP_DESTROY_V2": (
        _IOC_WRITE, BTRFS_IOCTL_MAGIC, 63, "btrfs_ioctl_vol_args_v2",
    ),
    # linux/fs.h declares the argument as long, so its size differs by ABI,
    # but the kernel reads and writes an int on every ABI.
    "FS_IOC_GETFLAGS": (_IOC_READ, "f", 1, "long"),
    "FS_IOC_SETFLAGS": (_IOC_WRITE, "f", 2, "long"),
    # linux/fs.h spells the type 0x94, the btrfs ioctl type. The argument is
    # the source file descriptor, passed by value.
    "FICLONE": (_IOC_WRITE, 0x94, 9, "int"),
}


def _native_sizes() -> dict[str, int]:
    """Return the size of each argument type in ``_REQUESTS`` on this ABI."""
    types: dict[str, Any] = {"__u64": ctypes.c_uint64, "long": ctypes.c_long, "int": ctypes.c_int}
    for _, _, _, type_name in _REQUESTS.values():
        if type_name is not None and type_name not in types:
            types[type_name] = globals()[type_name]
    return {name: ctypes.sizeof(ctype) for name, ctype in types.items()}


def request_numbers(
    machine: str | None = None, sizes: dict[str, int] | None = None
) -> dict[str, int]:
    """Compute every ``BTRFS_IOC_*``, ``FS_IOC_*`` and ``FICLONE`` request number for a machine.

    ``machine`` is a ``platform.machine()`` name and defaults to this one.
    ``sizes`` maps each argument type name (a struct name such as
    ``"btrfs_ioctl_vol_args"``, ``"__u64"``, ``"long"`` or ``"int"``) to its size in
    bytes on that machine's ABI. It defaults to this interpreter's ctypes
    sizes, which are right only for the running ABI, so pass the sizes a
    cross compiler reports when encoding for another machine.
    Raises UnknownMachineError for a machine with no known encoding.
    """
    if sizes is None:
        sizes = _native_sizes()
    needed = {type_name for _, _, _, type_name in _REQUESTS.values() if type_name}
    missing = sorted(needed - set(sizes))
    if missing:
        raise ValueError(f"sizes is missing the argument types {missing}")

    numbers = {}
    for name, (direction, ioc_type, nr, type_name) in _REQUESTS.items():
        size = 0 if type_name is None else sizes[type_name]
        numbers[name] = _IOC(direction, ioc_type, nr, size, machine=machine)
    return numbers


@functools.lru_cache(None)
def _native_request_numbers() -> dict[str, int]:
    return request_numbers()


def request_number(name: str, machine: str | None = None) -> int:
    """Return one request number, such as ``"BTRFS_IOC_SYNC"``, for this ABI.

    ``machine`` only changes the encoding, not the argument sizes, so use
    ``request_numbers`` with ``sizes`` for another ABI.
    """
    if name not in _REQUESTS:
        raise KeyError(f"unknown request name {name!r}")
    if machine is None:
        return _native_request_numbers()[name]
    return request_numbers(machine)[name]


def __getattr__(name: str) -> int:
    # PEP 562: computes request numbers on first access, so that importing
    # this module works on a machine with no known ioctl encoding.
    if name in _REQUESTS:
        value = _native_request_numbers()[name]
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_REQUESTS))


__all__ = [
    name
    for name in list(globals()) + list(_REQUESTS)
    if name.startswith(("BTRFS_", "FS_", "FICLONE", "btrfs_", "IOC_"))
] + [
    "ADDED_AFTER_PORTED_HEADERS",
    "IocEncoding",
    "PORTED_HEADERS_VERSION",
    "UnknownMachineError",
    "_IO",
    "_IOC",
    "_IOC_NONE",
    "_IOC_READ",
    "_IOC_WRITE",
    "_IOR",
    "_IOW",
    "_IOWR",
    "ioc_encoding",
    "request_number",
    "request_numbers",
]
