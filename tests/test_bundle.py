"""Results bundles (labkit.lab.bundle): `labkit bench --all --share` here, `labkit results import`
into a fresh clone, and everything an archive from outside must not be allowed to do.

Two lab roots stand for two checkouts on two machines: "a Mac" (a faked Apple M3 Max fingerprint)
makes the bundle, "the lab" (a faked Linux box) imports it; each fingerprint hashes to its own
machine id as a real one does. The benchmarks are a small fake registered in bench.BENCHMARKS,
so the test measures nothing.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from labkit.core import env, results
from labkit.lab import bench, bundle

MAC = {"cpu": "Apple M3 Max", "cores_physical": 16, "cores_logical": 16, "ram_gb": 64.0, "os": "macOS-15.1-arm64",
       "system": "Darwin", "arch": "arm64", "apple_chip": "Apple M3 Max", "gpu": "Apple GPU, 40 cores",
       "gpu_cores": 40, "cores_performance": 12, "cores_efficiency": 4, "caches": {"L1d": 131072},
       "versions": {"python": "3.12.7", "torch": "2.13.0"}}
LAB = {"cpu": "AMD EPYC", "cores_physical": 2, "cores_logical": 2, "ram_gb": 23.5, "os": "Linux-6.1",
       "system": "Linux", "arch": "x86_64", "apple_chip": None, "gpu": None, "caches": {},
       "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"}}


def fake_bench(quick: bool = False) -> list[dict]:
    """What `labkit bench bandwidth` and `labkit bench runtimes` record, in small."""
    params = {"array_bytes": 2**28, "rounds": 3, "statistic": "best"}
    recs = [results.record("00_tour", "read_bandwidth", 100.0 * t, "GB/s", runtime="torch", device="cpu",
                           params=params, threads=t) for t in (1, 4)]
    return recs + [results.record("08_runtime_benchmark", metric, value, "tok/s", runtime="torch-eager",
                                  model="tiny-llama", params={"threads": 1}, threads=1)
                   for metric, value in (("pp_tok_s", 900.0), ("tg_tok_s", 80.0))]


def broken_bench(quick: bool = False) -> list[dict]:
    raise RuntimeError("this benchmark needs hardware that is not here")


def _machine(monkeypatch: pytest.MonkeyPatch, lab_root: Path, fields: dict) -> str:
    """Make ``lab_root`` this process's lab and ``fields`` this machine; its id."""
    fp = dict(fields)
    fp["machine_id"] = env.hardware_id(fp)
    monkeypatch.setattr(env, "_fingerprint", lambda: fp)
    monkeypatch.setenv("LABKIT_ROOT", str(lab_root))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)
    return fp["machine_id"]


@pytest.fixture
def two_labs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(results, "_git_rev", lambda: "abc1234")  # a clean checkout on both sides
    monkeypatch.setattr(bench, "BENCHMARKS", {"fake": f"{__name__}:fake_bench",
                                              "broken": f"{__name__}:broken_bench"})
    for key in (results.RUN_ID_ENV, results.RUN_LOADAVG_ENV):  # start_run sets them: restore after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return tmp_path / "mac", tmp_path / "lab"


def _share(monkeypatch, mac_root: Path, doctor: bool = False) -> tuple[str, Path]:
    mac_id = _machine(monkeypatch, mac_root, MAC)
    records, status = bundle.run_all(quick=True)
    assert status["fake"] == "ok" and status["broken"].startswith("failed: RuntimeError")
    return mac_id, bundle.make_bundle(records, status, mac_root / "share", doctor=doctor)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_shared_bundle_lands_as_a_second_machine(two_labs, monkeypatch) -> None:
    from labkit.studies import runtime_benchmark, tour

    mac_root, lab_root = two_labs
    mac_id, archive = _share(monkeypatch, mac_root)
    lab_id = _machine(monkeypatch, lab_root, LAB)
    fake_bench()  # the lab's own records, before the import
    ours = _snapshot(lab_root / "data" / "results")

    report = bundle.import_bundle(archive)
    assert report.machine == mac_id != lab_id
    assert report.added == {"00_tour": 2, "08_runtime_benchmark": 2} and report.present == 0
    after = _snapshot(lab_root / "data" / "results")
    assert all(after[k] == v for k, v in ours.items()), "the lab's own files are never rewritten"
    assert results.load_machine(mac_id)["gpu_cores"] == 40

    table, fig = tour.machines_figure()
    assert set(table["machine"]) == {mac_id, lab_id} and "Apple M3 Max" in set(table["where"])
    latest = results.across_machines(results.load_results(runtime_benchmark.STUDY), ["pp_tok_s", "tg_tok_s"],
                                     by=("runtime",))
    assert latest["where"].nunique() == 2
    legend = runtime_benchmark.plot_machines(latest).axes[1].get_legend_handles_labels()[1]
    assert len(legend) == 2
    assert (lab_root / "build" / "imports" / mac_id / "figures" / "00_tour-machines.png").is_file()

    again = bundle.import_bundle(archive)  # idempotent: nothing new the second time
    assert again.added == {} and again.present == 4


def test_the_archive_holds_records_fingerprint_runs_figures_and_doctor(two_labs, monkeypatch) -> None:
    mac_root, _ = two_labs
    mac_id, archive = _share(monkeypatch, mac_root, doctor=True)
    assert archive.name.startswith(f"labkit-results-{mac_id}-") and archive.suffixes[-2:] == [".tar", ".gz"]
    loaded = bundle.load_bundle(archive)
    names = set(loaded.members)
    assert {f"results/00_tour/{mac_id}.jsonl", f"results/machines/{mac_id}.json",
            f"results/machines/{mac_id}.runs.json", "doctor.txt", "doctor.json",
            "figures/00_tour-machines.png", "figures/08_runtime_benchmark-machines.png"} <= names
    assert loaded.manifest["benchmarks"]["fake"] == "ok" and loaded.manifest["records"] == 4
    assert loaded.manifest["fingerprint"]["gpu_cores"] == 40
    runs = json.loads(loaded.members[f"results/machines/{mac_id}.runs.json"])
    assert [e["studies"]["*"]["status"] for e in runs.values()] == ["ok"]
    assert "What runs here:" in loaded.members["doctor.txt"].decode()


def _tar(path: Path, members: list[tuple[str, bytes | None]], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, link or "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(("name", "data", "match"), [
    ("labkit-results/../evil.jsonl", b"x", "'..'"),
    ("/etc/cron.d/evil", b"x", "absolute"),
    ("labkit-results/results/00_tour/link.jsonl", None, "links"),
    ("labkit-results/results/00_tour/notes.txt", b"x", "not a file a results bundle holds"),
    ("labkit-results/results/machines/../../x.json", b"{}", "'..'"),
    ("elsewhere/manifest.json", b"{}", "outside"),
])
def test_unsafe_members_are_refused(tmp_path: Path, name: str, data, match: str) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", [(name, data)])
    with pytest.raises(bundle.BundleError, match=match):
        bundle.load_bundle(archive)


def _rewrite(archive: Path, out: Path, edit) -> Path:
    """A copy of ``archive`` with ``edit(members)`` applied and the manifest's sums kept."""
    members = bundle.read_members(archive)
    edit(members)
    return _tar(out, [(f"{bundle.TOP}/{n}", d) for n, d in members.items()])


def test_tampered_or_invalid_bundles_are_refused_before_anything_is_written(two_labs, monkeypatch) -> None:
    mac_root, lab_root = two_labs
    mac_id, archive = _share(monkeypatch, mac_root)
    _machine(monkeypatch, lab_root, LAB)
    fake_bench()
    before = _snapshot(lab_root / "data" / "results")
    rec_name = f"results/00_tour/{mac_id}.jsonl"

    def nan_value(m):
        m[rec_name] = m[rec_name].replace(b'"value": 100.0', b'"value": NaN')

    def resummed(edit):
        def apply(m):
            edit(m)
            manifest = json.loads(m["manifest.json"])
            manifest["files"] = {n: bundle._sha256(d) for n, d in m.items() if n != "manifest.json"}
            m["manifest.json"] = json.dumps(manifest).encode()
        return apply

    other = "0123456789ab"
    cases = {
        "checksum differs": nan_value,
        "not a finite number": resummed(nan_value),
        "belongs to machine": resummed(lambda m: m.update({f"results/00_tour/{other}.jsonl": m.pop(rec_name)})),
        "exactly the keys": resummed(lambda m: m.update({rec_name: b'{"study": "00_tour"}\n'})),
        "lists other files": lambda m: m.update({"doctor.txt": b"x"}),
        "does not hash": resummed(lambda m: m.update({"manifest.json": m["manifest.json"].replace(
            b'"gpu_cores": 40', b'"gpu_cores": 38')})),
    }
    for i, (match, edit) in enumerate(cases.items()):
        bad = _rewrite(archive, lab_root.parent / f"bad{i}.tar.gz", edit)
        with pytest.raises(bundle.BundleError, match=match):
            bundle.import_bundle(bad)
    assert _snapshot(lab_root / "data" / "results") == before


def test_the_cli_shares_and_imports(two_labs, monkeypatch, capsys) -> None:
    from labkit.lab import cli

    mac_root, lab_root = two_labs
    mac_id = _machine(monkeypatch, mac_root, MAC)
    assert cli.main(["bench", "--all", "--share", "--quick"]) == 1  # "broken" failed; the rest shared
    out = capsys.readouterr().out
    assert "bundle:" in out and "broken" in out
    (archive,) = (mac_root / "build" / "share").glob("*.tar.gz")
    _machine(monkeypatch, lab_root, LAB)
    assert cli.main(["results", "import", str(archive)]) == 0
    assert f"machine {mac_id}: 4 record(s) added" in capsys.readouterr().out
    assert cli.main(["results", "import", str(lab_root / "missing.tar.gz")]) == 2
    assert "refused" in capsys.readouterr().err
