"""An emulated network link (delay, jitter, rates, outages) between the benchmark's device and cloud sides.

`EmulatedLink` (emulator.py) wires it; `netns.py` owns the namespace, veth pair and tbf qdiscs; `proxy.py`
is the delaying TCP proxy (a child process); link profiles are TOML in bench/profiles/links/ (profiles.py).
"""

from bench.link.emulator import EmulatedLink, Outage
from bench.link.errors import LinkError, LinkProfileError
from bench.link.profiles import LinkProfile, known_profiles, load_link_profile

__all__ = [
    "EmulatedLink",
    "LinkError",
    "LinkProfile",
    "LinkProfileError",
    "Outage",
    "known_profiles",
    "load_link_profile",
]
