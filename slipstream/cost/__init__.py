"""What work costs in Service Units, before, during and after it runs.

- :mod:`~slipstream.cost.planning`: a flow's worst case before anything exists;
- :mod:`~slipstream.cost.budget`: balances, allocations and the guard that refuses a plan;
- :mod:`~slipstream.cost.accounting`: estimates, metering from state logs, burn rates;
- :mod:`~slipstream.cost.watchdog`: the budget watch while a run holds VMs;
- :mod:`~slipstream.cost.reports` and :mod:`~slipstream.cost.burnchart`: what a run spent.
"""
