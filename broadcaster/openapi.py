"""The route table's description and the OpenAPI 3.1 document generated from it.

`broadcaster/http.py` registers exactly the routes of its `ROUTES` table (rows of `Route`)
and serves `document(ROUTES)` at `/api/openapi.json`, so the document cannot drift from
what the server answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

JSON = "application/json"


@dataclass(frozen=True)
class Param:
    """A query parameter."""

    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Reply:
    """The success answer of a route."""

    status: int = 200
    description: str = "done"
    schema: str | None = "Accepted"  # a name in components.schemas, or None for no schema
    media_type: str = JSON


@dataclass(frozen=True)
class Route:
    """One HTTP route: what registers it (method, path, handler) and what documents it."""

    method: str
    path: str
    handler: str  # name of the handler method on http.py's Api
    summary: str
    description: str = ""
    auth: bool = True  # bearer token required
    tag: str = "control"
    body: str | None = None  # request body: a name in components.schemas
    body_required: bool = True
    query: tuple[Param, ...] = ()
    reply: Reply = field(default_factory=Reply)
    errors: dict[int, str] = field(default_factory=dict)  # route-specific error answers

    @property
    def operation_id(self) -> str:
        """A stable id: the method and the path's words (`post_api_veto`)."""
        words = re.findall(r"[A-Za-z0-9]+", self.path) or ["root"]
        return "_".join([self.method.lower(), *words])


_STRING = {"type": "string"}
_PROMPT_ITEM = {
    "type": "object",
    "properties": {"text": _STRING, "chosen_by": {"type": ["string", "null"]}},
    "required": ["text"],
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "description": "Every 4xx/5xx answer of the API: what is wrong, in words.",
        "properties": {"error": _STRING},
        "required": ["error"],
    },
    "Accepted": {
        "type": "object",
        "properties": {"accepted": {"type": "boolean"}, "action": _STRING},
        "required": ["accepted"],
        "additionalProperties": True,
    },
    "PromptRequest": {
        "type": "object",
        "properties": {"prompt": {"type": "string", "minLength": 1, "maxLength": 500}},
        "required": ["prompt"],
    },
    "ChatRequest": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 500}},
        "required": ["text"],
    },
    "ApproveRequest": {
        "type": "object",
        "properties": {"id": {"type": "string", "description": "a pool entry's id (GET /api/state)"}},
        "required": ["id"],
    },
    "BanRequest": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 500}},
        "required": ["text"],
    },
    "VetoRequest": {
        "type": "object",
        "properties": {"option": {"type": "integer", "minimum": 1,
                                  "description": "veto this option of the open round; "
                                                 "leave out to drop the next queued prompt"}},
    },
    "Schedule": {
        "type": "object",
        "description": "The programme now (docs/schedule.md); empty before start-up.",
        "properties": {
            "timezone": _STRING,
            "window": {"type": ["string", "null"]},
            "playlist": {"type": ["string", "null"]},
            "prompt": {"type": ["string", "null"]},
            "autopilot": {"type": "boolean"},
            "autopilot_state": {"enum": ["off", "chat", "waiting", "playing"]},
            "chat": {"type": "boolean"},
            "mode": {"type": ["string", "null"]},
            "next_boundary": {"type": ["string", "null"], "format": "date-time"},
            "seconds_to_boundary": {"type": ["number", "null"]},
        },
        "additionalProperties": True,
    },
    "ScheduleReload": {
        "type": "object",
        "properties": {"reloaded": {"type": "boolean"}, "schedule": {"$ref": "#/components/schemas/Schedule"},
                       "problems": {"type": "array", "items": _STRING}},
        "required": ["reloaded"],
    },
    "State": {
        "type": "object",
        "description": "What is on air and how chat steers it (`steering` is null before start-up).",
        "properties": {
            "channel": _STRING,
            "prompt_on_air": _STRING,
            "prompt_on_air_seq": {"type": "integer"},
            "prompt_requested": {"type": ["string", "null"]},
            "prompt_requested_seq": {"type": ["integer", "null"]},
            "last_switch_latency_s": {"type": ["number", "null"]},
            "engine": {"type": "object"},
            "steering": {"type": ["object", "null"], "properties": {
                "mode": {"enum": ["vote", "queue", "manual"]},
                "paused": {"type": "boolean"},
                "chat_enabled": {"type": "boolean",
                                 "description": "false while the programme turns chat off"},
                "now_playing": {"oneOf": [{"type": "null"}, _PROMPT_ITEM]},
                "round": {"type": ["object", "null"]},
                "queue": {"type": "array", "items": _PROMPT_ITEM},
                "pool": {"type": "array", "items": {"type": "object", "properties": {
                    "id": _STRING, "text": _STRING, "by": _STRING}}},
            }},
        },
        "additionalProperties": True,
    },
    "StateEvent": {
        "type": "object",
        "description": "The data of each `state` event on GET /events (JSON).",
        "properties": {
            "channel": _STRING,
            "mode": {"enum": ["vote", "queue", "manual", None]},
            "paused": {"type": "boolean"},
            "now_playing": {"oneOf": [{"type": "null"}, _PROMPT_ITEM]},
            "round": {"oneOf": [{"type": "null"}, {
                "type": "object",
                "properties": {
                    "id": _STRING,
                    "closed": {"type": "boolean"},
                    "closes_at": {"type": "number", "description": "unix seconds"},
                    "total_votes": {"type": "integer"},
                    "options": {"type": "array", "items": {"type": "object", "properties": {
                        "n": {"type": "integer"}, "text": _STRING, "by": _STRING,
                        "votes": {"type": "integer"}, "vetoed": {"type": "boolean"}}}},
                    "winner": {"type": ["object", "null"],
                               "description": "the winning option once the round is closed"},
                },
            }]},
            "queue": {"type": "array", "items": _PROMPT_ITEM},
            "pool_size": {"type": "integer"},
            "pool_rev": {"type": "string", "description": "changes whenever the pool does"},
            "vote_command": {"type": "string", "description": "what viewers type, e.g. !vote"},
            "server_time": {"type": "number", "description": "unix seconds when the event was sent"},
        },
    },
    "Health": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "degraded", "failing"],
                       "description": "failing (503): no frames flow; degraded (200): see `degraded`"},
            "time": {"type": "number"},
            "degraded": {"type": "array", "items": _STRING, "description": "why the channel is degraded"},
            "process": {"type": "object", "description": "open_fds, fd_limit, event_loop_lag_s, ..."},
            "chat": {"type": "object", "description": "chat sources and the store"},
            "channel": _STRING,
            "pacer": {"type": "object"},
            "engine": {"type": "object"},
            "outputs": {"type": "object", "additionalProperties": {"type": "object"}},
        },
        "required": ["status"],
        "additionalProperties": True,
    },
}

_COMMON_ERRORS = {429: "too many requests from this address; see Retry-After"}
_AUTH_ERRORS = {401: "missing or wrong bearer token",
                503: "the store is unavailable: nothing was kept; send again after Retry-After"}
_BODY_ERRORS = {400: "malformed JSON or a missing/invalid field", 413: "body or field too large"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _operation(route: Route) -> dict[str, Any]:
    reply = route.reply
    ok: dict[str, Any] = {"description": reply.description}
    if reply.media_type:
        schema = {"$ref": f"#/components/schemas/{reply.schema}"} if reply.schema else {"type": "string"}
        ok["content"] = {reply.media_type: {"schema": schema}}
    responses: dict[str, Any] = {str(reply.status): ok}
    errors = dict(_COMMON_ERRORS)
    if route.auth:
        errors.update(_AUTH_ERRORS)
    if route.body:
        errors.update(_BODY_ERRORS)
    errors.update(route.errors)
    for status in sorted(errors):
        responses[str(status)] = _error(errors[status])
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
        "security": [{"bearer": []}] if route.auth else [],
        "responses": responses,
    }
    if route.description:
        op["description"] = route.description
    if route.query:
        op["parameters"] = [{"name": p.name, "in": "query", "required": p.required,
                             "description": p.description, "schema": p.schema} for p in route.query]
    if route.body:
        op["requestBody"] = {"required": route.body_required,
                             "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{route.body}"}}}}
    return op


def _version() -> str:
    try:
        return metadata.version("promptcast")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def document(routes: tuple[Route, ...] | list[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        methods = paths.setdefault(route.path, {})
        method = route.method.lower()
        if method in methods:
            raise ValueError(f"{route.method} {route.path} is in the route table twice")
        methods[method] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "promptcast",
            "version": _version(),
            "description": (
                "Control API, event stream, overlays and health of one promptcast channel. "
                "`/api/*` (except this document) needs `Authorization: Bearer <token>` "
                "(PROMPTCAST_API_TOKEN, or the file `server.token_file`). Also served, not listed: "
                "`/static/*` (panel and overlay assets) and `/hls/*` (the HLS output)."
            ),
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "control", "description": "steer the channel (bearer token)"},
            {"name": "read-only", "description": "token-free reads: health, metrics, events, this document"},
            {"name": "pages", "description": "the control panel and the OBS overlays"},
        ],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "PROMPTCAST_API_TOKEN"}},
        },
    }
