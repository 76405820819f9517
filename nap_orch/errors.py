"""One error type per kind of failure a user sees; the API maps each to one HTTP status."""


class NapError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status = 500
    code = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict:
        return {"error": self.code, "message": self.message}


class BadRequest(NapError):
    status = 400
    code = "bad_request"


class Unauthorized(NapError):
    status = 401
    code = "unauthorized"


class Forbidden(NapError):
    status = 403
    code = "forbidden"


class QuotaExceeded(NapError):
    """The user's quota (instances, apps, disk, memory) would be exceeded."""

    status = 403
    code = "quota_exceeded"


class NotFound(NapError):
    status = 404
    code = "not_found"


class Conflict(NapError):
    status = 409
    code = "conflict"


class PayloadTooLarge(NapError):
    status = 413
    code = "too_large"


class RetryLater(NapError):
    """A refusal that passes: the API answers it with ``Retry-After: <retry_after>``."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class TooManyRequests(RetryLater):
    """A per-user limit (request rate, event streams)."""

    status = 429
    code = "too_many_requests"


class Busy(RetryLater):
    """The server is at a limit of its own (event streams)."""

    status = 503
    code = "unavailable"


class FetchError(NapError):
    """A deploy source could not be downloaded, or is not an app (the job fails with this message)."""

    status = 422
    code = "fetch_failed"


class AppError(NapError):
    """The app itself is wrong: no profile, no command, bad mpi.xml, compile error."""

    status = 422
    code = "bad_app"


class EngineError(NapError):
    """The engine (local agent or Slurm) refused or could not be reached."""

    status = 503
    code = "engine"


class Exhausted(NapError):
    """A finite resource ran out (ports in the range, instance slots)."""

    status = 503
    code = "exhausted"


class Superseded(Exception):  # noqa: N818 - a state, as Cancelled is
    """This attempt of a job was overtaken by a newer attempt of the same job (the reaper requeued a job
    whose worker it thought lost, while that worker was only cut off from Redis): raised at its next
    step boundary, it stops the attempt at once, undoing nothing, and leaves the job's record, state
    and everything it started to the newer attempt (which resumes them: a launch's reservations are
    keyed by its job)."""


class Cancelled(NapError):
    """The job was cancelled by its user; raised at the next step boundary."""

    status = 409
    code = "cancelled"
