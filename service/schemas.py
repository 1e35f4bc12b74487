"""Request and response bodies of the HTTP API (DESIGN.md 4.2); the gRPC front end reuses them.

Validation is strict (JSON types must match: "10" is not a number, 10.0 is not an integer, 42 is not
a user id) so a client bug shows up as a 422 naming the field instead of a silently coerced value.
Upper limits that an operator configures (max beam width, max num_items, max history length) are
checked against the Settings by `check_limits`, with the same kind of message.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from onerec.generate import Mode
from service.errors import InvalidArgument
from service.settings import Settings

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# GET /v1/models?popular_items=N lists at most this many item ids (a load tester's catalogue sample).
MAX_POPULAR_ITEMS = 10000


class RecommendBody(BaseModel):
    """POST /v1/recommend. Only user_id is required."""

    model_config = ConfigDict(strict=True, extra="ignore")

    user_id: UserId = Field(description="the user to recommend for")
    history: list[ItemId] | None = Field(
        default=None, description="item ids, newest last; when non-empty it replaces the stored history"
    )
    num_items: int | None = Field(default=None, ge=1, description="how many items to return (default from settings)")
    mode: Mode = Field(default="session", description="session (m items per beam) or items")
    beam_width: int | None = Field(default=None, ge=1, description="beam width (default from settings)")
    exclude: list[ItemId] = Field(default_factory=list, description="item ids never to return")
    exclude_history: bool = Field(default=True, description="never return an item of the user's own history")
    timeout_ms: int | None = Field(default=None, ge=1, le=600000, description="budget of this request in ms")


class ModelRef(BaseModel):
    name: str
    version: str


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    semantic_id: list[int]


class RecommendResponse(BaseModel):
    request_id: str
    model: ModelRef
    items: list[RecommendedItem]
    degraded: bool


class EventsBody(BaseModel):
    """POST /v1/events: append items (oldest first) to the user's stored history."""

    model_config = ConfigDict(strict=True, extra="ignore")

    user_id: UserId
    items: list[ItemId] = Field(min_length=1, description="item ids, oldest first")


class EventsResponse(BaseModel):
    request_id: str
    user_id: str
    history: list[str] = Field(description="the stored history after the append, newest last")


class ReloadBody(BaseModel):
    """POST /v1/models/reload. With a version: pin (roll back or forward to) it; without: newest valid."""

    model_config = ConfigDict(strict=True, extra="ignore")

    version: int | None = Field(default=None, ge=1)


class CatalogItemsBody(BaseModel):
    """POST /v1/catalog/withdraw and /v1/catalog/restore."""

    model_config = ConfigDict(strict=True, extra="ignore")

    items: list[ItemId] = Field(min_length=1, max_length=10000, description="item ids")


class CatalogAddBody(BaseModel):
    """POST /v1/catalog/add: a new item (or a withdrawn one) under its code path."""

    model_config = ConfigDict(strict=True, extra="ignore")

    item_id: ItemId
    semantic_id: list[int] = Field(min_length=1, max_length=16, description="one code per semantic-ID level")


class CatalogEditResponse(BaseModel):
    version: str
    live_items: int
    catalog_size: int


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _at_most(field: str, value: int | None, limit: int) -> None:
    if value is not None and value > limit:
        raise InvalidArgument(f"{field}: must be <= {limit} (got {value})", field=field)


def check_limits(body: RecommendBody, settings: Settings) -> None:
    """Operator-configured upper bounds; raises InvalidArgument naming the field."""
    _at_most("num_items", body.num_items, settings.max_num_items)
    _at_most("beam_width", body.beam_width, settings.max_beam_width)
    if body.history is not None:
        _at_most("history", len(body.history), settings.max_request_history)
    _at_most("exclude", len(body.exclude), settings.max_request_history)


def check_event_limits(body: EventsBody, settings: Settings) -> None:
    _at_most("items", len(body.items), settings.max_request_history)


def format_validation_errors(errors: list[dict[str, object]]) -> tuple[str, str | None]:
    """pydantic errors -> ('field: message; ...', first field) with the body/ prefix removed."""
    parts = []
    first_field: str | None = None
    for err in errors:
        raw_loc = err.get("loc", ())
        loc = [str(p) for p in (raw_loc if isinstance(raw_loc, (tuple, list)) else ()) if p != "body"]
        field = "body" if err.get("type") == "json_invalid" else (".".join(loc) or "body")
        if first_field is None:
            first_field = field
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first_field
