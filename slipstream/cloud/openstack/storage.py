"""Keypairs (Nova) and volumes (Cinder, ``conn.block_storage``) of OpenStackCloud."""

from __future__ import annotations

import json

from slipstream.cloud.errors import InvalidRequest
from slipstream.cloud.models import Keypair, Ownership, Volume, check_name
from slipstream.cloud.openstack import convert
from slipstream.cloud.openstack.base import OpenStackBase

_RUN_KEY = "slipstream:run_id"


class StorageOperations(OpenStackBase):
    # keypairs (ownership lives in the name: slipstream-<run id>) -------------------------------
    def _check_key_name(self, name: str) -> None:
        if Keypair.run_of(name) is None:
            raise InvalidRequest(
                f"keypair {name!r} is not a slipstream keypair",
                resource=name,
                cloud=self.name,
                hint="Nova keypairs carry no tags, so slipstream's are named "
                "`slipstream-<run id>` for run ids it makes (Keypair.name_for_run) and it "
                "touches no others.",
            )

    def create_keypair(self, name: str, public_key: str) -> Keypair:
        self._check_key_name(name)
        kp = self._call(
            "importing a keypair",
            lambda: self.conn.compute.create_keypair(name=name, public_key=public_key.strip()),
            name,
        )
        return Keypair(kp.name, kp.fingerprint or "", kp.public_key or public_key.strip())

    def list_keypairs(self, run_id: str | None = None) -> list[Keypair]:
        found = self._read("listing keypairs", lambda: self.conn.compute.keypairs())
        keys = [Keypair(k.name, k.fingerprint or "", k.public_key or "") for k in found]
        return [k for k in keys if k.run_id is not None and (run_id is None or k.run_id == run_id)]

    def delete_keypair(self, name: str) -> None:
        self._check_key_name(name)
        self._call(
            "deleting a keypair",
            lambda: self.conn.compute.delete_keypair(name, ignore_missing=False),
            name,
        )

    # volumes (ownership in Cinder metadata) ---------------------------------------------------------
    def create_volume(self, name: str, size_gb: int, owner: Ownership) -> Volume:
        check_name(name, "volume name")
        if not isinstance(size_gb, int) or size_gb < 1:
            raise InvalidRequest(
                f"volume size must be a whole number of GB ≥ 1, got {size_gb!r}",
                resource=name,
                cloud=self.name,
                hint="Ask for at least 1 GB.",
            )
        vol = self._call(
            f"creating a {size_gb} GB volume",
            lambda: self.conn.block_storage.create_volume(
                name=name, size=size_gb, metadata=owner.metadata()
            ),
            name,
        )
        self._remember("volume", vol.id)
        return convert.to_volume(vol)

    def list_volumes(self, run_id: str | None = None) -> list[Volume]:
        """One request; with ``run_id``, Cinder filters by the run's metadata itself."""
        # ``properties`` is the SDK's name for Cinder's ``metadata`` filter; passing ``metadata``
        # would also make the SDK compare it, as a string, with each volume's dict (and drop all).
        query = {"properties": json.dumps({_RUN_KEY: run_id})} if run_id else {}
        found = self._read(
            "listing volumes", lambda: self.conn.block_storage.volumes(details=True, **query)
        )
        out = []
        for vol in found:
            volume = convert.to_volume(vol)
            owner = volume.ownership
            if owner is not None and (run_id is None or owner.run_id == run_id):
                self._remember("volume", volume.id)
                out.append(volume)
        return out

    def delete_volume(self, volume_id: str) -> None:
        self._ensure_owned(
            "volume",
            volume_id,
            lambda: self.conn.block_storage.get_volume(volume_id),
            lambda v: Ownership.from_metadata(dict(v.metadata or {})) is not None,
        )
        self._call(
            "deleting a volume",
            lambda: self.conn.block_storage.delete_volume(volume_id, ignore_missing=False),
            volume_id,
        )
