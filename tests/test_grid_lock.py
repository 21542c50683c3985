"""One writer per cell across machines: the grid's lock file, the stale-lock rule, and how Slurm is asked.

Slurm is faked here (a function or a fake `subprocess.run`); tests/test_grid_slurm.py asks a real one."""

import json
import multiprocessing
import os
import socket
import subprocess

import pytest

from ftsam_plugin.grid.cell_lock import LOCK_FILE, CellBusy, CellLock, Holder, judge
from ftsam_plugin.grid.slurm import SlurmQuery


def slurm_says(states):
    """A fake `SlurmQuery.alive`: {job id: (alive, state)}."""
    return lambda job_id: states.get(job_id, (False, "gone from the queue"))


def write_lock(folder, **fields):
    base = dict(host=socket.gethostname(), pid=os.getpid(), token="t" * 32)
    (folder / LOCK_FILE).write_text(json.dumps({**base, **fields}))


def test_take_release_and_tokens(tmp_path):
    lock = CellLock(str(tmp_path / "cell"))
    mine = Holder.here()
    assert lock.take(mine, lambda h: pytest.fail("nothing to judge")) is None
    assert lock.read()[0] == mine
    with pytest.raises(CellBusy, match="held by PID"):  # this process is alive: the cell stays ours
        lock.take(Holder.here(), lambda h: judge(h, slurm_says({})))
    assert not lock.release("another token") and os.path.exists(lock.path)
    assert lock.set_job(mine.token, "12_3") and lock.read()[0].job_id == "12_3"
    assert lock.adopt(mine.token, Holder.here(role="job")) and lock.read()[0].job_id == "12_3"
    assert lock.release(mine.token) and not os.path.exists(lock.path)


@pytest.mark.parametrize("job, slurm, taken", [
    ("7_1", {"7_1": (True, "RUNNING")}, False),
    ("7_1", {"7_1": (True, "PENDING")}, False),
    ("7_1", {"7_1": (None, "slurm_load_jobs error: Unable to contact slurm controller")}, False),
    ("7_1", {"7_1": (False, "CANCELLED")}, True),
    ("7_1", {}, True),
])
def test_a_lock_naming_a_slurm_job_lives_as_long_as_the_job(tmp_path, job, slurm, taken):
    # a lock from another machine: only Slurm can say whether its job still lives
    write_lock(tmp_path, host="node-elsewhere", pid=4242, job_id=job)
    lock = CellLock(str(tmp_path))
    mine = Holder.here()
    if taken:
        verdict = lock.take(mine, lambda h: judge(h, slurm_says(slurm)))
        assert verdict.alive is False and lock.read()[0].token == mine.token
    else:
        with pytest.raises(CellBusy, match="Slurm job 7_1"):
            lock.take(mine, lambda h: judge(h, slurm_says(slurm)))
        assert lock.read()[0].pid == 4242  # untouched


def test_a_lock_without_a_job(tmp_path):
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    write_lock(tmp_path, pid=child.pid)  # this host, a process that is gone: stale
    assert CellLock(str(tmp_path)).take(Holder.here(), lambda h: judge(h, slurm_says({}))).alive is False
    write_lock(tmp_path, host="node-elsewhere", pid=1)  # another host, no job: cannot tell, so never broken
    with pytest.raises(CellBusy, match="another machine"):
        CellLock(str(tmp_path)).take(Holder.here(), lambda h: judge(h, slurm_says({})))
    write_lock(tmp_path, pid=os.getpid(), pid_start="1")  # this PID, but started at another time: a reused PID
    assert CellLock(str(tmp_path)).take(Holder.here(), lambda h: judge(h, slurm_says({}))).alive is False
    (tmp_path / LOCK_FILE).write_text("{not json")  # unreadable: never broken
    with pytest.raises(CellBusy, match="cannot be read"):
        CellLock(str(tmp_path)).take(Holder.here(), lambda h: judge(h, slurm_says({})))


def _race(folder, barrier, results):
    barrier.wait()
    try:
        CellLock(folder).take(Holder.here(), lambda h: judge(h, slurm_says({"9_0": (False, "CANCELLED")})))
        results.put("took")
    except CellBusy:
        results.put("busy")


def test_two_submitters_breaking_one_stale_lock_never_both_take_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for trial in range(20):
        folder = tmp_path / f"cell{trial}"
        folder.mkdir()
        write_lock(folder, host="node-elsewhere", pid=1, job_id="9_0")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(folder), barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        assert outcomes.count("took") <= 1, outcomes
        holder = CellLock(str(folder)).read()[0]
        assert outcomes.count("took") == 1 or holder.job_id == "9_0"


class FakeRun:
    """A fake subprocess.run answering squeue and sacct."""

    def __init__(self, squeue=(0, "", ""), sacct=(0, "", "")):
        self.answers = {"squeue": squeue, "sacct": sacct}
        self.calls = []

    def __call__(self, argv, **kwargs):
        self.calls.append(argv[0])
        if isinstance(self.answers[argv[0]], Exception):
            raise self.answers[argv[0]]
        code, out, err = self.answers[argv[0]]
        return subprocess.CompletedProcess(argv, code, out, err)


def test_slurm_query():
    run = FakeRun(squeue=(0, "12_0|RUNNING\n12_1|PENDING\n", ""), sacct=(0, "12_2|CANCELLED by 0\n12_[3-4%1]|"
                                                                              "CANCELLED by 0\n", ""))
    query = SlurmQuery(run=run)
    assert query.alive("12_0") == (True, "RUNNING")
    assert query.alive("12_1") == (True, "PENDING")
    assert query.alive("12_2") == (False, "CANCELLED")
    assert query.alive("12_4") == (False, "CANCELLED")  # a range of pending tasks, cancelled together
    assert run.calls == ["squeue", "sacct"]  # one call each per array
    assert SlurmQuery(run=FakeRun(squeue=(1, "", "slurm_load_jobs error: Invalid job id specified"))).alive("5") == \
        (False, "gone from the queue")
    assert SlurmQuery(run=FakeRun(squeue=(1, "", "Unable to contact slurm controller"))).alive("5")[0] is None
    assert SlurmQuery(run=FakeRun(squeue=FileNotFoundError("squeue"))).alive("5")[0] is None
