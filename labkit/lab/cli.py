"""The `labkit` command: info, doctor, reproduce, bench, results, chat, site, lab, train."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from labkit.core import env

    console = Console()
    fp = env.fingerprint()
    table = Table(title=f"this machine ({escape(str(fp['machine_id']))})", show_header=False)
    for key, value in fp.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v)
        table.add_row(escape(str(key)), escape(str(value)))
    console.print(table)
    rt = Table(title="optional runtimes")
    rt.add_column("runtime")
    rt.add_column("available")
    rt.add_column("why not")
    for name, reason in env.optional_runtimes().items():
        # escaped: an install hint's "[llamacpp]" is rich markup to rich, and vanished
        rt.add_row(escape(name), "yes" if reason is None else "no", escape(reason or ""))
    console.print(rt)
    build = env.llamacpp_build()
    console.print("llama.cpp build: " + (
        f"{build['package']} {build['version']} (llama.cpp {build['llama.cpp'] or 'release unknown'}, "
        f"{build['package']} commit {build['commit'] or 'unknown'})" if build
        else "none (pip install xllamacpp)"))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from labkit.lab.reproduce import main_from_args

    return main_from_args(args)


def _bench_options(args: argparse.Namespace) -> dict:
    """The options given on the command line, by the benchmark function's parameter names."""
    runtimes = None
    if args.runtimes not in (None, "all"):
        runtimes = [n.strip() for n in args.runtimes.split(",") if n.strip()]
        if not runtimes:
            raise ValueError(f"--runtimes {args.runtimes!r} names no runtime (or use 'all')")
    options = {"model": args.model, "prompt": args.prompt, "gen": args.gen, "runtimes": runtimes}
    return {k: v for k, v in options.items() if v is not None}


def _cmd_doctor(args: argparse.Namespace) -> int:
    from labkit.lab import doctor

    if args.json:
        import json

        report = doctor.diagnose()
        print(json.dumps(report.to_dict(), indent=1))
        return 0 if report.can_set_up else 1
    return doctor.main()


def _cmd_bench_all(args: argparse.Namespace) -> int:
    """`labkit bench --all [--share]`: every benchmark, each its own run; with --share one
    archive of their records, figures and the doctor report (labkit.lab.bundle)."""
    from rich.console import Console

    from labkit.lab import bundle

    console = Console()
    with console.status("running every benchmark"):
        records, status = bundle.run_all(quick=args.quick)
    for name, outcome in status.items():
        console.print(f"{name:16s} {outcome}")
    console.print(f"{len(records)} records written under data/results/")
    if args.share:
        path = bundle.make_bundle(records, status)
        console.print(f"bundle: {path}")
        console.print(f"send this one file; it is merged with: labkit results import {path.name}")
    return 0 if all(v == "ok" for v in status.values()) else 1


def _cmd_results(args: argparse.Namespace) -> int:
    from labkit.lab import bundle

    try:
        report = bundle.import_bundle(args.archive)
    except (bundle.BundleError, FileNotFoundError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from labkit.lab import bench

    if args.all or args.share:
        return _cmd_bench_all(args)
    console = Console()
    if args.list or not args.name:
        for name, target in sorted(bench.BENCHMARKS.items()):
            console.print(f"{escape(name):16s} {escape(target)}")
        return 0
    try:
        fn = bench.resolve(args.name)
        given = _bench_options(args)
    except (KeyError, ValueError) as exc:
        console.print(f"[red]{escape(str(exc.args[0]))}[/red]")
        return 2
    import inspect

    accepted = inspect.signature(fn).parameters
    refused = sorted(k for k in given if k not in accepted)
    if refused:
        console.print(f"[red]benchmark {escape(args.name)} takes no "
                      f"{escape(', '.join('--' + k for k in refused))}[/red]")
        return 2
    try:
        with console.status(f"running benchmark {escape(args.name)}"):
            records = fn(quick=args.quick, **given)
    except (OSError, RuntimeError, TypeError, ValueError) as exc:  # ModelLoadError is a ValueError
        console.print(f"[red]benchmark {escape(args.name)} failed: "
                      f"{escape(type(exc).__name__)}: {escape(str(exc))}[/red]")
        return 1
    for r in records:
        console.print(escape(f"{r['study']} {r['metric']} = {r['value']:.4g} {r['unit']} "
                             f"{r['params']}"))
    console.print(f"{len(records)} records written under data/results/")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from labkit.inference.chat import chat
    from labkit.models import load

    console = Console(highlight=False)
    try:
        with console.status(f"loading {escape(args.model)}"):
            loaded = load(args.model, device=args.device)
        answer = chat(loaded.model, loaded.tokenizer, args.question,
                      max_new_tokens=args.max_new_tokens, system=args.system,
                      on_piece=lambda p: console.print(escape(p), end=""))
    except (OSError, RuntimeError, TypeError, ValueError) as exc:  # ModelLoadError is a ValueError
        console.print(f"[red]{escape(type(exc).__name__)}: {escape(str(exc))}[/red]")
        return 1
    console.print()
    console.print(f"[dim]TTFT {answer.ttft_s * 1e3:.0f} ms ({answer.prompt_tokens} prompt tokens), "
                  f"{answer.decode_tokens_per_s:.1f} tokens/s decode, {len(answer.tokens)} tokens"
                  f"{'' if answer.stopped else ' (stopped at --max-new-tokens)'}[/dim]")
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    from labkit.lab.site import main as site_main

    return site_main(["--publish"] if args.publish else [])


def _cmd_lab(args: argparse.Namespace) -> int:
    from labkit.lab.notebook_server import main as lab_main

    return lab_main(["--ip", args.ip, *(["--port", str(args.port)] if args.port else [])])


def build_parser() -> argparse.ArgumentParser:
    from labkit.core.checks import option, positive_int
    from labkit.lab.reproduce import add_arguments

    parser = argparse.ArgumentParser(prog="labkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="this machine's fingerprint and which runtimes are available")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("doctor", help="what this machine can run, what is skipped, how to fix it")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("reproduce", help="run the notebooks headlessly with papermill")
    add_arguments(p)
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("bench", help="run a study's benchmark and record its results")
    p.add_argument("name", nargs="?", help="benchmark name (see --list)")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument("--model", help="model name or folder (benchmarks that load one)")
    p.add_argument("--runtimes", help="comma-separated runtimes, or 'all' (runtimes benchmark)")
    p.add_argument("--prompt", type=option(positive_int),
                   help="prompt tokens, e.g. 512 for pp512 (runtimes benchmark)")
    p.add_argument("--gen", type=option(positive_int),
                   help="generated tokens, e.g. 128 for tg128 (runtimes benchmark)")
    p.add_argument("--all", action="store_true", help="every benchmark, one run each")
    p.add_argument("--share", action="store_true",
                   help="with --all: one archive of the records, figures and doctor report (build/share)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("results", help="results from other machines: labkit results import ARCHIVE")
    rsub = p.add_subparsers(dest="action", required=True)
    imp = rsub.add_parser("import", help="merge a bundle of `labkit bench --all --share` into data/results")
    imp.add_argument("archive", help="the .tar.gz a contributor sent")
    imp.set_defaults(func=_cmd_results)

    p = sub.add_parser("chat", help="ask a chat model one question; streams the answer")
    p.add_argument("question", help="the question (one user turn)")
    p.add_argument("--model", default="smollm2-135m", help="a chat model: name, folder or hub id")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-new-tokens", type=option(positive_int), default=256,
                   help="answer length limit")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("site", help="build the static site of the executed notebooks (build/site)")
    p.add_argument("--publish", action="store_true",
                   help="build it into docs/ instead (a clean, complete, full run only)")
    p.set_defaults(func=_cmd_site)

    p = sub.add_parser("lab", help="JupyterLab on notebooks/ (as root too); prints the URL to open")
    p.add_argument("--ip", default="127.0.0.1", help="interface (0.0.0.0: reachable from outside)")
    p.add_argument("--port", type=option(positive_int), help="port (default: the first free one from 8888)")
    p.set_defaults(func=_cmd_lab)

    sub.add_parser("train", help="train the embedded decoder: labkit train --help")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # everything after "train" belongs to labkit.train's own parser
        from labkit.train import main as train_main

        return int(train_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
