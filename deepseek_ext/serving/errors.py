"""The errors a :class:`~deepseek_ext.serving.DynamicBatcher` fails requests with."""

from __future__ import annotations


class QueueFull(RuntimeError):
    """Raised by ``submit`` when the batcher's queue already holds ``max_queue`` requests (back-pressure): the
    request was not queued; retry later, shed load, or raise ``max_queue``.

    Example:
        >>> from deepseek_ext.serving import QueueFull
        >>> issubclass(QueueFull, RuntimeError)
        True
    """


class RequestTimeout(TimeoutError):
    """Set on a request's future when its deadline (``timeout_ms``) passed while it waited in the queue. The request
    was not run.

    Example:
        >>> from deepseek_ext.serving import RequestTimeout
        >>> issubclass(RequestTimeout, TimeoutError)
        True
    """


class BatcherClosed(RuntimeError):
    """Raised by ``submit`` after ``close()``, and set on the futures of requests that ``close(drain=False)`` removed
    from the queue before they ran.

    Example:
        >>> from deepseek_ext.serving import BatcherClosed
        >>> issubclass(BatcherClosed, RuntimeError)
        True
    """
