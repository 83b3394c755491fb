"""LocalCloud: a Jetstream2-shaped cloud on this machine, the default cloud of slipstream.

Everything a flow does on Jetstream2 it can do here, with the same calls, states and errors
(the provider contract in ``tests/contract`` holds both clouds to it), without an allocation:

- the Jetstream2 flavours (m3, r3, g3, g4, g5), Featured images, ``auto_allocated_network``,
  Startup/Research quotas and a capacity model (GPU slices, large-memory hosts) that answers
  "No valid host was found" when full;
- a VM is a detached process group with its own 127.64.x.y address, a directory as its disk,
  its user_data really run and, on Featured images, a real OpenSSH server; it outlives the
  process that created it, as a VM outlives a crashed flow;
- state in SQLite, so a flow, the CLI and the reaper in other processes see one cloud;
- fault injection (error rates, bursts, boot delays, forced ERROR, no capacity).

Example::

    from slipstream.cloud import Ownership, ServerSpec
    from slipstream.cloud.local import LocalCloud
    from slipstream.cloud.waiting import wait_for_servers

    cloud = LocalCloud()                       # ~/.slipstream/localcloud, or $SLIPSTREAM_LOCAL_HOME
    owner = Ownership.new("demo")
    servers = cloud.create_servers(ServerSpec("w", "m3.small", "slipstream-noop", count=2,
                                              user_data="#!/bin/sh\\necho hello\\n"), owner)
    wait_for_servers(cloud, owner.run_id, [s.id for s in servers], timeout=60)
    print(cloud.console_log(servers[0].id))    # ... hello
    for s in servers:
        cloud.delete_server(s.id)

See :mod:`~slipstream.cloud.local.options` for configuration, :mod:`.servers` for the
lifecycle, :mod:`.guest` for what runs inside a VM, :mod:`.admin` for ``status``/``reset``.
"""

from __future__ import annotations

from slipstream.cloud.local.admin import AdminOps
from slipstream.cloud.local.resources import ResourceOps
from slipstream.cloud.local.servers import ServerOps


class LocalCloud(ServerOps, ResourceOps, AdminOps):
    """The embedded cloud. ``LocalCloud(home=None, options=None)``: ``home`` defaults to
    ``options.home``, then ``$SLIPSTREAM_LOCAL_HOME``, then ``~/.slipstream/localcloud``; passing
    ``options`` writes them to ``<home>/config.json`` for every process using that home."""

    def __repr__(self) -> str:
        return f"LocalCloud(home={str(self.home)!r})"
