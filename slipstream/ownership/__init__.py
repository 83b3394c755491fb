"""Who owns what, and when it may be deleted.

- :mod:`~slipstream.ownership.lease`: the :class:`Lease` a run holds its resources through, and
  the teardown that ends them with a proof;
- :mod:`~slipstream.ownership.ledger`: this host's record of every resource, written before the
  call that creates it is sent;
- :mod:`~slipstream.ownership.heartbeat`: a run's proof of life;
- :mod:`~slipstream.ownership.liveness`: whether a run is alive, and on what evidence;
- :mod:`~slipstream.ownership.reaper`: what ended runs left behind, and the rule for deleting it.
"""
