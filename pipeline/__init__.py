"""The reconstruction pipeline, one sub-package per phase, in the order a job runs them:

ingest -> sparse -> dense -> surface -> export, all built on core.

`run` composes the phases for one job; `job_spec` (what was asked), `presets` (what that means),
`plan` (which backend runs each stage) and `report` (what happened) sit beside it. Phases import
core and earlier phases, never `scandrop.daemon`.
"""

from scandrop.pipeline.kernel_cache import point_numba_cache

point_numba_cache()  # before any kernel module is imported (see kernel_cache)
