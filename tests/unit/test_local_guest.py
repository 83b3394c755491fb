"""Inside a LocalCloud VM: user_data really runs, Featured images run a real sshd, floating IPs reach it."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import sys
from pathlib import Path

import pytest

from slipstream import ssh
from slipstream.cloud.local.userdata import UserDataError, disk_path
from slipstream.cloud.models import Keypair, Ownership, ServerSpec, ServerStatus
from slipstream.cloud.waiting import wait_for_servers
from support import owner, wait_until

S = ServerStatus
NOOP = "slipstream-noop"
FINISHED = "Cloud-init v. 24.4 (slipstream-local) finished"




def boot(cloud, spec: ServerSpec, who: Ownership | None = None, finished: int = 1):
    """Create, wait for ACTIVE and for the guest to finish its boot (user_data included)."""
    who = who or owner()
    (server,) = cloud.create_servers(spec, who)
    (server,) = wait_for_servers(cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)
    wait_until(lambda: cloud.console_log(server.id).count(FINISHED) >= finished, what="end of boot")
    return server, who


def disk(cloud, server) -> Path:
    return cloud.home / "vms" / server.id / "disk"


def ssh_banner(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=5) as conn:
        return conn.recv(64)


def vm_processes(server_id: str, cmdline: bytes) -> set[int]:
    """Running processes of the VM (by its SLIPSTREAM_SERVER_ID) whose command line has ``cmdline``."""
    marker = f"SLIPSTREAM_SERVER_ID={server_id}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and cmdline in (entry / "cmdline").read_bytes()
                    and marker in (entry / "environ").read_bytes().split(b"\0")):
                found.add(int(entry.name))
        except OSError:
            pass
    return found


# user_data ----------------------------------------------------------------------------------
def test_a_script_runs_in_the_vm_home_with_the_vm_environment(local_cloud):
    script = """#!/bin/sh
echo "user_data says hello from $SLIPSTREAM_VM_NAME"
pwd > where
env > environment
python3 -c 'import numpy, sys; print("numpy", numpy.__version__, sys.executable)'
"""
    server, _ = boot(local_cloud, ServerSpec("script", "m3.tiny", NOOP, user_data=script))
    home = disk(local_cloud, server) / "home"
    console = local_cloud.console_log(server.id)
    assert "user_data says hello from script" in console
    assert "numpy " in console
    assert (home / "where").read_text().strip() == str(home)
    env = dict(line.split("=", 1) for line in (home / "environment").read_text().splitlines() if "=" in line)
    assert env["HOME"] == str(home)
    assert env["SLIPSTREAM_VM_DISK"] == str(disk(local_cloud, server))
    assert env["SLIPSTREAM_VM_ADDRESS"] == server.address
    assert env["SLIPSTREAM_VM_NAME"] == "script" and env["SLIPSTREAM_SERVER_ID"] == server.id
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_cloud_config_write_files_and_runcmd(local_cloud):
    payload = base64.b64encode(b"\x00binary\xff").decode()
    config = f"""#cloud-config
write_files:
  - path: /etc/app/app.conf
    content: |
      threads=4
    permissions: '0600'
  - path: /opt/blob.bin
    encoding: b64
    content: {payload}
  - path: /../../../escape.txt
    content: stays inside
runcmd:
  - echo "runcmd as a string, in $(pwd)" > from-string
  - [sh, -c, "cat $SLIPSTREAM_VM_DISK/etc/app/app.conf > from-list"]
  - [sh, -c, "exit 3"]
  - [no-such-program]
packages: [htop]
"""
    server, _ = boot(local_cloud, ServerSpec("config", "m3.tiny", NOOP, user_data=config))
    root = disk(local_cloud, server)
    conf = root / "etc/app/app.conf"
    assert conf.read_text() == "threads=4\n" and oct(conf.stat().st_mode & 0o777) == "0o600"
    assert (root / "opt/blob.bin").read_bytes() == b"\x00binary\xff"
    assert (root / "escape.txt").read_text() == "stays inside"  # mapped under the disk
    assert (root / "home/from-string").read_text().strip() == f"runcmd as a string, in {root / 'home'}"
    assert (root / "home/from-list").read_text() == "threads=4\n"
    console = local_cloud.console_log(server.id)
    assert "runcmd[2] exited with status 3\n" in console
    assert "runcmd[3] exited with status 127\n" in console
    assert "'packages' is not supported" in console


def mime_user_data(*parts: tuple[str, str]) -> str:
    """A multipart user_data as ``cloud-init devel make-mime`` writes it."""
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    message = MIMEMultipart()
    for subtype, text in parts:
        message.attach(MIMEText(text, subtype))
    return message.as_string()


def test_mime_multipart_user_data_runs_every_part_as_cloud_init_orders_them(local_cloud):
    user_data = mime_user_data(
        ("cloud-config", "#cloud-config\nwrite_files:\n  - path: /etc/order\n    content: |\n"
                         "      files\nruncmd:\n  - echo runcmd >> $SLIPSTREAM_VM_DISK/etc/order\n"),
        ("x-shellscript", "#!/bin/sh\necho script-1 >> $SLIPSTREAM_VM_DISK/etc/order\n"),
        ("x-shellscript", "#!/bin/sh\necho script-2 >> $SLIPSTREAM_VM_DISK/etc/order\nexit 4\n"),
    )
    assert user_data.startswith("Content-Type: multipart/mixed")
    server, _ = boot(local_cloud, ServerSpec("mime", "m3.tiny", NOOP, user_data=user_data))
    # write_files first, then the scripts in order, then runcmd (part-NNN sorts before runcmd)
    assert (disk(local_cloud, server) / "etc/order").read_text().split() == [
        "files", "script-1", "script-2", "runcmd"]
    assert "user_data script part-002 exited with status 4" in local_cloud.console_log(server.id)


def test_the_config_drive_has_nova_metadata_and_network_data(local_cloud):
    keypair = ssh.generate_keypair(comment="drive")
    local_cloud.create_keypair("drive-key", keypair.public_key)
    spec = ServerSpec("drive", "m3.tiny", NOOP, key_name="drive-key", user_data="#!/bin/sh\ntrue\n")
    server, who = boot(local_cloud, spec)
    drive = disk(local_cloud, server) / "mnt/config/openstack/latest"
    meta = json.loads((drive / "meta_data.json").read_text())
    assert (meta["uuid"], meta["name"], meta["hostname"]) == (server.id, "drive", "drive")
    assert meta["public_keys"] == {"drive-key": keypair.public_key}
    assert meta["meta"] == server.metadata and meta["meta"]  # the ownership metadata, as Nova's
    network = json.loads((drive / "network_data.json").read_text())
    assert [n["ip_address"] for n in network["networks"]] == [server.address]
    assert (drive / "user_data").read_text() == spec.user_data


def test_user_data_runs_once_per_instance_and_per_boot_scripts_at_every_boot(local_cloud):
    # As with cloud-init, a per-boot script written by user_data runs from the next boot on.
    user_data = """#!/bin/sh
echo run >> $HOME/runs
mkdir -p $SLIPSTREAM_VM_DISK/var/lib/cloud/scripts/per-boot
printf '#!/bin/sh\\necho boot >> $HOME/boots\\n' > $SLIPSTREAM_VM_DISK/var/lib/cloud/scripts/per-boot/10-count
chmod +x $SLIPSTREAM_VM_DISK/var/lib/cloud/scripts/per-boot/10-count
"""
    server, who = boot(local_cloud, ServerSpec("once", "m3.tiny", NOOP, user_data=user_data))
    local_cloud.stop_server(server.id)
    local_cloud.start_server(server.id)
    wait_for_servers(local_cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)
    wait_until(lambda: local_cloud.console_log(server.id).count(FINISHED) == 2, what="second boot")
    local_cloud.shelve_server(server.id)
    local_cloud.unshelve_server(server.id)
    wait_for_servers(local_cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)
    wait_until(lambda: local_cloud.console_log(server.id).count(FINISHED) == 3, what="third boot")
    assert (disk(local_cloud, server) / "home/runs").read_text() == "run\n"
    assert (disk(local_cloud, server) / "home/boots").read_text() == "boot\nboot\n"  # after stop/start, unshelve


def test_write_files_never_leaves_the_disk_even_through_a_symlink(tmp_path):
    root = tmp_path / "disk"
    (root / "home").mkdir(parents=True)
    (root / "home/out").symlink_to(tmp_path)
    assert disk_path(root, "/etc/../../x") == (root / "x").resolve()
    with pytest.raises(UserDataError):
        disk_path(root, "/home/out/secret")


# sshd ---------------------------------------------------------------------------------------
def test_a_featured_vm_runs_sshd_on_its_address_and_prints_its_host_keys(local_cloud):
    keypair = ssh.generate_keypair(comment="unit")
    who = owner()
    local_cloud.create_keypair(Keypair.name_for_run(who.run_id), keypair.public_key)
    spec = ServerSpec("sshable", "m3.small", "Featured-Ubuntu24", key_name=Keypair.name_for_run(who.run_id))
    server, _ = boot(local_cloud, spec, who)
    assert server.ssh_port == (22 if os.geteuid() == 0 else 2222)
    console = local_cloud.console_log(server.id)
    assert "-----BEGIN SSH HOST KEY FINGERPRINTS-----" in console
    assert "-----END SSH HOST KEY KEYS-----" in console
    assert ssh_banner(server.address, server.ssh_port).startswith(b"SSH-2.0-OpenSSH")

    target = ssh.wait_for_ssh(lambda: ssh.target_for(local_cloud.get_server(server.id), keypair,
                                                     local_cloud.console_log(server.id)),
                              timeout=30, poll_interval=0.2)
    result = ssh.run_command(target, "pwd; echo $SLIPSTREAM_VM_NAME", timeout=30)
    assert result.stdout.split() == [str(disk(local_cloud, server) / "home"), "sshable"]

    # Stopping ends what SSH sessions left running (sshd puts each session in its own session).
    ssh.run_command(target, "nohup sleep 321 > /dev/null 2>&1 &", timeout=30)
    assert wait_until(lambda: vm_processes(server.id, b"sleep\x00321"), what="the session's sleep")

    # Host keys survive stop/start, as a VM's do.
    fingerprints = ssh.host_keys_from_console(console)
    local_cloud.stop_server(server.id)
    assert not vm_processes(server.id, b"sleep\x00321")
    with pytest.raises(OSError):
        ssh_banner(server.address, server.ssh_port)
    local_cloud.start_server(server.id)
    wait_for_servers(local_cloud, who.run_id, [server.id], timeout=20, poll_interval=0.05)
    wait_until(lambda: local_cloud.console_log(server.id).count(FINISHED) == 2, what="second boot")
    assert ssh.host_keys_from_console(local_cloud.console_log(server.id)) == fingerprints


def test_a_wildcard_listener_on_the_ssh_port_is_named_on_the_console(tmp_path):
    """A host sshd on 0.0.0.0:22 keeps every guest from port 22 (Linux lets no socket share a
    listening wildcard's port): the console says so instead of a bare "did not start"."""
    from slipstream.cloud.local import LocalCloud, LocalCloudOptions

    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("0.0.0.0", 0))  # a free port, on every address, as a host sshd's 22
        blocker.listen()
        port = blocker.getsockname()[1]
        cloud = LocalCloud(options=LocalCloudOptions(
            home=tmp_path / "localcloud", boot_delay=0.05, stop_grace=1.0, ssh_port=port,
            network=f"127.64.{random.randint(100, 249)}.0/24"))
        try:
            server, _ = boot(cloud, ServerSpec("blocked", "m3.tiny", "Featured-Ubuntu24"))
            console = cloud.console_log(server.id)
        finally:
            cloud.reset()
    assert f"sshd did not start listening on {server.address}:{port}" in console
    assert f"a process listens on 0.0.0.0:{port}" in console and "ListenAddress" in console


def test_the_noop_image_runs_no_sshd(local_cloud):
    server, _ = boot(local_cloud, ServerSpec("quiet", "m3.tiny", NOOP))
    assert "SSH HOST KEY" not in local_cloud.console_log(server.id)
    with pytest.raises(OSError):
        ssh_banner(server.address, server.ssh_port)


def test_a_floating_ip_reaches_the_vm_until_it_is_released(local_cloud):
    server, who = boot(local_cloud, ServerSpec("public", "m3.tiny", "Featured-Ubuntu22"))
    fip = local_cloud.create_floating_ip(who)
    local_cloud.attach_floating_ip(fip.id, server.id)
    assert local_cloud.get_server(server.id).reachable_address == fip.address

    def reachable() -> bool:
        try:
            return ssh_banner(fip.address, server.ssh_port).startswith(b"SSH-2.0-OpenSSH")
        except OSError:
            return False

    wait_until(reachable, what="SSH through the floating IP")
    local_cloud.delete_floating_ip(fip.id)
    wait_until(lambda: not reachable(), what="the floating IP to stop forwarding")


def test_a_released_floating_ip_also_ends_the_connections_made_through_it(local_cloud):
    # Neutron drops a floating IP's connection tracking when it is disassociated: a session
    # opened through it must not keep reaching the VM after the address went elsewhere.
    server, who = boot(local_cloud, ServerSpec("public", "m3.tiny", "Featured-Ubuntu22"))
    fip = local_cloud.create_floating_ip(who)
    local_cloud.attach_floating_ip(fip.id, server.id)

    def connected():
        try:
            conn = socket.create_connection((fip.address, server.ssh_port), timeout=5)
        except OSError:
            return None
        if conn.recv(64).startswith(b"SSH-2.0-OpenSSH"):
            return conn
        conn.close()
        return None

    conn = wait_until(connected, what="SSH through the floating IP")
    with conn:
        local_cloud.delete_floating_ip(fip.id)
        conn.settimeout(0.2)

        def closed() -> bool:
            try:
                return conn.recv(64) == b""
            except TimeoutError:
                return False
            except ConnectionError:
                return True

        wait_until(closed, what="the connection through the released floating IP to end")
