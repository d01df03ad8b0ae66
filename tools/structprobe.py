#!/usr/bin/env python3
"""Measure the btrfs UAPI with a C compiler, for comparison with ioctl_structs.

The probe is a C file generated from ioctl_structs itself: for every
structure it records sizeof and the offsetof of every field, and it records
the value of every constant and request number the module defines. Each
constant is guarded by #ifdef, so names newer than the installed headers are
reported as absent rather than breaking the build.

The values go into one global array of unsigned long long. For the host the
probe is built with a main() that prints the array, and run. For another
architecture it is only compiled (``-c``), never run, and the array is read
from the object file's ELF symbol table, in that target's byte order.

Usage:
    structprobe.py [--cc CC] [--output FILE]   probe the host, print JSON
    structprobe.py --cross [--output FILE]     probe every installed cross compiler
    structprobe.py --table [--output FILE]     both, keyed by machine (struct_table.json)
    structprobe.py --list-cross-packages       print the Debian cross compiler packages
"""

import argparse
import ctypes
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ioctl_structs  # noqa: E402

ARRAY_SYMBOL = "btrfsdrv_probe"
ARRAY_MAGIC = 0x62747266_70726F62  # "btrfprob"

HEADERS = (
    "linux/version.h",
    "linux/magic.h",
    "linux/fs.h",
    "linux/btrfs.h",
    "linux/btrfs_tree.h",
)


class CrossTarget:
    """A Debian cross compiler and the platform.machine() name of its target."""

    def __init__(self, machine, compiler, package, required):
        self.machine = machine
        self.compiler = compiler
        self.package = package
        self.required = required

    def __repr__(self):
        return f"CrossTarget({self.machine!r}, {self.compiler!r})"


# The required targets cover the generic 32-bit i386 layout and the
# powerpc, mips, sparc and parisc encodings. The optional ones add alpha and
# more generic ABIs.
CROSS_TARGETS = (
    CrossTarget("i686", "i686-linux-gnu-gcc", "gcc-i686-linux-gnu", True),
    CrossTarget("ppc64le", "powerpc64le-linux-gnu-gcc", "gcc-powerpc64le-linux-gnu", True),
    CrossTarget("mips64", "mips64el-linux-gnuabi64-gcc", "gcc-mips64el-linux-gnuabi64", True),
    CrossTarget("sparc64", "sparc64-linux-gnu-gcc", "gcc-sparc64-linux-gnu", True),
    CrossTarget("parisc", "hppa-linux-gnu-gcc", "gcc-hppa-linux-gnu", True),
    CrossTarget("aarch64", "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", False),
    CrossTarget("s390x", "s390x-linux-gnu-gcc", "gcc-s390x-linux-gnu", False),
    CrossTarget("armv7l", "arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf", False),
    CrossTarget("alpha", "alpha-linux-gnu-gcc", "gcc-alpha-linux-gnu", False),
)

# Fields newer than the headers that the module was ported from, and a macro
# that the same kernel release added, so the probe can tell if the field exists.
FIELD_GUARDS = {
    "btrfs_qgroup_status_item.enable_gen": "BTRFS_QGROUP_STATUS_FLAG_SIMPLE_MODE",
}

# Structures with a C flexible array member: the module's class leaves the
# member out and a factory adds it.
FLEXIBLE_ARRAYS = {
    "btrfs_qgroup_inherit": ("qgroups", "btrfs_qgroup_inherit_with"),
    "btrfs_ioctl_search_args_v2": ("buf", "btrfs_ioctl_search_args_v2_with"),
    "btrfs_ioctl_space_args": ("spaces", "btrfs_ioctl_space_args_with"),
}

# Module classes for anonymous C structs, with a C expression for their type.
ANONYMOUS_TYPES = {
    "btrfs_ioctl_get_subvol_rootref_args_rootref":
        "__typeof__(((struct btrfs_ioctl_get_subvol_rootref_args *)0)->rootref[0])",
}

# C types of request arguments that are not structures.
SCALAR_TYPES = {"__u64": "__u64", "long": "long", "int": "int"}


# -- What the module defines ----------------------------------------------------


def public_names(module):
    """Return the kernel-interface names of module, also where btrfsdrv inlines it."""
    return getattr(module, "_IOCTL_STRUCTS_ALL", None) or module.__all__


def module_structures(module=ioctl_structs):
    """Return {name: class} for every public btrfs structure in the module."""
    structures = {}
    for name in public_names(module):
        value = getattr(module, name)
        if isinstance(value, type) and issubclass(value, (ctypes.Structure, ctypes.Union)):
            structures[name] = value
    return structures


def structure_fields(cls):
    """Return the field names of a structure, with anonymous members flattened."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    names = []
    for field in cls._fields_:
        name, field_type = field[0], field[1]
        if name in anonymous:
            names.extend(structure_fields(field_type))
        else:
            names.append(name)
    return names


def module_constants(module=ioctl_structs):
    """Return {name: value} for every public integer constant, request numbers included."""
    constants = {}
    for name in public_names(module):
        if name.startswith(("BTRFS_", "FS_")) or name == "FICLONE":
            value = getattr(module, name)
            if isinstance(value, int):
                constants[name] = value
    return constants


def module_values(module=ioctl_structs):
    """Return {probe key: value} as the module computes it for the running ABI."""
    values = {}
    for name, cls in module_structures(module).items():
        values[f"sizeof:{name}"] = ctypes.sizeof(cls)
        for field in structure_fields(cls):
            values[f"offsetof:{name}.{field}"] = getattr(cls, field).offset
    for name, (member, factory) in FLEXIBLE_ARRAYS.items():
        values[f"offsetof:{name}.{member}"] = getattr(getattr(module, factory)(1), member).offset
    values["sizeof:__u64"] = ctypes.sizeof(ctypes.c_uint64)
    values["sizeof:long"] = ctypes.sizeof(ctypes.c_long)
    values["sizeof:int"] = ctypes.sizeof(ctypes.c_int)
    for name, value in module_constants(module).items():
        values[f"const:{name}"] = value
    return values


# -- The C probe ------------------------------------------------------------------


def probe_entries(module=ioctl_structs):
    """Return (key, C expression, guard macro or None) for everything to measure."""
    entries = [("const:LINUX_VERSION_CODE", "LINUX_VERSION_CODE", "LINUX_VERSION_CODE")]
    for name, cls in module_structures(module).items():
        c_type = ANONYMOUS_TYPES.get(name, f"struct {name}")
        entries.append((f"sizeof:{name}", f"sizeof({c_type})", None))
        for field in structure_fields(cls):
            key = f"{name}.{field}"
            entries.append((f"offsetof:{key}", f"offsetof({c_type}, {field})", FIELD_GUARDS.get(key)))
    for name, (member, _) in FLEXIBLE_ARRAYS.items():
        entries.append((f"offsetof:{name}.{member}", f"offsetof(struct {name}, {member})", None))
    for name, c_type in SCALAR_TYPES.items():
        entries.append((f"sizeof:{name}", f"sizeof({c_type})", None))
    for name in module_constants(module):
        entries.append((f"const:{name}", name, name))
    return entries


def generate_source(entries):
    """Return the C source of the probe for the given entries."""
    lines = ["#include <stddef.h>"]
    lines += [f"#include <{header}>" for header in HEADERS]
    lines += [
        "",
        f"const unsigned long long {ARRAY_SYMBOL}[] = {{",
        f"\t{ARRAY_MAGIC:#x}ULL, {len(entries)}ULL,",
    ]
    for key, expression, guard in entries:
        lines.append(f"\t/* {key} */")
        value = f"\t1ULL, (unsigned long long)({expression}),"
        if guard is None:
            lines.append(value)
        else:
            lines += [f"#ifdef {guard}", value, "#else", "\t0ULL, 0ULL,", "#endif"]
    lines += [
        "};",
        "",
        "#ifdef PROBE_MAIN",
        "#include <stdio.h>",
        "int main(void)",
        "{",
        f"\tfor (size_t i = 0; i < sizeof({ARRAY_SYMBOL}) / sizeof({ARRAY_SYMBOL}[0]); i++)",
        f'\t\tprintf("%llu\\n", {ARRAY_SYMBOL}[i]);',
        "\treturn 0;",
        "}",
        "#endif",
        "",
    ]
    return "\n".join(lines)


def decode_array(numbers, entries):
    """Turn the probe array into {"values": {key: n}, "absent": [key, ...]}."""
    if len(numbers) < 2 or numbers[0] != ARRAY_MAGIC:
        raise ValueError("probe array does not start with the probe magic number")
    if numbers[1] != len(entries) or len(numbers) != 2 + 2 * len(entries):
        raise ValueError(
            f"probe array has {len(numbers)} numbers for {numbers[1]} entries, "
            f"expected {2 + 2 * len(entries)} for {len(entries)}"
        )
    values = {}
    absent = []
    for index, (key, _, _) in enumerate(entries):
        present, value = numbers[2 + 2 * index], numbers[3 + 2 * index]
        if present:
            values[key] = value
        else:
            absent.append(key)
    return {"values": values, "absent": absent}


def _compile(compiler, source, arguments, directory):
    source_path = os.path.join(directory, "structprobe.c")
    with open(source_path, "w") as source_file:
        source_file.write(source)
    result = subprocess.run(
        [compiler, "-std=gnu99", "-Wall", "-Werror", *arguments, source_path],
        check=False, cwd=directory, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{compiler} failed to compile the probe:\n{result.stderr}")


def compiler_version(compiler):
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[0]


def headers_version(values):
    code = values.get("const:LINUX_VERSION_CODE")
    if code is None:
        return None
    return f"{code >> 16}.{(code >> 8) & 0xFF}.{code & 0xFF}"


def probe_host(compiler="cc"):
    """Compile and run the probe with the host compiler and return its table."""
    entries = probe_entries()
    with tempfile.TemporaryDirectory(prefix="structprobe-") as directory:
        executable = os.path.join(directory, "structprobe")
        _compile(compiler, generate_source(entries), ["-DPROBE_MAIN", "-o", executable], directory)
        output = subprocess.run([executable], capture_output=True, text=True, check=True).stdout
    table = decode_array([int(line) for line in output.split()], entries)
    table.update(
        machine=platform.machine(),
        compiler=compiler_version(compiler),
        headers=headers_version(table["values"]),
        method="compiled and run on the host",
    )
    return table


# -- Reading a cross-compiled object ------------------------------------------------


def read_elf_symbol(data, symbol):
    """Return (bytes, byte order) of a defined symbol in an ELF relocatable object."""
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    elf_class, elf_data = data[4], data[5]
    order = {1: "<", 2: ">"}[elf_data]
    if elf_class == 2:
        (section_offset,) = struct.unpack_from(order + "Q", data, 0x28)
        entry_size, count, _ = struct.unpack_from(order + "HHH", data, 0x3A)
        section_format, symbol_format = "IIQQQQIIQQ", "IBBHQQ"
    elif elf_class == 1:
        (section_offset,) = struct.unpack_from(order + "I", data, 0x20)
        entry_size, count, _ = struct.unpack_from(order + "HHH", data, 0x2E)
        section_format, symbol_format = "IIIIIIIIII", "IIIBBH"
    else:
        raise ValueError(f"unknown ELF class {elf_class}")

    sections = [
        struct.unpack_from(order + section_format, data, section_offset + i * entry_size)
        for i in range(count)
    ]
    # Section header fields: name, type, flags, addr, offset, size, link, ...
    symbol_tables = [section for section in sections if section[1] == 2]  # SHT_SYMTAB
    if not symbol_tables:
        raise ValueError("ELF object has no symbol table")
    table = symbol_tables[0]
    strings = sections[table[6]]
    symbol_size = struct.calcsize(order + symbol_format)
    for offset in range(table[4], table[4] + table[5], symbol_size):
        fields = struct.unpack_from(order + symbol_format, data, offset)
        if elf_class == 2:
            name_offset, _, _, section_index, value, size = fields
        else:
            name_offset, value, size, _, _, section_index = fields
        name_start = strings[4] + name_offset
        name = data[name_start:data.index(b"\0", name_start)].decode()
        if name == symbol and 0 < section_index < len(sections):
            start = sections[section_index][4] + value
            return data[start:start + size], order
    raise ValueError(f"symbol {symbol!r} not found in the ELF object")


def probe_object(compiler):
    """Compile the probe to an object file with ``compiler`` (never run) and return its table."""
    entries = probe_entries()
    with tempfile.TemporaryDirectory(prefix="structprobe-") as directory:
        object_path = os.path.join(directory, "structprobe.o")
        _compile(compiler, generate_source(entries), ["-c", "-o", object_path], directory)
        with open(object_path, "rb") as object_file:
            data = object_file.read()
    raw, order = read_elf_symbol(data, ARRAY_SYMBOL)
    numbers = list(struct.unpack(f"{order}{len(raw) // 8}Q", raw))
    table = decode_array(numbers, entries)
    table.update(
        compiler=compiler_version(compiler),
        headers=headers_version(table["values"]),
        method="compiled to an ELF object, not run",
    )
    return table


def argument_sizes(table):
    """Return the request argument sizes in a probe table, keyed as request_numbers() expects."""
    return {
        key[len("sizeof:"):]: value
        for key, value in table["values"].items()
        if key.startswith("sizeof:")
    }


def probe_cross_targets():
    """Probe every installed cross compiler; return {machine: table}."""
    tables = {}
    for target in CROSS_TARGETS:
        if shutil.which(target.compiler):
            table = probe_object(target.compiler)
            table["machine"] = target.machine
            tables[target.machine] = table
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", default="cc", help="host C compiler (default: cc)")
    parser.add_argument("--output", help="write the JSON here instead of standard output")
    parser.add_argument("--cross", action="store_true", help="probe the installed cross compilers")
    parser.add_argument(
        "--table", action="store_true",
        help="probe the host and the installed cross compilers, keyed by machine",
    )
    parser.add_argument(
        "--list-cross-packages", action="store_true",
        help="print the Debian packages of the cross compilers, one per line",
    )
    arguments = parser.parse_args(argv)

    if arguments.list_cross_packages:
        print("\n".join(target.package for target in CROSS_TARGETS))
        return 0
    if arguments.table:
        result = probe_cross_targets()
        result[platform.machine()] = probe_host(arguments.cc)
    elif arguments.cross:
        result = probe_cross_targets()
    else:
        result = probe_host(arguments.cc)
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if arguments.output:
        with open(arguments.output, "w") as output:
            output.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
