"""Floating IPs and the SSH security group of OpenStackCloud, on Neutron's proxy (``conn.network``).

Neutron cannot take tags in a create request on every release, so a floating IP is created with
its run in the ``description`` (one request: ownership can never be missing) and tagged right
after. A crash between the two leaves an untagged address whose description still names the run;
:meth:`list_floating_ips` reads both.
"""

from __future__ import annotations

import ipaddress

from slipstream.cloud.errors import InvalidRequest, NotFound, TransientError
from slipstream.cloud.models import OWNER_TAG, FloatingIP, Ownership
from slipstream.cloud.openstack import convert
from slipstream.cloud.openstack.base import OpenStackBase, has_owner_tag, log
from slipstream.retry import retry

SSH_GROUP_PREFIX = "slipstream-ssh-"


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
        """The name of a security group allowing SSH (TCP 22) in from ``cidr``; made if missing.

        Shared by every run (it costs nothing), tagged ``slipstream`` so it is recognisable.
        Pass the name in :attr:`ServerSpec.security_groups`.
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
        groups = self._read(
            "looking up security groups", lambda: self.conn.network.security_groups(name=name)
        )
        if groups:
            group = min(groups, key=lambda g: str(g.created_at))  # the first one made
        else:
            group = self._call(
                "creating a security group",
                lambda: self.conn.network.create_security_group(
                    name=name, description=f"SSH from {network} (made by slipstream)"
                ),
                name,
            )
            self._call(
                "tagging a security group",
                lambda: self.conn.network.set_tags(group, [OWNER_TAG]),
                name,
            )
            group.security_group_rules = []
        if not any(_is_ssh_rule(r, str(network)) for r in group.security_group_rules or []):
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
        return name


def _is_ssh_rule(rule: dict, cidr: str) -> bool:
    return (
        rule.get("direction") == "ingress"
        and rule.get("protocol") in ("tcp", "6")
        and (rule.get("port_range_min") or 0) <= 22 <= (rule.get("port_range_max") or 65535)
        and rule.get("remote_ip_prefix") == cidr
    )
