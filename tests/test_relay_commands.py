"""The relay's transports as command lines: pure functions, read and checked alone."""

from __future__ import annotations

import shlex

from hpc_kernels.relay import listener_ports, ssh_argv, step_command

AGENT = {"node": "c1.cluster", "slurm_node": "c1", "node_dir": "/tmp/hk-42-ab cd"}


def test_the_srun_transport_is_a_step_of_the_kernels_job_on_its_node() -> None:
    argv = step_command("srun", job_id="42", agent=AGENT, python="/opt/venv/bin/python")
    assert argv[:3] == ["srun", "--jobid=42", "--overlap"]
    assert "--nodelist=c1" in argv and "-u" in argv
    assert argv[-6:] == ["/opt/venv/bin/python", "-I", "-m", "hpc_kernels.relay", "node", "/tmp/hk-42-ab cd"]
    assert "--chdir=/" in argv, "not in the caller's directory, which may be a workspace the kernel writes"


def test_the_ssh_transport_runs_the_same_node_side_through_openssh_without_a_pty() -> None:
    argv = step_command("ssh", job_id="42", agent=AGENT, python="/opt/venv/bin/python",
                        ssh_options=["-o", "ProxyJump=gw"])
    assert argv[:4] == ["ssh", "-T", "-o", "BatchMode=yes"]
    assert argv[4:6] == ["-o", "ProxyJump=gw"], "the site's options before ours: ssh keeps the first value"
    assert "ServerAliveInterval=15" in argv[6:-3]
    # the host name, not Slurm's node name: ssh resolves it like any host
    assert argv[-3:-1] == ["--", "c1.cluster"]
    # one remote command string, quoted for the remote shell (the node dir has a space here)
    assert shlex.split(argv[-1]) == ["/opt/venv/bin/python", "-I", "-m", "hpc_kernels.relay", "node",
                                     "/tmp/hk-42-ab cd"]


def test_an_ssh_command_cannot_be_injected_through_the_remote_arguments() -> None:
    argv = ssh_argv("c1", ["python3", "x; rm -rf ~", "$(id)"])
    assert shlex.split(argv[-1]) == ["python3", "x; rm -rf ~", "$(id)"]


def test_listener_ports_cover_the_range_once_in_some_order() -> None:
    assert listener_ports(None) == [0]
    ports = listener_ports([20000, 20099])
    assert sorted(ports) == list(range(20000, 20100))


def test_srun_and_ssh_get_no_slurm_input_variables_of_the_process_that_started_the_daemon() -> None:
    """A relay daemon started inside `salloc -c 16 --mem 64G` must not hand that shape to the
    steps of every later kernel's relay: srun reads SLURM_* variables as options."""
    from hpc_kernels.relay import step_environment

    env = {"PATH": "/usr/bin", "SLURM_CONF": "/etc/slurm/slurm.conf", "SLURM_CPUS_PER_TASK": "16",
           "SLURM_MEM_PER_NODE": "65536", "SLURM_JOB_ID": "7", "SALLOC_PARTITION": "big", "SBATCH_EXCLUSIVE": "1",
           "SRUN_CPUS_PER_TASK": "16", "LD_PRELOAD": "/lib/x.so"}
    assert step_environment(env, tune_tcp=False) == {
        "PATH": "/usr/bin", "SLURM_CONF": "/etc/slurm/slurm.conf", "LD_PRELOAD": "/lib/x.so"}
