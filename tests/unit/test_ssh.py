"""SSH against a real OpenSSH server: host keys checked from the console, commands, files, errors.

Each test boots its own sshd (prepare_sshd, as LocalCloud does) on its own 127.64.250.x address
and proves afterwards that no sshd process of it is left. sshd puts every connection and every
session in a new session (setsid), outside the process group we start it in, so the finalizer
also finds them as descendants of the listener and by a marker variable every session carries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import getpass
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import asyncssh
import pytest

from slipstream import ssh
from slipstream.cloud.local import sshd as sshd_module
from slipstream.cloud.local.sshd import prepare_sshd
from slipstream.cloud.models import Server, ServerStatus

_NEXT_HOST = itertools.count(1)
_ROOT = os.geteuid() == 0


def _free_address() -> tuple[str, int]:
    """A 127.64.250.x address (port 22 as root, else a free high port) nothing listens on."""
    for _ in range(254):
        address = f"127.64.250.{next(_NEXT_HOST) % 254 + 1}"
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, 22 if _ROOT else 0))
            except OSError:
                continue
            return address, probe.getsockname()[1]
    raise RuntimeError("no free 127.64.250.x address")


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time, state) for every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            table[int(entry.name)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def _pids_with_marker(marker: str) -> set[int]:
    needle = f"SLIPSTREAM_TEST_SSHD={marker}".encode()
    found = set()
    for pid in _processes():
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            pass  # gone, or not ours to read
    return found


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in _processes().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _session_running(marker: str, command: bytes) -> bool:
    for pid in _pids_with_marker(marker):
        try:
            if command in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "):
                return True
        except OSError:
            pass
    return False


def _still_running(identities: set[tuple[int, int]]) -> set[int]:
    """Those of (pid, start time) still running: a zombie has finished (only its parent can
    reap it), and a recycled pid has another start time."""
    table = _processes()
    return {pid for pid, started in identities
            if pid in table and table[pid][1] == started and table[pid][2] != "Z"}


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@dataclasses.dataclass
class Vm:
    address: str
    port: int
    home: Path
    state: Path
    setup: sshd_module.SshdSetup
    keypair: ssh.SshKeypair
    log: Path
    marker: str
    proc: subprocess.Popen | None = None

    def target(self, fingerprints: tuple[str, ...] | None = None) -> ssh.SshTarget:
        expected = self.setup.fingerprints if fingerprints is None else fingerprints
        return ssh.SshTarget(self.address, self.port, getpass.getuser(), self.keypair, expected)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.setup.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "SLIPSTREAM_TEST_SSHD": self.marker},
            )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"sshd exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd not listening after 15 s: {self.log.read_text()}")
                time.sleep(0.02)

    def _ours(self, listening: bool) -> set[tuple[int, int]]:
        # Connections and sessions are setsid'd out of sshd's process group: find them as
        # descendants of the listener (while it runs: its pid is ours until reaped) and
        # (sessions, even daemonised ones) by the marker.
        pids = _pids_with_marker(self.marker)
        if listening:
            pids |= {self.proc.pid} | _descendants(self.proc.pid)
        table = _processes()
        return {(pid, table[pid][1]) for pid in pids if pid in table}

    def stop(self) -> None:
        if self.proc is None:
            return
        ours = self._ours(listening=True)
        _signal(_still_running(ours), signal.SIGTERM)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # start_new_session: pgid == sshd's pid
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while left := _still_running(ours | self._ours(listening=False)):
            if time.monotonic() > deadline:
                _signal(left, signal.SIGKILL)
                pytest.fail(f"sshd processes still running 10 s after SIGTERM: {sorted(left)}")
            time.sleep(0.02)
        self.proc = None


@pytest.fixture
def make_vm(tmp_path):
    vms: list[Vm] = []

    def make(start: bool = True) -> Vm:
        address, port = _free_address()
        keypair = ssh.generate_keypair(comment="test")
        home = tmp_path / f"vm{len(vms)}" / "home"
        state = tmp_path / f"vm{len(vms)}" / "sshd"
        marker = uuid.uuid4().hex
        env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "SLIPSTREAM_TEST_SSHD": marker}
        setup = prepare_sshd(state, [(address, port)], keypair.public_key, env, home)
        vm = Vm(address, port, home, state, setup, keypair, state / "sshd.log", marker)
        vms.append(vm)
        if start:
            vm.start()
        return vm

    yield make
    failures = []
    for vm in vms:  # stop every one, even if an earlier one left something behind
        try:
            vm.stop()
        except BaseException as err:  # noqa: BLE001 - pytest.fail raises a BaseException
            failures.append(str(err))
    if failures:
        pytest.fail("; ".join(failures))


def test_a_command_runs_after_the_host_key_is_verified(make_vm):
    vm = make_vm()
    result = ssh.run_command(vm.target(), "echo hello; echo note >&2; whoami", timeout=30)
    assert result == ssh.CommandResult(0, f"hello\n{getpass.getuser()}\n", "note\n")


def test_commands_and_sftp_start_in_the_vm_home(make_vm):
    vm = make_vm()
    out = ssh.run_command(vm.target(), 'pwd; echo "$HOME"; echo "$PATH"; echo "$GREETING"',
                          timeout=30, env={"GREETING": "it's $HOME; ok"}).stdout.splitlines()
    assert out == [str(vm.home), str(vm.home), "/usr/bin:/bin", "it's $HOME; ok"]
    ssh.upload(vm.target(), [], "made-by-sftp")
    assert (vm.home / "made-by-sftp").is_dir()


def test_upload_then_download_round_trips_files_and_directories(make_vm, tmp_path):
    vm = make_vm()
    src = tmp_path / "src"
    (src / "data" / "nested").mkdir(parents=True)
    (src / "notes.txt").write_text("hello\n")
    (src / "data" / "blob.bin").write_bytes(bytes(range(256)) * 100)
    (src / "data" / "nested" / "deep.txt").write_text("deep\n")
    ssh.upload(vm.target(), [src / "notes.txt", src / "data"], "job/in")
    assert (vm.home / "job" / "in" / "data" / "nested" / "deep.txt").read_text() == "deep\n"

    ssh.run_command(vm.target(), "cd job/in && cat notes.txt > copy.txt", timeout=30)
    back = tmp_path / "back"
    ssh.download(vm.target(), ["job/in/copy.txt", "job/in/data"], back)
    assert (back / "copy.txt").read_text() == "hello\n"
    assert (back / "data" / "blob.bin").read_bytes() == (src / "data" / "blob.bin").read_bytes()
    assert (back / "data" / "nested" / "deep.txt").read_text() == "deep\n"

    with pytest.raises(ssh.SshError, match="no-such-file"):
        ssh.download(vm.target(), ["job/no-such-file"], back)
    with pytest.raises(FileNotFoundError):
        ssh.upload(vm.target(), [src / "missing"], "job")


def test_a_host_key_mismatch_is_refused_before_authenticating(make_vm):
    vm = make_vm()
    wrong = (ssh.generate_keypair("other").fingerprint,)
    marker = vm.home / "marker"
    with pytest.raises(ssh.HostKeyMismatch) as err:
        ssh.run_command(vm.target(wrong), f"touch {marker}", timeout=30)
    message = str(err.value)
    assert f"{vm.address}:{vm.port}" in message and wrong[0] in message
    assert err.value.presented in vm.setup.fingerprints and err.value.presented in message
    assert "man-in-the-middle" in message and "another boot" in message
    assert not marker.exists()
    # A mismatch is never retried, however long the deadline.
    calls = []
    with pytest.raises(ssh.HostKeyMismatch):
        ssh.wait_for_ssh(lambda: calls.append(1) or vm.target(wrong), timeout=60,
                         poll_interval=0.01)
    assert len(calls) == 1
    # sshd saw no authentication: the only one it logs is the good connection below.
    ssh.run_command(vm.target(), "true", timeout=30)
    assert vm.log.read_text().count("Accepted publickey") == 1


def test_without_fingerprints_nothing_is_trusted(make_vm):
    vm = make_vm()
    with pytest.raises(ssh.HostKeyUnavailable, match="console log has not printed them"):
        ssh.run_command(vm.target(()), "true", timeout=30)
    with pytest.raises(ssh.HostKeyUnavailable):
        ssh.wait_for_ssh(vm.target(()), timeout=60)  # a fixed target cannot learn them
    assert "Accepted publickey" not in vm.log.read_text()


def test_wait_for_ssh_retries_until_the_console_and_the_server_are_up(make_vm):
    vm = make_vm(start=False)
    consoles = iter(["", "booting...\n-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 SHA256:x"])
    server = Server("s1", "vm", ServerStatus.ACTIVE, "m3.small", "img", address=vm.address,
                    ssh_port=vm.port, ssh_user=getpass.getuser())
    progress = []

    def target() -> ssh.SshTarget:
        return ssh.target_for(server, vm.keypair, next(consoles, vm.setup.console_banner))

    def on_progress(attempt: int, detail: str) -> None:
        progress.append(detail)
        if len(progress) == 3:
            vm.start()  # the "host" comes up after one refused connection

    ready = ssh.wait_for_ssh(target, timeout=60, on_progress=on_progress, poll_interval=0.01)
    assert ready.expected_fingerprints == vm.setup.fingerprints
    assert progress[:2] == ["host key fingerprints not on the console yet"] * 2
    assert len(progress) == 3 and "cannot reach SSH" in progress[2]

    nobody_home, port = _free_address()
    with pytest.raises(ssh.SshTimeout, match="cannot reach SSH"):
        ssh.wait_for_ssh(ssh.SshTarget(nobody_home, port, "root", vm.keypair, ("SHA256:x",)),
                         timeout=0.5, poll_interval=0.05)


def test_a_failing_command_raises_with_its_exit_status_and_stderr(make_vm):
    vm = make_vm()
    with pytest.raises(ssh.RemoteCommandFailed) as err:
        ssh.run_command(vm.target(), "echo first >&2; echo oops >&2; exit 3", timeout=30)
    assert err.value.exit_status == 3 and err.value.stderr_tail == "first\noops"
    assert "status 3" in str(err.value) and "oops" in str(err.value)
    assert ssh.run_command(vm.target(), "exit 4", timeout=30, check=False).exit_status == 4
    assert ssh.run_command(vm.target(), "kill -KILL $$", timeout=30, check=False).exit_status == -9
    with pytest.raises(ssh.SshTimeout):
        ssh.run_command(vm.target(), "sleep 5", timeout=0.5)


def test_stopping_the_server_ends_running_sessions_and_the_client_hears_of_it(make_vm):
    vm = make_vm()
    ssh.run_command(vm.target(), "nohup sleep 300 >/dev/null 2>&1 &", timeout=30)  # a daemon
    assert _session_running(vm.marker, b"sleep 300")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(ssh.run_command, vm.target(), "sleep 120", timeout=300)
        deadline = time.monotonic() + 15
        while not _session_running(vm.marker, b"sleep 120"):
            assert time.monotonic() < deadline and not running.done()
            time.sleep(0.02)
        assert _descendants(vm.proc.pid)  # the connection's sshd processes
        vm.stop()  # proves nothing of this sshd is left, the daemon included
        with pytest.raises(ssh.SshError, match="lost while running"):
            running.result(timeout=30)


def test_calls_work_from_worker_threads_and_inside_a_running_event_loop(make_vm):
    vm = make_vm()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: ssh.run_command(vm.target(), f"echo {i}", timeout=30).stdout,
                             range(4)))
    assert outs == [f"{i}\n" for i in range(4)]

    async def notebook_cell() -> str:
        return ssh.run_command(vm.target(), "echo from-a-loop", timeout=30).stdout

    assert asyncio.run(notebook_cell()) == "from-a-loop\n"


def test_the_private_key_never_shows(make_vm, caplog):
    vm = make_vm()
    key = vm.keypair.private_key()
    secrets = [line for line in key.export_private_key("openssh").decode().splitlines()
               if "PRIVATE KEY" not in line]
    seed = key.export_private_key("pkcs8-der")[-32:]
    caplog.set_level(logging.DEBUG, logger="asyncssh")
    caplog.set_level(logging.DEBUG, logger="slipstream")
    asyncssh.set_debug_level(2)
    texts = []
    try:
        ssh.run_command(vm.target(), "true", timeout=30)
        for bad in (lambda: ssh.run_command(vm.target(), "exit 1", timeout=30),
                    lambda: ssh.run_command(vm.target(("SHA256:" + "A" * 43,)), "true", timeout=30),
                    lambda: ssh.run_command(vm.target(()), "true", timeout=30)):
            with pytest.raises(ssh.SshError) as err:
                bad()
            texts += [str(err.value), repr(err.value)]
    finally:
        asyncssh.set_debug_level(1)
    assert "Accepted publickey" in vm.log.read_text()
    texts += [caplog.text, repr(vm.keypair), str(vm.keypair), repr(vm.target()),
              str(dataclasses.asdict(vm.keypair)), repr(vm.keypair._private)]
    for text in texts:
        assert not any(s in text for s in secrets)
    assert "redacted" in repr(vm.keypair._private) and "public_key" in repr(vm.keypair)
    pickled = pickle.dumps(vm.target())
    assert seed not in pickled and not any(s.encode() in pickled for s in secrets)
    # In this process a pickled keypair resolves to the live key: Prefect can pass it along.
    again = pickle.loads(pickled)
    assert ssh.run_command(again, "echo ok", timeout=30).stdout == "ok\n"


def test_a_keypair_unpickled_after_its_original_is_gone_has_no_private_key():
    keypair = ssh.generate_keypair("gone")
    pickled = pickle.dumps(keypair)
    del keypair
    gc.collect()
    ghost = pickle.loads(pickled)
    with pytest.raises(ssh.SshError, match="not in this process"):
        ghost.private_key()


CONSOLE = """\
[    0.000000] Linux version 5.15.0-105-generic (buildd@lcy02-amd64-007)
[    3.141592] cloud-init[612]: Cloud-init v. 23.4.4 running 'init' at Mon, 01 Apr 2024.
ci-info: ++++++++++++++++++++++++++++Net device info+++++++++++++++++++++++++++++
[  OK  ] Started OpenBSD Secure Shell server.\r
ec2: \r
ec2: #############################################################\r
ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r
ec2: 256 SHA256:{old} root@vm (ECDSA)\r
ec2: 256 SHA256:{a} root@vm (ED25519)\r
ec2: -----END SSH HOST KEY FINGERPRINTS-----\r
ec2: #############################################################\r
-----BEGIN SSH HOST KEY KEYS-----
ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOld root@vm
-----END SSH HOST KEY KEYS-----
[   42.000000] cloud-init[901]: Cloud-init v. 23.4.4 finished. Datasource DataSourceOpenStackLocal.
[  100.000000] reboot: Restarting system
[    0.000000] Linux version 5.15.0-105-generic (buildd@lcy02-amd64-007)
[    2.718281] cloud-init[598]: SHA256:{noise} is not a host key line
ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----
ec2: 256 SHA256:{new} root@vm (ECDSA)
ec2: 256 SHA256:{a} root@vm (ED25519)
ec2: 3072 SHA256:{rsa} root@vm (RSA)
ec2: -----END SSH HOST KEY FINGERPRINTS-----
[   44.000000] cloud-init[930]: Cloud-init v. 23.4.4 finished.
"""


def test_host_keys_come_from_the_last_complete_console_block():
    fp = {k: (k * 43)[:43] for k in ("old", "a", "new", "rsa", "noise")}
    console = CONSOLE.format(**fp)
    assert ssh.host_keys_from_console(console) == tuple(
        f"SHA256:{fp[k]}" for k in ("new", "a", "rsa"))
    first_boot = console.split("reboot:")[0]
    assert ssh.host_keys_from_console(first_boot) == (f"SHA256:{fp['old']}", f"SHA256:{fp['a']}")
    # A third boot that has begun printing but not finished: nothing yet (no stale keys).
    half = console + "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\nec2: 256 SHA256:" + fp["a"]
    assert ssh.host_keys_from_console(half) == ()
    assert ssh.host_keys_from_console("") == ()
    assert ssh.host_keys_from_console("[ 1.0] booting\n") == ()


def test_prepare_sshd_banner_parses_and_host_keys_survive_a_restart(tmp_path):
    kp = ssh.generate_keypair("t")
    listen = [("127.64.250.1", 2222)]
    first = prepare_sshd(tmp_path / "s", listen, kp.public_key, {}, tmp_path / "h")
    again = prepare_sshd(tmp_path / "s", listen, kp.public_key, {}, tmp_path / "h")
    assert again.fingerprints == first.fingerprints and len(first.fingerprints) == 2
    assert ssh.host_keys_from_console("noise\n" + first.console_banner) == first.fingerprints
    assert "-----BEGIN SSH HOST KEY KEYS-----\necdsa-sha2-nistp256 " in first.console_banner
    assert first.command[:2] == ["/usr/sbin/sshd", "-D"]


@pytest.mark.parametrize(
    "address", ["10.0.0.5", "0.0.0.0", "192.168.1.1", "::1", "localhost", "128.0.0.1"])
def test_prepare_sshd_listens_on_loopback_only(tmp_path, address):
    with pytest.raises(ValueError, match="127.0.0.0/8|not an IP address"):
        prepare_sshd(tmp_path / "s", [(address, 2222)], "", {}, tmp_path / "h")
    assert not (tmp_path / "s").exists()


def test_prepare_sshd_names_the_package_when_sshd_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(sshd_module, "SSHD", str(tmp_path / "no-sshd"))
    with pytest.raises(RuntimeError, match="openssh-server"):
        prepare_sshd(tmp_path / "s", [("127.64.250.1", 2222)], "", {}, tmp_path / "h")


def test_prepare_sshd_refuses_values_sshd_config_would_mangle(tmp_path):
    with pytest.raises(ValueError, match="session variable"):
        prepare_sshd(tmp_path / "s", [("127.64.250.1", 2222)], "", {"HOME": "a\nb"}, tmp_path / "h")
    with pytest.raises(ValueError, match="whitespace"):
        prepare_sshd(tmp_path / "s", [("127.64.250.1", 2222)], "", {}, tmp_path / "my home")


def test_target_for_prefers_the_floating_ip():
    kp = ssh.generate_keypair("t")
    server = Server("id1", "vm", ServerStatus.ACTIVE, "m3.small", "img", address="127.64.0.9",
                    floating_ip="127.65.0.9", ssh_port=2200, ssh_user="ubuntu")
    target = ssh.target_for(server, kp, "")
    assert (target.host, target.port, target.user, target.expected_fingerprints) == \
        ("127.65.0.9", 2200, "ubuntu", ())
    with pytest.raises(ssh.SshUnreachable, match="no address"):
        ssh.target_for(dataclasses.replace(server, address=None, floating_ip=None), kp, "")


def test_a_chatty_command_keeps_only_its_last_lines_in_memory_and_the_sink_hears_every_one(make_vm):
    vm = make_vm()
    heard: list[str] = []
    result = ssh.run_command(vm.target(), "seq 1 50000", timeout=60, keep_lines=200,
                             on_output=lambda stream, line: heard.append(line))
    assert len(heard) == 50000 and heard[-1] == "50000"
    assert result.stdout.splitlines() == [str(n) for n in range(49801, 50001)]


def test_a_download_never_writes_more_than_its_limit_and_fetches_the_rest(make_vm, tmp_path, monkeypatch):
    from slipstream.transfer import fetch_outputs

    vm = make_vm()
    monkeypatch.setenv("SLIPSTREAM_MAX_DOWNLOAD_BYTES", str(1 << 20))
    # A VM makes a terabyte in a blink (sparse); each small file fits, together they would not.
    ssh.run_command(vm.target(), "mkdir -p job/out && truncate -s 1T job/out/huge.bin && "
                    "head -c 400000 /dev/urandom > job/out/a.bin && head -c 400000 /dev/urandom > job/b.bin && "
                    "head -c 400000 /dev/urandom > job/c.bin", timeout=30)
    got = fetch_outputs(vm.target(), "job", ["out", "b.bin", "c.bin"], tmp_path / "res", timeout=60)
    assert sorted(got.files) == ["b.bin", "out/a.bin"]
    assert set(got.refused) == {"out/huge.bin", "c.bin"}
    assert "1099511627776 bytes, over the" in got.refused["out/huge.bin"]
    assert not (tmp_path / "res" / "out" / "huge.bin").exists() and not (tmp_path / "res" / "c.bin").exists()
    written = sum(p.stat().st_blocks * 512 for p in (tmp_path / "res").rglob("*") if p.is_file())
    assert written <= (1 << 20) + (1 << 18)
