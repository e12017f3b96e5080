"""Machine fault detection from vibration: a physics-based bearing simulator, real-format loaders, windows.

Device-side (Python >= 3.8, numpy + scipy, no torch/SQLAlchemy/matplotlib): `bearing` (geometry, fault
characteristic frequencies), `simulate` (one recording of a machine with a healthy or faulty bearing),
`envelope` (the envelope spectrum, the classical diagnostic), `dataset` (separate recordings per split, cut
into windows), `loaders` (CWRU `.mat` and MaFaulDa CSV files), `rules` (HI and the cost-sensitive H2T2 rule).
`card` (the fault card), `sensor` (the sensor agent, on the device agent's session and outbox). A leaf
library: only `sensor` imports other edgecascade packages (device_agent, protocol, metering); the gateway
task that uses it lives in `cloud_worker.gateway`.
"""
