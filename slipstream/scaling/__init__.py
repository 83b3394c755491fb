"""Elastic pools of worker VMs: one scaling core shared by the Dask and Slurm adapters.

- :mod:`slipstream.scaling.reconciler` — reconciliation written as a table from what was
  observed to what to do, so that every case can be read, and tested, on its own line.
- :mod:`slipstream.scaling.policy` — how many workers of which flavour to hold (batches,
  cooldown, boot-time awareness, the cheapest flavour that fits), and the baselines as configs.
- :mod:`slipstream.scaling.idle` — delete or park (shelve, 0 SU) a released worker; never
  suspend a GPU VM.
- :mod:`slipstream.scaling.pool` — the pool's VMs: batch launch through a Lease, park/unpark,
  and the worker reconciliation table (:data:`~slipstream.scaling.pool.WORKER_TABLE`).
"""
