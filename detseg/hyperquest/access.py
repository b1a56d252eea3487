"""Who may use a HyperQuest server: the optional roster of players, and the Secure flag on cookies over https.

No web framework is imported here: the roster is read while the settings are made, before FastAPI is needed, so that
a malformed roster file is one clear error at start and not a failure on the first login.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from ..errors import ConfigError

# The same pattern as schemas.Login.player_id: an ID the login form cannot send would be a roster entry nobody uses.
PLAYER_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
HEADER_IDS = {"id", "player", "player_id", "playerid", "player id", "player-id"}


def read_roster(path: Path | str) -> dict[str, str]:
    """The players a roster CSV file lists, player ID -> name.

    Two columns: player ID, name. A first row whose cells read like "player id", "name" is a header; blank lines
    are skipped. Anything else that is not a usable entry is a :class:`ConfigError` naming the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")      # -sig: spreadsheets often save a byte-order mark
    except FileNotFoundError:
        raise ConfigError(f"roster {path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"roster {path}: not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"roster {path}: cannot read it ({error.strerror or error})") from None
    players: dict[str, str] = {}
    for line, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if line == 1 and len(cells) == 2 and cells[0].casefold() in HEADER_IDS and cells[1].casefold() == "name":
            continue

        def bad(why: str) -> ConfigError:
            return ConfigError(f"roster {path}, line {line}: {why}")

        if len(cells) != 2:
            raise bad(f"expected 2 columns (player id, name), found {len(cells)}")
        player_id, name = cells
        if not PLAYER_ID.match(player_id):
            raise bad(f"player id {player_id!r} is not 1-64 letters, digits or _ . @ -")
        if not name:
            raise bad(f"player {player_id!r} has no name")
        if player_id in players and players[player_id].casefold() != name.casefold():
            raise bad(f"player id {player_id!r} is listed twice, with two names")
        players[player_id] = name
    if not players:
        raise ConfigError(f"roster {path}: lists no players")
    return players


def on_roster(roster: dict[str, str] | None, player_id: str, name: str) -> bool:
    """Whether this pair may log in; without a roster everyone may. Names compare as the game compares them."""
    if roster is None:
        return True
    listed = roster.get(player_id)
    return listed is not None and listed.casefold() == name.casefold()


class SecureCookiesOverHttps:
    """ASGI middleware: marks every cookie set in an answer to an https request ``Secure``.

    Starlette's session middleware takes ``https_only`` once, at start, but one server may be reached both ways
    (plain http on localhost, https through a proxy), so the flag is decided per request. The scheme is what the
    server saw; uvicorn already turns ``X-Forwarded-Proto`` from a trusted proxy (``--forwarded-allow-ips``,
    127.0.0.1 by default) into that scheme, so an https proxy in front counts as https.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def send_secure(message):
            if message["type"] == "http.response.start":
                message["headers"] = [(key, _secure(value) if key.lower() == b"set-cookie" else value)
                                      for key, value in message.get("headers", [])]
            await send(message)

        await self.app(scope, receive, send_secure)


def _secure(cookie: bytes) -> bytes:
    attributes = [part.strip().lower() for part in cookie.split(b";")[1:]]
    return cookie if b"secure" in attributes else cookie + b"; Secure"
