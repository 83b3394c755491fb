"""The lab's Nova virt driver (lab/pylib/labguest_driver.py) against hostile input, unit level.

The driver runs inside nova-compute, under the system Python where Nova is installed (the
project's venv has no Nova), so each case runs a snippet with /usr/bin/python3 importing the
driver and *this* worktree's slipstream — the lab's live nova-compute runs main's code and is
shared, so it is never restarted or touched here. Nothing in these cases binds an address.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOVA_PYTHON = "/usr/bin/python3"

PRELUDE = '''
import base64, gzip, json, sys, uuid
from pathlib import Path
from nova import exception
from nova.network import model
import labguest_driver as lg
from slipstream.cloud.local import vms
from slipstream.cloud.models import Flavor

lg.CONF.set_override("instances_path", sys.argv[1])

def port(address, cidr, port_id=None):
    subnet = model.Subnet(cidr=cidr, ips=[model.FixedIP(address=address, version=4)], version=4)
    net = model.Network(id=str(uuid.uuid4()), subnets=[subnet], meta={})
    return model.VIF(id=port_id or str(uuid.uuid4()), network=net, address="fa:16:3e:00:00:01")

def guest_dir(driver, address, port_id="p"):
    """A prepared, not booted, guest as spawn leaves it before booting."""
    sid = str(uuid.uuid4())
    vms.prepare(driver._dir(sid), server_id=sid, name="g", address=address,
                flavor=Flavor("m3.tiny", 1, 3072, 20), image="Featured-Ubuntu24", runs_sshd=True,
                metadata={}, tags=[], key_name=None, public_key=None, user_data=None, ssh_port=22,
                ssh_user="exouser", host="lab")
    driver._save_record(sid, {"name": "g", "port": port_id, "boot": 0, "guest": None})
    return sid

def failure(call):
    try:
        call()
    except exception.InvalidInput as err:
        return str(err)
    return None

driver = lg.LabGuestDriver(None)
driver._guests.mkdir(parents=True, exist_ok=True)
'''


def in_nova(code: str, tmp_path: Path) -> dict:
    """Run PRELUDE + ``code`` (which prints one JSON line) under Nova's Python; its result."""
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8",
           "PYTHONPATH": f"{ROOT}:{ROOT / 'lab' / 'pylib'}"}
    done = subprocess.run([NOVA_PYTHON, "-c", PRELUDE + textwrap.dedent(code), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_port_on_a_users_own_loopback_subnet_boots_no_guest(tmp_path):
    # Any project member can create a network with a subnet anywhere in 127/8 (the lab's
    # Neutron accepts 127.64.250.0/24 from the app credential): a guest there would bind
    # LocalCloud's VM addresses, which teammates' test runs hand out on the same host.
    got = in_nova('''
        print(json.dumps({
            "lab": lg._fixed_address([port("127.80.3.4", "127.80.0.0/16", "p1")]),
            "localcloud": failure(
                lambda: lg._fixed_address([port("127.64.250.5", "127.64.250.0/24")])),
            "services": failure(lambda: lg._fixed_address([port("127.0.0.9", "127.0.0.0/24")])),
            "floating": failure(lambda: lg._fixed_address([port("127.81.0.20", "127.81.0.0/24")])),
            "not_loopback": lg._fixed_address([port("10.1.2.3", "10.1.2.0/24")]),
        }))
    ''', tmp_path)
    assert got["lab"] == ["127.80.3.4", "p1"]
    assert "127.64.250.5" in got["localcloud"] and "127.80.0.0/16" in got["localcloud"]
    assert "127.0.0.9" in got["services"] and "127.81.0.20" in got["floating"]
    assert got["not_loopback"] == [None, None]  # FakeDriver's bookkeeping, as before


def test_a_second_guest_on_an_address_a_running_guest_holds_is_refused(tmp_path):
    # Two networks with overlapping subnets give two ports 127.80.0.7: the second guest's sshd
    # would be refused and its floating IP would forward to the first server's sshd.
    got = in_nova('''
        def no_guest(*args, **kwargs):  # guard: a broken check must not start a real sshd here
            raise AssertionError("a guest was started on an address another guest holds")
        lg.vms.start_guests = no_guest
        first = guest_dir(driver, "127.80.0.7", "port-a")
        driver._ports[first] = "port-a"  # running
        second = guest_dir(driver, "127.80.0.7", "port-b")
        print(json.dumps({"first": first, "error": failure(lambda: driver._boot(second)),
                          "record": driver._record(second)}))
    ''', tmp_path)
    assert got["first"] in got["error"] and "127.80.0.7" in got["error"]
    assert got["record"]["guest"] is None and got["record"]["boot"] == 0  # no process started


def test_one_guest_whose_metadata_cannot_be_written_does_not_stop_the_others_floating_ips(tmp_path):
    # Neutron's answer (GET /v2.0/floatingips?port_id=...) as recorded from the lab.
    got = in_nova('''
        broken = guest_dir(driver, "127.80.0.8", "port-broken")
        healthy = guest_dir(driver, "127.80.0.9", "port-healthy")
        foreign = guest_dir(driver, "127.80.0.10", "port-foreign")
        driver._ports.update(
            {broken: "port-broken", healthy: "port-healthy", foreign: "port-foreign"})
        # meta.json cannot be rewritten (its temporary file's name is taken: a full or broken disk)
        import os
        (driver._dir(broken) / f".meta.json.{os.getpid()}").mkdir()
        class RecordedNeutron:
            def list_floatingips(self, port_id):
                return {"floatingips": [
                    {"port_id": "port-broken", "floating_ip_address": "127.81.0.11"},
                    {"port_id": "port-healthy", "floating_ip_address": "127.81.0.12"},
                    {"port_id": "port-foreign", "floating_ip_address": "127.64.0.3"}]}
        driver._neutron = RecordedNeutron()
        rounds = []
        for _ in range(2):
            try:
                driver._floating_round()
                rounds.append("ok")
            except Exception as err:
                rounds.append(repr(err))
        print(json.dumps({"rounds": rounds,
                          "healthy": vms.read_meta(driver._dir(healthy))["floating_ip"],
                          "broken": vms.read_meta(driver._dir(broken))["floating_ip"],
                          "foreign": vms.read_meta(driver._dir(foreign))["floating_ip"]}))
    ''', tmp_path)
    assert got["rounds"] == ["ok", "ok"]
    assert got["healthy"] == "127.81.0.12"
    assert got["broken"] is None  # retried next round, logged
    assert got["foreign"] is None  # a floating IP outside the lab's range is never bound


def test_a_gzip_bomb_in_user_data_is_refused_before_it_unpacks(tmp_path):
    got = in_nova('''
        bomb = gzip.compress(b"#!/bin/sh\\n" + b"\\0" * (40 << 20), 9)
        small = gzip.compress(b"#!/bin/sh\\necho hi\\n")
        print(json.dumps({"bomb_size": len(base64.b64encode(bomb)),
                          "bomb": failure(lambda: lg._user_data(base64.b64encode(bomb))),
                          "small": lg._user_data(base64.b64encode(small))}))
    ''', tmp_path)
    assert got["bomb_size"] < 65535  # Nova's user_data limit lets it through
    assert "more than" in got["bomb"] and str(16 << 20) in got["bomb"]
    assert got["small"] == "#!/bin/sh\necho hi\n"


def test_a_rebuilt_guest_is_told_its_floating_ip_again(tmp_path):
    # A rebuild (destroy, then spawn on the same server) or an unshelve rewrites meta.json with
    # no floating IP; the floating IP did not change in Neutron, so it must be written again.
    got = in_nova('''
        sid = guest_dir(driver, "127.80.0.22", "port-r")
        driver._ports[sid] = "port-r"
        class RecordedNeutron:
            def list_floatingips(self, port_id):
                return {"floatingips": [
                    {"port_id": "port-r", "floating_ip_address": "127.81.0.22"}]}
        driver._neutron = RecordedNeutron()
        driver._floating_round()
        before = vms.read_meta(driver._dir(sid))["floating_ip"]
        vms.prepare(driver._dir(sid), server_id=sid, name="g", address="127.80.0.22",
                    flavor=Flavor("m3.tiny", 1, 3072, 20), image="Featured-Ubuntu24",
                    runs_sshd=True, metadata={}, tags=[], key_name=None, public_key=None,
                    user_data=None, ssh_port=22, ssh_user="exouser",
                    host="lab")  # what spawn does on the rebuild
        driver._floating_round()
        after = vms.read_meta(driver._dir(sid))["floating_ip"]
        print(json.dumps({"before": before, "after": after}))
    ''', tmp_path)
    assert got == {"before": "127.81.0.22", "after": "127.81.0.22"}


def test_two_guests_booting_at_once_on_one_address_do_not_both_start(tmp_path):
    # Nova builds servers concurrently; launching a guest yields to the other build's green
    # thread. The stand-in launcher plays that switch: while the first guest launches, the
    # second build boots; it must find the address taken. (Nothing is really launched.)
    got = in_nova('''
        first = guest_dir(driver, "127.80.0.30", "port-a")
        second = guest_dir(driver, "127.80.0.30", "port-b")
        seen = {}
        def launching(home, guests, extra_env=None):
            (sid, boot), = guests
            if sid == first:
                seen["second"] = failure(lambda: driver._boot(second))
                raise RuntimeError("stand-in: the first guest failed to launch")
            raise AssertionError("the second guest was launched on the first one's address")
        lg.vms.start_guests = launching
        try:
            driver._boot(first)
        except RuntimeError as err:
            seen["first"] = str(err)
        seen["claimed_after_failure"] = sorted(driver._ports)
        print(json.dumps(seen))
    ''', tmp_path)
    assert "127.80.0.30" in got["second"] and "already held" in got["second"]
    assert "failed to launch" in got["first"]
    assert got["claimed_after_failure"] == []  # a failed launch releases the address


def test_a_guest_launched_by_a_nova_compute_killed_mid_launch_is_ended_at_its_next_start(tmp_path):
    # The launch yields for a while; nova-compute can be killed then (SystemExit plays it, after
    # the real launcher started a real guest, which binds nothing: no sshd, no floating IP).
    got = in_nova('''
        import os, signal
        from slipstream.cloud.local import processes
        sid = guest_dir(driver, "127.80.0.40", "port-k")
        vms.update_meta(driver._dir(sid), runs_sshd=False)
        real_start = lg.vms.start_guests
        def killed_mid_launch(*args, **kwargs):
            real_start(*args, **kwargs)
            raise SystemExit("nova-compute killed")
        lg.vms.start_guests = killed_mid_launch
        try:
            driver._boot(sid)
        except SystemExit:
            pass
        lg.vms.start_guests = real_start
        def running():
            marker = f"SLIPSTREAM_SERVER_ID={sid}".encode()
            found = []
            for entry in Path("/proc").iterdir():
                try:
                    env = (entry / "environ").read_bytes().split(b"\\0")
                    if entry.name.isdigit() and marker in env:
                        found.append(int(entry.name))
                except OSError:
                    pass
            return found
        launched = running()
        restarted = lg.LabGuestDriver(None)
        restarted._end(sid)  # what init_host does for every guest after a restart
        left = running()
        for pid in left:  # never leave one behind, whatever the outcome
            os.kill(pid, signal.SIGKILL)
        print(json.dumps({"launched": len(launched), "left": len(left)}))
    ''', tmp_path)
    assert got["launched"] >= 1
    assert got["left"] == 0
