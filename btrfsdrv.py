"""btrfs layer store for container tooling (placeholder while the driver is written)."""

__version__ = "0.1.0"


def _unescape_mountinfo(field: bytes) -> bytes:
    """Decode the octal escapes (\\040 for a space) that /proc/self/mountinfo uses."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out += field[i:i + 1]
            i += 1
    return bytes(out)
