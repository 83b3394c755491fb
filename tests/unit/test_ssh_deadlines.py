"""Every SSH call returns by the time it was given: connecting, writing the job's secret file and
saying goodbye count in it, so a phase of a run cannot outlive the deadline its worst case prices.

Against the real OpenSSH server of ``test_ssh`` (its ``make_vm`` fixture); a slow or stuck peer is
a loopback relay that holds new connections before relaying, or an sshd whose SFTP subsystem
never answers. The bounds asserted are the calls' own deadlines plus :data:`LATENESS`, the event
loop's lateness under load — far below the connect time the calls used to add on top.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from slipstream import ssh
from test_ssh import _free_address, make_vm  # noqa: F401 - make_vm is a fixture

LATENESS = 3.0


class SlowHandshakeRelay:
    """Listens on its own 127.64.250.x address and relays each connection to ``upstream`` only
    after ``delay`` seconds: the server's banner (and so the handshake) arrives that late. With
    ``upload_rate`` (bytes/s) it is a slow link towards the server too."""

    def __init__(self, upstream: tuple[str, int], delay: float, upload_rate: float | None = None):
        self.upstream, self.delay, self.upload_rate = upstream, delay, upload_rate
        self.address, self.port = _free_address()
        self.listener = socket.create_server((self.address, self.port))
        self.sockets: list[socket.socket] = [self.listener]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed by stop()
            self.sockets.append(client)
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        if self.stopped.wait(self.delay):
            return
        server = socket.create_connection(self.upstream, timeout=10)
        server.settimeout(None)
        self.sockets.append(server)
        threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
        self._pump(client, server, self.upload_rate)

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float | None = None) -> None:
        try:
            while data := src.recv(4096 if rate else 65536):
                dst.sendall(data)
                if rate and self.stopped.wait(len(data) / rate):
                    return
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side went away: the test is over or the client hung up

    def stop(self) -> None:
        self.stopped.set()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.fixture
def slow_relay():
    relays: list[SlowHandshakeRelay] = []

    def make(upstream: tuple[str, int], delay: float, upload_rate: float | None = None) -> SlowHandshakeRelay:
        relays.append(SlowHandshakeRelay(upstream, delay, upload_rate))
        return relays[-1]

    yield make
    for relay in relays:
        relay.stop()


def _in_thread(call):
    """Run ``call`` in a daemon thread; return (done event, outcome dict). A call that never
    returns (the old secret write) must fail the test, not hang it."""
    done, outcome = threading.Event(), {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, outcome


def test_a_slow_handshake_counts_in_the_commands_time(make_vm, slow_relay):
    vm = make_vm()
    relay = slow_relay((vm.address, vm.port), delay=5.0)
    target = ssh.SshTarget(relay.address, relay.port, vm.target().user, vm.keypair, vm.setup.fingerprints)
    started = time.monotonic()
    with pytest.raises(ssh.SshTimeout, match="did not finish within 8 s"):
        ssh.run_command(target, "sleep 60", timeout=8)
    # Before: 5 s of handshake, then 8 more for the command.
    assert time.monotonic() - started <= 8 + LATENESS


def test_a_slow_handshake_counts_in_an_uploads_time(make_vm, slow_relay, tmp_path):
    vm = make_vm()
    relay = slow_relay((vm.address, vm.port), delay=4.0, upload_rate=200_000)
    target = ssh.SshTarget(relay.address, relay.port, vm.target().user, vm.keypair, vm.setup.fingerprints)
    (tmp_path / "input.bin").write_bytes(b"x" * 4_000_000)  # 20 s over this link
    started = time.monotonic()
    with pytest.raises(ssh.SshTimeout, match="upload to job on .* took over 8 s"):
        ssh.upload(target, [tmp_path / "input.bin"], "job", timeout=8)
    # Before: 4 s of handshake, then 8 more for the transfer.
    assert time.monotonic() - started <= 8 + LATENESS


def _sftp_never_answers(vm) -> None:
    config = vm.setup.config_path
    lines = [("Subsystem sftp /bin/sleep 600" if line.startswith("Subsystem sftp") else line)
             for line in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")


def test_a_secret_write_that_hangs_fails_by_its_own_timeout_and_starts_nothing(make_vm, monkeypatch):
    vm = make_vm(start=False)
    _sftp_never_answers(vm)
    vm.start()
    monkeypatch.setattr(ssh, "SECRET_WRITE_TIMEOUT", 2.0)
    started = time.monotonic()
    done, outcome = _in_thread(lambda: ssh.run_command(vm.target(), "touch started", timeout=3600,
                                                       secret_env={"TOKEN": "s3cret-value"}))
    assert done.wait(2 + LATENESS), "the secret write is still hanging past its timeout"
    assert time.monotonic() - started <= 2 + LATENESS
    err = outcome.get("error")
    # Not an SshTimeout: that would read as the job outliving max_hours.
    assert isinstance(err, ssh.SshError) and not isinstance(err, ssh.SshTimeout), outcome
    assert "secret environment file" in str(err) and "not started" in str(err) and vm.address in str(err)
    assert "s3cret-value" not in str(err)
    assert not (vm.home / "started").exists()


def test_a_secret_write_never_outlives_the_commands_deadline(make_vm):
    vm = make_vm(start=False)
    _sftp_never_answers(vm)
    vm.start()
    started = time.monotonic()
    done, outcome = _in_thread(lambda: ssh.run_command(vm.target(), "true", timeout=3,
                                                       secret_env={"TOKEN": "x"}))
    assert done.wait(3 + LATENESS), "the secret write is still hanging past the command's deadline"
    assert time.monotonic() - started <= 3 + LATENESS
    assert "secret environment file" in str(outcome.get("error"))


@pytest.mark.parametrize("phase", ["upload", "download"])
def test_a_transfer_that_ran_out_of_its_deadline_is_not_retried_past_it(make_vm, prefect_harness, tmp_path, phase):
    from slipstream.tasks.remote import download_outputs, upload_inputs

    vm = make_vm(start=False)
    _sftp_never_answers(vm)
    vm.start()
    (tmp_path / "input.txt").write_text("x")
    deadline = time.time() + 3
    call = {"upload": lambda: upload_inputs(vm.target(), [tmp_path / "input.txt"], "job", deadline=deadline),
            "download": lambda: download_outputs(vm.target(), ["out.txt"], "job", tmp_path / "results",
                                                 deadline=deadline)}[phase]
    with pytest.raises(ssh.SshTimeout) as err:
        call()
    # Before: Prefect retried after 3 s (twice for an upload) only to fail with "no time left",
    # which hid why, and spent those seconds of the run's schedule past the phase's deadline.
    assert re.search(r"took over [0-3] s", str(err.value)) and "no time left" not in str(err.value)
    assert time.time() <= deadline + LATENESS
