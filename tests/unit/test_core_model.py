"""The port's plain data: ownership round trips, names that cannot inject, retry policy."""

from datetime import UTC, datetime, timedelta

import pytest

from slipstream.cloud.errors import InvalidRequest, QuotaExceeded, TransientError
from slipstream.cloud.models import FloatingIP, Keypair, Ownership, ServerSpec, check_name
from slipstream.retry import RetryPolicy, retry


def test_ownership_survives_a_round_trip_through_metadata_and_tags():
    owner = Ownership.new("genomics", creator="alice@access-ci.org", lease=timedelta(hours=2))
    again = Ownership.from_metadata(owner.metadata())
    assert again == owner.__class__(owner.run_id, "genomics", "alice@access-ci.org",
                                    owner.expires_at.replace(microsecond=0))
    assert FloatingIP("f1", "127.65.0.1", tags=tuple(owner.tags())).run_id == owner.run_id
    assert all(len(t) <= 60 and "/" not in t and "," not in t for t in owner.tags())


def test_resources_without_slipstream_metadata_have_no_owner():
    assert Ownership.from_metadata({"foo": "bar"}) is None
    assert Ownership.from_metadata({"slipstream:run_id": "x"}) is None
    assert FloatingIP("f1", "127.65.0.1", tags=("slipstream-run:abc",)).run_id is None
    assert Keypair("mykey", "fp", "ssh-ed25519 AAA").run_id is None


def test_expiry_honours_the_grace_period():
    owner = Ownership("r1", "p", "me", datetime.now(UTC) - timedelta(minutes=5))
    assert owner.is_expired()
    assert not owner.is_expired(grace=timedelta(minutes=10))


@pytest.mark.parametrize("bad", ["", "UPPER", "a b", "x;rm -rf /", "$(reboot)", "-lead", "trail-", "a" * 64, "n\nl"])
def test_names_that_could_inject_shell_or_break_dns_are_refused(bad):
    with pytest.raises(InvalidRequest, match="not allowed"):
        check_name(bad)


@pytest.mark.parametrize("count", [0, -1, 1.5, "2"])
def test_a_server_count_must_be_a_positive_whole_number(count):
    with pytest.raises(InvalidRequest, match="positive whole number"):
        ServerSpec("job", "m3.tiny", "Featured-Ubuntu24", count=count)


def test_batch_servers_are_named_like_nova_multi_create():
    assert ServerSpec("w", "m3.tiny", "img", count=3).server_names() == ["w-1", "w-2", "w-3"]
    assert ServerSpec("w", "m3.tiny", "img").server_names() == ["w"]


def test_retry_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("503 from nova")
        return "ok"

    assert retry(flaky, RetryPolicy(attempts=5, base_delay=0), sleep=lambda s: None) == "ok"
    assert len(calls) == 3

    def over_quota():
        calls.append(1)
        raise QuotaExceeded("cores")

    calls.clear()
    with pytest.raises(QuotaExceeded):
        retry(over_quota, RetryPolicy(attempts=5, base_delay=0), sleep=lambda s: None)
    assert len(calls) == 1


def test_retry_gives_up_after_the_last_attempt():
    with pytest.raises(TransientError):
        retry(lambda: (_ for _ in ()).throw(TransientError("503")), RetryPolicy(attempts=3, base_delay=0),
              sleep=lambda s: None)


def test_the_core_never_imports_prefect():
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, slipstream\n"
        "for m in pkgutil.walk_packages(slipstream.__path__, 'slipstream.'):\n"
        "    if m.name != 'slipstream.cli': importlib.import_module(m.name)\n"
        "print('prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
