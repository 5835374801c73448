"""Run the exact commands behind a table of the README or BENCHMARKS.md, keep their logs, and print the table.

    python reproduce.py fast                  # --preset fast for seeds 0, 1 and 2
    python reproduce.py cpu                   # --preset cpu on the CPU for seeds 0, 1 and 2
    python reproduce.py default               # the default 100-epoch ResNet18 run
    python reproduce.py speed                 # bench.py's rows
    python reproduce.py fast --runs seed0     # some runs of a table; another command may do the others
    python reproduce.py fast -- --data-dir /data --no-download   # flags added to every run of the table
    python reproduce.py check                 # this machine's torch and GPU, and the GPU tests, in one report

Each run's printed output and metrics.csv go to results/<table>/<run>/, its checkpoints to
runs/<table>/<run>/, and the table, with the device, the torch version and the date, to
results/<table>/table.md as well as the screen. The table holds every run of it in results/,
so a table split over several commands (each with its own --runs) comes out whole. A rerun
keeps the earlier results until it has succeeded, then replaces them. Wall time is the whole
process, start to exit; the first step's is from the spawn to the end of the run's first training step.
"""
import datetime
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cli import STOP_SIGNALS, Parser, Stopped, split_at_dashes
from run_dir import read_metrics

REPO = Path(__file__).resolve().parent


@dataclass
class Run:
    name: str
    command: list  # a script of this repo and its flags


def seeds(flags, count=3):
    return [Run(f"seed{seed}", ["train.py", *flags, "--seed", str(seed)]) for seed in range(count)]


def choices(base, candidates):
    """Runs that choose a recipe: each candidate's flags on top of `base`, judged on the validation split."""
    return [Run(name, ["train.py", *base, *flags]) for name, flags in candidates.items()]


SHORT_ON_VALIDATION = ["--epochs", "30", "--val-size", "5000"]
END_ONLY = ["--eval-every", "24", "--save-every", "24"]  # the fast preset's 24 epochs, judged and saved at the end
TABLES = {
    "default": [Run("seed0", ["train.py"])],
    "fast": seeds(["--preset", "fast"]),
    "cpu": seeds(["--preset", "cpu", "--device", "cpu"]),
    "wrn": [Run("seed0", ["train.py", "--preset", "wrn"])],
    "speed": [Run("resnet18", ["bench.py", "--models", "resnet18", "--batch-sizes", "128,512", "--repeats", "5"]),
              Run("wrn", ["bench.py", "--models", "wideresnet", "--batch-sizes", "512", "--repeats", "3",
                          "--steps", "20"]),
              Run("wrn-compiled", ["bench.py", "--models", "wideresnet", "--batch-sizes", "512", "--repeats", "3",
                                   "--steps", "20", "--compile"]),
              Run("resnet18-policies", ["bench.py", "--models", "resnet18", "--batch-sizes", "128", "--repeats", "3",
                                        "--auto-augment", "ta_wide"]),
              Run("resnet18-sam", ["bench.py", "--models", "resnet18", "--batch-sizes", "128", "--repeats", "3",
                                   "--sam", "0.1"]),
              Run("resnet18-precisions", ["bench.py", "--models", "resnet18", "--batch-sizes", "512", "--repeats",
                                          "3", "--precisions", "bf16,fp16"])],
    # 30-epoch ResNet18 runs on 45,000 images, each against the default recipe: the candidates for an accuracy recipe.
    "r18-choice": choices(SHORT_ON_VALIDATION, {
        "default": [], "ta-wide": ["--auto-augment", "ta_wide"], "ta-wide-cutout16": ["--auto-augment", "ta_wide",
                                                                                      "--cutout", "16"],
        "cutmix": ["--cutmix", "1.0", "--cutmix-prob", "0.5"], "sam0.05": ["--sam", "0.05"], "sam0.1": ["--sam", "0.1"],
        "sam0.2": ["--sam", "0.2"], "ema": ["--ema", "0.999"], "label-smoothing": ["--label-smoothing", "0.1"],
        "batch256": ["--batch-size", "256", "--lr", "0.2"], "batch512": ["--batch-size", "512", "--lr", "0.4"]}),
    # Candidates for a faster --preset fast, judged on 5,000 held-out images; each against the preset as it is.
    "fast-choice": choices(["--preset", "fast", "--val-size", "5000"], {
        "preset": [], "end-only": END_ONLY,
        "ema": ["--ema", "0.999", *END_ONLY],
        "ta-wide": ["--auto-augment", "ta_wide", *END_ONLY],
        "20-epochs": ["--epochs", "20", "--eval-every", "20", "--save-every", "20"],
        "batch1024": ["--batch-size", "1024", "--lr", "0.8", *END_ONLY],
        "compiled": ["--compile", *END_ONLY],
        "bn-bias-lr8": ["--bn-bias-lr-scale", "8", *END_ONLY],
        "alternate-flip": ["--flip", "alternate", *END_ONLY],
        "tta-crops": ["--tta-crops", *END_ONLY]}),
    # The same choices on WRN-16-8, a quarter of WRN-28-10's cost per image.
    "wrn-choice": choices(["--model", "wideresnet", "--depth", "16", "--widen-factor", "8", "--batch-size", "256",
                           "--lr", "0.2", "--nesterov", *SHORT_ON_VALIDATION], {
        "base": [], "ta-wide": ["--auto-augment", "ta_wide"], "ta-wide-cutout16": ["--auto-augment", "ta_wide",
                                                                                   "--cutout", "16"],
        "cutout16": ["--cutout", "16"], "cutmix": ["--cutmix", "1.0", "--cutmix-prob", "0.5"],
        "ema": ["--ema", "0.999"], "label-smoothing": ["--label-smoothing", "0.1"], "sam0.05": ["--sam", "0.05"]}),
    # Candidates for --preset cpu on a 2-core CPU: depth against epochs, each about 1.25 times the 10-minute budget
    # on 50,000 images, then each at the epochs that fit it.
    "cpu-choice": choices(["--model", "wideresnet", "--widen-factor", "1", "--batch-size", "128", "--lr", "0.2",
                           "--nesterov", "--label-smoothing", "0.1", "--flip", "alternate", "--device", "cpu",
                           "--val-size", "5000"], {
        "wrn10-1-18ep": ["--depth", "10", "--epochs", "18"], "wrn16-1-11ep": ["--depth", "16", "--epochs", "11"],
        "wrn10-1-12ep": ["--depth", "10", "--epochs", "12"], "wrn16-1-7ep": ["--depth", "16", "--epochs", "7"]}),
}


CHECK = "check"


class ReproduceError(RuntimeError):
    """A table cannot be run as asked."""


def parse_args(argv=None):
    parser = Parser(__doc__.splitlines()[0] + " Flags after -- are added to every run's command.")
    parser.add_argument("table", choices=[*sorted(TABLES), CHECK])
    parser.add_argument("--runs", help="comma-separated names of the runs to do (default: every run of the table)")
    parser.add_argument("--results", default="results", help="where each run's output and metrics.csv go")
    parser.add_argument("--work", default="runs", help="where each run's checkpoints go")
    own, extra = split_at_dashes(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    args.extra = extra  # flags for the runs: after --, added to every run's command
    if args.table == CHECK:
        if args.runs or extra:
            parser.error("check takes neither --runs nor flags after --")
        return args
    names = [run.name for run in TABLES[args.table]]
    wanted = args.runs.split(",") if args.runs else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(f"table {args.table} has no run {', '.join(unknown)} (it has {', '.join(names)})")
    args.runs = [run for run in TABLES[args.table] if run.name in wanted]
    return args


def is_whole_run(run):
    return run.command[0] == "train.py"


class StopsPassedOn:
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) while a run goes on is passed on to the run, which saves and stops,
    and the table stops after it; between runs it stops the table at once. The run is started in a process group
    of its own, so that a signal to this process's group (Ctrl-C at a terminal) reaches it once, from here, not
    twice (a second stop makes train.py quit without saving)."""

    def __init__(self):
        self.process = None

    def install(self):
        for signum in STOP_SIGNALS:
            if not (signum == signal.SIGHUP and signal.getsignal(signum) is signal.SIG_IGN):  # nohup: outlive it
                signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.process is None or self.process.poll() is not None:
            raise Stopped(signum)
        self.process.send_signal(signum)


STOPS = StopsPassedOn()


def run_and_log(command, log_path):
    """Run `python COMMAND` in the repo, its output shown and written to `log_path`; (exit code, wall seconds)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        STOPS.process = process
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()  # shown as it comes, also through a pipe
                log.write(line)
            code = process.wait()
        finally:
            STOPS.process = None
    return code, time.perf_counter() - started


def whole_run_row(run, folder):
    """A row of the whole-run table from the run's record, printed output and metrics.csv: the final model's top-1
    on the validation split for a run that has one (its test figure stays in its log), else on the test set."""
    record = json.loads((folder / "run.json").read_text())
    command, code = record["command"], record["exit_code"]
    output = (folder / "output.txt").read_text()
    first_step = re.search(r"first step done at Unix time ([\d.]+)", output)
    rows = read_metrics(folder / "metrics.csv") if (folder / "metrics.csv").is_file() else []
    split = "val" if "--val-size" in command else "test"
    top1 = 100 * float(rows[-1][f"{split}_top1"]) if rows and rows[-1].get(f"{split}_top1") else None
    epoch_seconds = [float(row["epoch_seconds"]) for row in rows]
    cells = [run.name, f"`python {' '.join(command)}`", str(len(rows)), f"{record['wall_seconds']:.1f}",
             f"{float(first_step.group(1)) - record['spawned_at']:.1f}" if first_step else "–",
             f"{statistics.median(epoch_seconds):.2f}" if epoch_seconds else "–",
             f"{split} {top1:.2f} %" if top1 is not None else "–"]
    if code != 0:
        cells[-1] = f"failed (exit {code})"
    return "| " + " | ".join(cells) + " |"


WHOLE_RUN_HEADER = ("| run | command | epochs | wall s | first step s | epoch s (median) | top-1 of the final model |\n"
                    "|---|---|---|---|---|---|---|")


def bench_rows(folder):
    """bench.py's own table rows (header once) from its printed output."""
    code = json.loads((folder / "run.json").read_text())["exit_code"]
    lines = [line for line in (folder / "output.txt").read_text().splitlines() if line.startswith("|")]
    return lines if code == 0 else lines + [f"| failed (exit {code}) |"]


def describe_device():
    """The device the runs used and the torch version, asked of a fresh process (this one loads no torch)."""
    probe = ("import platform, torch\n"
             "threads = torch.get_num_threads()\n"
             "name = torch.cuda.get_device_name() if torch.cuda.is_available() else "
             "f'{platform.processor() or platform.machine()} CPU, {threads} thread' + 's' * (threads != 1)\n"
             "print(f'{name}, torch {torch.__version__}')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return result.stdout.strip() or "unknown device"


def reproduce(args):
    results, work = Path(args.results) / args.table, Path(args.work).resolve() / args.table
    taken = [str(work / run.name) for run in args.runs if is_whole_run(run) and (work / run.name).exists()]
    if taken:
        raise ReproduceError(f"{', '.join(taken)} already exist: move them away, or pass another --work folder")
    failed = False
    for run in args.runs:
        failed |= run_into(run, args.extra, results, work) != 0
    lines = table_lines(args.table, results)
    table = "\n".join([f"{args.table}: {describe_device()}, {datetime.date.today().isoformat()}", "", *lines])
    write_whole(results / "table.md", table + "\n")
    print("\n" + table)
    return 1 if failed else 0


# A run's exit codes after a stop signal, handled (128 + the signal) or not (minus it): stopped, not failed.
STOPPED = {code for signum in STOP_SIGNALS for code in (128 + signum, -signum)}


def run_into(run, extra, results, work):
    """One run, its output and record written to a folder of their own, which takes the place of the run's earlier
    results once it has succeeded (a failed rerun goes beside them, as <run>.failed); returns its exit code."""
    partial = results / f".{run.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # only ever what an interrupted call of this program left
    partial.mkdir(parents=True)
    command = [*run.command, *extra]
    print(f"== {results.name}/{run.name}: python {' '.join(command)}", flush=True)
    where = ["--checkpoint-dir", str(work / run.name)] if is_whole_run(run) else []
    spawned_at = time.time()  # the first step's end, which the run prints by the clock, is timed from here
    try:
        code, wall_seconds = run_and_log(command + where, partial / "output.txt")
        if code in STOPPED:  # a stop passed on, or one that reached the run alone
            raise KeyboardInterrupt
    except BaseException:  # a Ctrl-C, even a second one: nothing half-made stays, the earlier results are kept
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if is_whole_run(run) and (work / run.name / "metrics.csv").is_file():
        shutil.copy(work / run.name / "metrics.csv", partial / "metrics.csv")
    (partial / "run.json").write_text(json.dumps({"command": command, "exit_code": code, "wall_seconds": wall_seconds,
                                                  "spawned_at": spawned_at}) + "\n")
    earlier = results / run.name
    if code == 0 or not earlier.exists():
        replace_folder(partial, earlier)
    else:
        replace_folder(partial, results / f"{run.name}.failed")
        print(f"{results.name}/{run.name} failed (exit {code}): its earlier results are kept, this run's output is in "
              f"{results / (run.name + '.failed')}", flush=True)
    return code


def replace_folder(new, old):
    """Put folder `new` where `old` is: the old one is moved aside before, and removed only after."""
    aside = old.with_name(f".{old.name}.replaced")
    shutil.rmtree(aside, ignore_errors=True)
    if old.exists():
        old.rename(aside)
    new.rename(old)
    shutil.rmtree(aside, ignore_errors=True)


def table_lines(table, results):
    """The rows of every run of `table` that has results, in the table's order."""
    done = [run for run in TABLES[table] if (results / run.name / "run.json").is_file()]
    if is_whole_run(TABLES[table][0]):
        return [WHOLE_RUN_HEADER, *(whole_run_row(run, results / run.name) for run in done)]
    lines = []
    for run in done:
        lines += [line for line in bench_rows(results / run.name) if line not in lines]
    return lines


def write_whole(path, text):
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    temporary.replace(path)


def check(args):
    """This machine's torch and GPU, then every case of the GPU tests, in one report file; the exit code is
    pytest's (0 also where no GPU is there and every case was skipped)."""
    device = describe_device()
    folder = Path(args.results) / CHECK
    folder.mkdir(parents=True, exist_ok=True)
    print(f"check: {device}", flush=True)
    output = folder / ".pytest.partial"
    code, seconds = run_and_log(["-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_gpu.py"], output)
    log = output.read_text()
    output.unlink()
    gpu = not re.search(r"^\d+ skipped in ", log.strip().splitlines()[-1] if log.strip() else "")
    verdict = ("the GPU tests " + ("passed" if code == 0 else f"failed (pytest exit {code})") if gpu else
               "no CUDA GPU here (or CI is set): every GPU test was skipped")
    report = folder / "report.md"
    write_whole(report, f"check: {device}, {datetime.date.today().isoformat()}\n\n{verdict}, {seconds:.0f} s\n\n"
                        f"    python -m pytest -q -rA tests/test_gpu.py\n\n" + "".join(f"    {line}\n" for line in
                                                                                  log.splitlines()))
    print(f"\n{verdict}; the report is {report}")
    return code


def main(argv=None):
    args = parse_args(argv)
    STOPS.install()
    try:
        return check(args) if args.table == CHECK else reproduce(args)
    except ReproduceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the earlier results are kept as they were", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
