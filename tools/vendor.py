"""Write the single-file btrfsdrv: btrfsdrv.py with ioctl_structs.py inlined.

The output is btrfsdrv.py with the block between the lines
``# tools/vendor.py replaces the lines from here to "end of ioctl_structs"``
and ``# end of ioctl_structs`` replaced by the body of ioctl_structs.py, so
that a program can copy one file.  Everything else is kept byte for byte,
except for these changes:

- a comment header naming the btrfsdrv version and the kernel headers that
  ioctl_structs was ported from goes before btrfsdrv's docstring;
- ``from __future__ import annotations`` moves to just after that docstring,
  because Python accepts it only there;
- ioctl_structs's docstring becomes a comment, and its ``__all__`` is renamed
  ``_IOCTL_STRUCTS_ALL`` so that btrfsdrv's ``__all__`` stays the public one;
- ``_structs``, through which btrfsdrv reads request numbers, becomes the
  module itself, so that ioctl_structs's module ``__getattr__`` still
  computes them on first use.

The output depends only on the two input files, so it is reproducible.
Usage: python3 tools/vendor.py --output dist/btrfsdrv.py
"""

import argparse
import ast
import os
import re
import sys
import tempfile
from typing import List, Set, Tuple

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK_START = '# tools/vendor.py replaces the lines from here to "end of ioctl_structs"'
BLOCK_END = "# end of ioctl_structs"
FUTURE_ANNOTATIONS = "from __future__ import annotations"
STRUCTS_ALL = "_IOCTL_STRUCTS_ALL"


class VendorError(Exception):
    """An input file does not have the shape this script relies on."""


def read_source(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as source_file:
        text = source_file.read()
    if "\r" in text:
        raise VendorError(f"{path}: uses CR line endings; convert it to LF")
    return text


def docstring_end(tree: ast.Module, path: str) -> int:
    """Return the number of the last line of the module docstring."""
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        raise VendorError(f"{path}: the module has no docstring")
    if first.lineno != 1 or first.end_lineno is None:
        raise VendorError(f"{path}: the docstring must start on line 1")
    return first.end_lineno


def literal_assignment(tree: ast.Module, name: str, path: str) -> str:
    """Return the string assigned to a module-level name."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name):
            value = ast.literal_eval(node.value)
            if isinstance(value, str):
                return value
    raise VendorError(f"{path}: no module-level string assignment to {name}")


def defined_names(tree: ast.Module) -> Set[str]:
    """Return the names that module-level definitions and assignments bind."""
    names: Set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for child in ast.walk(target):
                    if isinstance(child, ast.Name):
                        names.add(child.id)
    return names


def check_future_imports(tree: ast.Module, path: str) -> List[int]:
    """Return the line numbers of ``from __future__ import annotations``.

    Raise VendorError for any other __future__ import, which this script
    would have to merge by hand.
    """
    lines = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            if [alias.name for alias in node.names] != ["annotations"] or node.lineno != node.end_lineno:
                raise VendorError(f"{path}:{node.lineno}: only '{FUTURE_ANNOTATIONS}' on one line is supported")
            lines.append(node.lineno)
    return lines


def find_block(lines: List[str], path: str) -> Tuple[int, int]:
    """Return the 0-based indexes of the first and last line of the import block."""
    starts = [index for index, line in enumerate(lines) if line.startswith(BLOCK_START)]
    ends = [index for index, line in enumerate(lines) if line.rstrip("\n") == BLOCK_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise VendorError(
            f"{path}: expected one line starting with {BLOCK_START!r} followed by one "
            f"line {BLOCK_END!r}, found {len(starts)} and {len(ends)}"
        )
    return starts[0], ends[0]


def check_block(tree: ast.Module, first: int, last: int, structs_names: Set[str], path: str) -> None:
    """Check that the block only imports ioctl_structs and that no other line does.

    first and last are 1-based line numbers.  Every name that the block
    imports must be defined by ioctl_structs, or the vendored module would
    fail with NameError where it uses it.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        inside = first <= node.lineno <= last
        if "ioctl_structs" in modules and not inside:
            raise VendorError(f"{path}:{node.lineno}: imports ioctl_structs outside the vendored block")
        if not inside:
            continue
        if isinstance(node, ast.Import):
            if [(alias.name, alias.asname) for alias in node.names] != [("ioctl_structs", "_structs")]:
                raise VendorError(f"{path}:{node.lineno}: the block may only 'import ioctl_structs as _structs'")
        elif node.module != "ioctl_structs":
            raise VendorError(f"{path}:{node.lineno}: the block may only import from ioctl_structs")
        else:
            missing = sorted(alias.name for alias in node.names if alias.name not in structs_names)
            if missing:
                raise VendorError(f"{path}:{node.lineno}: ioctl_structs does not define {missing}")
    statements = [node for node in tree.body if first <= node.lineno <= last]
    if any(not isinstance(node, (ast.Import, ast.ImportFrom)) for node in statements):
        raise VendorError(f"{path}: the block between lines {first} and {last} may only contain imports")


def check_top_level(tree: ast.Module, path: str) -> None:
    """Check that btrfsdrv imports sys at module level, which ``sys.modules[__name__]`` needs."""
    if not any(isinstance(node, ast.Import) and any(alias.name == "sys" and alias.asname is None
                                                   for alias in node.names)
               for node in tree.body):
        raise VendorError(f"{path}: the vendored module needs a module-level 'import sys'")


def ported_headers(docstring: str) -> List[str]:
    """Return the kernel header names in ioctl_structs's docstring, in order."""
    headers: List[str] = []
    for header in re.findall(r"linux/[A-Za-z0-9_]+\.h", docstring):
        if header not in headers:
            headers.append(header)
    return headers


def comment_lines(text: str) -> List[str]:
    """Turn text into comment lines without trailing whitespace."""
    return [f"# {line}".rstrip() + "\n" for line in text.splitlines()]


def wrap_comment(text: str, width: int = 76) -> List[str]:
    """Wrap one paragraph into comment lines of at most width characters."""
    lines: List[str] = []
    current = "#"
    for word in text.split():
        if len(current) + 1 + len(word) > width and current != "#":
            lines.append(current + "\n")
            current = "#"
        current = f"{current} {word}"
    lines.append(current + "\n")
    return lines


def structs_body(structs_source: str, path: str) -> Tuple[List[str], str, List[str], Set[str]]:
    """Return ioctl_structs as lines to inline, its headers version, header names and names.

    The docstring becomes a comment, the __future__ import goes (the
    vendored file has it at the top) and ``__all__`` is renamed.
    """
    tree = ast.parse(structs_source, path)
    lines = structs_source.splitlines(keepends=True)
    end = docstring_end(tree, path)
    docstring = ast.get_docstring(tree, clean=True) or ""
    future_lines = set(check_future_imports(tree, path))

    all_nodes = [node for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets)]
    if not ported_headers(docstring):
        raise VendorError(f"{path}: the docstring names no linux/*.h header it was ported from")
    if any(not lines[node.lineno - 1].startswith("__all__ = ") for node in all_nodes):
        raise VendorError(f"{path}: __all__ must be assigned as '__all__ = ...' at the start of a line")
    all_lines = {node.lineno for node in all_nodes}
    if STRUCTS_ALL in defined_names(tree):
        raise VendorError(f"{path}: already defines {STRUCTS_ALL}, the name __all__ is renamed to")

    body = comment_lines(docstring)
    for number, line in enumerate(lines[end:], start=end + 1):
        if number in future_lines:
            continue
        if number in all_lines:
            line = STRUCTS_ALL + line[len("__all__"):]
        body.append(line)
    version = literal_assignment(tree, "PORTED_HEADERS_VERSION", path)
    return body, version, ported_headers(docstring), defined_names(tree) - {"__all__"}


def vendor(driver_path: str, structs_path: str) -> str:
    """Return the text of the single-file module."""
    driver_source = read_source(driver_path)
    structs_source = read_source(structs_path)
    driver_tree = ast.parse(driver_source, driver_path)
    driver_lines = driver_source.splitlines(keepends=True)

    body, headers_version, headers, structs_names = structs_body(structs_source, structs_path)
    structs_tree = ast.parse(structs_source, structs_path)
    importable = structs_names | {
        alias.asname or alias.name for node in structs_tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names
    }

    first, last = find_block(driver_lines, driver_path)
    check_block(driver_tree, first + 1, last + 1, importable, driver_path)
    check_top_level(driver_tree, driver_path)
    clashes = sorted((defined_names(driver_tree) & structs_names) - {"__all__"})
    if clashes:
        raise VendorError(
            f"{driver_path}: defines {clashes}, which ioctl_structs defines too; the vendored "
            "module would overwrite them, so rename them"
        )

    version = literal_assignment(driver_tree, "__version__", driver_path)
    end = docstring_end(driver_tree, driver_path)
    future_lines = set(check_future_imports(driver_tree, driver_path))

    output = wrap_comment(
        f"btrfsdrv {version}, single-file build made by tools/vendor.py from btrfsdrv.py "
        "and ioctl_structs.py: edit those, not this file."
    )
    output += wrap_comment(
        f"The kernel interface is ported from the Linux {headers_version} UAPI headers "
        f"{', '.join(headers[:-1])} and {headers[-1]}."
    )
    output += driver_lines[:end]
    output.append(FUTURE_ANNOTATIONS + "\n")
    for index in range(end, first):
        if index + 1 not in future_lines:
            output.append(driver_lines[index])
    output.append("# -- Kernel interface: ioctl_structs.py, inlined by tools/vendor.py " + "-" * 10 + "\n")
    output += body
    output.append("\n")
    output.append("# btrfsdrv reads request numbers as _structs.NAME, which goes through the\n")
    output.append("# module __getattr__ above and so computes them on first use.\n")
    output.append("_structs = sys.modules[__name__]\n")
    output.append("# -- End of ioctl_structs.py " + "-" * 50 + "\n")
    for index in range(last + 1, len(driver_lines)):
        if index + 1 not in future_lines:
            output.append(driver_lines[index])
    return "".join(output)


def write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".vendor.", suffix=".tmp", dir=directory)
    try:
        with open(fd, "w", encoding="utf-8", newline="\n") as output:
            output.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description="Write btrfsdrv.py with ioctl_structs.py inlined.")
    parser.add_argument("--output", required=True, help="path of the single file to write")
    parser.add_argument("--source", default=REPOSITORY,
                        help="directory with btrfsdrv.py and ioctl_structs.py (default: this repository)")
    args = parser.parse_args()
    try:
        text = vendor(os.path.join(args.source, "btrfsdrv.py"), os.path.join(args.source, "ioctl_structs.py"))
        compile(text, args.output, "exec")
    except (VendorError, SyntaxError) as error:
        print(f"vendor.py: {error}", file=sys.stderr)
        return 1
    write_atomically(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
