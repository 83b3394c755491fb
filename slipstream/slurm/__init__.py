"""An elastic Slurm cluster on cloud VMs: nodes that appear with the jobs and vanish after them.

A head-node VM runs ``slurmctld`` (and ``munged``); the worker nodes are ``State=CLOUD`` nodes
that Slurm's power saving starts and stops through ``slipstream slurm resume|suspend|resume-fail``:

- :mod:`.commands` — the one seam through which every Slurm command runs (rich errors), jobs and
  nodes read from Slurm's JSON;
- :mod:`.hostlist` — hostlists expanded by ``scontrol show hostnames``, never a shell;
- :mod:`.config` — ``slurm.conf`` for the head node and the cloud nodes;
- :mod:`.nodesetup` — user_data for the head and worker VMs;
- :mod:`.power` — resume / suspend / resume-fail and the orphan sweep, on the cloud port;
- :mod:`.attempts` — failed resumes per node: back-off, then the node is given up;
- :mod:`.jobs` — a batch of jobs: staged apart, end states kept once seen, outputs brought back;
- :mod:`.watch` — the nodes' boots and reasons as log lines while jobs wait;
- :mod:`.cluster` — standing the cluster up (head node through the run's Lease), waiting for
  jobs, metering every node (used by ``flows/slurm_cluster.py``).

Plain Python, no Prefect: Slurm runs these programs itself.
"""
