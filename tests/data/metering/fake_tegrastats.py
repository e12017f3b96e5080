# A stand-in for NVIDIA's `tegrastats` (tests copy it onto PATH behind a shebang): it replays the lines of the
# log named by $FAKE_TEGRASTATS_LOG, one per `--interval <ms>`, as tegrastats prints them. It loops over the
# log until terminated, or stops after one pass when $FAKE_TEGRASTATS_ONCE is set (tegrastats dying).
# With $FAKE_TEGRASTATS_SILENT set it prints nothing (a tegrastats without power rails, or a hung one).
import os
import sys
import time

args = sys.argv[1:]
interval_ms = int(args[args.index("--interval") + 1]) if "--interval" in args else 1000
if os.environ.get("FAKE_TEGRASTATS_SILENT"):
    time.sleep(60)
    sys.exit(0)
with open(os.environ["FAKE_TEGRASTATS_LOG"]) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
while True:
    for line in lines:
        print(line, flush=True)
        time.sleep(interval_ms / 1000.0)
    if os.environ.get("FAKE_TEGRASTATS_ONCE"):
        sys.exit(0)
