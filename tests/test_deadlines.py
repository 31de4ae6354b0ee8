"""The tests' own deadlines (tests/deadlines.py): a command, a background process, a polled wait or spawned ranks
that cannot end fail the test at their deadline, in a message saying what was waited for, with what was started
killed (its own children included), instead of hanging until an outer limit kills the whole run."""
import sys
import time

import psutil
import pytest
from deadlines import finish, spawn, wait_until
from dvcrepo import run, start

# A process that starts a child in a session of its own (as torchrun starts its ranks), says so, and never ends
SLEEPER = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
           "start_new_session=True); print('started', flush=True); time.sleep(600)")


def alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_command_that_cannot_end_fails_at_its_deadline_naming_it_and_is_killed_with_its_children(tmp_path):
    process = start(tmp_path, sys.executable, "-c", SLEEPER)
    (child,) = wait_until(lambda: psutil.Process(process.pid).children(), 60, "the sleeper's child")
    begun = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"^the sleeper: not done after 1 s; killed it. Its output "
                                                    r"ended:\nstarted\n"):
        finish(process, 1, "the sleeper")
    assert time.monotonic() - begun < 15 and process.returncode is not None
    wait_until(lambda: not alive(child), 10, "the end of the killed child")  # SIGKILL takes a moment to land


def test_a_command_run_to_its_end_fails_at_its_deadline_naming_the_command(tmp_path):
    begun = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"^\S+ -c import time; time.sleep\(600\): not done after 1 s"):
        run(tmp_path, sys.executable, "-c", "import time; time.sleep(600)", timeout=1)
    assert time.monotonic() - begun < 15


def test_a_wait_fails_at_once_when_the_process_it_waits_on_ends_and_at_its_deadline_otherwise(tmp_path):
    ended = start(tmp_path, sys.executable, "-c", "import sys; print('gave up'); sys.exit(3)")
    begun = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"^a checkpoint: never came; the process it waited on ended "
                                                    r"first \(exit status 3\). Its output ended:\ngave up\n"):
        wait_until(lambda: False, 60, "a checkpoint", [ended])
    with pytest.raises(pytest.fail.Exception, match=r"^a file: not there after 0.5 s$"):
        wait_until(lambda: (tmp_path / "never").exists(), 0.5, "a file")
    assert time.monotonic() - begun < 15


def sleeping_rank(rank):
    time.sleep(600)  # a collective waiting for a peer that is gone


def test_spawned_ranks_that_cannot_end_fail_at_their_deadline_and_are_killed():
    begun = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"^a sleeping rank: the 1 ranks were not done after 3 s; "
                                                    r"killed them$"):
        spawn(sleeping_rank, (), 1, 3, "a sleeping rank")
    assert time.monotonic() - begun < 60  # a spawned rank imports torch first
    wait_until(lambda: not [p for p in psutil.Process().children(recursive=True)
                            if alive(p) and "spawn_main" in " ".join(p.cmdline())], 10, "the end of the killed rank")
