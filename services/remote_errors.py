"""What a failed call to a task replica means for the caller: its cause, and whether it is a 503.

The gateway calls replicas through Ray Serve handles; an exception raised in a replica arrives wrapped
in Ray's RayTaskError, and a lost replica as an actor error. Both the study analysis and raw inference
turn them into the same answers here.
"""

from __future__ import annotations

import ray

from serving.backends import BackendUnavailable
from services.study_input import InputError
from services.task_logic import ServingError


def cause(exc: BaseException) -> BaseException:
    """The exception a replica raised, unwrapped from Ray's RayTaskError."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def infrastructure(error: BaseException) -> bool:
    """A failure of what runs the model (its backend unreachable, its replica lost), not of the version."""
    return isinstance(error, (BackendUnavailable, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def unavailable(task: str, error: BaseException) -> str | None:
    """The 503 message for a task call that failed because serving cannot answer right now, else None."""
    if isinstance(error, (BackendUnavailable, ServingError)):
        return f"{task}: {error}"
    if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return f"{task}: its replica was lost and is being replaced; retry"  # Serve starts a new one
    return None


async def call(task: str, awaitable, bad_input_is_400: bool = False):
    """Await a replica call. A replica that cannot answer is a 503 InputError; with `bad_input_is_400`
    (raw inference), a ValueError the replica raised about its inputs is a 400; anything else propagates."""
    try:
        return await awaitable
    except Exception as exc:
        error = cause(exc)
        if bad_input_is_400 and isinstance(error, ValueError):
            raise InputError(str(error), 400) from None
        message = unavailable(task, error)
        if message:
            raise InputError(message, 503) from None
        raise
