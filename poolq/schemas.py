"""Marshmallow schemas for a job request (docs/api.md), built once and reused.

The HTTP shim and the ``poolq.submit`` queue task validate with the same schemas,
so a job means the same thing whichever way it arrives. Bodies are parsed with
``parse_float=Decimal`` (see ``parse_json``): numbers keep their exact decimal value,
and an integer field refuses any literal with a fraction or exponent, as
openYuanrong's Go decoder does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from decimal import Decimal
from typing import Any, Callable

from marshmallow import RAISE, Schema, ValidationError, fields, pre_load, validates_schema

from poolq.model import MAX_ATTEMPTS, RETRYABLE, with_prefix

LABEL_PART = re.compile(r"^[A-Za-z0-9._/-]{1,63}$")
RESOURCE_NAME = LABEL_PART
TENANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SUBMISSION_ID = re.compile(r"^app-[a-z0-9-]{1,60}$")
PACKAGE_NAME = re.compile(r"^_ray_pkg_[A-Za-z0-9_.-]{1,128}\.zip$")  # what Ray's SDK uploads
SUBMISSION_ID_INPUT = "^(?:app-[a-z0-9-]{1,60}|(?!app-)[a-z0-9-]{1,60})$"  # as given, before app- is prefixed
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
GANG_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
RESERVED_RESOURCE_NAMES = {"cpu", "memory", "gpu"}
UNUSE_ANTI_OTHER_LABELS = "unUseAntiOtherLabels"

# The example request of the API document poolq implements (openYuanrong's submit-job
# page); it must be accepted as is. Used by the tests, the benchmark and the OpenAPI example.
SEED_EXAMPLE: dict[str, Any] = {
    "entrypoint": "python script.py",
    "metadata": {"autoscenes_ids": "auto_1-test", "task_type": "task_1", "ttl": "1250"},
    "runtime_env": {
        "working_dir": "file:///usr1/deploy/file.zip",
        "env_vars": {"SOURCE_REGION": "suzhou_std", "DEPLOY_REGION": "suzhou_std"},
        "pip": ["numpy==1.24", "scipy==1.11.0"],
    },
    "entrypoint_num_cpus": 3,
    "entrypoint_memory": 134217728,
    "entrypoint_resources": {"NPU": 0},
    "submission_id": "app-1234",
}

MAX_ENTRYPOINT_BYTES = 16 * 1024
MAX_METADATA_ENTRIES = 64
MAX_METADATA_VALUE_BYTES = 4 * 1024
MAX_ENV_VARS = 256
MAX_PIP_ENTRIES = 256
MAX_LIST_STRING = 4096  # one pip requirement or excludes pattern
MAX_RESOURCES = 64
MAX_SELECTOR = 64
MAX_SCHEDULE_TIMEOUT_MS = 604_800_000
MAX_RUNTIME_LIMIT_S = 30 * 86_400
MAX_DEPENDENCIES = 1000  # ids in one job's depends_on, afterok and afterany together
MAX_PRIORITY = 1000  # priorities are integers in [-MAX_PRIORITY, MAX_PRIORITY]
MAX_BACKOFF_S = 3600

# Ray's pip_version, e.g. "==22.0.2;python_version=='3.8.11'": before the ";", a version
# or comma-separated clauses of an operator and a version (PEP 440's characters only).
_VERSION = r"v?[0-9][0-9A-Za-z.!+*_-]*"
_CLAUSE = rf"(?:===|==|~=|!=|<=|>=|<|>)[ \t]*{_VERSION}"
PIP_VERSION = re.compile(rf"[ \t]*(?:{_VERSION}|{_CLAUSE}(?:[ \t]*,[ \t]*{_CLAUSE})*)[ \t]*(?:;[^\r\n]*)?")


def parse_json(raw: bytes) -> Any:
    """UTF-8 JSON with exact decimals and no NaN or Infinity.

    Raises UnicodeDecodeError, RecursionError (deep nesting) or ValueError.
    """
    return json.loads(raw.decode("utf-8"), parse_float=Decimal, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# -- fields ------------------------------------------------------------------


class Text(fields.Field):
    """A JSON string, optionally bounded in UTF-8 bytes and required non-blank."""

    def __init__(
        self,
        *,
        max_bytes: int | None = None,
        non_blank: bool = False,
        pattern: re.Pattern[str] | None = None,
        pattern_hint: str = "",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.max_bytes, self.non_blank = max_bytes, non_blank
        self.pattern, self.pattern_hint = pattern, pattern_hint

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return check_text(value, self.max_bytes, self.non_blank, self.pattern, self.pattern_hint)


def check_text(
    value: Any,
    max_bytes: int | None = None,
    non_blank: bool = False,
    pattern: re.Pattern[str] | None = None,
    pattern_hint: str = "",
) -> str:
    if not isinstance(value, str):
        raise ValidationError("must be a string")
    if non_blank and not value.strip():
        raise ValidationError("must not be empty")
    if "\x00" in value:
        raise ValidationError("must not contain NUL")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("must be valid Unicode (no lone surrogate escapes)") from None
    if max_bytes is not None and len(encoded) > max_bytes:
        raise ValidationError(f"must be at most {max_bytes} bytes of UTF-8")
    if pattern is not None and not pattern.fullmatch(value):
        raise ValidationError(f"must match {pattern_hint or pattern.pattern}")
    return value


class Amount(fields.Field):
    """A JSON number (not bool, not string) within [low, high]; kept as an exact Decimal."""

    def __init__(self, low: Decimal | int, high: Decimal | int, *, integer: bool = False, **kwargs: Any):
        openapi = {"type": "integer" if integer else "number", "minimum": float(low), "maximum": float(high)}
        super().__init__(metadata={**openapi, **kwargs.pop("metadata", {})}, **kwargs)
        self.low, self.high, self.integer = Decimal(low), Decimal(high), integer

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal | int:
        return check_amount(value, self.low, self.high, self.integer)


def check_amount(value: Any, low: Decimal, high: Decimal, integer: bool = False) -> Decimal | int:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise ValidationError("must be an integer" if integer else "must be a number")
    if integer and not isinstance(value, int):
        raise ValidationError("must be an integer")
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValidationError("must be a finite number")
    if not low <= value <= high:
        raise ValidationError(f"must be between {_plain(low)} and {_plain(high)}")
    return value


class StringMap(fields.Field):
    """An object whose keys and values are strings, each checked by a callable."""

    def __init__(
        self, *, max_entries: int, check_key: Any, check_value: Any, values: dict[str, Any] | None = None, **kwargs: Any
    ):
        openapi = {"type": "object", "maxProperties": max_entries, "additionalProperties": values or {"type": "string"}}
        super().__init__(metadata={**openapi, **kwargs.pop("metadata", {})}, **kwargs)
        self.max_entries, self.check_key, self.check_value = max_entries, check_key, check_value

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValidationError("must be an object")
        if len(value) > self.max_entries:
            raise ValidationError(f"must have at most {self.max_entries} entries")
        errors: dict[str, list[str]] = {}
        result: dict[str, Any] = {}
        for key, item in value.items():
            try:
                self.check_key(key)
            except ValidationError as exc:
                errors[key] = [f"key {m}" for m in exc.messages]  # type: ignore[union-attr]
                continue
            try:
                result[key] = self.check_value(item)
            except ValidationError as exc:
                errors[key] = list(exc.messages)  # type: ignore[arg-type]
        if errors:
            raise ValidationError(errors)  # type: ignore[arg-type]
        return result


class StringList(fields.Field):
    def __init__(self, *, max_entries: int, **kwargs: Any):
        openapi = {"type": "array", "maxItems": max_entries, "items": {"type": "string"}}
        super().__init__(metadata={**openapi, **kwargs.pop("metadata", {})}, **kwargs)
        self.max_entries = max_entries

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        return check_string_list(value, self.max_entries)


def check_string_list(value: Any, max_entries: int, check_item: Callable[[str], Any] | None = None) -> list[str]:
    """A list of non-blank strings; ``check_item`` may refuse an entry further (errors keyed by index)."""
    if not isinstance(value, list):
        raise ValidationError("must be a list of strings")
    if len(value) > max_entries:
        raise ValidationError(f"must have at most {max_entries} entries")
    errors = {}
    for index, item in enumerate(value):
        try:
            check_text(item, MAX_LIST_STRING, non_blank=True)
            if check_item is not None:
                check_item(item)
        except ValidationError as exc:
            errors[str(index)] = exc.messages
    if errors:
        raise ValidationError(errors)  # type: ignore[arg-type]
    return value


def check_requirement(value: str) -> str:
    """One pip requirement: never an option such as ``-r FILE`` or ``--index-url URL``, never two lines."""
    if value.lstrip().startswith("-"):
        option = re.split(r"[\s=]", value.lstrip(), maxsplit=1)[0][:64]
        raise ValidationError(f"{option} is a pip option, not a requirement: give requirements such as numpy==1.24")
    if "\n" in value or "\r" in value:
        raise ValidationError("must be one requirement, without line breaks")
    return value


def check_pip_version(value: Any) -> str:
    """Ray's ``pip_version``: a version specifier, optionally with a marker after ``;`` (which poolq ignores)."""
    check_text(value, MAX_LIST_STRING)
    if not PIP_VERSION.fullmatch(value):
        raise ValidationError("must be a version specifier such as ==22.0.2, optionally followed by ;<marker>")
    return value


class Pip(fields.Field):
    """A list of requirement strings, or Ray's ``{"packages": [...], ...}`` object."""

    OBJECT_KEYS = {"packages", "pip_check", "pip_version"}

    def __init__(self, **kwargs: Any):
        requirements = {"type": "array", "items": {"type": "string"}, "maxItems": MAX_PIP_ENTRIES}
        openapi = {
            "oneOf": [
                requirements,
                {
                    "type": "object",
                    "properties": {
                        "packages": requirements,
                        "pip_check": {"type": "boolean"},
                        "pip_version": {"type": "string"},
                    },
                    "required": ["packages"],
                },
            ]
        }
        super().__init__(metadata=openapi, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, list):
            return check_string_list(value, MAX_PIP_ENTRIES, check_requirement)
        if not isinstance(value, dict):
            raise ValidationError("must be a list of requirement strings or an object with packages")
        errors: dict[str, Any] = {key: ["unknown field"] for key in value.keys() - self.OBJECT_KEYS}
        if "packages" not in value or value["packages"] is None:
            errors["packages"] = ["missing required field"]
        else:
            try:
                check_string_list(value["packages"], MAX_PIP_ENTRIES, check_requirement)
            except ValidationError as exc:
                errors["packages"] = exc.messages
        if value.get("pip_check") is not None and not isinstance(value["pip_check"], bool):
            errors["pip_check"] = ["must be a boolean"]
        if value.get("pip_version") is not None:
            try:
                check_pip_version(value["pip_version"])
            except ValidationError as exc:
                errors["pip_version"] = exc.messages
        if errors:
            raise ValidationError(errors)
        return {key: item for key, item in value.items() if item is not None}


def check_working_dir(value: Any) -> str:
    check_text(value, MAX_LIST_STRING, non_blank=True)
    if value.startswith("file://"):
        if not value[len("file://") :].startswith("/"):
            raise ValidationError("a file:// URI must name an absolute path (file:///dir)")
        return value
    if value.startswith("gcs://"):
        if not PACKAGE_NAME.fullmatch(value[len("gcs://") :]):
            raise ValidationError("a package URI must look like gcs://_ray_pkg_<hash>.zip")
        return value
    if "://" in value:
        raise ValidationError("must be a path on the node, a file:// URI or a gcs://_ray_pkg_<hash>.zip package")
    if not value.startswith("/"):
        raise ValidationError("a path must be absolute")
    return value


def check_resource_name(name: str) -> None:
    check_text(name, pattern=RESOURCE_NAME, pattern_hint="[A-Za-z0-9._/-]{1,63}")
    if name.lower() in RESERVED_RESOURCE_NAMES:
        raise ValidationError(
            "CPU, memory and GPU are requested with entrypoint_num_cpus, entrypoint_memory and entrypoint_num_gpus"
        )


def _check_label_part(value: Any) -> str:
    return check_text(value, pattern=LABEL_PART, pattern_hint="[A-Za-z0-9._/-]{1,63}")


# -- schemas -----------------------------------------------------------------


class _NullIsAbsent(Schema):
    class Meta:
        unknown = RAISE

    @pre_load
    def drop_nulls(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class Object(fields.Nested):
    """A nested schema whose value must be a JSON object (an error on the field itself)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, partial: Any = None, **kwargs: Any) -> Any:
        if not isinstance(value, dict):
            raise ValidationError("must be an object")
        return super()._deserialize(value, attr, data, partial, **kwargs)


class RuntimeEnvSchema(_NullIsAbsent):
    working_dir = fields.Raw(required=True, validate=check_working_dir, metadata={"type": "string", "minLength": 1})
    env_vars = StringMap(
        max_entries=MAX_ENV_VARS,
        check_key=lambda k: check_text(k, pattern=ENV_NAME, pattern_hint="[A-Za-z_][A-Za-z0-9_]*"),
        check_value=lambda v: check_text(v, MAX_LIST_STRING * 8),
    )
    pip = Pip()
    excludes = StringList(max_entries=MAX_PIP_ENTRIES)

    @pre_load
    def drop_ray_internal(self, data: Any, **kwargs: Any) -> Any:
        # Ray's SDK adds private keys such as "_ray_commit"; they mean nothing here.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("_ray"))}
        return data


class Outcomes(fields.Field):
    """A non-empty set of retryable outcomes, given as a list; kept in RETRYABLE's order,
    each once, so that two ways of writing the same set are the same request."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        allowed = [error.value for error in RETRYABLE]
        if not isinstance(value, list) or not value:
            raise ValidationError("must be a non-empty list of outcomes: " + ", ".join(allowed))
        unknown = [item for item in value if item not in allowed]
        if unknown:
            raise ValidationError(f"{unknown[0]!r} cannot be retried; give any of {', '.join(allowed)}")
        return [outcome for outcome in allowed if outcome in value]


class RetryPolicySchema(_NullIsAbsent):
    """How often to run a job again when an attempt ends in one of ``retry_on``."""

    max_attempts = Amount(1, MAX_ATTEMPTS, integer=True, required=True)
    retry_on = Outcomes(
        metadata={
            "type": "array",
            "items": {"type": "string", "enum": [e.value for e in RETRYABLE]},
            "description": "default: ENTRYPOINT_FAILED, NODE_LOST",
        },
    )
    backoff_s = Amount(0, MAX_BACKOFF_S, metadata={"description": "before the 2nd attempt, doubling after; default 1"})


class SubmissionIds(fields.Field):
    """A list of submission ids, each as ``submission_id`` takes it (``app-`` prefixed when
    missing); duplicates dropped, order kept."""

    def __init__(self, **kwargs: Any):
        openapi = {"type": "array", "items": {"type": "string", "pattern": SUBMISSION_ID_INPUT}}
        super().__init__(metadata={**openapi, **kwargs.pop("metadata", {})}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        if not isinstance(value, list):
            raise ValidationError("must be a list of submission ids")
        ids: dict[str, None] = {}
        for index, item in enumerate(value):
            if not isinstance(item, str) or len(item) > 256:
                raise ValidationError(f"item {index} must be a submission id")
            try:
                ids[normalise_submission_id(item)] = None
            except ValidationError as exc:
                raise ValidationError(f"item {index} {exc.messages[0]}") from exc
        return list(ids)


class DependsOnSchema(_NullIsAbsent):
    """Slurm's afterok and afterany: ids of jobs of the same tenant that exist already."""

    afterok = SubmissionIds(metadata={"description": "start once all of these SUCCEEDED"})
    afterany = SubmissionIds(metadata={"description": "start once all of these ended, however"})

    @validates_schema
    def _bounded(self, data: dict[str, Any], **kwargs: Any) -> None:
        ids = [*data.get("afterok", []), *data.get("afterany", [])]
        if len(ids) > MAX_DEPENDENCIES:
            raise ValidationError(f"at most {MAX_DEPENDENCIES} dependencies in all", "afterok")
        if not ids:
            raise ValidationError("name at least one job in afterok or afterany", "afterok")


MAX_ARRAY_TASKS = 100_000  # tasks in one array


class ArraySchema(_NullIsAbsent):
    """N copies of the job, tasks <submission_id>-0 … -<N-1> (docs/scheduling.md, "Arrays")."""

    count = Amount(1, MAX_ARRAY_TASKS, integer=True, required=True, metadata={"description": "how many tasks"})


class JobRequestSchema(_NullIsAbsent):
    entrypoint = Text(
        required=True, max_bytes=MAX_ENTRYPOINT_BYTES, non_blank=True, metadata={"minLength": 1, "pattern": r"\S"}
    )
    metadata = StringMap(
        max_entries=MAX_METADATA_ENTRIES,
        check_key=lambda k: _check_metadata_key(k),
        check_value=lambda v: check_text(v, MAX_METADATA_VALUE_BYTES),
    )
    runtime_env = Object(RuntimeEnvSchema, required=True)
    entrypoint_num_cpus = Amount(Decimal("0.3"), 16)
    entrypoint_memory = Amount(134_217_728, 1_125_899_906_842_624, integer=True)
    entrypoint_num_gpus = Amount(0, 1024)
    entrypoint_resources = StringMap(
        max_entries=MAX_RESOURCES,
        check_key=check_resource_name,
        check_value=lambda v: check_amount(v, Decimal(0), Decimal("1e9")),
        values={"type": "number", "minimum": 0, "maximum": 1e9},
    )
    entrypoint_label_selector = StringMap(
        max_entries=MAX_SELECTOR, check_key=_check_label_part, check_value=_check_label_part
    )
    submission_id = Text(max_bytes=256, metadata={"pattern": SUBMISSION_ID_INPUT})
    job_id = Text(max_bytes=256, metadata={"pattern": SUBMISSION_ID_INPUT, "deprecated": True})
    # poolq's own fields (neither openYuanrong nor Ray has them; docs/running.md).
    runtime_limit_s = Amount(
        Decimal("0.1"),
        MAX_RUNTIME_LIMIT_S,
        metadata={"description": "stop the job (RUNTIME_LIMIT) once it has run this long, in seconds"},
    )
    retry_policy = Object(RetryPolicySchema)
    depends_on = Object(DependsOnSchema)
    priority = Amount(
        -MAX_PRIORITY,
        MAX_PRIORITY,
        integer=True,
        metadata={"description": "higher places first within the tenant; default: the tenant's, else 0"},
    )
    gang_id = Text(
        pattern=GANG_ID,
        pattern_hint="[A-Za-z0-9._-]{1,64}",
        metadata={
            "pattern": GANG_ID.pattern,
            "description": "the items of one batch with this id are placed all or none (docs/scheduling.md)",
        },
    )

    @validates_schema
    def _gang_alone(self, data: dict[str, Any], **kwargs: Any) -> None:
        # A member that waited for other jobs, or ran again alone after failing, would
        # be placed without its gang: the gang's all-or-nothing would not hold.
        if "gang_id" in data:
            if "depends_on" in data:
                raise ValidationError(
                    "a gang member cannot wait for other jobs: the gang is placed at once", "depends_on"
                )
            if "retry_policy" in data:
                raise ValidationError(
                    "a gang member cannot be retried alone: its gang is placed all or none", "retry_policy"
                )

    array = Object(ArraySchema)

    @validates_schema
    def _array_alone(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "array" in data and "depends_on" in data:
            raise ValidationError("an array cannot depend on other jobs (depends_on): not supported", "array")
        if "array" in data and "gang_id" in data:
            raise ValidationError("an array cannot be a gang member (gang_id): not supported", "array")


def _check_metadata_key(key: str) -> str:
    check_text(key)
    if not 1 <= len(key) <= 256:
        raise ValidationError("must be 1 to 256 characters")
    return key


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)


def flatten_errors(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested error dict as ``{"dotted.path": [messages]}``."""
    flat: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            for sub_path, sub in flatten_errors(value, path).items():
                flat.setdefault(sub_path, []).extend(sub)
    elif isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        flat[prefix or "body"] = [_lower(m) for m in messages]
    elif isinstance(messages, list):
        for index, value in enumerate(messages):
            flat.update(flatten_errors(value, f"{prefix}.{index}"))
    else:
        flat[prefix or "body"] = [_lower(str(messages))]
    return flat


_MARSHMALLOW_WORDS = {
    "Unknown field.": "unknown field",
    "Missing data for required field.": "missing required field",
}


def _lower(message: str) -> str:
    return _MARSHMALLOW_WORDS.get(message, message)


JOB_REQUEST = JobRequestSchema()


def load_job_request(body: Any) -> dict[str, Any]:
    """Validate a decoded body; raise ValidationError with flat dotted field paths."""
    if not isinstance(body, dict):
        raise ValidationError({"body": ["must be a JSON object"]})
    try:
        return JOB_REQUEST.load(body)
    except ValidationError as exc:
        raise ValidationError(flatten_errors(exc.messages)) from None


@dataclasses.dataclass(frozen=True)
class JobHeaders:
    """What a submission's headers say, validated."""

    tenant: str
    label: str | None  # X-Pool-Label with each term trimmed, as the record shows it
    terms: list[tuple[str, str | None]]  # its affinity terms, in order
    anti: bool  # unUseAntiOtherLabels: nodes matching no term are the last resort
    timeout_ms: int | None  # X-Schedule-Timeout-Ms, None when absent


def check_headers(
    tenant: str | None, pool_label: str | None, timeout: str | None
) -> tuple[dict[str, list[str]], JobHeaders]:
    """Validate X-Tenant-Id, X-Pool-Label and X-Schedule-Timeout-Ms: (field errors, headers)."""
    errors: dict[str, list[str]] = {}
    try:
        tenant = parse_tenant(tenant)
    except ValidationError as exc:
        errors["X-Tenant-Id"] = list(exc.messages)  # type: ignore[arg-type]
        tenant = ""
    terms: list[tuple[str, str | None]] = []
    label = None
    anti = False
    # An empty X-Pool-Label or X-Schedule-Timeout-Ms is refused, not taken for absent:
    # granian hands a header with non-ASCII bytes to the app as an empty value.
    if pool_label is not None and not pool_label.strip():
        errors["X-Pool-Label"] = ["must not be empty: leave the header out for no affinity"]
    if pool_label is not None and pool_label.strip():
        label = ",".join(raw.strip() for raw in pool_label.split(","))
        for raw in pool_label.split(","):
            term = raw.strip()
            if term == UNUSE_ANTI_OTHER_LABELS:
                anti = True
                continue
            key, eq, value = term.partition("=")
            if not LABEL_PART.fullmatch(key) or (eq and not LABEL_PART.fullmatch(value)):
                errors["X-Pool-Label"] = [
                    f"term {term!r} must be key or key=value with [A-Za-z0-9._/-]{{1,63}} parts, comma-separated"
                ]
                break
            terms.append((key, value if eq else None))
    schedule_timeout: int | None = None
    if timeout is not None:
        text = timeout.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > MAX_SCHEDULE_TIMEOUT_MS:
            errors["X-Schedule-Timeout-Ms"] = [f"must be an integer between 0 and {MAX_SCHEDULE_TIMEOUT_MS}"]
        else:
            schedule_timeout = int(text)
    return errors, JobHeaders(tenant, label, terms, anti, schedule_timeout)


def parse_tenant(header: str | None) -> str:
    """The tenant an X-Tenant-Id value names: absent or empty means ``default``."""
    tenant = (header or "").strip() or "default"
    if not TENANT.fullmatch(tenant):
        raise ValidationError("must match [A-Za-z0-9._-]{1,64}")
    return tenant


def normalise_submission_id(value: str) -> str:
    """Prefix ``app-`` when missing and check the form; raise ValidationError."""
    candidate = with_prefix(value)
    if not SUBMISSION_ID.fullmatch(candidate):
        raise ValidationError("must match ^app-[a-z0-9-]{1,60}$ after the app- prefix is added")
    return candidate
