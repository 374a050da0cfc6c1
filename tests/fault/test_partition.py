"""A relay cut off by a real network partition mid-batch: packets dropped, not refused.

The relay runs in a network namespace (``tests.fault.partition``) and reaches PostgreSQL and the
SMTP server through a veth pair. With its handlers running, the link is cut: its messages are
taken over by a relay outside when their lease runs out; when the link comes back, its late
outcomes are refused (fencing), no row is settled twice, and it carries on as a healthy relay
(reconnected: it delivers new messages, mail included). The frozen-process twin is
test_vanished_relay.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.fault.helpers import (
    RelayFactory,
    RelayProcess,
    env_int,
    insert_emails,
    insert_rows,
    read_ledger,
    scalar,
    sql,
    wait_until,
)
from tests.fault.partition import Namespace, TcpForwarder, unusable_reason
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

LEASE = 6.0
JOBS = 8
JOB_SECONDS = 3.0  # the handlers finish, and try to settle, while the link is cut
# The link stays cut this long: past the lease (the takeover), and past the 25 s after which the
# relay gives up on a connection with a request in flight (outbox.db.CONNECTION_DEFAULTS).
CUT_SECONDS = env_int("OUTBOX_FAULT_PARTITION_SECONDS", 30)
# Back within this long of the heal (measured: about 1 s; a connection attempt in flight when
# the network comes back may take a few seconds more). Without tcp_user_timeout: 8.6-24 s.
BACK_WITHIN = 8.0
_REFUSED = re.compile(r"outcome of id=(\d+) attempt \d+ refused")


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    reason = unusable_reason()
    if reason is not None:
        pytest.skip(f"cannot run a relay in a network namespace here: {reason}")
    ns = Namespace()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def pg_forwarder(namespace: Namespace, db_url: str) -> Iterator[TcpForwarder]:
    """PostgreSQL, reachable from inside the namespace at the host end of the veth pair."""
    url = make_url(db_url)
    socket_dir = url.query.get("host")  # the embedded server: a Unix socket in its data folder
    target: tuple[str, int] | str = (
        f"{socket_dir}/.s.PGSQL.{url.port or 5432}"
        if isinstance(socket_dir, str) and socket_dir.startswith("/")
        else (url.host or "127.0.0.1", url.port or 5432)
    )
    forwarder = TcpForwarder(namespace.host_ip, target)
    try:
        yield forwarder
    finally:
        forwarder.close()


@pytest.fixture
def veth_smtp(namespace: Namespace) -> Iterator[CaptureServer]:
    """A capture SMTP server on the host end of the veth pair: reachable from both sides."""
    with CaptureServer(namespace.host_ip, limit=0) as server:
        yield server


def _refused_ids(relay: RelayProcess) -> list[int]:
    return sorted(int(i) for i in _REFUSED.findall(relay.log()))


def test_a_partitioned_relays_messages_are_taken_over_and_it_carries_on_after_the_heal(
    db_url: str,
    namespace: Namespace,
    pg_forwarder: TcpForwarder,
    veth_smtp: CaptureServer,
    relays: RelayFactory,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger"
    args = (
        "--import", "tests.fault.relay_handlers",
        "--lease", str(LEASE),
        "--concurrency", str(JOBS),
        "--poll-interval", "0.5",
    )  # fmt: skip
    env = {"OUTBOX_TEST_LEDGER": str(ledger)}
    inside_url = (
        make_url(db_url)
        .difference_update_query(["host"])  # a socket folder would win over the forwarder
        .set(host=pg_forwarder.host, port=pg_forwarder.port)
        .render_as_string(hide_password=False)
    )
    cut = relays.start(inside_url, veth_smtp.url, *args, prefix=namespace.command([]), **env)
    cut.wait_started()
    ids = insert_rows(db_url, "sleep", [f'{{"seconds": {JOB_SECONDS}}}'] * JOBS)
    sql(db_url, "SELECT pg_notify('outbox', '')")
    wait_until(
        lambda: len([e for e in read_ledger(ledger) if e[0] == "start"]) == JOBS,
        30,
        "every job running in the relay inside the namespace",
        alive=[cut],
    )
    namespace.cut()
    cut_at = time.time()

    other = relays.start(db_url, veth_smtp.url, *args, **env)

    def by(relay: RelayProcess, event: str) -> list[tuple[str, int, int, float]]:
        return [e for e in read_ledger(ledger) if e[0] == event and e[2] == relay.pid]

    wait_until(lambda: len(by(other, "done")) == JOBS, LEASE + 30, "the takeover", alive=[other])
    wait_until(
        lambda: scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0,
        10,
        "every outcome settled",
        alive=[other],
    )
    first_takeover = min(e[3] for e in by(other, "start")) - cut_at
    # Its handlers ran to the end behind the cut; their outcomes could not be written.
    finished_while_cut = len(by(cut, "done"))
    assert cut.alive(), cut.log_tail()
    time.sleep(max(0.0, cut_at + CUT_SECONDS - time.time()))

    namespace.heal()
    healed_at = time.time()
    wait_until(
        lambda: _refused_ids(cut) == sorted(ids),
        60,
        "the reconnected relay's outcomes refused",
        alive=[cut],
    )
    refused_after = time.time() - healed_at
    rows = sql(
        db_url, "SELECT attempts, claimed_by FROM outbox WHERE id = ANY(%s) ORDER BY id", (ids,)
    )

    # It carries on: with the other relay gone, it runs a new job and sends a mail over SMTP.
    code, _ = other.terminate_and_wait(30)
    (fresh,) = insert_rows(db_url, "sleep", ['{"seconds": 0.1}'])
    (mail,) = insert_emails(db_url, 1, notify=True)
    inserted_at = time.time()
    wait_until(
        lambda: [e for e in by(cut, "done") if e[1] == fresh] and veth_smtp.mails,
        60,
        "the reconnected relay to deliver new messages",
        alive=[cut],
    )
    carried_on_after = time.time() - healed_at
    delivered_in = time.time() - inserted_at
    wait_until(
        lambda: scalar(db_url, "SELECT sent_at IS NOT NULL FROM outbox WHERE id = %s", (mail,)),
        10,
        "the mail settled as sent",
        alive=[cut],
    )
    sent_lines = re.findall(r"sent id=(\d+)", cut.log() + other.log())
    print(
        f"\n[partition] jobs={JOBS} lease={LEASE:.0f}s first taken over after "
        f"{first_takeover:.1f}s; cut for {healed_at - cut_at:.1f}s; after the heal: outcomes "
        f"refused within {refused_after:.1f}s, new messages delivered within "
        f"{carried_on_after:.1f}s ({delivered_in:.1f}s after they were enqueued); "
        f"attempts={sorted({r[0] for r in rows})}"
    )
    for at, peer, how in pg_forwarder.events:
        print(f"  forwarder: {at - cut_at:+.1f}s {peer} {how}")
    assert code == 0
    assert refused_after <= BACK_WITHIN, "its outcomes written (refused) soon after the heal"
    assert delivered_in <= BACK_WITHIN, "claiming again soon after the heal"
    assert finished_while_cut == JOBS, "the cut relay's handlers ran on behind the cut"
    assert LEASE - 3 <= first_takeover <= LEASE + 2.5, "taken over when the lease ran out"
    assert [r[0] for r in rows] == [2] * JOBS, "one attempt per claim, no more"
    assert all(r[1] is None for r in rows)
    assert sorted(int(i) for i in sent_lines) == sorted(ids + [fresh, mail]), (
        "each row settled exactly once"
    )
    assert len(veth_smtp.mails) == 1
    assert "Traceback" not in cut.log()
