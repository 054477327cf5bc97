"""The Celery app; `celery -A koubou worker` finds it here."""

from celery import Celery

app = Celery("koubou")
app.config_from_object("celeryconfig")
# Registers the delegation task with the app without importing it here (no import cycle).
app.conf.imports = ("koubou.tasks",)
