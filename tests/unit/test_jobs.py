import re
from concurrent.futures import ThreadPoolExecutor

from koubou.jobs import new_task_id

TASK_ID = re.compile(r"^task_\d{8}_\d{6}_[A-Za-z0-9]{12}$")


def test_task_ids_keep_the_seed_form() -> None:
    assert TASK_ID.match(new_task_id())


def test_task_ids_are_unique_under_concurrency() -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lambda _: new_task_id(), range(20_000)))
    assert len(set(ids)) == len(ids)


def test_task_ids_use_the_whole_alphabet_in_every_position() -> None:
    suffixes = [new_task_id()[-12:] for _ in range(5_000)]
    alphabet = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    for position in range(12):
        assert {suffix[position] for suffix in suffixes} == alphabet
