"""HyperQuest against its own OpenAPI schema: schemathesis sends generated requests to every operation.

Every operation gets schema-valid and schema-violating requests (schemathesis' positive and negative modes), from a
stranger (no session cookie, or a random one) and from a logged-in player; the admin export also gets them with the
admin token in its header (and the token in a query string, the way it is no longer accepted, must be refused).
No answer may be a server error, every answer must be
one the schema declares (status code, content type, headers, body), and invalid data must be refused with a 4xx.

The requests go in-process to the ASGI app through schemathesis' requests adapter. The game runs for the whole
module on one SQLite file, so the player's trial really trains, grows and finishes while the requests arrive.
Hypothesis is derandomized: every run generates the same requests (what the background epochs change aside).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import pytest
import schemathesis
from detseg.hyperquest.app import SESSION_COOKIE, create_app
from hypothesis import given, settings
from schemathesis import checks
from schemathesis.python.asgi import ASGIClient

from .hyperquest_support import TestClient, make_settings, wait_idle

# Requests per operation, auth state and mode (an operation without parameters has just one to send). Hypothesis
# starts at the boundaries (trial id 1 is the player's trial), so this reaches every kind of answer of these small
# operations: ~2,000 requests, ~20 s on two cores.
EXAMPLES = 50
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance]
MODES = {"positive": schemathesis.GenerationMode.POSITIVE, "negative": schemathesis.GenerationMode.NEGATIVE}
ADMIN_TOKEN_PARAMETERS = {"Authorization"}
# Who sends the requests. Only the export looks at the admin token, so the admin state sends requests to it alone.
# (A ?token= query is no longer a credential, so it has no auth state: the schema does not declare it, and
# test_the_admin_token_in_a_query_string_is_refused checks that the server refuses it.)
AUTH_STATES = ("anonymous", "player", "admin_bearer")
# Whether an action succeeds depends on the trial's state when it arrives (409 while an epoch runs, or once the
# trial is finished); every other operation a player may call must have succeeded at least once.
STATE_DEPENDENT = ("/api/trials/{trial_id}/actions",)

pytestmark = pytest.mark.filterwarnings(
    # schemathesis' strategies draw from `random` internally; derandomize=True still fixes what they generate.
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning")


@dataclass
class Server:
    schema: schemathesis.BaseSchema
    client: ASGIClient
    player_cookie: str
    admin_token: str


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # One baseline draw: the baselines train in the background while the requests run, on the same two cores.
    hyperquest = make_settings(tmp_path_factory.mktemp("hyperquest-schema"), baseline_draws=1)
    app = create_app(hyperquest)
    with TestClient(app) as setup:                   # runs the app's lifespan (database, worker) for the module
        assert setup.post("/api/login", json={"player_id": "schema", "name": "Schema"}).status_code == 200
        assert setup.post("/api/survey", json={"experience": "advanced"}).status_code == 200
        assert setup.post("/api/trials").json()["id"] == 1
        wait_idle(setup, 1)                          # the data set is generated
        assert setup.post("/api/trials/1/actions", json={"action": "train"}).status_code == 200
        wait_idle(setup, 1)                          # one epoch: growing, reverting and stopping can succeed too
        # Not entered as a context manager: that would start a second lifespan, one that outlives the module.
        client = ASGIClient(app)
        yield Server(schemathesis.openapi.from_dict(app.openapi()), client, setup.cookies[SESSION_COOKIE],
                     hyperquest.admin_token)
        client.close()


def parameter_names(operation) -> set[str]:
    return {parameter.name for parameter in operation.iter_parameters()}


def fixed_parts(server: Server, auth: str) -> dict:
    """What every request of this auth state carries; schemathesis generates the rest - a stranger's credentials
    included, which makes them a forged session cookie or a wrong admin token."""
    return {"player": {"cookies": {SESSION_COOKIE: server.player_cookie}},
            "admin_bearer": {"headers": {"Authorization": f"Bearer {server.admin_token}"}}}.get(auth, {})


def modes_for(operation, fixed: dict) -> list[str]:
    """Negative mode needs something left to make invalid once the fixed parts are set (GET /api/me has nothing)."""
    fixed_names = {name for values in fixed.values() for name in values}
    if parameter_names(operation) - fixed_names or len(operation.body) > 0:
        return list(MODES)
    return ["positive"]


def answers_of(server: Server, operation, auth: str, mode: str) -> collections.Counter:
    """Send the generated requests for one operation, checking each answer; how often each status came back."""
    to_run = CHECKS + [checks.negative_data_rejection] if mode == "negative" else CHECKS
    statuses = collections.Counter()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None)
    @given(case=operation.as_strategy(generation_mode=MODES[mode], **fixed_parts(server, auth)))
    def send_and_check(case):
        try:
            statuses[case.call_and_validate(session=server.client, checks=to_run).status_code] += 1
        finally:
            server.client.cookies.clear()            # the cookie a login or logout sets must not reach the next one

    send_and_check()
    return statuses


@pytest.mark.parametrize("auth", AUTH_STATES)
def test_every_answer_is_declared_and_no_request_is_a_server_error(server, auth):
    operations = [result.ok() for result in server.schema.get_all_operations()]
    if auth.startswith("admin_"):
        operations = [operation for operation in operations if parameter_names(operation) & ADMIN_TOKEN_PARAMETERS]
    assert operations
    for operation in operations:
        label, answered = f"{operation.method.upper()} {operation.path}", collections.Counter()
        for mode in modes_for(operation, fixed_parts(server, auth)):
            try:
                answered += answers_of(server, operation, auth, mode)
            except Exception as error:
                error.add_note(f"{label}, {auth}, {mode} data")
                raise
        # The credentials did what they should: otherwise the checks above would only have seen refusals.
        needs_player = SESSION_COOKIE in parameter_names(operation)
        needs_admin = bool(parameter_names(operation) & ADMIN_TOKEN_PARAMETERS)
        succeeded = any(200 <= status < 300 for status in answered)
        if auth == "anonymous" and (needs_player or needs_admin):
            assert not succeeded, f"{label} answered a stranger: {dict(answered)}"
        if (auth == "player" and needs_player and operation.path not in STATE_DEPENDENT) or auth.startswith("admin_"):
            assert succeeded, f"{label} refused every request of {auth}: {dict(answered)}"


def test_the_admin_token_in_a_query_string_is_refused(server):
    # Even the right token: a URL lands in access logs, so the server must not teach anyone to put it there.
    for extra in ({}, {"headers": {"Authorization": f"Bearer {server.admin_token}"}}):
        answer = server.client.get("http://testserver/admin/export", params={"token": server.admin_token}, **extra)
        assert answer.status_code == 403 and "Authorization: Bearer" in answer.json()["detail"]
