"""The ecss module over numpy arrays: options, errors (one class per status code, carrying the
code), the step's calls out of order, NaN, statistics, RRE tables and checkpoints."""

import os
import tempfile

import numpy as np
import pytest

import ecss

D_MODEL, D_FF, VOCAB, SEQ = 8, 16, 32, 4


def options(**fields):
    model = ecss.ModelSpec(
        layers=1,
        d_model=D_MODEL,
        d_ff=D_FF,
        domains=[ecss.DomainSpec("a", 3), ecss.DomainSpec("b", 2)],
        vocab=VOCAB,
        dtype="f32",
    )
    o = ecss.SessionOptions(model=model, **fields)
    o.limits = ecss.StepLimits(max_tokens_per_micro_batch=2 * SEQ, max_micro_batches=2)
    o.optimizer = ecss.OptimizerOptions(groups=[ecss.HyperParams(lr=1e-2)], threads=1)
    return o


def session(o=None, device=None):
    o = o or options()
    device = device or ecss.Device("sim", memory_bytes=16 << 20)
    o.budgets.device_bytes = ecss.Session.plan_memory(device, o).device_budget_for(5)
    return ecss.Session(device, o)


TOKENS = np.arange(2 * SEQ).reshape(2, SEQ)
DOMAINS = np.array([0, 1])


def train_step(s, x=None):
    """One step of one micro-batch: forward, backward with dy = 1; returns its stats."""
    x = np.ones((2 * SEQ, D_MODEL), np.float32) if x is None else x
    s.begin_step([(TOKENS, DOMAINS)])
    y, dx = np.empty_like(x), np.empty_like(x)
    s.forward(0, 0, x, y)
    s.backward(0, 0, np.ones_like(x), dx)
    return s.end_step()


def test_each_status_code_has_its_class_with_the_code():
    assert issubclass(ecss.InvalidArgument, ecss.Error)
    assert issubclass(ecss.Error, RuntimeError)
    with pytest.raises(ecss.InvalidArgument) as raised:
        ecss.ModelSpec(d_modl=4)
    assert raised.value.code == "INVALID_ARGUMENT"
    assert "d_modl" in raised.value.message
    assert raised.value.errno is None  # not a failed system call
    assert ecss.Error("made by hand").errno is None
    with pytest.raises(ecss.InvalidArgument, match="strategy"):
        ecss.SessionOptions(strategy="fastest")


def test_invalid_options_name_the_field():
    o = options()
    o.model.d_model = 0
    with pytest.raises(ecss.InvalidArgument, match="d_model"):
        o.validate()


def test_a_budget_too_small_is_resource_exhausted_naming_the_bytes():
    o = options()
    device = ecss.Device("sim", memory_bytes=16 << 20)
    o.budgets.device_bytes = 1024
    with pytest.raises(ecss.ResourceExhausted, match="device budget"):
        ecss.Session(device, o)
    # A device that holds the budget but not the binding's staging buffers.
    o.budgets.device_bytes = 0  # plan_memory then plans as if unbounded
    o.budgets.device_bytes = ecss.Session.plan_memory(device, o).device_budget_for(5)
    small = ecss.Device("sim", memory_bytes=o.budgets.device_bytes + 256)
    with pytest.raises(ecss.ResourceExhausted, match="staging"):
        ecss.Session(small, o)


def test_calls_out_of_order_raise_and_the_session_stays_usable():
    s = session()
    x = np.ones((2 * SEQ, D_MODEL), np.float32)
    with pytest.raises(ecss.FailedPrecondition, match="outside a step"):
        s.forward(0, 0, x, np.empty_like(x))
    with pytest.raises(ecss.FailedPrecondition):
        s.end_step()
    s.begin_step([(TOKENS, DOMAINS)])
    with pytest.raises(ecss.FailedPrecondition):
        s.begin_step([(TOKENS, DOMAINS)])
    with pytest.raises(ecss.FailedPrecondition):
        s.backward(0, 0, x, np.empty_like(x))  # before its forward
    s.forward(0, 0, x, np.empty_like(x))
    with pytest.raises(ecss.FailedPrecondition, match="backward"):
        s.end_step()  # the step stays open
    s.backward(0, 0, x, np.empty_like(x))
    assert s.end_step().step == 1
    assert train_step(s).step == 2


def test_bad_tensors_raise_before_anything_runs():
    s = session()
    s.begin_step([(TOKENS, DOMAINS)])
    good = np.ones((2 * SEQ, D_MODEL), np.float32)
    for bad, message in [
        (good.astype(np.float64), "float64"),
        (good.astype(np.int32), "int32"),
        (np.ones((2 * SEQ + 1, D_MODEL), np.float32), str(2 * SEQ + 1)),
        (np.ones((4 * SEQ, D_MODEL), np.float32), "at most"),
        (np.ones(2 * SEQ * D_MODEL, np.float32), "dimensions"),
        (np.asfortranarray(np.ones((2 * SEQ, D_MODEL), np.float32)), "contiguous"),
        ("x", "tensor"),
    ]:
        with pytest.raises(ecss.InvalidArgument, match=message):
            s.forward(0, 0, bad, np.empty_like(good))
    with pytest.raises(ecss.InvalidArgument, match="must match"):
        s.forward(0, 0, good, np.empty((SEQ, D_MODEL), np.float32))
    with pytest.raises(ecss.InvalidArgument, match="batch first"):
        s.forward(0, 0, good.reshape(SEQ, 2, D_MODEL), good.reshape(SEQ, 2, D_MODEL).copy())
    s.forward(0, 0, good, np.empty_like(good))
    s.backward(0, 0, good, np.empty_like(good))
    assert s.end_step().step == 1


def test_bad_micro_batches_raise():
    s = session()
    for micro_batches, error, message in [
        ([(TOKENS.astype(np.float32), DOMAINS)], ecss.InvalidArgument, "integers"),
        ([(TOKENS - 1, DOMAINS)], ecss.InvalidArgument, "not a valid id"),
        ([(TOKENS.astype(np.uint64) + 2**63, DOMAINS)], ecss.InvalidArgument, str(2**63)),
        ([(TOKENS + VOCAB, DOMAINS)], ecss.InvalidArgument, "vocabulary"),
        ([(TOKENS, np.array([0, 7]))], ecss.NotFound, "7"),
        ([(TOKENS, np.array([0, 1, 0]))], ecss.InvalidArgument, "domain ids"),
        ([TOKENS], ecss.InvalidArgument, "pair"),
        ([(TOKENS, DOMAINS)] * 3, ecss.InvalidArgument, "micro"),
    ]:
        with pytest.raises(error, match=message):
            s.begin_step(micro_batches)
    assert train_step(s).step == 1


def test_a_nan_gradient_skips_the_update_and_keeps_the_weights():
    s = session()
    before = s.master_weights(0, 0).copy()
    x = np.ones((2 * SEQ, D_MODEL), np.float32)
    x[0, 0] = np.nan
    stats = train_step(s, x)
    assert stats.skipped
    s.synchronize()
    np.testing.assert_array_equal(s.master_weights(0, 0), before)
    assert not train_step(s).skipped


def test_stats_count_the_tensors_copied():
    stats = train_step(session())
    d = stats.to_dict()
    tensor_bytes = 2 * 2 * SEQ * D_MODEL * 4  # x and dy in; y and dx out
    assert d["tensor_h2d_bytes"] == tensor_bytes and d["tensor_d2h_bytes"] == tensor_bytes
    assert d["h2d_bytes"] >= d["tensor_h2d_bytes"] + d["expert_fetch_bytes"]
    assert d["tokens"] == 2 * SEQ and stats.tokens == 2 * SEQ
    assert d["updated_experts"] > 0
    assert 0 < d["begin_seconds"] <= d["seconds"]
    with pytest.raises(AttributeError):
        stats.no_such_field


def test_rre_tables_route_as_the_session():
    o = options()
    tables = ecss.RreTables(o.model)
    route = tables.route(0, TOKENS, DOMAINS)
    assert route.shape == (2 * SEQ,)
    assert all(r < 3 for r in route[:SEQ]) and all(3 <= r < 5 for r in route[SEQ:])
    assert [d["name"] for d in tables.domains()] == ["a", "b"]
    with pytest.raises(ecss.InvalidArgument):
        tables.route(1, TOKENS, DOMAINS)  # the model has one layer


def test_a_checkpoint_resumes_with_its_weights_and_loop_state():
    with tempfile.TemporaryDirectory() as tmp:
        o = options()
        os.mkdir(tmp + "/a")
        os.mkdir(tmp + "/b")
        os.mkdir(tmp + "/c")
        os.mkdir(tmp + "/ckpt")
        o.placement = ecss.Placement(master="nvme", moments="nvme", nvme_dirs=[tmp + "/a"])
        o.model.dtype = "bf16"
        s = session(o)
        x = np.ones((2 * SEQ, D_MODEL), np.float32)
        with pytest.raises(ecss.InvalidArgument, match="f32"):
            train_step(s, x)  # a bf16 model takes bf16 tensors (from torch)
        # The session stays usable: the open step ends with bf16 tensors (from torch).
        torch = pytest.importorskip("torch")
        xb = torch.ones(2 * SEQ, D_MODEL, dtype=torch.bfloat16)
        s.forward(0, 0, xb, torch.empty_like(xb))
        s.backward(0, 0, xb, torch.empty_like(xb))
        s.end_step()
        with pytest.raises(ecss.InvalidArgument, match="bytes"):
            s.save_checkpoint(tmp + "/ckpt", "one", {"loop": "not bytes"})
        with pytest.raises(ecss.InvalidArgument, match="must be a str"):
            s.save_checkpoint(tmp + "/ckpt", "one", {1: b"not named by a str"})
        with pytest.raises(ecss.InvalidArgument, match="blob name"):
            s.start_checkpoint(tmp + "/ckpt", "one", {"a b": b"x"})  # refused at once
        assert not os.path.exists(tmp + "/ckpt/one")
        # A failed system call's number comes as OSError's does (no lock file can go in /proc).
        with pytest.raises(ecss.Error) as raised:
            s.save_checkpoint("/proc", "one")
        assert isinstance(raised.value.errno, int) and raised.value.errno > 0
        assert raised.value.message.endswith(os.strerror(raised.value.errno))
        s.save_checkpoint(tmp + "/ckpt", "one", {"loop": b"\x00state"})
        with pytest.raises(ecss.AlreadyExists):
            s.save_checkpoint(tmp + "/ckpt", "one")
        # A save overlapping the next step: one at a time, its result taken once.
        s.start_checkpoint(tmp + "/ckpt", "two", {"loop": b"later"})
        with pytest.raises(ecss.FailedPrecondition, match="WaitForCheckpoint"):
            s.start_checkpoint(tmp + "/ckpt", "three")
        assert s.wait_for_checkpoint()["sequence"] == 2
        with pytest.raises(ecss.FailedPrecondition, match="no save"):
            s.wait_for_checkpoint()
        weights = s.master_weights(0, 1).copy()
        del s
        o.placement.nvme_dirs = [tmp + "/b"]
        o.placement.resume_from = tmp + "/ckpt/one"
        resumed = session(o)
        assert resumed.loop_state == {"loop": b"\x00state"}
        np.testing.assert_array_equal(resumed.master_weights(0, 1), weights)
        del resumed  # closes its store before the directory goes
        # The checkpoint records its model; another one's is refused naming the field.
        saved = ecss.checkpoint_model(tmp + "/ckpt/one")
        assert [(d.name, d.experts, d.id) for d in saved.domains] == [
            (d.name, d.experts, i) for i, d in enumerate(o.model.domains)
        ]
        assert (saved.d_model, saved.d_ff, saved.dtype) == (o.model.d_model, o.model.d_ff, "bf16")
        with pytest.raises(ecss.NotFound):
            ecss.checkpoint_model(tmp + "/ckpt/none")
        o.model.domains = [ecss.DomainSpec("b", 2, id=0), ecss.DomainSpec("a", 3, id=1)]
        o.placement.nvme_dirs = [tmp + "/c"]
        with pytest.raises(ecss.FailedPrecondition, match="domains"):
            session(o)


def test_a_read_only_array_is_refused_clearly():
    s = session()
    s.begin_step([(TOKENS, DOMAINS)])
    x = np.ones((2 * SEQ, D_MODEL), np.float32)
    x.setflags(write=False)
    with pytest.raises(ecss.InvalidArgument, match="DLPack"):
        s.forward(0, 0, x, np.empty_like(x))


def test_calls_from_several_threads_take_turns():
    import threading

    s = session()
    s.begin_step([(TOKENS, DOMAINS), (TOKENS, DOMAINS)])
    x = np.ones((2 * SEQ, D_MODEL), np.float32)
    outputs = [np.empty_like(x), np.empty_like(x)]
    errors = []

    def run(mb):
        try:
            s.forward(mb, 0, x, outputs[mb])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(mb,)) for mb in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    np.testing.assert_array_equal(outputs[0], outputs[1])  # the same tokens and weights
    for mb in range(2):  # backward goes in micro-batch order (gradients add up in that order)
        s.backward(mb, 0, x, np.empty_like(x))
    assert s.end_step().tokens == 4 * SEQ


def test_the_planner_reports_as_ecss_plan_json_does():
    kinds = {p["kind"] for p in ecss.plan_presets()}
    assert {"model", "hardware"} <= kinds
    report = ecss.plan("pangu-sigma", "910x512")
    assert report["feasible"] and not report["short_of"]
    strategies = [s["strategy"] for s in report["strategies"]]
    assert strategies[0] == "ecss" and "zero-offload" in strategies
    assert all(s["tokens_per_s"] > 0 for s in report["strategies"])
    alone = ecss.plan("pangu-sigma", "910x512", only_workload_strategy=True)
    assert [s["strategy"] for s in alone["strategies"]] == ["ecss"]
    assert alone["strategies"][0]["step_seconds"] == report["strategies"][0]["step_seconds"]
    with pytest.raises(ecss.NotFound, match="nope"):
        ecss.plan("nope", "910x512")


def test_refused_calls_never_leave_a_copy_reading_freed_memory():
    # A refused forward queued its input's copy before the session refused it; the binding
    # must wait for that copy before the caller's array can be freed (it crashed otherwise).
    o = options()
    o.limits.max_tokens_per_micro_batch = 4096
    o.model.d_model = 256
    s = session(o, ecss.Device("sim", memory_bytes=64 << 20))
    for _ in range(10):
        x = np.ones((4096, 256), np.float32)
        with pytest.raises(ecss.FailedPrecondition):
            s.forward(0, 0, x, np.empty_like(x))  # no step open
        del x


def test_options_fields_name_bad_values_and_lists_are_copies():
    with pytest.raises(ecss.InvalidArgument, match="ModelSpec.d_model"):
        ecss.ModelSpec(d_model=-1)
    m = ecss.ModelSpec(domains=[ecss.DomainSpec("a", 2)])
    first = m.domains[0]
    m.domains = [ecss.DomainSpec("b", 3)] * 8  # the old element is the caller's own copy
    first.name = "c" * 1000
    assert first.name == "c" * 1000 and m.domains[0].name == "b"
    m.domains[0].experts = 99  # a copy: the spec is unchanged
    assert m.domains[0].experts == 3
    o = options()
    o.optimizer.groups = [ecss.HyperParams(lr=0.5)]
    assert o.optimizer.groups[0].lr == 0.5
    assert ecss.InvalidArgument.code == "INVALID_ARGUMENT"


def test_zero_eps_is_refused():
    o = options()
    o.optimizer.groups = [ecss.HyperParams(eps=0.0)]
    with pytest.raises(ecss.InvalidArgument, match="eps"):
        session(o)
    s = session()
    with pytest.raises(ecss.InvalidArgument, match="eps"):
        s.set_hyper_params(ecss.HyperParams(eps=0.0))
    assert train_step(s).step == 1
