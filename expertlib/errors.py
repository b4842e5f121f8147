"""Every error expertlib raises on purpose.

One base class, subclasses that also inherit the matching builtin, each carrying the
fields a boundary needs. The CLI (`expertlib.cli.main`) and the HTTP server
(`expertlib.server.errors`) translate them in exactly one place each.

Each message says what went wrong *and what to do about it*.
"""

from __future__ import annotations


class ExpertlibError(Exception):
    """Base class. `hint` is the 'what to do' part, shown on its own line by the CLI."""

    http_status: int = 400
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


# --- models --------------------------------------------------------------------------------------


class UnsupportedArchitectureError(ExpertlibError, ValueError):
    def __init__(self, model_type: str, supported: list[str]):
        self.model_type = model_type
        self.supported = supported
        super().__init__(
            f"model type {model_type!r} is not a supported Mixture-of-Experts architecture",
            hint="supported: " + ", ".join(sorted(supported)),
        )


class ModelLoadError(ExpertlibError, OSError):
    """A base model folder or hub id could not be loaded."""


# --- patches -------------------------------------------------------------------------------------


class PatchError(ExpertlibError, ValueError):
    """Something is wrong with an expert-set patch file. `path` names it when known."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message, hint=hint)


class PatchFormatError(PatchError):
    """Not a safetensors expert-set patch at all (pickle, zip, text, ...)."""


class PatchCorruptError(PatchError):
    """Truncated or unreadable file, or a manifest that does not parse."""


class DigestMismatchError(PatchError):
    """Bytes changed after the patch was written."""


class PatchVersionError(PatchError):
    """Manifest written by a newer expertlib."""


class PatchShapeError(PatchError):
    """Tensor shapes, dtypes, keys or ids disagree with the manifest or the model."""


class NonFiniteWeightsError(PatchError):
    """A tensor holds NaN or infinite values (it would blank every answer of a shared batch)."""


class WeightBoundError(PatchError):
    """Expert weights far outside the base experts' own range (`expertlib.bounds`): finite, but they
    would overflow to inf/NaN once a token is routed to them."""


class BaseMismatchError(PatchError):
    """The patch was made for another base model."""

    http_status = 409


# --- selection, data, training -------------------------------------------------------------------


class DataError(ExpertlibError, ValueError):
    """Malformed training or scoring data. `path` and `line` point at it."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, hint: str | None = None
    ):
        self.path = path
        self.line = line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(where + message, hint=hint)


class SelectionError(ExpertlibError, ValueError):
    """Scores or expert selections that cannot be used."""


# --- registry ------------------------------------------------------------------------------------


class RegistryError(ExpertlibError):
    """Base for registry problems."""


class InvalidNameError(RegistryError, ValueError):
    """A task name, tag or reference that may not be used (path separators, '..', ...)."""


class NotFoundError(RegistryError, KeyError):
    """Unknown expert set, version, tag or digest."""

    http_status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return ExpertlibError.__str__(self)


class AlreadyExistsError(RegistryError, FileExistsError):
    http_status = 409


class VersionLimitError(RegistryError, ValueError):
    """A name whose version numbers are used up to the highest one (`registry.names.MAX_VERSION`)."""

    http_status = 409


class RegistrySchemaError(RegistryError):
    """A registry index written by a newer expertlib (or with an unreadable schema version)."""

    http_status = 409


class IntegrityError(RegistryError):
    """A stored blob no longer matches its digest."""

    http_status = 500


class AmbiguousRefError(RegistryError, LookupError):
    """A reference matches expert sets of several base models (or several digests)."""

    http_status = 409


class RegistryBusyError(RegistryError, TimeoutError):
    """The registry index is locked by another process for longer than this caller waits."""

    http_status = 503
    retry_after: int = 2


class ReadOnlyRegistryError(RegistryError, PermissionError):
    """A write to a registry opened read-only (a mounted snapshot, a read-only folder)."""

    http_status = 403


class StorageFullError(RegistryError, OSError):
    """The disk holding the registry (or a download) is full."""

    http_status = 507


class RemoteError(RegistryError, OSError):
    """A remote registry or the Hugging Face Hub could not be reached or refused."""

    http_status = 502


class DeviceError(ExpertlibError, RuntimeError):
    """A device that is not there, or a run that does not fit its memory."""


# --- composer and serving ------------------------------------------------------------------------


class SlotError(ExpertlibError, RuntimeError):
    """An expert set cannot be placed in the slot pool."""

    http_status = 409


class SlotsBusyError(SlotError):
    """No resident set can be evicted to make room: every one is pinned or serving requests."""


class NotLoadedError(ExpertlibError, KeyError):
    """An expert set is registered but not resident."""

    http_status = 404

    def __str__(self) -> str:
        return ExpertlibError.__str__(self)


class EngineError(ExpertlibError, RuntimeError):
    """The serving engine failed or is not ready."""

    http_status = 503


class CompositionError(ExpertlibError, ValueError):
    """Expert sets that cannot be composed into one: the same set twice, other bases, or sets that
    replace the same experts (`conflicts`: [(layer, expert, [set names])])."""

    def __init__(self, message: str, *, conflicts: list | None = None, hint: str | None = None):
        self.conflicts = conflicts or []
        super().__init__(message, hint=hint)


# --- HTTP requests (the server translates these in `expertlib.server.errors`) --------------------


class InvalidRequestError(ExpertlibError, ValueError):
    """A request parameter that cannot be used. `param` names it (OpenAI's error `param`)."""

    http_status = 400
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, hint: str | None = None
    ):
        self.param = param
        if code is not None:
            self.code = code
        super().__init__(message, hint=hint)


class PromptTooLongError(InvalidRequestError):
    """Prompt plus requested completion do not fit the model's context."""

    code = "context_length_exceeded"


class RequestTooLargeError(InvalidRequestError):
    """A request body over the server's size limit (`--max-body-bytes`)."""

    http_status = 413
    code = "request_too_large"


class AuthenticationError(ExpertlibError, PermissionError):
    """No API key, or one the server does not know."""

    http_status = 401


class ForbiddenError(ExpertlibError, PermissionError):
    """A valid key that may not use this route (e.g. the API key on an admin route)."""

    http_status = 403


class QueueFullError(ExpertlibError, RuntimeError):
    """The server's bounded request queue is full; retry later."""

    http_status = 429


class NotReadyError(EngineError):
    """The server is still starting (engine or expert sets loading)."""


class ServerBusyError(EngineError):
    """A state that passes with time (an on-demand load while no slot can be freed): 503 + Retry-After."""

    retry_after: int = 1


class MemoryBudgetError(EngineError, MemoryError):
    """The engine's pieces (weights, expert slots, KV cache) do not fit the memory there is."""
