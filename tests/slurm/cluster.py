"""A throw-away one-node slurm cluster for tests: munged, slurmctld and slurmd in the foreground as
children of this process (stopped by PID), every file under one folder, commands pointed at it
through SLURM_CONF. Needs root and Debian's `slurm-wlm` + `munge` (.ci/run installs them).

It runs where cgroups are not available (containers, VMs): processes are tracked by parentage
(proctrack/linuxproc) and tasks are not bound (task/none). Slurm delivers step signals to every
process of the step, as on a real cluster.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from megatron_lcl.runtime.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")

SLURM_CONF = """\
ClusterName=lcltest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/ctld
SlurmdSpoolDir={dir}/slurmd
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait={kill_wait_s}
MinJobAge=3600
SlurmdTimeout=300
{node} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> Optional[str]:
    """Why this machine cannot run the cluster (None when it can)."""
    absent = [d for d in DAEMONS + ("sbatch",) if shutil.which(d) is None]
    if absent:
        return f"slurm not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "a test slurm cluster needs root (slurmd)"
    return None


class Cluster:
    def __init__(self, folder: Path, kill_wait_s: int = 60):
        self.dir = folder
        self.kill_wait_s = kill_wait_s
        self.procs = {}
        self.env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"))

    def start(self, timeout_s: float = 60) -> "Cluster":
        for sub in ("ctld", "slurmd"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        host = node.split()[0].split("=", 1)[1]
        (self.dir / "slurm.conf").write_text(SLURM_CONF.format(
            host=host, node=node, dir=self.dir, ctld_port=free_port(""), slurmd_port=free_port(""),
            kill_wait_s=self.kill_wait_s))
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.dir}/munge.socket",
                               f"--key-file={key}", f"--pid-file={self.dir}/munged.pid",
                               f"--log-file={self.dir}/munged.log", f"--seed-file={self.dir}/munged.seed"])
        self._wait(lambda: (self.dir / "munge.socket").exists(), "munged socket", timeout_s)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(lambda: self.scontrol("ping").returncode == 0, "slurmctld", timeout_s)
        self._spawn("slurmd", ["slurmd", "-D"])
        self._wait(self.node_idle, "an idle node", timeout_s)
        return self

    def stop(self) -> None:
        """Cancel the jobs left, then SIGTERM each daemon by PID (slurmd first), SIGKILL what is left
        after 10 s."""
        if "slurmctld" in self.procs:
            jobs = self.run("squeue", "--noheader", "--format=%i").stdout.split()
            if jobs:
                self.run("scancel", *jobs)
                deadline = time.time() + self.kill_wait_s + 15
                while self.run("squeue", "--noheader").stdout.strip() and time.time() < deadline:
                    time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _spawn(self, name: str, cmd: list) -> None:
        log = open(self.dir / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.dir.glob("*.log")))
                raise RuntimeError(f"test slurm cluster: no {what} (exited: {dead})\n{logs}")
            time.sleep(0.3)

    # ------------------------------------------------------------------------------------- commands
    def run(self, *cmd: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        return subprocess.run(list(cmd), capture_output=True, text=True, check=check, **kwargs)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args)

    def node_idle(self) -> bool:
        return "State=IDLE " in self.scontrol("show", "node", "--oneliner").stdout

    def step_running(self, job_id: int) -> bool:
        """Whether step 0 of the job runs (srun started its tasks)."""
        out = self.run("squeue", "--steps", "--noheader", "--format=%i", f"--jobs={job_id}").stdout.split()
        return f"{job_id}.0" in out

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.scontrol("show", "job", str(job_id), "--oneliner").stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)
