"""`ftsam grid GRID.yaml`: a grid of `ftsam defend` runs (records x defenses x settings x seeds), run through
submitit on Slurm (one job array), on this machine (N processes) or in process, idempotently.

One concern per file, read in this order:

    spec.py        the grid file: parsing, checking, expansion into cells
    cells.py       a cell: its identity, result folder, record view and JSON summary
    cell_lock.py   one writer per cell across machines: the lock file and the stale-lock rule
    slurm.py       asking Slurm whether a job still lives (squeue, sacct)
    state.py       a cell's state (done / running / queued / interrupted / failed / pending / conflict)
    worker.py      the job of one cell: runs the defense in process and writes the summary
    executors.py   slurm / local / debug, each through submitit (a registry)
    cli.py         the `ftsam grid` command
"""
