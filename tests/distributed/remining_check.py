"""Run under ``accelerate launch --multi_gpu --num_processes 2``: a contrastive run that re-mines its negatives.

Mines before step 0 and after step 3 of 6 (checkpoints every 3 steps). Each process writes, after
every mining pass, the step and every example's (query, positive) and negatives it then trains on, and
its weights' sums,
to ``<out>/negatives_<rank>.json``.
"""

import json
import os
import sys
from pathlib import Path

from ember_train.pipelines import contrastive, load_config
from ember_train.pipelines.remining import NegativeRemining

REPO = Path(__file__).resolve().parents[2]
model_path, out = sys.argv[1], Path(sys.argv[2])
passes: list[dict] = []
real_call = NegativeRemining.__call__


def recording_call(self: NegativeRemining, step: int) -> bool:
    changed = real_call(self, step)
    if changed:
        passes.append(
            {
                "step": step,
                "pairs": [[e.query, e.positive] for e in self.examples],
                "negatives": [list(e.negatives) for e in self.examples],
                "weights": [float(p.double().sum()) for p in self.encoder.parameters()],
            }
        )
    return changed


NegativeRemining.__call__ = recording_call
config = out / "remining.yaml"
config.write_text(
    f"task: contrastive\noutput_dir: {out / 'run'}\nseed: 3\n"
    f"model: {{name_or_path: {model_path}, max_seq_length: 24}}\n"
    f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 48}}\n"
    "loss: {num_negatives: 1}\n"
    "mining: {before_training: true, every_steps: 3, rank_window: [0, 10], margin: -1.0, max_score_ratio: null}\n"
    "train: {batch_size: 6, max_steps: 6, learning_rate: 1.0e-3, log_every: 1, checkpoint_every: 3, "
    "keep_checkpoints: 5}\nexport: {enabled: true}\n"
)
contrastive.run(load_config(str(config)))
(out / f"negatives_{os.environ['RANK']}.json").write_text(json.dumps(passes))
