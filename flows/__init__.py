"""slipstream's flows: the stories a researcher tells, each runnable from the Prefect UI, on a
schedule, from an event, or as a plain Python call."""
