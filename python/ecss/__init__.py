"""ECSS from Python: an offload runtime for training Mixture-of-Experts models.

The session keeps every expert's weights and optimizer state in host memory or on NVMe,
streams to the device only the experts a step's tokens are routed to, and updates them on the
CPU while the device computes. Its step: ``begin_step`` with every micro-batch's token and
domain ids, ``forward`` / ``backward`` per micro-batch and sparse layer, ``end_step``.
``ecss.torch`` wraps it as a PyTorch module (``RREMoE``).

Errors raise ``ecss.Error`` subclasses named by status code (``ecss.InvalidArgument``,
``ecss.FailedPrecondition``, ...), each with ``code`` and ``message``.
"""

from ecss._ecss import (  # noqa: F401  (the public surface)
    Aborted,
    AlreadyExists,
    Budgets,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    Device,
    DomainSpec,
    Error,
    FailedPrecondition,
    HyperParams,
    Internal,
    InvalidArgument,
    MemoryPlan,
    ModelSpec,
    NotFound,
    OptimizerOptions,
    OutOfRange,
    PermissionDenied,
    Placement,
    ResourceExhausted,
    RreTables,
    Session,
    SessionOptions,
    StepLimits,
    StepStats,
    Unavailable,
    Unimplemented,
    Unknown,
    checkpoint_model,
    plan,
    plan_presets,
)

__all__ = [name for name in dir() if not name.startswith("_")]
