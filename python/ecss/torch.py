"""ECSS in a PyTorch training loop: RRE MoE layers whose experts an ECSS session owns.

One ``Experts`` object holds the session that every ``RREMoE`` layer of a model runs through:
the experts' weights and optimizer state live with the session (host memory or NVMe), are
streamed to its device for the step's routed tokens, and are updated by its CPU optimizer;
the rest of the model is ordinary torch and trains with any torch optimizer.

    experts = ecss.torch.Experts(model_spec, max_tokens_per_micro_batch=512)
    moe = [ecss.torch.RREMoE(experts, layer) for layer in range(model_spec.layers)]
    with experts.step([(tokens, domains) for tokens, domains in micro_batches]) as step:
        for tokens, domains in micro_batches:
            loss = model(tokens, domains)   # calls moe[l](hidden, tokens, domains)
            loss.backward()
    print(step.stats.to_dict())

The session routes the whole step when it begins (RRE: each token's expert is a table lookup),
so a step takes every micro-batch's token and domain ids up front. A layer's forward finds its
micro-batch among them by its token ids. Tensors: CPU, contiguous, of the model's dtype
(float32 or bfloat16); they are copied to the session's device and back (counted in the step's
``tensor_h2d_bytes`` / ``tensor_d2h_bytes``). CUDA tensors in place are not supported yet.
"""

import contextlib
import time

import numpy as np
import torch

import ecss


def _raise(cls, message):
    """Raises ecss error class `cls` (its `code` is the class's) as the binding's carry it."""
    error = cls(message)
    error.message = message
    raise error


def _ids(value, name):
    """Token or domain ids as a CPU int64 tensor; the binding checks their range."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "u":
        if value.size and int(value.max()) > 0xFFFFFFFF:
            _raise(ecss.InvalidArgument, f"{name} holds {int(value.max())}: ids are below 2^32")
        value = value.astype(np.int64)
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, RuntimeError, ValueError) as error:
        _raise(ecss.InvalidArgument, f"{name} is not an array of integers ({error})")
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
        _raise(ecss.InvalidArgument, f"{name} must hold integers, got {tensor.dtype}")
    return tensor.detach().to("cpu", torch.int64)


def _torch_dtype(name):
    return {"f32": torch.float32, "bf16": torch.bfloat16}[name]


class Step:
    """An open step (or evaluation step): its micro-batches, and which layers ran on each."""

    def __init__(self, micro_batches, evaluation):
        self.micro_batches = micro_batches  # [(tokens int64 [batch, seq], domains int64 [batch])]
        self.evaluation = evaluation
        self.forwarded = set()  # (micro_batch, layer)
        self.backwarded = set()
        self.refused = set()  # backward calls the session refused (their gradient is lost)
        self.stats = None  # ecss.StepStats once the step has ended
        # Seconds inside this module's forward and backward (as Python sees them), and once
        # the step has ended, those less the time below the binding (stats.call_seconds: the
        # session's calls and the tensor copies): what the binding and the torch glue cost.
        self.python_seconds = 0.0
        self.overhead_seconds = None

    def find(self, layer, token_ids, domain_ids):
        """The index of the first micro-batch with these ids not yet through `layer`."""
        tokens = _ids(token_ids, "token_ids")
        domains = None if domain_ids is None else _ids(domain_ids, "domain_ids").reshape(-1)
        for index, (step_tokens, step_domains) in enumerate(self.micro_batches):
            if (index, layer) in self.forwarded or tokens.numel() != step_tokens.numel():
                continue
            if not torch.equal(step_tokens, tokens.reshape(step_tokens.shape)):
                continue
            if domains is not None:
                if domains.numel() == 1:
                    domains = domains.expand(step_domains.shape)
                if not torch.equal(step_domains, domains):
                    continue
            return index
        _raise(
            ecss.InvalidArgument,
            f"layer {layer}: token_ids {tuple(tokens.shape)} are not those of a micro-batch of "
            f"this step that has not yet run through the layer (a step runs each micro-batch "
            f"through each layer once)",
        )


class Experts:
    """The ECSS session behind a model's RREMoE layers, and its steps.

    model: ecss.ModelSpec. max_tokens_per_micro_batch, max_micro_batches: the step limits.
    cache_experts: expert slots of the device cache (default: every expert, at least one
    layer's active experts); the device budget is what a step works in plus these.
    optimizer: ecss.OptimizerOptions (default AdamW, lr 1e-3). Any other keyword is a field
    of ecss.SessionOptions (strategy, placement, gradient_dtype, ...). device: 'sim' (the
    simulated device running the real CPU kernels) or 'cuda[:N]'. trace: record a Chrome
    trace of the device and the optimizer (session.write_trace(path)).
    """

    def __init__(
        self,
        model,
        *,
        max_tokens_per_micro_batch,
        max_micro_batches=1,
        cache_experts=None,
        optimizer=None,
        device="sim",
        trace=False,
        **session_fields,
    ):
        if not isinstance(device, str):
            _raise(ecss.InvalidArgument, f"device must be a name ('sim', 'cuda:0'), got {device!r}")
        if device.startswith("sim-timed"):
            _raise(
                ecss.InvalidArgument,
                "device 'sim-timed': its kernels compute nothing (they take the modelled time), "
                "so there is nothing to train; use 'sim' or 'cuda'",
            )
        for field in ("model", "limits"):
            if field in session_fields:
                _raise(ecss.InvalidArgument, f"Experts sets SessionOptions.{field} itself")
        if "budgets" in session_fields and session_fields["budgets"].device_bytes:
            _raise(
                ecss.InvalidArgument,
                "Experts sizes budgets.device_bytes from cache_experts; leave it 0",
            )
        options = ecss.SessionOptions(**session_fields)
        options.model = model
        options.limits = ecss.StepLimits(
            max_tokens_per_micro_batch=max_tokens_per_micro_batch,
            max_micro_batches=max_micro_batches,
        )
        if optimizer is not None:
            options.optimizer = optimizer
        # Size the device: the session's budget for the cache asked, and the two activation
        # buffers CPU tensors are staged through.
        # (The plan does not check the device's memory: a small device plans it.)
        planning = ecss.Device(device, memory_bytes=1 << 20)
        plan = ecss.Session.plan_memory(planning, options)
        slots = plan.cache_slots if cache_experts is None else cache_experts
        options.budgets.device_bytes = plan.device_budget_for(slots)
        memory = ecss.Session.device_memory_for(planning, options)
        self.device = ecss.Device(device, memory_bytes=memory, trace=trace)
        self.session = ecss.Session(self.device, options)
        self.model = model
        self._step = None
        self.last_stats = None

    def _begin(self, micro_batches, evaluation, loss_scale):
        if self._step is not None:
            _raise(
                ecss.FailedPrecondition,
                "a step is open: end it first (every micro-batch through every layer's forward, "
                "and backward for a training step, then end_step())",
            )
        owned = []
        for index, pair in enumerate(micro_batches):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                _raise(
                    ecss.InvalidArgument,
                    f"micro_batches[{index}] must be a pair (token_ids, domain_ids)",
                )
            tokens = _ids(pair[0], f"micro_batches[{index}].token_ids")
            if tokens.dim() == 1:
                tokens = tokens.reshape(1, -1)
            domains = _ids(pair[1], f"micro_batches[{index}].domain_ids").reshape(-1)
            if domains.numel() == 1:
                domains = domains.expand(tokens.shape[0])
            owned.append((tokens, domains.contiguous()))
        arrays = [(tokens.numpy(), domains.numpy()) for tokens, domains in owned]
        if evaluation:
            self.session.begin_evaluation(arrays)
        else:
            self.session.begin_step(arrays, loss_scale)
        self._step = Step(owned, evaluation)
        return self._step

    def end_step(self, zero_missing_gradients=False):
        """Ends the open step (after its forwards and, training, its backwards): its stats.

        A layer output that never reached the loss gets no backward, and the step cannot end:
        FailedPrecondition names each (micro-batch, layer). zero_missing_gradients=True gives
        each of those a zero output gradient first (what an unused output's gradient is).
        """
        if self._step is None:
            _raise(ecss.FailedPrecondition, "no step is open")
        step = self._step
        if step.refused:
            _raise(
                ecss.FailedPrecondition,
                f"the session refused the backward of (micro-batch, layer) "
                f"{sorted(step.refused)} (backward runs per micro-batch, in micro-batch order): "
                f"their gradients are lost and this step cannot end with them; discard this "
                f"Experts or resume it from a checkpoint",
            )
        missing = sorted(step.forwarded - step.backwarded) if not step.evaluation else []
        if missing and not zero_missing_gradients:
            _raise(
                ecss.FailedPrecondition,
                f"(micro-batch, layer) {missing} ran forward but not backward: call backward "
                f"on the loss, or end_step(zero_missing_gradients=True) if those outputs did "
                f"not reach it",
            )
        for micro_batch, layer in missing:
            self.zero_gradient(micro_batch, layer)
        stats = self.session.end_step()
        self._step.stats = stats
        self._step.overhead_seconds = max(0.0, self._step.python_seconds - stats.call_seconds)
        self.last_stats = stats
        self._step = None
        return stats

    def zero_gradient(self, micro_batch, layer):
        """Gives (micro_batch, layer) of the open training step, whose forward ran, a zero output
        gradient: for an output that does not reach the loss, before a later micro-batch's
        backward of that layer needs it done (backward goes in micro-batch order)."""
        step = self._step
        if step is None or step.evaluation or (micro_batch, layer) not in step.forwarded:
            _raise(
                ecss.FailedPrecondition,
                f"zero_gradient({micro_batch}, {layer}): not a forward of the open training step",
            )
        if (micro_batch, layer) in step.backwarded:
            _raise(ecss.FailedPrecondition, f"({micro_batch}, {layer}) already ran backward")
        rows = step.micro_batches[micro_batch][0].numel()
        zeros = torch.zeros(rows, self.model.d_model, dtype=_torch_dtype(self.model.dtype))
        self.session.backward(micro_batch, layer, zeros, torch.empty_like(zeros))
        step.backwarded.add((micro_batch, layer))

    @contextlib.contextmanager
    def step(self, micro_batches, loss_scale=1.0):
        """A training step over `micro_batches`, [(token_ids [batch, seq], domain_ids [batch])].

        Ends the step when the block exits normally. When it raises, the step stays open, so
        that nothing half-done is updated: finish its calls and call end_step(), or discard
        the Experts.
        """
        step = self._begin(micro_batches, evaluation=False, loss_scale=loss_scale)
        yield step
        self.end_step()

    @contextlib.contextmanager
    def evaluation(self, micro_batches):
        """An evaluation step: forward only, with the weights the next step computes with."""
        step = self._begin(micro_batches, evaluation=True, loss_scale=1.0)
        with torch.no_grad():
            yield step
        self.end_step()

    def run_forward(self, layer, hidden, token_ids, domain_ids):
        start = time.perf_counter()
        if self._step is None:
            _raise(
                ecss.FailedPrecondition,
                f"RREMoE layer {layer}: forward outside a step (use `with experts.step(...)`)",
            )
        if not isinstance(hidden, torch.Tensor):
            _raise(
                ecss.InvalidArgument,
                f"RREMoE layer {layer}: hidden must be a torch tensor, got {type(hidden).__name__}",
            )
        if not self._step.evaluation and not (hidden.requires_grad and torch.is_grad_enabled()):
            _raise(
                ecss.InvalidArgument,
                f"RREMoE layer {layer}: in a training step the hidden states must require grad "
                f"(the layer's backward gives the experts their gradients); for forward only, "
                f"use `with experts.evaluation(...)`",
            )
        tokens = _ids(token_ids, "token_ids")
        token_shape = tuple(tokens.shape) if tokens.dim() == 2 else (1, tokens.numel())
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) != token_shape:
            _raise(
                ecss.InvalidArgument,
                f"RREMoE layer {layer}: hidden is {tuple(hidden.shape)} but token_ids "
                f"{tuple(tokens.shape)}: [batch, seq, d_model], batch first",
            )
        micro_batch = self._step.find(layer, token_ids, domain_ids)
        if self._step.evaluation:
            x = hidden.detach().contiguous()
            y = torch.empty_like(x)
            self.session.forward(micro_batch, layer, x, y)
        else:
            y = _MoEFunction.apply(hidden, self, self._step, layer, micro_batch)
        self._step.forwarded.add((micro_batch, layer))
        self._step.python_seconds += time.perf_counter() - start
        return y


class _MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, experts, step, layer, micro_batch):
        x = hidden.detach().contiguous()
        y = torch.empty_like(x)
        experts.session.forward(micro_batch, layer, x, y)
        ctx.experts, ctx.step, ctx.layer, ctx.micro_batch = experts, step, layer, micro_batch
        return y

    @staticmethod
    def backward(ctx, dy):
        start = time.perf_counter()
        if ctx.step is not ctx.experts._step:  # a graph kept from an ended step
            _raise(
                ecss.FailedPrecondition,
                f"RREMoE layer {ctx.layer}: backward of a forward from a step that has ended",
            )
        dy = dy.contiguous()
        dx = torch.empty_like(dy)
        try:
            ctx.experts.session.backward(ctx.micro_batch, ctx.layer, dy, dx)
        except ecss.Error:
            ctx.step.refused.add((ctx.micro_batch, ctx.layer))
            raise
        ctx.step.backwarded.add((ctx.micro_batch, ctx.layer))
        ctx.step.python_seconds += time.perf_counter() - start
        return dx, None, None, None, None


class RREMoE(torch.nn.Module):
    """Sparse layer `layer` of an Experts session: y[t] = FFN_e(x[t]), e the RRE table's
    expert for (layer, domain, token id). forward(hidden [tokens, d] or [batch, seq, d],
    token_ids [batch, seq], domain_ids [batch] or None) -> y shaped as hidden. The layer adds
    no residual: the model does. Its expert weights are not torch parameters: the session
    updates them (at the step's end, with the session's optimizer)."""

    def __init__(self, experts, layer):
        super().__init__()
        if not 0 <= layer < experts.model.layers:
            _raise(
                ecss.InvalidArgument,
                f"layer {layer} is not a sparse layer of the model (it has {experts.model.layers})",
            )
        self.experts = experts
        self.layer = layer

    def forward(self, hidden, token_ids, domain_ids=None):
        return self.experts.run_forward(self.layer, hidden, token_ids, domain_ids)

    def extra_repr(self):
        return f"layer={self.layer}"
