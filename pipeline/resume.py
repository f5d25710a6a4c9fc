"""Resumable job states: a state is continued only if it belongs to the same job.

Pretraining and S-LDM training keep an atomic ``last.pth`` outside their declared outputs, keyed by
a fingerprint of settings, seed, data content and code (``pipeline.provenance``); this module reads
one back or says why it is not used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch


def load_resume_state(path: Path, fingerprint: str, log: logging.Logger) -> dict | None:
    """The state at ``path`` if its fingerprint is ``fingerprint``, else None with a log line; an
    unreadable file is moved aside to ``<name>.corrupt`` (kept for inspection, never resumed)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file cannot come from atomic writes, but say so
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        log.warning("resumable state %s is unreadable (%s); moved to %s, starting over", path, err, bad)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("resumable state %s belongs to other settings, older input data or older code; starting over", path)
        return None
    return state
