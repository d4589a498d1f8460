"""A real single-node SLURM cluster for the tests (Debian's slurm-wlm, as root, no systemd).

:func:`start_cluster` writes a ``slurm.conf`` into a temp folder (one node named after this
host on 127.0.0.1, free ports, state and logs in the folder, a ``low`` and a preempting
``high`` partition, fast requeue), starts slurmctld and slurmd, waits until the node is idle
and exports ``SLURM_CONF`` (jobs inherit it; in-job ``scontrol requeue`` needs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "scontrol", "sbatch", "squeue", "scancel", "sinfo")


def missing_reason() -> str | None:
    """Why no cluster can start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} missing): apt-get install "
                "slurmctld slurmd slurm-client (.ci/run does)")  # fmt: skip
    if os.geteuid() != 0:
        return "slurmd must run as root here (no cgroups/systemd), and this is not root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    folder: Path
    conf: Path
    cpus: int
    processes: list[subprocess.Popen]

    def run(self, *cmd: str) -> str:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env,
                              timeout=60).stdout  # fmt: skip

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "")

    def stop(self) -> None:
        with suppress(Exception):
            self.run("scancel", "--user", "root")
        deadline = time.time() + 20
        while time.time() < deadline:
            with suppress(Exception):
                if not self.run("squeue", "-h").strip():
                    break
            time.sleep(0.5)
        for p in reversed(self.processes):
            p.send_signal(signal.SIGTERM)
        for p in reversed(self.processes):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["pkill", "-9", "-f", f"slurmstepd.*{self.folder}"], check=False)


def start_cluster(folder: Path) -> Cluster:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 2
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=swintest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=5
MpiDefault=none
MinJobAge=3600
SchedulerParameters=bf_interval=1,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=low Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=high Nodes={host} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")
    os.environ["SLURM_CONF"] = str(conf)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    logs = open(folder / "log" / "daemons.out", "a")  # noqa: SIM115
    ctld = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=logs,
                            stderr=subprocess.STDOUT)  # fmt: skip
    cluster = Cluster(folder, conf, cpus, [ctld])
    try:
        _wait(lambda: "UP" in cluster.run("scontrol", "ping"), "slurmctld to answer", folder)
        cluster.processes.append(subprocess.Popen(
            ["slurmd", "-D", "-f", str(conf)], env=env, stdout=logs, stderr=subprocess.STDOUT
        ))  # fmt: skip
        _wait(lambda: cluster.run("sinfo", "-h", "-N", "-p", "low", "-o", "%t").strip() == "idle",
              "the node to be idle", folder)  # fmt: skip
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(ready, what: str, folder: Path, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            if ready():
                return
        time.sleep(0.2)
    logs = "".join(p.read_text()[-2000:] for p in (folder / "log").glob("*.log"))
    raise RuntimeError(f"SLURM test cluster: timed out waiting for {what}\n{logs}")
