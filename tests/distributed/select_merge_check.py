"""Run by test_select_merge.py under 2 processes: select + auto merge; each process writes what it ended with.

select_merge_check.py CONFIG OUT_DIR [overrides...]
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState

from ember_train.pipelines import contrastive, load_config

config, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
scores = [0.1, 0.9, 0.5, 0.3, 0.2, 0.4]  # dev/peak at steps 1..6: best at step 2
real_flat, real_merge, seen = contrastive.flat_metrics, contrastive.merge_with_base, {}


def flat_metrics(results):
    seen["evaluations"] = seen.get("evaluations", 0) + 1
    return {**real_flat(results), "dev/peak": scores[seen["evaluations"] - 1]}


def merge_with_base(cfg, encoder, evaluators, accelerator):
    seen["encoder"] = encoder
    return real_merge(cfg, encoder, evaluators, accelerator)


contrastive.flat_metrics = flat_metrics
contrastive.merge_with_base = merge_with_base
results = contrastive.run(load_config(config, overrides))
out.mkdir(parents=True, exist_ok=True)
weights = sum(float(t.double().sum()) for t in seen["encoder"].state_dict().values())
record = {
    "evaluations": seen.get("evaluations", 0),
    "selected_step": results["selected"]["step"],
    "alpha": results["merge"]["alpha"],
    "points": results["merge"].get("points"),
    "weights": weights,
}
(out / f"rank{PartialState().process_index}.json").write_text(json.dumps(record))
