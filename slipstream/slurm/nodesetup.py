"""user_data for the head node and the worker nodes of an elastic Slurm cluster.

- :func:`head_user_data` — the head node starts ``munged`` and ``slurmctld -D``;
- :func:`worker_user_data` — a worker starts ``slurmd -D -b -N <its name>`` (``-b``: report a
  fresh boot, else slurmctld ignores a registration older than its resume request).

Daemons run in the foreground, as children of user_data, so they belong to the VM: deleting the
VM ends them. A worker's node name is its VM's name (``SLIPSTREAM_VM_NAME`` on the local cloud,
the hostname Nova gives it elsewhere), so one user_data serves every VM of a batch.

On the local cloud (``settings.loopback``) the daemons run on this host, each with a hostname of
its own (``unshare --uts``) set to its VM's 127.x address, which is the address Slurm binds
(``NoInAddrAny``). On real images (Featured-Ubuntu24/22, Featured-RockyLinux9) the scripts install
Slurm, munge and Apptainer if missing and check ``apptainer --version``; the local cloud cannot run
Apptainer (no image, no user namespaces for containers), so nothing there calls it.
"""

from __future__ import annotations

import base64
import shlex

from slipstream.slurm.config import ClusterSettings, render_gres_conf, render_slurm_conf

_WAIT = """\
wait_for() {  # wait_for <test> <path> <what>: at most 60 s
  i=0
  while ! test "$1" "$2"; do
    i=$((i + 1)); [ "$i" -gt 600 ] && { echo "slipstream: $3 did not appear: $2" >&2; exit 1; }
    sleep 0.1
  done
}
"""


def head_user_data(s: ClusterSettings) -> str:
    """The head node: munged, then slurmctld once slurm.conf is written (the flow writes it when
    it knows the head's address)."""
    if not s.loopback:
        return _real_head(s)
    q = shlex.quote
    d, m = s.dir, s.dir / "munge"
    return f"""#!/bin/sh
# slipstream: head node of Slurm cluster {s.name} (munged + slurmctld)
set -e
umask 077
{_WAIT}mkdir -p {q(str(m))} {q(str(d / 'state'))} {q(str(d / 'log'))}
[ -s {q(str(m / 'munge.key'))} ] || dd if=/dev/urandom of={q(str(m / 'munge.key'))} bs=1024 count=1 2>/dev/null
munged -F -f --socket={q(str(s.munge_socket))} --key-file={q(str(m / 'munge.key'))} \\
  --pid-file={q(str(m / 'munged.pid'))} --log-file={q(str(m / 'munged.log'))} --seed-file={q(str(m / 'munged.seed'))} &
wait_for -S {q(str(s.munge_socket))} munged
wait_for -f {q(str(s.conf_path))} slurm.conf
echo "slipstream: starting slurmctld for {s.name} on $SLIPSTREAM_VM_ADDRESS"
export SLURM_CONF={q(str(s.conf_path))}  # the daemons find gres.conf next to it
exec unshare --uts sh -c 'hostname "$1" && exec slurmctld -D -f "$2"' sh "$SLIPSTREAM_VM_ADDRESS" "$SLURM_CONF"
"""


def worker_user_data(s: ClusterSettings) -> str:
    """A worker node: slurmd for the node named like the VM."""
    if not s.loopback:
        return _real_worker(s)
    q = shlex.quote
    return f"""#!/bin/sh
# slipstream: worker node of Slurm cluster {s.name} (slurmd)
set -e
NODE="${{SLIPSTREAM_VM_NAME:-$(hostname -s)}}"
case "$NODE" in ''|*[!a-z0-9-]*) echo "slipstream: bad node name $NODE" >&2; exit 1;; esac
mkdir -p {q(str(s.dir / 'spool'))}/"$NODE"
echo "slipstream: starting slurmd -N $NODE on $SLIPSTREAM_VM_ADDRESS"
export SLURM_CONF={q(str(s.conf_path))}  # slurmd reads gres.conf next to $SLURM_CONF, whatever -f says
exec unshare --uts sh -c 'hostname "$1" && exec slurmd -D -b -N "$2" -f "$3"' sh "$SLIPSTREAM_VM_ADDRESS" "$NODE" "$SLURM_CONF"
"""


# real images -------------------------------------------------------------------------------
_INSTALL = """\
have() { command -v "$1" >/dev/null 2>&1; }
install_pkgs() {  # Ubuntu (Featured-Ubuntu*) or Rocky (Featured-RockyLinux*)
  if have apt-get; then DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
  else dnf install -y -q epel-release && dnf install -y -q "$@"; fi
}
ensure_apptainer() {  # Jetstream2 virtual clusters offer Apptainer; install it when the image lacks it
  if ! have apptainer; then
    if have apt-get; then add-apt-repository -y ppa:apptainer/ppa && install_pkgs apptainer; else install_pkgs apptainer; fi
  fi
  apptainer --version   # the check: fails the boot (and so the resume) if Apptainer is unusable
}
"""


def _files(s: ClusterSettings, munge_key_b64: str) -> str:
    conf = base64.b64encode(render_slurm_conf(s).encode()).decode()
    return (f"mkdir -p /etc/slurm /etc/munge {shlex.quote(str(s.dir))}/log {shlex.quote(str(s.dir))}/spool\n"
            f"echo {conf} | base64 -d > /etc/slurm/slurm.conf\n"
            f"echo {base64.b64encode(render_gres_conf(s).encode()).decode()} | base64 -d > /etc/slurm/gres.conf\n"
            f"echo {munge_key_b64} | base64 -d > /etc/munge/munge.key\n"
            "chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key\n"
            "systemctl enable --now munge\n")


def _real_head(s: ClusterSettings, munge_key_b64: str = "") -> str:
    return ("#!/bin/bash\n# slipstream: head node of Slurm cluster " + s.name + " (real image)\nset -euo pipefail\n"
            + _INSTALL + "have slurmctld || install_pkgs slurmctld munge slurm-client\n"
            + _files(s, munge_key_b64 or "$SLIPSTREAM_MUNGE_KEY")
            + "systemctl enable --now slurmctld\n")


def node_name_script(cluster: str) -> str:
    """Shell functions setting ``NODE`` to this VM's Slurm node name: its Nova name, read from the
    metadata service. Nova names a batch ``<first node>-<i>`` and the resume program renames the
    servers right after, so a name counts only once it is ``<cluster>-<number>``."""
    prefix = shlex.quote(f"{cluster}-")
    return f"""\
node_name() {{
  python3 -c 'import json, sys, urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1], timeout=5))["name"])' \\
    "${{SLIPSTREAM_METADATA_URL:-http://169.254.169.254/openstack/latest/meta_data.json}}"
}}
wait_for_node_name() {{
  NODE=""
  for _ in $(seq "${{SLIPSTREAM_NAME_TRIES:-120}}"); do
    NODE=$(node_name 2>/dev/null || true)
    number=${{NODE#{prefix}}}
    if [ "$number" != "$NODE" ]; then case "$number" in ''|*[!0-9]*) ;; *) return 0;; esac; fi
    sleep "${{SLIPSTREAM_NAME_WAIT:-5}}"
  done
  echo "slipstream: no node name of this cluster from the metadata service (last: ${{NODE:-none}})" >&2
  return 1
}}
"""


def _real_worker(s: ClusterSettings, munge_key_b64: str = "") -> str:
    return ("#!/bin/bash\n# slipstream: worker node of Slurm cluster " + s.name + " (real image)\nset -euo pipefail\n"
            + _INSTALL + node_name_script(s.name) + "wait_for_node_name\n"
            + "have slurmd || install_pkgs slurmd munge\nensure_apptainer\n"
            + _files(s, munge_key_b64 or "$SLIPSTREAM_MUNGE_KEY")
            + 'mkdir -p /etc/default && echo "SLURMD_OPTIONS=-b -N $NODE" > /etc/default/slurmd\n'
            + "systemctl enable --now slurmd\n")
