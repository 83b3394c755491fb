"""From Nova, Neutron and Cinder records to slipstream's cloud-neutral dataclasses.

Pure functions over SDK resources (or anything with the same attributes): no API calls here,
so each mapping can be tested case by case.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from slipstream.cloud.models import (
    OWNER_TAG,
    RUN_TAG_PREFIX,
    FloatingIP,
    Ownership,
    Server,
    ServerStatus,
    Volume,
)
from slipstream.jetstream2 import login_user_for_image

#: Nova status → slipstream status. Transitional statuses of a running server count as ACTIVE
#: (Jetstream2 charges them like ACTIVE); SHELVED is a short stop on the way to offloading.
NOVA_STATUS: dict[str, ServerStatus] = {
    "BUILD": ServerStatus.BUILD,
    "REBUILD": ServerStatus.BUILD,
    "ACTIVE": ServerStatus.ACTIVE,
    "REBOOT": ServerStatus.ACTIVE,
    "HARD_REBOOT": ServerStatus.ACTIVE,
    "PASSWORD": ServerStatus.ACTIVE,
    "MIGRATING": ServerStatus.ACTIVE,
    "RESIZE": ServerStatus.ACTIVE,
    "VERIFY_RESIZE": ServerStatus.ACTIVE,
    "REVERT_RESIZE": ServerStatus.ACTIVE,
    "RESCUE": ServerStatus.ACTIVE,
    "SHUTOFF": ServerStatus.SHUTOFF,
    "SUSPENDED": ServerStatus.SUSPENDED,
    "PAUSED": ServerStatus.SUSPENDED,
    "SHELVED": ServerStatus.SHELVED_OFFLOADED,  # settled (clouds that never offload)
    "SHELVED_OFFLOADED": ServerStatus.SHELVED_OFFLOADED,
    "ERROR": ServerStatus.ERROR,
    "DELETED": ServerStatus.DELETED,
    "SOFT_DELETED": ServerStatus.DELETED,
    "UNKNOWN": ServerStatus.BUILD,  # compute host unreachable: not usable, not failed either
}

#: Instance actions (``os-instance-actions``) → the status a successful action leaves behind.
ACTION_STATUS: dict[str, ServerStatus] = {
    "create": ServerStatus.BUILD,
    "stop": ServerStatus.SHUTOFF,
    "start": ServerStatus.ACTIVE,
    "reboot": ServerStatus.ACTIVE,
    "shelve": ServerStatus.SHELVED_OFFLOADED,
    "shelveOffload": ServerStatus.SHELVED_OFFLOADED,
    "unshelve": ServerStatus.ACTIVE,
    "suspend": ServerStatus.SUSPENDED,
    "resume": ServerStatus.ACTIVE,
    "pause": ServerStatus.SUSPENDED,
    "unpause": ServerStatus.ACTIVE,
    "delete": ServerStatus.DELETED,
}

#: Exosphere's server-metadata format version (EXO ``newServerMetadata``; facts §9).
EXOSPHERE_SERVER_VERSION = "6"


def parse_time(value: Any) -> datetime | None:
    """Nova/Neutron/Cinder timestamps ("2026-11-29T03:04:05Z", "...05.123456", naive = UTC)."""
    if not value:
        return None
    if isinstance(value, datetime):
        stamp = value
    else:
        try:
            stamp = datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def server_addresses(addresses: Mapping[str, list[dict]] | None) -> tuple[str | None, str | None]:
    """(fixed IPv4, floating IPv4) from Nova's ``addresses`` map (first of each)."""
    fixed = floating = None
    for entries in (addresses or {}).values():
        for entry in entries or []:
            if entry.get("version", 4) != 4:
                continue
            kind = entry.get("OS-EXT-IPS:type", "fixed")
            if kind == "floating" and floating is None:
                floating = entry.get("addr")
            elif kind == "fixed" and fixed is None:
                fixed = entry.get("addr")
    return fixed, floating


def to_server(
    nova: Any,
    *,
    flavor_names: Mapping[str, str],
    image_names: Mapping[str, str],
) -> Server:
    """A slipstream :class:`Server` from an SDK ``compute.v2.server.Server`` (listed with details)."""
    flavor = getattr(nova, "flavor", None)
    flavor_name = getattr(flavor, "original_name", None) or getattr(flavor, "name", None)
    flavor_id = getattr(flavor, "id", None)
    if flavor_id and (not flavor_name or flavor_name == flavor_id):
        flavor_name = flavor_names.get(flavor_id, flavor_id)
    image = getattr(nova, "image", None)
    image_id = getattr(image, "id", None) if image is not None else None
    image_name = image_names.get(image_id, image_id or "") if image_id else ""
    fixed, floating = server_addresses(nova.addresses)
    nova_status = str(nova.status).upper()
    status = NOVA_STATUS.get(nova_status, ServerStatus.BUILD)
    if nova_status == "SHELVED" and getattr(nova, "task_state", None):
        # powered off, offload still running: not yet shelved for good (unshelving now is a 409)
        status = ServerStatus.SHUTOFF
    fault = nova.fault or {}
    return Server(
        id=nova.id,
        name=nova.name,
        status=status,
        flavor=flavor_name or "",
        image=image_name,
        address=fixed,
        floating_ip=floating,
        key_name=nova.key_name,
        metadata=dict(nova.metadata or {}),
        tags=tuple(nova.tags or ()),
        fault=(fault.get("message") or None) if status == ServerStatus.ERROR else None,
        created_at=parse_time(nova.created_at),
        ssh_user=login_user_for_image(image_name) if image_name else "ubuntu",
    )


def owner_description(owner: Ownership) -> str:
    """What a floating IP's description says, so ownership survives a failed tagging call."""
    return f"{OWNER_TAG} {owner.run_tag}"


def tags_from_description(description: str | None) -> tuple[str, ...]:
    """The ownership tags :func:`owner_description` wrote, or ``()``."""
    words = (description or "").split()
    if OWNER_TAG in words:
        runs = [w for w in words if w.startswith(RUN_TAG_PREFIX)]
        if runs:
            return (OWNER_TAG, runs[0])
    return ()


def to_floating_ip(fip: Any) -> FloatingIP:
    tags = tuple(fip.tags or ())
    if OWNER_TAG not in tags:
        tags = tags + tags_from_description(fip.description)
    details = fip.port_details or {}
    server_id = (
        details.get("device_id")
        if str(details.get("device_owner", "")).startswith("compute:")
        else None
    )
    return FloatingIP(id=fip.id, address=fip.floating_ip_address, server_id=server_id, tags=tags)


def to_volume(vol: Any) -> Volume:
    attachments = vol.attachments or []
    return Volume(
        id=vol.id,
        name=vol.name or "",
        size_gb=int(vol.size or 0),
        status=str(vol.status),
        metadata=dict(vol.metadata or {}),
        attached_to=attachments[0].get("server_id") if attachments else None,
    )


def exosphere_metadata(creator: str, now: float | None = None) -> dict[str, str]:
    """Metadata that makes Exosphere show the server's creator to the whole allocation.

    ``exoSetup`` says "complete", so Exosphere shows no setup timeout badge (facts §9).
    """
    epoch_ms = int((time.time() if now is None else now) * 1000)
    return {
        "exoServerVersion": EXOSPHERE_SERVER_VERSION,
        "exoCreatorUsername": creator[:255],
        "exoSetup": json.dumps({"status": "complete", "epoch": epoch_ms}, separators=(",", ":")),
    }


def state_log(
    *,
    created_at: Any = None,
    launched_at: Any = None,
    terminated_at: Any = None,
    updated_at: Any = None,
    status: str | None = None,
    actions: Iterable[Any] = (),
) -> list[tuple[ServerStatus, datetime]]:
    """A server's status changes in time order, from Nova's timestamps and instance actions.

    Best effort: an action counts from its start time (Nova lists no finish time without one
    more call per action), actions that failed (message "Error") change nothing, and the boot
    counts as ACTIVE from ``launched_at``. A server still in ERROR ends with ERROR.
    """
    events: list[tuple[datetime, int, ServerStatus]] = []
    order = 0

    def add(when: Any, state: ServerStatus) -> None:
        nonlocal order
        stamp = parse_time(when)
        if stamp is not None:
            events.append((stamp, order, state))
            order += 1

    # Nova lists actions newest first, with start times in whole seconds: of two actions in
    # the same second (a shelve and the unshelve right after it), the one listed later came first.
    listed = list(actions)
    ordered = [a for _, a in sorted(enumerate(listed), key=lambda ia: (
        parse_time(ia[1].start_time) or datetime.min.replace(tzinfo=UTC), -ia[0]))]
    later = [parse_time(a.start_time) for a in ordered if a.action != "create" and a.start_time]
    booted = parse_time(launched_at)
    # Nova moves launched_at on unshelve/rebuild; then the first boot ended before the first
    # later action, and created_at is the closest we know.
    if booted is not None and later and booted > later[0]:
        booted = parse_time(created_at)
    add(created_at, ServerStatus.BUILD)
    add(booted, ServerStatus.ACTIVE)
    for action in ordered:
        state = ACTION_STATUS.get(action.action)
        if state is None or (action.message or "").lower() == "error":
            continue
        if action.action == "create":
            if created_at is None:
                add(action.start_time, state)
            continue
        add(action.start_time, state)
    if terminated_at:
        add(terminated_at, ServerStatus.DELETED)
    if status and NOVA_STATUS.get(status.upper()) == ServerStatus.ERROR:
        add(updated_at, ServerStatus.ERROR)
    out: list[tuple[ServerStatus, datetime]] = []
    for stamp, _, state in sorted(events):
        if out and out[-1][0] == state:
            continue
        if out and out[-1][0] == ServerStatus.DELETED:
            break
        out.append((state, stamp))
    return out
