"""End-to-end check of the slipstream lab as a Jetstream2 user would see it.

Cloud `lab` from $SLIPSTREAM_LAB_HOME/clouds.yaml (application credential of the non-admin project
TRA160003, region IU), with the repo's openstacksdk (`lab.sh smoke` runs it with .venv/bin/python):
flavours and images are there; a keypair; a server on auto_allocated_network, ACTIVE; a floating
IP from `public` attached to it; a volume attached; a small Heat stack; then everything is deleted
and the project is confirmed empty. Every wait has a deadline. Only 127.0.0.1 is contacted here;
the server boots a guest on its 127.x address (pylib/labguest_driver.py), which the lab tests
connect to (tests/integration/test_lab_guests.py).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import openstack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

LAB = Path(os.environ.get("SLIPSTREAM_LAB_HOME", "/var/tmp/slipstream-lab"))
FLAVORS = [
    "m3.tiny",
    "m3.small",
    "m3.quad",
    "m3.medium",
    "m3.large",
    "m3.xl",
    "m3.2xl",
    "r3.large",
    "r3.xl",
    "g3.small",
    "g3.medium",
    "g3.large",
    "g3.xl",
]
IMAGES = ["Featured-Ubuntu24", "Featured-Ubuntu22"]
TIMINGS: dict[str, float] = {}


class Step:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t = time.monotonic()
        return self

    def __exit__(self, *exc):
        TIMINGS[self.name] = round(time.monotonic() - self.t, 1)


def wait(what: str, probe, timeout: float = 120, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f}s")
        time.sleep(interval)


def public_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def main() -> int:
    os.environ["OS_CLIENT_CONFIG_FILE"] = str(LAB / "clouds.yaml")
    c = openstack.connect(cloud="lab")
    tag = f"lab-smoke-{uuid.uuid4().hex[:6]}"
    created: list[tuple[str, object]] = []
    with Step("auth"):
        access = c.session.auth.get_access(c.session)
    from importlib.metadata import version

    print(
        f"openstacksdk {version('openstacksdk')}; cloud lab: project {access.project_name} "
        f"({access.project_id}), user {access.username}, region {c.config.region_name}"
    )
    assert access.project_name == "TRA160003", access.project_name
    assert c.config.region_name == "IU"

    with Step("list flavors/images/networks"):
        flavors = {f.name: f for f in c.compute.flavors()}
        missing = [f for f in FLAVORS if f not in flavors]
        assert not missing, f"flavours missing: {missing}"
        images = {i.name: i for i in c.image.images()}
        assert all(i in images for i in IMAGES), f"images: {sorted(images)}"
        net = c.network.find_network("auto_allocated_network")
        public = c.network.find_network("public")
        assert net and public and public.is_router_external, (net, public)
    print(
        "flavours:",
        ", ".join(
            f"{n}({flavors[n].vcpus}c/{flavors[n].ram}M/{flavors[n].disk}G)" for n in FLAVORS
        ),
    )
    limits = c.compute.get_limits().absolute
    print(
        f"compute quota: cores {limits.total_cores} ram {limits.total_ram} MiB "
        f"instances {limits.instances}"
    )

    try:
        with Step("keypair"):
            kp = c.compute.create_keypair(name=tag, public_key=public_key())
            created.append(("keypair", kp))
        with Step("server ACTIVE"):
            server = c.compute.create_server(
                name=tag,
                image_id=images["Featured-Ubuntu24"].id,
                flavor_id=flavors["m3.tiny"].id,
                networks=[{"uuid": net.id}],
                key_name=kp.name,
            )
            created.append(("server", server))
            server = c.compute.wait_for_server(server, status="ACTIVE", wait=120, interval=1)
        port = next(iter(c.network.ports(device_id=server.id)))
        with Step("floating ip create+attach"):
            fip = c.network.create_ip(floating_network_id=public.id)
            created.append(("floating_ip", fip))
            fip = c.network.update_ip(fip, port_id=port.id)
            assert (
                fip.port_id == port.id and fip.fixed_ip_address == port.fixed_ips[0]["ip_address"]
            )
        print(
            f"server {server.id} ACTIVE, fixed {port.fixed_ips[0]['ip_address']}, "
            f"floating {fip.floating_ip_address} (records only: nothing is plumbed)"
        )
        with Step("volume create+attach"):
            vol = c.block_storage.create_volume(size=1, name=tag)
            created.append(("volume", vol))
            c.block_storage.wait_for_status(vol, "available", wait=60, interval=0.5)
            c.compute.create_volume_attachment(server, volume_id=vol.id)
            c.block_storage.wait_for_status(vol, "in-use", wait=60, interval=0.5)
        with Step("heat stack create"):
            template = {
                "heat_template_version": "2018-08-31",
                "resources": {
                    "rnd": {"type": "OS::Heat::RandomString", "properties": {"length": 8}},
                    "sg": {
                        "type": "OS::Neutron::SecurityGroup",
                        "properties": {
                            "name": f"{tag}-sg",
                            "rules": [
                                {"protocol": "tcp", "port_range_min": 22, "port_range_max": 22}
                            ],
                        },
                    },
                },
            }
            body = c.orchestration.post(
                "/stacks", json={"stack_name": tag, "template": template, "timeout_mins": 5}
            ).json()
            stack_id = body["stack"]["id"]
            created.append(("stack", stack_id))
            st = wait("stack create", lambda: settled_stack(c, tag, stack_id), 120)
            assert st["stack_status"] == "CREATE_COMPLETE", (
                st["stack_status"],
                st.get("stack_status_reason"),
            )
    finally:
        with Step("teardown"):
            teardown(c, created, tag)
    with Step("confirm empty"):
        left = {
            "servers": [s.name for s in c.compute.servers()],
            "floating_ips": [
                f.floating_ip_address for f in c.network.ips(project_id=access.project_id)
            ],
            "keypairs": [k.name for k in c.compute.keypairs()],
            "volumes": [v.name for v in c.block_storage.volumes()],
            "stacks": [s["stack_name"] for s in c.orchestration.get("/stacks").json()["stacks"]],
        }
        mine = {k: [n for n in v if n and tag in str(n)] for k, v in left.items()}
        assert not any(mine.values()), f"smoke resources left behind: {mine}"
        others = {k: v for k, v in left.items() if v}
    print(
        "project empty"
        if not others
        else f"WARNING: the project holds resources smoke did not create: {others}"
    )
    print("timings (s):", TIMINGS)
    print("SMOKE OK")
    return 0


def settled_stack(c, name: str, stack_id: str) -> dict | None:
    """The stack once it is no longer *_IN_PROGRESS, else None."""
    st = c.orchestration.get(f"/stacks/{name}/{stack_id}").json()["stack"]
    return None if st["stack_status"].endswith("IN_PROGRESS") else st


def teardown(c, created, tag) -> None:
    order = ["stack", "floating_ip", "server", "volume", "keypair"]  # deleting the server detaches
    for kind, res in sorted(created, key=lambda kr: order.index(kr[0])):
        try:
            if kind == "stack":
                c.orchestration.delete(f"/stacks/{tag}/{res}")
                st = wait("stack delete", lambda sid=res: settled_stack(c, tag, sid), 120)
                assert st["stack_status"] == "DELETE_COMPLETE", st["stack_status"]
            elif kind == "volume":
                wait(
                    "volume detach",
                    lambda v=res: c.block_storage.get_volume(v).status in ("available", "error"),
                    120,
                )
                c.block_storage.delete_volume(res)
                c.block_storage.wait_for_delete(res, wait=60, interval=0.5)
            elif kind == "floating_ip":
                c.network.delete_ip(res)
            elif kind == "server":
                c.compute.delete_server(res)
                c.compute.wait_for_delete(res, wait=120, interval=0.5)
            elif kind == "keypair":
                c.compute.delete_keypair(res)
        except Exception as err:  # noqa: BLE001  keep tearing down the rest, then fail below
            print(f"teardown of {kind} failed: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
