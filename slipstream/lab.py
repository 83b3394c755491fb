"""The OpenStack lab from Python: a real, minimal OpenStack on this machine (``lab/lab.sh``).

Debian's OpenStack (Keystone, Placement, Glance, Nova whose servers boot LocalCloud's guest runtime on
127.x addresses, Neutron without agents, Cinder without data, Heat) plus MariaDB and RabbitMQ, all on 127.0.0.1, seeded like
Jetstream2: region ``IU``, the m3/r3/g3 flavours, Featured-Ubuntu24/22 images, the external network
``public``, project ``TRA160003`` (domain ``access``) with its auto-allocated network, quotas and an
application credential. Needs root on Debian/Ubuntu (``lab/lab.sh install`` uses apt-get).

    up()      start it (first time: DBs, catalog, seeding; about a minute), wait until READY
    down()    stop every process the lab started (recorded PID / process group); verify none is left
    status()  one line per service and a summary

Each returns the script's exit code (0 = success; ``status()``: 0 running, 3 stopped, 1 degraded)
and prints to stdout unless ``echo=False``; :func:`read_status` returns a :class:`LabStatus`.
Clients use ``clouds_yaml()`` with cloud ``lab`` (the non-admin application credential) or
``lab-admin``. State lives in ``$SLIPSTREAM_LAB_HOME`` (default ``/var/tmp/slipstream-lab``).
This module never imports Prefect or openstacksdk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOME = Path("/var/tmp/slipstream-lab")
CLOUD = "lab"
ADMIN_CLOUD = "lab-admin"
UP_TIMEOUT = 600.0  # seconds: lab.sh's own deadline for `up` (every wait inside it has one)


class LabError(RuntimeError):
    """The lab script could not be run, or did not answer in time."""


def lab_home() -> Path:
    return Path(os.environ.get("SLIPSTREAM_LAB_HOME") or DEFAULT_HOME)


def clouds_yaml() -> Path:
    return lab_home() / "clouds.yaml"


def lab_script() -> Path:
    """lab/lab.sh of this checkout (override: ``SLIPSTREAM_LAB_SCRIPT``)."""
    explicit = os.environ.get("SLIPSTREAM_LAB_SCRIPT")
    return Path(explicit) if explicit else Path(__file__).resolve().parent.parent / "lab" / "lab.sh"


@dataclass(frozen=True)
class ServiceState:
    name: str
    state: str  # "up", "dead" (recorded but gone) or "down" (not started)
    pid: int | None


@dataclass(frozen=True)
class LabStatus:
    home: Path
    services: tuple[ServiceState, ...]
    seed: dict = field(default_factory=dict)  # state/seed.json: names and ids of what was seeded

    @property
    def running(self) -> bool:
        return bool(self.services) and all(s.state == "up" for s in self.services)

    @property
    def stopped(self) -> bool:
        return all(s.state != "up" for s in self.services)

    @property
    def clouds_yaml(self) -> Path:
        return self.home / "clouds.yaml"

    def summary(self) -> str:
        up = sum(s.state == "up" for s in self.services)
        state = "running" if self.running else "stopped" if self.stopped else "degraded"
        lines = [f"lab {state}: {up}/{len(self.services)} services up, home {self.home}"]
        bad = [f"{s.name} ({s.state})" for s in self.services if s.state != "up"]
        if bad and not self.stopped:
            lines.append("not up: " + ", ".join(bad))
        if self.running:
            project = self.seed.get("project", {}).get("name", "?")
            region = self.seed.get("region", "?")
            lines.append(
                f"OS_CLIENT_CONFIG_FILE={self.clouds_yaml}  clouds: {CLOUD} (application "
                f"credential, project {project}, region {region}), {ADMIN_CLOUD}"
            )
        return "\n".join(lines)


def _run(
    action: str, *, echo: bool, timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    script = lab_script()
    if not script.is_file():
        raise LabError(f"lab script not found at {script}")
    env = dict(os.environ, SLIPSTREAM_LAB_HOME=str(lab_home()), **(env or {}))
    try:
        return subprocess.run(
            ["bash", str(script), action],
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            stdout=None if echo else subprocess.PIPE,
            stderr=None if echo else subprocess.STDOUT,
            text=True,
            check=False,
        )
    except subprocess.TimeoutExpired as err:  # subprocess.run kills the script it started
        raise LabError(f"`lab.sh {action}` did not finish within {timeout:.0f}s") from err


def read_status() -> LabStatus:
    """The state of every lab service, from ``lab.sh status`` (recorded PIDs checked in /proc)."""
    proc = _run("status", echo=False, timeout=60)
    services = []
    for line in (proc.stdout or "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("up", "dead", "down"):
            services.append(
                ServiceState(parts[1], parts[0], int(parts[2]) if parts[2].isdigit() else None)
            )
    if not services:
        raise LabError(f"`lab.sh status` said nothing usable: {(proc.stdout or '')[-300:]}")
    seed_file = lab_home() / "state" / "seed.json"
    try:
        seed = json.loads(seed_file.read_text())
    except (OSError, ValueError):
        seed = {}
    return LabStatus(home=lab_home(), services=tuple(services), seed=seed)


def up(*, echo: bool = True, timeout: float = UP_TIMEOUT) -> int:
    """Install what is missing, start the lab and wait until it is READY (idempotent)."""
    code = _run(
        "up",
        echo=echo,
        timeout=timeout + 900,  # + a first-time apt install
        env={"SLIPSTREAM_LAB_TIMEOUT": str(int(timeout))},
    ).returncode
    if echo:
        print(read_status().summary())
    return code


def down(*, echo: bool = True) -> int:
    """Stop everything the lab started and verify that nothing of it is left running."""
    code = _run("down", echo=echo, timeout=300).returncode
    if echo:
        print(read_status().summary())
    return code


def status(*, echo: bool = True) -> int:
    """0 when every service runs, 3 when the lab is stopped, 1 when it is degraded."""
    st = read_status()
    if echo:
        for s in st.services:
            print(f"{s.state:5} {s.name:16} {s.pid or '-'}")
        print(st.summary())
    return 0 if st.running else 3 if st.stopped else 1


def smoke(*, echo: bool = True) -> int:
    """End-to-end check as the non-admin user (server, floating IP, volume, stack; all deleted)."""
    return _run("smoke", echo=echo, timeout=900).returncode


if __name__ == "__main__":  # python -m slipstream.lab up|down|status|smoke
    actions = {"up": up, "down": down, "status": status, "smoke": smoke}
    if len(sys.argv) != 2 or sys.argv[1] not in actions:
        sys.exit("usage: python -m slipstream.lab up|down|status|smoke")
    sys.exit(actions[sys.argv[1]]())
