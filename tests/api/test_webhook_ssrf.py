"""Webhooks cannot be aimed inside the deployment: every address form of this host, the
unspecified addresses and cloud metadata are refused at creation and again at each delivery,
the connection goes to the address that was checked, and failures are recorded coarsely."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from app.domain.ids import new_id
from app.main import create_app
from app.models import Team, Webhook, WebhookDelivery
from app.services import webhooks
from app.services.egress import EgressPolicy, this_host_addresses
from app.services.webhooks import (
    CONNECTION_FAILED,
    DENIED,
    TIMED_OUT,
    create_webhook,
    deliver_due,
    sender_client,
)
from tests.api.conftest import TeamClient
from tests.api.test_webhooks import cancelled_job
from tests.conftest import create_team_key, settings_from
from tests.webhook_receiver import Receiver


def default_env(api_env: dict[str, str]) -> dict[str, str]:
    """The API's environment with LATHE_WEBHOOK_DENIED_NETWORKS at its default."""
    return {k: v for k, v in api_env.items() if k != "LATHE_WEBHOOK_DENIED_NETWORKS"}


def lan_address() -> str | None:
    """One of this host's own addresses that is not loopback (its LAN address), if any."""
    own = sorted(
        (a for a in this_host_addresses() if a.version == 4 and not a.is_loopback), key=str
    )
    return str(own[0]) if own else None


def forms_of_this_host(port: int) -> list[str]:
    """URLs that reach a receiver listening on 0.0.0.0:`port`, or cloud metadata."""
    urls = [
        f"http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped loopback
        f"http://0.0.0.0:{port}/",
        f"http://0:{port}/",
        f"http://[::]:{port}/",
        f"http://127.0.0.1:{port}/",
        f"http://localhost:{port}/",
        f"http://[::127.0.0.1]:{port}/",  # IPv4-compatible
        f"http://[2002:7f00:1::]:{port}/",  # 6to4 of 127.0.0.1
        "http://[::ffff:169.254.169.254]/latest/meta-data/",  # mapped metadata
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of 169.254.169.254
    ]
    lan = lan_address()
    if lan:
        urls.append(f"http://{lan}:{port}/")
    return urls


@pytest.fixture(autouse=True)
def no_delivery_left_due(sessions) -> Iterator[None]:
    """The sender delivers every team's due rows: what a test here left undelivered (to
    hosts that do not exist) must not reach the next test's sender."""
    yield
    with sessions() as session:
        session.execute(delete(WebhookDelivery))
        session.execute(delete(Webhook))
        session.commit()


@pytest.fixture(scope="module")
def default_api(api_env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_from(default_env(api_env)))) as client:
        yield client


def test_every_form_of_this_host_and_metadata_is_refused_at_creation(
    default_api: TestClient, api_env: dict[str, str]
) -> None:
    team = TeamClient(*create_team_key(api_env), default_api)
    for url in forms_of_this_host(8000):
        resp = team.post("/v1/webhooks", json={"url": url})
        assert resp.status_code == 400, (url, resp.text)
        error = resp.json()["error"]
        assert (error["param"], error["code"]) == ("url", "denied_url"), url
        assert "LATHE_WEBHOOK_DENIED_NETWORKS" in error["message"]
    assert team.get("/v1/webhooks").json()["data"] == []
    # A name that does not resolve now is accepted: each delivery checks it again.
    assert team.post("/v1/webhooks", json={"url": "https://hooks.invalid/x"}).status_code == 200


def test_every_form_of_this_host_is_refused_at_delivery(team, api_env, sessions) -> None:
    """Rows as an older Lathe (or a changed setting) may have left them: the sender checks
    each connection itself, and nothing reaches a receiver listening on every address."""
    defaults = settings_from(default_env(api_env))
    with Receiver(host="0.0.0.0") as receiver:
        urls = forms_of_this_host(receiver.port)
        with sessions() as session:
            team_row = session.scalar(select(Team).where(Team.id == team.id))
            session.add_all(
                Webhook(
                    id=new_id("wh"),
                    team_pk=team_row.pk,
                    url=url,
                    secret=webhooks.new_secret(),
                    event_types=["fine_tuning.job.cancelled"],
                )
                for url in urls
            )
            session.commit()
        cancelled_job(team)
        with sender_client(defaults) as client:
            assert deliver_due(sessions, client, defaults) == len(urls)
    assert receiver.received == []
    with sessions() as session:
        rows = session.execute(
            select(Webhook.url, WebhookDelivery.last_error, WebhookDelivery.last_status_code)
            .join(WebhookDelivery, WebhookDelivery.webhook_pk == Webhook.pk)
            .where(Webhook.team_pk == team_row.pk)
        ).all()
    assert sorted(rows) == sorted((url, DENIED, None) for url in urls)


def test_a_name_that_rebinds_to_this_host_after_creation_is_refused_at_delivery(
    team, api_env, sessions
) -> None:
    defaults = settings_from(default_env(api_env))
    with Receiver() as receiver, sessions() as session:
        team_row = session.scalar(select(Team).where(Team.id == team.id))
        url = f"http://rebind.test:{receiver.port}/hook"
        at_creation = EgressPolicy.from_entries(
            defaults.webhook_denied_networks, resolver=lambda host, port: ["198.51.100.7"]
        )
        hook = create_webhook(session, team_row, url, [], at_creation)

        cancelled_job(team)
        with sender_client(defaults, resolver=lambda host, port: ["127.0.0.1"]) as client:
            assert deliver_due(sessions, client, defaults) == 1
    assert receiver.received == []
    [delivery] = team.get(f"/v1/webhooks/{hook.id}/deliveries").json()["data"]
    assert (delivery["status"], delivery["last_error"]) == ("pending", DENIED)


def test_the_connection_goes_to_the_address_checked_not_a_second_lookup(
    team, api_env, sessions
) -> None:
    """The resolver's first answer is allowed, any later one is denied: delivery succeeds only
    if the name is resolved once and the socket connects to that answer. The request still
    names the host."""
    strict = settings_from({**api_env, "LATHE_WEBHOOK_DENIED_NETWORKS": '["192.0.2.0/24"]'})
    answers = iter([["127.0.0.1"]])
    asked: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers, ["192.0.2.1"])

    with Receiver() as receiver:
        team.post("/v1/webhooks", json={"url": f"http://hooks.test:{receiver.port}/h"})
        cancelled_job(team)
        with sender_client(strict, resolver=rebinding) as client:
            assert deliver_due(sessions, client, strict) == 1
        [delivery] = receiver.wait(1, timeout=5)
    assert asked == ["hooks.test"]
    assert delivery.headers["Host"] == f"hooks.test:{receiver.port}"


def tls_pair(tmp: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate for `name` only, and the CA file that signed it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lathe test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp / "leaf.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "leaf.pem", tmp / "leaf.key")
    return server, tmp / "ca.pem"


def test_https_verifies_the_certificate_for_the_name_while_connecting_to_the_address(
    team, api_env, sessions, tmp_path: Path
) -> None:
    server_tls, ca_file = tls_pair(tmp_path, "hooks.test")
    seen_sni: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    cfg = settings_from(api_env)
    to_loopback = lambda host, port: ["127.0.0.1"]  # noqa: E731

    with Receiver(tls=server_tls) as receiver:
        good = team.post("/v1/webhooks", json={"url": f"https://hooks.test:{receiver.port}/h"})
        cancelled_job(team)
        with sender_client(cfg, resolver=to_loopback, verify=str(ca_file)) as client:
            assert deliver_due(sessions, client, cfg) == 1
        receiver.wait(1, timeout=5)
        team.delete(f"/v1/webhooks/{good.json()['id']}")

        # The same server under another name: its certificate does not match, not sent.
        other = team.post("/v1/webhooks", json={"url": f"https://other.test:{receiver.port}/h"})
        cancelled_job(team)
        with sender_client(cfg, resolver=to_loopback, verify=str(ca_file)) as client:
            assert deliver_due(sessions, client, cfg) == 1
    assert seen_sni[0] == "hooks.test"
    assert len(receiver.received) == 1
    [failed] = team.get(f"/v1/webhooks/{other.json()['id']}/deliveries").json()["data"]
    assert (failed["last_error"], failed["last_status_code"]) == (CONNECTION_FAILED, None)


class SilentServer:
    """Accepts TCP connections and then says nothing (`banner` None) or a banner and hangs up:
    a service that is not a webhook receiver."""

    def __init__(self, banner: bytes | None) -> None:
        self.banner = banner
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.banner is None:
                self.held.append(conn)
            else:
                conn.sendall(self.banner)
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_delivery_failures_are_recorded_coarsely(team, api_env, sessions) -> None:
    """Whatever failed (refused, silence, another protocol, which status), the API and the
    stored row say only connection failed, timed out or the status class."""
    cfg = settings_from(
        {**api_env, "LATHE_WEBHOOK_TIMEOUT_SECONDS": "0.5", "LATHE_WEBHOOK_MAX_ATTEMPTS": "1"}
    )
    silent, ssh = SilentServer(None), SilentServer(b"SSH-2.0-OpenSSH_9.2\r\n")
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens here now: connection refused
    try:
        with Receiver(statuses=[503]) as five, Receiver(statuses=[404]) as four:
            targets = {
                f"http://127.0.0.1:{closed_port}/": (CONNECTION_FAILED, None),
                f"http://127.0.0.1:{silent.port}/": (TIMED_OUT, None),
                f"http://127.0.0.1:{ssh.port}/": (CONNECTION_FAILED, None),
                five.url: ("HTTP 5xx", 500),
                four.url: ("HTTP 4xx", 400),
            }
            hooks = {team.post("/v1/webhooks", json={"url": u}).json()["id"]: u for u in targets}
            cancelled_job(team)
            with sender_client(cfg) as client:
                assert deliver_due(sessions, client, cfg) == len(targets)
    finally:
        silent.close()
        ssh.close()
    for hook_id, url in hooks.items():
        [shown] = team.get(f"/v1/webhooks/{hook_id}/deliveries").json()["data"]
        assert (shown["last_error"], shown["last_status_code"]) == targets[url], url
        assert shown["status"] == "failed"
    with sessions() as session:
        stored = {
            url: (error, code)
            for url, error, code in session.execute(
                select(Webhook.url, WebhookDelivery.last_error, WebhookDelivery.last_status_code)
                .join(WebhookDelivery, WebhookDelivery.webhook_pk == Webhook.pk)
                .where(Webhook.id.in_(list(hooks)))
            )
        }
    assert stored == targets


def test_detailed_errors_stored_before_are_shown_coarsely(team, sessions) -> None:
    hook = team.post("/v1/webhooks", json={"url": "https://hooks.invalid/h"}).json()
    cancelled_job(team)
    with sessions() as session:
        delivery = session.scalar(
            select(WebhookDelivery)
            .join(Webhook, Webhook.pk == WebhookDelivery.webhook_pk)
            .where(Webhook.id == hook["id"])
        )
        delivery.last_error = "ConnectError: [Errno 111] Connection refused"
        delivery.last_status_code = 503
        session.commit()
    [shown] = team.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    assert (shown["last_error"], shown["last_status_code"]) == (CONNECTION_FAILED, 500)


@pytest.mark.parametrize(
    ("address", "leads_to"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "169.254.169.254"),
        ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible
        ("2002:a9fe:a9fe::1", "169.254.169.254"),  # 6to4
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64
        ("64:ff9b:1::a9fe:a9fe", "169.254.169.254"),  # NAT64, local-use prefix
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # Teredo client
    ],
)
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_lead_to(
    address: str, leads_to: str
) -> None:
    assert EgressPolicy.from_entries([f"{leads_to}/32"]).denial(address) is not None
    assert EgressPolicy.from_entries(["203.0.113.0/24"]).denial(address) is None


@pytest.mark.parametrize("address", ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0"])
def test_unspecified_addresses_are_always_denied(address: str) -> None:
    assert EgressPolicy.from_entries([]).denial(address) is not None


def test_this_host_denies_its_own_addresses_only() -> None:
    policy = EgressPolicy.from_entries(["this-host"])
    lan = lan_address() or "127.0.0.1"
    assert policy.denial(lan) == "an address of this host"
    assert policy.denial(f"::ffff:{lan}") is not None
    assert policy.denial("198.51.100.7") is None
