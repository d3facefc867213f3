"""ecss.torch: RREMoE trains as the same model with plain PyTorch experts does, its gradients
match finite differences, and misuse raises."""

import numpy as np
import pytest
import torch

import ecss
import ecss.torch as et

VOCAB, D_MODEL, D_FF, LAYERS = 48, 16, 32, 2
BATCH, SEQ = 2, 6
LR, WEIGHT_DECAY = 1e-2, 0.01


def model_spec(dtype="f32"):
    return ecss.ModelSpec(
        layers=LAYERS,
        d_model=D_MODEL,
        d_ff=D_FF,
        domains=[ecss.DomainSpec("code", 4), ecss.DomainSpec("prose", 3)],
        vocab=VOCAB,
        dtype=dtype,
        seed=7,
    )


def make_experts(dtype="f32", cache_experts=None, lr=LR):
    optimizer = ecss.OptimizerOptions(
        kind="adamw", groups=[ecss.HyperParams(lr=lr, weight_decay=WEIGHT_DECAY)], threads=1
    )
    return et.Experts(
        model_spec(dtype),
        max_tokens_per_micro_batch=BATCH * SEQ,
        max_micro_batches=2,
        cache_experts=cache_experts,
        optimizer=optimizer,
    )


def expert_weights(experts, layer, expert):
    """The session's fp32 master weights of one expert, as (W_in, W_out)."""
    flat = experts.session.master_weights(layer, expert)
    w_in = flat[: D_MODEL * D_FF].reshape(D_MODEL, D_FF)
    w_out = flat[D_MODEL * D_FF :].reshape(D_FF, D_MODEL)
    return torch.from_numpy(w_in.copy()), torch.from_numpy(w_out.copy())


class Dense(torch.nn.Module):
    """The model around the sparse layers: embedding, residual MoE layers, output projection."""

    def __init__(self, moe_layers):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(VOCAB, D_MODEL)
        self.out = torch.nn.Linear(D_MODEL, VOCAB, bias=False)
        self.moe = moe_layers

    def forward(self, tokens, domains):
        h = self.embed(tokens)
        for moe in self.moe:
            h = h + moe(h, tokens, domains)
        logits = self.out(h[:, :-1])
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)
        )


class PlainMoE(torch.nn.Module):
    """The same sparse layer in plain PyTorch: every expert a pair of parameters, routed by the
    model's RRE tables."""

    def __init__(self, experts, tables, layer):
        super().__init__()
        self.tables, self.layer = tables, layer
        count = experts.session.experts_in_layer(layer)
        pairs = [expert_weights(experts, layer, e) for e in range(count)]
        self.w_in = torch.nn.ParameterList([torch.nn.Parameter(p[0]) for p in pairs])
        self.w_out = torch.nn.ParameterList([torch.nn.Parameter(p[1]) for p in pairs])

    def forward(self, hidden, tokens, domains):
        x = hidden.reshape(-1, D_MODEL)
        route = torch.from_numpy(
            self.tables.route(self.layer, tokens.numpy(), domains.numpy()).astype(np.int64)
        )
        y = torch.zeros_like(x)
        for e in route.unique().tolist():
            rows = route == e
            inner = torch.nn.functional.gelu(x[rows] @ self.w_in[e])
            y = y.index_put((rows.nonzero().squeeze(1),), inner @ self.w_out[e])
        return y.reshape(hidden.shape)


def batches(steps, seed=11):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield [
            (
                torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
                torch.randint(0, 2, (BATCH,), generator=generator),
            )
            for _ in range(2)
        ]


def test_twenty_steps_match_plain_pytorch_experts_with_adamw():
    experts = make_experts(cache_experts=8)  # 8 slots for 14 experts: they stream
    ecss_model = Dense(torch.nn.ModuleList([et.RREMoE(experts, l) for l in range(LAYERS)]))
    tables = ecss.RreTables(model_spec())
    plain_moe = torch.nn.ModuleList([PlainMoE(experts, tables, l) for l in range(LAYERS)])
    plain_model = Dense(plain_moe)
    plain_model.load_state_dict(ecss_model.state_dict(), strict=False)

    def adamw(params):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)

    ecss_opt = adamw(ecss_model.parameters())  # the dense part; the session updates experts
    plain_opt = adamw(plain_model.parameters())  # dense and experts

    for step, micro_batches in enumerate(batches(20)):
        ecss_opt.zero_grad(set_to_none=True)
        plain_opt.zero_grad(set_to_none=True)
        ecss_loss = plain_loss = 0.0
        with experts.step(micro_batches) as handle:
            for tokens, domains in micro_batches:
                loss = ecss_model(tokens, domains)
                loss.backward()
                ecss_loss += loss.item()
        for tokens, domains in micro_batches:
            loss = plain_model(tokens, domains)
            loss.backward()
            plain_loss += loss.item()
        ecss_opt.step()
        plain_opt.step()
        # Per step: the losses (which see every weight so far) within 1e-5 relative.
        assert ecss_loss == pytest.approx(plain_loss, rel=1e-5), f"step {step}"
        assert handle.stats.updated_experts > 0
        assert handle.stats.tensor_h2d_bytes == 2 * 2 * LAYERS * BATCH * SEQ * D_MODEL * 4

    experts.session.synchronize()
    for layer in range(LAYERS):
        for e in range(experts.session.experts_in_layer(layer)):
            w_in, w_out = expert_weights(experts, layer, e)
            # Every expert's weights after 20 AdamW steps within 1e-5 absolute (they move by
            # up to 20 * lr = 0.2).
            torch.testing.assert_close(w_in, plain_moe[layer].w_in[e].detach(), rtol=0, atol=1e-5)
            torch.testing.assert_close(
                w_out, plain_moe[layer].w_out[e].detach(), rtol=0, atol=1e-5
            )


def test_layers_gradient_matches_central_differences():
    experts = make_experts(lr=0.0)  # the training step computes the gradient, moves nothing
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    domains = torch.tensor([0, 1])
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=generator)
    r = torch.randn(BATCH, SEQ, D_MODEL, generator=generator)

    def layers(value):  # both sparse layers, as a step runs them: y = f1(f0(x))
        return moe[1](moe[0](value, tokens, domains), tokens, domains)

    x_grad = x.clone().requires_grad_(True)
    with experts.step([(tokens, domains)]):
        (layers(x_grad) * r).sum().backward()
    analytic = x_grad.grad

    def objective(value):
        with experts.evaluation([(tokens, domains)]):
            return float((layers(value).double() * r.double()).sum())

    h = 1e-2
    flat = x.reshape(-1)
    for index in torch.randperm(flat.numel(), generator=generator)[:24].tolist():
        plus, minus = flat.clone(), flat.clone()
        plus[index] += h
        minus[index] -= h
        numeric = (objective(plus.reshape(x.shape)) - objective(minus.reshape(x.shape))) / (2 * h)
        # float32 kernels: central differences with h = 1e-2 agree to about 1e-3.
        assert analytic.reshape(-1)[index].item() == pytest.approx(numeric, rel=1e-2, abs=2e-3)


def one_step(experts, micro_batches):
    """A training step through every layer, from zero hidden states."""
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    with experts.step(micro_batches):
        for tokens, domains in micro_batches:
            h = torch.zeros(tokens.numel(), D_MODEL, requires_grad=True)
            for layer in moe:
                h = layer(h, tokens, domains)
            h.sum().backward()


def simple_batch():
    return [(torch.arange(SEQ).reshape(1, SEQ), torch.tensor([0]))]


def test_forward_outside_a_step_raises_and_the_session_stays_usable():
    experts = make_experts()
    moe = et.RREMoE(experts, 0)
    tokens, domains = simple_batch()[0]
    with pytest.raises(ecss.FailedPrecondition, match="outside a step"):
        moe(torch.zeros(SEQ, D_MODEL), tokens, domains)
    one_step(experts, simple_batch())
    assert experts.last_stats.step == 1


def test_a_step_not_ended_raises_at_the_next():
    experts = make_experts()
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    tokens, domains = simple_batch()[0]
    with pytest.raises(RuntimeError, match="boom"):
        with experts.step(simple_batch()):
            raise RuntimeError("boom")
    with pytest.raises(ecss.FailedPrecondition, match="a step is open"):
        with experts.step(simple_batch()):
            pass
    # The open step can be finished and ended.
    h = torch.zeros(SEQ, D_MODEL, requires_grad=True)
    out = moe[1](moe[0](h, tokens, domains), tokens, domains)
    out.sum().backward()
    assert experts.end_step().step == 1


def test_end_before_backward_raises_and_the_step_stays_open():
    experts = make_experts()
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    tokens, domains = simple_batch()[0]
    h = torch.zeros(SEQ, D_MODEL, requires_grad=True)
    with pytest.raises(ecss.FailedPrecondition):
        with experts.step(simple_batch()):
            out = moe[1](moe[0](h, tokens, domains), tokens, domains)
    out.sum().backward()
    assert experts.end_step().step == 1


@pytest.mark.parametrize(
    "hidden, error, message",
    [
        (torch.zeros(SEQ, D_MODEL, dtype=torch.float64), ecss.InvalidArgument, "float64"),
        (torch.zeros(SEQ, D_MODEL, dtype=torch.bfloat16), ecss.InvalidArgument, "bf16"),
        (torch.zeros(SEQ + 1, D_MODEL), ecss.InvalidArgument, str(SEQ + 1)),
        (torch.zeros(SEQ, D_MODEL + 1), ecss.InvalidArgument, str(D_MODEL + 1)),
        (torch.zeros(D_MODEL, SEQ).t(), ecss.InvalidArgument, "contiguous"),
        (torch.zeros(SEQ, 1, D_MODEL), ecss.InvalidArgument, "batch first"),
        (torch.zeros(SEQ, D_MODEL), ecss.InvalidArgument, "require grad"),
        (np.zeros((SEQ, D_MODEL), dtype=np.float32).tolist(), ecss.InvalidArgument, "tensor"),
    ],
)
def test_bad_hidden_states_raise_and_the_step_goes_on(hidden, error, message):
    experts = make_experts()
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    tokens, domains = simple_batch()[0]
    with experts.step(simple_batch()):
        with pytest.raises(error, match=message):
            if isinstance(hidden, torch.Tensor) and not hidden.is_contiguous():
                experts.session.forward(0, 0, hidden, torch.empty(SEQ, D_MODEL))
            else:
                wants_grad = message != "require grad" and isinstance(hidden, torch.Tensor)
                moe[0](hidden.requires_grad_() if wants_grad else hidden, tokens, domains)
        h = torch.zeros(SEQ, D_MODEL, requires_grad=True)
        moe[1](moe[0](h, tokens, domains), tokens, domains).sum().backward()
    assert experts.last_stats.step == 1


def test_bad_token_ids_raise_and_the_session_stays_usable():
    experts = make_experts()
    moe = et.RREMoE(experts, 0)
    with pytest.raises(ecss.InvalidArgument, match="out of the vocabulary"):
        experts.step([(torch.tensor([[VOCAB]]), torch.tensor([0]))]).__enter__()
    with pytest.raises(ecss.InvalidArgument, match="integers"):
        experts.step([(torch.tensor([[1.0]]), torch.tensor([0]))]).__enter__()
    with pytest.raises(ecss.InvalidArgument, match="not a valid id"):
        experts.session.begin_step([(np.array([[-1]]), np.array([0]))])
    with pytest.raises(ecss.NotFound, match="domain"):
        experts.step([(torch.tensor([[1]]), torch.tensor([9]))]).__enter__()
    with experts.step(simple_batch()):
        tokens, domains = simple_batch()[0]
        with pytest.raises(ecss.InvalidArgument, match="not those of a micro-batch"):
            moe(torch.zeros(SEQ, D_MODEL, requires_grad=True), tokens + 1, domains)
        h = torch.zeros(SEQ, D_MODEL, requires_grad=True)
        et.RREMoE(experts, 1)(moe(h, tokens, domains), tokens, domains).sum().backward()
    assert experts.last_stats.step == 1


def test_a_layer_outside_the_model_is_refused():
    with pytest.raises(ecss.InvalidArgument, match="layer 2"):
        et.RREMoE(make_experts(), LAYERS)


def test_a_bf16_model_trains_with_bfloat16_tensors():
    experts = make_experts(dtype="bf16")
    before = [expert_weights(experts, 0, e) for e in range(7)]
    model = Dense(torch.nn.ModuleList([et.RREMoE(experts, l) for l in range(LAYERS)]))
    model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    micro_batches = next(batches(1))
    losses = []
    for _ in range(15):  # the same batch again and again: the loss must fall
        optimizer.zero_grad()
        total = 0.0
        with experts.step(micro_batches):
            for tokens, domains in micro_batches:
                loss = model(tokens, domains)
                loss.backward()
                total += loss.item()
        optimizer.step()
        losses.append(total)
    assert losses[-1] < 0.8 * losses[0]
    # The experts trained too: the session updated the routed ones.
    experts.session.synchronize()
    moved = [
        not torch.equal(expert_weights(experts, 0, e)[0], before[e][0]) for e in range(7)
    ]
    assert sum(moved) >= 2


def test_a_graph_kept_from_an_ended_step_cannot_backward_into_the_next():
    experts = make_experts()
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    tokens, domains = simple_batch()[0]
    with experts.step(simple_batch()):
        h = torch.zeros(SEQ, D_MODEL, requires_grad=True)
        out = moe[1](moe[0](h, tokens, domains), tokens, domains).sum()
        out.backward(retain_graph=True)
    with experts.step(simple_batch()):
        with pytest.raises(ecss.FailedPrecondition, match="ended"):
            out.backward()
        h = torch.zeros(SEQ, D_MODEL, requires_grad=True)
        moe[1](moe[0](h, tokens, domains), tokens, domains).sum().backward()
    assert experts.last_stats.step == 2


def test_an_output_that_never_reaches_the_loss_ends_with_zero_gradients_only_when_asked():
    experts = make_experts()
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    tokens, domains = simple_batch()[0]
    with pytest.raises(ecss.FailedPrecondition, match=r"\(0, 1\)"):
        with experts.step(simple_batch()):
            h = torch.zeros(SEQ, D_MODEL, requires_grad=True)
            first = moe[0](h, tokens, domains)
            moe[1](first, tokens, domains)  # unused
            first.sum().backward()
    assert experts.end_step(zero_missing_gradients=True).step == 1


def test_micro_batches_of_different_sizes_each_find_their_own():
    experts = make_experts()
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    small = (torch.arange(3).reshape(1, 3), torch.tensor([1]))
    large = (torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB, torch.tensor([0, 1]))
    with experts.step([large, small]):
        for tokens, domains in (large, small):  # backward goes in micro-batch order
            h = torch.ones(tokens.numel(), D_MODEL, requires_grad=True)
            moe[1](moe[0](h, tokens, domains), tokens, domains).sum().backward()
        with pytest.raises(ecss.InvalidArgument, match="not those of a micro-batch"):
            moe[0](torch.ones(3, D_MODEL, requires_grad=True), small[0], small[1])
    assert experts.last_stats.tokens == 2 * SEQ + 3


def test_a_timed_device_is_refused_for_training():
    with pytest.raises(ecss.InvalidArgument, match="sim-timed"):
        et.Experts(model_spec(), max_tokens_per_micro_batch=8, device="sim-timed")
    with pytest.raises(ecss.InvalidArgument, match="limits"):
        et.Experts(model_spec(), max_tokens_per_micro_batch=8, limits=ecss.StepLimits())


def test_an_unused_output_is_zeroed_before_a_later_micro_batch_needs_it():
    experts = make_experts()
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    micro_batches = next(batches(1))
    with experts.step(micro_batches):
        for index, (tokens, domains) in enumerate(micro_batches):
            h = torch.ones(tokens.numel(), D_MODEL, requires_grad=True)
            first = moe[0](h, tokens, domains)
            if index == 0:  # micro-batch 0 skips layer 1's output entirely
                moe[1](first, tokens, domains)
                experts.zero_gradient(0, 1)
                first.sum().backward()
            else:
                moe[1](first, tokens, domains).sum().backward()
    assert experts.last_stats.step == 1
    with pytest.raises(ecss.FailedPrecondition):
        experts.zero_gradient(0, 0)  # no step open


def test_a_backward_the_session_refused_is_never_zeroed():
    experts = make_experts()
    moe = [et.RREMoE(experts, l) for l in range(LAYERS)]
    micro_batches = next(batches(1))
    with pytest.raises(ecss.FailedPrecondition, match="micro-batch 0"):
        with experts.step(micro_batches):
            losses = []
            for tokens, domains in micro_batches:
                h = torch.ones(tokens.numel(), D_MODEL, requires_grad=True)
                losses.append(moe[1](moe[0](h, tokens, domains), tokens, domains).sum())
            # One backward over the summed losses runs micro-batch 1 first: refused.
            (losses[0] + losses[1] * 2).backward()
    with pytest.raises(ecss.FailedPrecondition, match="refused"):
        experts.end_step(zero_missing_gradients=True)
