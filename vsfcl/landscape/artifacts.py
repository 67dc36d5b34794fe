"""Atomic writing of the analysis outputs and JSON without silent NaN.

Every file is written to a temporary name in the target folder and moved into place
with ``os.replace``, so a reader never sees a half-written file.

JSON has no NaN, so a value that is undefined (a censored flatness, a fit that could
not run) is written as null, and the summary's ``null_reasons`` maps its key to the
reason. :func:`to_json_value` turns any NaN or infinity left in a nested structure into
null and records a reason for it, so none passes silently.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def save_arrays(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """Write arrays (tensors or NumPy arrays) to an uncompressed ``.npz`` file atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path {path} must end in .npz")
    converted = {
        name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        for name, value in arrays.items()
    }
    descriptor, temporary = _atomic_target(path)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            # NumPy's stubs read the keyword arrays as its allow_pickle flag.
            np.savez(handle, **converted)  # type: ignore[arg-type]
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically; NaN or infinity raise ``ValueError``."""
    path = Path(path)
    text = json.dumps(data, indent=2, allow_nan=False)
    descriptor, temporary = _atomic_target(path)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def to_json_value(value: Any, key: str, null_reasons: dict[str, str], reason: str) -> Any:
    """Convert tensors, arrays and floats to JSON values, mapping NaN and infinity to None.

    Parameters
    ----------
    value : Any
        A scalar, a sequence, a tensor or an array; nested lists and dicts are walked.
    key : str
        Summary key the value is stored under.
    null_reasons : dict
        Receives ``key -> reason`` when at least one entry became None and the key
        has no reason yet.
    reason : str
        Why an entry of this value can be undefined.
    """
    found_null = False

    def convert(item: Any) -> Any:
        nonlocal found_null
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().tolist()
        elif isinstance(item, np.ndarray):
            item = item.tolist()
        elif isinstance(item, np.generic):
            item = item.item()
        if isinstance(item, dict):
            return {str(k): convert(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [convert(v) for v in item]
        if isinstance(item, float) and not math.isfinite(item):
            found_null = True
            return None
        if item is None:
            found_null = True
        return item

    converted = convert(value)
    if found_null:
        null_reasons.setdefault(key, reason)
    return converted
