"""A chat that stops really stops, and chats are not starved behind an edit that waits for a trace."""
from __future__ import annotations

import threading
import time

from chat_app.locks import RWLock
from chat_app.probes import stream_chat
from tests.tiny import tiny_llama, tiny_tokenizer


def test_closing_a_stream_ends_generation_before_it_returns() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    passes = {"n": 0}
    model.register_forward_hook(lambda *_: passes.__setitem__("n", passes["n"] + 1))
    before = set(threading.enumerate())
    reply = stream_chat(model, tok, [{"role": "user", "content": "hello there"}], 0.0, 2000)
    next(reply)
    reply.close()  # what a Stop button or a disconnect does to the generator
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
    done = passes["n"]
    time.sleep(0.3)
    assert passes["n"] == done < 2000  # no forward pass after close returned


def test_chats_enter_while_a_writer_waits_behind_a_long_reader() -> None:
    lock, order = RWLock(), []
    trace_holds, writer_waits, trace_done = threading.Event(), threading.Event(), threading.Event()

    def trace() -> None:
        with lock.read(long=True):
            trace_holds.set()
            trace_done.wait(5)
        order.append("trace")

    def edit() -> None:
        writer_waits.set()
        with lock.write():
            order.append("edit")

    threads = [threading.Thread(target=trace), threading.Thread(target=edit)]
    threads[0].start()
    trace_holds.wait(5)
    threads[1].start()
    writer_waits.wait(5)
    time.sleep(0.1)  # the writer is queued now
    entered = threading.Event()

    def chat() -> None:
        with lock.read():
            entered.set()
            order.append("chat")

    chatter = threading.Thread(target=chat)
    chatter.start()
    assert entered.wait(2), "a chat was blocked behind an edit waiting for a trace"
    trace_done.set()
    for t in (*threads, chatter):
        t.join(5)
    assert order == ["chat", "trace", "edit"]


def test_without_long_readers_a_waiting_writer_goes_first() -> None:
    lock, order = RWLock(), []
    reader_in, release = threading.Event(), threading.Event()

    def short_reader() -> None:
        with lock.read():
            reader_in.set()
            release.wait(5)

    def edit() -> None:
        with lock.write():
            order.append("edit")

    def chat() -> None:
        with lock.read():
            order.append("chat")

    first = threading.Thread(target=short_reader)
    first.start()
    reader_in.wait(5)
    writer = threading.Thread(target=edit)
    writer.start()
    time.sleep(0.1)
    late = threading.Thread(target=chat)
    late.start()
    time.sleep(0.1)
    assert order == []  # the late chat queues behind the waiting writer
    release.set()
    for t in (first, writer, late):
        t.join(5)
    assert order == ["edit", "chat"]
