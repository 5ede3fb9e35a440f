"""The engines' start: where each replica's GPUs and port are, and the one ready loop, driven here by
stand-in processes that send what an engine sends (the real engines are started by the server tests)."""

import multiprocessing as mp
import os
import threading
import time

import pytest

from ringllm.engine.config import EngineConfig
from ringllm.serve.launch import EngineGroup, Ready, replica_placements, wait_until_ready

_fork = mp.get_context("fork")  # the stand-ins run a function of this module: no pickling, no torch


def _stand_in(pipe, delay: float, message: dict | None) -> None:
    time.sleep(delay)
    if message is not None:
        pipe.send(dict(message, pid=os.getpid()))
        time.sleep(60)  # an engine that is ready serves until it is told to stop


def _start(*behaviours: tuple[float, dict | None]) -> tuple[EngineGroup, list]:
    procs, pipes = [], []
    for delay, message in behaviours:
        ready, ready_end = _fork.Pipe(duplex=False)
        procs.append(_fork.Process(target=_stand_in, args=(ready_end, delay, message), daemon=True))
        procs[-1].start()
        ready_end.close()
        pipes.append(ready)
    return EngineGroup(procs), pipes


def _facts(kv_slots: int, model: str = "/m") -> dict:
    return {"model_path": model, "max_seq_len": 256, "vocab_size": 1024, "kv_slots": kv_slots}


def test_every_replicas_message_is_waited_for_and_the_smallest_capacity_is_taken():
    group, pipes = _start((0.3, _facts(900, "/m0")), (0.0, _facts(700, "/m1")))
    try:
        done = wait_until_ready(group, pipes, threading.Event())
        assert not isinstance(done, int)
        ready = done[1]
        assert ready == Ready([p.pid for p in group.procs], "/m0", 256, 1024, 700)
    finally:
        group.stop(5)


def test_a_replica_that_exits_without_a_word_stops_the_others(capsys):
    group, pipes = _start((30.0, _facts(1)), (0.1, None))
    assert wait_until_ready(group, pipes, threading.Event()) == 1
    assert not group.is_alive()
    assert "error: engine replica 1 exited during start-up" in capsys.readouterr().err


def test_one_engine_that_fails_is_named_as_the_engine_process(capsys):
    group, pipes = _start((0.0, None))
    assert wait_until_ready(group, pipes, threading.Event()) == 1
    assert "error: the engine process exited during start-up" in capsys.readouterr().err


def test_an_engine_that_reports_an_error_stops_the_start_with_it(capsys):
    group, pipes = _start((30.0, _facts(1)), (0.1, {"error": "--context-len 9999 is larger than the model's"}))
    assert wait_until_ready(group, pipes, threading.Event()) == 2
    assert not group.is_alive()
    assert "error: --context-len 9999 is larger than the model's" in capsys.readouterr().err


def test_a_signal_while_the_engines_load_stops_them_and_exits_0(capsys):
    group, pipes = _start((30.0, _facts(1)), (30.0, _facts(1)))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert wait_until_ready(group, pipes, stop) == 0
    assert not group.is_alive()
    assert "ringllm: stopped during start-up" in capsys.readouterr().err


def test_one_engine_takes_the_config_as_given():
    config = EngineConfig(device_ids=[3], nccl_port=30000)
    assert replica_placements(config, 1) == [(config, None)]


def test_each_replica_takes_its_own_gpus_and_rendezvous_port(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    placements = replica_placements(EngineConfig(tp_size=2, device="cuda", nccl_port=30000), 2)
    assert not isinstance(placements, str)
    assert [devices for _, devices in placements] == ["4,5", "6,7"]
    assert [(c.nccl_port, c.device_ids) for c, _ in placements] == [(30000, None), (30001, None)]
    chosen = replica_placements(EngineConfig(device="cuda", device_ids=[1, 3]), 2)
    assert not isinstance(chosen, str) and [d for _, d in chosen] == ["5", "7"]  # ids index the visible ones
    cpu = replica_placements(EngineConfig(device="cpu"), 2)
    assert not isinstance(cpu, str) and [d for _, d in cpu] == [None, None]


@pytest.mark.parametrize("ids", [[0, 1, 2], None])
def test_too_few_gpus_for_the_replicas_is_refused(ids, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if ids is None:
        assert not isinstance(replica_placements(EngineConfig(device="cuda", tp_size=2), 2), str)  # 0..3 assumed
        return
    why = replica_placements(EngineConfig(device="cuda", tp_size=2, device_ids=ids), 2)
    assert why == "--dp-size 2 × 2 ranks need 4 GPUs; --device-ids lists 3"
