"""Benchmarks of btrfsdrv against libbtrfsutil, the btrfs CLI and GNU tar.

Run as root, because every case makes its own loopback btrfs filesystems:

    make bench                                # every case
    make bench CASES=snapshot,remove QUICK=1  # a subset, with smaller sizes

Each case builds its data once, then runs the implementations it compares
in alternating order, one warm-up round and then --rounds measured rounds,
and reports the median of the rounds.  Between two measurements the
filesystem is synced and the deleted subvolumes are cleaned, so no
measurement pays for the previous one's background work.

libbtrfsutil's Python bindings run in BTRFSUTIL_PYTHON (Debian's
/usr/bin/python3, which python3-btrfsutil is built for) and time their loop
themselves, so interpreter start-up is not counted.

The table goes to standard output and, with the raw samples, to
bench/results.json.  Teardown unmounts only mounts at or below the mount
points the run made and detaches only the loop devices that losetup returned
for its own images.
"""

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH_DIR)
sys.path.insert(0, REPOSITORY)

import btrfsdrv  # noqa: E402

CASES = ("snapshot", "remove", "changes", "quota", "apply", "import", "memory")
GIB = 1024**3
MIB = 1024**2

# The Debian package whose data tarball the apply case extracts: about 1,400
# small text files (Perl modules), unlike the Python library's compiled files.
DEBIAN_PACKAGE = "perl-modules-5.36"


class Settings(NamedTuple):
    rounds: int
    warmup: int
    quick: bool
    btrfsutil_python: str
    cache_dir: str
    workdir: str


class Row(NamedTuple):
    """One implementation's result: median seconds over rounds, and per operation."""

    name: str
    median: float
    samples: List[float]
    operations: int
    detail: str = ""

    @property
    def per_operation(self) -> float:
        return self.median / self.operations


def paired_ratio(numerator: Row, denominator: Row) -> float:
    """Return the median of the per-round ratios of two rows measured in the same rounds.

    Both run back to back in every round, so a ratio within one round
    cancels drift that affects the whole round, such as other load on the
    machine or the filesystem's growing trees.  The median over the rounds
    then drops outliers.
    """
    return statistics.median(a / b for a, b in zip(numerator.samples, denominator.samples))


class Check(NamedTuple):
    """A target: measured ratio against the limit it must not exceed."""

    description: str
    ratio: float
    limit: float

    @property
    def met(self) -> bool:
        return self.ratio <= self.limit


class CaseResult(NamedTuple):
    rows: List[Row]
    checks: List[Check]
    notes: List[str]


# -- Loopback filesystems ------------------------------------------------------


def _mounts_at_or_below(directory: str) -> List[str]:
    """Return the mount points at or below directory, deepest first."""
    directory = os.path.realpath(directory)
    points = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            point = os.fsdecode(btrfsdrv._unescape_mountinfo(line.split()[4]))
            if point == directory or point.startswith(directory + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


class Loopback:
    """A btrfs filesystem in a sparse image, attached to a loop device and mounted."""

    def __init__(self, directory: str, size: int, mkfs_options: tuple = ()) -> None:
        self.directory = directory
        self.image = os.path.join(directory, "btrfs.img")
        self.mountpoint = os.path.join(directory, "mnt")
        self.device: Optional[str] = None
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.image, "wb") as image:
            image.truncate(size)
        _run(["mkfs.btrfs", "-q", "-f", *mkfs_options, self.image])
        self.device = _run(["losetup", "--find", "--show", self.image]).strip()
        try:
            _run(["mount", "-t", "btrfs", self.device, self.mountpoint])
        except BaseException:
            self.teardown()
            raise

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def settle(self) -> None:
        """Commit the transaction, wait until deleted subvolumes are cleaned, and commit that."""
        _run(["btrfs", "filesystem", "sync", self.mountpoint])
        _run(["btrfs", "subvolume", "sync", self.mountpoint])
        _run(["btrfs", "filesystem", "sync", self.mountpoint])

    def teardown(self) -> None:
        for point in _mounts_at_or_below(self.mountpoint):
            subprocess.run(["umount", point], check=False, capture_output=True)
        for point in _mounts_at_or_below(self.mountpoint):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False, capture_output=True)
            self.device = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image)


@contextlib.contextmanager
def loopback(settings: Settings, name: str, size: int = 4 * GIB) -> Iterator[Loopback]:
    directory = tempfile.mkdtemp(prefix=f"{name}-", dir=settings.workdir)
    filesystem = Loopback(directory, size)
    try:
        yield filesystem
    finally:
        filesystem.teardown()
        _remove_unless_mounted(directory)


def _remove_unless_mounted(directory: str) -> None:
    """Delete a work directory unless a mount is left below it, which rmtree would enter."""
    left = _mounts_at_or_below(directory)
    if left:
        print(f"bench/run.py: kept {directory}: {left[0]} is still mounted", file=sys.stderr)
        return
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def driver_on(filesystem: Loopback, options: tuple = ()) -> Iterator[btrfsdrv.Driver]:
    driver = btrfsdrv.Driver(filesystem.path("home"), list(options))
    try:
        yield driver
    finally:
        driver.cleanup()


def _run(command: List[str], **options: Any) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, **options).stdout


# -- Measurement ---------------------------------------------------------------


def alternate(
    implementations: Dict[str, Callable[[], Any]],
    settings: Settings,
    settle: Callable[[], None] = lambda: None,
) -> Dict[str, List[Any]]:
    """Run each implementation once per round, rotating the order every round.

    An implementation returns its own elapsed seconds (a float, or a dict of
    phase name to seconds), so untimed set-up can happen inside it.  Warm-up
    rounds are run and dropped.
    """
    names = list(implementations)
    samples: Dict[str, List[Any]] = {name: [] for name in names}
    for round_index in range(settings.warmup + settings.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            settle()
            result = implementations[name]()
            if round_index >= settings.warmup:
                samples[name].append(result)
    return samples


def row(name: str, samples: List[float], operations: int = 1, detail: str = "") -> Row:
    return Row(name, statistics.median(samples), samples, operations, detail)


def phase_samples(samples: List[Dict[str, float]], phase: str) -> List[float]:
    return [sample[phase] for sample in samples]


def make_files(directory: str, count: int, per_directory: int = 1000, size: int = 64) -> None:
    """Write count small files below directory, per_directory to a subdirectory."""
    payload = b"x" * size
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for index in range(count):
        subdirectory = os.path.join(directory, f"d{index // per_directory:04d}")
        if index % per_directory == 0:
            os.mkdir(subdirectory)
        fd = os.open(os.path.join(subdirectory, f"f{index % per_directory:04d}"), flags, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


# -- Case 1: snapshot cycle ----------------------------------------------------


def case_snapshot(settings: Settings) -> CaseResult:
    """Snapshot a 1,000-file layer into a new layer and remove it, many times."""
    cycles = 40 if settings.quick else 200
    with loopback(settings, "snapshot") as filesystem, driver_on(filesystem) as driver:
        driver.create("base")
        make_files(driver.get("base"), 1000, per_directory=1000)
        base = driver.get("base")
        subvolumes = filesystem.path("home", "subvolumes")

        def btrfsdrv_cycle() -> float:
            start = time.perf_counter()
            for index in range(cycles):
                layer = f"btrfsdrv-{index}"
                driver.create(layer, "base")
                driver.remove(layer)
            return time.perf_counter() - start

        def btrfsutil_cycle() -> float:
            output = _run([settings.btrfsutil_python, os.path.join(BENCH_DIR, "btrfsutil_peer.py"),
                           "snapshot-cycle", base, subvolumes, str(cycles)])
            return float(json.loads(output)["seconds"])

        def cli_cycle() -> float:
            start = time.perf_counter()
            for index in range(cycles):
                target = os.path.join(subvolumes, f"cli-{index}")
                _run(["btrfs", "subvolume", "snapshot", base, target])
                _run(["btrfs", "subvolume", "delete", target])
            return time.perf_counter() - start

        # Per-round ratios to libbtrfsutil ranged from 0.8 to 1.3 on a shared
        # machine, so this case takes more rounds than the minimum.
        samples = alternate(
            {"btrfsdrv": btrfsdrv_cycle, "libbtrfsutil": btrfsutil_cycle, "btrfs CLI": cli_cycle},
            settings._replace(rounds=max(settings.rounds, 11)), filesystem.settle,
        )
    rows = [row(name, values, cycles) for name, values in samples.items()]
    drv, c_library, cli = rows
    return CaseResult(
        rows,
        [
            Check("btrfsdrv / libbtrfsutil per cycle", paired_ratio(drv, c_library), 1.05),
            Check("btrfsdrv / btrfs CLI per cycle (target: 10 x faster)", paired_ratio(drv, cli), 0.1),
        ],
        [f"{cycles} cycles per round, {max(settings.rounds, 11)} rounds; per operation = one snapshot "
         "and one remove; ratios are medians of per-round ratios"],
    )


# -- Case 2: remove cost against layer size ------------------------------------


def _add_nested_subvolumes(layer: str) -> None:
    """Create subvolumes at depths 1, 3 and 4 (the last inside the first)."""
    btrfsdrv.create_subvolume(os.path.join(layer, "nested-1"))
    os.makedirs(os.path.join(layer, "d0000", "a"))
    btrfsdrv.create_subvolume(os.path.join(layer, "d0000", "a", "nested-2"))
    os.makedirs(os.path.join(layer, "nested-1", "x", "y"))
    btrfsdrv.create_subvolume(os.path.join(layer, "nested-1", "x", "y", "nested-3"))


def case_remove(settings: Settings) -> CaseResult:
    """Remove a 100,000-file layer with 3 nested subvolumes, against an empty layer."""
    files = 20_000 if settings.quick else 100_000
    layers_per_round = 10 if settings.quick else 20
    with loopback(settings, "remove", 8 * GIB) as filesystem, driver_on(filesystem) as driver:
        driver.create("template")
        make_files(driver.get("template"), files)
        driver.create("walked", "template")
        _add_nested_subvolumes(driver.get("walked"))
        counter = iter(range(10**9))

        def remove_layers(make: Callable[[str], None]) -> float:
            layers = [f"layer-{next(counter)}" for _ in range(layers_per_round)]
            for layer in layers:
                make(layer)
            filesystem.settle()
            start = time.perf_counter()
            for layer in layers:
                driver.remove(layer)
            return time.perf_counter() - start

        def make_large(layer: str) -> None:
            driver.create(layer, "template")

        def make_large_nested(layer: str) -> None:
            driver.create(layer, "template")
            _add_nested_subvolumes(driver.get(layer))

        def make_empty_nested(layer: str) -> None:
            driver.create(layer)
            os.chmod(driver.get(layer), 0o755)
            os.mkdir(os.path.join(driver.get(layer), "d0000"))
            _add_nested_subvolumes(driver.get(layer))

        def find_nested(by_walk: bool) -> float:
            with btrfsdrv._Fd(btrfsdrv._open_directory(driver.get("walked"))) as fd:
                start = time.perf_counter()
                if by_walk:
                    found = len(btrfsdrv.find_nested_subvolumes_by_walk(fd))
                else:
                    found = len(btrfsdrv.find_nested_subvolumes(fd, btrfsdrv._subvolume_id_of_fd(fd, None)))
                elapsed = time.perf_counter() - start
            if found != 3:
                raise RuntimeError(f"found {found} nested subvolumes in the benchmark layer, expected 3")
            return elapsed

        samples = alternate(
            {
                "remove large layer": lambda: remove_layers(make_large_nested),
                "remove empty layer": lambda: remove_layers(driver.create),
                "remove large layer, no nested": lambda: remove_layers(make_large),
                "remove empty layer, 3 nested": lambda: remove_layers(make_empty_nested),
                "find nested: root refs": lambda: find_nested(False),
                "find nested: directory walk": lambda: find_nested(True),
            },
            settings, filesystem.settle,
        )
    rows = [
        row("remove large layer", samples["remove large layer"], layers_per_round,
            f"{files:,} files, 3 nested subvolumes"),
        row("remove empty layer", samples["remove empty layer"], layers_per_round),
        row("remove large layer, no nested", samples["remove large layer, no nested"], layers_per_round,
            f"{files:,} files"),
        row("remove empty layer, 3 nested", samples["remove empty layer, 3 nested"], layers_per_round,
            "3 nested subvolumes"),
        row("find nested: root refs", samples["find nested: root refs"], 1, "what remove uses"),
        row("find nested: directory walk", samples["find nested: directory walk"], 1, "the fallback"),
    ]
    return CaseResult(
        rows,
        [
            Check("remove large layer / remove empty layer", paired_ratio(rows[0], rows[1]), 2.0),
            Check("large, no nested / empty (no target: layer size alone)",
                  paired_ratio(rows[2], rows[1]), float("inf")),
            Check("large, 3 nested / empty, 3 nested (no target: layer size alone)",
                  paired_ratio(rows[0], rows[3]), float("inf")),
        ],
        [f"{layers_per_round} layers removed per round; a large layer is a snapshot of one "
         "template, so all its files are there to walk"],
    )


# -- Case 3: changes, diff_size and diff against the full walk -------------------


def _changes_unavailable() -> Optional[str]:
    """Return why the changes case cannot run, or None when it can."""
    for name in ("layer_changes", "layer_diff_size", "layer_diff"):
        if not hasattr(btrfsdrv, name):
            return f"btrfsdrv has no {name} (the full two-tree walk) yet"
    if not hasattr(btrfsdrv.Driver, "changes"):
        return "btrfsdrv has no Driver.changes yet"
    return None


def _drain(stream: Any) -> None:
    with stream:
        while stream.read(1 << 20):
            pass


def case_changes(settings: Settings) -> CaseResult:
    """changes, diff_size and diff of 10 changed files in a 100,000-file layer.

    The driver's methods take the fast path (the generation numbers of the
    snapshot's tree); layer_changes, layer_diff_size and layer_diff walk
    both directory trees in full.
    """
    missing = _changes_unavailable()
    if missing:
        return CaseResult([], [], [f"not run: {missing}"])
    files = 20_000 if settings.quick else 100_000
    with loopback(settings, "changes", 8 * GIB) as filesystem, driver_on(filesystem) as driver:
        driver.create("parent")
        make_files(driver.get("parent"), files)
        driver.create("child", "parent")
        child = driver.get("child")
        for index in range(10):
            with open(os.path.join(child, f"d{index:04d}", "f0000"), "ab") as changed:
                changed.write(b"changed")
        filesystem.settle()
        parent = driver.get("parent")

        fast_changes = driver.changes("child", "parent")
        walked_changes = btrfsdrv.layer_changes(child, parent)
        if fast_changes != walked_changes:
            raise RuntimeError("the fast path and the full walk returned different changes")
        if driver.diff_size("child", "parent") != btrfsdrv.layer_diff_size(child, parent):
            raise RuntimeError("the fast path and the full walk returned different diff sizes")

        def timed(function: Callable[[], Any]) -> Callable[[], float]:
            def run() -> float:
                start = time.perf_counter()
                function()
                return time.perf_counter() - start
            return run

        samples = alternate(
            {
                "changes: fast path": timed(lambda: driver.changes("child", "parent")),
                "changes: full walk": timed(lambda: btrfsdrv.layer_changes(child, parent)),
                "diff_size: fast path": timed(lambda: driver.diff_size("child", "parent")),
                "diff_size: full walk": timed(lambda: btrfsdrv.layer_diff_size(child, parent)),
                "diff: fast path": timed(lambda: _drain(driver.diff("child", "parent"))),
                "diff: full walk": timed(lambda: _drain(btrfsdrv.layer_diff(child, parent))),
            },
            settings,
        )
    detail = f"{len(fast_changes)} changes in {files:,} files"
    rows = [row(name, values, 1, detail) for name, values in samples.items()]
    by_name = {result.name: result for result in rows}
    return CaseResult(
        rows,
        [Check(f"{operation} fast path / full walk (target: 20 x faster)",
               paired_ratio(by_name[f"{operation}: fast path"], by_name[f"{operation}: full walk"]), 0.05)
         for operation in ("changes", "diff_size", "diff")],
        ["diff is read to the end of the stream"],
    )


# -- Case 4: quota at scale ------------------------------------------------------


def _quota_mode(filesystem: Loopback) -> str:
    """Return the sysfs quota mode of the filesystem: qgroup, squota or off."""
    fsid = _run(["findmnt", "-n", "-o", "UUID", "--target", filesystem.mountpoint]).strip()
    try:
        with open(f"/sys/fs/btrfs/{fsid}/qgroups/mode") as mode:
            return mode.read().strip()
    except FileNotFoundError:
        return "off"


def case_quota(settings: Settings) -> CaseResult:
    """Create 500 layers with a size limit, write 1 MiB into each, remove them all."""
    layers = 50 if settings.quick else 500
    payload = os.urandom(MIB)
    modes = {
        "quota off": ((), None),
        "simple quotas": (("btrfs.quota_mode=simple",), {"size": "64M"}),
        "full qgroups": ((), {"size": "64M"}),
    }
    with contextlib.ExitStack() as stack:
        runners: Dict[str, Callable[[], Dict[str, float]]] = {}
        filesystems: Dict[str, Loopback] = {}
        for label, (options, storage_opt) in modes.items():
            filesystem = stack.enter_context(loopback(settings, label.replace(" ", "-")))
            driver = stack.enter_context(driver_on(filesystem, options))
            filesystems[label] = filesystem
            runners[label] = _quota_runner(driver, filesystem, layers, storage_opt, payload)
        # The write phase waits for 500 MiB to reach the disk, which varies
        # most from round to round, so this case takes more rounds.
        samples = alternate(runners, settings._replace(rounds=max(settings.rounds, 9)))
        modes_seen = {label: _quota_mode(filesystem) for label, filesystem in filesystems.items()}

    rows = []
    for label, values in samples.items():
        detail = ", ".join(
            f"{phase} {statistics.median(phase_samples(values, phase)):.2f} s"
            for phase in ("create", "write", "remove")
        )
        rows.append(row(label, phase_samples(values, "total"), layers,
                        f"{detail}; kernel mode {modes_seen[label]}"))
    by_name = {result.name: result for result in rows}
    off = by_name["quota off"]

    def driver_phases(label: str) -> Row:
        values = [sample["create"] + sample["remove"] for sample in samples[label]]
        return row(label, values, layers)

    return CaseResult(
        rows,
        [
            Check("simple quotas / quota off", paired_ratio(by_name["simple quotas"], off), 1.2),
            Check("full qgroups / quota off (no target)", paired_ratio(by_name["full qgroups"], off),
                  float("inf")),
            Check("simple quotas / quota off, create and remove only (no target)",
                  paired_ratio(driver_phases("simple quotas"), driver_phases("quota off")), float("inf")),
        ],
        [f"{layers} layers per round, {max(settings.rounds, 9)} rounds; per operation = one layer "
         "created, written and removed; write includes a transaction commit"],
    )


def _quota_runner(driver: btrfsdrv.Driver, filesystem: Loopback, layers: int,
                  storage_opt: Optional[Dict[str, str]], payload: bytes) -> Callable[[], Dict[str, float]]:
    def run() -> Dict[str, float]:
        filesystem.settle()
        ids = [f"layer-{index}" for index in range(layers)]
        start = time.perf_counter()
        for layer in ids:
            driver.create(layer, storage_opt=storage_opt)
        created = time.perf_counter()
        for layer in ids:
            fd = os.open(os.path.join(driver.get(layer), "data"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
        with btrfsdrv._Fd(btrfsdrv._open_directory(filesystem.mountpoint)) as fd:
            btrfsdrv._ioctl(fd, btrfsdrv._structs.BTRFS_IOC_SYNC, 0, "sync", filesystem.mountpoint)
        written = time.perf_counter()
        for layer in ids:
            driver.remove(layer)
        removed = time.perf_counter()
        return {
            "create": created - start, "write": written - created,
            "remove": removed - written, "total": removed - start,
        }
    return run


# -- Case 5: apply a real layer ----------------------------------------------------


def _stdlib_tarball(settings: Settings) -> str:
    """Pack this Python's standard library (without site-packages) once."""
    import sysconfig

    target = os.path.join(settings.cache_dir, f"python{sys.version_info[0]}.{sys.version_info[1]}-stdlib.tar")
    if not os.path.exists(target):
        stdlib = sysconfig.get_paths()["stdlib"]
        _run(["tar", "-cf", target + ".tmp", "--exclude=./site-packages", "-C", stdlib, "."])
        os.rename(target + ".tmp", target)
    return target


def _debian_tarball(settings: Settings) -> str:
    """Download DEBIAN_PACKAGE with apt-get once and extract its data tarball."""
    target = os.path.join(settings.cache_dir, f"{DEBIAN_PACKAGE}.tar")
    if not os.path.exists(target):
        _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=settings.cache_dir)
        package = sorted(name for name in os.listdir(settings.cache_dir)
                         if name.startswith(DEBIAN_PACKAGE + "_") and name.endswith(".deb"))[-1]
        with open(target + ".tmp", "wb") as output:
            subprocess.run(["dpkg-deb", "--fsys-tarfile", os.path.join(settings.cache_dir, package)],
                           check=True, stdout=output)
        os.rename(target + ".tmp", target)
    return target


def _tarball_contents(tarball: str) -> Dict[str, int]:
    entries = regular_bytes = 0
    with tarfile.open(tarball) as archive:
        for member in archive:
            entries += 1
            if member.isfile():
                regular_bytes += member.size
    return {"entries": entries, "regular_bytes": regular_bytes, "tar_bytes": os.path.getsize(tarball)}


def case_apply(settings: Settings) -> CaseResult:
    """apply_diff of real tarballs into a fresh layer, against GNU tar -x."""
    if not hasattr(btrfsdrv.Driver, "apply_diff"):
        return CaseResult([], [], ["not run: btrfsdrv has no Driver.apply_diff yet"])
    tarballs = {"Python stdlib": _stdlib_tarball(settings)}
    notes = []
    try:
        tarballs[DEBIAN_PACKAGE] = _debian_tarball(settings)
    except (subprocess.CalledProcessError, IndexError) as error:
        notes.append(f"{DEBIAN_PACKAGE} skipped: apt-get download failed ({error})")
    rows: List[Row] = []
    checks: List[Check] = []
    with loopback(settings, "apply", 8 * GIB) as filesystem, driver_on(filesystem) as driver:
        counter = iter(range(10**9))
        for label, tarball in tarballs.items():
            contents = _tarball_contents(tarball)

            def apply_layer(tarball: str = tarball) -> float:
                layer = f"apply-{next(counter)}"
                driver.create(layer)
                filesystem.settle()
                with open(tarball, "rb") as stream:
                    start = time.perf_counter()
                    driver.apply_diff(layer, stream)
                    elapsed = time.perf_counter() - start
                driver.remove(layer)
                return elapsed

            def gnu_tar(tarball: str = tarball) -> float:
                scratch = filesystem.path(f"tar-{next(counter)}")
                btrfsdrv.create_subvolume(scratch)
                os.mkdir(os.path.join(scratch, "root"))
                filesystem.settle()
                start = time.perf_counter()
                _run(["tar", "-xf", tarball, "-C", os.path.join(scratch, "root")])
                elapsed = time.perf_counter() - start
                btrfsdrv.delete_subvolume(scratch)
                return elapsed

            samples = alternate({"apply_diff": apply_layer, "GNU tar -x": gnu_tar}, settings, filesystem.settle)
            for name, values in samples.items():
                median = statistics.median(values)
                rate = (f"{contents['entries'] / median:,.0f} files/s, "
                        f"{contents['tar_bytes'] / MIB / median:.1f} MB/s")
                rows.append(row(f"{label}: {name}", values, 1, rate))
            checks.append(Check(f"{label}: apply_diff / GNU tar", paired_ratio(rows[-2], rows[-1]), 1.5))
            notes.append(f"{label}: {contents['entries']:,} entries, "
                         f"{contents['tar_bytes'] / MIB:.1f} MiB tar ({os.path.basename(tarball)})")
    return CaseResult(rows, checks, notes)


# -- Case 6: import and start-up ----------------------------------------------------

_IMPORTTIME_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")


def _cached_bytecode_environment(settings: Settings) -> Dict[str, str]:
    """Return an environment in which Python writes and reads bytecode caches.

    Installed modules run from cached bytecode, so start-up is measured that
    way even when PYTHONDONTWRITEBYTECODE is set.  The caches go to the work
    directory, not into the repository.
    """
    environment = dict(os.environ)
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    environment["PYTHONPYCACHEPREFIX"] = os.path.join(settings.workdir, "pycache")
    return environment


def _import_profile(python: str, environment: Dict[str, str]) -> Dict[str, Any]:
    """Return btrfsdrv's cumulative import time and its heaviest imports."""
    result = subprocess.run([python, "-X", "importtime", "-c", "import btrfsdrv"],
                            cwd=REPOSITORY, env=environment, check=True, capture_output=True, text=True)
    lines = [match.groups() for match in map(_IMPORTTIME_LINE.match, result.stderr.splitlines()) if match]
    for index, (_, cumulative, indent, name) in enumerate(lines):
        if name == "btrfsdrv":
            block = []
            for self_us, _, child_indent, child in reversed(lines[:index]):
                if len(child_indent) <= len(indent):
                    break
                block.append((int(self_us), child))
            heaviest = sorted(block, reverse=True)[:6]
            return {"cumulative_us": int(cumulative), "heaviest": heaviest}
    raise RuntimeError(f"python -X importtime printed no line for btrfsdrv:\n{result.stderr}")


def case_import(settings: Settings) -> CaseResult:
    """btrfsdrv's cumulative import time, and --help against python -c pass."""
    python = sys.executable
    runs = max(settings.rounds, 20)
    environment = _cached_bytecode_environment(settings)
    profiles = [_import_profile(python, environment) for _ in range(settings.warmup + runs)][settings.warmup:]
    import_us = [profile["cumulative_us"] for profile in profiles]

    def start(arguments: List[str]) -> float:
        begin = time.perf_counter()
        subprocess.run([python, *arguments], cwd=REPOSITORY, env=environment, check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - begin

    timing = alternate(
        {"btrfsdrv.py --help": lambda: start(["btrfsdrv.py", "--help"]),
         "python -m btrfsdrv --help": lambda: start(["-m", "btrfsdrv", "--help"]),
         "python -c pass": lambda: start(["-c", "pass"])},
        settings._replace(rounds=runs),
    )
    import_row = row("import btrfsdrv (cumulative)", [us / 1e6 for us in import_us], 1,
                     f"{python} -X importtime")
    help_row = row("btrfsdrv.py --help", timing["btrfsdrv.py --help"], 1,
                   "a script is compiled on every run, never cached")
    module_row = row("python -m btrfsdrv --help", timing["python -m btrfsdrv --help"], 1,
                     "runs the cached bytecode")
    pass_row = row("python -c pass", timing["python -c pass"])
    heaviest = ", ".join(f"{name} {self_us} us" for self_us, name in profiles[-1]["heaviest"])
    return CaseResult(
        [import_row, help_row, module_row, pass_row],
        [
            Check("import btrfsdrv / 10 ms", import_row.median / 0.010, 1.0),
            Check("btrfsdrv.py --help / python -c pass", paired_ratio(help_row, pass_row), 2.0),
            Check("python -m btrfsdrv --help / python -c pass (no target)",
                  paired_ratio(module_row, pass_row), float("inf")),
        ],
        [f"heaviest imports below btrfsdrv (self time, last run): {heaviest}",
         f"{runs} runs each, with bytecode caches (PYTHONPYCACHEPREFIX in the work directory)"],
    )


# -- Case 7: peak memory ------------------------------------------------------------------


def _peak_rss(arguments: List[str]) -> Dict[str, int]:
    output = _run([sys.executable, os.path.join(BENCH_DIR, "peak_rss.py"), *arguments])
    return json.loads(output)


def case_memory(settings: Settings) -> CaseResult:
    """Peak RSS of changes and apply_diff for 10,000- and 100,000-file layers."""
    missing = _changes_unavailable()
    if missing or not hasattr(btrfsdrv.Driver, "apply_diff"):
        return CaseResult([], [], [f"not run: {missing or 'btrfsdrv has no Driver.apply_diff yet'}"])
    sizes = (2_000, 20_000) if settings.quick else (10_000, 100_000)
    operations = {
        "changes": "changes (fast path, 10 changed files)",
        "changes-walk": "changes (full walk, 10 changed files)",
        "apply": "apply_diff (whole layer)",
    }
    peaks: Dict[str, List[float]] = {operation: [] for operation in operations}
    with loopback(settings, "memory", 8 * GIB) as filesystem, driver_on(filesystem) as driver:
        home = filesystem.path("home")
        for files in sizes:
            parent, child = f"parent-{files}", f"child-{files}"
            driver.create(parent)
            make_files(driver.get(parent), files)
            driver.create(child, parent)
            directories = max(files // 1000, 1)
            for index in range(10):
                changed_path = os.path.join(driver.get(child), f"d{index % directories:04d}", f"f{index:04d}")
                with open(changed_path, "ab") as changed:
                    changed.write(b"changed")
            tarball = os.path.join(filesystem.mountpoint, f"layer-{files}.tar")
            _run(["tar", "-cf", tarball, "-C", driver.get(parent), "."])
            filesystem.settle()
            for operation in operations:
                measured = []
                for attempt in range(3):
                    if operation == "apply":
                        layer = f"apply-{files}-{attempt}"
                        driver.create(layer)
                        measured.append(_peak_rss(["apply", home, layer, tarball])["peak_kib"])
                        driver.remove(layer)
                    else:
                        measured.append(_peak_rss([operation, home, child, parent])["peak_kib"])
                peaks[operation].append(statistics.median(measured) / 1024)
    rows = [
        Row(f"{label}, {files:,} files", peak, [peak], 1, "peak RSS in MiB")
        for operation, label in operations.items()
        for files, peak in zip(sizes, peaks[operation])
    ]
    return CaseResult(
        rows,
        [Check(f"{label}: peak RSS {sizes[1]:,} / {sizes[0]:,} files (no target: flat is 1)",
               peaks[operation][1] / peaks[operation][0], float("inf"))
         for operation, label in operations.items()],
        ["memory rows show MiB in the median column; median of 3 child processes, "
         "each doing one operation (VmHWM of /proc/self/status)"],
    )


# -- Report -------------------------------------------------------------------------------


def machine() -> Dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        memory_kib = int(meminfo.readline().split()[1])
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(memory_kib / 1024**2, 1),
        "python": sys.version.split()[0],
        "btrfs-progs": _run(["btrfs", "--version"]).strip(),
    }


def format_table(results: Dict[str, CaseResult]) -> str:
    lines = [
        "| case | implementation | median | per operation | detail |",
        "|---|---|---|---|---|",
    ]
    for case, result in results.items():
        for entry in result.rows:
            if case == "memory":
                median, per_operation = f"{entry.median:.1f} MiB", ""
            else:
                median, per_operation = f"{entry.median:.4f} s", _ms(entry.per_operation)
            lines.append(f"| {case} | {entry.name} | {median} | {per_operation} | {entry.detail} |")
    lines += ["", "| case | target | measured | limit | met |", "|---|---|---|---|---|"]
    for case, result in results.items():
        for check in result.checks:
            if check.limit == float("inf"):
                limit, met = "-", "-"
            else:
                limit, met = f"{check.limit:g}", "yes" if check.met else "NO"
            lines.append(f"| {case} | {check.description} | {check.ratio:.3f} | {limit} | {met} |")
    notes = [f"- {case}: {note}" for case, result in results.items() for note in result.notes]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def to_json(results: Dict[str, CaseResult], settings: Settings, command: List[str]) -> Dict[str, Any]:
    return {
        "machine": machine(),
        "command": " ".join(command),
        "rounds": settings.rounds,
        "warmup": settings.warmup,
        "quick": settings.quick,
        "cases": {
            case: {
                "rows": [dict(entry._asdict(), per_operation=entry.per_operation) for entry in result.rows],
                "checks": [dict(check._asdict(), met=check.met) for check in result.checks],
                "notes": result.notes,
            }
            for case, result in results.items()
        },
    }


# -- Command line -------------------------------------------------------------------------


CASE_FUNCTIONS: Dict[str, Callable[[Settings], CaseResult]] = {
    "snapshot": case_snapshot,
    "remove": case_remove,
    "changes": case_changes,
    "quota": case_quota,
    "apply": case_apply,
    "import": case_import,
    "memory": case_memory,
}


def parse_arguments(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated cases to run (default: all of {','.join(CASES)})")
    parser.add_argument("--quick", action="store_true",
                        help="smaller layers and fewer cycles, for development; targets still print")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per case, at least 5 (default 5)")
    parser.add_argument("--output", default=os.path.join(BENCH_DIR, "results.json"),
                        help="JSON file for the table and raw samples (default bench/results.json)")
    parser.add_argument("--btrfsutil-python", default="/usr/bin/python3",
                        help="interpreter that imports libbtrfsutil's bindings (default /usr/bin/python3)")
    parser.add_argument("--cache-dir", default=os.path.join(REPOSITORY, ".cache", "bench"),
                        help="where downloaded and packed tarballs are kept between runs")
    parser.add_argument("--workdir", default=None,
                        help="directory for the loopback images (default: a new temporary directory)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {','.join(CASES)}")
    if args.rounds < 5:
        parser.error(f"--rounds {args.rounds} is too few: use at least 5")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_arguments(argv)
    if os.geteuid() != 0:
        print("bench/run.py: run as root: every case mounts loopback btrfs filesystems", file=sys.stderr)
        return 2
    os.makedirs(args.cache_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="btrfsdrv-bench-", dir=args.workdir)
    settings = Settings(args.rounds, 1, args.quick, args.btrfsutil_python, args.cache_dir, workdir)
    selected = [case for case in CASES if case in args.cases.split(",")]
    results: Dict[str, CaseResult] = {}
    try:
        for case in selected:
            print(f"running {case} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                results[case] = CASE_FUNCTIONS[case](settings)
            except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
                # One broken case must not lose the others' results.
                print(f"  {case} failed: {error}", file=sys.stderr, flush=True)
                results[case] = CaseResult([], [], [f"failed: {error}"])
            print(f"  {case} took {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        _remove_unless_mounted(workdir)
    print(format_table(results))
    report = to_json(results, settings, [os.path.relpath(sys.argv[0], REPOSITORY), *sys.argv[1:]])
    report["table"] = format_table(results)
    with open(args.output, "w") as output:
        json.dump(report, output, indent=2)
        output.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
