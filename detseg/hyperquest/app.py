"""The web application: FastAPI routes over :class:`~.game.Game`, a signed session cookie, the admin export.

Routes (JSON unless said otherwise)::

    GET  /                          the game (one page: static/index.html)
    POST /api/login                 {player_id, name} -> sets the session cookie (roster, rate limit: see below)
    POST /api/logout
    GET  /api/me                    the logged-in player
    POST /api/survey                deep-learning experience (once, before the first trial)
    GET  /api/limits                caps and defaults of every input
    POST /api/trials                start a trial on a random data set
    GET  /api/trials                my trials
    GET  /api/trials/{id}           one of my trials: state, data set, history, network, result
    POST /api/trials/{id}/actions   {"action": "train" | "grow" | "revert" | "stop", ...}
    GET  /api/leaderboard[?dataset_id=]
    GET  /api/status                the work queue
    GET  /admin/export?format=json|csv&table=...   (admin token: Authorization: Bearer T - never in the URL)
    GET  /vendor/plotly.min.js      plotly.js from the installed plotly package (no CDN)

Every answer is declared in the OpenAPI schema (``/openapi.json``, browsable at ``/api/docs``): the body models of
:mod:`.responses`, every refusal a route can give, and both credentials (the session cookie, the admin token), so
the schema is a contract clients and tests/test_hyperquest_schema.py can hold the server to.

The cookie only carries the player's database id, signed with the server's secret (itsdangerous, through
Starlette's session middleware), so it cannot be forged; every trial route checks that the trial is the player's.
It is ``HttpOnly; SameSite=Lax``, and ``Secure`` on answers to https requests. A login may be restricted to the
(player ID, name) pairs of a roster (:mod:`.access`), and failed logins are rate-limited per player ID and per client
address (:mod:`.limits`), answering 429 with ``Retry-After``.
Request handlers are plain functions: FastAPI runs them in its thread pool, so a slow database never blocks the
event loop, and training never happens in the server at all (see :mod:`.worker`).
"""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Path as PathParameter, Query, Request, Security
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.middleware.gzip import GZipMiddleware
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.middleware.sessions import SessionMiddleware

from . import responses, schemas
from .db import TABLES
from .access import SecureCookiesOverHttps, on_roster
from .game import Forbidden, Game, GameError
from .limits import LoginGuard
from .settings import Settings, limits
from .views import to_csv
from ..errors import ConfigError

STATIC = Path(__file__).parent / "static"
SESSION_DAYS = 14
SESSION_COOKIE = "hyperquest_session"
DATABASE_RETRY_S = 2

# The credentials, as the schema declares them. The session scheme only documents the cookie: Starlette's session
# middleware has checked its signature before a route runs. The admin token is taken from the Authorization header
# only: a query string lands in access logs, proxy logs and browser history.
SESSION_SCHEME = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, scheme_name="session",
                              description="the signed session cookie that POST /api/login sets")
ADMIN_BEARER = HTTPBearer(auto_error=False, scheme_name="admin_bearer", description="the server's admin token")

TrialId = Annotated[int, PathParameter(ge=1, le=schemas.MAX_ROW_ID)]

# What each refusal means; routes list the ones they can give, so that the schema names every answer.
REFUSALS = {
    400: "the body cannot be parsed at all (it is not UTF-8 text)",
    401: "not logged in, or the session no longer names a player: log in (again)",
    403: "this player ID belongs to someone with another name, or the pair is not on the server's roster",
    404: "no such trial of yours, or an unknown player",
    409: "not possible in the trial's current state (the reason says why)",
    415: "a POST to /api/ whose body is not JSON",
    422: "invalid input: the fields that failed validation, or why the request is impossible for this trial",
    429: "too many failed logins for this player ID or from this address: wait the Retry-After seconds",
    503: "the database cannot be reached at the moment (restarting): nothing was changed; retry after Retry-After",
}
# Headers a refusal always carries.
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "required": True,
                               "schema": {"type": "integer", "minimum": 1}}}
REFUSAL_HEADERS = {429: RETRY_AFTER, 503: RETRY_AFTER}


def refusals(*statuses: int, reasons: dict[int, str] | None = None) -> dict:
    """``responses=`` of a route: its error answers, their bodies' models, and what they mean for this route.
    Every route that reads the database may answer 503 while it is down."""
    reasons, statuses = {**REFUSALS, **(reasons or {})}, (*statuses, 503)
    answers = {status: {"model": responses.InvalidRequest if status == 422 else responses.Message,
                        "description": reasons[status]} for status in statuses}
    for status in set(statuses) & set(REFUSAL_HEADERS):
        answers[status]["headers"] = REFUSAL_HEADERS[status]
    return answers


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the ``plotly`` Python package."""
    return Path(str(files("plotly") / "package_data" / "plotly.min.js"))


class NotLoggedIn(GameError):
    status = 401


def create_app(settings: Settings, game: Game | None = None) -> FastAPI:
    """The application; the game (database, worker pool) starts and stops with it."""
    game = game or Game(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        game.start()
        yield
        game.stop()

    app = FastAPI(title="HyperQuest", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.state.game = game
    app.add_middleware(GZipMiddleware, minimum_size=2048)
    app.add_middleware(SessionMiddleware, secret_key=settings.secret_key, session_cookie=SESSION_COOKIE,
                       max_age=SESSION_DAYS * 86400, same_site="lax")
    app.add_middleware(SecureCookiesOverHttps)          # around the session middleware, so it sees its cookie
    guard = LoginGuard(settings.login_failures_per_player, settings.login_failures_per_address,
                       settings.login_window_s)

    @app.middleware("http")
    async def json_only(request: Request, call_next):
        # A cross-site form can post urlencoded or text bodies without a CORS preflight, never JSON: refusing
        # anything else on the API is what makes the cookie safe against cross-site requests.
        if request.method == "POST" and request.url.path.startswith("/api/"):
            content_type = request.headers.get("content-type")
            if content_type is not None and not content_type.startswith("application/json"):
                return JSONResponse({"detail": "send JSON (Content-Type: application/json)"}, status_code=415)
        return await call_next(request)

    @app.exception_handler(GameError)
    async def game_error(_request: Request, error: GameError):
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_down(_request: Request, _error: Exception):
        # The database is restarting or unreachable: nothing was changed (the transaction rolled back), so the
        # client may simply try again; the page does, after Retry-After seconds.
        return JSONResponse({"detail": "the database is not reachable right now; nothing was changed, try again"},
                            status_code=503, headers={"Retry-After": str(DATABASE_RETRY_S)})

    def player_id(request: Request, _cookie: str | None = Security(SESSION_SCHEME)) -> int:
        value = request.session.get("player")
        if not isinstance(value, int):
            raise NotLoggedIn("log in first")
        return value

    # ---- pages --------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly():
        return FileResponse(plotly_js(), media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=86400"})

    # ---- players ------------------------------------------------------------------------------------------------
    @app.post("/api/login", response_model=responses.PlayerView, responses=refusals(400, 403, 415, 422, 429))
    def login(request: Request, body: schemas.Login):
        address = request.client.host if request.client else "unknown"
        wait = guard.retry_after(body.player_id, address)
        if wait:
            return JSONResponse({"detail": f"too many failed logins; try again in {wait} s"}, status_code=429,
                                headers={"Retry-After": str(wait)})
        try:
            if not on_roster(settings.roster_players, body.player_id, body.name):
                raise Forbidden("this player ID and name are not on the server's roster")
            player = game.login(body.player_id, body.name)
        except Forbidden:
            guard.failed(body.player_id, address)
            raise
        request.session.clear()
        request.session["player"] = player["id"]
        return player

    @app.post("/api/logout", response_model=responses.Done, responses=refusals(415))
    def logout(request: Request):
        request.session.clear()
        return {"ok": True}

    @app.get("/api/me", response_model=responses.PlayerView, responses=refusals(401))
    def me(player: int = Depends(player_id)):
        try:
            return game.player(player)
        except GameError as error:           # a cookie of a player that no longer exists (database reset)
            raise NotLoggedIn(str(error)) from None

    @app.post("/api/survey", response_model=responses.PlayerView, responses=refusals(400, 401, 404, 415, 422))
    def survey(body: schemas.Survey, player: int = Depends(player_id)):
        return game.submit_survey(player, body.model_dump())

    @app.get("/api/limits", response_model=responses.Limits)
    def get_limits():
        return {**limits(), "epoch_limit": settings.epoch_limit, "baseline_draws": settings.baseline_draws}

    # ---- trials -------------------------------------------------------------------------------------------------
    @app.post("/api/trials", response_model=responses.TrialView, responses=refusals(401, 404, 409, 415))
    def new_trial(player: int = Depends(player_id)):
        return game.new_trial(player)

    @app.get("/api/trials", response_model=list[responses.TrialSummary], responses=refusals(401))
    def list_trials(player: int = Depends(player_id)):
        return game.trials(player)

    @app.get("/api/trials/{trial_id}", response_model=responses.TrialView, responses=refusals(401, 404, 422))
    def get_trial(trial_id: TrialId, player: int = Depends(player_id)):
        return game.view(player, trial_id)

    @app.post("/api/trials/{trial_id}/actions", response_model=responses.TrialView,
              responses=refusals(400, 401, 404, 409, 415, 422))
    def act(trial_id: TrialId, body: schemas.TrialAction, player: int = Depends(player_id)):
        return game.act(player, trial_id, body)

    @app.get("/api/leaderboard", response_model=responses.Leaderboard, responses=refusals(422))
    def get_leaderboard(dataset_id: Annotated[int | None, Query(ge=1, le=schemas.MAX_ROW_ID)] = None):
        return game.leaderboard(dataset_id)

    @app.get("/api/status", response_model=responses.QueueStats, responses=refusals())
    def status():
        return game.status()

    # ---- research export ----------------------------------------------------------------------------------------
    csv_answer = {"content": {"text/csv": {"schema": {"type": "string"}}},
                  "description": "the research record: all tables as JSON, or one table as CSV"}

    export_refusals = refusals(403, 422, reasons={403: "no admin token, a wrong one, or one in the URL",
                                                  422: "an unknown format or table, or format=csv without a table"})

    @app.get("/admin/export", response_model=responses.ExportTables, responses={200: csv_answer, **export_refusals})
    def export(request: Request, format: Literal["json", "csv"] = "json",
               table: Literal[tuple(TABLES)] | None = Query(None),
               bearer: HTTPAuthorizationCredentials | None = Security(ADMIN_BEARER)):
        if "token" in request.query_params:        # the old way: say why, so that a script's author can move it
            return JSONResponse({"detail": "send the admin token as 'Authorization: Bearer TOKEN', not in the URL"},
                                status_code=403)
        given = bearer.credentials if bearer else ""
        if not given or not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
            return JSONResponse({"detail": "admin token required (Authorization: Bearer TOKEN)"}, status_code=403)
        if format == "json":
            tables = [table] if table else list(TABLES)
            return {name: game.export(name) for name in tables}
        if table is None:
            return JSONResponse({"detail": f"format=csv needs table= one of {', '.join(TABLES)}"}, status_code=422)
        return PlainTextResponse(to_csv(game.export(table)), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="hyperquest-{table}.csv"'})

    @app.get("/healthz", include_in_schema=False)
    def health():
        return Response("ok", media_type="text/plain")

    return app


def listening_socket(host: str, port: int, shared: bool):
    """The server's socket; ``shared``: with SO_REUSEPORT, so that several web processes (``serve --db
    postgresql://... --no-local-workers`` each) listen on one address and the kernel spreads connections."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server (``detseg hyperquest serve``) until interrupted."""
    import uvicorn
    from sqlalchemy.engine import make_url

    from .db import check_connection, is_postgresql

    check_connection(settings.db_url)
    shared = is_postgresql(settings.db_url)
    try:
        sock = listening_socket(host, port, shared)
    except OSError as error:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None
    database = make_url(settings.db_url).render_as_string(hide_password=True)
    print(f"HyperQuest on http://{host}:{port}/  (database {database}, data in {settings.data_dir}, "
          f"artifacts in {settings.artifacts})", flush=True)
    if not shared:
        print(f"queue: in this server, {settings.workers} training process(es)", flush=True)
    elif settings.local_workers:
        print(f"queue: PostgreSQL (procrastinate), {settings.workers} training process(es) of this server; "
              "more with `detseg hyperquest worker`", flush=True)
    else:
        print("queue: PostgreSQL (procrastinate), no training here: run `detseg hyperquest worker --db URL`",
              flush=True)
    # Never the token itself: the console ends up in scrollback and service logs.
    where = (f"the token is in {settings.admin_token_file}" if settings.admin_token_file
             else "the token given by --admin-token / DETSEG_HYPERQUEST_ADMIN_TOKEN")
    if settings.roster_players is not None:
        print(f"only the {len(settings.roster_players)} players of {settings.roster} may log in", flush=True)
    print(f"research export: http://{host}:{port}/admin/export with 'Authorization: Bearer TOKEN' ({where})",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    server.run(sockets=[sock])
