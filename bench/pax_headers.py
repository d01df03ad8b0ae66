"""Measure the CPU time that apply_diff spends on large PAX headers.

Run from the repository root (root is not needed, the layer is a plain
temporary directory):

    python3 bench/pax_headers.py                      # this checkout
    python3 bench/pax_headers.py --module-dir OTHER   # the btrfsdrv.py of another checkout

Each shape is an xz-compressed tar of --entries empty files, each behind a
PAX header of about 1 MiB:

- digit-runs: a comment record whose value repeats 64 digits and an "x",
  and a GNU.sparse.size record.
- short-records: records of one-byte keywords and values ("6 a=b\\n").

apply_layer_diff runs --rounds times on each tar, and the median CPU time
of the process (time.process_time) is printed as one JSON object per shape,
with the CPU seconds per MiB of PAX header data.
"""

import argparse
import io
import json
import lzma
import os
import statistics
import sys
import tarfile
import tempfile
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024**2


def pax_record(key, value):
    """Return the PAX record of key and value, with the length that counts its own digits."""
    record = b" " + key + b"=" + value + b"\n"
    length = len(record) + len(str(len(record)))
    length += len(str(length)) - len(str(len(record)))
    return str(length).encode() + record


def digit_runs_body():
    return pax_record(b"comment", (b"1" * 64 + b"x") * 16000) + pax_record(b"GNU.sparse.size", b"0")


def short_records_body():
    return pax_record(b"a", b"b") * (MIB // len(pax_record(b"a", b"b")))


SHAPES = {"digit-runs": digit_runs_body, "short-records": short_records_body}


def pax_tar(body, entries):
    """Return an uncompressed tar of entries empty files f0, f1, ..., each behind a PAX header of body."""
    parts = []
    for index in range(entries):
        header = tarfile.TarInfo("././@PaxHeader")
        header.type = tarfile.XHDTYPE
        header.size = len(body)
        member = tarfile.TarInfo(f"f{index}")
        parts += [header.tobuf(tarfile.USTAR_FORMAT), body, b"\0" * (-len(body) % 512),
                  member.tobuf(tarfile.USTAR_FORMAT)]
    parts.append(b"\0" * 1024)
    return b"".join(parts)


def cpu_seconds(btrfsdrv, compressed, work):
    """Return the CPU time of one apply_layer_diff of compressed into a new directory below work."""
    layer = tempfile.mkdtemp(dir=work)
    start = time.process_time()
    btrfsdrv.apply_layer_diff(layer, io.BytesIO(compressed))
    return time.process_time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module-dir", default=REPOSITORY,
                        help="directory whose btrfsdrv.py is measured (default: this checkout)")
    parser.add_argument("--entries", type=int, default=100, help="entries, each with one PAX header (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="measured applies per shape (default 3)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.module_dir))
    import btrfsdrv

    with tempfile.TemporaryDirectory() as work:
        for shape, make_body in SHAPES.items():
            body = make_body()
            compressed = lzma.compress(pax_tar(body, args.entries))
            samples = [cpu_seconds(btrfsdrv, compressed, work) for _ in range(args.rounds)]
            median = statistics.median(samples)
            header_mib = len(body) * args.entries / MIB
            print(json.dumps({"shape": shape, "module": os.path.abspath(btrfsdrv.__file__),
                              "python": sys.version.split()[0], "entries": args.entries,
                              "header_mib": round(header_mib, 1), "xz_bytes": len(compressed),
                              "cpu_s": round(median, 3), "cpu_s_per_mib": round(median / header_mib, 5)}),
                  flush=True)


if __name__ == "__main__":
    main()
