"""Write accelerate's default launch config, unless the user already has one.

Without a launch config, ``accelerate launch`` prints a block of the defaults it chose before every
run. This writes accelerate's own default (``accelerate config default``: every GPU of this
machine, or one process without GPUs) where ``accelerate launch`` looks for it. On a machine
without GPUs it leaves ``use_cpu: false``: with ``true``, accelerate prints its thread choice
instead; ember-train gives a CPU run every physical core itself (``train.cpu_threads``).

    python scripts/write_accelerate_config.py        # run by scripts/setup.sh
"""

import json
import os

from accelerate.commands.config.config_args import default_config_file
from accelerate.utils import write_basic_config

if __name__ == "__main__":
    if os.path.isfile(default_config_file):
        print(f"setup: keeping the accelerate launch config {default_config_file}")
    else:
        write_basic_config(mixed_precision="no", save_location=default_config_file)
        with open(default_config_file) as f:
            config = json.load(f)
        config["use_cpu"] = False
        with open(default_config_file, "w") as f:
            json.dump(config, f, indent=2)
        print(f"setup: wrote accelerate's default launch config {default_config_file}")
