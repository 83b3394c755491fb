"""Catalogue and server operations of OpenStackCloud, on Nova's proxy (``conn.compute``)."""

from __future__ import annotations

import base64
import time
from dataclasses import replace
from datetime import datetime

from slipstream.cloud.errors import CloudError, InvalidRequest, NotFound, TransientError
from slipstream.cloud.models import (
    OWNER_TAG,
    RUN_TAG_PREFIX,
    Flavor,
    Image,
    Ownership,
    Server,
    ServerSpec,
    ServerStatus,
)
from slipstream.cloud.openstack import convert
from slipstream.cloud.openstack.base import OpenStackBase, has_owner_tag, log
from slipstream.cloud.waiting import observe
from slipstream.jetstream2 import FLAVORS, login_user_for_image

#: How long a fresh batch may take to show up in a listing by tag (Nova lists build requests).
LIST_AFTER_CREATE_TIMEOUT = 30.0
NAME_BATCH_TIMEOUT = 120.0  # seconds for a named batch to leave scheduling and take its names
_METADATA_LIMIT = 255


class ServerOperations(OpenStackBase):
    # catalogue -------------------------------------------------------------------------
    def list_flavors(self) -> list[Flavor]:
        out = []
        for name, f in sorted(self._flavor_by_name(refresh=True).items()):
            known = FLAVORS.get(name)
            out.append(
                Flavor(
                    name,
                    int(f.vcpus or 0),
                    int(f.ram or 0),
                    int(f.disk or 0),
                    known.gpus if known else 0.0,
                )
            )
        return out

    def list_images(self) -> list[Image]:
        images = self._image_by_name(refresh=True)
        return [Image(i.id, name, login_user_for_image(name)) for name, i in sorted(images.items())]

    def _flavor(self, name: str):
        for refresh in (False, True):
            flavors = self._flavor_by_name(refresh=refresh)
            if name in flavors:
                return flavors[name]
        raise InvalidRequest(
            f"unknown flavour {name!r}; this cloud offers {', '.join(sorted(flavors)) or 'none'}",
            resource=name,
            cloud=self.name,
            hint="Pick one of the listed flavours (`slipstream flavors`).",
        )

    def _image(self, name: str):
        for refresh in (False, True):
            images = self._image_by_name(refresh=refresh)
            if name in images:
                return images[name]
        featured = sorted(n for n in images if n.startswith("Featured-")) or sorted(images)[:20]
        raise InvalidRequest(
            f"unknown image {name!r}; available include {', '.join(featured) or 'none'}",
            resource=name,
            cloud=self.name,
            hint="Use an image name exactly as `openstack image list` shows it.",
        )

    # servers ---------------------------------------------------------------------------
    def create_servers(self, spec: ServerSpec, owner: Ownership) -> list[Server]:
        """Create ``spec.count`` servers in one Nova request (``min_count = max_count``).

        Ownership tags and metadata go into that request. Nova names a batch ``<name>-<i>``;
        the servers are then found with one listing by the run's tag. A spec that names each
        server (Slurm's nodes of one resume call) gets those names by a rename right after.
        """
        flavor = self._flavor(spec.flavor)
        image = self._image(spec.image)
        network_id = self._network_id(spec.network)
        metadata = {**spec.metadata, **owner.metadata()}
        if self.exosphere_metadata:
            metadata.update(convert.exosphere_metadata(self.username or owner.creator))
        _check_metadata(metadata, spec.name, self.name)
        attrs: dict = {
            "name": spec.name,
            "flavor_id": flavor.id,
            "image_id": image.id,
            "networks": [{"uuid": network_id}],
            "metadata": metadata,
            "tags": owner.tags(),
            "min_count": spec.count,
            "max_count": spec.count,
        }
        if spec.key_name:
            attrs["key_name"] = spec.key_name
        if spec.user_data:
            attrs["user_data"] = base64.b64encode(spec.user_data.encode()).decode()
        if spec.security_groups:
            # by id (Nova takes ids in "name"): a name two groups share is refused with a 409
            attrs["security_groups"] = [{"name": self.security_group_id(g)} for g in spec.security_groups]
        first = self._call(
            f"creating {spec.count} server(s)",
            lambda: self.conn.compute.create_server(**attrs),
            f"{spec.name} ({spec.flavor})",
        )
        self._remember("server", first.id)
        try:
            servers = self._find_batch(spec, owner, first.id)
            wanted = spec.server_names()
            if [s.name for s in servers] != wanted:
                servers = self._name_batch(servers, wanted, owner)
        except CloudError:
            self._remove_batch(spec, owner, first.id)  # all or none
            raise
        for server in servers:
            self._remember("server", server.id)
        return servers

    def _remove_batch(self, spec: ServerSpec, owner: Ownership, first_id: str) -> None:
        """Best effort: delete a batch Nova accepted but slipstream could not list. Whatever
        survives carries the run's tag, so the Lease's teardown or the reaper finds it later."""
        ids = {first_id}
        try:
            names = set(spec.server_names()) | set(_novas_names(spec))
            ids |= {s.id for s in self.list_servers(owner.run_id) if s.name in names}
        except CloudError as err:
            log.warning("cannot list the batch %s to remove it: %s", spec.name, err)
        for server_id in ids:
            try:
                self.delete_server(server_id)
            except CloudError as err:
                log.warning("cannot remove server %s of a failed batch: %s", server_id, err)

    def _name_batch(self, servers: list[Server], wanted: list[str], owner: Ownership) -> list[Server]:
        """Give each server of a batch its wanted name. Nova drops a rename made while a server
        is still being scheduled (it is then only a build request), so a server is renamed once
        it is past scheduling, and the names count only when a listing shows them."""
        want = {server.id: name for server, name in zip(servers, wanted, strict=True)}
        tags = _tags_filter(owner.run_id)
        deadline = time.monotonic() + NAME_BATCH_TIMEOUT
        while True:
            listing = observe(lambda: self._read("listing servers", lambda: self.conn.compute.servers(
                details=True, tags=tags)), deadline=deadline, poll_interval=0.5, what="naming a batch")
            seen = {s.id: s for s in listing if s.id in want}
            scheduling = [i for i in want if i not in seen or seen[i].task_state == "scheduling"]
            misnamed = [i for i in want if i in seen and i not in scheduling and seen[i].name != want[i]]
            if not scheduling and not misnamed:
                return [replace(server, name=want[server.id]) for server in servers]
            if time.monotonic() > deadline:
                raise TransientError(
                    f"Nova did not take the names {', '.join(want[i] for i in scheduling + misnamed)} "
                    f"within {NAME_BATCH_TIMEOUT:.0f} s ({len(scheduling)} server(s) still scheduling)",
                    resource=", ".join(wanted), cloud=self.name,
                    hint="The batch is deleted; try again (Nova may be slow to schedule right now).")
            for server_id in misnamed:
                self._call("naming a server of a batch",
                           lambda i=server_id: self.conn.compute.update_server(i, name=want[i]), want[server_id])
            time.sleep(0.5)

    def _find_batch(self, spec: ServerSpec, owner: Ownership, first_id: str) -> list[Server]:
        names = _novas_names(spec)
        deadline = time.monotonic() + LIST_AFTER_CREATE_TIMEOUT
        while True:
            by_name: dict[str, Server] = {}
            listing = observe(lambda: self.list_servers(owner.run_id), deadline=deadline,
                              poll_interval=0.5, what="finding a new batch")
            for server in listing:  # newest first: keeps this batch's
                if server.name in names and server.name not in by_name:
                    by_name[server.name] = server
            if len(by_name) == len(names):
                return [by_name[n] for n in names]
            if time.monotonic() > deadline:
                raise TransientError(
                    f"Nova accepted {spec.count} server(s) but lists only {sorted(by_name)}",
                    resource=f"{spec.name} (first id {first_id})",
                    cloud=self.name,
                    hint="They carry the run's tag, so the run's teardown or the reaper removes them.",
                )
            time.sleep(0.5)

    def list_servers(self, run_id: str | None = None) -> list[Server]:
        tags = _tags_filter(run_id)
        found = self._read(
            "listing servers", lambda: self.conn.compute.servers(details=True, tags=tags)
        )
        self._learn_image_names({getattr(s.image, "id", None) for s in found if s.image} - {None})
        flavors = {f.id: name for name, f in (self._flavors or {}).items()}
        servers = [
            convert.to_server(s, flavor_names=flavors, image_names=self._image_names)
            for s in found
            if OWNER_TAG in (s.tags or [])
        ]
        for server in servers:
            self._remember("server", server.id)  # listed by our tag: owned, no look-up later
        settled = {s.id for s in found if not getattr(s, "task_state", None)}
        return [
            self._with_fault(s) if s.status == ServerStatus.ERROR and not s.fault
            else self._with_unshelve_outcome(s) if s.id in self._unshelving and s.id in settled
            else s
            for s in servers
        ]

    def _with_unshelve_outcome(self, server: Server) -> Server:
        """An unshelve Nova found no host for leaves the server SHELVED_OFFLOADED, with no fault
        and no ERROR: only its instance action says so (message "Error"). Read once, when the
        server has settled (no task state) after :meth:`unshelve_server`."""
        if server.status != ServerStatus.SHELVED_OFFLOADED:
            self._unshelving.discard(server.id)  # it left the shelf: the unshelve worked
            return server
        actions = self._read("reading server actions",
                             lambda: self.conn.compute.server_actions(server.id), server.id)
        latest = max(actions, key=lambda a: str(a.start_time or ""), default=None)
        if latest is None or latest.action != "unshelve" or (latest.message or "").lower() != "error":
            return server  # Nova has not taken the request up yet
        self._unshelving.discard(server.id)
        return replace(server, fault=(
            "No valid host was found to unshelve the server (Nova's unshelve action ended in "
            f"Error, request {latest.request_id}); it stays shelved and costs nothing"))

    def _with_fault(self, server: Server) -> Server:
        """Nova's listing leaves out the fault of servers that never found a host (they live in
        cell0), so read it once from the server itself: one extra request per failed server."""
        if server.id not in self._faults:
            try:
                nova = self._call(
                    "reading the fault", lambda: self.conn.compute.get_server(server.id), server.id
                )
            except NotFound:
                return server
            message = (nova.fault or {}).get("message")
            if not message:
                return server  # not written yet: ask again next round
            self._faults[server.id] = message.strip()
        return replace(server, fault=self._faults[server.id])

    def _learn_image_names(self, image_ids: set[str]) -> None:
        unknown = image_ids - set(self._image_names)
        if unknown and self._images is None:
            self._image_by_name()
            unknown -= set(self._image_names)
        for image_id in unknown:  # deleted or not visible: remember, and never ask again
            self._image_names[image_id] = image_id

    def get_server(self, server_id: str) -> Server:
        nova = self._call(
            "reading server", lambda: self.conn.compute.get_server(server_id), server_id
        )
        if nova.image:
            self._learn_image_names({nova.image.id} - {None})
        flavors = {f.id: name for name, f in (self._flavors or {}).items()}
        return convert.to_server(nova, flavor_names=flavors, image_names=self._image_names)

    def _guard_server(self, server_id: str) -> None:
        self._ensure_owned(
            "server", server_id, lambda: self.conn.compute.get_server(server_id), has_owner_tag
        )

    def delete_server(self, server_id: str) -> None:
        self._guard_server(server_id)
        self._call(
            "deleting server",
            lambda: self.conn.compute.delete_server(server_id, ignore_missing=False),
            server_id,
        )

    def stop_server(self, server_id: str) -> None:
        self._guard_server(server_id)
        self._call("stopping server", lambda: self.conn.compute.stop_server(server_id), server_id)

    def start_server(self, server_id: str) -> None:
        self._guard_server(server_id)
        self._call("starting server", lambda: self.conn.compute.start_server(server_id), server_id)

    def shelve_server(self, server_id: str) -> None:
        self._guard_server(server_id)
        self._call("shelving server", lambda: self.conn.compute.shelve_server(server_id), server_id)

    def unshelve_server(self, server_id: str) -> None:
        self._guard_server(server_id)
        self._call(
            "unshelving server", lambda: self.conn.compute.unshelve_server(server_id), server_id
        )
        self._unshelving.add(server_id)

    def console_log(self, server_id: str) -> str:
        out = self._call(
            "reading console log",
            lambda: self.conn.compute.get_server_console_output(server_id),
            server_id,
        )
        return str((out or {}).get("output") or "")

    def state_log(self, server_id: str) -> list[tuple[ServerStatus, datetime]]:
        """Status changes from Nova's timestamps and instance actions; works after deletion
        (instance actions of deleted servers stay readable, microversion 2.21+)."""
        try:
            nova = self._call(
                "reading server", lambda: self.conn.compute.get_server(server_id), server_id
            )
        except NotFound:
            nova = None
        actions = self._read(
            "reading server actions", lambda: self.conn.compute.server_actions(server_id), server_id
        )
        if nova is None and not actions:
            raise NotFound("server has no record", resource=server_id, cloud=self.name)
        launched_at = getattr(nova, "launched_at", None)
        if launched_at is None:  # deleted (or never booted): the create action's events know
            launched_at = self._boot_finished(server_id, actions)
        return convert.state_log(
            created_at=getattr(nova, "created_at", None),
            launched_at=launched_at,
            terminated_at=getattr(nova, "terminated_at", None),
            updated_at=getattr(nova, "updated_at", None),
            status=getattr(nova, "status", None),
            actions=actions,
        )

    def _boot_finished(self, server_id: str, actions: list) -> str | None:
        """When the build of ``server_id`` succeeded, from its create action's events (1 request)."""
        create = next((a for a in actions if a.action == "create"), None)
        if create is None or (create.message or "").lower() == "error":
            return None
        detail = self._call(
            "reading the create action",
            lambda: self.conn.compute.get_server_action(
                create.request_id, server_id, ignore_missing=False
            ),
            server_id,
        )
        done = [
            e.finish_time
            for e in detail.events or []
            if e.finish_time and str(e.result).lower() == "success"
        ]
        return max(done) if done else None


def _check_metadata(metadata: dict[str, str], resource: str, cloud: str) -> None:
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > _METADATA_LIMIT or len(value) > _METADATA_LIMIT:
            raise InvalidRequest(
                f"server metadata {key!r} is not a string of at most {_METADATA_LIMIT} characters",
                resource=resource,
                cloud=cloud,
                hint="Nova keeps metadata keys and values as short strings; store more on a volume.",
            )
    if len(metadata) > 128:
        log.warning("%d metadata items on %s; Nova's default limit is 128", len(metadata), resource)


def _tags_filter(run_id: str | None) -> str:
    """Nova's ``tags`` filter (all of them must match) for slipstream's servers, or one run's."""
    return f"{OWNER_TAG},{RUN_TAG_PREFIX}{run_id}" if run_id else OWNER_TAG


def _novas_names(spec: ServerSpec) -> list[str]:
    """What Nova calls the servers of one create request: ``<name>`` alone, else ``<name>-1`` …
    (its default ``multi_instance_display_name_template``) — ServerSpec's own rule, whatever
    names a subclass asks for."""
    return ServerSpec.server_names(spec)
