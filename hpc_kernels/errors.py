"""The errors hpc-kernels reports to users. Each carries a message meant to be read as is."""


class HpcKernelsError(Exception):
    """Base class: the CLI prints the message and exits non-zero, without a traceback."""


class ProfileError(HpcKernelsError):
    """A site profile is missing or wrong. The message names the file and the key."""


class SlurmError(HpcKernelsError):
    """Slurm refused or failed a command. The message carries Slurm's own words."""


class KernelStartError(HpcKernelsError):
    """A kernel job ended or failed before its kernel was ready."""


class KernelNotFound(HpcKernelsError):
    """No kernel of that name is recorded for this user."""


class DamagedState(HpcKernelsError):
    """A kernel's state directory exists but its record cannot be read."""

    def __init__(self, message: str, kernel: str) -> None:
        super().__init__(message)
        self.kernel = kernel


class RelayError(HpcKernelsError):
    """The relay between the login node and the compute node could not be started or broke."""


class BatchError(HpcKernelsError):
    """A batch (notebooks, parameter files, a batch name) is wrong or cannot be submitted."""


class KernelGone(HpcKernelsError):
    """The kernel ended (its job ended, it went over a limit, it was shut down) while code ran in
    it. The message says why, as ``hpc-kernel status`` does; ``result`` holds what the code wrote
    before (an :class:`hpc_kernels.api.ExecutionResult`, or None)."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result
