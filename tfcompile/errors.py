"""User-facing errors.

Every error a user can cause (bad file, unknown target, shapes that do not fit)
is raised as a ``TfcompileError`` subclass with a one-line message; the CLI
prints that line and exits non-zero without a traceback.
"""


# Seeds go to torch.Generator.manual_seed; one range for the CLI and the library.
MAX_SEED = 2**63 - 1


class TfcompileError(Exception):
    """An error caused by the user's input, reported as one line."""


class InvalidOptionError(TfcompileError):
    """An option's value is out of range or of the wrong kind."""


class ModelLoadError(TfcompileError):
    """The model file or name could not be read or understood."""


class UntrustedPickleError(ModelLoadError):
    """The file is a full pickle and the user did not opt in to unpickling."""


class TraceError(TfcompileError):
    """The model loaded but torch.export could not trace it."""


class LoadTimeoutError(TfcompileError):
    """Loading or tracing the model took longer than --timeout."""


class ShapeError(TfcompileError):
    """The requested input shapes do not fit the model."""


class UnknownTargetError(TfcompileError):
    """No device spec with that name."""


class DeviceSpecError(TfcompileError):
    """A device file is missing a field or has one of the wrong type."""


class UnknownPassError(TfcompileError):
    """No registered pass with that name."""


class BackendError(TfcompileError):
    """A backend (ONNX export, ONNX Runtime, TVM) failed on a variant."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none, or if its message
    cannot be made: a user's exception class may raise from ``__str__``)."""
    try:
        text = str(exc).strip()
    except Exception:  # noqa: BLE001 - whatever the user's __str__ raises, the error is still reported
        return type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
