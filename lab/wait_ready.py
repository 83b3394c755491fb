"""Block until the lab can really boot servers, create volumes and run stacks; arg: deadline (s).

READY = nova-compute/conductor/scheduler up, the compute host mapped into cell1, placement
inventory, cinder-volume/scheduler up, heat-engine up, glance and neutron answering. Every loop also
checks that each recorded service process is still alive: one that died fails at once, with the
tail of its log.
Runs with Debian's /usr/bin/python3; talks only to 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pymysql
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

LAB = Path(os.environ.get("SLIPSTREAM_LAB_HOME", "/var/tmp/slipstream-lab"))
DB_PORT = int(os.environ.get("SLIPSTREAM_LAB_DB_PORT", "13306"))
NOVA_MANAGE = LAB / "pkg/root/usr/bin/nova-manage"


def alive(record: str) -> bool:
    """record = "PID STARTTIME" as lab.sh writes it: alive while that very process runs."""
    pid, _, start = record.strip().partition(" ")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == start


def dead_services() -> list[str]:
    return [p.stem for p in sorted((LAB / "run").glob("*.pid")) if not alive(p.read_text())]


def log_tail(name: str, lines: int = 40) -> str:
    path = LAB / "logs" / f"{name}.log"
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        text = ["(no log)"]
    return f"---- last {lines} lines of {path}\n" + "\n".join(text) + "\n----"


def host_mapped() -> bool:
    conn = pymysql.connect(
        host="127.0.0.1",
        port=DB_PORT,
        user="os",
        password="ospass",
        database="nova_api",
        connect_timeout=5,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM host_mappings")
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


def main() -> int:
    deadline = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 300)
    sess = ks_session.Session(
        auth=v3.Password(
            auth_url="http://127.0.0.1:5000/v3",
            username="admin",
            password="adminpass",
            project_name="admin",
            user_domain_name="Default",
            project_domain_name="Default",
        ),
        timeout=15,
    )

    def get(service: str, path: str):
        return sess.get(
            path,
            endpoint_filter={"service_type": service, "interface": "public", "region_name": "IU"},
            raise_exc=False,
        )

    def up(services: list[dict], binary: str) -> bool:
        return any(s["binary"] == binary and s["state"] == "up" for s in services)

    discovered = False
    last = None
    while True:
        dead = dead_services()
        if dead:
            for name in dead:
                print(f"lab: ERROR: {name} exited while starting", file=sys.stderr)
                print(log_tail(name), file=sys.stderr)
            print(
                f"lab: stop what is running with: {Path(__file__).parent}/lab.sh down",
                file=sys.stderr,
            )
            return 1
        st: dict[str, bool] = {}
        try:
            nova = get("compute", "/os-services").json()["services"]
            for b in ("nova-compute", "nova-conductor", "nova-scheduler"):
                st[b] = up(nova, b)
            st["host mapped"] = host_mapped()
            if st["nova-compute"] and not st["host mapped"] and not discovered:
                discovered = True  # the scheduler also discovers every 10 s; this is just quicker
                subprocess.run(
                    [
                        str(NOVA_MANAGE),
                        "--config-file",
                        str(LAB / "etc/nova/nova.conf"),
                        "cell_v2",
                        "discover_hosts",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=120,
                    check=False,
                )
                st["host mapped"] = host_mapped()
            rps = get("placement", "/resource_providers").json()["resource_providers"]
            st["placement inventory"] = bool(rps) and bool(
                get("placement", f"/resource_providers/{rps[0]['uuid']}/inventories").json()[
                    "inventories"
                ]
            )
            cinder = get("volumev3", "/os-services").json()["services"]
            st["cinder-volume"] = up(cinder, "cinder-volume")
            st["cinder-scheduler"] = up(cinder, "cinder-scheduler")
            st["neutron"] = get("network", "/v2.0/networks").status_code == 200
            st["glance"] = get("image", "/v2/images").status_code == 200
            heat = get("orchestration", "/services").json().get("services", [])
            st["heat-engine"] = any(s.get("status") == "up" for s in heat)
            waiting = [k for k, v in st.items() if not v]
        except Exception as err:  # noqa: BLE001  services still starting
            waiting = [f"({type(err).__name__}: {str(err)[:160]})"]
        if not waiting:
            print("lab: ready:", ", ".join(st))
            return 0
        if waiting != last:
            print("lab: waiting for:", ", ".join(waiting), flush=True)
            last = waiting
        if time.time() > deadline:
            print(
                "lab: ERROR: not ready before the deadline; still waiting for:",
                ", ".join(waiting),
                file=sys.stderr,
            )
            for name in (
                "nova-compute",
                "nova-conductor",
                "nova-scheduler",
                "cinder-volume",
                "heat-engine",
            ):
                if any(name in w for w in waiting):
                    print(log_tail(name, 20), file=sys.stderr)
            return 1
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
