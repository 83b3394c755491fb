"""Elastic pools of worker VMs: one scaling core shared by the Dask and Slurm adapters.

- :mod:`slipstream.scaling.reconciler` — reconciliation written as a table from what was
  observed to what to do, so that every case can be read, and tested, on its own line.
"""
