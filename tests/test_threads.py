"""Chat generations share the cores instead of each taking all of them."""
from __future__ import annotations

import threading

import torch

from chat_app.threads import generation_threads


def test_concurrent_generations_split_the_cores_and_restore_the_setting() -> None:
    before = torch.get_num_threads()
    shares: list[int] = []
    inside = threading.Barrier(3)
    release = threading.Event()

    def chat() -> None:
        with generation_threads(cores=4) as share:
            shares.append(torch.get_num_threads())
            assert share == shares[-1]
            inside.wait(10)
            release.wait(10)

    with generation_threads(cores=4) as first:
        assert first == 4 and torch.get_num_threads() == 4
        workers = [threading.Thread(target=chat) for _ in range(2)]
        for w in workers:
            w.start()
        inside.wait(10)
        release.set()
        for w in workers:
            w.join()
    assert sorted(shares) == [1, 2]  # 4 cores: the second generation gets 4 // 2, the third 4 // 3
    assert torch.get_num_threads() == before  # restored for this thread's other work
