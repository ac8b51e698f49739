"""Gunicorn's access log without enrollment secrets: `gunicorn --logger-class
controlplane.gunicorn_logging.RedactingLogger --access-logfile - ...`."""

from gunicorn.glogging import Logger

from controlplane.log_redaction import redact


class RedactingLogger(Logger):
    """Every text atom of an access-log line (request line, path, query, referer, headers,
    environ) with /enroll/<secret> shown as /enroll/<redacted>."""

    def atoms(self, resp, req, environ, request_time) -> dict:
        return {
            key: redact(value) if isinstance(value, str) else value
            for key, value in super().atoms(resp, req, environ, request_time).items()
        }
