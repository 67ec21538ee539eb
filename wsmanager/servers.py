"""What wsmanager knows of the servers it runs under, beyond ASGI.

Today: one log record of uvicorn's. uvicorn's default WebSocket protocol
(websockets-sansio) decodes text frames itself and, for a frame that is not
valid UTF-8, closes the connection with 1007 (RFC 6455, section 8.1) and logs
``"Invalid UTF-8 sequence received from client."`` at ERROR *with a
traceback*: any client can write tracebacks into the server's log at will,
without the application ever seeing the frame. :func:`quiet_client_faults`
turns that record into what it is, a client's fault: INFO, without the
traceback. The close code the client gets is unchanged.
"""

from __future__ import annotations

import logging

__all__ = ["CLIENT_FAULT_RECORDS", "quiet_client_faults"]

#: (logger name, message) of server log records that report a client's bad
#: input with a traceback; logged at INFO without it once
#: :func:`quiet_client_faults` ran.
CLIENT_FAULT_RECORDS: frozenset[tuple[str, str]] = frozenset(
    {("uvicorn.error", "Invalid UTF-8 sequence received from client.")}
)


class _ClientFaultFilter(logging.Filter):
    """Downgrades the records of :data:`CLIENT_FAULT_RECORDS` in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.name, record.msg) in CLIENT_FAULT_RECORDS and record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.exc_info = None
            record.exc_text = None
            # the level was checked at ERROR: check it again at INFO
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


_FILTER = _ClientFaultFilter()


def quiet_client_faults() -> None:
    """Install the filter on the loggers of :data:`CLIENT_FAULT_RECORDS`
    (idempotent; done when :mod:`wsmanager` is imported). Records are still
    logged, at INFO; only their traceback is dropped."""
    for name in {name for name, _msg in CLIENT_FAULT_RECORDS}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
