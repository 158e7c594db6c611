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
