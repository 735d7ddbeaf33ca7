"""A results bundle: one machine's benchmark run as one archive, and its import into data/results.

Why: the lab is for Apple silicon first, and its first Mac numbers will come from a reader's Mac,
not from the machine the lab is built on. ``labkit bench --all --share`` runs every benchmark
(``labkit.lab.bench``) and writes ``build/share/labkit-results-<machine>-<time>.tar.gz``; the
reader sends that one file, and ``labkit results import ARCHIVE`` merges it into data/results,
where every figure that draws other machines (``results.across_machines``) shows it beside ours:
the contribution lands as a normal commit of that machine's files.

The archive (one folder, :data:`TOP`):

    manifest.json                       format, machine id, fingerprint, runs, sha256 of each file
    results/<study>/<machine>.jsonl     the records of the shared runs only
    results/machines/<machine>.json     the fingerprint (chip, GPU cores, memory, versions)
    results/machines/<machine>.runs.json, .bandwidth.json   its run registry and read-bandwidth probe
    figures/<name>.png                  the across-machines figures as they look with these records
    doctor.txt, doctor.json             ``labkit doctor`` on that machine

Import trusts nothing in it: every member must be a regular file at one of the paths above (no
absolute paths, no "..", no links), every checksum must match, every record must be a valid
record of the bundle's machine, all before anything is written. Records are appended (a record
already present is skipped, so importing twice adds nothing), files of any other machine are
never touched, and a fingerprint that disagrees with the stored one for the same id is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from labkit.core import env, files, paths, results

FORMAT = 1
TOP = "labkit-results"
MAX_MEMBERS = 5000
MAX_BYTES = 256 * 2**20  # uncompressed, all members together
_MACHINE = r"[0-9a-f]{12}"
_STUDY = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_FIGURE = re.compile(r"figures/[A-Za-z0-9][A-Za-z0-9_.@-]*\.(png|svg)")
_RECORDS = re.compile(rf"results/(?P<study>{_STUDY})/(?P<machine>{_MACHINE})\.jsonl")
_MACHINE_FILE = re.compile(rf"results/machines/(?P<machine>{_MACHINE})(?P<kind>\.runs|\.bandwidth)?\.json")
_PLAIN = {"manifest.json", "doctor.txt", "doctor.json"}


class BundleError(ValueError):
    """The archive is not a valid results bundle (the message says which member and why)."""


# --------------------------------------------------------------------------- making a bundle


def run_all(quick: bool = False) -> tuple[list[dict], dict[str, str]]:
    """Every registered benchmark, one run each: (their records, {benchmark: "ok" or why not}).

    A benchmark that fails is noted and the others still run: a bundle with what worked is worth
    more than none.
    """
    from labkit.lab import bench

    records: list[dict] = []
    status: dict[str, str] = {}
    for name in sorted(bench.BENCHMARKS):
        try:
            records += bench.resolve(name)(quick=quick)
            status[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported in the manifest and on the console
            status[name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    return records, status


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _records_of(machine: str, run_ids: set[str]) -> dict[str, bytes]:
    """results/<study>/<machine>.jsonl with the lines of ``run_ids`` only, per study."""
    out = {}
    for path in sorted(paths.results_dir().glob(f"*/{machine}.jsonl")):
        if path.parent.name == results.MACHINES_FOLDER:
            continue
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and json.loads(ln).get("run_id") in run_ids]
        if lines:
            out[f"results/{path.parent.name}/{machine}.jsonl"] = ("\n".join(lines) + "\n").encode()
    return out


def _machine_files(machine: str, run_ids: set[str]) -> dict[str, bytes]:
    """The fingerprint, the registry entries of ``run_ids`` and the bandwidth probe."""
    dump = lambda obj: (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()  # noqa: E731
    out = {f"results/machines/{machine}.json": dump(env.fingerprint())}
    runs = {k: v for k, v in results.load_run_registry(machine).items() if k in run_ids}
    out[f"results/machines/{machine}.runs.json"] = dump(runs)
    bandwidth = results.load_machine_file(machine, "bandwidth")
    if bandwidth:
        out[f"results/machines/{machine}.bandwidth.json"] = dump(bandwidth)
    return out


def _figures() -> dict[str, bytes]:
    """The across-machines figures (00's read bandwidth, 08's pp/tg) drawn from data/results,
    where this machine's records now are; a figure without records to draw is left out."""
    import matplotlib.pyplot as plt

    from labkit.studies import runtime_benchmark, tour

    def machines_08() -> Any:
        df = results.load_results(runtime_benchmark.STUDY)
        latest = results.across_machines(df, ["pp_tok_s", "tg_tok_s"], by=("runtime",))
        return runtime_benchmark.plot_machines(latest) if len(latest) else None

    out = {}
    for name, draw in (("00_tour-machines", lambda: tour.machines_figure()[1]),
                       ("08_runtime_benchmark-machines", machines_08)):
        try:
            fig = draw()
        except (ValueError, KeyError):
            continue  # no records of that study here
        if fig is None:
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        out[f"figures/{name}.png"] = buffer.getvalue()
    return out


def _doctor() -> dict[str, bytes]:
    from labkit.lab import doctor

    report = doctor.diagnose()
    return {"doctor.txt": ("\n".join(report.lines()) + "\n").encode(),
            "doctor.json": (json.dumps(report.to_dict(), indent=1) + "\n").encode()}


def make_bundle(records: list[dict], benchmarks: dict[str, str] | None = None,
                out_dir: Path | None = None, *, doctor: bool = True) -> Path:
    """Write the archive of ``records``' runs (their machine: this one) and return its path."""
    machine = env.machine_id()
    run_ids = {r["run_id"] for r in records if r.get("machine") == machine}
    if not run_ids:
        raise BundleError("nothing to share: no records of this machine in the benchmark runs")
    members = {**_records_of(machine, run_ids), **_machine_files(machine, run_ids), **_figures(),
               **(_doctor() if doctor else {})}
    manifest = {
        "format": FORMAT, "machine": machine, "fingerprint": env.fingerprint(),
        "git_rev": env.git_revision(), "created": datetime.now().astimezone().isoformat(),
        "runs": sorted(run_ids), "benchmarks": benchmarks or {},
        "records": sum(b.count(b"\n") for n, b in members.items() if n.endswith(".jsonl")),
        "files": {name: _sha256(data) for name, data in sorted(members.items())},
    }
    members["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    out = Path(out_dir or paths.build_dir() / "share")
    path = out / f"{TOP}-{machine}-{time.strftime('%Y%m%dT%H%M%S')}.tar.gz"
    out.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- reading a bundle


def _member_name(member: tarfile.TarInfo) -> str:
    """The member's path below :data:`TOP`, after refusing anything but a plain, safe file."""
    raw = member.name
    parts = PurePosixPath(raw).parts
    if raw.startswith(("/", "\\")) or "\\" in raw or ".." in parts or not parts or parts[0] != TOP:
        raise BundleError(f"{raw!r}: not a path inside {TOP}/ (absolute, '..' or outside)")
    if member.isdir():
        return ""
    if not member.isfile():
        raise BundleError(f"{raw!r}: links and special files are refused")
    name = "/".join(parts[1:])
    if name not in _PLAIN and not (_FIGURE.fullmatch(name) or _RECORDS.fullmatch(name)
                                   or _MACHINE_FILE.fullmatch(name)):
        raise BundleError(f"{raw!r}: not a file a results bundle holds")
    return name


def read_members(archive: Path) -> dict[str, bytes]:
    """Every file of the archive by its name below :data:`TOP`, checked, never extracted."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS or sum(m.size for m in members) > MAX_BYTES:
                raise BundleError(f"{archive}: more than {MAX_MEMBERS} files or {MAX_BYTES} bytes")
            for member in members:
                name = _member_name(member)
                if name:
                    if name in out:
                        raise BundleError(f"{member.name!r} appears twice")
                    out[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{archive}: not a readable tar.gz ({exc})") from exc
    return out


def _check_record(rec: Any, study: str, machine: str, where: str) -> None:
    """A record of ``study`` from ``machine`` that results.load_results would accept."""
    if not isinstance(rec, dict) or set(rec) not in (set(results.RECORD_KEYS),
                                                     set(results.LEGACY_RECORD_KEYS)):
        raise BundleError(f"{where}: a record needs exactly the keys {results.RECORD_KEYS}")
    value = rec["value"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BundleError(f"{where}: value {value!r} is not a finite number")
    if rec["study"] != study or rec["machine"] != machine:
        raise BundleError(f"{where}: study/machine {rec['study']}/{rec['machine']} != the file's")
    for key in ("metric", "unit", "runtime", "device", "git_rev", "created"):
        if not isinstance(rec[key], str) or not rec[key]:
            raise BundleError(f"{where}: {key} must be a non-empty string")
    if not isinstance(rec["model"], str) or not isinstance(rec["params"], dict):
        raise BundleError(f"{where}: model must be a string and params an object")
    try:
        datetime.fromisoformat(rec["created"].replace("Z", "+00:00"))
    except ValueError as exc:
        raise BundleError(f"{where}: created {rec['created']!r} is not an ISO time") from exc


@dataclass
class Bundle:
    """A checked archive: its manifest, its records per study, its other files."""

    manifest: dict[str, Any]
    records: dict[str, list[dict]]  # study -> records
    members: dict[str, bytes]

    @property
    def machine(self) -> str:
        return self.manifest["machine"]


def load_bundle(archive: str | Path) -> Bundle:
    """Read and check ``archive`` completely (see the module docstring); BundleError if not."""
    members = read_members(Path(archive))
    try:
        manifest = json.loads(members["manifest.json"])
    except (KeyError, ValueError) as exc:
        raise BundleError(f"{archive}: no readable manifest.json") from exc
    machine = manifest.get("machine")
    if manifest.get("format") != FORMAT or not re.fullmatch(_MACHINE, str(machine)):
        raise BundleError(f"{archive}: manifest format {manifest.get('format')!r} / machine {machine!r}")
    listed = manifest.get("files") or {}
    if set(listed) != set(members) - {"manifest.json"}:
        raise BundleError(f"{archive}: the manifest lists other files than the archive holds")
    records: dict[str, list[dict]] = {}
    for name, data in members.items():
        if name != "manifest.json" and _sha256(data) != listed[name]:
            raise BundleError(f"{name}: checksum differs from the manifest")
        found = _RECORDS.fullmatch(name) or _MACHINE_FILE.fullmatch(name)
        if found and found.group("machine") != machine:
            raise BundleError(f"{name}: belongs to machine {found.group('machine')}, not {machine}")
        if (match := _RECORDS.fullmatch(name)) is not None:
            if match.group("study") == results.MACHINES_FOLDER:
                raise BundleError(f"{name}: 'machines' is not a study")
            records[match.group("study")] = _parse_lines(name, data, match.group("study"), machine)
    fingerprint = manifest.get("fingerprint")
    if not isinstance(fingerprint, dict) or env.hardware_id(fingerprint) != machine:
        raise BundleError(f"{archive}: the manifest's fingerprint does not hash to machine {machine}")
    return Bundle(manifest, records, members)


def _parse_lines(name: str, data: bytes, study: str, machine: str) -> list[dict]:
    out = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise BundleError(f"{name}:{number}: not JSON ({exc})") from exc
        _check_record(rec, study, machine, f"{name}:{number}")
        out.append(rec)
    return out


# --------------------------------------------------------------------------- importing


@dataclass
class Imported:
    """What an import did: records added and already present, files written and kept."""

    machine: str
    added: dict[str, int] = field(default_factory=dict)  # study -> new records
    present: int = 0
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        total = sum(self.added.values())
        out = [f"machine {self.machine}: {total} record(s) added in {len(self.added)} studies, "
               f"{self.present} already present"]
        out += [f"  {study}: +{n}" for study, n in sorted(self.added.items())]
        out += [f"  wrote {p}" for p in self.written] + [f"  kept {p} (already there)" for p in self.kept]
        return out


def _merge_records(study: str, machine: str, new: list[dict], report: Imported) -> None:
    """Append the records of ``new`` not in data/results/<study>/<machine>.jsonl already."""
    path = paths.results_dir() / study / f"{machine}.jsonl"
    with results.locked(path):
        old = path.read_bytes() if path.exists() else b""
        seen = {json.dumps(json.loads(ln), sort_keys=True) for ln in old.decode().splitlines() if ln.strip()}
        lines = [json.dumps(r, ensure_ascii=False, allow_nan=False) for r in new
                 if json.dumps(r, sort_keys=True) not in seen]
        report.present += len(new) - len(lines)
        if lines:
            prefix = old if not old or old.endswith(b"\n") else old + b"\n"
            files.atomic_write_bytes(path, prefix + ("\n".join(lines) + "\n").encode("utf-8"))
            report.added[study] = len(lines)


def _merge_machine_files(bundle: Bundle, report: Imported) -> None:
    """The fingerprint, bandwidth probe and doctor report where absent; the run registry
    merged (runs already registered keep their entry)."""
    machine = bundle.machine
    for kind in ("", "bandwidth"):
        name = f"results/machines/{machine}{'.' + kind if kind else ''}.json"
        target = results.machine_file(machine, kind)
        if name not in bundle.members:
            continue
        if target.exists():
            report.kept.append(str(target.relative_to(paths.output_root())))
        else:
            files.atomic_write_bytes(target, bundle.members[name])
            report.written.append(str(target.relative_to(paths.output_root())))
    runs = json.loads(bundle.members.get(f"results/machines/{machine}.runs.json", b"{}"))
    target = results.machine_file(machine, "runs")
    with results.locked(target):
        registry = json.loads(target.read_text()) if target.exists() else {}
        files.atomic_write_json(target, {**runs, **registry}, indent=1)
    if "doctor.json" in bundle.members:
        files.atomic_write_bytes(results.machine_file(machine, "doctor"), bundle.members["doctor.json"])


def import_bundle(archive: str | Path) -> Imported:
    """Merge the bundle at ``archive`` into data/results (checked first, see the module
    docstring); its figures go to build/imports/<machine>/ for a look, not over ours."""
    bundle = load_bundle(archive)
    machine = bundle.machine
    stored = results.load_machine(machine)
    if stored is not None and env.hardware_id(stored) != machine:
        raise BundleError(f"data/results/machines/{machine}.json does not hash to its own id: "
                          "refused to merge into it (check that file first)")
    report = Imported(machine)
    for study, recs in sorted(bundle.records.items()):
        _merge_records(study, machine, recs, report)
    _merge_machine_files(bundle, report)
    look = paths.build_dir() / "imports" / machine
    for name, data in bundle.members.items():
        if name.startswith("figures/") or name == "doctor.txt":
            files.atomic_write_bytes(look / name, data)
    return report


