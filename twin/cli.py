"""The `twin` command: run, validate, hindcast, train, plot, export.

Exit codes: 0 ok, 2 user error (one line on stderr, no traceback), 1 internal error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from twin.config import ConfigError
from twin.domain import mpi_world
from twin.io import DatasetError, RestartError
from twin.twin import CheckpointError
from assim.obsfiles import ObservationFileError
from emulators.diffusion.checkpoint import CheckpointMismatch
from twin.export import ExportError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DatasetError, RestartError, CheckpointError,
                                                ObservationFileError, CheckpointMismatch, FileNotFoundError,
                                                ExportError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors are user errors: exit 2, one line
        raise SystemExit(_fail(f"twin: {message}"))


def _fail(line: str) -> int:
    print(f"error: {line}", file=sys.stderr)
    return 2


def _cmd_run(args: argparse.Namespace) -> int:
    from twin.runner import run_case, summary_table

    summary = run_case(args.case, tuple(args.set), args.out, args.overwrite, args.quiet, args.resume)
    if _is_root():
        print(summary_table(summary))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from twin.config import load_case, read_yaml

    raw = read_yaml(args.case)
    if isinstance(raw, dict) and "base" in raw and "model" not in raw:  # a hindcast campaign
        from twin.campaign import load_campaign

        campaign = load_campaign(args.case)
        base = Path(args.case).parent / campaign.base
        load_case(base, campaign.overrides)
        print(f"{args.case}: ok (campaign {campaign.name} on {base})")
        return 0
    if isinstance(raw, dict) and "train" in raw and "model" not in raw:  # an emulator training case
        from twin.train import load_train_case

        load_train_case(args.case, tuple(args.set))
        print(f"{args.case}: ok (training case)")
        return 0
    case = load_case(args.case, tuple(args.set))
    print(f"{args.case}: ok ({case.name}: {case.model.kind}, {case.method}, {case.run.cycles} cycles)")
    return 0


def _cmd_hindcast(args: argparse.Namespace) -> int:
    from twin.campaign import run_campaign

    summary = run_campaign(args.campaign, args.out, args.quiet)
    if summary:
        rmse = summary["mean_over_init"]["rmse_forecast"]
        print(f"{summary['campaign']}: {len(summary['init_time'])} forecasts, mean RMSE at lead 0 "
              f"{rmse[0]:.3f}, at lead {summary['lead_time'][-1]:g} {rmse[-1]:.3f}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from twin.train import train_from_case

    checkpoint = train_from_case(args.case, tuple(args.set), args.out, resume=not args.restart, quiet=args.quiet)
    print(checkpoint)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from twin.plots import plot_run

    folder = Path(args.dir)
    if not (folder / "analysis.nc").is_file():
        raise FileNotFoundError(f"{folder}: no analysis.nc (is this a twin run folder?)")
    for p in plot_run(folder):
        print(p)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from twin.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, what=args.what, sampler=args.sampler, dtype=args.dtype,
                            steps=args.steps, churn=args.churn)
    print(f"{out} (metadata: {out.name}.json)")
    return 0


def _is_root() -> bool:
    world = mpi_world()
    return world is None or world.Get_rank() == 0


def _command(sub: argparse._SubParsersAction, name: str, help: str, func, arg: str, arg_help: str, *,
             sets: bool = False, out: str | None = None, quiet: bool = False) -> argparse.ArgumentParser:
    """One subcommand with the options the commands share (--set, --out, --quiet)."""
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument(arg, help=arg_help)
    if sets:
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (dotted path)")
    if out:
        cmd.add_argument("--out", help=f"output folder (wins over {out})")
    if quiet:
        cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=func)
    return cmd


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="twin", description="EarthTwin: Earth-system digital twins.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = _command(sub, "run", "run a case file", _cmd_run, "case", "case YAML file", sets=True, out="run.out",
                   quiet=True)
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    _command(sub, "validate", "check a case, campaign or training file", _cmd_validate, "case", "YAML file",
             sets=True)
    _command(sub, "hindcast", "run a hindcast campaign (alone or under mpiexec)", _cmd_hindcast, "campaign",
             "campaign YAML file", out="the campaign's out", quiet=True)
    train = _command(sub, "train", "train the emulator a training case describes", _cmd_train, "case",
                     "training case YAML file (e.g. cases/sqg_train.yaml)", sets=True, out="the case's out",
                     quiet=True)
    train.add_argument("--restart", action="store_true", help="ignore OUT/train_state.pt and start afresh")
    _command(sub, "plot", "(re)draw the figures of a run folder", _cmd_plot, "dir", "run folder")
    exp = _command(sub, "export", "write a diffusion checkpoint as TorchScript for Fortran hosts (FTorch)",
                   _cmd_export, "checkpoint", "checkpoint file (a bare name is also looked up in emulators/weights/)")
    exp.add_argument("--out", default="model.pt", help="TorchScript file to write (metadata: OUT.json beside it)")
    exp.add_argument("--what", choices=("step", "denoiser", "consistency"), default="step",
                     help="step: (state, noise) -> next state in physical units; denoiser: EDM D(x, sigma, cond); "
                          "consistency: the single-step sampler's f(x, sigma, cond)")
    exp.add_argument("--sampler", choices=("heun", "single_step"), default="heun",
                     help="the step module's sampler: heun (2 steps - 1 network calls) or single_step (one call; "
                          "needs a checkpoint with a single-step network)")
    exp.add_argument("--steps", type=int, help="Heun sampler steps of the step module (default 18)")
    exp.add_argument("--churn", type=float, help="S_churn of the step module's Heun sampler (default 0)")
    exp.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="tensor dtype")
    return p


def _abort_on_failure(code: int, message: str | None, user_error: bool) -> int:
    """Under MPI a failure on one rank must end every rank promptly: print once, then Abort.

    A user error happens alike on every rank, so rank 0 reports it and aborts the job; another rank
    waits for that (a loaded machine may take seconds) and reports it itself only if rank 0 did not
    abort within 10 s. Any other failure is reported by the rank that met it, with its rank number.
    """
    world = mpi_world()
    if world is None:
        if message is not None:
            _fail(message)
        return code
    import time

    rank = world.Get_rank()
    if user_error and rank != 0:
        time.sleep(10.0)  # rank 0's Abort normally ends this rank here
    if message is not None:
        print(f"error: {message}" if user_error and rank == 0 else f"error (rank {rank}): {message}",
              file=sys.stderr, flush=True)
        time.sleep(0.5)  # let mpiexec forward the line: Abort tears its I/O proxies down at once
    world.Abort(code)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (also used in-process by the tests)."""
    from twin.runner import UserError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:
        return int(e.code or 0)
    except (*USER_ERRORS, UserError) as e:
        return _abort_on_failure(2, str(e).splitlines()[0] if str(e) else type(e).__name__, True)
    except KeyboardInterrupt:
        return _abort_on_failure(2, "interrupted", True)
    except Exception as e:
        if mpi_world() is None:
            raise  # an internal error: the traceback is for the developers; exit code 1
        import traceback

        traceback.print_exc()
        return _abort_on_failure(1, f"{type(e).__name__}: {e}", False)


if __name__ == "__main__":
    sys.exit(main())
