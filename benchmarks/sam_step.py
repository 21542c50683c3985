"""Alias: `python benchmarks/sam_step.py` runs benchmarks/bench_sam_step.py."""

import runpy
import pathlib

if __name__ == "__main__":
    runpy.run_path(str(pathlib.Path(__file__).with_name("bench_sam_step.py")), run_name="__main__")
