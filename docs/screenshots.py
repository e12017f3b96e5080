"""Screenshots of the results in a real browser: the HTML report and Datasette's pages, by headless Chromium.

    make screenshots                       # installs Debian's chromium first, then runs this
    .venv/bin/python docs/screenshots.py --db results/bench.db --out build/screenshots

It writes the report (`edgecascade report`, report.html among it) for the database, starts
`edgecascade report --serve` on a free port, and for each page first has Chromium render it and dump the
DOM, which must contain the data the page is about (a run id, a query's column), then takes a PNG of it. A
page that renders without its data fails the script (exit 1) rather than leaving a blank screenshot.
Without --db (or when the file is missing) it makes a synthetic database, labelled: its run ids start with
`synthetic-` and the report's source line names the file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

WINDOW = (1280, 1000)
# The run_summary columns a reader looks at first (Datasette shows them with their units: mJ, ms)
SUMMARY_COLUMNS = "&".join(
    f"_col={c}"
    for c in (
        "run_id",
        "policy",
        "samples",
        "accuracy",
        "offload_fraction",
        "device_j_gross_per_inference",
        "device_j_analytic_per_inference",
        "energy_source",
        "latency_p50_ms",
        "latency_p99_ms",
        "bytes_per_inference",
    )
)


def synthetic_database(path: Path) -> Path:
    """Runs that look like one `edgecascade bench` (flat out and paced), made up and named so."""
    from results_db.database import open_database
    from results_db.ingest import RecordWriter
    from results_db.synthetic import full_run

    path.unlink(missing_ok=True)
    engine = open_database(path)
    writer = RecordWriter(engine)
    plan = [
        ("edge-only", {"offload_fraction": 0.0, "fallback_fraction": 0.0, "device_j": 0.009}),
        ("meanet", {"offload_fraction": 0.2, "device_j": 0.012}),
        ("entropy", {"offload_fraction": 0.25, "device_j": 0.012}),
        ("hi-threshold", {"offload_fraction": 0.3, "device_j": 0.013}),
        ("cloud-only", {"offload_fraction": 1.0, "fallback_fraction": 0.03, "device_j": 0.02}),
    ]
    for seed, (policy, kwargs) in enumerate(plan):
        run_id = f"synthetic-{policy}"
        writer.write(full_run(run_id, "synthetic-dev", 600, policy=policy, seed=seed, **kwargs))
        writer.write(
            full_run(f"{run_id}-paced", "synthetic-dev", 150, policy=policy, seed=seed + 10, **kwargs)
        )
    # One run as if a meter had been read: the figure then shows both of its panels.
    writer.write(
        full_run(
            "synthetic-meanet-rapl", "synthetic-dev2", 300, energy_source="rapl", device_j=0.011, seed=20
        )
    )
    engine.dispose()
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no chromium: `make screenshots` installs Debian's (apt-get install chromium)")


def _browser(binary: str, *args: str, window: Tuple[int, int] = WINDOW) -> List[str]:
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", f"--window-size={window[0]},{window[1]}"]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return [binary, *flags, *args]


def dump_dom(binary: str, url: str) -> str:
    out = subprocess.run(
        _browser(binary, "--dump-dom", url), capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout


def screenshot(binary: str, url: str, png: Path, window: Tuple[int, int]) -> None:
    """A PNG of the page, stored with a 256-colour palette (a page has few colours: far fewer bytes)."""
    from PIL import Image

    png.unlink(missing_ok=True)
    command = _browser(binary, f"--screenshot={png}", url, window=window)
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    if not png.is_file():
        raise SystemExit(f"no screenshot of {url}: {png}")
    with Image.open(png) as image:
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 16)
    if colours is not None and len(colours) < 8:
        raise SystemExit(f"the screenshot of {url} is blank: {png}")
    rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(png, optimize=True)


def _wait_for(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"edgecascade report --serve exited {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise SystemExit(f"Datasette did not answer at {url} in {timeout_s:g} s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", type=Path, help="SQLite results file (default: a synthetic one)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "build" / "screenshots", help="folder for the PNGs"
    )
    args = parser.parse_args(argv)

    from results_db.database import open_database
    from results_db.report import build_report

    binary = _chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.db and args.db.is_file():
        db = args.db
    else:
        db = synthetic_database(args.out / "synthetic.db")
        print(f"no results file at {args.db}: screenshots of a synthetic database, {db}", file=sys.stderr)
    engine = open_database(db)
    report = build_report(engine, args.out / "report")
    runs = [r["run_id"] for r in report.data.runs]
    engine.dispose()

    port = _free_port()
    base = f"http://127.0.0.1:{port}/{db.stem}"
    server = subprocess.Popen(
        [sys.executable, "-m", "edgecascade", "report", "--db", str(db), "--serve", "--port", str(port)],
        cwd=REPO,
    )
    # (file name, URL, what its DOM must contain, window): run_summary lists its column notes above its rows
    html = report.files["html"].resolve().as_uri()
    pages: List[Tuple[str, str, List[str], Tuple[int, int]]] = [
        ("report-html.png", html, ["Summary", runs[0], "data:image/png"], (1280, 1250)),
        ("datasette-database.png", base, ["run_summary", "energy-per-correct"], WINDOW),
        ("datasette-run-summary.png", f"{base}/run_summary?{SUMMARY_COLUMNS}", [runs[0], "mJ"], (1280, 1500)),
        (
            "datasette-query.png",
            f"{base}/energy-per-correct",
            ["device_j_per_correct", "Units:"],
            (1280, 720),
        ),
    ]
    try:
        _wait_for(f"{base}.json", server)
        for name, url, expected, window in pages:
            dom = dump_dom(binary, url)
            missing = [text for text in expected if text not in dom]
            if missing:
                print(f"{url}: the rendered page lacks {missing}", file=sys.stderr)
                return 1
            screenshot(binary, url, args.out / name, window)
            print(f"{args.out / name}: {url}", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
