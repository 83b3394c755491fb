"""slipstream: provision exactly what research work needs on OpenStack clouds, run it, tear it down.

The core package. It never imports Prefect, so everything here can be used from a notebook, a
Slurm ResumeProgram or a test. Start with :mod:`slipstream.cloud` (the provider port and its two
clouds) and :class:`slipstream.ownership.lease.Lease` (ownership and guaranteed teardown).
"""

__version__ = "0.1.0"
