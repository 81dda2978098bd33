"""Run an experiment: one or more Hydra multirun sweeps into one sweep directory, then its report.

An experiment file (``experiments/<name>.py``) lists its grids; a grid is a dict of override
-> comma-separated values (Hydra sweep syntax). Several grids let the learning-rate grid depend on
the batch size. Every grid runs as

    python -m bnp.train -m experiment=<name> name=<name> launcher=<launcher> <key=values ...>

so a rerun skips finished runs and resumes interrupted ones. ``smoke=True`` swaps in the
experiment's smoke grids (offline data, a handful of steps) and writes to ``<name>_smoke``.

Then every learning rate is bracketed: a setting (data, model, norm, batch size, optimizer) whose
best mean validation accuracy sits at an edge of the lrs tried gets one more lr beyond that edge
(the grid's next 1-3-10 value, or its own ratio), with the same seeds, until the best is interior,
the lr beyond it diverged, or ``--bracket-cap`` extensions were made on that side. The extensions
are recorded in ``<sweep dir>/bracket.json`` when they finish, so an interrupted run resumes them;
the report labels each choice (``lr_bracket``: interior, diverged-beyond, capped, edge, single).
``python -m bnp.sweep SWEEP_DIR`` brackets a sweep that was run without an experiment file.

``--confirm-seeds 0,1,2`` then runs, at each setting's chosen lr, the seeds it lacks: bracket with
one seed, confirm the winner with three (the report chooses among lrs on the seeds they share, so
the extra seeds do not move the choice; a setting whose lrs share no seed is left out).
``--all-seeds 0,1,2`` instead runs the missing seeds at every lr a setting tried and brackets again,
so each lr is chosen over all seeds with a tried lr on each side (a one-seed screen, then the
full comparison).

The finished runs are kept in ``RESULTS/sweep.tar.gz`` (bnp.archive), saved whenever a run finishes
and with each report; ``--restore`` unpacks it first, so a sweep begun on one machine and committed
is finished on another.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bnp.archive import finished_runs, read, restore, save
from bnp.provenance import relative
from bnp.choice import choices, lr_bracket, next_lr, read_extensions, seeds_shared, setting_key, write_extensions
from bnp.report import report
from bnp.runs import LEGACY_NORMS, SETTING, find_runs, load_runs

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = "sweep.tar.gz"  # the finished runs, beside the report (bnp.archive)
# a run's overrides that a new multirun sets itself; ``sweeper``: the new runs are a grid, not an Optuna study
NOT_REPEATED = ("optim.lr", "train.seed", "sweeper")
# how a run executes, not what it trains (none names a run's directory): the driver's bracketing and
# seeding multiruns take these from its own invocation, not from the earlier runs they repeat
EXECUTION = ("launcher", "hydra.launcher.n_jobs", "train.threads", "train.device")


def _executes(override: str) -> bool:
    """Whether an override sets (or with ~ deletes) one of the EXECUTION keys, with Hydra's prefixes."""
    return override.split("=", 1)[0].lstrip("+~") in EXECUTION


def commands(name: str, sweep_name: str, grids: list[dict[str, str]], fixed: list[str], launcher: str,
             out_root: str) -> list[list[str]]:
    """One multirun per grid. An override of a grid key (e.g. ``norm=none,bnp``) replaces that
    key's values in every grid instead of being passed twice; grids without that key get it as
    they get any other override."""
    replaced = dict(o.split("=", 1) for o in fixed if "=" in o and any(o.split("=", 1)[0] in g for g in grids))
    fixed = [o for o in fixed if o.split("=", 1)[0] not in replaced]
    return [
        [sys.executable, "-m", "bnp.train", "-m", f"experiment={name}", f"name={sweep_name}", f"launcher={launcher}",
         f"out_root={out_root}", *fixed, *(f"{k}={v}" for k, v in replaced.items() if k not in grid),
         *(f"{k}={replaced.get(k, v)}" for k, v in grid.items())]
        for grid in grids
    ]


def current_names(overrides: list[str]) -> list[str]:
    """An earlier run's overrides in today's names, to repeat it at another lr or seed: a norm
    variant that is now a norm plus gradient rules (runs.LEGACY_NORMS) becomes ``norm=... grad=...``."""
    out = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "norm" and value in LEGACY_NORMS:
            norm, *rules = LEGACY_NORMS[value].split("+")
            out += [f"norm={norm}", f"grad={rules[0]}" if len(rules) == 1 else f"grad=[{','.join(rules)}]"]
        else:
            out.append(override)
    return out


def plan_extensions(runs, extensions: dict, cap: int) -> list[tuple[str, str, list[str]]]:
    """(setting key, side, the multirun's overrides) for every setting whose chosen lr sits at an
    edge of the lrs tried that may still be extended."""
    plans = []
    for chosen, group, tried in choices(runs):
        key = setting_key(chosen[SETTING])
        record = {"low": 0, "high": 0, **extensions.get(key, {}), "cap": cap}
        if lr_bracket(group, chosen["lr"], chosen["hparams"], record) != "edge":
            continue
        lrs = sorted(tried["lr"].unique())
        up = chosen["lr"] == lrs[-1]
        template = current_names(shlex.split(tried["overrides"].iloc[0]))
        if not template:  # a run without Hydra's record of its overrides cannot be repeated
            continue
        kept = [o for o in template if o.split("=", 1)[0] not in NOT_REPEATED]
        # the seeds every lr ran with: after --confirm-seeds, an extension is screened on one seed again
        seeds = ",".join(str(s) for s in sorted(seeds_shared(tried) or set(tried["seed"])))
        plans.append((key, "high" if up else "low", [*kept, f"optim.lr={next_lr(lrs, up):g}", f"train.seed={seeds}"]))
    return plans


def plan_confirmations(runs, seeds: list[int], every_lr: bool = False) -> list[tuple[str, list[str]]]:
    """(setting key, the multirun's overrides) for every setting whose chosen lr has not run with
    every one of ``seeds`` (a failed run counts as not run). A setting whose lrs share no seed is
    left out with a warning: there the new seeds could move the choice. ``every_lr``: every lr the
    setting tried gets the missing seeds (one multirun per lr), so that the lr is then chosen over
    all of them (the report chooses on the seeds all lrs share)."""
    plans = []
    for chosen, _, tried in choices(runs):
        key = setting_key(chosen[SETTING])
        if not every_lr and not seeds_shared(tried):
            print(f"[confirm] warning: {key}: its lrs share no seed; run one seed at every lr first",
                  file=sys.stderr, flush=True)
            continue
        for lr in sorted(tried["lr"].unique()) if every_lr else [chosen["lr"]]:
            at_lr = tried[tried["lr"] == lr]
            missing = [seed for seed in seeds if seed not in set(at_lr["seed"])]
            template = current_names(shlex.split(at_lr["overrides"].iloc[0]))
            if not missing or not template:
                continue
            # the lr exactly as the runs were given it (their directory names spell it so)
            spelled = next((o for o in template if o.startswith("optim.lr=")), f"optim.lr={lr!r}")
            kept = [o for o in template if o.split("=", 1)[0] not in NOT_REPEATED]
            plans.append((key, [*kept, spelled, f"train.seed={','.join(str(s) for s in missing)}"]))
    return plans


def parse_seeds(text: str) -> list[int]:
    """``--confirm-seeds`` 0,1,2 -> [0, 1, 2]; anything else is a clear error."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, e.g. 0,1,2; got {text!r}")
    return seeds


def _at_once(multiruns: list[list[str]], parallel: int | None) -> int:
    """How many of these multiruns (each ending in ``train.seed=...``) run side by side: ``parallel``,
    or as many as leave each seed a CPU."""
    seeds = max((len(run[-1].split("=", 1)[1].split(",")) for run in multiruns), default=1)
    return parallel or max(1, (os.cpu_count() or 1) // seeds)


def _launch(multiruns: list[list[str]], tick=None) -> list:
    """Run these multiruns side by side and wait for all; returns the commands that failed."""
    procs = [subprocess.Popen([sys.executable, "-m", "bnp.train", "-m", *run], cwd=ROOT) for run in multiruns]
    return [p.args for p, code in zip(procs, wait(procs, tick)) if code != 0]


def wait(procs: list[subprocess.Popen], tick=None, every: float = 30.0) -> list[int]:
    """Wait for every process and return their exit codes; ``tick()`` runs every ``every`` seconds
    meanwhile (the experiment driver saves its sweep archive then)."""
    for proc in procs:
        while True:
            try:
                proc.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                if tick is not None:
                    tick()
    return [proc.returncode for proc in procs]


class ArchiveKeeper:
    """Saves a sweep's finished runs to an archive (bnp.archive) whenever more have finished, so a
    stop at any moment loses at most the runs in flight, and the archive can be committed."""

    def __init__(self, sweep_dir: Path, archive: Path):
        self.sweep_dir, self.archive, self.saved = Path(sweep_dir), Path(archive), None

    def __call__(self, final: bool = False) -> None:
        if not self.sweep_dir.is_dir():
            return
        try:
            done = {str(run) for run in finished_runs(self.sweep_dir)}
            if final or done != self.saved:
                save(self.sweep_dir, self.archive)
                self.saved = done
        except (SystemExit, OSError, ValueError) as err:
            if final:
                raise
            # the sweep goes on (its runs are in the sweep directory); the next tick tries again
            print(f"[experiment] warning: could not save {self.archive}: {err}", file=sys.stderr, flush=True)


def bracket(sweep_dir: Path, cap: int, label: str = "", parallel: int | None = None, tick=None,
            execution: list[str] = ()) -> dict:
    """Extend edge learning rates until each choice is bracketed (see the module doc); returns the
    record of extensions, also kept in ``<sweep dir>/bracket.json``. The extensions of one round run
    side by side, as many at once as leave each seed a CPU (``parallel`` overrides); ``tick`` as in
    ``wait``; ``execution``: overrides of EXECUTION keys that replace the repeated runs' own."""
    extensions = read_extensions(sweep_dir)
    while True:
        runs, _ = load_runs(sweep_dir)
        plans = plan_extensions(runs, extensions, cap)
        if not plans:
            return extensions
        at_once = _at_once([overrides for _, _, overrides in plans], parallel)
        for start in range(0, len(plans), at_once):
            batch = plans[start : start + at_once]
            for i, (key, side, overrides) in enumerate(batch, start + 1):
                print(f"[experiment {label}] bracketing {i}/{len(plans)}: {key} at its {side} edge -> "
                      f"{overrides[-2]}", flush=True)
            failed = _launch([_into(sweep_dir, overrides, execution) for _, _, overrides in batch], tick)
            for key, side, _ in batch:  # recorded once finished: an interrupted round is planned again
                entry = extensions.setdefault(key, {"low": 0, "high": 0})
                entry[side] += 1
                entry["cap"] = cap
            write_extensions(sweep_dir, extensions)
            if failed:
                raise subprocess.CalledProcessError(1, failed[0])


def confirm(sweep_dir: Path, seeds: list[int], label: str = "", parallel: int | None = None, tick=None,
            every_lr: bool = False, execution: list[str] = ()) -> int:
    """Run ``seeds`` at each setting's chosen lr where it lacks some (``plan_confirmations``; with
    ``every_lr`` at every lr it tried); returns how many multiruns ran. Side by side and with
    ``execution`` as in ``bracket``."""
    runs, _ = load_runs(sweep_dir)
    plans = plan_confirmations(runs, seeds, every_lr)
    at_once = _at_once([overrides for _, overrides in plans], parallel)
    what = "seeding every lr" if every_lr else "confirming"
    for start in range(0, len(plans), at_once):
        batch = plans[start : start + at_once]
        for i, (key, overrides) in enumerate(batch, start + 1):
            print(f"[experiment {label}] {what} {i}/{len(plans)}: {key} at {overrides[-2]}: {overrides[-1]}",
                  flush=True)
        failed = _launch([_into(sweep_dir, overrides, execution) for _, overrides in batch], tick)
        if failed:
            raise subprocess.CalledProcessError(1, failed[0])
    return len(plans)


def _into(sweep_dir: Path, overrides: list[str], execution: list[str] = ()) -> list[str]:
    """``overrides`` with the runs going into ``sweep_dir``: a setting's earlier runs may come from a
    sweep of another name (merged from its archive), and their ``name=`` must not send new runs there;
    ``execution`` (EXECUTION keys) replaces how the earlier runs executed."""
    out_root = Path(sweep_dir).parent.parent
    if out_root.is_relative_to(ROOT):
        out_root = out_root.relative_to(ROOT)
    if execution:  # every earlier execution key goes, also one this invocation leaves at its default
        overrides = [o for o in overrides if not _executes(o)] + list(execution)
    return _merged(overrides, [f"name={Path(sweep_dir).name}", f"out_root={out_root}"])


# the smoke profile every experiment shares: offline data, a handful of steps, no W&B
SMOKE = ["data=digits", "train.steps=6", "train.eval_every=3", "train.log_every=3", "logger=none"]


def _merged(base: list[str], extra: list[str]) -> list[str]:
    """``base`` overrides with those of ``extra`` replacing the ones of the same key, then the rest."""
    keys = {o.split("=", 1)[0] for o in extra}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(extra)


def run_experiment(name: str, grids: list[dict[str, str]], *, fixed: list[str] = (), smoke_grids=None,
                   smoke_fixed: list[str] = (), target: float = 0.9, argv: list[str] | None = None,
                   experiment: str | None = None, settings: dict[str, list[str]] | None = None) -> Path:
    """``name``: the experiment file's name, which names its sweep and results; ``experiment``: the
    configs/experiment/ config its runs use, if not the one of the same name (a variant of another
    experiment's setting); ``smoke_fixed``: what the experiment changes of the shared SMOKE profile
    (e.g. a smaller model); ``settings``: {results setting: its arguments}, run by ``--setting NAME``
    (or ``python -m bnp.setting NAME``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = settings or {}
    if "--setting" in argv:  # a declared setting: its arguments, then --name, then what was given
        i = argv.index("--setting")
        if i + 1 >= len(argv) or argv[i + 1] not in settings:
            given = argv[i + 1] if i + 1 < len(argv) else "(nothing)"
            sys.exit(f"error: --setting {given}: experiment {name} declares {sorted(settings) or 'no settings'}")
        setting = argv[i + 1]
        argv = [*settings[setting], "--name", setting, *argv[:i], *argv[i + 2:]]
    parser = argparse.ArgumentParser(description=f"experiment {name}: sweep + report")
    parser.add_argument("--setting", metavar="NAME", help=f"a results setting this experiment declares: "
                        f"{', '.join(sorted(settings)) or 'none'} (its arguments, and --name NAME)")
    parser.add_argument("--smoke", action="store_true", help="tiny offline variant (about a minute on CPU)")
    parser.add_argument("--launcher", default=None, help="basic | local (default: local, smoke: basic)")
    parser.add_argument("--out-root", default="outputs", help="sweeps go to OUT_ROOT/sweeps/NAME")
    parser.add_argument("--results", default=None, help="report directory (default: results/NAME)")
    parser.add_argument("--report-only", action="store_true", help="skip the sweep, redo the report")
    parser.add_argument("--restore", action="store_true", help=f"first unpack RESULTS/{ARCHIVE} (the committed "
                        "finished runs) into the sweep directory, so the sweep finishes what another machine began")
    parser.add_argument("--suffix", default="", help="variant name, e.g. mnist: sweep NAME_mnist")
    parser.add_argument("--name", default=None, help="the sweep's and results' name outright (a setting's "
                        "directory, e.g. resnet20-b128-2ep: sweep outputs/sweeps/NAME, report results/NAME)")
    parser.add_argument("--grids", default=None, help="run only these of the experiment's grids, e.g. 1 or 1,3 "
                        "(1-based, in the file's order)")
    parser.add_argument("--bracket-cap", type=int, default=None,
                        help="lr extensions per edge of a setting's grid (default 3, smoke 1; 0: none)")
    parser.add_argument("--confirm-seeds", type=parse_seeds, default=None, metavar="SEEDS",
                        help="after bracketing, run these seeds (e.g. 0,1,2) at each setting's chosen lr")
    parser.add_argument("--all-seeds", type=parse_seeds, default=None, metavar="SEEDS",
                        help="after bracketing, run these seeds (e.g. 0,1,2) at every lr each setting tried, "
                        "then bracket again: each lr is chosen over all of them")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. data=mnist; "
                        "one of a grid's keys replaces its values, e.g. norm=none,bnp")
    args = parser.parse_intermixed_args(argv)  # a setting's overrides, then the user's options and overrides
    sweep_name = (args.name or name + (f"_{args.suffix}" if args.suffix else "")) + ("_smoke" if args.smoke else "")
    launcher = args.launcher or ("basic" if args.smoke else "local")
    if args.smoke:
        grids, fixed = smoke_grids, _merged(_merged(list(fixed), SMOKE), list(smoke_fixed))
    if args.grids and not args.smoke:  # a smoke variant runs its own (few) grids, whatever the setting picks
        picked = [int(i) for i in args.grids.split(",")]
        if not all(1 <= i <= len(grids) for i in picked):
            parser.error(f"--grids {args.grids}: this experiment has grids 1..{len(grids)}")
        grids = [grids[i - 1] for i in picked]
    cmds = commands(experiment or name, sweep_name, grids, [*fixed, *args.overrides], launcher, args.out_root)
    sweep_dir = ROOT / args.out_root / "sweeps" / sweep_name  # where the runs go: they run in ROOT
    results = Path(args.results or (ROOT / "results" / sweep_name))
    archive = results / ARCHIVE
    if archive.exists():
        read(archive)  # a damaged archive stops here, with its name, before any run starts
    keep = ArchiveKeeper(sweep_dir, archive)
    if args.restore:
        if not archive.is_file():
            parser.error(f"--restore: no archive at {archive} (it is written with each report)")
        written, kept = restore(archive, sweep_dir)
        print(f"[experiment {sweep_name}] restored {archive}: {written} runs written, {kept} kept", flush=True)
    # the follow-up multiruns execute as this invocation does (its launcher runs a multirun's seeds side by side)
    execution = [f"launcher={launcher}", *filter(_executes, args.overrides)]
    started = time.time()
    try:
        if not args.report_only:
            for i, cmd in enumerate(cmds, 1):
                print(f"[experiment {sweep_name}] sweep {i}/{len(cmds)}: {shlex.join(cmd[1:])}", flush=True)
                code = wait([subprocess.Popen(cmd, cwd=ROOT)], keep)[0]
                if code != 0:
                    raise subprocess.CalledProcessError(code, cmd)
            cap = args.bracket_cap if args.bracket_cap is not None else (1 if args.smoke else 3)
            if cap > 0:
                bracket(sweep_dir, cap, sweep_name, tick=keep, execution=execution)
            if args.all_seeds:  # every lr on every seed; extensions after it run on all of them
                confirm(sweep_dir, args.all_seeds, sweep_name, tick=keep, every_lr=True, execution=execution)
                if cap > 0:
                    bracket(sweep_dir, cap, sweep_name, tick=keep, execution=execution)
            if args.confirm_seeds:
                confirm(sweep_dir, args.confirm_seeds, sweep_name, tick=keep, execution=execution)
        report(sweep_dir, results, target, argv=[str(sweep_dir), "--out", str(results), "--target", str(target)])
    finally:  # also on an error or Ctrl-C: every run finished by then is kept
        keep(final=True)
    with open(results / "PROVENANCE.md", "a") as f:
        ran = "report only" if args.report_only else f"{len(cmds)} sweeps: {'; '.join(shlex.join(c[4:]) for c in cmds)}"
        given = shlex.join(argv if argv is not None else sys.argv[1:])
        f.write(relative(f"- experiment: `python experiments/{name}.py {given}` ({ran})") + "\n")
        if not args.report_only:
            f.write(f"- wall time of this invocation: {time.time() - started:.0f} s\n")
    print(f"[experiment {sweep_name}] report in {results}")
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m bnp.sweep SWEEP_DIR``: bracket the learning rates of any finished sweep (one run
    with plain ``python -m bnp.train -m``), as the experiment files do after their grids."""
    parser = argparse.ArgumentParser(prog="python -m bnp.sweep", description=main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/sweeps/quickstart")
    parser.add_argument("--cap", type=int, default=3, help="lr extensions per edge of a setting (default 3)")
    parser.add_argument("--parallel", type=int, default=None, help="extensions run at once (default: CPUs / seeds)")
    parser.add_argument("--confirm-seeds", type=parse_seeds, default=None, metavar="SEEDS",
                        help="then run these seeds (e.g. 0,1,2) at each setting's chosen lr")
    parser.add_argument("--all-seeds", type=parse_seeds, default=None, metavar="SEEDS",
                        help="then run these seeds at every lr each setting tried, and bracket again")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep_dir: {args.sweep_dir} is not a directory (expected a sweep, e.g. outputs/sweeps/NAME)")
    if args.cap < 1:
        parser.error(f"--cap: expected an integer >= 1, got {args.cap}")
    if args.parallel is not None and args.parallel < 1:
        parser.error(f"--parallel: expected an integer >= 1, got {args.parallel}")
    if not find_runs(args.sweep_dir):
        parser.error(f"sweep_dir: no runs under {args.sweep_dir} (expected the directory a multirun wrote)")
    extensions = bracket(args.sweep_dir, args.cap, args.sweep_dir.name, args.parallel)
    made = sum(e["low"] + e["high"] for e in extensions.values())
    print(f"[bracket {args.sweep_dir.name}] done: {made} lr extensions (per setting: {args.sweep_dir / 'bracket.json'})")
    if args.all_seeds:
        seeded = confirm(args.sweep_dir, args.all_seeds, args.sweep_dir.name, args.parallel, every_lr=True)
        bracket(args.sweep_dir, args.cap, args.sweep_dir.name, args.parallel)
        print(f"[bracket {args.sweep_dir.name}] {seeded} lrs given seeds {args.all_seeds}, then bracketed again")
    if args.confirm_seeds:
        confirmed = confirm(args.sweep_dir, args.confirm_seeds, args.sweep_dir.name, args.parallel)
        print(f"[bracket {args.sweep_dir.name}] confirmed: {confirmed} settings given seeds {args.confirm_seeds}")


if __name__ == "__main__":
    main()
