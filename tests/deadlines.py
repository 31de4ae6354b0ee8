"""Deadlines for what the tests start and wait on: a command, a background process, a condition polled, a group
of spawned ranks. Past its deadline, what was started is killed, with everything it started, and the test fails
in a line that says what it was waiting for (and the end of the output), instead of hanging until an outer limit
(CI's, 90 minutes) kills the whole run. The deadlines are generous, for a loaded 2-core machine: they end a
test that cannot end, never a slow one."""
import os
import signal
import subprocess
import time

import psutil
import pytest

COMMAND_S = 600  # one command (`dvc repro` of the tiny pipeline, the longest, takes about a minute)
WAIT_S = 900  # a wait for background work: a queued experiment, a checkpoint of a run started in the background


def tail(text, chars=3000):
    return (text or "")[-chars:]


def kill_tree(process):
    """SIGKILL a started process and everything under it: its process group where it leads one (dvcrepo.start),
    and every descendant found before the kill, also those in sessions of their own (torchrun's ranks), which
    would otherwise go on running (and writing) beside what the test does next."""
    if process.returncode is not None:  # reaped: its pid may be another process's by now
        return
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its group, where it leads one (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    process.kill()
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def output(process):
    """(stdout, stderr) of a process that has ended or been killed."""
    try:
        return process.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a process it started outlived it and holds its output open
        return "", "(output unread: a process it started still holds it open)"


def finish(process, seconds, what):
    """(exit status, stdout, stderr) of a started process (subprocess.Popen) once it ends. Past `seconds` it is
    killed with all it started and the test fails, naming `what` it waited for; on Ctrl-C they are killed too."""
    try:
        out, err = process.communicate(timeout=seconds)
    except BaseException as e:
        kill_tree(process)
        out, err = output(process)
        if isinstance(e, subprocess.TimeoutExpired):
            pytest.fail(f"{what}: not done after {seconds} s; killed it. Its output ended:\n{tail(out)}\n{tail(err)}",
                        pytrace=False)
        raise
    return process.returncode, out, err


def finish_all(processes, seconds, what):
    """[(exit status, stdout, stderr)] of started processes that work together (the nodes of one run), all
    within `seconds` s. Past them, or when waiting fails otherwise, every one is killed with all it started:
    none is left running alone, waiting for a peer."""
    deadline = time.monotonic() + seconds
    try:
        return [finish(process, max(0.0, deadline - time.monotonic()), f"{what} ({i + 1} of {len(processes)})")
                for i, process in enumerate(processes)]
    except BaseException:
        for process in processes:
            if process.poll() is None:
                kill_tree(process)
        raise


def wait_until(condition, seconds, what, processes=(), interval=0.1):
    """condition()'s first true value, polled every `interval` s. The test fails, naming `what` it waited for,
    past `seconds`, or as soon as one of `processes` (started ones, whose work it waits on) has ended; they are
    then killed, with all they started."""
    deadline = time.monotonic() + seconds
    try:
        while not (found := condition()):
            for process in processes:
                if process.poll() is not None:
                    out, err = output(process)
                    pytest.fail(f"{what}: never came; the process it waited on ended first (exit status "
                                f"{process.returncode}). Its output ended:\n{tail(out)}\n{tail(err)}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not there after {seconds} s", pytrace=False)
            time.sleep(interval)
    except BaseException:
        for process in processes:
            if process.poll() is None:
                kill_tree(process)
        raise
    return found


def spawn(function, args, nprocs, seconds, what):
    """torch.multiprocessing.spawn(function, args, nprocs) with a deadline: a rank that hangs (a collective
    waiting for a peer that died) fails the test after `seconds`, its ranks killed, instead of waiting for
    gloo's own timeout (30 minutes) or forever."""
    import torch.multiprocessing as mp

    ranks = mp.spawn(function, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):  # raises if a rank failed
        if time.monotonic() >= deadline:
            for rank in ranks.processes:
                rank.kill()
            pytest.fail(f"{what}: the {nprocs} ranks were not done after {seconds} s; killed them", pytrace=False)
