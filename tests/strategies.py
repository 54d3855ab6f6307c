"""Hypothesis strategies shared by all property tests (DESIGN.md, convention 5).

Bounded floats (no inf/NaN unless a test asks), shapes with odd and size-1 axes, and pairs of
shapes that broadcast against each other.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

small_dims = st.integers(min_value=1, max_value=5)


def shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 5):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side)


def arrays(shape, low: float = -3.0, high: float = 3.0, dtype=np.float64):
    """Arrays of bounded floats; float64 by default because finite differences need it."""
    return hnp.arrays(dtype, shape, elements=st.floats(low, high, allow_nan=False, width=64))


@st.composite
def broadcastable_pair(draw, max_dims: int = 3):
    """Two shapes that broadcast together (size-1 axes and missing leading axes included)."""
    shape_a, shape_b = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=max_dims,
                                                               min_side=1, max_side=4)).input_shapes
    return shape_a, shape_b
