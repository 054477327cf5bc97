# One image for every koubou service (api, worker, mirror, flower); docker-compose.yml picks
# the command. The demo model (requirements-demo.txt) is left out: in a container the LLM
# server is Ollama or an OpenAI-compatible server reached over the network.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    KOUBOU_HOME=/data

# The pinned runtime set first, so a change to koubou's code reuses this layer.
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# Then koubou itself, without re-resolving dependencies. Built from a scratch copy that is
# removed, so `celery -A koubou` imports the installed package, not a stray source tree.
COPY . /tmp/src
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

# Non-root. /data is KOUBOU_HOME; /data/db is created (and owned) here so that a named
# volume mounted there starts out writable by this user.
RUN groupadd --system --gid 10001 koubou \
    && useradd --system --uid 10001 --gid koubou --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin koubou \
    && mkdir -p /data/config /data/db /data/logs /data/run \
    && chown -R koubou:koubou /data
USER 10001:10001
WORKDIR /data

EXPOSE 8765 5555
CMD ["koubou", "api"]
