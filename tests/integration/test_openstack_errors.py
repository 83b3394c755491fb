"""OpenStack adapter behaviour that needs no cloud: the error seam, the Nova/Neutron mappings,
credential checks that must fire before any request, and the Prefect block's fields.

Errors are built from real HTTP responses through openstacksdk's own ``raise_from_response``,
so the cases exercise exactly what the SDK raises for Nova, Neutron and Cinder bodies.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import requests
from keystoneauth1 import exceptions as ks_exc
from openstack import exceptions as sdk_exc

from slipstream.cloud.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    TransientError,
    WaitTimeout,
)
from slipstream.cloud.models import ServerStatus
from slipstream.cloud.openstack import (
    CredentialError,
    connect,
    convert,
    leftover_scope_variables,
    sdk_errors,
)
from slipstream.cloud.openstack.errors import translate

SECRET = "s3cr3t-never-printed"
CLOSED = "http://127.0.0.1:9/v3"  # the discard port: nothing listens, so connects are refused


def sdk_error(status: int, body: dict | None = None, headers: dict | None = None) -> Exception:
    resp = requests.Response()
    resp.status_code = status
    resp.headers.update({"content-type": "application/json", **(headers or {})})
    resp._content = json.dumps(body or {}).encode()
    resp.url = "http://127.0.0.1:8774/v2.1/servers"
    try:
        sdk_exc.raise_from_response(resp)
    except sdk_exc.HttpException as err:
        return err
    raise AssertionError("no exception raised")


CASES = [
    (
        "nova quota",
        sdk_error(
            403,
            {
                "forbidden": {
                    "code": 403,
                    "message": "Quota exceeded for cores: Requested 640, but already used 0 of 150 cores",
                }
            },
        ),
        QuotaExceeded,
        "cores",
    ),
    (
        "neutron quota",
        sdk_error(
            409,
            {
                "NeutronError": {
                    "type": "OverQuota",
                    "message": "Quota exceeded for resources: ['floatingip'].",
                    "detail": "",
                }
            },
        ),
        QuotaExceeded,
        "floatingip",
    ),
    (
        "cinder quota",
        sdk_error(
            413,
            {
                "overLimit": {
                    "code": 413,
                    "message": "VolumeSizeExceedsAvailableQuota: Requested volume or snapshot exceeds allowed gigabytes quota.",
                }
            },
        ),
        QuotaExceeded,
        "gigabytes",
    ),
    (  # Cinder's VolumeLimitExceeded as cinder-api sends it: 413 *and* Retry-After: 0
        "cinder volume count quota",
        sdk_error(
            413,
            {
                "overLimit": {
                    "code": 413,
                    "message": "VolumeLimitExceeded: Maximum number of volumes allowed (10) "
                    "exceeded for quota 'volumes'.",
                    "retryAfter": "0",
                }
            },
            {"Retry-After": "0"},
        ),
        QuotaExceeded,
        "volumes",
    ),
    (
        "rate limit",
        sdk_error(413, {"overLimit": {"message": "slow down"}}, {"Retry-After": "3"}),
        TransientError,
        "slow down",
    ),
    (
        "policy",
        sdk_error(
            403,
            {
                "forbidden": {
                    "message": "Policy doesn't allow os_compute_api:os-hypervisors to be performed."
                }
            },
        ),
        InvalidRequest,
        "Policy",
    ),
    (
        "not found",
        sdk_error(404, {"itemNotFound": {"message": "Instance abc could not be found."}}),
        NotFound,
        "could not be found",
    ),
    (
        "conflict",
        sdk_error(
            409,
            {
                "conflictingRequest": {
                    "message": "Cannot 'stop' instance abc while it is in vm_state stopped"
                }
            },
        ),
        Conflict,
        "vm_state",
    ),
    (
        "bad request",
        sdk_error(400, {"badRequest": {"message": "Invalid input for field/attribute name."}}),
        InvalidRequest,
        "Invalid input",
    ),
    (
        "busy volume",
        sdk_error(
            400,
            {
                "badRequest": {
                    "message": "Invalid volume: Volume status must be available or error, but current status is: in-use."
                }
            },
        ),
        Conflict,
        "status must be",
    ),
    (
        "unauthorized",
        sdk_error(
            401, {"error": {"message": "The request you have made requires authentication."}}
        ),
        CredentialError,
        "requires authentication",
    ),
    (
        "server error",
        sdk_error(500, {"computeFault": {"message": "Unexpected API Error."}}),
        TransientError,
        "Unexpected",
    ),
    ("unavailable", sdk_error(503, {}), TransientError, "failed"),
    ("too many", sdk_error(429, {}), TransientError, "failed"),
    (
        "connect refused",
        ks_exc.ConnectFailure("Unable to establish connection to http://127.0.0.1:8774"),
        TransientError,
        "Unable to establish",
    ),
    ("connect timeout", ks_exc.ConnectTimeout("timed out"), TransientError, "timed out"),
    (
        "no endpoint",
        ks_exc.EndpointNotFound("public endpoint for compute service in TACC region not found"),
        InvalidRequest,
        "TACC",
    ),
    (
        "sdk not found",
        sdk_exc.NotFoundException("No Server found for x"),
        NotFound,
        "No Server found",
    ),
    (
        "sdk timeout",
        sdk_exc.ResourceTimeout("Timeout waiting for the server"),
        WaitTimeout,
        "Timeout",
    ),
]


@pytest.mark.parametrize(("case", "err", "kind", "words"), CASES, ids=[c[0] for c in CASES])
def test_sdk_failures_become_slipstream_errors(case, err, kind, words):
    mapped = translate(err, "doing it", "server abc", "lab:IU")
    assert type(mapped) is kind
    text = str(mapped)
    assert words in text and "server abc" in text and "on lab:IU" in text
    assert mapped.hint, f"{case}: every error tells the user what to do next"


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"Retry-After": "7"}, 7.0),
    ({"Retry-After": "Thu, 01 Jan 2099 00:00:00 GMT"}, None),  # a date: seconds until then
    ({"Retry-After": "0"}, None),
    ({}, None),
])
def test_a_503_carries_how_long_the_cloud_asked_to_wait(headers, seconds):
    mapped = translate(sdk_error(503, {}, headers), "listing servers", None, "lab:IU")
    assert type(mapped) is TransientError
    if "GMT" in headers.get("Retry-After", ""):
        assert mapped.retry_after > 3600
    else:
        assert mapped.retry_after == seconds


@pytest.mark.parametrize("value", [
    "Thu, 01 Jan 2099 00:00:00 -0000",  # RFC 5322's "zone unknown": Python parses it without a zone
    "Thu, 01 Jan 2099 00:00:00",  # a balancer that leaves the zone out
    "-5", "nan", "inf", "  ", "soon", "Thu, 01 Jan 1970 00:00:00 GMT",
])
def test_an_odd_retry_after_is_still_a_transient_error(value):
    """Whatever a broken balancer writes in Retry-After, a 503 stays a TransientError (never a
    crash while mapping it) and the pause it asks for is a finite positive number or nothing."""
    mapped = translate(sdk_error(503, {}, {"Retry-After": value}), "listing servers", None, "lab:IU")
    assert type(mapped) is TransientError
    assert mapped.retry_after is None or 0 < mapped.retry_after < float("inf")


def test_retries_wait_as_long_as_the_cloud_asked_and_no_longer_than_the_cap():
    from slipstream.retry import MAX_RETRY_AFTER, RetryPolicy, retry

    pauses, answers = [], iter([7.0, 3600.0, None])

    def flaky():
        after = next(answers, "done")
        if after == "done":
            return "ok"
        raise TransientError("503", retry_after=after)

    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=0.2)
    assert retry(flaky, policy, sleep=pauses.append) == "ok"
    assert pauses[0] == 7.0 and pauses[1] == MAX_RETRY_AFTER and pauses[2] <= 0.2


def test_a_wait_is_not_held_past_its_deadline_by_the_retries_inside_its_poll():
    """A poll's own read retry obeys Retry-After, but never beyond the wait's deadline."""
    import time

    from slipstream.cloud.waiting import observe
    from slipstream.retry import retry

    def listing():  # what a listing does: its read retry around one request
        def request():
            raise TransientError("503", retry_after=30)
        return retry(request)

    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="kept failing"):
        observe(listing, deadline=time.monotonic() + 0.5, poll_interval=0.1, what="waiting")
    assert time.monotonic() - started < 3


def test_the_seam_keeps_the_sdk_error_as_cause_and_passes_ours_through():
    original = sdk_error(404, {"itemNotFound": {"message": "gone"}})
    with (
        pytest.raises(NotFound) as caught,
        sdk_errors("reading server", cloud="lab:IU", resource="abc"),
    ):
        raise original
    assert caught.value.__cause__ is original
    ours = Conflict("busy")
    with pytest.raises(Conflict) as again, sdk_errors("x", cloud="lab:IU"):
        raise ours
    assert again.value is ours


# credentials, before any request ---------------------------------------------------------------
def test_leftover_openrc_variables_are_named_and_the_secret_is_not(monkeypatch):
    for name in ("OS_USERNAME", "OS_PROJECT_NAME", "OS_USER_DOMAIN_NAME"):
        monkeypatch.setenv(name, "x")
    monkeypatch.delenv("OS_PASSWORD", raising=False)
    assert leftover_scope_variables() == ["OS_USERNAME", "OS_PROJECT_NAME", "OS_USER_DOMAIN_NAME"]
    with pytest.raises(CredentialError) as caught:
        connect(
            auth_url=CLOSED,
            application_credential_id="abc123",
            application_credential_secret=SECRET,
        )
    text = str(caught.value)
    assert "OS_USERNAME" in text and "OS_PROJECT_NAME" in text and "OS_USER_DOMAIN_NAME" in text
    assert "unset" in text and "cannot request a scope" in text
    assert SECRET not in text and SECRET not in repr(caught.value.__dict__)


def test_an_unreachable_keystone_is_transient(monkeypatch):
    for name in leftover_scope_variables():
        monkeypatch.delenv(name)
    with pytest.raises(TransientError) as caught:
        connect(
            auth_url=CLOSED,
            application_credential_id="abc123",
            application_credential_secret=SECRET,
        )
    assert SECRET not in str(caught.value)


def test_a_cloud_name_and_a_credential_together_are_refused():
    with pytest.raises(CredentialError, match="not both"):
        connect("lab", application_credential_id="abc", application_credential_secret=SECRET)


def test_clouds_yaml_with_a_scoped_application_credential_is_refused(tmp_path):
    path = tmp_path / "clouds.yaml"
    path.write_text(
        "clouds:\n  mine:\n    auth_type: v3applicationcredential\n    region_name: IU\n    auth:\n"
        f"      auth_url: {CLOSED}\n      application_credential_id: abc\n"
        f"      application_credential_secret: {SECRET}\n      project_name: TRA160003\n"
    )
    with pytest.raises(CredentialError) as caught:
        connect("mine", clouds_yaml_path=path)
    assert "project_name" in str(caught.value) and SECRET not in str(caught.value)


def test_missing_clouds_yaml_and_unknown_cloud_are_clear(tmp_path):
    with pytest.raises(CredentialError, match="not found"):
        connect("mine", clouds_yaml_path=tmp_path / "nope.yaml")
    path = tmp_path / "clouds.yaml"
    path.write_text("clouds:\n  other:\n    auth:\n      auth_url: http://127.0.0.1:9/v3\n")
    with pytest.raises(CredentialError, match="mine"):
        connect("mine", clouds_yaml_path=path)


# mappings --------------------------------------------------------------------------------------
def nova_server(status="ACTIVE", **extra):
    fields = {
        "id": "s1",
        "name": "w-1",
        "status": status,
        "flavor": SimpleNamespace(original_name="m3.small", name="m3.small", id=None),
        "image": SimpleNamespace(id="img1"),
        "addresses": {
            "auto_allocated_network": [
                {"addr": "fd00::5", "version": 6, "OS-EXT-IPS:type": "fixed"},
                {"addr": "10.0.0.5", "version": 4, "OS-EXT-IPS:type": "fixed"},
                {"addr": "149.165.1.2", "version": 4, "OS-EXT-IPS:type": "floating"},
            ]
        },
        "key_name": "slipstream-r1",
        "metadata": {"slipstream:run_id": "r1"},
        "tags": ["slipstream", "slipstream-run:r1"],
        "fault": {
            "message": "No valid host was found. There are not enough hosts available.",
            "code": 500,
        },
        "created_at": "2026-11-29T03:00:00Z",
    }
    fields.update(extra)
    return SimpleNamespace(**fields)


def test_a_nova_server_becomes_a_server():
    server = convert.to_server(
        nova_server(), flavor_names={}, image_names={"img1": "Featured-RockyLinux9"}
    )
    assert (server.flavor, server.image, server.ssh_user) == (
        "m3.small",
        "Featured-RockyLinux9",
        "rocky",
    )
    assert (server.address, server.floating_ip) == ("10.0.0.5", "149.165.1.2")
    assert server.fault is None  # only an ERROR server has a fault worth showing
    assert server.created_at == datetime(2026, 11, 29, 3, tzinfo=UTC)
    failed = convert.to_server(nova_server("ERROR"), flavor_names={}, image_names={})
    assert failed.status == ServerStatus.ERROR and failed.fault.startswith("No valid host")


@pytest.mark.parametrize(
    ("nova", "ours"),
    [
        ("SHELVED", "SHELVED_OFFLOADED"),
        ("SHELVED_OFFLOADED", "SHELVED_OFFLOADED"),
        ("REBOOT", "ACTIVE"),
        ("SHUTOFF", "SHUTOFF"),
        ("BUILD", "BUILD"),
        ("SOFT_DELETED", "DELETED"),
        ("PAUSED", "SUSPENDED"),
    ],
)
def test_nova_statuses(nova, ours):
    assert convert.to_server(nova_server(nova), flavor_names={}, image_names={}).status == ours


def test_a_shelved_server_still_offloading_is_not_shelved_yet():
    offloading = nova_server("SHELVED", task_state="shelving_offloading")
    assert convert.to_server(offloading, flavor_names={}, image_names={}).status == "SHUTOFF"
    settled = nova_server("SHELVED", task_state=None)
    assert convert.to_server(settled, flavor_names={}, image_names={}).status == "SHELVED_OFFLOADED"


def action(name, when, message=None):
    return SimpleNamespace(action=name, start_time=when, message=message)


def test_state_log_from_timestamps_and_actions():
    log = convert.state_log(
        created_at="2026-11-29T03:00:00Z",
        launched_at="2026-11-29T05:00:09Z",  # moved by the unshelve
        actions=[
            action("create", "2026-11-29T03:00:00Z"),
            action("stop", "2026-11-29T03:10:00Z"),
            action("start", "2026-11-29T03:20:00Z"),
            action("shelve", "2026-11-29T04:00:00Z"),
            action("reboot", "2026-11-29T04:30:00Z", message="Error"),
            action("unshelve", "2026-11-29T05:00:00Z"),
            action("delete", "2026-11-29T06:00:00Z"),
        ],
    )
    assert [s for s, _ in log] == [
        "BUILD",
        "ACTIVE",
        "SHUTOFF",
        "ACTIVE",
        "SHELVED_OFFLOADED",
        "ACTIVE",
        "DELETED",
    ]
    assert log[1][1] == datetime(2026, 11, 29, 3, tzinfo=UTC)
    assert log[-1][1] == datetime(2026, 11, 29, 6, tzinfo=UTC)


def test_actions_in_the_same_second_keep_novas_order():
    """Nova's start times have whole seconds and it lists actions newest first; a shelve and the
    unshelve right after it (seen on the lab) must not swap, or the meter stops charging."""
    log = convert.state_log(
        created_at="2026-11-29T09:59:49Z",
        launched_at="2026-11-29T09:59:52Z",
        actions=[  # as Nova lists them
            action("unshelve", "2026-11-29T09:59:51Z"),
            action("shelve", "2026-11-29T09:59:51Z"),
            action("create", "2026-11-29T09:59:49Z"),
        ],
    )
    assert [s for s, _ in log] == ["BUILD", "ACTIVE", "SHELVED_OFFLOADED", "ACTIVE"]


def test_floating_ip_ownership_survives_a_missing_tag():
    untagged = SimpleNamespace(
        id="f1",
        floating_ip_address="149.165.1.2",
        tags=[],
        description="slipstream slipstream-run:r1",
        port_details={"device_id": "s1", "device_owner": "compute:nova"},
    )
    fip = convert.to_floating_ip(untagged)
    assert fip.run_id == "r1" and fip.server_id == "s1"
    foreign = SimpleNamespace(
        id="f2", floating_ip_address="x", tags=[], description="mine", port_details=None
    )
    assert convert.to_floating_ip(foreign).run_id is None


def test_exosphere_metadata_says_setup_is_complete():
    meta = convert.exosphere_metadata("jdoe@access-ci.org", now=1_700_000_000.5)
    assert meta["exoServerVersion"] == "6" and meta["exoCreatorUsername"] == "jdoe@access-ci.org"
    assert json.loads(meta["exoSetup"]) == {"status": "complete", "epoch": 1_700_000_000_500}


# the Prefect block ---------------------------------------------------------------------------------
def test_block_needs_exactly_one_way_in_and_hides_the_secret(monkeypatch):
    from pydantic import ValidationError

    from slipstream.blocks.openstack import OpenStackCredentials

    with pytest.raises(ValidationError, match="application_credential_secret"):
        OpenStackCredentials(application_credential_id="abc")
    with pytest.raises(ValidationError, match="not both"):
        OpenStackCredentials(cloud="lab", application_credential_id="abc")
    # any region the catalogue offers (checked when signing in), not only Jetstream2's five
    assert OpenStackCredentials(cloud="lab", region="RegionOne").connect_arguments()["region"] == "RegionOne"
    with pytest.raises(ValidationError, match="api_timeout"):
        OpenStackCredentials(cloud="lab", api_timeout=0)

    block = OpenStackCredentials(
        application_credential_id="abc", application_credential_secret=SECRET, region="TACC"
    )
    assert SECRET not in repr(block) and SECRET not in block.model_dump_json()
    made = []
    monkeypatch.setattr("slipstream.blocks.openstack.connect", lambda **kw: made.append(kw) or object())
    first = block.get_cloud()
    assert block.get_cloud() is first and len(made) == 1
    assert made[0]["application_credential_secret"] == SECRET and made[0]["region"] == "TACC"
    assert made[0]["auth_url"] == "https://js2.jetstream-cloud.org:5000/v3/"


def test_block_turns_a_clouds_yaml_name_into_arguments():
    from slipstream.blocks.openstack import OpenStackCredentials

    block = OpenStackCredentials(
        cloud="lab", clouds_yaml_path="/x/clouds.yaml", exosphere_metadata=False
    )
    assert block.connect_arguments() == {
        "cloud": "lab",
        "clouds_yaml_path": "/x/clouds.yaml",
        "region": None,  # the clouds.yaml cloud's region wins unless the block sets one
        "api_timeout": None,
        "external_network": "public",
        "exosphere_metadata": False,
    }
