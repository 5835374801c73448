"""How this process was started: alone, by torchrun, or by SLURM. It reads the environment alone (no torch), so
train.py can ask before torch loads: which rank this is, whether a launcher started this command again after a
failure, what identifies the launch, and the launcher's part of the command that resumes the run."""
import os
import socket


class LaunchError(RuntimeError):
    """A launch that cannot make one run, such as several SLURM tasks of train.py without torchrun."""


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_distributed():
    return world_size() > 1


def is_first_on_its_node():
    """Local rank 0: the one process of a node that speaks for what every process there sees alike (its data)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def check_launch():
    """srun with several tasks starts that many separate runs of train.py, which would fight over one folder."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks > 1 and not is_distributed():
        raise LaunchError(f"SLURM started {tasks} tasks of train.py, which would be {tasks} separate runs: start one "
                          f"task per node that runs torchrun (srun torchrun ... train.py)")


def relaunched_by():
    """"torchrun" when torchrun started this group again after a process failed (--max-restarts), "slurm" when
    SLURM requeued the job; None for a command's first start."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return "torchrun"
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        return "slurm"
    return None


def next_restart():
    """"restart 1 of 3" when torchrun will start the group again after a failure (--max-restarts); else None."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    done = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return f"restart {done + 1} of {restarts}" if done < restarts else None


def launch_record():
    """What identifies this launch, kept in each checkpoint, so that a relaunch goes on only from the checkpoints
    its own launch wrote: for torchrun its run id, rank 0's host and launcher process (the same through its
    restarts); for SLURM the job id (the same through requeues). Empty for a plain `python train.py`."""
    record = {}
    if "TORCHELASTIC_RUN_ID" in os.environ:
        record["torchrun"] = (f"run {os.environ['TORCHELASTIC_RUN_ID']} on {socket.gethostname()}, "
                              f"launcher {os.getppid()}")
    if "SLURM_JOB_ID" in os.environ:
        record["slurm"] = f"job {os.environ['SLURM_JOB_ID']}"
    return record


def launcher_words():
    """The command words that start train.py as this process was started: python, or torchrun for as many
    processes (several nodes' rendezvous is the user's to repeat)."""
    if not is_distributed():
        return ["python", "train.py"]
    processes = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    if processes == os.environ["WORLD_SIZE"]:
        return ["torchrun", "--standalone", f"--nproc_per_node={processes}", "train.py"]
    return ["torchrun", f"--nnodes={world_size() // int(processes)}", f"--nproc_per_node={processes}", "...",
            "train.py"]
