"""Atomic output: a crash, Ctrl-C, SIGTERM, SIGKILL or full disk never leaves a partial output folder."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import leftovers, weight_files
from merge_hooks.errors import MergeHooksError
from merge_hooks.staging import staged_output

REPO = Path(__file__).resolve().parents[1]

# A merge whose writer pauses on every tensor, announcing through a marker file that writing has begun.
SLOW_MERGE = """
import signal, sys, time
from pathlib import Path
# As in a terminal: Ctrl-C raises KeyboardInterrupt (a background job of a shell starts with SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
import merge_hooks.io.safetensors_io as io
from merge_hooks.tensors import TensorSource
from merge_hooks.cli import main

marker = Path(sys.argv[1])
real_write = io.write_safetensors

def slow_write(path, source, **kwargs):
    def get(name):
        marker.touch()
        time.sleep(0.3)
        return source.get(name)
    real_write(path, TensorSource(specs=source.specs, get=get), **kwargs)

io.write_safetensors = slow_write
main(sys.argv[2:])
"""


def test_commit_and_rollback(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(target) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    assert not target.exists() and leftovers(tmp_path, "out") == []

    with staged_output(target) as staging:
        (staging / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new" and leftovers(tmp_path, "out") == []

    with pytest.raises(KeyboardInterrupt):
        with staged_output(target) as staging:
            (staging / "b.txt").write_text("newer")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and leftovers(tmp_path, "out") == []

    with staged_output(target) as staging:
        (staging / "c.txt").write_text("replacement")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"] and leftovers(tmp_path, "out") == []


def test_full_disk_is_a_clear_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(MergeHooksError, match="disk full"):
        with staged_output(target) as staging:
            (staging / "w.bin").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists() and leftovers(tmp_path, "out") == []


def _start_slow_merge(tmp_path: Path, models, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "writing-started"
    args = ["merge", "--model-type", "encoder", "--models", *map(str, models), "--weights", "0.5", "0.5",
            "-o", str(out), "-q", *extra]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(marker), *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.05)
    return proc, marker


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_leaves_nothing(sig, make_models, tmp_path):
    models = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    proc, _ = _start_slow_merge(tmp_path, models, out)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    assert leftovers(tmp_path, "merged") == []


def test_sigkill_mid_write_leaves_no_output_and_any_later_run_in_the_folder_cleans_up(make_models, tmp_path):
    from merge_hooks.cli import main

    models = make_models("bert-encoder", 2)
    out, other = tmp_path / "merged", tmp_path / "other"
    proc, _ = _start_slow_merge(tmp_path, models, out)
    proc.kill()
    proc.wait(timeout=60)
    assert not out.exists()
    # SIGKILL cannot be caught: the staging folder and the lock file stay...
    left = leftovers(tmp_path, "merged")
    assert len(left) == 2 and left[1] == ".merged.merge-hooks.lock" and ".merge-hooks-staging-" in left[0]
    with pytest.raises(SystemExit) as done:
        main(["merge", "--model-type", "encoder", "--models", *map(str, models), "--weights", "0.5", "0.5",
              "-o", str(other), "-q"])
    assert done.value.code == 0
    # ...until a later run writing into the same folder, to any output, removes them.
    assert leftovers(tmp_path, "merged") == [] and leftovers(tmp_path, "other") == []
    assert weight_files(other) == ["model.safetensors"] and not out.exists()


def test_killed_overwrite_keeps_previous_output(make_models, tmp_path):
    models = make_models("bert-encoder", 2)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"previous weights")
    (out / "merge_info.json").write_text("{}")  # an earlier merge-hooks output, which --overwrite may replace
    proc, _ = _start_slow_merge(tmp_path, models, out, "--overwrite")
    proc.terminate()
    proc.wait(timeout=60)
    assert sorted(p.name for p in out.iterdir()) == ["merge_info.json", "pytorch_model.bin"]
    assert (out / "pytorch_model.bin").read_bytes() == b"previous weights"
    assert leftovers(tmp_path, "merged") == []


def test_a_claim_locks_the_output_until_the_run_ends(tmp_path):
    from merge_hooks.staging import claimed_output

    target = tmp_path / "out"
    with claimed_output(target) as claim:
        assert (tmp_path / ".out.merge-hooks.lock").is_file()
        with pytest.raises(MergeHooksError, match="another merge-hooks run is writing"):
            with claimed_output(target):
                pass
        with staged_output(target, claim=claim) as staging:
            (staging / "a.txt").write_text("mine")
    assert (target / "a.txt").read_text() == "mine"
    assert leftovers(tmp_path, "out") == []  # the lock file goes with the run


def test_a_failed_run_removes_the_parent_folders_it_created(tmp_path):
    from merge_hooks.staging import claimed_output

    (tmp_path / "a").mkdir()
    target = tmp_path / "a" / "b" / "c" / "out"
    with pytest.raises(RuntimeError):
        with claimed_output(target) as claim, staged_output(target, claim=claim) as staging:
            (staging / "x").write_text("x")
            raise RuntimeError("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and list((tmp_path / "a").iterdir()) == []


def test_a_target_that_changed_since_the_claim_is_not_replaced(tmp_path):
    from merge_hooks.staging import claimed_output

    target = tmp_path / "out"
    target.mkdir()
    (target / "merge_info.json").write_text("{}")
    with pytest.raises(MergeHooksError, match="changed while this run was writing") as error:
        with claimed_output(target) as claim, staged_output(target, claim=claim) as staging:
            (staging / "new.txt").write_text("new result")
            (target / "merge_info.json").write_text('{"someone": "else"}')
    assert (target / "merge_info.json").read_text() == '{"someone": "else"}'
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.merge-hooks-new-")]
    assert len(kept) == 1 and str(kept[0]) in str(error.value) and (kept[0] / "new.txt").read_text() == "new result"
    assert leftovers(tmp_path, "out") == []


def test_stale_lock_files_in_the_parent_are_removed_but_held_ones_stay(tmp_path):
    from merge_hooks.staging import claimed_output

    (tmp_path / ".killed.merge-hooks.lock").write_text("")
    with claimed_output(tmp_path / "busy"):
        with staged_output(tmp_path / "other") as staging:
            (staging / "a.txt").write_text("a")
        assert (tmp_path / ".busy.merge-hooks.lock").is_file()  # held by a live run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
