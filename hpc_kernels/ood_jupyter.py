"""JupyterLab's pieces for Open OnDemand sessions (configured by hpc_kernels.ood.jupyter_config).

* :class:`LoginHandler`: OnDemand's session card posts the generated password to
  ``/node/<host>/<port>/login`` from the dashboard's own page, which cannot carry the ``_xsrf``
  cookie JupyterLab sets on its pages. This handler accepts that one form without the check;
  every other request keeps it, and the password is still checked. (A forged login could only
  log a browser in with a password the forger already knows.)
* :class:`SandboxedKernelSpecManager`: ``allowed_kernelspecs`` only filters what is listed;
  this manager also refuses to hand out any other kernelspec, so no request can start the
  node's own, unsandboxed Python.
"""

from __future__ import annotations

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_server.auth.login import LoginFormHandler


class LoginHandler(LoginFormHandler):  # type: ignore[misc]
    def check_xsrf_cookie(self) -> None:
        return None


class SandboxedKernelSpecManager(KernelSpecManager):  # type: ignore[misc]
    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if self.allowed_kernelspecs and kernel_name not in self.allowed_kernelspecs:
            raise NoSuchKernel(kernel_name)
        return super().get_kernel_spec(kernel_name)
