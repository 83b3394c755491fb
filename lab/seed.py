"""Keystone registration and Jetstream2-like seeding of the slipstream lab (idempotent).

    seed.py clouds     write $SLIPSTREAM_LAB_HOME/clouds.yaml (mode 0600): `lab-admin` always,
                       `lab` once the application credential exists
    seed.py register   service users, roles, catalog (region IU), heat stack-user domain
    seed.py populate   flavours, images, external network `public`, project TRA160003 in domain
                       `access`
                       with its user, auto-allocated topology, quotas, application credential;
                       writes state/seed.json (names and ids)

Runs with Debian's /usr/bin/python3 (keystoneauth1 from the OpenStack packages): plain REST calls,
so nothing depends on an openstacksdk version. Talks only to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

LAB = Path(os.environ.get("SLIPSTREAM_LAB_HOME", "/var/tmp/slipstream-lab"))
STATE = LAB / "state"
KS = "http://127.0.0.1:5000/v3"
REGION = "IU"

# --- what the lab looks like (Jetstream2: research/jetstream2-facts.md sections 1, 5, 6) ---------
# name: (flavor id, vCPU, RAM MiB, root disk GB); RAM in MiB as Jetstream2 reports it (GB x 1024)
FLAVORS = {
    "m3.tiny": ("1", 1, 3072, 20),
    "m3.small": ("2", 2, 6144, 20),
    "m3.quad": ("3", 4, 15360, 20),
    "m3.medium": ("4", 8, 30720, 60),
    "m3.large": ("5", 16, 61440, 60),
    "m3.xl": ("7", 32, 128000, 60),
    "m3.2xl": ("8", 64, 256000, 60),
    "g3.small": ("10", 4, 15360, 60),
    "g3.medium": ("11", 8, 30720, 60),
    "g3.large": ("12", 16, 61440, 60),
    "g3.xl": ("13", 32, 122880, 60),
    "r3.large": ("14", 64, 512000, 60),
    "r3.xl": ("15", 128, 1024000, 60),
}
IMAGES = {"Featured-Ubuntu24": "24.04", "Featured-Ubuntu22": "22.04"}
PUBLIC_NET = "public"
# Servers and floating IPs get loopback addresses: the lab's guests (pylib/labguest_driver.py) bind
# them, so clients connect to exactly what Neutron reports. Neutron accepts 127/8 only without DHCP.
PUBLIC_SUBNET = (
    "public-subnet",
    "127.81.0.0/16",
    "127.81.0.1",
    "127.81.0.10",
    "127.81.255.250",
)
PROJECT_SUBNET = ("auto_allocated_subnet_v4", "127.80.0.0/16", "127.80.0.1")
SUBNET_POOL = (
    "lab-default-v4",
    "198.51.100.0/24",
    26,
)  # RFC 5737, never bound: Neutron's auto-allocation (DHCP on) refuses a loopback pool, so it
#    carves the project's first subnet here; use_loopback_subnet then replaces it by PROJECT_SUBNET
DOMAIN = "access"
PROJECT = "TRA160003"
USER = "labuser@access-ci.org"
USER_PASSWORD = "labuserpass"
APP_CRED_NAME = "slipstream-lab"
# Jetstream2 Startup/Research CPU allocation defaults: 150 cores, 585 GB RAM, 10 FIPs, 1 router
NOVA_QUOTA = {
    "cores": 150,
    "ram": 585 * 1024,
    "instances": 10,
    "key_pairs": 100,
    "server_groups": 10,
    "server_group_members": 10,
}
NEUTRON_QUOTA = {
    "floatingip": 10,
    "router": 1,
    "network": 100,
    "subnet": 100,
    "port": 500,
    "security_group": 10,
    "security_group_rule": 100,
}
CINDER_QUOTA = {"volumes": 10, "gigabytes": 1000, "snapshots": 10}

SERVICE_USERS = ["glance", "placement", "nova", "neutron", "cinder", "heat"]
CATALOG = [  # name, type, url
    ("glance", "image", "http://127.0.0.1:9292"),
    ("placement", "placement", "http://127.0.0.1:8778"),
    ("nova", "compute", "http://127.0.0.1:8774/v2.1"),
    ("neutron", "network", "http://127.0.0.1:9696"),
    ("cinderv3", "volumev3", "http://127.0.0.1:8776/v3/%(project_id)s"),
    ("cinder", "block-storage", "http://127.0.0.1:8776/v3/%(project_id)s"),
    ("heat", "orchestration", "http://127.0.0.1:8004/v1/%(tenant_id)s"),
]


class Api:
    """REST on one keystone session; `call` raises with the answer's text on a bad status."""

    def __init__(self, auth):
        self.sess = ks_session.Session(auth=auth, timeout=60)

    def call(self, method, service, path, body=None, ok=(200, 201, 202, 204), **kw):
        url = KS + path if service == "identity" else path
        filt = (
            None
            if service == "identity"
            else {"service_type": service, "interface": "public", "region_name": REGION}
        )
        r = self.sess.request(url, method, endpoint_filter=filt, json=body, raise_exc=False, **kw)
        if r.status_code not in ok:
            raise RuntimeError(f"{method} {service} {path}: HTTP {r.status_code}: {r.text[:500]}")
        if r.content and "json" in r.headers.get("content-type", ""):
            return r.json()
        return None

    def get(self, service, path, **kw):
        return self.call("GET", service, path, **kw)

    def post(self, service, path, body, **kw):
        return self.call("POST", service, path, body, **kw)

    def put(self, service, path, body=None, **kw):
        return self.call("PUT", service, path, body, **kw)


def admin() -> Api:
    return Api(
        v3.Password(
            auth_url=KS,
            username="admin",
            password="adminpass",
            project_name="admin",
            user_domain_name="Default",
            project_domain_name="Default",
        )
    )


def one(items, what):
    if len(items) > 1:
        raise RuntimeError(f"more than one {what}: {[i.get('id') for i in items]}")
    return items[0] if items else None


def ensure_identity(api: Api, kind: str, name: str, body: dict, **filters) -> dict:
    """GET /{kind}?name=..&filters, else POST. kind: projects/users/roles/domains/..."""
    found = one(
        api.get("identity", f"/{kind}", params={"name": name, **filters})[kind],
        f"{kind[:-1]} {name}",
    )
    if found:
        return found
    return api.post("identity", f"/{kind}", {kind[:-1]: {"name": name, **body}})[kind[:-1]]


# ----------------------------------------------------------------------------------- register
def register() -> None:
    api = admin()
    default = api.get("identity", "/domains/default")["domain"]
    service = ensure_identity(
        api, "projects", "service", {"domain_id": default["id"]}, domain_id=default["id"]
    )
    roles = {
        r: ensure_identity(api, "roles", r, {})
        for r in ["admin", "member", "reader", "service", "heat_stack_owner", "heat_stack_user"]
    }
    for u in SERVICE_USERS:
        user = ensure_identity(
            api,
            "users",
            u,
            {"password": "servicepass", "domain_id": default["id"]},
            domain_id=default["id"],
        )
        for r in ("admin", "service"):
            api.put(
                "identity", f"/projects/{service['id']}/users/{user['id']}/roles/{roles[r]['id']}"
            )
    for name, stype, url in CATALOG:
        svc = one(api.get("identity", f"/services?type={stype}")["services"], f"service {stype}")
        svc = (
            svc
            or api.post("identity", "/services", {"service": {"name": name, "type": stype}})[
                "service"
            ]
        )
        have = {
            e["interface"]
            for e in api.get("identity", f"/endpoints?service_id={svc['id']}&region_id={REGION}")[
                "endpoints"
            ]
        }
        for iface in {"public", "internal", "admin"} - have:
            api.post(
                "identity",
                "/endpoints",
                {
                    "endpoint": {
                        "service_id": svc["id"],
                        "interface": iface,
                        "url": url,
                        "region_id": REGION,
                    }
                },
            )
    heat = ensure_identity(api, "domains", "heat", {"description": "heat stack users"})
    hadmin = ensure_identity(
        api,
        "users",
        "heat_domain_admin",
        {"password": "servicepass", "domain_id": heat["id"]},
        domain_id=heat["id"],
    )
    api.put("identity", f"/domains/{heat['id']}/users/{hadmin['id']}/roles/{roles['admin']['id']}")
    adm = ensure_identity(api, "users", "admin", {}, domain_id=default["id"])
    adm_proj = ensure_identity(api, "projects", "admin", {}, domain_id=default["id"])
    for r in ("member", "heat_stack_owner"):
        api.put("identity", f"/projects/{adm_proj['id']}/users/{adm['id']}/roles/{roles[r]['id']}")
    print("registered:", ", ".join(sorted(t for _, t, _ in CATALOG)), "in region", REGION)


# ----------------------------------------------------------------------------------- populate
def dummy_image(name: str) -> bytes:
    head = f"slipstream lab dummy image {name}: no bootable content\n".encode()
    return head + b"\0" * (64 * 1024 - len(head))


def ensure_flavors(api: Api) -> dict:
    have = {
        f["name"]: f["id"] for f in api.get("compute", "/flavors/detail?is_public=None")["flavors"]
    }
    for name, (fid, vcpus, ram, disk) in FLAVORS.items():
        if name not in have:
            f = api.post(
                "compute",
                "/flavors",
                {
                    "flavor": {
                        "name": name,
                        "id": fid,
                        "vcpus": vcpus,
                        "ram": ram,
                        "disk": disk,
                        "os-flavor-access:is_public": True,
                    }
                },
            )["flavor"]
            have[name] = f["id"]
    return {n: have[n] for n in FLAVORS}


def ensure_images(api: Api) -> dict:
    ids = {}
    for name, version in IMAGES.items():
        img = one(
            [
                i
                for i in api.get("image", f"/v2/images?name={name}")["images"]
                if i["status"] != "deleted"
            ],
            f"image {name}",
        )
        if img is None:
            img = api.post(
                "image",
                "/v2/images",
                {
                    "name": name,
                    "disk_format": "raw",
                    "container_format": "bare",
                    "visibility": "public",
                    "os_distro": "ubuntu",
                    "os_version": version,
                    "os_type": "linux",
                },
            )
        if img["status"] == "queued":
            api.put(
                "image",
                f"/v2/images/{img['id']}/file",
                None,
                data=dummy_image(name),
                headers={"Content-Type": "application/octet-stream"},
            )
        deadline = time.time() + 60
        while api.get("image", f"/v2/images/{img['id']}")["status"] != "active":
            if time.time() > deadline:
                raise RuntimeError(f"image {name} never became active")
            time.sleep(0.5)
        ids[name] = img["id"]
    return ids


def ensure_public_network(api: Api) -> tuple[dict, dict]:
    net = one(api.get("network", f"/v2.0/networks?name={PUBLIC_NET}")["networks"], "network public")
    if net is None:
        net = api.post(
            "network",
            "/v2.0/networks",
            {
                "network": {
                    "name": PUBLIC_NET,
                    "router:external": True,
                    "is_default": True,
                    "shared": False,
                    "provider:network_type": "flat",
                    "provider:physical_network": "public",
                }
            },
        )["network"]
    name, cidr, gw, start, end = PUBLIC_SUBNET
    sub = one(
        api.get("network", f"/v2.0/subnets?network_id={net['id']}")["subnets"], "public subnet"
    )
    if sub is None:
        sub = api.post(
            "network",
            "/v2.0/subnets",
            {
                "subnet": {
                    "name": name,
                    "network_id": net["id"],
                    "ip_version": 4,
                    "cidr": cidr,
                    "gateway_ip": gw,
                    "enable_dhcp": False,
                    "allocation_pools": [{"start": start, "end": end}],
                }
            },
        )["subnet"]
    pname, prefix, plen = SUBNET_POOL
    if not api.get("network", f"/v2.0/subnetpools?name={pname}")["subnetpools"]:
        api.post(
            "network",
            "/v2.0/subnetpools",
            {
                "subnetpool": {
                    "name": pname,
                    "prefixes": [prefix],
                    "default_prefixlen": plen,
                    "is_default": True,
                    "shared": True,
                }
            },
        )
    return net, sub


def ensure_project(api: Api) -> tuple[dict, dict, dict]:
    dom = ensure_identity(api, "domains", DOMAIN, {"description": "ACCESS users (as Jetstream2)"})
    proj = ensure_identity(
        api,
        "projects",
        PROJECT,
        {
            "domain_id": dom["id"],
            "description": "lab allocation, like a Jetstream2 ACCESS allocation",
        },
        domain_id=dom["id"],
    )
    user = ensure_identity(
        api,
        "users",
        USER,
        {"password": USER_PASSWORD, "domain_id": dom["id"], "default_project_id": proj["id"]},
        domain_id=dom["id"],
    )
    member = ensure_identity(api, "roles", "member", {})
    api.put("identity", f"/projects/{proj['id']}/users/{user['id']}/roles/{member['id']}")
    return dom, proj, user


def ensure_topology(api: Api, project_id: str) -> dict:
    """Neutron's auto-allocated topology, as every Jetstream2 allocation has (made on first GET)."""
    api.get("network", f"/v2.0/auto-allocated-topology/{project_id}")
    q = f"project_id={project_id}"
    net = one(
        api.get("network", f"/v2.0/networks?name=auto_allocated_network&{q}")["networks"], "aa net"
    )
    sub = one(
        api.get("network", f"/v2.0/subnets?name=auto_allocated_subnet_v4&{q}")["subnets"],
        "aa subnet",
    )
    rtr = one(
        api.get("network", f"/v2.0/routers?name=auto_allocated_router&{q}")["routers"], "aa router"
    )
    return {
        "auto_allocated_network": net["id"],
        "auto_allocated_subnet_v4": sub["id"],
        "auto_allocated_subnet_v4_cidr": sub["cidr"],
        "auto_allocated_router": rtr["id"],
    }


def use_loopback_subnet(api: Api, project_id: str, network_id: str, router_id: str,
                        subnet=PROJECT_SUBNET) -> dict | None:
    """Give the project's network the loopback subnet (DHCP off) in place of the one
    auto-allocation made. None, with a warning, when servers already use the old subnet (a lab
    seeded before loopback ranges): those stay bookkeeping-only until `lab.sh reset`."""
    name, cidr, gateway = subnet
    subnets = api.get("network", f"/v2.0/subnets?network_id={network_id}")["subnets"]
    for sub in subnets:
        if sub["cidr"] == cidr:
            return sub
    ports = api.get("network", f"/v2.0/ports?network_id={network_id}")["ports"]
    if any(not p["device_owner"].startswith("network:") for p in ports):
        print(f"seed: WARNING: servers use {[s['cidr'] for s in subnets]} on network {network_id}: "
              f"not replaced by {cidr}; their guests cannot boot (lab.sh reset seeds afresh)")
        return None
    for sub in subnets:
        api.put("network", f"/v2.0/routers/{router_id}/remove_router_interface",
                {"subnet_id": sub["id"]}, ok=(200, 404))
        api.call("DELETE", "network", f"/v2.0/subnets/{sub['id']}", ok=(204, 404))
    sub = api.post("network", "/v2.0/subnets", {"subnet": {
        "name": name, "network_id": network_id, "project_id": project_id, "ip_version": 4,
        "cidr": cidr, "gateway_ip": gateway, "enable_dhcp": False}})["subnet"]
    api.put("network", f"/v2.0/routers/{router_id}/add_router_interface", {"subnet_id": sub["id"]})
    return sub


def set_quotas(api: Api, project_id: str) -> None:
    api.put("compute", f"/os-quota-sets/{project_id}", {"quota_set": NOVA_QUOTA})
    api.put("network", f"/v2.0/quotas/{project_id}", {"quota": NEUTRON_QUOTA})
    api.put("volumev3", f"/os-quota-sets/{project_id}", {"quota_set": CINDER_QUOTA})


def ensure_app_credential(dom: dict, proj: dict, user: dict) -> dict:
    """The user's own application credential for the project (only the owner may create it).
    Unrestricted, as Jetstream2 advises for tools that orchestrate (heat trusts, magnum)."""
    path = STATE / "appcred.json"
    uapi = Api(
        v3.Password(
            auth_url=KS,
            username=USER,
            password=USER_PASSWORD,
            user_domain_id=dom["id"],
            project_id=proj["id"],
        )
    )
    uid = user["id"]
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("user_id") == uid and uapi.call(
            "GET", "identity", f"/users/{uid}/application_credentials/{saved['id']}", ok=(200, 404)
        ):
            return saved
    for old in uapi.get(
        "identity", f"/users/{uid}/application_credentials", params={"name": APP_CRED_NAME}
    )["application_credentials"]:
        uapi.call("DELETE", "identity", f"/users/{uid}/application_credentials/{old['id']}")
    secret = secrets.token_urlsafe(32)
    cred = uapi.post(
        "identity",
        f"/users/{uid}/application_credentials",
        {
            "application_credential": {
                "name": APP_CRED_NAME,
                "secret": secret,
                "unrestricted": True,
                "description": "slipstream lab: cloud `lab` in clouds.yaml",
            }
        },
    )["application_credential"]
    saved = {
        "id": cred["id"],
        "secret": secret,
        "name": APP_CRED_NAME,
        "user_id": uid,
        "project_id": proj["id"],
    }
    write_private(path, json.dumps(saved, indent=1) + "\n")
    return saved


def populate() -> None:
    api = admin()
    t = time.time()
    flavors = ensure_flavors(api)
    images = ensure_images(api)
    net, sub = ensure_public_network(api)
    dom, proj, user = ensure_project(api)
    topo = ensure_topology(api, proj["id"])
    sub_v4 = use_loopback_subnet(
        api, proj["id"], topo["auto_allocated_network"], topo["auto_allocated_router"])
    if sub_v4:
        topo.update(auto_allocated_subnet_v4=sub_v4["id"],
                    auto_allocated_subnet_v4_cidr=sub_v4["cidr"])
    if not sub["cidr"].startswith("127."):
        print(f"seed: WARNING: floating IPs come from {sub['cidr']} (seeded before loopback "
              "ranges): they never reach a guest (lab.sh reset seeds afresh)")
    set_quotas(api, proj["id"])
    cred = ensure_app_credential(dom, proj, user)
    seed = {
        "region": REGION,
        "auth_url": KS,
        "clouds_yaml": str(LAB / "clouds.yaml"),
        "clouds": {"lab": "application credential, project " + PROJECT, "lab-admin": "admin/admin"},
        "domain": {"name": DOMAIN, "id": dom["id"]},
        "project": {"name": PROJECT, "id": proj["id"]},
        "user": {"name": USER, "id": user["id"], "password": USER_PASSWORD},
        "application_credential": {"name": APP_CRED_NAME, "id": cred["id"]},
        "flavors": flavors,
        "images": images,
        "networks": {
            "public": net["id"],
            "public_subnet": sub["id"],
            "public_cidr": sub["cidr"],
            **topo,
        },
        "quotas": {"compute": NOVA_QUOTA, "network": NEUTRON_QUOTA, "volume": CINDER_QUOTA},
    }
    (STATE / "seed.json").write_text(json.dumps(seed, indent=1) + "\n")
    print(
        f"seeded in {time.time() - t:.1f}s: {len(flavors)} flavors, images {', '.join(images)}, "
        f"network {PUBLIC_NET} ({sub['cidr']}), project {PROJECT} ({proj['id']}) user {USER}, "
        f"{topo['auto_allocated_subnet_v4_cidr']} on auto_allocated_network, "
        f"app credential {cred['id']}"
    )


# ------------------------------------------------------------------------------------- clouds
def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def clouds() -> None:
    text = f"""# slipstream lab: OpenStack on 127.0.0.1, region {REGION}. Written by lab/seed.py.
clouds:
  lab-admin:
    auth:
      auth_url: {KS}
      username: admin
      password: adminpass
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: {REGION}
    interface: public
    identity_api_version: 3
"""
    cred_file = STATE / "appcred.json"
    if cred_file.is_file():
        cred = json.loads(cred_file.read_text())
        text += f"""  lab:
    auth_type: v3applicationcredential
    auth:
      auth_url: {KS}
      application_credential_id: {cred["id"]}
      application_credential_secret: {cred["secret"]}
    region_name: {REGION}
    interface: public
    identity_api_version: 3
"""
    write_private(LAB / "clouds.yaml", text)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "clouds":
        clouds()
    elif what == "register":
        register()
    elif what == "populate":
        populate()
        clouds()
    else:
        sys.exit("usage: seed.py clouds|register|populate")
