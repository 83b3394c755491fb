"""A LocalCloud VM on disk: its directory, its metadata, and starting its guest process.

``<home>/vms/<server id>/`` holds, like a hypervisor's instance directory plus the metadata
service:

- ``disk/`` — the VM's disk; ``disk/home`` is the login home and where user_data runs;
- ``console.log`` — everything the VM prints (boot messages, host keys, user_data output);
- ``meta.json`` — what a VM learns from the metadata service: uuid, name, address, flavour,
  image, metadata, public keys, the user_data file, the floating IP (rewritten on attach);
- ``user_data`` — the user_data as given; ``boot.json`` — this boot's number and ``ready_at``;
- ``sshd/`` — the sshd's host keys and configuration (Featured images), kept across reboots;
- ``disk/mnt/config/openstack/latest/`` — the VM's config drive: ``meta_data.json`` (uuid, name,
  hostname, public keys, ``meta``), ``network_data.json`` and ``user_data``, in Nova's format.

The same runtime runs the lab's Nova guests (lab/pylib/labguest_driver.py): this module and the
guest's import only the standard library and slipstream's core, so Debian's python3 runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import slipstream
from slipstream.cloud.local.processes import HOME_MARKER, VM_MARKER, GuestProcess, launch_guests, vm_marker
from slipstream.cloud.models import Flavor


def vm_dir(home: Path, server_id: str) -> Path:
    return home / "vms" / server_id


def python_bin_dir() -> str:
    """The directory of the Python running slipstream (a venv's bin/, not the resolved
    interpreter): the local "image" offers this python3 and what is installed with it."""
    return str(Path(sys.executable).parent)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # the guest polls meta.json: it must never see half a file


def prepare(directory: Path, *, server_id: str, name: str, address: str | None, flavor: Flavor,
            image: str, runs_sshd: bool, metadata: dict[str, str], tags: list[str],
            key_name: str | None, public_key: str | None, user_data: str | None,
            ssh_port: int, ssh_user: str, host: str | None, hostname: str | None = None,
            network_data: dict | None = None) -> None:
    """Create the VM's directory, disk, metadata and config drive. ``network_data`` is the
    drive's ``network_data.json`` (default: one link with ``address`` on a /16)."""
    (directory / "disk" / "home").mkdir(parents=True, exist_ok=True)
    (directory / "console.log").touch()
    user_data_path = None
    if user_data is not None:
        user_data_path = directory / "user_data"  # may hold a key (a Dask worker's TLS key): owner only
        with os.fdopen(os.open(user_data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(user_data)
    _write_json(directory / "meta.json", {
        "uuid": server_id,
        "name": name,
        "hostname": hostname or name,
        "address": address,
        "floating_ip": None,
        "flavor": asdict(flavor),
        "image": image,
        "runs_sshd": runs_sshd,
        "metadata": metadata,
        "tags": tags,
        "key_name": key_name,
        "public_keys": {key_name: public_key} if key_name and public_key else {},
        "user_data": str(user_data_path) if user_data_path else None,
        "ssh_port": ssh_port,
        "ssh_user": ssh_user,
        "python_bin_dir": python_bin_dir(),
        "availability_zone": "nova",
        "host": host,
    })
    _write_config_drive(directory / "disk" / CONFIG_DRIVE, server_id=server_id, name=name,
                        hostname=hostname or name, metadata=metadata, key_name=key_name,
                        public_key=public_key, user_data=user_data, address=address,
                        network_data=network_data)


#: Where a VM finds its config drive, relative to its disk (cloud-init mounts it like this).
CONFIG_DRIVE = "mnt/config/openstack/latest"


def _write_config_drive(folder: Path, *, server_id: str, name: str, hostname: str,
                        metadata: dict[str, str], key_name: str | None, public_key: str | None,
                        user_data: str | None, address: str | None,
                        network_data: dict | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    keys = {key_name: public_key} if key_name and public_key else {}
    _write_json(folder / "meta_data.json", {
        "uuid": server_id, "name": name, "hostname": hostname, "launch_index": 0,
        "availability_zone": "nova", "meta": metadata, "public_keys": keys,
        "keys": [{"name": k, "type": "ssh", "data": v} for k, v in keys.items()],
    })
    if network_data is None:
        network_data = {
            "links": [{"id": "tap0", "type": "ovs", "mtu": 1500, "vif_id": server_id}],
            "networks": [{"id": "network0", "type": "ipv4", "link": "tap0", "ip_address": address,
                          "netmask": "255.255.0.0", "routes": []}] if address else [],
            "services": [],
        }
    _write_json(folder / "network_data.json", network_data)
    if user_data is not None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        with os.fdopen(os.open(folder / "user_data", flags, 0o600), "w") as f:
            f.write(user_data)  # may hold a key: owner only


def read_meta(directory: Path) -> dict:
    """The VM's meta.json; empty if the VM dir is gone (or was never prepared)."""
    try:
        return json.loads((directory / "meta.json").read_text())
    except FileNotFoundError:
        return {}


def update_meta(directory: Path, **changes: object) -> None:
    """Change fields of meta.json (e.g. the floating IP); a no-op if the VM dir is gone."""
    data = read_meta(directory)
    if not data:
        return
    data.update(changes)
    _write_json(directory / "meta.json", data)


def write_boot(directory: Path, boot: int, ready_at: float) -> None:
    _write_json(directory / "boot.json", {"boot": boot, "ready_at": ready_at})


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _guest_env(home: Path, server_id: str, boot: int) -> dict[str, str]:
    package_root = str(Path(slipstream.__file__).resolve().parent.parent)
    return {
        "PATH": f"{python_bin_dir()}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": package_root,  # the guest imports slipstream, installed or not
        "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8",
        "SLIPSTREAM_SERVER_ID": server_id,
        HOME_MARKER: str(home),
        VM_MARKER: vm_marker(server_id, boot),
    }


def start_guests(home: Path, vms: list[tuple[str, int]],
                 extra_env: dict[str, str] | None = None) -> list[GuestProcess]:
    """Start the guests of ``(server id, boot number)`` pairs, detached; raises RuntimeError.
    ``extra_env`` goes into every guest's environment (the lab marks its processes so)."""
    return launch_guests([
        {"vm_dir": str(vm_dir(home, sid)), "console": str(vm_dir(home, sid) / "console.log"),
         "env": {**_guest_env(home, sid, boot), **(extra_env or {})}}
        for sid, boot in vms
    ])
