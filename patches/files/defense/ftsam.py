#!/usr/bin/env python3
"""FT-SAM from the installed ftsam-plugin package, run the way BackdoorBench runs its own defenses:

    python ./defense/ftsam.py --result_file badnet_0_1 --yaml_path ./config/defense/ftsam/cifar10.yaml

A thin launcher (installed by ftsam-plugin's patches/apply.sh with config/defense/ftsam/*.yaml): the defense is
the package's `ftsam` entry point in the group backdoorbench.defenses, run by defense/plugin.py, exactly as
`python ./defense/plugin.py ftsam ...`. Its flags: --help; --debug shows the traceback of an error.
"""
import sys

if __name__ == "__main__":
    import plugin  # defense/plugin.py: this folder is sys.path[0] when run as a script

    sys.exit(plugin.run_script("ftsam"))
