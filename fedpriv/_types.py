"""Type aliases shared across packages (aliases only, no logic)."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

Scalar: TypeAlias = bool | int | float | str
"""A configuration or metric value that may cross the wire."""

Arrays: TypeAlias = dict[str, npt.NDArray[np.generic]]
"""Named model tensors, in a fixed order."""
