"""examples/service.py's modes: sessions as StreamPool slots stepped through a
Batcher (pool, the default), one Stream per session (streams), no model
(noop); and a pool slot is never stepped by a request of a session that ended."""

import os
import sys
import threading

import numpy as np
import pytest

import numlstm

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import service  # noqa: E402
import service_load  # noqa: E402

I = 8


@pytest.fixture(scope="module")
def model():
    return numlstm.LSTM(I, 32, num_layers=2, seed=0)


@pytest.mark.parametrize("mode", ["pool", "streams", "noop"])
def test_every_mode_serves_concurrent_clients(model, mode):
    srv = service.make_server(model, mode=mode, max_sessions=50, max_sessions_per_client=50)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = service_load.run_load(srv.server_address[1], 12, 15, input_size=I, seed=2)
        assert not r["errors"], r["errors"][:3]
        assert r["requests"] == 12 * 15
        if mode == "noop":
            assert all(not np.any(h) for h in r["outputs"])  # no model ran
        else:
            assert service_load.check_outputs(model, r) <= 1e-6
        if mode == "pool":
            batcher = srv.service.batcher
            assert batcher.stepped >= 12 * 15 and len(batcher.pool) == 0
    finally:
        srv.shutdown()
        srv.server_close()
    if mode == "pool":
        assert srv.service.batcher.closed  # server_close stops the batcher


def test_an_ended_sessions_slot_is_reused_but_never_stepped_by_it(model):
    svc = service.Service(model, service.Limits(max_sessions=1))
    try:
        a = svc.create()["session"]
        found = svc._get(a)  # a request that found session a ...
        svc.delete(a)  # ... which then ends: its slot is free
        b = svc.create()["session"]  # and taken by b (the pool has one slot)
        pool = svc.batcher.pool
        assert not pool.is_open(found.stream.sid)  # the pool id of a is not b's, though
        assert pool.is_open(svc.sessions[b].stream.sid)  # b holds a's slot (the only one)
        with found.lock:
            assert found.ended
        svc.sessions[a] = found  # the request goes on with the session it found
        with pytest.raises(service.BadRequest, match="ended"):
            svc.step(a, {"x": [1.0] * I})
        del svc.sessions[a]
        h, c = svc.sessions[b].stream.state
        assert not h.any() and not c.any()  # b's state was not stepped
    finally:
        svc.close()


def test_a_full_pool_while_a_slot_is_still_closing_is_429(model):
    svc = service.Service(model, service.Limits(max_sessions=1))
    try:
        a = svc.create()["session"]
        session = svc.sessions.pop(a)  # gone from the table, slot not yet closed
        with pytest.raises(service.BadRequest, match="retry shortly") as e:
            svc.create()
        assert e.value.status == 429
        session.end()
        assert "session" in svc.create()
    finally:
        svc.close()


def test_bad_mode_and_batch_settings_are_refused(model, capsys, tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        service.Service(model, mode="fast")
    with pytest.raises(ValueError, match=r"max_batch must be an int in \[1, 4\]"):
        service.Service(model, service.Limits(max_sessions=4), max_batch=5)
    path = tmp_path / "m.npz"
    numlstm.save(model, str(path))
    with pytest.raises(SystemExit):
        service.main([str(path), "--max-delay", "-1"])
    assert "must be a number >= 0" in capsys.readouterr().err
