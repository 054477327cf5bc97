"""Forked processes keep their parent's pages shared: the parent's objects are frozen before each fork."""

import gc
from collections.abc import Iterator

import pytest
from celery.signals import worker_before_create_process
from gunicorn.app.base import Application
from gunicorn.config import Config

import koubou.celery  # noqa: F401  (connects the worker's signal handlers)


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_worker_freezes_its_objects_before_forking_a_pool_process(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    worker_before_create_process.send(sender=None)
    assert gc.get_freeze_count() > 0


class Loader(Application):
    """gunicorn's own reading of a --config location, without parsing a command line."""

    def init(self, *_: object) -> None:
        pass

    def load(self) -> None:
        pass

    def load_config(self) -> None:
        self.cfg = Config()


def test_gunicorn_reads_the_api_hook_and_it_freezes_before_a_fork(unfrozen: None) -> None:
    loader = Loader()
    loader.load_config_from_module_name_or_filename("python:koubou.api.gunicorn_hooks")  # cli.cmd_api's --config
    assert loader.cfg.pre_fork is not Config().pre_fork  # gunicorn's default does nothing
    loader.cfg.pre_fork(None, None)
    assert gc.get_freeze_count() > 0
