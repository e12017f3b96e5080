"""Machine fault detection from vibration: a physics-based bearing simulator, real-format loaders, windows.

Device-side (Python >= 3.8, numpy + scipy, no torch/SQLAlchemy/matplotlib): `bearing` (geometry, fault
characteristic frequencies), `simulate` (one recording of a machine with a healthy or faulty bearing),
`envelope` (the envelope spectrum, the classical diagnostic), `dataset` (separate recordings per split, cut
into windows), `loaders` (CWRU `.mat` and MaFaulDa CSV files), `rules` (HI and the cost-sensitive H2T2 rule).
A leaf library: it imports no other edgecascade package, except `sensor` (the sensor agent) and `gateway`
(the gateway task), which wire it to the device agent's session and the cloud worker.
"""
