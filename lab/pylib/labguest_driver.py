"""Nova virt driver for the slipstream lab: nova's FakeDriver whose servers really boot.

``compute_driver = labguest.LabGuestDriver`` (lab/configure.sh; pylib/lab_nova_compute.py makes
this module ``nova.virt.labguest``, the only place Nova looks for drivers). Each server on a
loopback fixed address (the lab's networks are seeded in 127.80.0.0/16, floating IPs in
127.81.0.0/16) gets a *guest*: the very runtime LocalCloud VMs run (:mod:`slipstream.cloud.local.guest`, imported
from the repository through ``$LAB/pylib/slipstream``, a symlink — one runtime, two hosts, no copy).
So a lab server is a detached process group on its own 127.x address with a real sshd whose host
key fingerprints go to the console (cloud-init format, returned by Nova's console-log API), runs
its user_data as cloud-init does, and finds its metadata as on a config drive.

What Nova asks, the guest does: power off ends the guest's processes, power on and reboot boot it
again (user_data once per instance), shelve-offload ends it and keeps its disk (the snapshot),
unshelve boots it from that disk, delete ends it and removes its directory (a server deleted
while offloaded, when Nova calls no driver, loses it within SWEEP_EVERY seconds). A floating IP
that Neutron associates with a guest's port (polled once a second for all guests in one request)
reaches the guest's listening ports: the guest forwards them from that address, as Neutron's 1:1
NAT would — no interface, route or iptables rule is ever made.

Anything else (a server on a non-loopback address, e.g. a lab seeded before loopback ranges,
or any call this driver does not override) is FakeDriver's bookkeeping, unchanged: nothing binds,
routes or sends to an address outside 127.0.0.0/8, nor binds 127.x outside the lab's own
ranges (FIXED_RANGE, FLOATING_RANGE).

On stop (``lab.sh down``) every guest is ended, as on a host shutdown; on start, guests that were
running are booted again (a hypervisor host coming back with resume_guests_state_on_host_boot).
"""

import base64
import ipaddress
import json
import os
import time
from pathlib import Path

import eventlet
import nova.conf
from nova import context as nova_context
from nova import exception, objects
from nova.compute import power_state, task_states
from nova.network import neutron
from nova.virt import fake
from oslo_log import log as logging

from slipstream.cloud.local import processes, userdata, vms
from slipstream.cloud.models import Flavor
from slipstream.jetstream2 import login_user_for_image

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# The ranges lab/seed.py gives the lab's networks. Any project member can create a network of
# its own with a subnet anywhere in 127/8 (Neutron accepts it): a guest there would bind
# LocalCloud's 127.64/127.65 addresses, the lab's services' 127.0.x.y, or an address another
# guest already holds. Only these ranges are booted; a 127.x fixed address elsewhere fails.
FIXED_RANGE = ipaddress.ip_network("127.80.0.0/16")
FLOATING_RANGE = ipaddress.ip_network("127.81.0.0/16")
# What this driver refuses (an address above, a gzip bomb) it raises as InvalidInput: Nova then
# aborts the build with the reason as the server's fault; any other error is rescheduled and the
# user sees only "No valid host was found".
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a guest's processes
FLOATING_POLL = 1.0  # seconds between looks at Neutron's floating IPs of the guests' ports
SWEEP_EVERY = 30.0  # seconds between looks for stopped guests whose server was deleted
CONSOLE_MAX = 1 << 20  # bytes of the console log returned (Nova's API trims to the lines asked)
LAB_TAG = "SLIPSTREAM_LAB_PROC"  # lab.sh marks its processes with it; `down` checks for leftovers


def _within(address, network):
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:
        return False


def _fixed_address(network_info):
    """(address, port id) of the first IPv4 fixed address in FIXED_RANGE, or (None, None) when
    the server has no loopback address (bookkeeping only); raises InvalidInput for a
    loopback address outside FIXED_RANGE."""
    outside = []
    for vif in network_info or []:
        for ip in vif.fixed_ips():
            if ip["version"] == 4 and _within(ip["address"], FIXED_RANGE):
                return ip["address"], vif["id"]
            if _within(ip["address"], LOOPBACK):
                outside.append(ip["address"])
    if outside:
        raise exception.InvalidInput(reason=(
            f"fixed address {', '.join(outside)} is outside the lab's guest range {FIXED_RANGE}: "
            "the lab boots guests only on its own networks (use the project's default network)"))
    return None, None


class LabGuestDriver(fake.FakeDriver):
    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        self.home = Path(CONF.instances_path)
        self._guests = vms.vm_dir(self.home, "-").parent
        self._ports = {}  # server uuid -> its port id, for the guests that run
        self._neutron = None
        self._neutron_failing = False

    # where a guest lives ----------------------------------------------------------------------
    def _dir(self, uuid):
        return vms.vm_dir(self.home, uuid)

    def _record(self, uuid):
        try:
            return json.loads((self._dir(uuid) / "guest.json").read_text())
        except (OSError, ValueError):
            return None

    def _save_record(self, uuid, record):
        path = self._dir(uuid) / "guest.json"
        tmp = path.with_name(".guest.json.tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)

    def _has_guest(self, uuid):
        return self._record(uuid) is not None

    def _guest_ids(self):
        """Every server with a guest directory, running or not."""
        return [d.name for d in sorted(self._guests.iterdir()) if (d / "guest.json").exists()]

    # booting and ending ------------------------------------------------------------------------
    def _address_holder(self, uuid, address):
        """The other server whose running guest holds ``address``, or None (two networks with
        overlapping subnets give two ports the same address: the second guest would find its
        sshd refused, and forward its floating IP to the first server's ports)."""
        for other in self._ports:
            if other != uuid and vms.read_meta(self._dir(other)).get("address") == address:
                return other
        return None

    def _boot(self, uuid):
        record = self._record(uuid)
        address = vms.read_meta(self._dir(uuid)).get("address")
        holder = self._address_holder(uuid, address)
        if holder is not None:
            raise exception.InvalidInput(reason=(
                f"fixed address {address} is already held by the running server {holder}: "
                "give this server a port on another subnet, or delete that server first"))
        # Claimed before the launch, which yields to other green threads: two builds at once on
        # overlapping subnets must not both pass the check above.
        self._ports[uuid] = record["port"]
        boot = record["boot"] + 1
        vms.write_boot(self._dir(uuid), boot, time.time())
        # Saved before the launch: processes are found by their (server, boot) marker, and a
        # nova-compute killed mid-launch must find this boot's at its next start (init_host).
        record.update(boot=boot, guest=None)
        self._save_record(uuid, record)
        extra = {LAB_TAG: os.environ[LAB_TAG]} if LAB_TAG in os.environ else {}
        try:
            (guest,) = vms.start_guests(self.home, [(uuid, boot)], extra_env=extra)
        except BaseException:
            self._ports.pop(uuid, None)
            raise
        record.update(boot=boot, guest=[guest.pid, guest.pgid, guest.start])
        self._save_record(uuid, record)
        LOG.info("guest %s booted (boot %d, pid %d)", uuid, boot, guest.pid)

    def _end(self, *uuids):
        """End the guests' processes, all at once."""
        ended = []
        for uuid in uuids:
            self._ports.pop(uuid, None)
            record = self._record(uuid)
            if record is None:
                continue
            guest = processes.GuestProcess(*record["guest"]) if record.get("guest") else None
            ended.append((uuid, record, processes.VmProcesses(
                guest, processes.vm_marker(uuid, record["boot"]), str(self._dir(uuid)))))
        processes.end_vms([vm for _, _, vm in ended], STOP_GRACE)
        for uuid, record, _ in ended:
            record.update(guest=None)
            self._save_record(uuid, record)

    # Nova's driver API --------------------------------------------------------------------------
    def init_host(self, host):
        """After a restart every guest is off (cleanup_host ended them): known, so that Nova can
        power them on, and booted again only when Nova resumes its running servers."""
        super().init_host(host)
        self._guests.mkdir(parents=True, exist_ok=True)
        for uuid in self._guest_ids():
            self._end(uuid)  # a nova-compute that was killed could not end them
            name = self._record(uuid)["name"]
            self.instances[uuid] = fake.FakeInstance(name, power_state.SHUTDOWN, uuid)
        eventlet.spawn_n(self._follow_floating_ips)
        eventlet.spawn_n(self._sweep_deleted)

    def cleanup_host(self, host):
        self._end(*self._guest_ids())  # the host shuts down: so do its guests
        super().cleanup_host(host)

    def resume_state_on_host_boot(self, context, instance, network_info, block_device_info=None):
        """Nova, at start (resume_guests_state_on_host_boot), for each server that was running:
        boot its guest again; without one, get back the bookkeeping FakeDriver kept in memory."""
        self.instances[instance.uuid] = fake.FakeInstance(
            instance.name, power_state.RUNNING, instance.uuid)
        if self._has_guest(instance.uuid):
            self._boot(instance.uuid)

    def spawn(self, context, instance, image_meta, injected_files, admin_password, allocations,
              network_info=None, block_device_info=None, power_on=True, accel_info=None):
        super().spawn(context, instance, image_meta, injected_files, admin_password, allocations,
                      network_info, block_device_info, power_on, accel_info)
        address, port = _fixed_address(network_info)
        if address is None:
            LOG.info("no 127.x fixed address: server %s is bookkeeping only", instance.uuid)
            return
        uuid, directory = instance.uuid, self._dir(instance.uuid)
        record = self._record(uuid)
        previous = vms.read_meta(directory) if record else {}
        # An unshelve boots the same disk: its host keys, its image and authorized key (Nova
        # passes the shelved snapshot and no key_data).
        image = previous.get("image") or getattr(image_meta, "name", None) or "unknown"
        public_key = instance.key_data or next(iter(previous.get("public_keys", {}).values()), None)
        flavor = instance.flavor
        user_data = _user_data(instance.user_data)
        vms.prepare(
            directory, server_id=uuid, name=instance.display_name, address=address,
            flavor=Flavor(flavor.name, flavor.vcpus, flavor.memory_mb, flavor.root_gb),
            image=image, runs_sshd=True, metadata=dict(instance.metadata or {}), tags=[],
            key_name=instance.key_name, public_key=public_key, user_data=user_data,
            ssh_port=22, ssh_user=login_user_for_image(image), host=CONF.host,
            hostname=instance.hostname, network_data=network_info_for_drive(network_info))
        self._save_record(uuid, {"name": instance.name, "port": port,
                                 "boot": record["boot"] if record else 0, "guest": None})
        if power_on:
            self._boot(uuid)

    def power_off(self, instance, timeout=0, retry_interval=0):
        super().power_off(instance, timeout, retry_interval)
        self._end(instance.uuid)

    def power_on(self, context, instance, network_info, block_device_info=None, accel_info=None):
        super().power_on(context, instance, network_info, block_device_info, accel_info)
        if self._has_guest(instance.uuid):
            self._end(instance.uuid)  # a power-on of a running guest boots it once, not twice
            self._boot(instance.uuid)

    def reboot(self, context, instance, network_info, reboot_type, block_device_info=None,
               bad_volumes_callback=None, accel_info=None):
        if instance.uuid not in self.instances and self._has_guest(instance.uuid):
            self.instances[instance.uuid] = fake.FakeInstance(instance.name, power_state.SHUTDOWN,
                                                              instance.uuid)
        super().reboot(context, instance, network_info, reboot_type, block_device_info,
                       bad_volumes_callback, accel_info)  # -> power_on: ends and boots the guest

    def destroy(self, context, instance, network_info, block_device_info=None, destroy_disks=True,
                destroy_secrets=True):
        uuid = instance.uuid
        self._end(uuid)
        if instance.task_state != task_states.SHELVING_OFFLOADING:
            vms.remove(self._dir(uuid))  # an offloaded server keeps its disk: the snapshot
        super().destroy(context, instance, network_info, block_device_info, destroy_disks,
                        destroy_secrets)

    def get_console_output(self, context, instance):
        console = self._dir(instance.uuid) / "console.log"
        if not self._has_guest(instance.uuid) or not console.exists():
            return super().get_console_output(context, instance)
        with open(console, "rb") as f:
            f.seek(max(0, console.stat().st_size - CONSOLE_MAX))
            return f.read().decode("utf-8", "replace")

    # the driver's background threads ----------------------------------------------------------
    def _forever(self, every, one_round, what):
        """Run ``one_round`` every ``every`` seconds for as long as nova-compute runs. A round
        that fails is logged and the next one comes: an uncaught error would end the green
        thread silently, and with it every floating IP (or the sweep) until a restart."""
        while True:
            eventlet.sleep(every)
            try:
                one_round()
            except Exception:  # noqa: BLE001 - see above: the thread must outlive any one round
                LOG.exception("%s failed (trying again in %s s)", what, every)

    def _sweep_deleted(self):
        self._forever(SWEEP_EVERY, self._sweep_round, "sweeping deleted servers' guests")

    def _sweep_round(self):
        """Remove the directory of a stopped guest whose server Nova no longer has (deleted
        while shelved-offloaded or while nova-compute was down: no destroy came)."""
        for uuid in self._guest_ids():
            if uuid in self._ports:
                continue  # running: its delete comes to destroy()
            try:
                objects.Instance.get_by_uuid(nova_context.get_admin_context(), uuid)
            except exception.InstanceNotFound:
                LOG.info("server %s is gone: removing its guest's disk", uuid)
                vms.remove(self._dir(uuid))
                self.instances.pop(uuid, None)
            except Exception as err:  # noqa: BLE001 - the conductor restarting: next round
                LOG.debug("cannot look up server %s: %s", uuid, err)

    def _follow_floating_ips(self):
        self._forever(FLOATING_POLL, self._floating_round, "following floating IPs")

    def _floating_round(self):
        """Tell each running guest the floating IP Neutron has for its port (or None)."""
        ports = {port: uuid for uuid, port in list(self._ports.items()) if port}
        if not ports:
            return
        try:
            if self._neutron is None:
                self._neutron = neutron.get_client(nova_context.get_admin_context(), admin=True)
            found = self._neutron.list_floatingips(port_id=list(ports))["floatingips"]
        except Exception as err:  # noqa: BLE001 - Neutron restarting: try again next time
            if not self._neutron_failing:
                LOG.warning("cannot read floating IPs from Neutron (retrying every %s s): %s",
                            FLOATING_POLL, err)
            self._neutron_failing, self._neutron = True, None
            return
        self._neutron_failing = False
        wanted = {uuid: None for uuid in ports.values()}
        for fip in found:
            if fip.get("port_id") in ports and _within(fip["floating_ip_address"], FLOATING_RANGE):
                wanted[ports[fip["port_id"]]] = fip["floating_ip_address"]
        for uuid, address in wanted.items():
            # Compared with what the guest's meta.json says now, not with what this thread last
            # wrote: a rebuild or unshelve rewrites meta.json (no floating IP) in between.
            try:
                if vms.read_meta(self._dir(uuid)).get("floating_ip") != address:
                    vms.update_meta(self._dir(uuid), floating_ip=address)
            except (OSError, ValueError) as err:  # this guest's disk is broken: not the others'
                LOG.warning("cannot tell server %s its floating IP %s: %s", uuid, address, err)


def _user_data(encoded):
    """Nova's base64 user_data as text; gzip-compressed user_data is unpacked, as cloud-init does
    (at most userdata.UNPACKED_MAX bytes: the lab host's memory and disk are shared)."""
    if not encoded:
        return None
    raw = base64.b64decode(encoded)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = userdata.gunzip(raw)
        except userdata.UserDataError as err:
            raise exception.InvalidInput(reason=str(err)) from None
    return raw.decode("utf-8", "replace")


def network_info_for_drive(network_info):
    """``network_data.json`` as a config drive carries it (links, networks; no services)."""
    links, networks = [], []
    for i, vif in enumerate(network_info or []):
        links.append({"id": f"tap{vif['id'][:11]}", "vif_id": vif["id"], "type": "ovs",
                      "mtu": vif["network"]["meta"].get("mtu") or 1500,
                      "ethernet_mac_address": vif["address"]})
        for subnet in vif["network"]["subnets"]:
            for ip in subnet["ips"]:
                if ip["version"] != 4:
                    continue
                net = ipaddress.ip_network(subnet["cidr"])
                networks.append({"id": f"network{i}", "type": "ipv4", "link": links[-1]["id"],
                                 "ip_address": ip["address"], "netmask": str(net.netmask),
                                 "network_id": vif["network"]["id"], "routes": []})
    return {"links": links, "networks": networks, "services": []}
