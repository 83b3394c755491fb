"""The inside of a LocalCloud VM: what runs, detached, as ``python -m slipstream.cloud.local.guest <vm_dir>``.

Started by the LocalCloud (never by hand) as the leader of its own process group. It plays the
part of the VM's operating system and cloud-init:

1. prints a boot message to ``console.log`` and waits until the boot delay has passed
   (``boot.json``'s ``ready_at``, the moment the cloud reports ACTIVE);
2. on Featured images, starts a real OpenSSH server on the VM's own address
   (:mod:`slipstream.cloud.local.sshd`) and prints its host key fingerprints to the console as
   cloud-init does. (cloud-init prints them after user_data; here they come first, so that a
   user_data that never ends, like a Dask worker, does not hide them);
3. runs the per-boot scripts on its disk at every boot, then user_data once per instance (not
   again after stop/start or unshelve);
4. while a floating IP is attached (``meta.json``), forwards each TCP port listening on the
   VM's address from the floating IP too, like Neutron's 1:1 NAT;
5. exits on SIGTERM, or by itself when its VM directory disappears.

It is a child subreaper: a daemon that double-forks out of its parent (and maybe clears its
environment) is re-parented to the guest, so deleting or resetting the VM still finds and ends
it (:mod:`slipstream.cloud.local.processes`); such orphans are waited for when they exit.

It only ever binds the VM's own 127.x addresses.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from slipstream.cloud.local.addresses import listens, tcp_listeners
from slipstream.cloud.local.processes import HOME_MARKER, VM_MARKER, become_subreaper, reap_adopted
from slipstream.cloud.local.userdata import run_per_boot_scripts, run_user_data

POLL = 0.5  # seconds between looks at meta.json and the listening ports
REAP_EVERY = 5.0  # seconds between waits for adopted orphans that exited
CLOUD_INIT = "Cloud-init v. 24.4 (slipstream-local)"


def say(message: str) -> None:
    print(f"cloud-init[{os.getpid()}]: {message}", flush=True)  # stdout is the console log


def _one_line(text: str) -> str:
    """``text`` with line breaks and other control characters as '?': a name or image name
    (Glance takes any text) must not print console lines of its own."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def listening_ports(address: str) -> set[int]:
    """TCP ports in LISTEN state on exactly ``address``."""
    return {port for addr, port in tcp_listeners() if addr == address}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


class FloatingForwarder:
    """Makes ``floating_ip:port`` reach ``address:port`` for every port the VM listens on."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.floating_ip: str | None = None
        self.servers: dict[int, asyncio.Server] = {}
        self.refused: dict[int, float] = {}  # port -> when to try binding again
        self.connections: set[asyncio.StreamWriter] = set()  # both ends of each forwarded one

    async def update(self, floating_ip: str | None) -> None:
        if floating_ip != self.floating_ip:
            await self.close()
            self.floating_ip = floating_ip
            if floating_ip:
                say(f"floating IP {floating_ip} now reaches {self.address}")
        if not self.floating_ip:
            return
        wanted = listening_ports(self.address)
        for port in sorted(wanted - set(self.servers)):
            if self.refused.get(port, 0) > time.monotonic():
                continue
            try:
                self.servers[port] = await asyncio.start_server(
                    self._handler(port), self.floating_ip, port, reuse_address=True)
            except OSError as err:
                say(f"cannot forward {self.floating_ip}:{port}: {err}")
                self.refused[port] = time.monotonic() + 5.0
        for port in set(self.servers) - wanted:
            self.servers.pop(port).close()

    def _handler(self, port: int):
        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(self.address, port)
            except OSError:
                writer.close()
                return
            ends = {writer, up_writer}
            self.connections |= ends
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self.connections -= ends
        return forward

    async def close(self) -> None:
        """Stop forwarding, open connections included: Neutron forgets a released floating
        IP's connection tracking, so a session through it must not go on reaching the VM."""
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        for end in self.connections:
            end.close()
        self.connections.clear()


class Guest:
    def __init__(self, vm_dir: Path) -> None:
        self.vm_dir = vm_dir
        self.meta_path = vm_dir / "meta.json"
        self.meta = json.loads(self.meta_path.read_text())
        self.boot = json.loads((vm_dir / "boot.json").read_text())
        self.disk = vm_dir / "disk"
        self.home = self.disk / "home"
        self.stopping = asyncio.Event()
        self.sshd: asyncio.subprocess.Process | None = None
        self.started = time.monotonic()

    def env(self) -> dict[str, str]:
        """The environment of everything the VM runs (user_data, SSH sessions)."""
        m = self.meta
        return {
            "HOME": str(self.home),
            "PATH": f"{m['python_bin_dir']}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "USER": m["ssh_user"],
            "LOGNAME": m["ssh_user"],
            "SHELL": "/bin/sh",
            "SLIPSTREAM_VM_DISK": str(self.disk),
            "SLIPSTREAM_VM_ADDRESS": m["address"],
            "SLIPSTREAM_VM_NAME": m["name"],
            "SLIPSTREAM_SERVER_ID": m["uuid"],
            # Markers: how the cloud finds every process of this VM (and home) to end it.
            HOME_MARKER: os.environ.get(HOME_MARKER, ""),
            VM_MARKER: os.environ.get(VM_MARKER, ""),
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stopping.set)
        now = datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
        print(f"{CLOUD_INIT} running 'init' at {now}. Boot {self.boot['boot']} of "
              f"{_one_line(self.meta['name'])} ({self.meta['flavor']['name']}, "
              f"{_one_line(self.meta['image'])}).", flush=True)
        print(f"ci-info: | eth0 | True | {self.meta['address']} | 255.255.0.0 | global |", flush=True)
        watcher = asyncio.create_task(self.watch())
        try:
            if await self.sleep_until(self.boot["ready_at"]):
                try:
                    await self.services()
                except Exception as err:  # noqa: BLE001 - a failed cloud-init does not stop a VM
                    say(f"boot services failed: {err!r}")
                if not self.stopping.is_set():
                    print(f"{CLOUD_INIT} finished at {datetime.now(UTC):%a, %d %b %Y %H:%M:%S +0000}. "
                          f"Datasource DataSourceSlipstreamLocal. Up {time.monotonic() - self.started:.2f} seconds",
                          flush=True)
            await self.stopping.wait()
        finally:
            watcher.cancel()
            if self.sshd and self.sshd.returncode is None:
                self.sshd.terminate()

    async def sleep_until(self, epoch: float) -> bool:
        """Wait for the end of the boot; False if told to stop first."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=max(0.0, epoch - time.time()))
            return False
        except TimeoutError:
            return True

    async def services(self) -> None:
        if self.meta.get("runs_sshd"):
            await self.start_sshd()
        boot_scripts = asyncio.create_task(run_per_boot_scripts(self.disk, self.env(), say))
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({boot_scripts, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not boot_scripts.done():  # the VM is stopping
            boot_scripts.cancel()
            return
        user_data = self.meta.get("user_data")
        marker = self.disk / "var/lib/cloud/instance/sem/user_data"
        if user_data and not marker.exists():
            # Marked before running, as cloud-init's per-instance semaphores are: once per
            # instance even if the VM is stopped halfway through.
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{time.time()}\n")
            work = asyncio.create_task(run_user_data(Path(user_data).read_text(), self.disk, self.env(), say))
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
            stop.cancel()

    async def start_sshd(self) -> None:
        from slipstream.cloud.local.sshd import prepare_sshd  # only Featured images need OpenSSH

        m = self.meta
        try:
            setup = await asyncio.to_thread(
                prepare_sshd, self.vm_dir / "sshd", [(m["address"], m["ssh_port"])],
                "\n".join(m.get("public_keys", {}).values()), self.env(), self.home,
                host_name=m["name"])
        except (RuntimeError, ValueError, OSError) as err:
            say(f"sshd could not be set up: {err}")
            return
        if os.geteuid() == 0 and m["ssh_user"] != "root":
            self.hand_over(m["ssh_user"], [self.home, self.vm_dir / "sshd" / "authorized_keys"])
        log = open(self.vm_dir / "sshd.log", "ab")  # noqa: SIM115 - sshd keeps it open
        self.sshd = await asyncio.create_subprocess_exec(
            *setup.command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=self.env())
        log.close()
        deadline = time.monotonic() + 10.0
        while not listens(self.sshd.pid, m["address"], m["ssh_port"]):
            if self.sshd.returncode is not None or time.monotonic() > deadline:
                listeners = tcp_listeners()
                taken = (m["address"], m["ssh_port"]) in listeners
                wildcard = ("0.0.0.0", m["ssh_port"]) in listeners
                say(f"sshd did not start listening on {m['address']}:{m['ssh_port']}"
                    + (": another process holds that address and port" if taken else "")
                    + (f": a process listens on 0.0.0.0:{m['ssh_port']} (the host's sshd?), which "
                       "Linux lets no other socket share; make it listen on its own addresses "
                       "(sshd_config ListenAddress)" if wildcard and not taken else "")
                    + f" (see {self.vm_dir / 'sshd.log'})")
                return
            await asyncio.sleep(0.02)
        # Printed once sshd accepts connections: the banner means "you can connect now".
        sys.stdout.write(setup.console_banner)
        sys.stdout.flush()

    def hand_over(self, user: str, paths: list[Path]) -> None:
        """The login user owns its home and reads its authorized_keys (sshd reads them as that
        user), as on an image whose default user is not root: the lab's guests run as root."""
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            say(f"login user {user!r} does not exist on this host: sshd will refuse it "
                f"(create it with: useradd --system --home-dir / -p '*' --shell /bin/sh {user})")
            return
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)

    async def watch(self) -> None:
        """Follow meta.json (floating IP changes) and end the VM when its directory is gone."""
        forwarder = FloatingForwarder(self.meta["address"])
        stamp = None
        zombies: set[int] = set()
        next_reap = time.monotonic() + REAP_EVERY
        try:
            while not self.stopping.is_set():
                if time.monotonic() >= next_reap:
                    zombies, next_reap = reap_adopted(zombies), time.monotonic() + REAP_EVERY
                try:
                    st = self.meta_path.stat()
                    if (st.st_ino, st.st_mtime_ns, st.st_size) != stamp:  # rewritten by os.replace
                        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                        self.meta = json.loads(self.meta_path.read_text())
                except FileNotFoundError:
                    say("the VM's directory is gone: powering off")
                    self.stopping.set()
                    break
                except (OSError, ValueError):
                    pass  # being rewritten: look again next time
                if time.time() >= self.boot["ready_at"]:
                    await forwarder.update(self.meta.get("floating_ip"))
                await asyncio.sleep(POLL)
        finally:
            await forwarder.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m slipstream.cloud.local.guest <vm_dir>")
    if not become_subreaper():
        say("cannot become a child subreaper: a daemon that double-forks may outlive this VM")
    asyncio.run(Guest(Path(args[0])).run())


if __name__ == "__main__":
    main()
