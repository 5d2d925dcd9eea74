"""How many validation images each end-of-training choice needs, and the fallback when there are fewer.

A class folder of 48 images leaves 7 for validation: a temperature fitted on 7 logits (0.142 in one such run) made
the calibration worse, a "best epoch" picked on 7 images is noise, and a 95th-percentile OOD threshold of 7 scores
is their maximum. Below these counts medmix says so in one warning line and takes the safe choice instead.
"""
from __future__ import annotations

import sys

# validation images needed to fit the confidence temperature; fewer: T = 1 (no calibration)
MIN_VAL_FOR_TEMPERATURE = 50
# validation images needed to pick the best epoch and stop early; fewer: every epoch is trained, the last one kept
MIN_VAL_FOR_MODEL_SELECTION = 20
# validation images needed to set the OOD threshold at 95 % of them; fewer: the training images' scores are pooled in
MIN_VAL_FOR_OOD_THRESHOLD = 20
# positives and negatives of a label on val needed to tune its multi-label threshold; fewer: that label keeps 0.5
MIN_PER_SIDE_FOR_THRESHOLD = 10


def warn(message: str, meta: dict | None = None, *, show: bool = True) -> None:
    """One ``medmix: warning: ...`` line on stderr (even under --quiet: it changes what the run contains), recorded
    in ``meta["warnings"]`` (checkpoint and metrics.json) when given."""
    if meta is not None and message not in meta.setdefault("warnings", []):
        meta["warnings"].append(message)
    if show:
        print(f"medmix: warning: {message}", file=sys.stderr, flush=True)
