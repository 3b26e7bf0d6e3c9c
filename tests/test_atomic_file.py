"""daemon/atomic_file.py on real files: two writers of one file at once both succeed and a reader
only ever sees a whole file; a write the disk refuses leaves the old file and no debris."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from daemon import atomic_file
from node import state

WRITES_PER_WRITER = 300  # the shared-name race showed within a few dozen writes; ten times that


def test_two_ntm_commands_refreshing_id_json_at_once_both_succeed_and_readers_see_whole_files(tmp_path):
    """Adversary: the user's own second `ntm` command (or `ntm up` beside `ntm status`), writing
    the same id.json at the same moment. With one temporary name for every writer, one renamed the
    other's file away and the other failed with "No such file or directory (id.json.tmp)"."""
    path = tmp_path / state.ID_FILE
    versions = [{"node": f"0x{i:040x}", "pad": "x" * (4096 * i)} for i in (1, 2)]  # several pages each
    state.write_json(path, versions[0])
    start, errors, seen = threading.Barrier(3), [], set()
    done = threading.Event()

    def writer(version: dict) -> None:
        start.wait()
        try:
            for _ in range(WRITES_PER_WRITER):
                state.write_json(path, version)
        except OSError as exc:
            errors.append(exc)

    def reader() -> None:
        start.wait()
        while not done.is_set():
            seen.add(state.read_json(path)["node"])  # BadFile (half a file) or KeyError ({}) fails

    threads = [threading.Thread(target=writer, args=(v,)) for v in versions]
    watcher = threading.Thread(target=reader)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert errors == []
    assert state.read_json(path) in versions
    assert seen <= {v["node"] for v in versions}
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.ID_FILE]  # no temporary file left


def test_a_write_the_disk_refuses_leaves_the_old_file_and_no_temporary_file(tmp_path):
    """A full disk, made real with the file-size limit (the kernel refuses the write with EFBIG):
    the error reaches the caller, the old file is intact, nothing else is left in the directory."""
    path = tmp_path / "state.json"
    atomic_file.replace_file(path, b"old\n")
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from daemon import atomic_file\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        "    atomic_file.replace_file(Path(sys.argv[1]), b'n' * 65536)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "27"  # EFBIG
    assert path.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_mode_is_the_one_asked_for_whatever_the_umask(tmp_path):
    """A key is the owner's only even under umask 0; a public file is readable by all."""
    old = os.umask(0)
    try:
        atomic_file.replace_file(tmp_path / "key.json", b"{}", atomic_file.SECRET_FILE_MODE)
        atomic_file.replace_file(tmp_path / "id.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "key.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "id.json").stat().st_mode & 0o777 == 0o644
