"""Low-level ops: importance, inclusion probabilities, sampling, rescaling, the fused step.

Each op is defined once, in ``units`` (the ops on one tensor) or ``step`` (the fused step; its
``torch.library`` encoding in ``encoding``): it validates its inputs (errors name the argument),
then runs on the backend chosen by ``fastmask.backends.registry`` (``backend=`` argument, else
``FASTMASK_BACKEND``, else auto).
Units are elements, or dim-0 slices with ``granularity="row"``; a unit's random number is
U(seed, stream, unit index), the counter RNG of DESIGN §4, so masks agree across backends
and devices.
"""

from __future__ import annotations

from .. import backends  # noqa: F401  (registers every backend's implementations)
from ..backends.registry import BACKENDS, BackendUnavailableError, backend_report, resolve
from .step import masked_step_, masked_step_finish, masked_step_sums
from .units import fisher_update_, inclusion_probs, sample_exact, sample_mask, unbiased_rescale

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend_report",
    "fisher_update_",
    "inclusion_probs",
    "masked_step_",
    "masked_step_finish",
    "masked_step_sums",
    "resolve",
    "sample_exact",
    "sample_mask",
    "unbiased_rescale",
]
