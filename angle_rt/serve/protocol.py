"""The wire formats: request bodies parsed and checked, response bodies built, errors in
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. No web framework here."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from angle_rt.quantization import check_precision

ENCODING_FORMATS = ("float", "base64")
_TYPES = {401: "invalid_request_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error"}


# TEI's error_type values (text-embeddings-inference's ErrorType)
_TEI_TYPES = {401: "Unauthorized", 429: "Overloaded", 500: "Backend", 503: "Unhealthy",
              504: "Backend"}


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape; `headers` go on the response."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self, tei: bool = False) -> bytes:
        """OpenAI's error object, or with `tei` TEI's ``{"error", "error_type"}``."""
        if tei:
            return orjson.dumps({"error": self.message,
                                 "error_type": _TEI_TYPES.get(self.status, "Validation")})
        return orjson.dumps({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}})


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """422: the body is JSON but a field is wrong."""
    return ApiError(422, message, param=param, code=code)


@dataclass
class EmbedRequest:
    """One embedding request, from either wire format: texts or token-id rows."""

    texts: list[str] | None
    ids: list[list[int]] | None
    field: str  # "input" (OpenAI) or "inputs" (TEI), for error messages
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    prompt: str | None = None
    prompt_name: str | None = None
    normalize: bool | None = None  # TEI; None: as the bundle
    truncate: bool | None = None  # TEI; None: the server's --truncate
    add_special_tokens: bool = True  # /tokenize
    output_dtype: str | None = None  # quantized vectors (angle_rt.quantization); None: server's
    truncation_direction: str = "right"  # TEI: "left" keeps a text's end

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.ids or ())


def parse_json(body: bytes) -> Any:
    """The body's JSON value; 400 for a body that is not UTF-8 JSON. Lone surrogate escapes
    (which orjson refuses) parse, so validation can name the input holding one."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:  # decoded here: json.loads(bytes) would also take UTF-16 and UTF-32
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not valid UTF-8", code="invalid_body") \
                from None
        except (ValueError, RecursionError):
            raise ApiError(400, f"the request body is not valid JSON ({exc})",
                           code="invalid_json") from None


def parse_openai(data: Any, max_inputs: int) -> EmbedRequest:
    """`POST /v1/embeddings`: input, model, encoding_format, dimensions, user; plus AnglE's
    prompt / prompt_name."""
    obj = _object(data)
    texts, ids = parse_inputs(obj.get("input"), "input", max_inputs)
    fmt = obj.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ENCODING_FORMATS:
        raise invalid(f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}, got "
                      f"{fmt!r}", "encoding_format")
    _optional(obj, "user", str)
    return EmbedRequest(texts, ids, "input", model=_optional(obj, "model", str),
                        encoding_format=fmt, dimensions=_dimensions(obj.get("dimensions")),
                        prompt=_optional(obj, "prompt", str),
                        prompt_name=_optional(obj, "prompt_name", str),
                        output_dtype=_output_dtype(obj))


def parse_tei_embed(data: Any, max_inputs: int) -> EmbedRequest:
    """TEI's `POST /embed`: inputs, normalize, truncate, prompt_name, dimensions."""
    obj = _object(data)
    texts, ids = parse_inputs(obj.get("inputs"), "inputs", max_inputs)
    direction = (_optional(obj, "truncation_direction", str) or "right").lower()
    if direction not in ("left", "right"):
        raise invalid(f"truncation_direction must be 'left' or 'right', got {direction!r}",
                      "truncation_direction")
    return EmbedRequest(texts, ids, "inputs", model=_optional(obj, "model", str),
                        truncation_direction=direction,
                        dimensions=_dimensions(obj.get("dimensions")),
                        prompt_name=_optional(obj, "prompt_name", str),
                        normalize=_optional(obj, "normalize", bool),
                        truncate=_optional(obj, "truncate", bool),
                        output_dtype=_output_dtype(obj))


def parse_tokenize(data: Any, max_inputs: int) -> EmbedRequest:
    """TEI's `POST /tokenize`: inputs (text), add_special_tokens, prompt_name."""
    obj = _object(data)
    texts, _ = parse_inputs(obj.get("inputs"), "inputs", max_inputs)
    if texts is None:
        raise invalid("inputs must be text to tokenize", "inputs")
    special = _optional(obj, "add_special_tokens", bool)
    return EmbedRequest(texts, None, "inputs", model=_optional(obj, "model", str),
                        prompt=_optional(obj, "prompt", str),
                        prompt_name=_optional(obj, "prompt_name", str),
                        truncate=_optional(obj, "truncate", bool),
                        add_special_tokens=True if special is None else special)


def parse_inputs(value: Any, name: str, max_inputs: int
                 ) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token rows) from a str, list[str], list[int] or
    list[list[int]]; 422 naming the offending item otherwise."""
    if value is None:
        raise invalid(f"{name} is required: a string, a list of strings, a token-id array "
                      "or a list of token-id arrays", name, "missing_required_parameter")
    if isinstance(value, str):
        return [_text(value, name)], None
    if not isinstance(value, list):
        raise invalid(f"{name} must be a string, a list of strings or token ids, got "
                      f"{_kind(value)}", name)
    if not value:
        raise invalid(f"{name} is an empty list; send at least one item", name)
    first = value[0]
    if _is_id(first):  # one token-id array: one input, however long
        return None, [_ids(value, name)]
    if len(value) > max_inputs:
        raise invalid(f"{name} has {len(value)} items; this server takes at most {max_inputs} "
                      "per request (--max-client-batch-size)", name, "too_many_inputs")
    if isinstance(first, str):
        return [_text(v, f"{name}[{i}]") if isinstance(v, str) else _not(v, f"{name}[{i}]",
                                                                       "a string")
                for i, v in enumerate(value)], None
    if isinstance(first, list):
        return None, [_ids(v, f"{name}[{i}]") if isinstance(v, list) else
                      _not(v, f"{name}[{i}]", "a token-id array") for i, v in enumerate(value)]
    return _not(first, f"{name}[0]", "a string, a token id or a token-id array")


def _output_dtype(obj: dict[str, Any]) -> str | None:
    value = _optional(obj, "output_dtype", str)
    try:
        return value if value is None else check_precision(value)
    except ValueError as exc:
        raise invalid(f"output_dtype: {exc}", "output_dtype") from None


def openai_body(vecs: np.ndarray, model: str, fmt: str, tokens: int) -> bytes:
    """The `/v1/embeddings` response; base64 is the vectors' little-endian bytes (float32 as
    OpenAI's; a quantized `output_dtype`'s own dtype otherwise)."""
    if fmt == "base64":
        le = vecs.astype(vecs.dtype.newbyteorder("<"), copy=False)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(le[i].tobytes()).decode("ascii")}
                for i in range(len(le))]
    else:
        data = [{"object": "embedding", "index": i, "embedding": vecs[i]}
                for i in range(len(vecs))]
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {_kind(data)}", None,
                      "invalid_body")
    return data


def _optional(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj.get(key)
    if value is not None and (not isinstance(value, kind)
                              or (kind is not bool and isinstance(value, bool))):
        raise invalid(f"{key} must be {kind.__name__} or null, got {_kind(value)}", key)
    return value


def _dimensions(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"dimensions must be a positive integer, got {value!r}", "dimensions")
    return value


def _text(value: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"{where} is not valid Unicode ({exc.reason} at character {exc.start})",
                      where.partition("[")[0]) from None
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids(row: list[Any], where: str) -> list[int]:
    if not row:
        raise invalid(f"{where} is an empty token-id array", where.partition("[")[0])
    for j, v in enumerate(row):
        if not _is_id(v) or v < 0:
            raise invalid(f"{where}[{j}] is {v!r}; token ids are non-negative integers",
                          where.partition("[")[0])
    return row


def _not(value: Any, where: str, want: str) -> Any:
    raise invalid(f"{where} is {_kind(value)}, not {want} (every item of a list must have "
                  "the same kind)", where.partition("[")[0])


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string",
                                         bool: "a boolean", int: "an integer",
                                         float: "a number"}.get(type(value),
                                                                type(value).__name__)
