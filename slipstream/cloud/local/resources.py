"""LocalCloud keypairs, floating IPs and volumes: Nova, Neutron and Cinder records, kept small.

- Keypairs: an OpenSSH public key under a name (Nova's rules: unique name, a key that parses,
  an MD5 fingerprint). Slipstream's ownership is in the name, ``slipstream-<run id>``.
- Floating IPs: an address from 127.65.0.0/16 tagged with the owner; attaching one makes the
  VM reachable on it (the guest forwards every port it listens on, like 1:1 NAT). Deleting a
  server leaves its floating IP allocated and unattached, as Neutron does.
- Volumes: records only (size, metadata, available/in-use), counted against the volume quota.
- Leases: :meth:`renew_lease` updates every due server and volume of a run in one transaction
  (the one request per beat a cloud with batch updates would need); servers only in the states
  Nova allows (not building, shelved or in ERROR).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import uuid

from slipstream.cloud.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from slipstream.cloud.local import addresses, vms
from slipstream.cloud.local.base import LocalCloudBase, api
from slipstream.cloud.local.store import dumps, utc_iso
from slipstream.cloud.models import LEASE_RENEWABLE, FloatingIP, Keypair, LeaseRenewal, Ownership, ServerStatus, Volume

_KEYPAIR_NAME = re.compile(r"^[A-Za-z0-9_. -]{1,255}$")  # Nova: letters, digits, '_', '-', '.', ' '
_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
              "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")


def fingerprint(public_key: str) -> str:
    """Nova's keypair fingerprint (MD5 of the key blob, colon-separated), or InvalidRequest."""
    parts = public_key.strip().split()
    try:
        if len(parts) < 2 or parts[0] not in _KEY_TYPES:
            raise ValueError("not an OpenSSH public key line")
        blob = base64.b64decode(parts[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        if blob[4:4 + length].decode() != parts[0]:
            raise ValueError("the key type does not match the key")
    except (ValueError, binascii.Error, struct.error, UnicodeDecodeError) as err:
        raise InvalidRequest(f"keypair data is invalid: {err}",
                             hint="Give one OpenSSH public key line, e.g. 'ssh-ed25519 AAAA... comment'.") from None
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


class ResourceOps(LocalCloudBase):
    # keypairs -------------------------------------------------------------------------------
    @api("create_keypair")
    def create_keypair(self, name: str, public_key: str) -> Keypair:
        if not isinstance(name, str) or not _KEYPAIR_NAME.match(name):
            raise InvalidRequest(f"keypair name {name!r} is not allowed", cloud=self.name,
                                 hint="Use letters, digits, '_', '-', '.' and spaces (at most 255).")
        fp = fingerprint(public_key)
        with self._store.write() as con:
            if con.execute("SELECT 1 FROM keypairs WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"keypair {name!r} already exists", resource=name, cloud=self.name,
                               hint="Delete it first, or use another name.")
            con.execute("INSERT INTO keypairs (name, public_key, fingerprint, created_at) VALUES (?, ?, ?, ?)",
                        (name, public_key.strip(), fp, utc_iso()))
        return Keypair(name, fp, public_key.strip())

    @api("list_keypairs")
    def list_keypairs(self, run_id: str | None = None) -> list[Keypair]:
        with self._store.read() as con:
            rows = con.execute("SELECT * FROM keypairs ORDER BY name").fetchall()
        keys = [Keypair(r["name"], r["fingerprint"], r["public_key"]) for r in rows]
        return [k for k in keys if k.run_id is not None and (run_id is None or k.run_id == run_id)]

    @api("delete_keypair")
    def delete_keypair(self, name: str) -> None:
        with self._store.write() as con:
            if con.execute("DELETE FROM keypairs WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound("keypair not found", resource=name, cloud=self.name)

    # floating IPs ---------------------------------------------------------------------------
    @api("create_floating_ip")
    def create_floating_ip(self, owner: Ownership) -> FloatingIP:
        fid = str(uuid.uuid4())
        with self._store.write() as con:
            used = [r["address"] for r in con.execute("SELECT address FROM floating_ips")]
            limit = self.options.quotas.floating_ips
            if len(used) + 1 > limit:
                raise QuotaExceeded(f"Quota exceeded for floating IPs: {len(used)} of {limit} in use",
                                    resource="floating ip", cloud=self.name,
                                    hint="Release floating IPs you no longer need (unattached ones cost quota).")
            (address,) = addresses.allocate(self.options.floating_network, 1, used, what="floating", cloud=self.name)
            con.execute("INSERT INTO floating_ips (id, address, server_id, run_id, tags, created_at) "
                        "VALUES (?, ?, NULL, ?, ?, ?)", (fid, address, owner.run_id, dumps(owner.tags()), utc_iso()))
        return FloatingIP(fid, address, None, tuple(owner.tags()))

    @api("attach_floating_ip")
    def attach_floating_ip(self, floating_ip_id: str, server_id: str) -> FloatingIP:
        with self._store.write() as con:
            fip = self._floating_row(con, floating_ip_id)
            server = self._row(con, server_id)
            if server["address"] is None or server["status"] == ServerStatus.ERROR:
                raise Conflict(f"server {server['name']} has no port to attach a floating IP to "
                               f"(it is {server['status']})", resource=server["id"], cloud=self.name,
                               hint="Attach floating IPs to servers that booted.")
            if fip["server_id"] not in (None, server["id"]):
                raise Conflict(f"floating IP {fip['address']} is attached to another server",
                               resource=fip["id"], cloud=self.name, hint="Detach (delete) it first.")
            other = con.execute("SELECT address FROM floating_ips WHERE server_id = ? AND id != ?",
                                (server["id"], fip["id"])).fetchone()
            if other:
                raise Conflict(f"server {server['name']} already has floating IP {other['address']}",
                               resource=server["id"], cloud=self.name, hint="One floating IP per server.")
            con.execute("UPDATE floating_ips SET server_id = ? WHERE id = ?", (server["id"], fip["id"]))
            # Inside the transaction: two attaches cannot write meta.json in the wrong order.
            vms.update_meta(vms.vm_dir(self.home, server["id"]), floating_ip=fip["address"])
        return FloatingIP(fip["id"], fip["address"], server["id"], tuple(json.loads(fip["tags"])))

    @api("list_floating_ips")
    def list_floating_ips(self, run_id: str | None = None) -> list[FloatingIP]:
        with self._store.read() as con:
            rows = con.execute("SELECT * FROM floating_ips ORDER BY rowid").fetchall()
        fips = [FloatingIP(r["id"], r["address"], r["server_id"], tuple(json.loads(r["tags"]))) for r in rows]
        return [f for f in fips if f.run_id is not None and (run_id is None or f.run_id == run_id)]

    @api("delete_floating_ip")
    def delete_floating_ip(self, floating_ip_id: str) -> None:
        with self._store.write() as con:
            fip = self._floating_row(con, floating_ip_id)
            con.execute("DELETE FROM floating_ips WHERE id = ?", (fip["id"],))
            if fip["server_id"]:
                vms.update_meta(vms.vm_dir(self.home, fip["server_id"]), floating_ip=None)

    def _floating_row(self, con, floating_ip_id: str):
        row = con.execute("SELECT * FROM floating_ips WHERE id = ?", (str(floating_ip_id),)).fetchone()
        if row is None:
            raise NotFound("floating IP not found", resource=str(floating_ip_id), cloud=self.name)
        return row

    # volumes --------------------------------------------------------------------------------
    @api("create_volume")
    def create_volume(self, name: str, size_gb: int, owner: Ownership) -> Volume:
        if not isinstance(size_gb, int) or isinstance(size_gb, bool) or size_gb < 1:
            raise InvalidRequest(f"volume size must be a whole number of GB >= 1, got {size_gb!r}",
                                 resource=str(name), cloud=self.name)
        if not isinstance(name, str) or not name or len(name) > 255:
            raise InvalidRequest(f"volume name {name!r} is not allowed", cloud=self.name,
                                 hint="Give 1-255 characters.")
        vid, metadata = str(uuid.uuid4()), owner.metadata()
        with self._store.write() as con:
            count, total = con.execute("SELECT COUNT(*), COALESCE(SUM(size_gb), 0) FROM volumes").fetchone()
            q = self.options.quotas
            if count + 1 > q.volumes or total + size_gb > q.volume_gb:
                raise QuotaExceeded(
                    f"Quota exceeded for volumes: requested 1 volume of {size_gb} GB, already used "
                    f"{count} of {q.volumes} volumes and {total} of {q.volume_gb} GB",
                    resource=name, cloud=self.name, hint="Delete volumes you no longer need.")
            con.execute("INSERT INTO volumes (id, name, size_gb, status, metadata, run_id, attached_to, created_at) "
                        "VALUES (?, ?, ?, 'available', ?, ?, NULL, ?)",
                        (vid, name, size_gb, dumps(metadata), owner.run_id, utc_iso()))
        return Volume(vid, name, size_gb, "available", metadata)

    def attach_volume(self, volume_id: str, server_id: str) -> Volume:
        """Mark a volume in-use by a server (a record: nothing is mounted). Not in the port."""
        with self._store.write() as con:
            vol = self._volume_row(con, volume_id)
            server = self._row(con, server_id)
            if vol["attached_to"] not in (None, server["id"]):
                raise Conflict(f"volume {vol['name']} is in-use by another server", resource=vol["id"],
                               cloud=self.name)
            con.execute("UPDATE volumes SET attached_to = ?, status = 'in-use' WHERE id = ?", (server["id"], vol["id"]))
        return Volume(vol["id"], vol["name"], vol["size_gb"], "in-use", json.loads(vol["metadata"]), server["id"])

    @api("list_volumes")
    def list_volumes(self, run_id: str | None = None) -> list[Volume]:
        with self._store.read() as con:
            rows = con.execute("SELECT * FROM volumes ORDER BY rowid").fetchall()
        vols = [Volume(r["id"], r["name"], r["size_gb"], r["status"], json.loads(r["metadata"]), r["attached_to"])
                for r in rows]
        return [v for v in vols if v.ownership is not None and (run_id is None or v.ownership.run_id == run_id)]

    @api("delete_volume")
    def delete_volume(self, volume_id: str) -> None:
        with self._store.write() as con:
            vol = self._volume_row(con, volume_id)
            if vol["status"] == "in-use":
                raise Conflict(f"volume {vol['name']} is in-use by server {vol['attached_to']}",
                               resource=vol["id"], cloud=self.name, hint="Delete or detach the server first.")
            con.execute("DELETE FROM volumes WHERE id = ?", (vol["id"],))

    def _volume_row(self, con, volume_id: str):
        row = con.execute("SELECT * FROM volumes WHERE id = ?", (str(volume_id),)).fetchone()
        if row is None:
            raise NotFound("volume not found", resource=str(volume_id), cloud=self.name)
        return row

    # leases ---------------------------------------------------------------------------------
    @api("renew_lease")
    def renew_lease(self, run_id: str, renewal: LeaseRenewal, *, due_before) -> int:
        renewal.check_extends(due_before)
        stamp, renewed = renewal.metadata(), 0
        servers = f"status IN ({', '.join(repr(str(s)) for s in LEASE_RENEWABLE)}) AND pending IS NULL"  # as Nova
        with self._changing() as con:
            for table, live in (("servers", servers), ("volumes", "1")):
                for row in con.execute(f"SELECT id, metadata FROM {table} WHERE run_id = ? AND {live}",
                                       (run_id,)).fetchall():
                    metadata = json.loads(row["metadata"])
                    owner = Ownership.from_metadata(metadata)
                    if owner is None or owner.run_id != run_id or owner.expires_at >= due_before:
                        continue
                    con.execute(f"UPDATE {table} SET metadata = ? WHERE id = ?",
                                (dumps({**metadata, **stamp}), row["id"]))
                    renewed += 1
        return renewed
