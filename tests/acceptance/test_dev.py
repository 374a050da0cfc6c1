"""`outbox dev` with nothing configured: the tour of the README, over real HTTP."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx

from tests.acceptance.dev_process import postgres_running, running_dev


def wait_for_mail(base: str, count: int) -> list[str]:
    """The /dev/mail/N links, once at least ``count`` mails are listed."""
    deadline = time.monotonic() + 20
    while True:
        links = re.findall(r'href="(/dev/mail/\d+)"', httpx.get(f"{base}/dev/mail").text)
        if len(links) >= count or time.monotonic() > deadline:
            return links
        time.sleep(0.1)


def test_dev_serves_the_tour_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    data = tmp_path / ".outbox"
    with running_dev(tmp_path) as (base, proc):
        answer = httpx.post(
            f"{base}/users/register",
            json={"email": "tour@example.com", "password": "correct horse"},
        )
        assert answer.status_code == 202
        [link] = wait_for_mail(base, 1)
        dashboard = httpx.get(f"{base}/admin/")  # dev mounts the dashboard, no login
        assert dashboard.status_code == 200 and "oldest" in dashboard.text.lower()
        mail_page = httpx.get(f"{base}{link}").text
        assert "Congratulations, you are a member of Outbox Demo now." in mail_page
        verify = re.search(r'href="(http://[^"]+/users/verify\?token=[^"]+)"', mail_page)
        assert verify, mail_page
        link_url = verify.group(1).replace("&amp;", "&")
        assert httpx.get(link_url).status_code == 200  # the confirm page: changes nothing
        token = httpx.URL(link_url).params["token"]
        confirmed = httpx.post(f"{base}/users/verify", json={"token": token})
        assert confirmed.json() == {"status": "verified"}
        assert postgres_running(data / "pgdata")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert not postgres_running(data / "pgdata"), "Ctrl-C must leave no postgres behind"
    assert (data / "secret_key").exists()

    # The data folder is reused: the account from the first run is still there, so signing up
    # again sends the "already registered" notice, not a second verification mail.
    with running_dev(tmp_path) as (base, _):
        again = httpx.post(
            f"{base}/users/register",
            json={"email": "tour@example.com", "password": "another password"},
        )
        assert again.status_code == 202
        [link] = wait_for_mail(base, 1)
        notice = httpx.get(f"{base}{link}").text
        assert "Congratulations" not in notice
    assert not postgres_running(data / "pgdata")
