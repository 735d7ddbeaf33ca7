"""The `labkit` command: info, doctor, reproduce, bench, results, chat, site, train."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from labkit.core import env

    console = Console()
    fp = env.fingerprint()
    table = Table(title=f"this machine ({fp['machine_id']})", show_header=False)
    for key, value in fp.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v)
        table.add_row(key, str(value))
    console.print(table)
    rt = Table(title="optional runtimes")
    rt.add_column("runtime")
    rt.add_column("available")
    rt.add_column("why not")
    for name, reason in env.optional_runtimes().items():
        rt.add_row(name, "yes" if reason is None else "no", reason or "")
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

    from labkit.lab import bench

    if args.all or args.share:
        return _cmd_bench_all(args)
    console = Console()
    if args.list or not args.name:
        for name, target in sorted(bench.BENCHMARKS.items()):
            console.print(f"{name:16s} {target}")
        return 0
    try:
        fn = bench.resolve(args.name)
    except KeyError as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        return 2
    import inspect

    accepted = inspect.signature(fn).parameters
    options = {"model": args.model, "prompt": args.prompt, "gen": args.gen,
               "runtimes": None if args.runtimes in (None, "all") else args.runtimes.split(",")}
    given = {k: v for k, v in options.items() if v is not None}
    refused = sorted(k for k in given if k not in accepted)
    if refused:
        console.print(f"[red]benchmark {args.name} takes no {', '.join('--' + k for k in refused)}[/red]")
        return 2
    with console.status(f"running benchmark {args.name}"):
        records = fn(quick=args.quick, **given)
    for r in records:
        console.print(f"{r['study']} {r['metric']} = {r['value']:.4g} {r['unit']} {r['params']}")
    console.print(f"{len(records)} records written under data/results/")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from labkit.inference.chat import chat
    from labkit.models import load

    console = Console(highlight=False)
    with console.status(f"loading {escape(args.model)}"):
        loaded = load(args.model, device=args.device)
    answer = chat(loaded.model, loaded.tokenizer, args.question, max_new_tokens=args.max_new_tokens,
                  system=args.system, on_piece=lambda p: console.print(escape(p), end=""))
    console.print()
    console.print(f"[dim]TTFT {answer.ttft_s * 1e3:.0f} ms ({answer.prompt_tokens} prompt tokens), "
                  f"{answer.decode_tokens_per_s:.1f} tokens/s decode, {len(answer.tokens)} tokens"
                  f"{'' if answer.stopped else ' (stopped at --max-new-tokens)'}[/dim]")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_site(args: argparse.Namespace) -> int:
    from labkit.lab.site import main as site_main

    return site_main([])


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--prompt", type=int, help="prompt tokens, e.g. 512 for pp512 (runtimes benchmark)")
    p.add_argument("--gen", type=int, help="generated tokens, e.g. 128 for tg128 (runtimes benchmark)")
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
    p.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length limit")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("site", help="build the static site of the executed notebooks (build/site)")
    p.set_defaults(func=_cmd_site)

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
