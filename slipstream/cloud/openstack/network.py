"""Floating IPs, security groups and networks of OpenStackCloud, on Neutron's proxy (``conn.network``).

Security groups go to Nova by id (a name two groups share is refused); ``auto_allocated_network``
is made through Neutron's auto-allocated-topology API when a fresh project has none yet.

Neutron cannot take tags in a create request on every release, so a floating IP is created with
its run in the ``description`` (one request: ownership can never be missing) and tagged right
after. A crash between the two leaves an untagged address whose description still names the run;
:meth:`list_floating_ips` reads both.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

from slipstream.cloud.errors import CloudError, Conflict, InvalidRequest, NotFound, TransientError
from slipstream.cloud.models import OWNER_TAG, FloatingIP, Ownership
from slipstream.cloud.openstack import convert
from slipstream.cloud.openstack.base import OpenStackBase, has_owner_tag, log
from slipstream.retry import retry

SSH_GROUP_PREFIX = "slipstream-ssh-"
AUTO_ALLOCATED_NETWORK = "auto_allocated_network"


def _fip_owned(fip) -> bool:
    return has_owner_tag(fip) or bool(convert.tags_from_description(fip.description))


class NetworkOperations(OpenStackBase):
    # floating IPs ---------------------------------------------------------------------
    def create_floating_ip(self, owner: Ownership) -> FloatingIP:
        network_id = self._network_id(self.external_network, external=True)
        fip = self._call(
            "creating a floating IP",
            lambda: self.conn.network.create_ip(
                floating_network_id=network_id, description=convert.owner_description(owner)
            ),
            f"network {self.external_network}",
        )
        self._remember("floating_ip", fip.id)
        try:  # the tagging call: retried; if it still fails, the description keeps ownership
            retry(
                lambda: self._call(
                    "tagging a floating IP",
                    lambda: self.conn.network.set_tags(fip, owner.tags()),
                    fip.id,
                ),
                self.read_retry,
                retry_on=(TransientError,),
            )
            fip.tags = owner.tags()
        except Exception as err:  # noqa: BLE001 - ownership is still in the description
            log.warning(
                "floating IP %s stays untagged (its description names the run): %s", fip.id, err
            )
        return convert.to_floating_ip(fip)

    def attach_floating_ip(self, floating_ip_id: str, server_id: str) -> FloatingIP:
        """Point the address at the server's first port with an IPv4 address (2 requests)."""
        self._ensure_owned(
            "floating_ip",
            floating_ip_id,
            lambda: self.conn.network.get_ip(floating_ip_id),
            _fip_owned,
        )
        self._ensure_owned(
            "server", server_id, lambda: self.conn.compute.get_server(server_id), has_owner_tag
        )
        ports = self._read(
            "finding the server's port",
            lambda: self.conn.network.ports(device_id=server_id),
            server_id,
        )
        port = next(
            (
                p
                for p in ports
                if any(":" not in ip.get("ip_address", ":") for ip in p.fixed_ips or [])
            ),
            None,
        )
        if port is None:
            raise NotFound(
                "server has no IPv4 port to attach a floating IP to (is it still building?)",
                resource=server_id,
                cloud=self.name,
                hint="Wait until the server is ACTIVE, then attach.",
            )
        fip = self._call(
            "attaching a floating IP",
            lambda: self.conn.network.update_ip(floating_ip_id, port_id=port.id),
            f"{floating_ip_id} → server {server_id}",
        )
        attached = convert.to_floating_ip(fip)
        return FloatingIP(attached.id, attached.address, server_id, attached.tags)

    def list_floating_ips(self, run_id: str | None = None) -> list[FloatingIP]:
        """One request: the project's floating IPs (a few, bounded by its quota), kept when
        tagged — or, after a crash before tagging, described — as slipstream's (of ``run_id``)."""
        found = self._read("listing floating IPs", lambda: self.conn.network.ips())
        out = []
        for fip in found:
            ip = convert.to_floating_ip(fip)
            if OWNER_TAG in ip.tags and (run_id is None or ip.run_id == run_id):
                self._remember("floating_ip", ip.id)
                out.append(ip)
        return out

    def delete_floating_ip(self, floating_ip_id: str) -> None:
        self._ensure_owned(
            "floating_ip",
            floating_ip_id,
            lambda: self.conn.network.get_ip(floating_ip_id),
            _fip_owned,
        )
        self._call(
            "deleting a floating IP",
            lambda: self.conn.network.delete_ip(floating_ip_id, ignore_missing=False),
            floating_ip_id,
        )

    # security group -------------------------------------------------------------------------
    def ensure_ssh_security_group(self, cidr: str = "0.0.0.0/0") -> str:
        """The id of a security group allowing SSH (TCP 22) in from ``cidr``; made if missing.

        Shared by every run (it costs nothing), tagged ``slipstream`` so it is recognisable, and
        named after ``cidr``. Pass the id in :attr:`ServerSpec.security_groups`: Nova refuses a
        name that two groups share. Two runs making the group at once in a fresh project both
        create one; both then settle on the oldest (then lowest id) and the other deletes its own.
        """
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InvalidRequest(
                f"{cidr!r} is not an address range",
                resource="SSH security group",
                cloud=self.name,
                hint="Give a CIDR such as 203.0.113.0/24 (your campus) or 0.0.0.0/0 (anywhere).",
            ) from None
        name = SSH_GROUP_PREFIX + str(network).replace(".", "-").replace(":", "-").replace("/", "-")
        groups = self._ssh_groups(name)
        if not groups:
            made = self._call(
                "creating a security group",
                lambda: self.conn.network.create_security_group(
                    name=name, description=f"SSH from {network} (made by slipstream)"
                ),
                name,
            )
            self._call("tagging a security group",
                       lambda: self.conn.network.set_tags(made, [OWNER_TAG]), name)
            groups = self._ssh_groups(name)  # another run may have made one at the same moment
            if made.id not in {g.id for g in groups}:
                groups.append(made)
            if _first_made(groups).id != made.id:
                self._drop_duplicate(made, name)
        group = _first_made(groups)
        if not any(_is_ssh_rule(r, str(network)) for r in group.security_group_rules or []):
            try:
                self._call(
                    "adding the SSH rule",
                    lambda: self.conn.network.create_security_group_rule(
                        security_group_id=group.id,
                        direction="ingress",
                        ethertype="IPv6" if network.version == 6 else "IPv4",
                        protocol="tcp",
                        port_range_min=22,
                        port_range_max=22,
                        remote_ip_prefix=str(network),
                    ),
                    name,
                )
            except Conflict:
                pass  # SecurityGroupRuleExists: a racing run added the same rule first
        return group.id

    def _ssh_groups(self, name: str) -> list:
        return self._read(
            "looking up security groups", lambda: self.conn.network.security_groups(name=name)
        )

    def _drop_duplicate(self, made, name: str) -> None:
        """Delete the group this call made when another run's is older: nothing uses it yet."""
        try:
            self._call("deleting a duplicate security group",
                       lambda: self.conn.network.delete_security_group(made, ignore_missing=True), name)
        except CloudError as err:  # harmless: the oldest is used by everyone from now on
            log.warning("duplicate security group %s (%s) stays: %s", name, made.id, err)

    def security_group_id(self, name_or_id: str) -> str:
        """The id Nova should get for a security group named ``name_or_id`` (or with that id).

        Names are resolved here because Nova refuses a name that several groups share; for
        slipstream's SSH groups the oldest wins, as in :meth:`ensure_ssh_security_group`."""
        if name_or_id in self._group_ids:
            return self._group_ids[name_or_id]
        query = {"id": name_or_id} if _looks_like_id(name_or_id) else {"name": name_or_id}
        found = self._read("looking up a security group",
                           lambda: self.conn.network.security_groups(**query), name_or_id)
        if not found:
            raise InvalidRequest(
                f"security group {name_or_id!r} does not exist",
                resource=name_or_id,
                cloud=self.name,
                hint="`openstack security group list` shows the project's groups; security groups "
                "belong to one region, so a group made in another region is not here.",
            )
        if len(found) > 1 and not name_or_id.startswith(SSH_GROUP_PREFIX):
            raise InvalidRequest(
                f"{len(found)} security groups are named {name_or_id!r}",
                resource=name_or_id,
                cloud=self.name,
                hint="Pass the id of the one you mean (`openstack security group list`).",
            )
        self._group_ids[name_or_id] = _first_made(found).id
        return self._group_ids[name_or_id]

    # networks ----------------------------------------------------------------------------------
    def _network_id(self, name: str, *, external: bool = False) -> str:
        """The id of network ``name`` (cached). A project without ``auto_allocated_network`` yet
        (a fresh allocation nobody opened Horizon or Exosphere for) gets it made, not an error."""
        key = (name, external)
        if key not in self._networks:
            query: dict[str, Any] = {"name": name}
            if external:
                query["is_router_external"] = True
            found = self._read(
                f"looking up network {name}", lambda: self.conn.network.networks(**query)
            )
            if found:
                self._networks[key] = found[0].id
            elif name == AUTO_ALLOCATED_NETWORK and not external:
                self._networks[key] = self._auto_allocated_network()
            else:
                what = "external network" if external else "network"
                raise InvalidRequest(
                    f"{what} {name!r} does not exist",
                    resource=name,
                    cloud=self.name,
                    hint="Jetstream2 projects have `auto_allocated_network` (slipstream makes it "
                    "if missing) and the external network `public`; networks belong to one "
                    "region; `openstack network list` shows yours.",
                )
        return self._networks[key]

    def _auto_allocated_network(self) -> str:
        """Neutron's auto-allocated topology for this project (network, subnet, router on the
        external network), made now if the project has none yet — as Exosphere does. One GET:
        Neutron creates the topology on the first request."""
        project_id = self.conn.current_project_id
        topology = self._call(
            "getting the auto-allocated network",
            lambda: self.conn.network.get_auto_allocated_topology(project_id),
            AUTO_ALLOCATED_NETWORK,
        )
        log.info("using the auto-allocated topology of project %s: network %s", project_id, topology.id)
        return topology.id


def _first_made(groups: list):
    return min(groups, key=lambda g: (str(g.created_at or ""), g.id))


def _looks_like_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _is_ssh_rule(rule: dict, cidr: str) -> bool:
    return (
        rule.get("direction") == "ingress"
        and rule.get("protocol") in ("tcp", "6")
        and (rule.get("port_range_min") or 0) <= 22 <= (rule.get("port_range_max") or 65535)
        and rule.get("remote_ip_prefix") == cidr
    )
