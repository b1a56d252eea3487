"""Who gets into HyperQuest: the admin token (header only, kept in a file), the roster, login rate limits, cookies."""
from __future__ import annotations

import stat

import pytest
from detseg.errors import ConfigError
from detseg.hyperquest import create_app
from detseg.hyperquest.app import SESSION_COOKIE, serve
from detseg.hyperquest.limits import LoginGuard, SlidingWindow

from .hyperquest_support import TestClient, make_settings


def login(client, player_id="ann", name="Ann"):
    return client.post("/api/login", json={"player_id": player_id, "name": name})


# ---- the admin token ---------------------------------------------------------------------------------------------
def test_the_admin_token_is_taken_from_the_header_and_never_from_the_url(tmp_path):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings)) as client:
        header = {"Authorization": f"Bearer {settings.admin_token}"}
        assert client.get("/admin/export", params={"table": "players"}, headers=header).status_code == 200
        refused = client.get("/admin/export", params={"token": settings.admin_token})
        assert refused.status_code == 403 and "Authorization: Bearer" in refused.json()["detail"]
        assert client.get("/admin/export", headers={"Authorization": "Bearer not-it"}).status_code == 403
    assert "token" not in {p["name"] for p in create_app(settings).openapi()["paths"]["/admin/export"]["get"]
                           .get("parameters", [])}


def test_without_a_token_one_is_kept_in_a_private_file_and_never_printed(tmp_path, monkeypatch, capsys):
    import uvicorn

    monkeypatch.delenv("DETSEG_HYPERQUEST_ADMIN_TOKEN", raising=False)
    monkeypatch.setattr(uvicorn.Server, "run", lambda *args, **kwargs: None)   # start-up output only, no server
    settings = make_settings(tmp_path, admin_token="")
    token_file = tmp_path / "admin.token"
    assert settings.admin_token_file == token_file
    assert token_file.read_text() == settings.admin_token and len(settings.admin_token) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    serve(settings, port=0)                                                  # any free port
    printed = capsys.readouterr()
    assert str(token_file) in printed.out
    assert settings.admin_token not in printed.out + printed.err
    # A restart reuses it, so scripts that read it once keep working.
    assert make_settings(tmp_path, admin_token="").admin_token == settings.admin_token


def test_a_given_token_makes_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DETSEG_HYPERQUEST_ADMIN_TOKEN", "from-the-environment")
    settings = make_settings(tmp_path, admin_token="")
    assert settings.admin_token == "from-the-environment" and settings.admin_token_file is None
    assert not (tmp_path / "admin.token").exists()


# ---- the roster --------------------------------------------------------------------------------------------------
def test_a_roster_lets_in_only_its_players(tmp_path):
    roster = tmp_path / "roster.csv"
    roster.write_text("player id,name\ns1,Sam Student\n\ns2, Ann Other \n", encoding="utf-8")
    settings = make_settings(tmp_path / "data", roster=roster)
    assert settings.roster_players == {"s1": "Sam Student", "s2": "Ann Other"}
    with TestClient(create_app(settings)) as client:
        assert login(client, "s1", "sam student").status_code == 200        # names compare without case
        assert login(client, "s2", "Ann Other").status_code == 200
        for player_id, name in (("s3", "Sam Student"), ("s1", "Ann Other")):
            refused = login(client, player_id, name)
            assert refused.status_code == 403 and "roster" in refused.json()["detail"]


@pytest.mark.parametrize("text, complaint", [
    ("s1,Sam,extra\n", "line 1: expected 2 columns"),
    ("id,name\ns1,Sam\nbad id!,Bo\n", "line 3: player id 'bad id!'"),
    ("s1,\n", "line 1: player 's1' has no name"),
    ("s1,Sam\ns1,Bo\n", "line 2: player id 's1' is listed twice"),
    ("player_id,name\n", "lists no players"),
])
def test_a_malformed_roster_is_one_clear_error(tmp_path, text, complaint):
    roster = tmp_path / "roster.csv"
    roster.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        make_settings(tmp_path / "data", roster=roster)
    assert str(error.value).startswith(f"roster {roster}") and complaint in str(error.value)


def test_a_bad_roster_stops_the_command_with_one_line(cli, tmp_path):
    result = cli("hyperquest", "--data-dir", tmp_path / "hq", "--roster", tmp_path / "missing.csv")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.csv" in lines[0] and "no such file" in lines[0], result.stderr


# ---- login rate limits -------------------------------------------------------------------------------------------
def test_the_sixth_failed_login_in_a_minute_is_told_to_wait(tmp_path):
    with TestClient(create_app(make_settings(tmp_path))) as client:
        assert login(client).status_code == 200
        for _ in range(3):                                  # successful logins do not count
            assert login(client).status_code == 200
        for _ in range(5):
            assert login(client, name="Mallory").status_code == 403
        waiting = login(client, name="Mallory")
        assert waiting.status_code == 429 and "too many failed logins" in waiting.json()["detail"]
        assert 1 <= int(waiting.headers["Retry-After"]) <= 60
        assert login(client).status_code == 429               # even the right name, until the window has passed
        assert login(client, "bob", "Bob").status_code == 200  # other players are not locked out


def test_failures_from_one_address_are_limited_across_player_ids(tmp_path):
    settings = make_settings(tmp_path, roster=_roster(tmp_path), login_failures_per_address=3)
    with TestClient(create_app(settings)) as client:
        for index in range(3):
            assert login(client, f"guess{index}", "Sam").status_code == 403
        assert login(client, "s1", "Sam").status_code == 429


def test_the_sliding_window_forgets_old_failures():
    now = [100.0]
    window = SlidingWindow(limit=2, window=60.0, clock=lambda: now[0])
    window.record("k")
    now[0] += 30
    window.record("k")
    assert window.retry_after("k") == pytest.approx(30.0)   # the first failure leaves the window at t = 160
    now[0] += 30
    assert window.retry_after("k") == 0.0
    guard = LoginGuard(per_player=1, per_address=10, clock=lambda: now[0])
    guard.failed("p", "a")
    assert guard.retry_after("p", "a") == 60 and guard.retry_after("q", "a") == 0


def _roster(tmp_path):
    path = tmp_path / "roster.csv"
    path.write_text("s1,Sam\n", encoding="utf-8")
    return path


# ---- cookies -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_session_cookie_is_secure_over_https(tmp_path, scheme):
    with TestClient(create_app(make_settings(tmp_path)), base_url=f"{scheme}://testserver") as client:
        cookie = login(client).headers["set-cookie"]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "httponly" in attributes and "samesite=lax" in attributes
    assert ("secure" in attributes) == (scheme == "https")
