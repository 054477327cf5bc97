"""The API's access log line is gunicorn's own combined line (without the user), built more cheaply."""

from __future__ import annotations

import datetime
import logging
from types import SimpleNamespace

import pytest
from gunicorn import glogging
from gunicorn.config import Config

from koubou.api.access_log import AccessLogger

#: What koubou passed to gunicorn as --access-logformat before it had its own logger class.
GUNICORN_FORMAT = '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'


def logged_line(logger: glogging.Logger, environ: dict[str, str], sent: int | None) -> str:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.access_log.addHandler(handler)
    response = SimpleNamespace(status="202 ACCEPTED", sent=sent, headers=[])
    request = SimpleNamespace(headers=[("USER-AGENT", environ["HTTP_USER_AGENT"])])
    logger.access(response, request, environ, datetime.timedelta(milliseconds=3))
    return lines[-1]


@pytest.mark.parametrize(("sent", "agent"), [(83, "claude-code/2.0"), (None, 'evil" "forged')])
def test_the_line_is_gunicorns_combined_line(sent: int | None, agent: str) -> None:
    config = Config()
    config.set("accesslog", "-")
    config.set("access_log_format", GUNICORN_FORMAT)
    environ = {
        "REMOTE_ADDR": "10.0.0.7", "REQUEST_METHOD": "POST", "RAW_URI": "/task/delegate?x=1",
        "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_USER_AGENT": agent, "PATH_INFO": "/task/delegate",
        "QUERY_STRING": "x=1", "HTTP_AUTHORIZATION": "Basic " + "dG9rZW46c2VjcmV0",  # token:secret
    }  # fmt: skip
    ours = logged_line(AccessLogger(config), environ, sent)
    assert ours == logged_line(glogging.Logger(config), environ, sent)
    assert ours.startswith("10.0.0.7 - - [") and '"POST /task/delegate?x=1 HTTP/1.1" 202' in ours
    assert "token" not in ours and "secret" not in ours
    if '"' in agent:  # escaped, as gunicorn does: a client's quote cannot end the field and forge another
        assert ours.endswith('"evil\\" \\"forged"')


def test_nothing_is_built_when_the_access_log_is_off() -> None:
    logger = AccessLogger(Config())  # no --access-logfile
    logger.access(SimpleNamespace(status="200 OK", sent=1), None, {}, datetime.timedelta())  # {} would raise if read
