"""Faults while working: a full disk, Ctrl-C / SIGTERM / SIGKILL mid-write, two runs
writing the same output, an input that changes while it is read, read-only folders and
unreadable inputs. Each ends in a clear error (or a complete output), never in a partial
or mixed output, and leaves no temporary file behind (a killed run's is cleaned up by the
next one).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cndiff
import cndiff.inputs.checkpoint
import cndiff.inputs.opening
import cndiff.writer
from cndiff import synthetic
from cndiff.cli import main
from cndiff.errors import CheckpointError, OutputError, OutputExistsError
from cndiff.writer import OutputEntry, SafetensorsWriter, remove_stale_temp_files, temp_files_for

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
# the smallest chunks (1 KiB) and one worker: the slow pair then takes a second or two
SLOW = ["--chunk-mb", "0.001", "--workers", "1"]
TMP_SUFFIX = ".cndiff-tmp"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return synthetic.make_pair(tmp_path_factory.mktemp("faults"), synthetic.tiny())


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A pair wide enough (UNet width 32) that SLOW runs last long enough to interrupt."""
    tiny = synthetic.tiny()
    arch = dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, model_channels=32))
    return synthetic.make_pair(tmp_path_factory.mktemp("slow"), arch)


@pytest.fixture(scope="module")
def slow_reference(slow_pair, tmp_path_factory) -> bytes:
    control, base = slow_pair
    out = tmp_path_factory.mktemp("ref") / "diff.safetensors"
    cndiff.extract(control, base, out, device="cpu")
    return out.read_bytes()


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory) -> bytes:
    """The bytes a clean run writes (the output is deterministic)."""
    control, base = pair
    out = tmp_path_factory.mktemp("ref") / "diff.safetensors"
    cndiff.extract(control, base, out, device="cpu")
    return out.read_bytes()


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def temps(folder: Path) -> list[str]:
    return [n for n in names(folder) if n.endswith(TMP_SUFFIX)]


def cli_process(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "cndiff", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_for_temp(folder: Path, proc: subprocess.Popen, timeout: float = 30.0) -> Path:
    """Wait until ``proc`` has a temporary file in ``folder`` (it is writing)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = temps(folder)
        if found:
            return folder / found[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished before writing was seen (rc {proc.returncode}): {err[-500:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("no temporary file appeared")


class OsProxy:
    """Stands in for the ``os`` module inside one cndiff module: ``overrides`` replace
    some functions, everything else is the real ``os``."""

    def __init__(self, **overrides) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str):
        return getattr(os, name)


def disk_full_after(limit: int):
    """An ``os.write`` that fails with ENOSPC once ``limit`` bytes were written."""
    written = [0]

    def write(fd: int, data) -> int:
        n = len(data)
        if written[0] + n > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += n
        return os.write(fd, data)

    return write


# -- disk full ------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 5000, 150_000])
@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_while_writing(pair, tmp_path, monkeypatch, limit, existing):
    control, base = pair
    target = tmp_path / "diff.safetensors"
    if existing:
        target.write_bytes(b"a good earlier output")
    monkeypatch.setattr(cndiff.writer, "os", OsProxy(write=disk_full_after(limit)))
    with pytest.raises(OutputError, match="no space left on the disk"):
        cndiff.extract(control, base, target, overwrite=existing, device="cpu")
    assert names(tmp_path) == ({"diff.safetensors"} if existing else set())
    if existing:
        assert target.read_bytes() == b"a good earlier output"


def test_disk_full_at_fsync(pair, tmp_path, monkeypatch):
    """Some filesystems (NFS, delayed allocation) report a full disk only at fsync."""
    control, base = pair

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cndiff.writer, "os", OsProxy(fsync=fsync))
    with pytest.raises(OutputError, match="no space left"):
        cndiff.extract(control, base, tmp_path, device="cpu")
    assert names(tmp_path) == set()


def test_disk_full_cli_one_line(pair, tmp_path, monkeypatch, capsys):
    control, base = pair
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"keep me")
    monkeypatch.setattr(cndiff.writer, "os", OsProxy(write=disk_full_after(20_000)))
    rc = main(
        [
            "extract",
            str(control),
            str(base),
            "-o",
            str(existing),
            "--overwrite",
            "-q",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("cndiff: error: no space left on the disk")
    assert "Traceback" not in err
    assert names(tmp_path) == {"out.safetensors"} and existing.read_bytes() == b"keep me"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (a real full disk), when this process may mount one (root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the injected ENOSPC tests cover this")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk(pair, tiny_tmpfs):
    control, base = pair
    with pytest.raises(OutputError, match="no space left on the disk"):
        cndiff.extract(control, base, tiny_tmpfs, device="cpu")
    assert names(tiny_tmpfs) == set()
    # an existing output stays as it was, with --overwrite too, through the command line
    (tiny_tmpfs / "o.safetensors").write_bytes(b"keep me")
    proc = cli_process(
        "extract",
        str(control),
        str(base),
        "-o",
        str(tiny_tmpfs / "o.safetensors"),
        "--overwrite",
        "-q",
        "--device",
        "cpu",
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.startswith("cndiff: error: no space left") and err.count("\n") == 1
    assert names(tiny_tmpfs) == {"o.safetensors"}
    assert (tiny_tmpfs / "o.safetensors").read_bytes() == b"keep me"


def test_file_size_limit_in_a_real_process(pair, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG): the same path as a full
    disk, in a real process."""
    import resource

    control, base = pair

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    proc = cli_process(
        "extract",
        str(control),
        str(base),
        "-o",
        str(tmp_path),
        "-q",
        "--device",
        "cpu",
        preexec_fn=limit,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.startswith("cndiff: error: cannot write") and "too large" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert names(tmp_path) == set()


# -- interrupted runs -----------------------------------------------------------------------


@pytest.mark.parametrize("sig,rc", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_interrupted_run_leaves_nothing(slow_pair, tmp_path, sig, rc):
    control, base = slow_pair
    proc = cli_process(
        "extract", str(control), str(base), "-o", str(tmp_path), "-q", "--device", "cpu", *SLOW
    )
    wait_for_temp(tmp_path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == rc, err
    assert "Traceback" not in err
    if sig == signal.SIGINT:
        assert "interrupted; no output written" in err
    assert names(tmp_path) == set()


@pytest.mark.parametrize("delay", [0.15, 0.35, 0.6, 0.9])
def test_signals_at_any_moment_stop_promptly(slow_pair, tmp_path, delay):
    """A signal raises in the main thread at any bytecode: it must never leave a lock held
    (a worker pool's shutdown used to deadlock on one) nor a file behind."""
    control, base = slow_pair
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = cli_process(
            "extract", str(control), str(base), "-o", str(tmp_path), "-q", "--device", "cpu",
            *SLOW,
        )
        time.sleep(delay)
        proc.send_signal(sig)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"still running 20 s after signal {sig} at {delay} s")
        # (before the handlers are installed, at start-up, the signal's default action)
        assert proc.returncode in (0, 128 + sig, 130, -sig)
        assert temps(tmp_path) == []
        for p in tmp_path.iterdir():
            p.unlink()


def test_killed_run_is_cleaned_up_by_the_next(slow_pair, tmp_path, slow_reference):
    from cndiff.commands.extract import candidates
    from cndiff.targets import existing_job

    control, base = slow_pair
    proc = cli_process(
        "extract", str(control), str(base), "-o", str(tmp_path), "-q", "--device", "cpu", *SLOW
    )
    tmp = wait_for_temp(tmp_path, proc)
    time.sleep(0.1)  # (some tensors written)
    proc.kill()
    proc.communicate(timeout=60)
    target = tmp_path / f"diff_{control.stem}_fp16.safetensors"
    # the leftover is never taken for an output
    assert names(tmp_path) == {tmp.name} and not target.exists()
    assert existing_job(tmp) is None
    assert tmp.name not in {p.name for p in candidates(tmp_path)}
    # the next run removes it and writes the output
    result = cndiff.extract(control, base, tmp_path, device="cpu")
    assert names(tmp_path) == {target.name}
    assert result.output == target and target.read_bytes() == slow_reference


def test_live_writers_temp_file_is_not_removed(slow_pair, tmp_path):
    control, base = slow_pair
    proc = cli_process(
        "extract", str(control), str(base), "-o", str(tmp_path), "-q", "--device", "cpu", *SLOW
    )
    try:
        tmp = wait_for_temp(tmp_path, proc)
        target = tmp_path / f"diff_{control.stem}_fp16.safetensors"
        assert remove_stale_temp_files(target) == [] and tmp.exists()
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_locked_temp_file_of_an_unknown_pid_is_kept(tmp_path):
    """A writer in another PID namespace (a container sharing the folder) has a pid that
    means nothing here: its lock on the file, not the pid, keeps the file alive."""
    import fcntl

    target = tmp_path / "out.safetensors"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    tmp = tmp_path / f".out.safetensors.{dead}.0123abcd{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert temp_files_for(target) == [tmp]
        assert remove_stale_temp_files(target) == [] and tmp.exists()
    finally:
        os.close(fd)
    assert remove_stale_temp_files(target) == [tmp] and not tmp.exists()


def test_interrupt_while_writing_the_header(tmp_path, monkeypatch):
    """Ctrl-C inside ``__enter__`` (while the header is handed to the writing thread, so
    ``__exit__`` never runs) used to leave the temporary file behind."""

    def put(self, data) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cndiff.writer._WriteBehind, "put", put)
    entries = [OutputEntry("a", synthetic_dtype(), (2,))]
    with pytest.raises(KeyboardInterrupt), SafetensorsWriter(tmp_path / "o.safetensors", entries):
        pass
    assert names(tmp_path) == set()


def test_a_write_error_on_the_writing_thread_reaches_the_caller(tmp_path, monkeypatch):
    """The bytes are written on the writer's own thread: its error (here an exception
    ``os.write`` should never raise) comes out of the next ``write`` or of ``commit``,
    and no file is left."""

    def write(fd: int, data) -> int:
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(cndiff.writer, "os", OsProxy(write=write))
    entries = [OutputEntry("a", synthetic_dtype(), (2,))]
    writer = SafetensorsWriter(tmp_path / "o.safetensors", entries)
    with pytest.raises(RuntimeError, match="the disk went away"), writer as w:
        w.write(b"\0" * 4)
        w.commit()
    assert names(tmp_path) == set()


def synthetic_dtype():
    from cndiff.dtypes import F16

    return F16


# -- two runs writing one output ----------------------------------------------------------------


def test_two_runs_overwriting_one_output(slow_pair, tmp_path, slow_reference):
    control, base = slow_pair
    target = tmp_path / "diff.safetensors"
    target.write_bytes(b"old")
    args = [
        "extract",
        str(control),
        str(base),
        "-o",
        str(target),
        "--overwrite",
        "-q",
        "--device",
        "cpu",
        *SLOW,
    ]
    procs = [cli_process(*args) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert names(tmp_path) == {"diff.safetensors"}
    assert target.read_bytes() == slow_reference  # one whole file, not a mix


def test_two_runs_without_overwrite(slow_pair, tmp_path, slow_reference):
    control, base = slow_pair
    target = tmp_path / "diff.safetensors"
    args = [
        "extract",
        str(control),
        str(base),
        "-o",
        str(target),
        "-q",
        "--device",
        "cpu",
        *SLOW,
    ]
    procs = [cli_process(*args) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], results
    err = next(e for p, (_, e) in zip(procs, results) if p.returncode == 1)
    assert err.startswith("cndiff: error: ") and " exists" in err and err.count("\n") == 1
    assert names(tmp_path) == {"diff.safetensors"} and target.read_bytes() == slow_reference


def test_output_appearing_while_writing_is_not_replaced(tmp_path):
    from cndiff.dtypes import F16

    target = tmp_path / "o.safetensors"
    writer = SafetensorsWriter(target, [OutputEntry("a", F16, (2,))])
    with pytest.raises(OutputExistsError, match="exists .*appeared while writing"), writer as w:
        w.write(b"\0" * 4)
        target.write_bytes(b"someone else's")
        w.commit()
    assert names(tmp_path) == {"o.safetensors"} and target.read_bytes() == b"someone else's"


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_filesystem_without_hard_links(tmp_path, monkeypatch, code):
    """FAT/exFAT drives and some network mounts refuse link(): the output is still
    written (and still not over a file that appeared)."""
    from cndiff.dtypes import F16

    def link(src, dst) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cndiff.writer, "os", OsProxy(link=link))
    target = tmp_path / "o.safetensors"
    with SafetensorsWriter(target, [OutputEntry("a", F16, (2,))]) as w:
        w.write(b"\0" * 4)
        w.commit()
    assert names(tmp_path) == {"o.safetensors"} and target.stat().st_size > 4
    writer = SafetensorsWriter(tmp_path / "p.safetensors", [OutputEntry("a", F16, (2,))])
    with pytest.raises(OutputExistsError), writer as w:
        w.write(b"\0" * 4)
        (tmp_path / "p.safetensors").write_bytes(b"x")
        w.commit()
    assert names(tmp_path) == {"o.safetensors", "p.safetensors"}


# -- an input that changes while it is read -------------------------------------------------------


def _copy_pair(pair, folder: Path) -> tuple[Path, Path]:
    control, base = pair
    c, b = folder / control.name, folder / base.name
    shutil.copyfile(control, c)
    shutil.copyfile(base, b)
    for p in (c, b):  # an mtime well in the past: any write changes it
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    return c, b


@pytest.mark.parametrize(
    "which,change",
    [
        ("control", "append"),
        ("control", "truncate"),
        ("control", "rewrite"),
        ("base", "append"),
        ("base", "truncate"),
    ],
)
def test_input_changing_while_read(pair, tmp_path, monkeypatch, which, change):
    inputs = tmp_path / "in"
    inputs.mkdir()
    control, base = _copy_pair(pair, inputs)
    victim = control if which == "control" else base
    out = tmp_path / "out"
    out.mkdir()
    real_write = SafetensorsWriter.write
    calls = [0]

    def write(self, data, release=None) -> None:
        calls[0] += 1
        if calls[0] == 3:  # a few tensors in: the file changes under the reader
            size = victim.stat().st_size
            with open(victim, "r+b") as f:
                if change == "append":
                    f.seek(0, 2)
                    f.write(b"\0" * 100)
                elif change == "truncate":
                    f.truncate(size // 2)
                else:  # same size, other bytes (the last 64 KiB: tensor data)
                    f.seek(size - 65536)
                    f.write(os.urandom(65536))
        real_write(self, data, release)

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    with pytest.raises(CheckpointError, match="changed on disk|ended early|shrank"):
        cndiff.extract(control, base, out, device="cpu", chunk_mb=0.01, workers=1)
    assert names(out) == set()


def test_input_read_error(pair, tmp_path, monkeypatch):
    """EIO from a failing drive or a network mount, mid-run: a clear error, no output."""
    control, base = pair
    calls = [0]

    def preadv(fd, buffers, offset):
        calls[0] += 1
        if calls[0] > 20:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.preadv(fd, buffers, offset)

    monkeypatch.setattr(cndiff.inputs.checkpoint, "os", OsProxy(preadv=preadv))
    with pytest.raises(CheckpointError, match="cannot read .*Input/output error"):
        cndiff.extract(control, base, tmp_path, device="cpu", workers=1)
    assert names(tmp_path) == set()


def test_zip_headers_are_prefetched_and_the_hint_may_fail(pair, tmp_path, monkeypatch, reference):
    """Opening a torch archive asks the kernel to read every entry's local header ahead
    (cold, they are scattered seeks); the hint failing changes nothing."""
    import zipfile

    import cndiff.inputs.torchfile

    control, base = pair
    advised: list[tuple[int, int]] = []

    def advise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        advised.append((fd, offset))
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # only the first is asked

    monkeypatch.setattr(cndiff.inputs.torchfile, "os", OsProxy(posix_fadvise=advise))
    out = tmp_path / "diff.safetensors"
    cndiff.extract(control, base, out, device="cpu")
    assert out.read_bytes() == reference
    assert len(advised) == 2  # control and base, each stopped at its first failure

    advised.clear()
    monkeypatch.setattr(cndiff.inputs.torchfile, "os",
                        OsProxy(posix_fadvise=lambda fd, o, n, a: advised.append((fd, o))))
    cndiff.open_checkpoint(control).close()
    with zipfile.ZipFile(control) as zf:
        offsets = sorted(i.header_offset for i in zf.infolist())
    assert sorted(o for _, o in advised) == offsets


# -- permissions and odd output paths ------------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may create files in: ``chattr +i`` as root (who ignores permission
    bits), mode 0555 otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if IS_ROOT:
        if shutil.which("chattr") is None:
            pytest.skip("root ignores permissions and there is no chattr; see the EACCES test")
        proc = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"chattr +i not supported here: {proc.stderr.strip()}")
        try:
            yield folder
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def test_read_only_output_folder(pair, read_only_folder, capsys):
    control, base = pair
    with pytest.raises(OutputError, match="cannot write to"):
        cndiff.extract(control, base, read_only_folder, device="cpu")
    rc = main(["extract", str(control), str(base), "-o", str(read_only_folder), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("cndiff: error: cannot write to") and err.count("\n") == 1
    assert names(read_only_folder) == set()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_unwritable_output_folder_injected(pair, tmp_path, monkeypatch, code):
    control, base = pair

    def deny(path, flags, mode=0o777):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(cndiff.writer, "os", OsProxy(open=deny))
    with pytest.raises(OutputError, match="cannot write to .*choose another -o"):
        cndiff.extract(control, base, tmp_path, device="cpu")
    assert names(tmp_path) == set()


def test_output_path_is_a_folder(pair, tmp_path):
    control, base = pair
    target = tmp_path / f"diff_{control.stem}_fp16.safetensors"
    target.mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        cndiff.extract(control, base, tmp_path, overwrite=True, device="cpu")
    with pytest.raises((OutputError, OutputExistsError)):
        cndiff.extract(control, base, tmp_path, device="cpu")
    assert names(tmp_path) == {target.name} and list(target.iterdir()) == []


def test_unreadable_input(pair, tmp_path, monkeypatch, capsys):
    control, base = pair
    c = tmp_path / control.name
    shutil.copyfile(control, c)
    if IS_ROOT:  # root reads anything: the kernel's answer is injected

        def deny(path, flags, mode=0o777):
            if Path(path) == c:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return os.open(path, flags, mode)

        monkeypatch.setattr(cndiff.inputs.opening, "os", OsProxy(open=deny))
    else:
        c.chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        cndiff.extract(c, base, tmp_path, device="cpu")
    rc = main(["extract", str(c), str(base), "-o", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "permission denied" in err and err.count("\n") == 1
    assert names(tmp_path) == {c.name}
