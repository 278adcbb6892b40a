"""Train an embedding model from one YAML config.

accelerate launch train.py --config configs/quickstart.yaml [section.key=value ...]
python train.py --config configs/quickstart.yaml train.max_steps=10
"""

import sys

from ember_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
