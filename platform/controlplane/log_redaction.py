"""Enrollment secrets travel in URL paths (/enroll/<secret>/install.sh, /enroll/<secret>/<wheel>):
every log line that may hold a path goes through redact() first. Standard library only: settings
name the filter in LOGGING, gunicorn's logger class (controlplane.gunicorn_logging) uses redact()."""

import logging
import re

# /enroll/<secret> anywhere in a line (the API's /api/v1/enroll has no segment after it).
_ENROLL_SECRET = re.compile(r"(/enroll/)[^/\s?#\"']+")
REDACTED = r"\1<redacted>"


def redact(text: str) -> str:
    return _ENROLL_SECRET.sub(REDACTED, text)


class RedactEnrollmentSecret(logging.Filter):
    """Rewrites a record whose message holds an enrollment secret; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True
