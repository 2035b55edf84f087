"""The /v1/rank contract: the request body parsed and validated, the ranking written as the response body.

Request {"user_id": str, "context": {...}, "candidates": [{"item_id": str}, ...], "recent":
[{"item_id": str, "event": "click" | "conversion", "ts": ISO 8601 with a zone offset}, ...]}
("recent", optional: the user's events since the bundle was built, put in front of the
bundled behaviour sequences, serving.histories); response {"model_version": ..., "items":
[{item_id, p_<task>..., score}, ...]} by score (the default funnel: p_click,
p_conversion). A request that breaks the contract (bad JSON, missing or mistyped fields,
context values too long or out of range, empty or too many candidates, too many recent
events) is a RequestError: the HTTP status and a message naming the problem; a recent
event's fields are checked where they are read (serving.histories.recent_events: a 400
naming the field, ``recent[2].ts``).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from json.encoder import encode_basestring_ascii

import numpy as np

from serving.histories import RECENT
from serving.scorer import ranking_order
from serving.spec import ScoringLimits

INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def parse_rank_request(body: bytes, limits: ScoringLimits) -> dict:
    """The validated rank request of ``body``; RequestError (4xx) naming the problem."""
    try:
        request = json.loads(body, parse_constant=_refuse_non_finite)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    except ValueError:  # Python refuses to convert integers this long (a CPU-time guard)
        raise RequestError(400, f"body holds an integer of more than {sys.get_int_max_str_digits()} digits") from None
    except RecursionError:
        raise RequestError(400, "body is nested too deeply") from None
    if not isinstance(request, dict):
        raise RequestError(400, "body must be a JSON object with user_id, context and candidates")
    if "user_id" not in request:
        raise RequestError(400, "missing field user_id")
    if not isinstance(request["user_id"], str) or not request["user_id"]:
        raise RequestError(400, f"user_id must be a non-empty string, got {type(request['user_id']).__name__}")
    context = request.get("context", {})
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise RequestError(400, f"context must be an object, got {type(context).__name__}")
    for name, value in context.items():
        _check_context_value(name, value, limits.max_context_value_chars)
    candidates = request.get("candidates")
    if not isinstance(candidates, list):
        raise RequestError(
            400,
            'missing field candidates (a list of {"item_id": str})'
            if candidates is None
            else f"candidates must be a list, got {type(candidates).__name__}",
        )
    if not candidates:
        raise RequestError(400, "candidates is empty")
    if len(candidates) > limits.max_candidates:
        raise RequestError(413, f"candidates has {len(candidates)} items, above the limit of {limits.max_candidates}")
    for i, c in enumerate(candidates):
        if not isinstance(c, dict) or not isinstance(c.get("item_id"), str):
            raise RequestError(400, f"candidates[{i}] must be an object with a string item_id")
    recent = request.get(RECENT)
    if recent is not None and not isinstance(recent, list):
        raise RequestError(400, f"{RECENT} must be a list of {{item_id, event, ts}}, got {type(recent).__name__}")
    if recent and len(recent) > limits.max_recent_events:
        raise RequestError(
            413,
            f"{RECENT} has {len(recent)} events, above the limit of {limits.max_recent_events} "
            "(scoring.max_recent_events)",
        )
    return {"user_id": request["user_id"], "context": context, "candidates": candidates, RECENT: recent}


def _refuse_non_finite(token: str) -> None:
    # JSON has no NaN or Infinity; Python's parser accepts them unless told otherwise
    raise RequestError(400, f"body holds {token}, which is not JSON (numbers must be finite)")


def _check_context_value(name: str, value: object, max_chars: int) -> None:
    """RequestError unless ``value`` is a context value the scorer can take: text of at most
    ``max_chars`` characters (the scorer caches what it encodes: long text would fill
    memory), an integer in int64's range, a float, a bool or null."""
    if isinstance(value, str):
        if len(value) > max_chars:
            raise RequestError(
                400,
                f"context.{name[:100]} has {len(value):,} characters, above the limit of "
                f"{max_chars} (scoring.max_context_value_chars)",
            )
    elif isinstance(value, int):
        if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            raise RequestError(400, f"context.{name[:100]} is an integer outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):  # e.g. 1e999, which JSON parsing turns into inf
            raise RequestError(400, f"context.{name[:100]} is not a finite number")
    elif value is not None:
        raise RequestError(400, f"context.{name[:100]} must be a string, number or null, got {type(value).__name__}")


@functools.lru_cache(maxsize=16)
def _item_template(names: tuple[str, ...]) -> str:
    """'{"item_id":%s,"p_click":%.9g,...}': one ranked candidate (names are identifiers)."""
    return '{"item_id":%s,' + ",".join(f'"{name}":%.9g' for name in names) + "}"


def rank_response(
    model_version: str, item_ids: list[str], names: tuple[str, ...], outputs: tuple[np.ndarray, ...]
) -> bytes:
    """The /v1/rank response body: candidates by score descending (ties keep the request's
    order), as serving.scorer.ranked, written straight to JSON text. The model's float32
    outputs are written with 9 significant digits (they read back as the same float32):
    ~3x faster than json.dumps of Python floats, whose shortest repr of a float32 widened
    to float64 takes 17 digits. A non-finite output is an error, never invalid JSON."""
    if not all(np.isfinite(o).all() for o in outputs):
        raise RequestError(500, f"model {model_version} returned non-finite scores")
    order = ranking_order(names, outputs)
    template = _item_template(names)
    ids = [encode_basestring_ascii(item_ids[k]) for k in order.tolist()]
    items = ",".join([template % row for row in zip(ids, *(o[order].tolist() for o in outputs), strict=True)])
    return b'{"model_version":%s,"items":[%s]}' % (encode_basestring_ascii(model_version).encode(), items.encode())
