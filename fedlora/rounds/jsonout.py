"""Results as strict JSON: ``metrics.jsonl``'s rows and ``eval.json``."""

from __future__ import annotations

import json
import math


def json_line(value, indent: int | None = None) -> str:
    """``value`` as strict JSON (``indent``: as ``json.dumps``'s). A float that is not a finite
    number (a diverged loss; an ``agg_error`` whose ideal update is zero) is ``null``: JSON has no
    NaN or Infinity, and readers other than Python's (jq, JavaScript, Go) refuse them."""
    def strict(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        return [strict(x) for x in v] if isinstance(v, list | tuple) else v

    return json.dumps(strict(value), allow_nan=False, indent=indent)
