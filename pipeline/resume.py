"""Resumable job states: a state is continued only if it is intact and belongs to the same job.

Pretraining and S-LDM training keep an atomic ``last.pth`` outside their declared outputs, keyed by
a fingerprint of settings, seed, data content and code (``pipeline.provenance``). Each state is
written with a recorded content digest (``pipeline.io``), and the one it replaces is kept as
``previous.pth``: a ``last.pth`` that fails verification is set aside (never deleted) and the run
continues from ``previous.pth`` when that one is intact and its own, with a logged warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.io import IntegrityError, atomic_path, digest_path, recorded_digest, verify_digest, write_digest_record


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds pickled code (or objects other than plain data) was refused."""


class CorruptCheckpointError(RuntimeError):
    """A file that is not a readable torch checkpoint (the message names it)."""


def safe_torch_load(path: str | os.PathLike, allowed: tuple = ()) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, with ``allowed`` globals (e.g. MAE's
    ``argparse.Namespace``) by name. A file that pickles anything else (a function, a class to
    call: possibly code) is refused with ``UnsafeCheckpointError`` saying so plainly; it is never
    retried with ``weights_only=False``, whatever torch's own message suggests."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found is None:  # not a refusal: a corrupt or foreign file (never pass on torch's retry advice)
            reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
            detail = reason.group(1).strip() if reason else text.splitlines()[0]
            raise CorruptCheckpointError(f"{path}: not a readable torch checkpoint ({detail})") from None
        raise UnsafeCheckpointError(
            f"{path}: refused: the file holds pickled code or objects other than tensors and plain data "
            f"(it references {found.group(1)}); checkpoints are only ever loaded as data, never executed"
        ) from None


PREVIOUS_NAME = "previous.pth"

# the rule of a healthy state (``WeightHealth``): weights at most this factor x the initial weights'
# largest magnitude, and one step's update at most this fraction of the weights' norm
MAX_WEIGHT_FACTOR = 100.0
MAX_UPDATE_RATIO = 0.5


class UnhealthyWeightsError(RuntimeError):
    """A training step left non-finite, exploded or violently moved weights; the message names the
    step, what broke the rule and the state kept (the last one whose every step passed)."""


class WeightHealth:
    """When a state is good enough to keep ("last good"): the weights and the update size, not only
    the loss.

    The rule, checked after every optimizer step (``check``) of pretraining and S-LDM training,
    before any state of that step can be saved:

    1. every weight is finite;
    2. the largest weight magnitude is at most ``MAX_WEIGHT_FACTOR`` (100) x that of the initial
       weights (the seeded initialization, measured before any resume: a LayerNorm's ones make it
       at least 1);
    3. the step's update is small relative to the weights: ``||w_after - w_before|| / ||w_before||
       <= MAX_UPDATE_RATIO`` (0.5), all parameters taken as one vector (a healthy AdamW step moves
       them by ~lr / RMS(w), well under 1 %; the huge-lr step this guards against moves them by
       several times their norm).

    A step that breaks it raises ``UnhealthyWeightsError`` without saving, so the state a retry
    resumes from (``last.pth``) is one whose every step passed this rule and the loss rule. Costs
    one copy of the weights (the snapshot before the step) and three reductions per step.
    """

    def __init__(
        self, parameters, max_weight_factor: float = MAX_WEIGHT_FACTOR, max_update_ratio: float = MAX_UPDATE_RATIO
    ):
        self.params = [p for p in parameters]
        with torch.no_grad():
            self.initial_max = max(float(p.detach().abs().max()) for p in self.params if p.numel())
        self.bound = max_weight_factor * max(self.initial_max, 1e-12)
        self.max_update_ratio = float(max_update_ratio)
        self.before = [p.detach().clone() for p in self.params]

    def snapshot(self) -> None:
        """Take the current weights as those before the next step (after a resume, say)."""
        with torch.no_grad():
            for b, p in zip(self.before, self.params):
                b.copy_(p.detach())

    def measure(self) -> tuple[bool, float, float]:
        """(all finite, largest |w|, ||w - w_before|| / ||w_before||) of the current weights."""
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
            largest = torch.stack([p.detach().abs().max() for p in self.params if p.numel()]).max()
            delta = torch.linalg.vector_norm(
                torch.stack(
                    [torch.linalg.vector_norm((p.detach() - b).float()) for p, b in zip(self.params, self.before)]
                )
            )
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b.float()) for b in self.before]))
            values = torch.stack([finite.float(), largest.float(), delta / norm.clamp_min(1e-12)]).tolist()
        return bool(values[0]), values[1], values[2]

    def check(self, step: int, keeping: str) -> None:
        """Apply the rule to the weights after ``step``'s update; then they are the next snapshot."""
        finite, largest, ratio = self.measure()
        problem = None
        if not finite:
            problem = "non-finite weights"
        elif largest > self.bound:
            problem = (
                f"largest weight magnitude {largest:.4g} > {self.bound / max(self.initial_max, 1e-12):g} x the "
                f"initial weights' {self.initial_max:.4g}"
            )
        elif ratio > self.max_update_ratio:
            problem = f"update of {ratio:.3g} x the weights' norm (||dw|| / ||w|| > {self.max_update_ratio:g})"
        if problem is not None:
            raise UnhealthyWeightsError(
                f"diverged weights after the update of step {step}: {problem}; stopped before saving, keeping "
                f"{keeping} (lower the learning rate, or lengthen the warm-up)"
            )
        self.snapshot()


def previous_state_path(path: str | os.PathLike) -> Path:
    """Where the state replaced by the latest ``save_resume_state`` is kept."""
    return Path(path).with_name(PREVIOUS_NAME)


def _move_with_digest(src: Path, dst: Path) -> None:
    """Rename ``src`` and its recorded digest (if any) onto ``dst``: the record is copied first, so
    a kill at any point leaves ``src`` or ``dst`` beside its own digest (a resumable state is never
    lost to a kill between two renames)."""
    record = recorded_digest(src)
    if record is None:
        digest_path(dst).unlink(missing_ok=True)
    else:
        write_digest_record(dst, record)
    os.replace(src, dst)
    digest_path(src).unlink(missing_ok=True)


def _canonical(obj: Any) -> Any:
    """``obj`` with fresh containers and interned strings, so its pickle does not depend on which
    objects happened to be shared (a resumed optimizer's param groups are copies, a fresh one's
    share their defaults): the same content always gives the same bytes."""
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):  # exactly: subclasses (torch.Size, named tuples) stay as they are
        return type(obj)(_canonical(v) for v in obj)
    if isinstance(obj, str):
        return sys.intern(obj)
    return obj


def save_torch_file(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of checkpoints and states: atomic, with the content digest recorded beside the
    file (verified by every loader), and byte-deterministic (same content -> same bytes)."""
    with atomic_path(path, digest=True) as tmp:
        with open(tmp, "wb") as fh:  # a file object: the archive's inner name is not the temp file's
            torch.save(_canonical(obj), fh)


def save_resume_state(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` (``save_torch_file``); the state it replaces becomes
    ``previous.pth`` (the fallback of ``load_resume_state``)."""
    path = Path(path)
    if path.exists():
        _move_with_digest(path, previous_state_path(path))
    save_torch_file(state, path)


def _read_intact(path: Path, log: logging.Logger) -> dict | None:
    """The state at ``path`` if it passes its digest and loads; otherwise None, with the file (and
    its digest record) moved aside to ``<name>.corrupt`` for inspection and a warning."""
    try:
        verify_digest(path, required=True)
        state = safe_torch_load(path)
        if not isinstance(state, dict):
            raise IntegrityError(f"{path}: holds a {type(state).__name__}, not a resumable state")
    except Exception as err:  # digest mismatch or missing, truncated or foreign file
        bad = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(FileNotFoundError):  # another DDP rank set it aside first
            _move_with_digest(path, bad)
        log.warning("resumable state %s failed verification (%s); moved to %s, not resumed from", path, err, bad)
        return None
    return state


def load_resume_state(path: str | os.PathLike, fingerprint: str, log: logging.Logger) -> dict | None:
    """The state to continue from: ``path`` if intact and of this job (``fingerprint``), else the
    intact ``previous.pth`` of this job, else None (start over) — every fallback logged. A
    ``previous.pth`` of this job also outlives one ``last.pth`` written for other inputs (a
    broken bag that got as far as training), so restoring the inputs resumes the finished work."""
    path = Path(path)
    for candidate in (path, previous_state_path(path)):
        if not candidate.exists():
            continue
        state = _read_intact(candidate, log)
        if state is None:
            continue
        if state.get("fingerprint") != fingerprint:
            log.warning("resumable state %s belongs to other settings, older input data or older code", candidate)
            continue
        if candidate != path:
            log.warning("resuming from the previous good state %s instead of %s", candidate, path)
        state["resumed_from"] = str(candidate)  # for the caller's log line
        return state
    log.info("no resumable state of this job in %s; starting over", path.parent)
    return None
